"""Recording a computed step: tokens appended, stop conditions, finishing and freeing.

:class:`StepRecorder` is the half of :class:`~sagellm_backend.engine.sched.scheduler.
Scheduler` that runs after the runner (``update`` and what it needs); the scheduler module
holds the half that runs before it (admission, planning, growth, preemption). Both halves
share the state the :class:`Scheduler` constructor sets up, declared below.

Invariants (with the scheduler's): a sequence finishes exactly once (:meth:`_finish` is
idempotent), and a finished one holds no KV pages (:meth:`_release` runs in ``_finish``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from sagellm_protocol import Error

from sagellm_backend.engine.sched.seq import FinishReason, SchedSeq, SchedulerStats, StepPlan
from sagellm_backend.errors import to_protocol_error
from sagellm_backend.kv.stats import KVRequestStats

if TYPE_CHECKING:
    from sagellm_backend.kv.manager import KVCacheManager

__all__ = ["StepRecorder"]

#: Extra tokens decoded before a stop string's window (tokens that decode to no text).
_STOP_MARGIN_TOKENS = 16


class StepRecorder:
    """Step recording for :class:`~sagellm_backend.engine.sched.scheduler.Scheduler`."""

    kv: KVCacheManager
    block_size: int
    eos_token_ids: frozenset[int]
    keep_eos: bool
    reserve_output: bool
    decode: Callable[[list[int]], str] | None
    on_release: Callable[[str], None] | None
    running: list[SchedSeq]
    waiting: Sequence[SchedSeq]
    _caching: bool
    _reserved: int

    def _reset_counters(self) -> None:
        """Zero the counters :meth:`stats` reports (the constructor calls it)."""
        self.steps = 0
        self.preemptions = 0
        self.completed = 0
        self.failed = 0
        self.cancelled = 0
        self.failed_steps = 0
        self.tokens_computed = 0
        self.tokens_generated = 0

    def update(
        self,
        plan: StepPlan,
        tokens: Sequence[int | list[int] | BaseException],
        t0: float,
        t1: float,
    ) -> list[SchedSeq]:
        """Record a computed step and its sampled tokens; return the sequences it finished.

        Args:
            plan: the plan :meth:`schedule` returned (computed by the runner).
            tokens: one token, or the row's sampling exception, per ``plan.sample_seqs``; for
                a decode chunk with ``num_steps > 1`` the list of tokens of its burst.
            t0: when the step started (monotonic seconds).
            t1: when its tokens were ready.
        """
        self.steps += 1
        dt_ms = (t1 - t0) * 1000.0
        caching = self._caching
        block = self.block_size
        kv = self.kv
        computed = generated = 0
        done: list[SchedSeq] = []
        chunks = plan.chunks
        seqs = plan.seqs
        nd = plan.num_decode
        # Decode chunks (the bulk of the work): one token each, row i belongs to chunk i.
        for i in range(nd):
            seq = seqs[i]
            tok = tokens[i]
            tl = seq.timeline
            tl.decode_ms += dt_ms
            if isinstance(tok, list):  # a multi-step burst (its own bookkeeping)
                n_new, n_done = self._take_burst(seq, chunks[i].start, tok, t1, done)
                generated += n_new
                computed += n_done - 1
                continue
            end = chunks[i].start + 1
            if caching and not end % block:
                if seq.kv_tokens < end:
                    kv.append(seq.seq_id, seq.token_slice(seq.kv_tokens, end))
                    seq.kv_tokens = end
                kv.mark_computed(seq.seq_id, end)
            seq.num_computed = end
            if tok.__class__ is int and tok not in seq.stops:
                out = seq.output_ids
                out.append(tok)
                tl.token_times.append(t1)
                generated += 1
                if len(out) >= seq.limit:
                    reason: FinishReason = "length"
                elif seq.stop_strings and self._stop_string_hit(seq):
                    reason = "stop"
                else:
                    continue
                self.running.remove(seq)
                self._finish(seq, reason, None, t=t1)
                done.append(seq)
                continue
            generated += self._take(seq, tok, t1, done)
        computed += nd
        row = nd
        for j in range(nd, len(chunks)):
            chunk = chunks[j]
            seq = seqs[j]
            k = len(chunk.token_ids)
            computed += k
            end = chunk.start + k
            tl = seq.timeline
            if k > 1 or not seq.output_ids:
                tl.prefill_ms += dt_ms
            else:
                tl.decode_ms += dt_ms
            if caching and end // block > seq.num_computed // block:
                if seq.kv_tokens < end:
                    kv.append(seq.seq_id, seq.token_slice(seq.kv_tokens, end))
                    seq.kv_tokens = end
                kv.mark_computed(seq.seq_id, end)
            seq.num_computed = end
            if not chunk.need_logits:
                continue
            tok = tokens[row]
            row += 1
            assert not isinstance(tok, list), "a prompt chunk yields one token"
            generated += self._take(seq, tok, t1, done)
        self.tokens_computed += computed
        self.tokens_generated += generated
        return done

    def _take_burst(
        self, seq: SchedSeq, start: int, toks: list[int], t1: float, done: list[SchedSeq]
    ) -> tuple[int, int]:
        """Record a decode burst of ``len(toks)`` steps from position ``start``.

        The tokens are kept up to the first EOS / stop token, which is handled as a single
        step would handle it (the sequence then ends; the K/V the runner computed past it
        belong to tokens nobody keeps and are not counted). Returns (tokens generated,
        positions computed).
        """
        k = len(toks)
        cut = k
        stops = seq.stops
        if stops and not stops.isdisjoint(toks):
            cut = next(j for j, t in enumerate(toks) if t in stops)
        out = seq.output_ids
        if cut:
            out.extend(toks if cut == k else toks[:cut])
            seq.timeline.token_times.extend([t1] * cut)
        end = start + (cut + 1 if cut < k else k)
        seq.num_computed = end
        if cut < k:
            return cut + self._take(seq, toks[cut], t1, done), end - start
        if len(out) >= seq.limit:
            self.running.remove(seq)
            self._finish(seq, "length", None, t=t1)
            done.append(seq)
        elif self._caching and end // self.block_size > start // self.block_size:
            if seq.kv_tokens < end:
                self.kv.append(seq.seq_id, seq.token_slice(seq.kv_tokens, end))
                seq.kv_tokens = end
            self.kv.mark_computed(seq.seq_id, end)
        return cut, end - start

    def _take(
        self, seq: SchedSeq, tok: int | BaseException, t1: float, done: list[SchedSeq]
    ) -> int:
        """Append a sampled token (or fail on a row error); return the tokens generated."""
        if not isinstance(tok, int):
            self.running.remove(seq)
            self._finish(seq, "error", to_protocol_error(tok))
            done.append(seq)
            return 0
        eos = self.eos_token_ids
        out = seq.output_ids
        reason: FinishReason | None = None
        generated = 0
        if (tok in eos and not seq.ignore_eos) or tok in seq.stop_token_ids:
            reason = "stop"
            if self.keep_eos or tok not in eos:
                out.append(tok)
                seq.timeline.token_times.append(t1)
                generated = 1
        else:
            out.append(tok)
            seq.timeline.token_times.append(t1)
            generated = 1
            if len(out) >= seq.limit:
                reason = "length"
            elif seq.stop_strings and self._stop_string_hit(seq):
                reason = "stop"
        if reason is not None:
            self.running.remove(seq)
            self._finish(seq, reason, None, t=t1)
            done.append(seq)
        return generated

    def _stop_string_hit(self, seq: SchedSeq) -> bool:
        """Whether ``seq``'s output text now contains one of its stop strings.

        Called after every token of a sequence with stop strings (they never run in
        bursts), so a match that was not there before ends in the newest text: only the
        tail of the output is decoded, enough tokens for the longest stop string even if
        every character took four byte tokens, plus a margin for tokens that decode to
        nothing. That keeps each check O(stop length), not O(output length).
        """
        if self.decode is None:
            return False
        out = seq.output_ids
        window = 4 * max(map(len, seq.stop_strings)) + _STOP_MARGIN_TOKENS
        text = self.decode(out[-window:] if len(out) > window else out)
        return any(x in text for x in seq.stop_strings)

    # ------------------------------------------------------------------ release
    def _release(self, seq: SchedSeq, *, discard: bool) -> KVRequestStats | None:
        """Free ``seq``'s pages and reservation (idempotent); return its KV stats."""
        if not seq.has_kv:
            return None
        seq.has_kv = False
        if self.reserve_output and seq.final_pages > seq.kv_pages:
            self._reserved -= seq.final_pages - seq.kv_pages
        seq.kv_pages = 0
        seq.block_table = []
        try:
            stats = self.kv.free(seq.seq_id, discard=discard)
        finally:
            seq.kv_tokens = 0
            if self.on_release is not None:
                self.on_release(seq.seq_id)
        return stats

    def _finish(
        self,
        seq: SchedSeq,
        reason: FinishReason,
        error: Error | None,
        *,
        discard: bool = False,
        t: float | None = None,
    ) -> None:
        if seq.finished:
            return
        if seq.has_kv and reason != "error":
            # the KV manager learns the tokens whose K/V were written (all but the last)
            held = seq.num_tokens - 1
            if seq.kv_tokens < held:
                self.kv.append(seq.seq_id, seq.token_slice(seq.kv_tokens, held))
                seq.kv_tokens = held
            if self._caching:
                self.kv.mark_computed(seq.seq_id, min(seq.num_computed, held))
        seq.kv_stats = self._release(seq, discard=discard)
        seq.finished = True
        seq.finish_reason = reason
        seq.error = error
        seq.timeline.mark_completed(t)
        if reason != "error":
            self.completed += 1
        elif seq.cancelled:
            self.cancelled += 1
        else:
            self.failed += 1

    def stats(self) -> SchedulerStats:
        """Counters (a snapshot; read without locking)."""
        return SchedulerStats(
            steps=self.steps,
            waiting=len(self.waiting),
            running=len(self.running),
            preemptions=self.preemptions,
            finished=self.completed + self.failed + self.cancelled,
            completed=self.completed,
            failed=self.failed,
            cancelled=self.cancelled,
            failed_steps=self.failed_steps,
            tokens_computed=self.tokens_computed,
            tokens_generated=self.tokens_generated,
        )
