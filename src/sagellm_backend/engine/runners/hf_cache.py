"""Batched fallback runner: the model's own forward and HF cache, all sequences together.

For models whose attention cannot be replaced (bloom, falcon, mpt, ...: no
attention-backend support) the runner keeps every sequence's K/V itself (one
``[kv_heads, length, head_dim]`` tensor pair per layer, in its own growing buffer) and
runs the sequences of a step together, in padded batch forwards built like this:

* row ``b`` of the batch holds sequence ``b``'s cached K/V left-padded to the longest
  cached length ``C`` (a fresh ``DynamicCache`` filled with ``update``), then its new tokens
  right-padded to the longest chunk ``N``; the 2-D ``attention_mask`` marks the real
  positions and ``position_ids`` (where the model takes them) give each token its own
  position. Left padding in the cached part and right padding in the new part leave no
  query row fully masked (a pad query sees its row's real tokens), so no NaN appears;
  models with ALiBi (bloom, falcon) derive positions from the mask's cumulative sum,
  which the padding does not shift relative to the real tokens.
* after the forward, the new K/V of each row (columns ``C..C+n_b-1``) are appended to the
  sequence's buffers, and logits are taken at each row's last real token.

Decode rows apart: the one-token continuations of a step (decode tokens) run in a forward
of their own, not in the padded forward of the step's prompts (where each would compute as
many columns as the longest prompt). On the CPU the prompts themselves run in groups of
similar length (:func:`~._prefill_groups.prefill_groups`), one forward each.

Kept batch: a forward of decode tokens only leaves a cache in which row ``b`` is sequence
``b``'s K/V left-padded to a common width, the cache ``generate`` keeps for a static batch.
The runner keeps it (with its attention mask) instead of copying each row's new K/V back,
and the next steps' decode tokens run on it, growing it by one column per step (no per-step
copy of the cached K/V), as long as they are the kept sequences in the kept order followed
by sequences that join (their K/V become new rows; when one is longer than the batch, the
other rows get more left padding). A sequence that leaves (:meth:`release`) is cut out (its
row removed, the common left padding trimmed). Every such batch is the one a fresh build of
its rows would make. Anything else (another order, a kept sequence computing several
tokens, more than ``max_batch_size`` decode rows) first writes every row back into the
sequences' own buffers (*dissolves* it). Only caches whose layers are plain
``DynamicLayer`` are kept. ``keep_batch=False`` runs each step as one padded forward over
all its chunks on a batch built from the buffers (the behaviour before).

K/V admission still goes through the KV manager (accounting only: the engine gives these
runners a manager without storage): ``uses_paged_kv`` is False, so the scheduler never
expects prefix pages to be reused.

Invariants:
    * A chunk continues its sequence: ``start`` equals the tokens the runner holds for it,
      or is 0 (a restart after preemption drops what was held).
    * ``execute`` is called from the scheduler thread only.
    * A sequence's K/V is the first ``synced`` tokens in its own buffers, and, while it is a
      row of the kept batch, all ``length`` tokens in that row (after its left padding);
      otherwise ``synced == length``. A kept row's width is its padding plus ``length``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.functional import pad

from sagellm_backend.engine.runners._prefill_groups import prefill_groups
from sagellm_backend.engine.runners._prepack import can_prepack, prepack_linears
from sagellm_backend.engine.runners.base import SeqChunk, check_chunks

__all__ = ["HFBatchedRunner", "compute_dtype", "embedding_facts"]


def compute_dtype(model: Any) -> torch.dtype:
    """Dtype activations (and K/V) have: that of most of the model's floating-point weights.

    Not the input embeddings' alone: a model may keep them (and its norms) in float32 while
    its layers compute in bfloat16 (transformers' ``_keep_in_fp32_modules``, e.g. Ergo).
    Quantized weights (integer storage) do not count; a model without floating-point
    weights answers its input embeddings' dtype.
    """
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    if counts:
        return max(counts, key=lambda d: counts[d])
    dtype: torch.dtype = model.get_input_embeddings().weight.dtype
    return dtype


def embedding_facts(model: Any) -> tuple[torch.device, int, torch.dtype]:
    """(device and vocabulary size of ``model``'s input embeddings, :func:`compute_dtype`)."""
    weight = model.get_input_embeddings().weight
    return torch.device(weight.device), int(weight.shape[0]), compute_dtype(model)


@dataclass(slots=True)
class _SeqKV:
    """One sequence's K/V: per layer ``[kv_heads, capacity, head_dim]``.

    ``length`` tokens have K/V; the first ``synced`` of them are in these buffers (the rest
    in the kept batch's row).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int
    synced: int = 0

    def empty(self) -> None:
        """Give the buffers' memory back (their tokens live in the kept batch)."""
        self.keys = [k.new_empty(k.shape[0], 0, k.shape[2]) for k in self.keys]
        self.values = [v.new_empty(v.shape[0], 0, v.shape[2]) for v in self.values]
        self.synced = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: int) -> None:
        n = k.shape[1]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if at + n > buf_k.shape[1]:
            cap = max(2 * buf_k.shape[1], at + n, 64)
            new_k = buf_k.new_empty(buf_k.shape[0], cap, buf_k.shape[2])
            new_v = buf_v.new_empty(buf_v.shape[0], cap, buf_v.shape[2])
            new_k[:, :at] = buf_k[:, :at]
            new_v[:, :at] = buf_v[:, :at]
            self.keys[layer], self.values[layer] = new_k, new_v
            buf_k, buf_v = new_k, new_v
        buf_k[:, at : at + n] = k
        buf_v[:, at : at + n] = v


@dataclass(slots=True)
class _Kept:
    """The kept decode batch (see the module docstring).

    Row ``r`` of ``cache`` is ``ids[r]``'s K/V after ``pads[r]`` columns of padding;
    ``mask`` (``[rows, width]``, on the device) marks the real columns.
    """

    ids: list[str]
    cache: Any
    mask: torch.Tensor
    pads: list[int]


def _keepable(layers: Sequence[Any]) -> bool:
    """Whether a cache's layers can be kept and cut (plain ``DynamicLayer`` layers only)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(lay) is DynamicLayer for lay in layers)


class HFBatchedRunner:
    """The model's own forward with a batched HF cache (see the module docstring).

    Args:
        model: a loaded ``*ForCausalLM`` whose cache is a transformers ``Cache`` with
            per-layer ``keys``/``values`` of ``[batch, kv_heads, length, head_dim]``.
        max_context: longest sequence served.
        max_batch_size: most sequences one forward holds (larger steps are split).
        pad_token_id: token id put in padding positions (its values never reach a real
            token).
        prepack_weights: on CPU with fp32 or bf16 weights, give plain linear layers a
            oneDNN-prepacked copy of their weights (see :mod:`._prepack`; a second copy of
            those weights' memory). Ignored where unsupported.
        keep_batch: keep the cache of a decode-only step for the next steps (the kept
            batch, see the module docstring); False rebuilds it every step.

    Raises:
        ValueError: on bad arguments.
    """

    uses_paged_kv = False

    def __init__(
        self,
        model: Any,
        *,
        max_context: int,
        max_batch_size: int = 64,
        pad_token_id: int = 0,
        prepack_weights: bool = False,
        keep_batch: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.name = "hf-batched"
        self.model = model
        self.device, self.vocab_size, self.dtype = embedding_facts(model)
        dtype = self.dtype
        self.max_context = int(max_context)
        self.max_batch_size = int(max_batch_size)
        self.pad_token_id = int(pad_token_id)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._positions = "position_ids" in params
        self._keep = "logits_to_keep" in params
        self._seqs: dict[str, _SeqKV] = {}
        self.keep_batch = keep_batch
        self._kept: _Kept | None = None
        #: counters: forwards on the kept batch, and dissolutions of it
        self.kept_steps = 0
        self.dissolved = 0
        #: linear layers run on oneDNN-prepacked weights
        self.prepacked = can_prepack(prepack_weights, self.device, dtype) and (
            prepack_linears(model) > 0
        )

    # ------------------------------------------------------------------ steps
    def execute(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Run all chunks in batched forwards (see the module docstring)."""
        if not self.keep_batch:
            self._dissolve()
            self._validate(chunks)
            return self._stack(self._forward_all(chunks))
        kept = self._kept
        if kept is not None:
            members = set(kept.ids)
            if any(len(c.token_ids) != 1 or c.start == 0 for c in chunks if c.seq_id in members):
                self._dissolve()  # a kept sequence computes more than one token
        self._validate(chunks)
        # One-token continuations (decode tokens) run on their own, on the kept batch: with
        # a prompt in the same padded forward, each would compute as many tokens as it.
        single = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1 and c.start > 0]
        if not single or len(single) == len(chunks):
            return self._stack(
                self._decode(chunks) if single else self._forward_all(chunks, grouped=True)
            )
        mine = set(single)
        decode = self._decode([chunks[i] for i in single])
        prompt = self._forward_all([c for i, c in enumerate(chunks) if i not in mine], grouped=True)
        rows: list[torch.Tensor] = []
        for i, c in enumerate(chunks):  # the logits rows in chunk order
            if c.need_logits:
                rows.append(decode.pop(0) if i in mine else prompt.pop(0))
        return self._stack(rows)

    def _stack(self, rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(rows).float() if rows else self._no_rows()

    def _forward_all(
        self, chunks: Sequence[SeqChunk], *, grouped: bool = False
    ) -> list[torch.Tensor]:
        """Forwards of at most ``max_batch_size`` chunks, on caches built for them.

        With ``grouped`` on the CPU, chunks of very different lengths run in separate
        forwards (:func:`prefill_groups`: a padded row computes the longest row's length).
        Returns the logits rows in chunk order.
        """
        groups = self._groups(chunks) if grouped else [list(chunks)]
        out: dict[int, torch.Tensor] = {}
        for group in groups:
            for i in range(0, len(group), self.max_batch_size):
                part = group[i : i + self.max_batch_size]
                rows = iter(self._forward(part, may_keep=False))
                for c in part:
                    if c.need_logits:
                        out[id(c)] = next(rows)
        return [out[id(c)] for c in chunks if c.need_logits]

    def _groups(self, chunks: Sequence[SeqChunk]) -> list[list[SeqChunk]]:
        if self.device.type != "cpu" or len(chunks) < 2:
            return [list(chunks)]  # on a GPU padding costs little against more forwards
        groups = prefill_groups(chunks)
        inside = {id(c) for g in groups for c in g}
        return groups + [[c] for c in chunks if id(c) not in inside]

    def _decode(self, chunks: Sequence[SeqChunk]) -> list[torch.Tensor]:
        """One-token continuations, on the kept batch or on a new batch that is then kept.

        Sequences that follow the kept ones join it as new rows; forwards are split (and
        nothing is kept) beyond ``max_batch_size``.
        """
        if len(chunks) > self.max_batch_size:
            self._dissolve()
            return self._forward_all(chunks)
        kept = self._kept
        if kept is not None and self._joins_kept(kept, chunks):
            return self._forward_kept(chunks)
        self._dissolve()
        return self._forward(chunks, may_keep=True)

    def _no_rows(self) -> torch.Tensor:
        return torch.empty(0, self.vocab_size, device=self.device)

    def _validate(self, chunks: Sequence[SeqChunk]) -> None:
        seqs = self._seqs
        check_chunks(chunks, lambda sid: seqs[sid].length if sid in seqs else 0, self.max_context)
        for c in chunks:
            if c.start == 0:
                seqs.pop(c.seq_id, None)  # a (re)start: forget what was held

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache()

    def _forward(self, chunks: Sequence[SeqChunk], *, may_keep: bool) -> list[torch.Tensor]:
        """One forward over ``chunks`` on a cache built from the sequences' buffers.

        With ``may_keep`` (these are all of the step's chunks) and decode tokens only, the
        resulting cache becomes the kept batch instead of being copied back.
        """
        dev = self.device
        b = len(chunks)
        held = [self._seqs.get(c.seq_id) for c in chunks]
        cached = [0 if h is None else h.length for h in held]
        news = [len(c.token_ids) for c in chunks]
        big_c, big_n = max(cached), max(news)
        ids = torch.full((b, big_n), self.pad_token_id, dtype=torch.long)
        pos = torch.zeros((b, big_n), dtype=torch.long)
        mask = torch.zeros((b, big_c + big_n), dtype=torch.long)
        for r, c in enumerate(chunks):
            n, cb = news[r], cached[r]
            ids[r, :n] = torch.tensor(c.token_ids, dtype=torch.long)
            pos[r] = torch.arange(cb, cb + big_n).clamp_(max=cb + n - 1)
            mask[r, big_c - cb : big_c] = 1
            mask[r, big_c : big_c + n] = 1
        cache = self._new_cache()
        if big_c:
            first = next(h for h in held if h is not None)
            for layer in range(len(first.keys)):
                cache.update(*_left_padded(held, layer, big_c), layer)
        kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True}
        if self._positions:
            kwargs["position_ids"] = pos.to(dev)
        keep_cols = sorted({n - 1 for r, n in enumerate(news) if chunks[r].need_logits})
        if self._keep:
            kwargs["logits_to_keep"] = torch.tensor(keep_cols or [0], dtype=torch.long, device=dev)
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kwargs)
        new_cache = getattr(out, "past_key_values", None)
        if new_cache is None:
            new_cache = cache
        layers = getattr(new_cache, "layers", None)
        if layers is None:
            raise RuntimeError(
                f"{type(new_cache).__name__} has no per-layer keys/values; the batched "
                "fallback needs a transformers Cache"
            )
        keep = may_keep and big_n == 1 and _keepable(layers)
        for r, c in enumerate(chunks):
            n = news[r]
            h = held[r]
            if h is None:
                h = _SeqKV(
                    keys=[
                        lay.keys.new_empty(lay.keys.shape[1], 0, lay.keys.shape[3])
                        for lay in layers
                    ],
                    values=[
                        lay.values.new_empty(lay.values.shape[1], 0, lay.values.shape[3])
                        for lay in layers
                    ],
                    length=0,
                )
                self._seqs[c.seq_id] = h
            if keep:  # the kept row holds every token of it
                h.empty()
                h.length += n
                continue
            for li, lay in enumerate(layers):
                h.append(
                    li,
                    lay.keys[r, :, big_c : big_c + n],
                    lay.values[r, :, big_c : big_c + n],
                    h.length,
                )
            h.length += n
            h.synced = h.length
        if keep:
            self._kept = _Kept(
                [c.seq_id for c in chunks],
                new_cache,
                mask.to(dev),
                [big_c - cb for cb in cached],
            )
        logits = out.logits
        result: list[torch.Tensor] = []
        for r, c in enumerate(chunks):
            if not c.need_logits:
                continue
            col = news[r] - 1
            idx = keep_cols.index(col) if self._keep else col
            result.append(logits[r, idx])
        return result

    def _forward_kept(self, chunks: Sequence[SeqChunk]) -> list[torch.Tensor]:
        """One decode step of exactly the kept batch's sequences, on its cache."""
        kept = self._kept
        assert kept is not None
        dev = self.device
        b = len(chunks)
        ids = torch.tensor([c.token_ids for c in chunks], dtype=torch.long, device=dev)
        mask = torch.cat([kept.mask, kept.mask.new_ones(b, 1)], dim=1)
        kwargs: dict[str, Any] = {self._cache_kw: kept.cache, "use_cache": True}
        if self._positions:
            kwargs["position_ids"] = torch.tensor(
                [[c.start] for c in chunks], dtype=torch.long, device=dev
            )
        if self._keep:
            kwargs["logits_to_keep"] = torch.tensor([0], dtype=torch.long, device=dev)
        try:
            with torch.inference_mode():
                out = self.model(input_ids=ids, attention_mask=mask, **kwargs)
        except BaseException:
            # the cache may have grown in some layers only: its sequences' K/V are lost
            self._kept = None
            for sid in kept.ids:
                self._seqs.pop(sid, None)
            raise
        new_cache = getattr(out, "past_key_values", None)
        if new_cache is not None:
            kept.cache = new_cache
        kept.mask = mask
        seqs = self._seqs
        for c in chunks:
            seqs[c.seq_id].length += 1
        self.kept_steps += 1
        logits = out.logits
        return [logits[r, 0] for r, c in enumerate(chunks) if c.need_logits]

    def _joins_kept(self, kept: _Kept, chunks: Sequence[SeqChunk]) -> bool:
        """Whether ``chunks`` are the kept sequences in order, then others that can join.

        Those others (each held in its own buffers only) become new rows of the kept batch.
        """
        ids = kept.ids
        k = len(ids)
        if len(chunks) < k or any(c.seq_id != sid for c, sid in zip(chunks, ids, strict=False)):
            return False
        extra = chunks[k:]
        members = set(ids)
        seqs = self._seqs
        for c in extra:
            h = seqs.get(c.seq_id)
            if h is None or h.synced != h.length or c.seq_id in members:
                return False
        if extra:
            self._extend_kept(kept, [seqs[c.seq_id] for c in extra], [c.seq_id for c in extra])
        return True

    def _extend_kept(self, kept: _Kept, held: list[_SeqKV], ids: list[str]) -> None:
        """Add the sequences' K/V as rows at the end of the kept batch.

        The width becomes the longest length (older rows get more left padding if a new one
        is longer): the batch a fresh build of all rows would make.
        """
        layers = kept.cache.layers
        mask = kept.mask
        width = mask.shape[1]
        grow = max(h.length for h in held) - width
        if grow > 0:  # left padding: dim -2 of the K/V, dim -1 of the mask
            for lay in layers:
                lay.keys = pad(lay.keys, (0, 0, grow, 0))
                lay.values = pad(lay.values, (0, 0, grow, 0))
            mask = pad(mask, (grow, 0))
            kept.pads = [p + grow for p in kept.pads]
            width += grow
        b = len(held)
        for li, lay in enumerate(layers):
            ks, vs = _left_padded(held, li, width)
            lay.keys = torch.cat([lay.keys, ks])
            lay.values = torch.cat([lay.values, vs])
        rows = mask.new_zeros(b, width)
        for r, h in enumerate(held):
            rows[r, width - h.length :] = 1
        kept.mask = torch.cat([mask, rows])
        kept.ids = kept.ids + ids
        kept.pads = kept.pads + [width - h.length for h in held]
        for h in held:
            h.empty()

    def _dissolve(self) -> None:
        """Write the kept rows back into their sequences' buffers; keep nothing."""
        kept = self._kept
        if kept is None:
            return
        self._kept = None
        self.dissolved += 1
        layers = kept.cache.layers
        for r, sid in enumerate(kept.ids):
            h = self._seqs.get(sid)
            if h is None:
                continue
            lo, hi = kept.pads[r] + h.synced, kept.pads[r] + h.length
            for li, lay in enumerate(layers):
                h.append(li, lay.keys[r, :, lo:hi], lay.values[r, :, lo:hi], h.synced)
            h.synced = h.length

    def release(self, seq_id: str) -> None:
        """Drop the sequence's K/V (and its row of the kept batch)."""
        self._seqs.pop(seq_id, None)
        kept = self._kept
        if kept is None or seq_id not in kept.ids:
            return
        r = kept.ids.index(seq_id)
        rest = [i for i in range(len(kept.ids)) if i != r]
        if not rest:
            self._kept = None
            return
        # the cache a fresh build of the remaining rows would make: no all-padding columns
        trim = min(kept.pads[i] for i in rest)
        idx = torch.tensor(rest, dtype=torch.long, device=kept.mask.device)
        for lay in kept.cache.layers:
            lay.keys = lay.keys.index_select(0, idx)[:, :, trim:]
            lay.values = lay.values.index_select(0, idx)[:, :, trim:]
        kept.mask = kept.mask.index_select(0, idx)[:, trim:]
        kept.ids = [kept.ids[i] for i in rest]
        kept.pads = [kept.pads[i] - trim for i in rest]

    def reset(self) -> None:
        """Drop every sequence's K/V."""
        self._kept = None
        self._seqs.clear()


def _left_padded(
    held: Sequence[_SeqKV | None], layer: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s K and V of ``held`` as a batch ``[rows, heads, width, dim]``.

    Row ``r`` holds its sequence's tokens in its last ``length`` columns, zeros before them
    (None or an empty sequence: all zeros). Keys and values may differ in heads or width
    (multi-head latent attention: DeepSeek-V2/V3).
    """
    first = next(h for h in held if h is not None)
    k0, v0 = first.keys[layer], first.values[layer]
    ks = k0.new_zeros(len(held), k0.shape[0], width, k0.shape[2])
    vs = v0.new_zeros(len(held), v0.shape[0], width, v0.shape[2])
    for r, h in enumerate(held):
        if h is not None and h.length:
            ks[r, :, width - h.length :] = h.keys[layer][:, : h.length]
            vs[r, :, width - h.length :] = h.values[layer][:, : h.length]
    return ks, vs
