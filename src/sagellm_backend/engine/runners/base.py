"""The runner interface: what a scheduler step hands a runner, and what it gets back.

A scheduler step hands the runner a list of :class:`SeqChunk` -- for every scheduled
sequence, the tokens whose K/V are computed in this step (a whole or partial prompt, or the
one token sampled last step) -- and gets back float32 logits for the chunks that asked for
them (``need_logits``), one row per such chunk, in chunk order.

Invariants:
    * Runners never touch the KV manager: the scheduler passes block tables in chunks and
      reports computed tokens to the manager after :meth:`ModelRunner.execute` returns.
    * A runner never decides who runs; a scheduler never touches tensors.
    * This module imports no torch at run time (the mock runner needs none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["ModelRunner", "SeqChunk", "check_chunks"]


@dataclass(slots=True)
class SeqChunk:
    """One sequence's share of a step.

    Attributes:
        seq_id: the sequence (KV manager id).
        token_ids: tokens whose K/V are computed now (``>= 1``).
        start: position of ``token_ids[0]``; tokens ``0..start-1`` are already in the cache.
        block_table: the sequence's pages, covering at least ``start + len(token_ids)``
            tokens (paged runners only).
        need_logits: return logits for the last token of this chunk.
        num_steps: decode steps to run on this chunk (``1`` unless the runner declares
            ``max_decode_steps > 1``, see :class:`ModelRunner`). With ``k > 1`` the chunk is a
            one-token decode chunk of a greedy sequence and the runner returns, in its row,
            the ``k`` tokens it generated one after the other (each fed back as the next
            input, positions ``start .. start + k - 1`` written), instead of logits.
        prompt_len: the sequence's prompt length: positions below it hold prompt tokens,
            the others generated ones (a chunk recomputed after preemption holds both).
            Runners that do not care ignore it; 0 when the sender does not say.
    """

    seq_id: str
    token_ids: list[int]
    start: int
    block_table: list[int]
    need_logits: bool
    num_steps: int = 1
    prompt_len: int = 0


class ModelRunner(Protocol):
    """What the scheduler needs from a runner.

    Attributes:
        name: short runner name shown by ``get_info()`` and ``info --model``.
        uses_paged_kv: K/V live in the provider's paged pool (prefix pages are reusable).
        device: the device logits come back on (a ``torch.device`` for torch runners).
        vocab_size: width of a logits row.
        max_decode_steps: (optional, default 1) most decode steps the runner can run on one
            chunk in one call (multi-step decoding, see :attr:`SeqChunk.num_steps`). A runner
            declares more than 1 only when bursts change nothing a consumer can observe
            except the grouping of tokens into steps (the mock at zero simulated latency).
        chunked_prefill: (optional, default True) the runner can continue a sequence with a
            multi-token chunk, so the scheduler may split a prompt over several steps. A
            runner declaring False gets every prompt (or recomputation) as one chunk.
    """

    name: str
    uses_paged_kv: bool
    device: Any
    vocab_size: int

    def execute(self, chunks: Sequence[SeqChunk]) -> Any:
        """Compute the chunks; return float32 logits ``[n_need_logits, vocab]``."""
        ...

    def release(self, seq_id: str) -> None:
        """Forget any per-sequence state (no-op when there is none)."""
        ...

    def reset(self) -> None:
        """Forget every sequence's state (no sequence is running)."""
        ...


def check_chunks(chunks: Sequence[SeqChunk], held: Callable[[str], int], max_context: int) -> None:
    """Check a step for a runner that keeps each sequence's state itself.

    Every chunk must be non-empty, name its sequence once, start at 0 (a new sequence or a
    restart) or at ``held(seq_id)`` (the tokens the runner holds of it), and end within
    ``max_context``. Nothing is changed.

    Raises:
        ValueError: naming the sequence and what is wrong.
    """
    if not chunks:
        raise ValueError("execute() needs at least one chunk")
    seen: set[str] = set()
    for c in chunks:
        if c.seq_id in seen:
            raise ValueError(f"sequence {c.seq_id!r} appears twice in one step")
        seen.add(c.seq_id)
        if not c.token_ids:
            raise ValueError(f"sequence {c.seq_id!r}: empty chunk")
        if c.start != 0:
            have = held(c.seq_id)
            if have != c.start:
                raise ValueError(
                    f"sequence {c.seq_id!r}: chunk starts at {c.start}, the runner holds "
                    f"{have} tokens of it"
                )
        end = c.start + len(c.token_ids)
        if end > max_context:
            raise ValueError(
                f"sequence {c.seq_id!r} reaches position {end}, beyond the context "
                f"length {max_context}"
            )
