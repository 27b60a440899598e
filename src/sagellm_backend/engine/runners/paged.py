"""Generic paged runner: any transformers decoder, K/V in the provider's paged pool.

The runner calls the model's *own* forward -- embeddings, norms, MLPs, rotary or learned
positions, quantised linears, final logit soft-capping all stay the model's -- on every
scheduled token of every sequence packed into one ``[1, T]`` row with per-token
``position_ids`` and no HF cache. Only attention is ours: :func:`paged_attention` is
registered with ``transformers.AttentionInterface`` under :data:`ATTN_NAME`, and the model
is switched to it (``model.set_attn_implementation``). For each layer it

* writes the step's new K/V into the paged pool (a
  :class:`~sagellm_backend.kv.storage.TorchKVStorage` layer view) by slot, and
* attends, per sequence, over that sequence's pages (block table) with its own causal
  structure built from the step's metadata: a prompt chunk at ``start`` sees positions
  ``0..start+i``; a decode token sees ``0..start``. No padding between sequences; the
  attention mask transformers hands the function is ignored (it is ``None`` or wrong for
  packed rows).

Decode tokens are packed after the prompt chunks, ordered by position, and attended in
batched groups (one gather of the pages and one SDPA call per group and layer, shorter
block tables padded with a masked page); :func:`split_decode` cuts them into several
groups only where that saves at least :data:`DECODE_SPLIT_SAVING` of the gathered pages
(one long sequence among short ones), since every extra group costs a call per layer.

Model attention features arrive as keyword arguments (``scaling``, ``sliding_window``,
``softcap``, ``s_aux`` sinks) and are honoured per layer; a layer with an attention
feature this function cannot honour is refused when the runner is built (a probe forward
records what every layer passes), naming the feature.

On CPU with fp32 weights and an MKL build of torch (``prepack_weights``), every plain
``nn.Linear`` (and GPT-2's ``Conv1D``) also gets an MKL-prepacked copy of its weight for
inputs of :data:`PACK_ROWS` rows, and steps of :data:`PACK_MIN_ROWS` to
:data:`PACK_ROWS` - 1 tokens are padded to :data:`PACK_ROWS` rows (pad rows are neither
written to the pool nor returned): small decode GEMMs then skip repacking the weight on
every call. Quantised, hooked or any other modules are left as they are.

Invariants:
    * The step metadata lives in a thread-local slot only while :meth:`PagedRunner.execute`
      runs the forward; outside it (for instance ``model.generate`` on the same model)
      :func:`paged_attention` is plain dense attention with the given mask.
    * Pages are zeroed before their first use (never-written memory may hold NaN, and a
      masked NaN still poisons a weighted sum).
    * The runner never touches the KV manager (see :mod:`sagellm_backend.engine.runners.base`).
"""

from __future__ import annotations

import inspect
import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from sagellm_backend.engine.runners._paged_decode import (
    DECODE_CACHE_BYTES,
    DecodeCache,
    DecodePlan,
)
from sagellm_backend.engine.runners.base import SeqChunk

__all__ = [
    "ATTN_NAME",
    "DECODE_CACHE_BYTES",
    "DECODE_SPLIT_SAVING",
    "PACK_MIN_ROWS",
    "PACK_ROWS",
    "PagedRunner",
    "dense_attention",
    "paged_attention",
    "register_paged_attention",
    "split_decode",
]

#: The name :func:`paged_attention` is registered under in ``transformers.AttentionInterface``.
ATTN_NAME = "sagellm_paged"

# Keyword arguments transformers' attention modules pass that need no handling here.
_IGNORED_KWARGS = frozenset(
    {
        "dropout",
        "position_ids",
        "use_cache",
        "cache_position",
        "output_attentions",
        "past_key_values",
        "past_key_value",
        "layer_head_mask",
        "head_mask",
        "is_causal",
        "attention_mask",
        "return_dict",
        "output_hidden_states",
        "token_type_ids",
    }
)
# Keyword arguments honoured by the paged attention.
_HONOURED_KWARGS = frozenset({"scaling", "sliding_window", "softcap", "s_aux"})

_local = threading.local()

#: Rows of the static step shape the prepacked weights are made for.
PACK_ROWS = 16
#: Steps with fewer real tokens than this run unpadded (a 1-row GEMV beats a 16-row GEMM).
PACK_MIN_ROWS = 4
#: Decode rows are split into groups of similar length when that saves at least this share
#: of the gathered (padded) pages; each group is one batched attention call per layer.
DECODE_SPLIT_SAVING = 0.5


def mkl_prepack_available() -> bool:
    """Whether this torch can prepack fp32 linear weights with MKL (x86 CPU builds)."""
    ops = getattr(torch.ops, "mkl", None)
    mkl_on: Callable[[], bool] = torch.backends.mkl.is_available
    return (
        bool(mkl_on())
        and ops is not None
        and hasattr(ops, "_mkl_reorder_linear_weight")
        and hasattr(ops, "_mkl_linear")
    )


def _prepack_linears(model: Any) -> int:
    """Give plain fp32 CPU ``nn.Linear``/``Conv1D`` modules a prepacked fast path.

    The module's ``forward`` (an instance attribute, so the class is untouched) runs
    ``_mkl_linear`` on the packed copy for ``[1, PACK_ROWS, in]`` inputs and the original
    computation otherwise. Returns how many modules have the fast path, counting those an
    earlier runner on the same model gave it (so a restarted engine pads steps the same way,
    which tensor-parallel ranks rely on: every rank must see the same step shapes).
    """
    count = 0
    for module in model.modules():
        kind = type(module).__name__
        own_forward = module.__dict__.get("forward")
        if getattr(own_forward, "sagellm_prepacked", False):
            count += 1  # prepacked by an earlier runner on this model (engine restart)
            continue
        if getattr(module, "_hf_hook", None) is not None or own_forward is not None:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            continue
        if type(module) is torch.nn.Linear:
            origin = weight
        elif kind == "Conv1D" and type(module).__module__.startswith("transformers."):
            origin = weight.t()  # Conv1D keeps [in, out]
        else:
            continue
        packed = torch.ops.mkl._mkl_reorder_linear_weight(origin.detach().contiguous(), PACK_ROWS)
        module.forward = _packed_forward(module.forward, packed, origin, module.bias)
        count += 1
    return count


def _packed_forward(
    plain: Callable[[torch.Tensor], torch.Tensor],
    packed: torch.Tensor,
    origin: torch.Tensor,
    bias: torch.Tensor | None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and x.shape[0] == 1 and x.shape[1] == PACK_ROWS:
            flat = x[0].contiguous()
            out: torch.Tensor = torch.ops.mkl._mkl_linear(flat, packed, origin, bias, PACK_ROWS)
            return out.unsqueeze(0)
        return plain(x)

    forward.sagellm_prepacked = True  # type: ignore[attr-defined]
    return forward


@dataclass(slots=True)
class LayerFeatures:
    """What one attention layer passed during the probe forward.

    Attributes:
        num_heads: query heads.
        num_kv_heads: key/value heads.
        head_dim: width of q, k and v heads.
        scaling: softmax scale (None: ``head_dim ** -0.5``).
        sliding_window: the window, or None.
        softcap: attention logit soft-capping, or None.
        has_sinks: the layer passes attention sinks (``s_aux``).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float | None
    sliding_window: int | None
    softcap: float | None
    has_sinks: bool


# ---------------------------------------------------------------------------- reference
def _apply_softcap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    if softcap is None:
        return scores
    return torch.tanh(scores / softcap) * softcap


def _manual_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Eager attention: ``q [B, H, n, D]``, ``k``/``v [B, Hkv, L, D]``, additive ``mask``.

    Soft-capping is applied to the scaled logits before the mask; sinks (one logit per
    head) join the softmax as an extra column that is then dropped.
    """
    h, h_kv = q.shape[1], k.shape[1]
    if h != h_kv:
        k = k.repeat_interleave(h // h_kv, dim=1)
        v = v.repeat_interleave(h // h_kv, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = _apply_softcap(scores, softcap)
    if mask is not None:
        scores = scores + mask
    if sinks is not None:
        col = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, col], dim=-1)
        scores = scores - scores.amax(dim=-1, keepdim=True)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)[..., :-1]
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    *,
    causal: bool = False,
) -> torch.Tensor:
    """Attention ``[B, H, n, D]``; SDPA unless soft-capping or sinks need the eager path.

    ``causal`` (only with ``mask=None``) means plain causal attention over equal q/k lengths.
    """
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal and mask is None,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
    if causal and mask is None:
        n, length = q.shape[2], k.shape[2]
        hidden = torch.ones(n, length, dtype=torch.bool, device=q.device).triu(length - n + 1)
        mask = torch.zeros(n, length, dtype=q.dtype, device=q.device).masked_fill(
            hidden, float("-inf")
        )
    return _manual_attention(q, k, v, mask, scale, softcap, sinks)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    start: int = 0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference causal attention of one sequence.

    ``q [H, n, D]`` holds positions ``start..start+n-1``; ``k``/``v [Hkv, start+n, D]``
    positions ``0..start+n-1``.
    A key at position ``j`` is visible to the query at ``i`` when ``j <= i`` and, with a
    window ``w``, ``i - j < w`` (transformers' convention). Returns ``[H, n, D]``.
    """
    n, length = q.shape[1], k.shape[1]
    mask = _window_mask(
        torch.arange(start, start + n, device=q.device).view(-1, 1),
        torch.arange(length, device=q.device).view(1, -1),
        torch.tensor([start + n], device=q.device).view(1, 1),
        sliding_window,
        q.dtype,
    )
    return _attend(q[None], k[None], v[None], mask, scale, softcap, sinks)[0]


def _window_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    ctx_len: torch.Tensor,
    window: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive mask: key hidden when after the query, past the context, or out of window."""
    hidden = (k_pos > q_pos) | (k_pos >= ctx_len)
    if window is not None:
        hidden = hidden | (q_pos - k_pos >= window)
    mask = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
    return mask.masked_fill_(hidden, float("-inf"))


# ---------------------------------------------------------------------------- the hook
def _kwarg_features(kwargs: dict[str, Any]) -> tuple[int | None, float | None, Any]:
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
    return (
        int(window) if window is not None else None,
        float(softcap) if softcap is not None else None,
        sinks,
    )


def paged_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as :data:`ATTN_NAME` (transformers' signature).

    ``query [1, H, T, D]``, ``key``/``value [1, Hkv, T, D]``; returns ``[1, T, H, D]``.
    Inside :meth:`PagedRunner.execute` it reads and writes the paged pool; elsewhere it is
    dense attention with ``attention_mask`` (and records the layer's features when a probe
    is running).
    """
    del dropout  # inference only
    step: _Step | None = getattr(_local, "step", None)
    if step is not None:
        out = step.runner._layer_attention(step, module, query, key, value, scaling, kwargs)
        return out, None
    probe: list[tuple[Any, LayerFeatures, list[str]]] | None = getattr(_local, "probe", None)
    window, softcap, sinks = _kwarg_features(kwargs)
    if probe is not None:
        unknown = [
            k
            for k, v in kwargs.items()
            if k not in _IGNORED_KWARGS and k not in _HONOURED_KWARGS and v is not None
        ]
        feats = LayerFeatures(
            num_heads=int(query.shape[1]),
            num_kv_heads=int(key.shape[1]),
            head_dim=int(query.shape[-1]),
            scaling=None if scaling is None else float(scaling),
            sliding_window=window,
            softcap=softcap,
            has_sinks=sinks is not None,
        )
        if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
            unknown.append(f"value/key head_dim {value.shape[-1]} != query {query.shape[-1]}")
        if getattr(module, "is_causal", True) is False:
            unknown.append("non-causal attention (is_causal=False)")
        probe.append((module, feats, unknown))
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    n, length = query.shape[2], key.shape[2]
    mask = None
    if attention_mask is not None:
        mask = attention_mask[..., :length]
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, float("-inf")
            )
    elif window is not None or 1 < n < length:
        # Queries are the last n positions (a cache may hold earlier keys).
        mask = _window_mask(
            torch.arange(length - n, length, device=query.device).view(-1, 1),
            torch.arange(length, device=query.device).view(1, -1),
            torch.tensor([[length]], device=query.device),
            window,
            query.dtype,
        )
    causal = mask is None and n == length and n > 1
    out = _attend(query, key, value, mask, scale, softcap, sinks, causal=causal)
    return out.transpose(1, 2).contiguous(), None


_REGISTER_LOCK = threading.Lock()


def register_paged_attention() -> None:
    """Register :func:`paged_attention` as :data:`ATTN_NAME` (idempotent)."""
    from transformers import AttentionInterface

    with _REGISTER_LOCK:
        AttentionInterface.register(ATTN_NAME, paged_attention)


# ---------------------------------------------------------------------------- step metadata
@dataclass(slots=True)
class _Prefill:
    """A prompt chunk (``n > 1`` or ``start == 0``) inside the packed row."""

    row: int
    length: int
    start: int
    ctx_slots: torch.Tensor | None  # slots of positions 0..start+length-1 (start > 0)
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)


@dataclass(slots=True)
class _DecodeGroup:
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
class _Step:
    """Metadata of one step, shared by every layer."""

    runner: PagedRunner
    num_real: int  # real tokens: the first rows (the rest pad the step to PACK_ROWS)
    slots: torch.Tensor  # [num_real]
    prefills: list[_Prefill]
    decode: list[_DecodeGroup]
    cache_plan: DecodePlan | None = None  # decode rows served by the runner's decode cache
    decode_row: int = 0  # packed row of the first decode token


def split_decode(pages: Sequence[int], min_saving: float = DECODE_SPLIT_SAVING) -> list[int]:
    """Where to cut decode rows sorted by page count, to gather fewer padded pages.

    ``pages`` is the page count of each decode row in ascending order. Returns the start
    index of every group after the first (empty: one group). A cut is taken only where it
    saves at least ``min_saving`` of the pages one group would gather, and each group is
    split again by the same rule.
    """
    n = len(pages)
    if n < 2:
        return []
    whole = n * pages[-1]
    best, cut = whole, 0
    for i in range(1, n):
        cost = i * pages[i - 1] + (n - i) * pages[-1]
        if cost < best:
            best, cut = cost, i
    if cut == 0 or whole - best < min_saving * whole:
        return []
    left = split_decode(pages[:cut], min_saving)
    right = split_decode(pages[cut:], min_saving)
    return [*left, cut, *(cut + r for r in right)]


# ---------------------------------------------------------------------------- the runner
def _probe_features(model: Any, device: torch.device) -> list[tuple[Any, LayerFeatures, list[str]]]:
    """Run a 2-token forward with the hook in probe mode; return what each layer passed."""
    records: list[tuple[Any, LayerFeatures, list[str]]] = []
    _local.probe = records
    try:
        with torch.inference_mode():
            ids = torch.tensor([[1, 2]], dtype=torch.long, device=device)
            pos = torch.arange(2, device=device).view(1, 2)
            model(input_ids=ids, position_ids=pos, use_cache=False)
    finally:
        _local.probe = None
    return records


def _model_device(model: Any) -> torch.device:
    return torch.device(model.get_input_embeddings().weight.device)


class PagedRunner:
    """Any attention-backend-capable transformers decoder over the paged KV pool.

    Args:
        model: a loaded ``*ForCausalLM`` (its attention implementation is switched to
            :data:`ATTN_NAME`).
        layer_kv: ``layer_kv(i) -> (k, v)``, each ``[num_slots, kv_heads, head_dim]`` in the
            model's compute dtype on the model's device.
        block_size: tokens per page.
        max_context: longest sequence (positions beyond it are refused).
        prepack_weights: on CPU with fp32 weights and MKL, prepack plain linear weights for
            :data:`PACK_ROWS`-row steps (see the module docstring; a second copy of those
            weights' memory). Ignored where unsupported.

    Raises:
        ValueError: the model cannot run on this runner (the message names the feature) or
            the KV tensors do not match the geometry its attention layers use.
    """

    uses_paged_kv = True

    def __init__(
        self,
        model: Any,
        layer_kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        *,
        block_size: int,
        max_context: int,
        prepack_weights: bool = False,
        decode_cache_bytes: int = DECODE_CACHE_BYTES,
    ) -> None:
        self.name = "paged"
        self.model = model
        self.device = _model_device(model)
        self.dtype: torch.dtype = model.get_input_embeddings().weight.dtype
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.block_size = int(block_size)
        self.max_context = int(max_context)
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.features = prepare_model(model)
        self._layer_of: dict[int, int] = {}
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        for i, (module, feats) in enumerate(self.features):
            self._layer_of[id(module)] = i
            k_cache, v_cache = layer_kv(i)
            expect = (feats.num_kv_heads, feats.head_dim)
            if tuple(k_cache.shape[1:]) != expect or k_cache.dtype != self.dtype:
                raise ValueError(
                    f"KV storage of layer {i} is {tuple(k_cache.shape[1:])} {k_cache.dtype}, "
                    f"the model needs (kv_heads, head_dim) = {expect} {self.dtype}"
                )
            if k_cache.device != self.device:
                raise ValueError(
                    f"KV storage is on {k_cache.device} but the model is on {self.device}"
                )
            self._k.append(k_cache)
            self._v.append(v_cache)
        self._num_slots = int(self._k[0].shape[0])
        self._zeroed_pages = 0
        self._gather_bufs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._dcache = DecodeCache(
            [(f.num_kv_heads, f.head_dim) for _, f in self.features],
            dtype=self.dtype,
            device=self.device,
            block_size=self.block_size,
            max_context=self.max_context,
            budget_bytes=max(0, int(decode_cache_bytes)),
        )
        #: See :data:`DECODE_SPLIT_SAVING` (1.0 or more: decode is always one group).
        self.decode_split_saving = DECODE_SPLIT_SAVING
        params = inspect.signature(model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self.prepacked = (
            prepack_weights
            and self.device.type == "cpu"
            and self.dtype == torch.float32
            and mkl_prepack_available()
            and _prepack_linears(model) > 0
        )

    # ------------------------------------------------------------------ metadata
    def _validate(self, chunks: Sequence[SeqChunk]) -> None:
        bs = self.block_size
        if not chunks:
            raise ValueError("execute() needs at least one chunk")
        for c in chunks:
            n = len(c.token_ids)
            if n == 0:
                raise ValueError(f"sequence {c.seq_id!r}: empty chunk")
            end = c.start + n
            if c.start < 0:
                raise ValueError(f"sequence {c.seq_id!r}: negative start {c.start}")
            if end > self.max_context:
                raise ValueError(
                    f"sequence {c.seq_id!r} reaches position {end}, beyond the context "
                    f"length {self.max_context}"
                )
            if len(c.block_table) * bs < end:
                raise ValueError(
                    f"sequence {c.seq_id!r}: block table of {len(c.block_table)} pages cannot "
                    f"hold {end} tokens"
                )
        top = max(max(c.block_table) for c in chunks) + 1
        if top * bs > self._num_slots:
            raise ValueError(f"page {top - 1} is outside the KV pool ({self._num_slots} slots)")
        if top > self._zeroed_pages:
            for k, v in zip(self._k, self._v, strict=True):
                k[self._zeroed_pages * bs : top * bs].zero_()
                v[self._zeroed_pages * bs : top * bs].zero_()
            self._zeroed_pages = top

    def _prepare(
        self, chunks: Sequence[SeqChunk]
    ) -> tuple[_Step, torch.Tensor, torch.Tensor, list[int]]:
        """Pack ``chunks`` into one row: prompt chunks in the given order, then decode tokens.

        Decode rows are ordered by ascending position (not by their order in ``chunks``) and
        cut into :class:`_DecodeGroup` row ranges by :func:`split_decode`. Returns the step
        metadata, ``input_ids`` and ``position_ids`` (``[1, T]``) and, for every chunk that
        wants logits, in ``chunks`` order, the row of its last token.
        """
        bs, dev = self.block_size, self.device
        self._validate(chunks)
        prefill = [c for c in chunks if len(c.token_ids) > 1 or c.start == 0]
        # Decode rows sorted by length, so that groups of similar length are row ranges.
        decode = self._dcache.order(
            [c for c in chunks if not (len(c.token_ids) > 1 or c.start == 0)]
        )
        plan = self._dcache.plan(decode) if decode and self._dcache.budget_bytes else None
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_row: dict[int, int] = {}
        prefills: list[_Prefill] = []
        for c in (*prefill, *decode):
            row = len(ids)
            n = len(c.token_ids)
            end = c.start + n
            ids.extend(c.token_ids)
            bt = c.block_table
            positions.extend(range(c.start, end))
            slots.extend(bt[p // bs] * bs + p % bs for p in range(c.start, end))
            last_row[id(c)] = row + n - 1
            if len(prefills) < len(prefill):
                ctx = None
                if c.start > 0:
                    ctx = torch.tensor(
                        [bt[p // bs] * bs + p % bs for p in range(end)],
                        dtype=torch.long,
                        device=dev,
                    )
                prefills.append(_Prefill(row, n, c.start, ctx))
        dec_row = sum(len(c.token_ids) for c in prefill)
        groups: list[_DecodeGroup] = []
        counts = [c.start // bs + 1 for c in decode]
        bounds = [0, *split_decode(counts, self.decode_split_saving), len(decode)]
        for g0, g1 in itertools.pairwise(bounds):
            if g0 == g1:
                continue
            nb = counts[g1 - 1]
            page_ids: torch.Tensor | None = None
            length = decode[g1 - 1].start + 1  # the group's longest context
            if plan is None:
                pages: list[int] = []
                for c in decode[g0:g1]:
                    bt = c.block_table[:nb]
                    pages.extend(bt)
                    pages.extend([bt[0]] * (nb - len(bt)))  # padding: a valid page, masked
                page_ids = torch.tensor(pages, dtype=torch.long, device=dev)
                length = nb * bs
            q_pos = torch.tensor([c.start for c in decode[g0:g1]], dtype=torch.long, device=dev)
            q_pos = q_pos.view(-1, 1)
            groups.append(
                _DecodeGroup(
                    row=dec_row + g0,
                    count=g1 - g0,
                    pages=page_ids,
                    length=length,
                    q_pos=q_pos,
                    ctx=q_pos + 1,
                )
            )
        num_real = len(ids)
        if self.prepacked and PACK_MIN_ROWS <= num_real < PACK_ROWS:
            ids.extend([0] * (PACK_ROWS - num_real))  # static shape for the packed GEMMs
            positions.extend([0] * (PACK_ROWS - num_real))
        step = _Step(
            runner=self,
            num_real=num_real,
            slots=torch.tensor(slots, dtype=torch.long, device=dev),
            prefills=prefills,
            decode=groups,
            cache_plan=plan,
            decode_row=dec_row,
        )
        wanted = [last_row[id(c)] for c in chunks if c.need_logits]
        return (
            step,
            torch.tensor([ids], dtype=torch.long, device=dev),
            torch.tensor([positions], dtype=torch.long, device=dev),
            wanted,
        )

    # ------------------------------------------------------------------ forward
    def execute(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Run one step over ``chunks`` (see :class:`~.base.ModelRunner`)."""
        step, ids, positions, wanted = self._prepare(chunks)
        rows = torch.tensor(wanted, dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {"use_cache": False}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = rows
        _local.step = step
        try:
            with torch.inference_mode():
                out = self.model(input_ids=ids, position_ids=positions, **kwargs)
        finally:
            _local.step = None
        if step.cache_plan is not None:
            self._dcache.commit(step.cache_plan)  # only now: every layer applied the plan
        logits: torch.Tensor = out.logits[0]
        if not self._logits_to_keep:
            logits = logits.index_select(0, rows)
        return logits.float()

    def _layer_attention(
        self,
        step: _Step,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """Paged attention of one layer for the packed step; returns ``[1, T, H, D]``."""
        li = self._layer_of.get(id(module))
        if li is None:
            raise RuntimeError(f"attention module {type(module).__name__} was not probed")
        window, softcap, sinks = _kwarg_features(kwargs)
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        q = query[0].transpose(0, 1)  # [T, H, D]
        k = key[0].transpose(0, 1)  # [T, Hkv, D]
        v = value[0].transpose(0, 1)
        k_cache, v_cache = self._k[li], self._v[li]
        t, h, d = q.shape
        h_kv = k.shape[1]
        real = step.num_real
        k_cache.index_copy_(0, step.slots, k if real == t else k[:real])
        v_cache.index_copy_(0, step.slots, v if real == t else v[:real])
        single = len(step.prefills) + len(step.decode) == 1
        if single and real == t:
            out = None
        elif real == t:
            out = q.new_empty(t, h, d)
        else:
            out = q.new_zeros(t, h, d)  # pad rows: zeros
        for seg in step.prefills:
            r0, n = seg.row, seg.length
            qs = q[r0 : r0 + n].transpose(0, 1).unsqueeze(0)
            if seg.ctx_slots is None:
                ks = k[r0 : r0 + n].transpose(0, 1).unsqueeze(0)
                vs = v[r0 : r0 + n].transpose(0, 1).unsqueeze(0)
            else:
                ks = k_cache.index_select(0, seg.ctx_slots).transpose(0, 1).unsqueeze(0)
                vs = v_cache.index_select(0, seg.ctx_slots).transpose(0, 1).unsqueeze(0)
            ctx = seg.start + n
            needs_mask = seg.start > 0 or (window is not None and window < ctx)
            mask = None
            if needs_mask:
                mask = seg.masks.get(window)
                if mask is None:
                    mask = _window_mask(
                        torch.arange(seg.start, ctx, device=q.device).view(-1, 1),
                        torch.arange(ctx, device=q.device).view(1, -1),
                        torch.tensor([[ctx]], device=q.device),
                        window,
                        q.dtype,
                    )
                    seg.masks[window] = mask
            res = _attend(qs, ks, vs, mask, scale, softcap, sinks, causal=not needs_mask)
            res = res[0].transpose(0, 1)
            if out is None:
                return res.unsqueeze(0)
            out[r0 : r0 + n] = res
        num_pages = self._num_slots // self.block_size
        k_pages = k_cache.view(num_pages, self.block_size, h_kv, d)
        v_pages = v_cache.view(num_pages, self.block_size, h_kv, d)
        plan = step.cache_plan
        cached: torch.Tensor | None = None
        if plan is not None:
            r0 = step.decode_row
            cached = self._dcache.apply(
                li, plan, k_cache, v_cache, k[r0 : r0 + plan.rows], v[r0 : r0 + plan.rows]
            )
        for grp in step.decode:
            b, length = grp.count, grp.length
            if cached is not None:
                g0 = grp.row - step.decode_row
                keys = cached[0, g0 : g0 + b, :, :length]
                values = cached[1, g0 : g0 + b, :, :length]
            else:
                assert grp.pages is not None
                buf_k, buf_v = self._gather_buffers(int(grp.pages.numel()), k_pages)
                torch.index_select(k_pages, 0, grp.pages, out=buf_k)
                torch.index_select(v_pages, 0, grp.pages, out=buf_v)
                keys = buf_k.view(b, length, h_kv, d).transpose(1, 2)
                values = buf_v.view(b, length, h_kv, d).transpose(1, 2)
            mask = grp.masks.get(window)
            if mask is None:
                mask = _window_mask(
                    grp.q_pos,
                    torch.arange(length, device=q.device).view(1, -1),
                    grp.ctx,
                    window,
                    q.dtype,
                ).view(b, 1, 1, length)
                grp.masks[window] = mask
            qd = q[grp.row : grp.row + b]
            if softcap is None and sinks is None:
                # Queries of the heads sharing one KV head form the "query length" axis.
                res = F.scaled_dot_product_attention(
                    qd.reshape(b, h_kv, h // h_kv, d), keys, values, attn_mask=mask, scale=scale
                ).reshape(b, h, d)
            else:
                res = _manual_attention(
                    qd.unsqueeze(2), keys, values, mask, scale, softcap, sinks
                ).view(b, h, d)
            if out is None:
                return res.unsqueeze(0)
            out[grp.row : grp.row + b] = res
        assert out is not None
        return out.unsqueeze(0)

    def _gather_buffers(
        self, num_pages: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two ``[num_pages, block_size, kv_heads, head_dim]`` views of reused buffers.

        Decode attention gathers each group's pages into these instead of fresh tensors: a
        multi-megabyte allocation per layer and step is returned to the OS and faulted in
        again every time, which costs more than the copy. The buffers grow to the largest
        group seen; their contents are only valid until the next gather (one group of one
        layer at a time).
        """
        bufs = self._gather_bufs
        if bufs is None or bufs[0].shape[0] < num_pages or bufs[0].dtype != like.dtype:
            shape = (num_pages, *like.shape[1:])
            bufs = (like.new_empty(shape), like.new_empty(shape))
            self._gather_bufs = bufs
        return bufs[0][:num_pages], bufs[1][:num_pages]

    def release(self, seq_id: str) -> None:
        """Drop ``seq_id``'s decode-cache row (its K/V in the pool are the scheduler's)."""
        self._dcache.release(seq_id)

    def reset(self) -> None:
        """Empty the decode cache (K/V live in the pool)."""
        self._dcache.clear()


def prepare_model(model: Any) -> list[tuple[Any, LayerFeatures]]:
    """Switch ``model`` to :data:`ATTN_NAME` and probe its attention layers.

    Returns ``(module, features)`` per attention layer in call order (= layer order).

    Raises:
        ValueError: the model does not support attention backends, never calls the hook,
            calls a layer twice, or a layer passes a feature the paged attention cannot
            honour (named in the message).
    """
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not declare attention-backend support "
            "(_supports_attention_backend)"
        )
    register_paged_attention()
    previous = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation(ATTN_NAME)
    try:
        records = _probe_features(model, _model_device(model))
        if not records:
            raise ValueError(
                f"{type(model).__name__} never calls the registered attention function"
            )
        seen: set[int] = set()
        for module, feats, unsupported in records:
            if id(module) in seen:
                raise ValueError(f"attention module {type(module).__name__} ran twice per step")
            seen.add(id(module))
            if unsupported:
                raise ValueError(
                    f"{type(module).__name__} passes attention features the paged runner "
                    f"does not support: {', '.join(unsupported)}"
                )
            if feats.num_heads % feats.num_kv_heads:
                raise ValueError(
                    f"{feats.num_heads} query heads are not a multiple of "
                    f"{feats.num_kv_heads} KV heads"
                )
    except Exception:
        if previous is not None:
            model.set_attn_implementation(previous)
        raise
    return [(m, f) for m, f, _ in records]
