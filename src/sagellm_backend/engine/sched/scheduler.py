"""The continuous-batching scheduler every engine uses: pure Python, no torch, no threads.

One step is ``plan = scheduler.schedule()`` -> the runner computes ``plan.chunks`` -> the
sampler picks tokens for ``plan.sample_seqs`` -> ``scheduler.update(plan, tokens, t0, t1)``.
The :mod:`~sagellm_backend.engine.sched.driver` runs that loop; this module decides who runs.

:meth:`Scheduler.schedule`

1. admits waiting sequences in arrival order while the batch has room (``max_batch_size``),
   the step's token budget (``max_num_batched_tokens``) is not spent and the KV manager can
   hold them. With ``reserve_output`` a sequence is admitted only when the pool also has
   room for its *final* length beside the reservations of those running (it then never
   needs preemption); otherwise only its current tokens are allocated and it grows.
   A sequence that does not fit waits while others run (they will free pages); when nothing
   of this scheduler runs, nothing can free pages, so it fails with RESOURCE_EXHAUSTED.
   With prefix caching on a paged runner, a sequence sharing a full first block with a
   prompt still being prefilled waits one step, to reuse that prompt's pages;
2. builds one :class:`~sagellm_backend.engine.runners.base.SeqChunk` per running sequence:
   the decode token of every generating sequence, then prompt chunks (starting at the cached
   prefix on a paged runner; split so that a step computes at most
   ``max_num_batched_tokens`` tokens). A growing sequence that finds the pool full preempts
   the most recently admitted one (its pages are freed, its full blocks stay cached, and it
   is re-queued first to be recomputed from its prompt and outputs). With a runner that
   decodes several steps per call, a greedy, non-streamed sequence's decode chunk asks for a
   burst (``num_steps``; see ``decode_steps``).

The records (:class:`SchedSeq`, :class:`StepPlan`, :class:`SchedulerStats`) live in
:mod:`~sagellm_backend.engine.sched.seq`; :meth:`Scheduler.update` and the finishing code in
:mod:`~sagellm_backend.engine.sched._record`.

:meth:`Scheduler.update` records computed tokens (full blocks become reusable through
``mark_computed``), appends the sampled tokens and ends sequences on EOS (unless
``ignore_eos``), a stop token id, a stop string, ``max_tokens`` or the context length.

Invariants:
    * every added sequence finishes exactly once (``finished`` set, ``finish_reason`` set,
      returned by exactly one of :meth:`update`, :meth:`abort`, :meth:`fail_all`);
    * a finished, aborted or preempted sequence holds no KV pages; with no sequence left,
      the manager holds none of this scheduler's sequences;
    * waiting sequences keep arrival order (preempted ones go back to the front);
    * a plan's chunks are valid until the next :meth:`schedule` (a sequence's decode chunk
      object is reused step after step): runners must not keep them;
    * the KV manager learns generated tokens lazily -- when a new page is needed, when a
      block completes (prefix caching) and at the end -- so it sees one call per page, not per
      token; a sequence's ``block_table`` always covers the tokens of its next chunk.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from sagellm_protocol import Error, ErrorCode

from sagellm_backend.engine.runners.base import SeqChunk
from sagellm_backend.engine.sched._record import StepRecorder
from sagellm_backend.engine.sched.sampler import GREEDY
from sagellm_backend.engine.sched.seq import FinishReason, SchedSeq, SchedulerStats, StepPlan
from sagellm_backend.errors import KVCacheExhaustedError

if TYPE_CHECKING:
    from sagellm_backend.kv.manager import KVCacheManager

__all__ = ["FinishReason", "SchedSeq", "Scheduler", "SchedulerStats", "StepPlan"]


class Scheduler(StepRecorder):
    """Continuous batching over a KV manager (see the module docstring).

    Args:
        kv: the KV manager (its pool bounds how many tokens are resident).
        max_batch_size: most sequences in the running batch (``>= 1``).
        max_num_batched_tokens: most tokens computed in one step (``>= max_batch_size``).
        max_context: longest sequence (prompt + output).
        eos_token_ids: tokens that end a sequence (unless it ignores EOS).
        paged: the runner keeps K/V in the pool's pages (cached prefix pages are not
            recomputed; prefix deduplication applies).
        reserve_output: admit only when the final length fits beside the reservations.
        keep_eos: the EOS token that ends a sequence stays in its output.
        decode: token ids -> text, for stop strings.
        on_release: called with a sequence's id whenever its pages are freed (finish,
            abort, preemption): the runner forgets its per-sequence state there.
        decode_steps: most decode steps one chunk may run in one step (multi-step decoding,
            for runners whose ``max_decode_steps`` is above 1). Only greedy sequences without
            stop strings that are not streamed (``per_token``) get more than one; the pages
            of a burst's positions are reserved before it runs (``KVCacheManager.reserve``),
            or, when the pool cannot hold them, the burst ends at the sequence's last page.
        chunked_prefill: a prompt may be computed over several steps (the runner continues
            a sequence with a multi-token chunk). False (runners whose models reset their
            state on a multi-token continuation): a prompt is computed in one chunk; the
            first prompt of a step is taken whole even beyond ``max_num_batched_tokens``
            (so none waits forever behind decoding sequences), the next ones only when they
            fit what is left of it.
    """

    def __init__(
        self,
        kv: KVCacheManager,
        *,
        max_batch_size: int,
        max_num_batched_tokens: int,
        max_context: int,
        eos_token_ids: Iterable[int] = (),
        paged: bool = False,
        reserve_output: bool = False,
        keep_eos: bool = True,
        decode: Callable[[list[int]], str] | None = None,
        on_release: Callable[[str], None] | None = None,
        decode_steps: int = 1,
        chunked_prefill: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_num_batched_tokens < max_batch_size:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= "
                f"max_batch_size ({max_batch_size})"
            )
        self.kv = kv
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_context = max_context
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.paged = paged
        self.reserve_output = reserve_output
        self.keep_eos = keep_eos
        self.decode = decode
        self.on_release = on_release
        if decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
        self.decode_steps = decode_steps
        self.chunked_prefill = chunked_prefill
        self.block_size: int = kv.spec.block_size
        self._caching = bool(kv.enable_prefix_caching)
        self._prefix_dedup = self._caching and paged
        self.waiting: collections.deque[SchedSeq] = collections.deque()
        self.running: list[SchedSeq] = []
        self._reserved = 0
        self._reset_counters()

    # ------------------------------------------------------------------ queue
    @property
    def has_work(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def pages_for(self, num_tokens: int) -> int:
        """Pages that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Raise when a sequence of this size can never fit in the whole pool.

        Raises:
            KVCacheExhaustedError: naming the pages needed and held (RESOURCE_EXHAUSTED, not
                retryable: the same request never fits).
        """
        need = self.pages_for(prompt_len + max_tokens - 1)
        total = self.kv.pool.num_pages
        if need > total:
            exc = KVCacheExhaustedError(
                f"request needs {need} KV pages ({prompt_len} prompt + {max_tokens} max_tokens "
                f"tokens, {self.block_size} per page) but the pool holds {total}; lower "
                "max_tokens or give the engine a larger KV budget"
            )
            exc.retryable = False  # the same request can never fit this engine's pool
            raise exc

    def add(self, seq: SchedSeq) -> None:
        """Queue a sequence (arrival order)."""
        n = seq.prompt_len = len(seq.prompt_ids)
        max_tokens = seq.max_tokens
        seq.final_pages = -(-(n + max_tokens - 1) // self.block_size)  # pages_for, inlined
        seq.limit = min(max_tokens, self.max_context - n)
        # one set lookup per token decides whether the slow stop checks run
        stop_ids = seq.stop_token_ids
        if seq.ignore_eos:
            seq.stops = stop_ids
        else:
            seq.stops = self.eos_token_ids | stop_ids if stop_ids else self.eos_token_ids
        params = seq.sampling
        seq.burst = (
            (params is GREEDY or (params.greedy and not params.penalized))
            and not seq.stop_strings
            and not seq.per_token
        )
        self.waiting.append(seq)

    def abort(self, seq: SchedSeq, error: Error, *, cancelled: bool = False) -> bool:
        """End a waiting or running sequence with ``error``; False when already finished."""
        if seq.finished:
            return False
        if seq in self.running:
            self.running.remove(seq)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        seq.cancelled = cancelled
        self._finish(seq, "error", error)
        return True

    def fail_all(self, error: Error) -> list[SchedSeq]:
        """End every sequence with ``error`` (their KV discarded); return them."""
        seqs = [*self.running, *self.waiting]
        self.running.clear()
        self.waiting.clear()
        for seq in seqs:
            self._finish(seq, "error", error, discard=True)
        return seqs

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> tuple[StepPlan | None, list[SchedSeq]]:
        """Admit and plan one step; return (the plan or None, sequences failed meanwhile)."""
        failed: list[SchedSeq] = []
        if self.waiting:
            self._admit(failed)
        if not self.running:
            return None, failed
        plan = self._build(failed)
        return (plan if plan.chunks else None), failed

    def _admit(self, failed: list[SchedSeq]) -> None:
        kv = self.kv
        running = self.running
        if len(running) >= self.max_batch_size:
            return  # no room: skip the budget scan
        waiting = self.waiting
        budget = self.max_num_batched_tokens
        for s in running:
            budget -= s.num_tokens - s.num_computed
        pending_keys = (
            {self._first_block(s) for s in running if s.in_prefill} if self._prefix_dedup else None
        )
        deferred: list[SchedSeq] = []
        block = self.block_size
        while waiting and len(running) < self.max_batch_size and budget > 0:
            seq = waiting[0]
            key = None
            if pending_keys is not None:
                key = self._first_block(seq)
                if key is not None and key in pending_keys:
                    deferred.append(waiting.popleft())  # reuse that prompt's pages later
                    continue
            n = seq.prompt_len + len(seq.output_ids)
            pages = -(-n // block)  # pages_for(n), inlined
            if self.reserve_output and not kv.can_allocate(
                (max(seq.final_pages, pages) + self._reserved) * block
            ):
                if running:
                    break
                waiting.popleft()
                self._finish(
                    seq,
                    "error",
                    Error(
                        code=ErrorCode.RESOURCE_EXHAUSTED,
                        message=(
                            f"KV pool exhausted: {seq.final_pages} KV pages needed, none can "
                            "be freed (the pool is held elsewhere)"
                        ),
                        retryable=True,
                    ),
                )
                failed.append(seq)
                continue
            try:
                cached = kv.allocate(seq.seq_id, seq.token_slice(0, n))
            except KVCacheExhaustedError as exc:
                if running:
                    break
                waiting.popleft()
                self._finish(seq, "error", exc.to_protocol())
                failed.append(seq)
                continue
            waiting.popleft()
            seq.has_kv = True
            seq.kv_tokens = n
            seq.kv_pages = pages
            seq.block_table = kv.block_table(seq.seq_id)
            if self.reserve_output and seq.final_pages > pages:
                self._reserved += seq.final_pages - pages
            seq.num_computed = cached if self.paged else 0
            tl = seq.timeline
            if tl.scheduled is None:
                tl.mark_scheduled()
            running.append(seq)
            budget -= n - seq.num_computed
            if key is not None and pending_keys is not None:
                pending_keys.add(key)
        if deferred:
            waiting.extendleft(reversed(deferred))

    def _first_block(self, seq: SchedSeq) -> tuple[int, ...] | None:
        if seq.num_tokens <= self.block_size:
            return None
        return tuple(seq.token_slice(0, self.block_size))

    def _build(self, failed: list[SchedSeq]) -> StepPlan:
        chunks: list[SeqChunk] = []
        owners: list[SchedSeq] = []
        sample: list[SchedSeq] = []
        special: list[int] = []
        budget = self.max_num_batched_tokens
        block = self.block_size
        prefilling: list[SchedSeq] = []
        add_chunk = chunks.append
        add_owner = owners.append
        steps = self.decode_steps
        for seq in list(self.running):
            out = seq.output_ids
            n = seq.prompt_len + len(out)
            if not out or seq.num_computed != n - 1:
                prefilling.append(seq)
                continue
            if not seq.has_kv or (n > seq.kv_pages * block and not self._grow(seq, n, failed)):
                continue
            k = self._burst_steps(seq, n, steps) if steps > 1 and seq.burst else 1
            chunk = seq.chunk
            if chunk is None:
                chunk = seq.chunk = SeqChunk(
                    seq.seq_id, [out[-1]], n - 1, seq.block_table, True, prompt_len=seq.prompt_len
                )
            else:  # the sequence's decode chunk, reused: valid during one execute() only
                chunk.token_ids[0] = out[-1]
                chunk.start = n - 1
                chunk.block_table = seq.block_table
            chunk.num_steps = k
            add_chunk(chunk)
            add_owner(seq)
            if seq.sampling is not GREEDY:
                special.append(len(owners) - 1)
        num_decode = len(chunks)
        sample.extend(owners)  # decode rows first, in chunk order
        decode = num_decode > 0
        budget -= num_decode
        prefill = False
        for seq in prefilling:
            if budget <= 0:
                break
            if not seq.has_kv:
                continue
            n = seq.num_tokens
            if n > seq.kv_pages * block and not self._grow(seq, n, failed):
                continue
            start = seq.num_computed
            end = min(n, start + budget)
            if end < n and not self.chunked_prefill:
                if prefill:
                    break  # it waits for a step of its own (arrival order kept)
                end = n
            need = end == n
            chunks.append(
                SeqChunk(
                    seq.seq_id,
                    seq.token_slice(start, end),
                    start,
                    seq.block_table,
                    need,
                    prompt_len=seq.prompt_len,
                )
            )
            owners.append(seq)
            if need:
                if seq.sampling is not GREEDY:
                    special.append(len(sample))
                sample.append(seq)
            budget -= end - start
            prefill = True
        return StepPlan(chunks, owners, sample, prefill, decode, special, num_decode)

    def _burst_steps(self, seq: SchedSeq, n: int, steps: int) -> int:
        """Decode steps for ``seq``'s next chunk (it holds ``n`` tokens, pages cover them).

        Positions ``n-1 .. n+k-2`` get K/V in a burst of ``k``: their pages are reserved
        now (tokens follow in :meth:`update`); when the pool cannot hold them the burst ends
        at the last page held instead (never a preemption for a burst). The length limit
        also ends it; EOS and stop ids are cut out of it in :meth:`update`.
        """
        k = min(steps, seq.limit - len(seq.output_ids))
        block = self.block_size
        held = seq.kv_pages * block
        if n + k - 1 <= held:
            return k
        try:
            self.kv.reserve(seq.seq_id, n + k - 1)
        except KVCacheExhaustedError:
            return held - n + 1
        old = seq.kv_pages
        seq.kv_pages = pages = -(-(n + k - 1) // block)  # pages_for, inlined
        seq.block_table = self.kv.block_table(seq.seq_id)
        if self.reserve_output and seq.final_pages > old:
            self._reserved -= min(pages, seq.final_pages) - old
        return k

    def _grow(self, seq: SchedSeq, n: int, failed: list[SchedSeq]) -> bool:
        """Hand ``seq``'s pending tokens to the KV manager so its pages cover ``n`` tokens.

        Preempts the youngest running sequence while the pool is full. Returns False when
        ``seq`` itself left the batch (preempted, or failed because nothing can be freed).
        """
        kv = self.kv
        while True:
            try:
                kv.append(seq.seq_id, seq.token_slice(seq.kv_tokens, n))
            except KVCacheExhaustedError as exc:
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1 and not self.waiting:
                    self.running.remove(seq)
                    self._finish(seq, "error", exc.to_protocol())
                    failed.append(seq)
                    return False
                self._preempt(victim)
                if victim is seq:
                    return False
                continue
            old = seq.kv_pages
            seq.kv_tokens = n
            seq.kv_pages = pages = self.pages_for(n)
            seq.block_table = kv.block_table(seq.seq_id)
            if self.reserve_output and seq.final_pages > old:
                self._reserved -= min(pages, seq.final_pages) - old
            return True

    def _preempt(self, seq: SchedSeq) -> None:
        """Free ``seq``'s pages and queue it first for recomputation."""
        self.running.remove(seq)
        self._release(seq, discard=False)
        seq.num_computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------------ update
