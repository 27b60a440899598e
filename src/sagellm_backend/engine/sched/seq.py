"""The scheduler's records: a sequence inside it, a step plan, counters.

Invariants:
    * a :class:`SchedSeq`'s ``output_ids`` only grow while it runs (a preempted sequence
      keeps them and is recomputed from prompt + outputs);
    * ``num_computed <= num_tokens`` and, on a paged runner, the pages in ``block_table``
      cover every computed token;
    * the fields below ``timeline`` belong to the scheduler (and ``generator`` to the
      sampler): engines fill only the first block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sagellm_protocol import Error

from sagellm_backend.engine.metrics import RequestTimeline
from sagellm_backend.engine.runners.base import SeqChunk
from sagellm_backend.engine.sched.sampler import GREEDY, SamplingParams
from sagellm_backend.kv.stats import KVRequestStats

__all__ = ["FinishReason", "SchedSeq", "SchedulerStats", "StepPlan"]

FinishReason = Literal["stop", "length", "error"]


@dataclass(eq=False, slots=True)
class SchedSeq:
    """One request inside the scheduler.

    The engine fills the first block of fields; the rest belongs to the scheduler (and, for
    ``generator``, to the sampler). ``user`` is free for the driver (the consumer's handle).

    Attributes:
        seq_id: unique id (also the KV manager's sequence id).
        prompt_ids: prompt tokens (non-empty).
        max_tokens: tokens to produce at most (``>= 1``).
        sampling: sampling parameters.
        ignore_eos: keep generating after EOS.
        stop_token_ids: tokens that end the sequence with ``"stop"`` (even with ignore_eos).
        stop_strings: texts that end the sequence with ``"stop"`` once the output contains
            one (needs the scheduler's ``decode``).
        timeline: instants of the request (scheduled, token and completed times set here).
        per_token: its consumer follows every step (a stream): one token per step, never
            a multi-step burst.
    """

    seq_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = GREEDY
    ignore_eos: bool = False
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    timeline: RequestTimeline = field(default_factory=RequestTimeline)
    user: Any = None
    per_token: bool = False
    output_ids: list[int] = field(default_factory=list)
    limit: int = 0
    chunk: SeqChunk | None = None
    num_computed: int = 0
    kv_tokens: int = 0
    kv_pages: int = 0
    final_pages: int = 0
    block_table: list[int] = field(default_factory=list)
    has_kv: bool = False
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: Error | None = None
    kv_stats: KVRequestStats | None = None
    cancelled: bool = False
    preemptions: int = 0
    generator: Any = None
    stops: frozenset[int] = frozenset()
    prompt_len: int = 0
    burst: bool = False

    @property
    def num_tokens(self) -> int:
        """Prompt plus produced tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``start..end-1`` of prompt + output."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p : end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    @property
    def in_prefill(self) -> bool:
        """The prompt (or the recomputed prefix after preemption) is not fully computed."""
        return not self.output_ids or self.num_computed < self.num_tokens - 1


@dataclass(slots=True)
class StepPlan:
    """What one step computes.

    Attributes:
        chunks: one chunk per scheduled sequence.
        seqs: the owner of each chunk.
        sample_seqs: owners of the chunks with ``need_logits`` (the logits rows), in order.
        prefill: some chunk computes prompt tokens.
        decode: some chunk decodes one generated token.
        special: rows (indices into ``sample_seqs``) whose sampling is not plain greedy.
        num_decode: the first ``num_decode`` chunks are decode chunks (one token each, all
            with ``need_logits``; chunk ``i`` owns logits row ``i``).
    """

    chunks: list[SeqChunk]
    seqs: list[SchedSeq]
    sample_seqs: list[SchedSeq]
    prefill: bool
    decode: bool
    special: list[int]
    num_decode: int = 0


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """Counters of a scheduler (a snapshot)."""

    steps: int
    waiting: int
    running: int
    preemptions: int
    finished: int
    completed: int
    failed: int
    cancelled: int
    failed_steps: int
    tokens_computed: int
    tokens_generated: int
