"""Grouping of a step's prompt chunks into padded batches that waste little compute.

A padded batch computes every row to the longest row's length; rows of very different
lengths are better run in separate forwards. :func:`prefill_groups` groups the chunks so
that each batch's padding stays small. Used by the per-sequence runner (left-padded
prefills) and the batched fallback runner (right-padded new tokens) on the CPU, where a
forward's time follows the tokens it computes.

Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from sagellm_backend.engine.runners.base import SeqChunk

__all__ = ["prefill_groups"]

#: A batched prefill may compute at most this share of padding (of its padded tokens) ...
_PAD_SHARE = 0.25
#: ... or, when more, at most this many padding tokens per sequence (short prompts).
_PAD_PER_SEQ = 16


def prefill_groups(
    chunks: Sequence[SeqChunk], max_tokens: int | None = None
) -> list[list[SeqChunk]]:
    """Chunks grouped for padded batched forwards (the first chunks of new sequences).

    Chunks are taken shortest first; a group grows while its padding stays within
    :data:`_PAD_SHARE` of its padded tokens or :data:`_PAD_PER_SEQ` tokens per sequence,
    and (``max_tokens``) its padded tokens within ``max_tokens``. Only groups of two or
    more are returned (a single chunk runs on its own).
    """
    groups: list[list[SeqChunk]] = []
    group: list[SeqChunk] = []
    real = 0
    for c in sorted(chunks, key=lambda c: len(c.token_ids)):
        n = len(c.token_ids)
        padded = n * (len(group) + 1)  # sorted: the new chunk is the longest
        pad = padded - real - n
        too_big = max_tokens is not None and padded > max_tokens
        if group and (too_big or pad > max(_PAD_SHARE * padded, _PAD_PER_SEQ * (len(group) + 1))):
            if len(group) > 1:
                groups.append(group)
            group, real = [], 0
        group.append(c)
        real += n
    if len(group) > 1:
        groups.append(group)
    return groups
