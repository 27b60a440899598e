"""The decode cache of the generic paged runner: each decoding sequence's K/V, contiguous.

Decode attention over the paged pool has to gather every sequence's pages into a dense
``[batch, kv_heads, length, head_dim]`` tensor first, in every layer of every step: it
reads and writes the whole context of the batch twice before the attention reads it again.
:class:`DecodeCache` keeps that dense tensor from one step to the next instead -- one row
per decoding sequence, holding the K/V of its positions ``0..n-1`` in the layout SDPA reads
best -- so a decode step only appends the step's token to each row (it is written to the
pool as well, which stays the source of truth). Rows are (re)built from the pool when a
sequence starts decoding or its row cannot be trusted, and moved when the batch changes.

A step's plan (:meth:`DecodeCache.plan`) puts the step's decode sequences, in ascending
order of position, on rows ``0..b-1``: a row already holding the sequence's positions
``0..start-1`` on the same pages is kept or moved, any other is filled from the pool's
slots. Every layer applies the plan (:meth:`DecodeCache.apply`) before attending over rows
``0..b-1``.

The step metadata every layer shares (:class:`Step` with its :class:`Prefill` chunks and
:class:`DecodeGroup` row ranges) is defined here too.

Invariants:
    * The cache is a copy: the pool always holds every position too. A row is trusted only
      while its metadata says which sequence it holds, how many positions, and on which
      pages (all checked against the step's chunk before reuse); anything else is refilled.
    * Planning empties the metadata; :meth:`DecodeCache.commit` installs the new metadata
      only after every layer applied the plan. A failed or abandoned step therefore leaves
      an empty cache, never a half-written one that is trusted.
    * Rows are allocated zeroed and only ever hold finite K/V the model computed, so masked
      positions past a row's length never carry NaN into a weighted sum.
    * The cache never holds more than its byte budget; a step that would need more is
      served by gathering pages (the plan is None) and the cache is emptied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sagellm_backend.engine.runners.base import SeqChunk

if TYPE_CHECKING:
    from sagellm_backend.engine.runners.paged import PagedRunner

__all__ = [
    "DECODE_CACHE_BYTES",
    "DecodeCache",
    "DecodeGroup",
    "DecodePlan",
    "Prefill",
    "Step",
]

#: Default byte budget of the decode cache (all layers, K and V).
DECODE_CACHE_BYTES = 512 << 20
# Growth quantum of the cached length (tokens).
_LENGTH_STEP = 64


@dataclass(slots=True)
class _Row:
    seq_id: str
    length: int  # positions 0..length-1 held
    pages: list[int]  # the block table pages holding those positions


@dataclass(slots=True)
class DecodePlan:
    """How the layers of one step update the cache (see :meth:`DecodeCache.plan`).

    Attributes:
        rows: the step's decode sequences sit on rows ``0..rows-1`` (ascending position).
        pos: ``[rows]`` position of each row's new token (where it is appended).
        row_index: ``[rows]`` ``0..rows-1``.
        move_src / move_dst: rows whose content moves (None: no move).
        move_len: positions to copy for the moves.
        fill_rows: ``(row, first, count)`` per row rebuilt from the pool: its positions
            ``0..count-1`` come from ``fill_slots[first:first + count]``.
        fill_slots: pool slots of every filled position (None: no fill).
        new_rows: the metadata :meth:`DecodeCache.commit` installs.
    """

    rows: int
    pos: torch.Tensor
    row_index: torch.Tensor
    move_src: torch.Tensor | None
    move_dst: torch.Tensor | None
    move_len: int
    fill_rows: list[tuple[int, int, int]]
    fill_slots: torch.Tensor | None
    new_rows: list[_Row]


class DecodeCache:
    """Dense per-sequence K/V copies for decode attention (see the module docstring).

    Args:
        shapes: ``(kv_heads, head_dim)`` of every layer.
        dtype / device: those of the KV pool.
        block_size: tokens per page.
        max_context: longest sequence (the cached length never exceeds it).
        budget_bytes: most bytes the cache may hold (0: never used).
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        *,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
        max_context: int,
        budget_bytes: int,
    ) -> None:
        self._shapes = list(shapes)
        self._dtype = dtype
        self._device = device
        self._bs = block_size
        self._max_context = max_context
        self.budget_bytes = budget_bytes
        self._item = torch.empty((), dtype=dtype).element_size()
        #: Per layer ``[2, rows, kv_heads, length, head_dim]`` (K, V); empty until used.
        self.layers: list[torch.Tensor] = []
        self._num_rows = 0
        self._length = 0
        self._rows: list[_Row] = []

    # ------------------------------------------------------------------ state
    def clear(self) -> None:
        """Forget every row (the memory is kept for reuse)."""
        self._rows = []

    def release(self, seq_id: str) -> None:
        """Forget ``seq_id``'s row, if it has one."""
        self._rows = [r if r.seq_id != seq_id else _Row("", 0, []) for r in self._rows]

    def free(self) -> None:
        """Forget every row and give the memory back."""
        self._rows = []
        self.layers = []
        self._num_rows = self._length = 0

    def _bytes(self, rows: int, length: int) -> int:
        per_token = sum(h * d for h, d in self._shapes) * 2 * self._item
        return rows * length * per_token

    def _reserve(self, rows: int, length: int, *, keep: bool) -> bool:
        """Make room for ``rows`` rows of ``length`` positions; False when over budget.

        ``keep``: copy the current contents into grown buffers.
        """
        if rows <= self._num_rows and length <= self._length:
            return True
        rows, length = max(rows, self._num_rows), max(length, self._length)  # never shrink
        if self._bytes(rows, length) > self.budget_bytes:
            return False
        new_rows = rows
        grown = -(-max(length, self._length + self._length // 2) // _LENGTH_STEP) * _LENGTH_STEP
        new_len = max(length, min(grown, self._max_context))
        if self._bytes(new_rows, new_len) > self.budget_bytes:
            new_len = length
        layers = []
        for i, (h, d) in enumerate(self._shapes):
            buf = torch.zeros(2, new_rows, h, new_len, d, dtype=self._dtype, device=self._device)
            if self.layers and keep:
                old = self.layers[i]
                buf[:, : old.shape[1], :, : old.shape[3]] = old
            layers.append(buf)
        self.layers = layers
        self._num_rows, self._length = new_rows, new_len
        return True

    # ------------------------------------------------------------------ planning
    def order(self, decode: Sequence[SeqChunk]) -> list[SeqChunk]:
        """``decode`` by ascending ``start``; ties keep their current rows' order."""
        where = {r.seq_id: i for i, r in enumerate(self._rows) if r.seq_id}
        return sorted(decode, key=lambda c: (c.start, where.get(c.seq_id, len(where))))

    def plan(self, decode: Sequence[SeqChunk]) -> DecodePlan | None:
        """Plan a step whose decode chunks are ``decode`` (ascending ``start``).

        Sequence ``decode[i]`` goes to row ``i``. Returns None (and empties the cache) when
        the rows would not fit the budget. Until :meth:`commit`, the cache trusts no row.
        """
        bs, dev = self._bs, self._device
        b = len(decode)
        need = max(c.start for c in decode) + 1
        old = self._rows
        self._rows = []
        if not self._reserve(b, need, keep=bool(old)):
            self.free()
            return None
        where = {r.seq_id: i for i, r in enumerate(old) if r.seq_id}
        src: list[int] = []
        dst: list[int] = []
        move_len = 0
        fill_rows: list[tuple[int, int, int]] = []
        fill_slots: list[int] = []
        new_rows: list[_Row] = []
        for i, c in enumerate(decode):
            bt = c.block_table
            j = where.get(c.seq_id)
            held = old[j] if j is not None else None
            if (
                held is not None
                and held.length == c.start
                and held.pages == bt[: len(held.pages)]
                and len(held.pages) == -(-c.start // bs)
            ):
                if j != i:
                    src.append(j)  # type: ignore[arg-type]
                    dst.append(i)
                    move_len = max(move_len, c.start)
            else:
                fill_rows.append((i, len(fill_slots), c.start))
                fill_slots.extend(bt[p // bs] * bs + p % bs for p in range(c.start))
            new_rows.append(_Row(c.seq_id, c.start + 1, bt[: c.start // bs + 1]))
        return DecodePlan(
            rows=b,
            pos=torch.tensor([c.start for c in decode], dtype=torch.long, device=dev),
            row_index=torch.arange(b, device=dev),
            move_src=torch.tensor(src, dtype=torch.long, device=dev) if src else None,
            move_dst=torch.tensor(dst, dtype=torch.long, device=dev) if dst else None,
            move_len=move_len,
            fill_rows=fill_rows,
            fill_slots=(
                torch.tensor(fill_slots, dtype=torch.long, device=dev) if fill_slots else None
            ),
            new_rows=new_rows,
        )

    def commit(self, plan: DecodePlan) -> None:
        """Trust the rows ``plan`` wrote (every layer applied it)."""
        self._rows = list(plan.new_rows)

    # ------------------------------------------------------------------ per layer
    def apply(
        self,
        layer: int,
        plan: DecodePlan,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
    ) -> torch.Tensor:
        """Update layer ``layer``'s rows for the step; return its ``[2, rows, ...]`` buffer.

        ``k_cache``/``v_cache`` are the layer's pool ``[slots, kv_heads, head_dim]``;
        ``k_new``/``v_new`` ``[plan.rows, kv_heads, head_dim]`` the step's decode K/V in
        row order.
        """
        buf = self.layers[layer]
        if plan.move_src is not None and plan.move_dst is not None:
            span = buf[:, :, :, : plan.move_len]
            span.index_copy_(1, plan.move_dst, span.index_select(1, plan.move_src))
        if plan.fill_slots is not None:
            ks = k_cache.index_select(0, plan.fill_slots).transpose(0, 1)
            vs = v_cache.index_select(0, plan.fill_slots).transpose(0, 1)
            for row, first, count in plan.fill_rows:
                buf[0, row, :, :count] = ks[:, first : first + count]
                buf[1, row, :, :count] = vs[:, first : first + count]
        buf[0, plan.row_index, :, plan.pos] = k_new
        buf[1, plan.row_index, :, plan.pos] = v_new
        return buf


# ---------------------------------------------------------------------------- step metadata
@dataclass(slots=True)
class Prefill:
    """A prompt chunk (``n > 1`` or ``start == 0``) inside the packed row."""

    row: int
    length: int
    start: int
    ctx_slots: torch.Tensor | None  # slots of positions 0..start+length-1 (start > 0)
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)


@dataclass(slots=True)
class DecodeGroup:
    """Decode tokens of sequences of similar length: consecutive rows of the packed step."""

    row: int
    count: int
    # [count * nb] page ids, row-major (short tables padded); None: read the decode cache
    pages: torch.Tensor | None
    length: int  # the attended context width (nb * block_size when gathered)
    q_pos: torch.Tensor  # [count, 1] decode positions
    ctx: torch.Tensor  # [count, 1] context lengths (start + 1)
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)


@dataclass(slots=True)
class Step:
    """Metadata of one step, shared by every layer."""

    runner: PagedRunner
    slots: torch.Tensor  # [T]: the pool slot of every packed token
    prefills: list[Prefill]
    decode: list[DecodeGroup]
    cache_plan: DecodePlan | None = None  # decode rows served by the runner's decode cache
    decode_row: int = 0  # packed row of the first decode token
