"""The step-plan wire format between rank 0 and the tensor-parallel workers.

Part of :mod:`sagellm_backend.engine.hf.distributed`. Every message is a header of
:data:`HEADER_LEN` int64 values (kind, n_chunks, n_tokens, n_table, n_released, reset),
broadcast on the gloo control group; a :data:`STEP` header is followed by one int64
payload: :data:`CHUNK_FIELDS` values per chunk (sequence number, start, n_tokens,
n_table, need_logits), then every chunk's token ids, then every block table, then the
released sequence numbers. Invariant: :func:`decode_plan` inverts :func:`encode_plan`
(except ``need_logits``, always False on workers: they never sample).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from sagellm_backend.engine.runners.base import SeqChunk

if TYPE_CHECKING:
    import torch

__all__ = ["CHUNK_FIELDS", "HEADER_LEN", "NOOP", "SHUTDOWN", "STEP", "decode_plan", "encode_plan"]

# Control message kinds (first element of the header).
STEP, NOOP, SHUTDOWN = 1, 2, 3
HEADER_LEN = 6  # kind, n_chunks, n_tokens, n_table, n_released, reset
CHUNK_FIELDS = 5  # seq number, start, n_tokens, n_table, need_logits


def encode_plan(
    chunks: Sequence[SeqChunk], seq_num: Callable[[str], int], released: list[int], reset: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The header and payload of a STEP message (``seq_num`` numbers sequence ids)."""
    import torch

    meta: list[int] = []
    tokens: list[int] = []
    tables: list[int] = []
    for c in chunks:
        meta += [
            seq_num(c.seq_id),
            c.start,
            len(c.token_ids),
            len(c.block_table),
            int(c.need_logits),
        ]
        tokens += c.token_ids
        tables += c.block_table
    header = torch.tensor(
        [STEP, len(chunks), len(tokens), len(tables), len(released), int(reset)], dtype=torch.long
    )
    payload = torch.tensor(meta + tokens + tables + released, dtype=torch.long)
    return header, payload


def decode_plan(header: list[int], payload: torch.Tensor) -> tuple[list[SeqChunk], list[int]]:
    """The chunks and released sequence numbers of a STEP message (see the module)."""
    _, n, n_tok, n_tab, n_rel, _ = header
    values: list[int] = payload.tolist()
    meta = values[: n * CHUNK_FIELDS]
    tokens = values[n * CHUNK_FIELDS : n * CHUNK_FIELDS + n_tok]
    tables = values[n * CHUNK_FIELDS + n_tok : n * CHUNK_FIELDS + n_tok + n_tab]
    released = values[len(values) - n_rel :] if n_rel else []
    chunks: list[SeqChunk] = []
    ti = bi = 0
    for i in range(n):
        seq, start, nt, nb, _need = meta[i * CHUNK_FIELDS : (i + 1) * CHUNK_FIELDS]
        # Workers never sample: no logits needed (skips the LM head).
        chunks.append(SeqChunk(str(seq), tokens[ti : ti + nt], start, tables[bi : bi + nb], False))
        ti += nt
        bi += nb
    return chunks, released
