"""Kernels and helpers of the generic paged runner (see :mod:`.paged`).

* dense attention with the models' features (sliding window, soft-capping, sinks): the
  reference used outside a step and by the runner's prompt chunks;
* :func:`split_decode`, which cuts the decode rows of a step into groups of similar length.

Invariants: no module state; every function is pure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

__all__ = [
    "DECODE_SPLIT_SAVING",
    "dense_attention",
    "split_decode",
]

#: Decode rows are split into groups of similar length when that saves at least this share
#: of the gathered (padded) pages; each group is one batched attention call per layer.
DECODE_SPLIT_SAVING = 0.5


# ---------------------------------------------------------------------------- reference
def _apply_softcap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    if softcap is None:
        return scores
    return torch.tanh(scores / softcap) * softcap


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

    ``q [B, H, n, D]``, ``k``/``v [B, Hkv, L, D]``, additive ``mask``; ``causal`` (only
    with ``mask=None``) means plain causal attention over equal q/k lengths. On the eager
    path soft-capping is applied to the scaled logits before the mask; sinks (one logit per
    head) join the softmax as an extra column that is then dropped.
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
