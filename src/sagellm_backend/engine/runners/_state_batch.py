"""Batched steps for the per-sequence runner: several sequences' caches as one.

Each sequence of :class:`~sagellm_backend.engine.runners.hf_state.HFStatefulRunner` keeps the
transformers ``DynamicCache`` its model makes. For a decode step of several sequences,
:func:`merge` builds one cache of batch ``B`` from theirs -- recurrent (convolution and SSM /
linear-attention) states stacked row by row, attention K/V left-padded to the longest
sequence, as ``generate`` holds a left-padded batch -- and, after the model's forward over
that cache, :func:`split` copies each row's new state and K/V back into its sequence's own
cache. A 2-D attention mask marks the padding where there is attention K/V
(:func:`has_attention`). New prompts run as a left-padded batch over an empty cache, which
:func:`split` likewise divides into one fresh cache per sequence.

Only caches built entirely of layer types whose layout this module knows are merged
(:func:`mergeable`): full-attention ``DynamicLayer``, ``LinearAttentionLayer`` and the
hybrid ``LinearAttentionAndFullAttentionLayer``, plus ``DummyLayer``. Anything else (sliding
windows, static or quantized layers, another transformers layout) raises
:class:`UnmergeableError` and the caller runs the sequences one by one. The runner also checks
once, on the loaded model, that a merged step gives the logits separate steps give
(:func:`merged_decode_matches`, :func:`merged_prefill_matches`), and batches only when it
does.

Invariants: :func:`merge` does not change the sequences' caches; :func:`split` gives every
cache its own tensors (copies, no view of the merged batch).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sagellm_backend.engine.runners._probe import logits_close

__all__ = [
    "UnmergeableError",
    "drop_tensors",
    "merge",
    "mergeable",
    "merged_decode_matches",
    "merged_prefill_matches",
    "split",
]


class UnmergeableError(Exception):
    """The caches cannot be merged (an unknown layer type or an inconsistent state)."""


@functools.cache
def _layer_classes() -> tuple[Any, Any, Any, Any, Any]:
    """The cache layer classes of transformers (looked up once; raises if one is missing)."""
    from transformers import cache_utils as cu

    return (
        cu.DynamicLayer,
        cu.LinearAttentionLayer,
        cu.LinearAttentionAndFullAttentionLayer,
        cu.DummyLayer,
        cu.LinearAttentionCacheLayerMixin,
    )


def mergeable(cache: Any) -> bool:
    """Whether every layer of ``cache`` is of a type :func:`merge` knows (exact types)."""
    try:
        dynamic, linear, hybrid, dummy, _ = _layer_classes()
    except (ImportError, AttributeError):  # another transformers: no batching
        return False
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    return all(type(layer) in (dynamic, linear, hybrid, dummy) for layer in layers)


def has_attention(cache: Any) -> bool:
    """Whether a merged ``cache`` holds attention K/V (then the step needs a padding mask).

    A cache of recurrent layers only (Mamba) has no padded positions in a decode step, and
    such models apply a given mask to their one-token hidden states, so they get none (as
    ``generate`` passes none to their decode steps).
    """
    dynamic = _layer_classes()[0]
    return any(
        isinstance(layer, dynamic) and layer.is_initialized and layer.keys is not None
        for layer in cache.layers
    )


def merge(caches: Sequence[Any], lengths: Sequence[int], new_cache: Any) -> int:
    """Fill ``new_cache`` (empty, same layer types) with ``caches`` stacked; return ``L``.

    ``lengths[r]`` is the tokens cache ``r`` holds; ``L`` is the longest. Attention K/V of
    row ``r`` sit in columns ``L - lengths[r] .. L - 1`` (zeros before them).

    Raises:
        UnmergeableError: a layer type or state this function does not know.
    """
    dynamic, _, _, dummy, linear_mixin = _layer_classes()
    if not mergeable(new_cache):
        raise UnmergeableError("a cache layer of a type the batched decode does not know")
    if any(len(c.layers) != len(new_cache.layers) for c in caches):
        raise UnmergeableError("the caches have different numbers of layers")
    width = max(lengths)
    for li, merged in enumerate(new_cache.layers):  # every source layer of merged's type
        src = [c.layers[li] for c in caches]
        if any(type(s) is not type(merged) for s in src):
            raise UnmergeableError(f"layer {li}: the caches have different layer types")
        if type(merged) is dummy:
            continue
        if isinstance(merged, linear_mixin):
            _merge_linear(merged, src, width)
        if isinstance(merged, dynamic):
            _merge_attention(merged, src, lengths, width)
    return width


def drop_tensors(caches: Sequence[Any]) -> None:
    """Let go of the tensors of caches whose state a merged batch now holds.

    Their layer objects stay (:func:`split` fills them again); only the tensors go, so a
    kept batch does not double the memory of its sequences' K/V and states.
    """
    dynamic, _, _, _, linear_mixin = _layer_classes()
    for cache in caches:
        for layer in cache.layers:
            if isinstance(layer, linear_mixin):
                for idx in range(layer.number_of_states):
                    layer.conv_states[idx] = layer.recurrent_states[idx] = None
            if isinstance(layer, dynamic) and layer.is_initialized:
                layer.keys = layer.values = None


def _merge_linear(merged: Any, src: Sequence[Any], width: int) -> None:
    for idx in range(merged.number_of_states):
        for name, flag in (
            ("conv_states", "is_conv_states_initialized"),
            ("recurrent_states", "is_recurrent_states_initialized"),
        ):
            parts = [getattr(s, name)[idx] for s in src]
            if all(p is None for p in parts):
                continue
            if any(not isinstance(p, torch.Tensor) or p.shape[0] != 1 for p in parts):
                raise UnmergeableError(f"{name}[{idx}] is not a one-row tensor in every cache")
            getattr(merged, name)[idx] = torch.cat(parts, 0)
            getattr(merged, flag)[idx] = True
        if not all(s.has_previous_state[idx] for s in src):
            raise UnmergeableError("a sequence has no previous state (not in decode)")
        merged.has_previous_state[idx] = True
        merged.conv_kernel_size[idx] = src[0].conv_kernel_size[idx]
    merged.device, merged.dtype = src[0].device, src[0].dtype
    device = src[0].cumulative_length_linear.device
    merged.cumulative_length_linear = torch.tensor(width, dtype=torch.long, device=device)


def _merge_attention(merged: Any, src: Sequence[Any], lengths: Sequence[int], width: int) -> None:
    if not all(s.is_initialized and s.keys is not None and s.keys.numel() for s in src):
        if any(s.is_initialized and s.keys is not None and s.keys.numel() for s in src):
            raise UnmergeableError("attention K/V held by some sequences only")
        return
    k0, v0 = src[0].keys, src[0].values
    keys = k0.new_zeros(len(src), k0.shape[1], width, k0.shape[3])
    values = v0.new_zeros(len(src), v0.shape[1], width, v0.shape[3])
    for r, (s, n) in enumerate(zip(src, lengths, strict=True)):
        if s.keys.shape[0] != 1 or s.keys.shape[2] != n:
            raise UnmergeableError(
                f"attention K/V of row {r} hold {s.keys.shape[2]} tokens, not {n}"
            )
        keys[r, :, width - n :] = s.keys[0]
        values[r, :, width - n :] = s.values[0]
    merged.keys, merged.values = keys, values
    merged.is_initialized = True
    merged.device = src[0].device
    if hasattr(src[0], "dtype"):
        merged.dtype = src[0].dtype


def split(
    merged_cache: Any,
    caches: Sequence[Any | None],
    pads: Sequence[int],
    new_tokens: Sequence[int],
) -> None:
    """Copy each row of ``merged_cache`` (after its forwards) into its own cache.

    Row ``r`` of the batch was left-padded by ``pads[r]`` positions and fed ``new_tokens[r]``
    tokens of its own since it was merged: its attention K/V are the merged ones from column
    ``pads[r]`` on, its recurrent states its row of the merged ones, and its linear-attention
    length grows by ``new_tokens[r]``. A sequence's cache may be empty (a batched prefill):
    every flag a forward would set on it is set from the merged layer. A None cache skips
    its row (a sequence released meanwhile).
    """
    dynamic, _, _, dummy, linear_mixin = _layer_classes()
    for li, merged in enumerate(merged_cache.layers):
        if type(merged) is dummy:
            continue
        is_linear = isinstance(merged, linear_mixin)
        has_kv = isinstance(merged, dynamic) and merged.is_initialized and merged.keys is not None
        for r, cache in enumerate(caches):
            if cache is None:
                continue
            own = cache.layers[li]
            if is_linear:
                _split_linear(merged, own, r, new_tokens[r])
            if has_kv:
                own.keys = merged.keys[r : r + 1, :, pads[r] :].clone()
                own.values = merged.values[r : r + 1, :, pads[r] :].clone()
                own.is_initialized = True
                own.device = merged.device
                if hasattr(merged, "dtype"):
                    own.dtype = merged.dtype


def _split_linear(merged: Any, own: Any, row: int, new_tokens: int) -> None:
    for idx in range(merged.number_of_states):
        for name, flag in (
            ("conv_states", "is_conv_states_initialized"),
            ("recurrent_states", "is_recurrent_states_initialized"),
        ):
            state = getattr(merged, name)[idx]
            if state is not None:
                getattr(own, name)[idx] = state[row : row + 1].clone()
                getattr(own, flag)[idx] = True
        own.has_previous_state[idx] = merged.has_previous_state[idx]
        own.conv_kernel_size[idx] = merged.conv_kernel_size[idx]
    own.device, own.dtype = merged.device, merged.dtype
    length = own.cumulative_length_linear
    own.cumulative_length_linear = length.to(merged.cumulative_length_linear.device) + new_tokens


def merged_decode_matches(
    run_one: Callable[[str, list[int], int], torch.Tensor],
    run_batch: Callable[[list[tuple[str, int, int]]], list[torch.Tensor]],
    vocab_size: int,
    rel: float = 1e-2,
) -> bool:
    """Whether merged decode steps give the logits of separate ones on this model.

    ``run_one(seq_id, tokens, start)`` feeds a sequence on its own; ``run_batch`` a decode
    step of ``(seq_id, token, start)`` rows through :func:`merge`. Two sequences of different
    lengths (1 and 6 tokens) decode four steps each way; the merged way runs two steps as one
    batch (the second reuses it), one step each on its own (the batch is split back) and one
    merged again, so merging, a kept batch, splitting and merging split caches are all
    checked. The logits must agree to within 1e-3 plus ``rel`` (default 1%) of their
    magnitude.
    """
    gen = torch.Generator().manual_seed(0)
    prompts = {"a": [1], "b": torch.randint(4, max(5, vocab_size), (6,), generator=gen).tolist()}
    tokens = [int(t) for t in torch.randint(4, max(5, vocab_size), (4,), generator=gen)]
    alone: dict[str, list[torch.Tensor]] = {}
    for sid, ids in prompts.items():
        run_one(f"~{sid}", ids, 0)
        alone[sid] = [run_one(f"~{sid}", [t], len(ids) + i) for i, t in enumerate(tokens)]
    batched: dict[str, list[torch.Tensor]] = {sid: [] for sid in prompts}
    for sid, ids in prompts.items():
        run_one(f"~~{sid}", ids, 0)
    for i, t in enumerate(tokens):
        if i == 2:  # on its own: what the batch held must be back in each sequence's cache
            for sid, ids in prompts.items():
                batched[sid].append(run_one(f"~~{sid}", [t], len(ids) + i))
            continue
        rows = run_batch([(f"~~{sid}", t, len(ids) + i) for sid, ids in prompts.items()])
        for sid, row in zip(prompts, rows, strict=True):
            batched[sid].append(row)
    return all(logits_close(alone[sid], batched[sid], rel=rel) for sid in prompts)


def merged_prefill_matches(
    run_one: Callable[[str, list[int], int], torch.Tensor],
    run_prefill: Callable[[list[tuple[str, list[int]]]], list[torch.Tensor]],
    vocab_size: int,
    rel: float = 1e-2,
) -> bool:
    """Whether a batched prefill gives the logits of separate ones on this model.

    ``run_prefill`` feeds new sequences ``(seq_id, prompt)`` as one left-padded batch and
    splits the cache (:func:`split`). Three prompts of 1, 6 and 3 tokens are prefilled
    alone and batched; then every sequence decodes two tokens on its own, so a cache that
    :func:`split` got wrong shows in the later logits. Tolerance as in
    :func:`merged_decode_matches`.
    """
    gen = torch.Generator().manual_seed(1)
    high = max(5, vocab_size)
    lengths = (1, 6, 3)
    prompts = {
        f"p{i}": torch.randint(4, high, (n,), generator=gen).tolist() for i, n in enumerate(lengths)
    }
    tokens = [int(t) for t in torch.randint(4, high, (2,), generator=gen)]

    def decode(sid: str, n: int) -> list[torch.Tensor]:
        return [run_one(sid, [t], n + i) for i, t in enumerate(tokens)]

    alone = {sid: [run_one(f"~{sid}", ids, 0)] for sid, ids in prompts.items()}
    firsts = run_prefill([(f"~~{sid}", ids) for sid, ids in prompts.items()])
    for (sid, ids), first in zip(prompts.items(), firsts, strict=True):
        alone[sid] += decode(f"~{sid}", len(ids))
        if not logits_close(alone[sid], [first, *decode(f"~~{sid}", len(ids))], rel=rel):
            return False
    return True
