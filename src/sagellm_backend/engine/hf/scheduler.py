"""Iteration-level continuous batching for the HF engine core, in one worker thread.

:class:`Scheduler` owns a dedicated thread that runs the model: model compute never blocks
the asyncio event loop. Every *step* it

1. takes new requests and cancellations from its inbox;
2. admits waiting requests in arrival order while the batch has room (``max_batch_size``)
   and the KV manager can hold their tokens -- a request that does not fit *now* waits;
   with prefix caching, a request sharing a full first block with a prompt still being
   prefilled waits one step so that it reuses that prompt's pages instead of computing
   them again;
3. builds one :class:`~sagellm_backend.engine.hf.runner.SeqChunk` per running sequence:
   the decode token of every generating sequence, then prompt chunks (prefill starts at
   the cached-prefix boundary ``allocate()`` returned; long prompts are split so that a
   step computes at most ``max_num_batched_tokens`` tokens);
4. runs the model once over all of them, reports computed tokens to the KV manager
   (``mark_computed``: full blocks become reusable), samples one token per sequence whose
   prompt is done (greedy, or temperature/top-p with a per-request ``torch.Generator``),
   and delivers tokens and terminal results through each sequence's ``sink``.

A sequence leaves the batch when it produces EOS (unless ``ignore_eos``), reaches its
``max_tokens`` or the context length, is cancelled, or fails. When the KV pool runs out
while sequences grow, the most recently admitted sequence is preempted: its pages are
freed (its full blocks stay in the prefix cache) and it is re-queued first, to be
recomputed from its prompt and the tokens it already produced.

Invariants:
    * Every submitted sequence gets exactly one :class:`FinishEvent` through its sink
      (normal end, error, cancellation or engine stop) and no event after it.
    * After a sequence finishes, is cancelled or is preempted, it holds no KV pages; after
      :meth:`Scheduler.stop` returns True the KV manager holds no sequence of this
      scheduler.
    * An exception in a step fails every sequence in flight (running and waiting) with a
      protocol error (their KV is freed with ``discard=True``) and the thread keeps
      serving new requests.
    * Sinks are called from the worker thread; they must be cheap and thread-safe (the
      engine's sinks use ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sagellm_protocol import Error, ErrorCode

from sagellm_backend.engine.metrics import KVRequestStats, RequestTimeline, now
from sagellm_backend.errors import KVCacheExhaustedError, to_protocol_error

if TYPE_CHECKING:
    import torch

    from sagellm_backend.engine.runners.base import ModelRunner, SeqChunk
    from sagellm_backend.kv.manager import KVCacheManager

__all__ = [
    "FinishEvent",
    "GenSequence",
    "SamplingParams",
    "Scheduler",
    "SchedulerStats",
    "TokenEvent",
]

_log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "error"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling.

    Attributes:
        temperature: None or 0 -> greedy (argmax); > 0 -> sample from softmax(logits / T).
        top_p: nucleus sampling mass in (0, 1] (only when sampling).
        seed: seed of the request's ``torch.Generator`` (None: a fresh random seed).
    """

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy."""
        return self.temperature is None or self.temperature <= 0.0


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """Tokens a streaming sequence produced in one step."""

    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class FinishEvent:
    """The terminal result of a sequence (exactly one per sequence).

    Attributes:
        reason: ``"stop"`` (EOS), ``"length"`` (max_tokens / context) or ``"error"``.
        output_ids: every token produced (EOS included when it ended the sequence).
        error: the protocol error when ``reason == "error"``.
        kv: the sequence's KV figures when it held pages (from ``KVCacheManager.free``).
        cancelled: the consumer cancelled the request.
    """

    reason: FinishReason
    output_ids: list[int]
    error: Error | None = None
    kv: KVRequestStats | None = None
    cancelled: bool = False


SeqEvent = TokenEvent | FinishEvent


@dataclass(eq=False)
class GenSequence:
    """One request inside the scheduler.

    The engine fills the first block of fields; the rest belongs to the worker thread.

    Attributes:
        seq_id: unique id (also the KV manager's sequence id).
        prompt_ids: prompt tokens (non-empty).
        max_tokens: tokens to produce at most (``>= 1``; already capped by the engine).
        sampling: sampling parameters.
        ignore_eos: keep generating after EOS (benchmarks).
        stop_token_ids: further tokens that end the sequence with ``"stop"`` (honoured even
            with ``ignore_eos``).
        stream: deliver a :class:`TokenEvent` per step (else only the FinishEvent).
        sink: thread-safe callback receiving this sequence's events.
        timeline: instants of the request (scheduled and token times recorded here).
    """

    seq_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    ignore_eos: bool
    stream: bool
    sink: Callable[[SeqEvent], None]
    stop_token_ids: frozenset[int] = frozenset()
    timeline: RequestTimeline = field(default_factory=RequestTimeline)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    kv_tokens: int = 0
    has_kv: bool = False
    finished: bool = False
    preemptions: int = 0
    generator: Any = None

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
        return self.num_computed < self.num_tokens - 1 or not self.output_ids


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """Counters of a scheduler (a snapshot)."""

    steps: int
    waiting: int
    running: int
    preemptions: int
    finished: int
    failed_steps: int
    tokens_computed: int
    tokens_generated: int


class Scheduler:
    """Continuous batching over a model runner and a KV manager (see module docstring).

    Args:
        runner: the model runner.
        kv: the KV manager (its pool bounds how many tokens are resident).
        max_batch_size: most sequences in the running batch.
        max_num_batched_tokens: most tokens computed in one step (``>= max_batch_size``).
        max_context: longest sequence (prompt + output) the model handles.
        eos_token_ids: tokens that end a sequence (unless it ignores EOS).
        thread_init: called first thing in the worker thread (thread settings).
        name: thread name.
        idle_timeout_s: how long the idle worker sleeps between checks of its inbox.
    """

    def __init__(
        self,
        runner: ModelRunner,
        kv: KVCacheManager,
        *,
        max_batch_size: int,
        max_num_batched_tokens: int,
        max_context: int,
        eos_token_ids: Iterable[int],
        thread_init: Callable[[], None] | None = None,
        name: str = "sagellm-hf-scheduler",
        idle_timeout_s: float = 0.5,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_num_batched_tokens < max_batch_size:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= "
                f"max_batch_size ({max_batch_size})"
            )
        self.runner = runner
        self.kv = kv
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_context = max_context
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.block_size = kv.spec.block_size
        self._thread_init = thread_init
        self._name = name
        self._idle_timeout = idle_timeout_s
        self._prefix_dedup = bool(kv.enable_prefix_caching) and runner.uses_paged_kv
        self._cond = threading.Condition()
        self._inbox: list[GenSequence] = []
        self._cancels: set[str] = set()
        self._stop_requested = False
        self._thread: threading.Thread | None = None
        # Worker-owned state.
        self._waiting: collections.deque[GenSequence] = collections.deque()
        self._running: list[GenSequence] = []
        self._steps = 0
        self._preemptions = 0
        self._finished = 0
        self._failed_steps = 0
        self._tokens_computed = 0
        self._tokens_generated = 0
        self._device: Any = runner.device

    # ------------------------------------------------------------------ control
    @property
    def is_alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the worker thread.

        Raises:
            RuntimeError: already started.
        """
        if self._thread is not None:
            raise RuntimeError("scheduler already started")
        self._stop_requested = False
        self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Ask the worker to end every sequence and exit; wait up to ``timeout`` seconds.

        Sequences in flight get a FinishEvent with ``finish_reason="error"`` (UNAVAILABLE,
        retryable) once the step under way completes. Returns True when the thread has
        exited (then no sequence holds KV pages).
        """
        with self._cond:
            self._stop_requested = True
            self._cond.notify_all()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether a sequence of ``num_tokens`` tokens fits in the whole KV pool."""
        return math.ceil(num_tokens / self.block_size) <= self.kv.pool.num_pages

    def submit(self, seq: GenSequence) -> None:
        """Queue a sequence (thread-safe).

        Raises:
            KVCacheExhaustedError: prompt + max_tokens can never fit in the KV pool.
            RuntimeError: the scheduler is stopped.
        """
        total = len(seq.prompt_ids) + seq.max_tokens
        if not self.can_ever_fit(total):
            raise KVCacheExhaustedError(
                f"request needs {total} tokens of KV cache (prompt {len(seq.prompt_ids)} + "
                f"max_tokens {seq.max_tokens}) but the whole pool holds "
                f"{self.kv.pool.num_pages * self.block_size} tokens; lower max_tokens or "
                "give the engine a larger KV budget"
            )
        with self._cond:
            if self._stop_requested or self._thread is None:
                raise RuntimeError("the scheduler is not running")
            self._inbox.append(seq)
            self._cond.notify_all()

    def cancel(self, seq_id: str) -> None:
        """Remove a sequence at the next step, freeing its KV (thread-safe, idempotent)."""
        with self._cond:
            self._cancels.add(seq_id)
            self._cond.notify_all()

    def stats(self) -> SchedulerStats:
        """Counters (read without locking: a consistent-enough snapshot)."""
        return SchedulerStats(
            steps=self._steps,
            waiting=len(self._waiting) + len(self._inbox),
            running=len(self._running),
            preemptions=self._preemptions,
            finished=self._finished,
            failed_steps=self._failed_steps,
            tokens_computed=self._tokens_computed,
            tokens_generated=self._tokens_generated,
        )

    # ------------------------------------------------------------------ worker
    def _main(self) -> None:
        import torch

        # Everything, the final clean-up included, runs in inference mode: the runner's
        # per-sequence state (inference tensors) is updated when sequences are released.
        with torch.inference_mode():
            try:
                if self._thread_init is not None:
                    self._thread_init()
                self._loop()
            except BaseException as exc:
                _log.exception("HF scheduler thread crashed")
                self._terminate_all(to_protocol_error(exc))
                raise
            else:
                self._terminate_all(
                    Error(
                        code=ErrorCode.UNAVAILABLE,
                        message="the engine stopped before the request finished",
                        retryable=True,
                    )
                )

    def _loop(self) -> None:
        while True:
            with self._cond:
                while (
                    not self._inbox
                    and not self._cancels
                    and not self._stop_requested
                    and not self._running
                    and not self._waiting
                ):
                    self._cond.wait(self._idle_timeout)
                new, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, set()
                stopping = self._stop_requested
            self._waiting.extend(new)
            if cancels:
                self._apply_cancels(cancels)
            if stopping:
                return
            if not self._running and not self._waiting:
                continue
            try:
                progressed = self._step()
            except Exception as exc:
                self._failed_steps += 1
                _log.exception("HF engine step failed; failing every request in flight")
                self._fail_all(to_protocol_error(exc))
                continue
            if not progressed:
                with self._cond:
                    if not self._inbox and not self._cancels and not self._stop_requested:
                        self._cond.wait(0.01)

    # ------------------------------------------------------------------ one step
    def _step(self) -> bool:
        """Admit, compute and sample once; return whether any work was done."""
        self._admit()
        chunks, owners = self._build_chunks()
        if not chunks:
            return False
        t0 = now()
        logits = self.runner.execute(chunks)
        # Report written K/V first: a sequence finishing below frees its pages.
        for chunk, seq in zip(chunks, owners, strict=True):
            seq.num_computed = chunk.start + len(chunk.token_ids)
            self.kv.mark_computed(seq.seq_id, seq.num_computed)
            self._tokens_computed += len(chunk.token_ids)
        sampled = [seq for chunk, seq in zip(chunks, owners, strict=True) if chunk.need_logits]
        tokens, failures = self._sample(logits, sampled) if sampled else ([], {})
        t1 = now()
        self._steps += 1
        dt_ms = (t1 - t0) * 1000.0
        for chunk, seq in zip(chunks, owners, strict=True):
            if chunk.start < len(seq.prompt_ids) or not seq.output_ids:
                seq.timeline.prefill_ms += dt_ms
            else:
                seq.timeline.decode_ms += dt_ms
        for seq, tok in zip(sampled, tokens, strict=True):
            failure = failures.get(seq.seq_id)
            if failure is not None:  # only this request's sampler failed
                self._running.remove(seq)
                kv = self._release_kv(seq, discard=False)
                error = to_protocol_error(failure)
                self._finish(seq, FinishEvent("error", list(seq.output_ids), error, kv))
                continue
            self._emit(seq, tok, t1)
        return True

    def _admit(self) -> None:
        """Move waiting sequences into the batch while room and KV allow (FIFO)."""
        if not self._waiting:
            return
        budget = self.max_num_batched_tokens - sum(
            (s.num_tokens - s.num_computed) for s in self._running
        )
        pending_keys = (
            {self._first_block(s) for s in self._running if s.in_prefill}
            if self._prefix_dedup
            else set()
        )
        deferred: list[GenSequence] = []
        while self._waiting and len(self._running) < self.max_batch_size and budget > 0:
            seq = self._waiting.popleft()
            key = self._first_block(seq) if self._prefix_dedup else None
            if key is not None and key in pending_keys:
                deferred.append(seq)  # reuse that prompt's pages once they are written
                continue
            try:
                cached = self.kv.allocate(seq.seq_id, seq.token_slice(0, seq.num_tokens))
            except KVCacheExhaustedError:
                self._waiting.appendleft(seq)
                break
            seq.has_kv = True
            seq.kv_tokens = seq.num_tokens
            seq.num_computed = cached if self.runner.uses_paged_kv else 0
            seq.timeline.mark_scheduled()
            self._running.append(seq)
            budget -= seq.num_tokens - seq.num_computed
            if key is not None:
                pending_keys.add(key)
        self._waiting.extendleft(reversed(deferred))

    def _first_block(self, seq: GenSequence) -> tuple[int, ...] | None:
        if seq.num_tokens <= self.block_size:
            return None
        return tuple(seq.token_slice(0, self.block_size))

    def _build_chunks(self) -> tuple[list[SeqChunk], list[GenSequence]]:
        from sagellm_backend.engine.runners.base import SeqChunk

        chunks: list[SeqChunk] = []
        owners: list[GenSequence] = []
        budget = self.max_num_batched_tokens
        decoding = [s for s in self._running if not s.in_prefill]
        prefilling = [s for s in self._running if s.in_prefill]
        for seq in decoding:
            if seq not in self._running or not self._ensure_kv(seq):
                continue
            start = seq.num_computed
            chunks.append(
                SeqChunk(
                    seq.seq_id,
                    seq.token_slice(start, seq.num_tokens),
                    start,
                    self.kv.block_table(seq.seq_id),
                    True,
                )
            )
            owners.append(seq)
            budget -= seq.num_tokens - start
        for seq in prefilling:
            if budget <= 0:
                break
            if seq not in self._running:
                continue
            start = seq.num_computed
            end = min(seq.num_tokens, start + budget)
            chunks.append(
                SeqChunk(
                    seq.seq_id,
                    seq.token_slice(start, end),
                    start,
                    self.kv.block_table(seq.seq_id),
                    end == seq.num_tokens,
                )
            )
            owners.append(seq)
            budget -= end - start
        return chunks, owners

    def _ensure_kv(self, seq: GenSequence) -> bool:
        """Give ``seq`` pages for all its tokens, preempting younger sequences if needed.

        Returns False when ``seq`` itself was preempted (it is re-queued).
        """
        while seq.kv_tokens < seq.num_tokens:
            try:
                self.kv.append(seq.seq_id, seq.token_slice(seq.kv_tokens, seq.num_tokens))
                seq.kv_tokens = seq.num_tokens
            except KVCacheExhaustedError:
                victim = self._running[-1]
                self._preempt(victim)
                if victim is seq:
                    return False
        return True

    def _preempt(self, seq: GenSequence) -> None:
        """Free ``seq``'s pages and queue it first for recomputation."""
        self._running.remove(seq)
        self._release_kv(seq, discard=False)
        seq.num_computed = 0
        seq.preemptions += 1
        self._preemptions += 1
        self._waiting.appendleft(seq)

    # ------------------------------------------------------------------ sampling
    def _sample(
        self, logits: torch.Tensor, seqs: list[GenSequence]
    ) -> tuple[list[int], dict[str, Exception]]:
        """One token per row: argmax for greedy rows, a draw for the others.

        Returns the tokens and, by seq_id, the error of any row whose sampling failed (that
        request alone fails; the batch goes on).
        """
        tokens: list[int] = logits.argmax(dim=-1).tolist()
        failures: dict[str, Exception] = {}
        for i, seq in enumerate(seqs):
            if seq.sampling.greedy:
                continue
            try:
                tokens[i] = self._draw(logits[i], seq)
            except Exception as exc:
                _log.warning("sampling for %s failed: %s", seq.seq_id, exc)
                failures[seq.seq_id] = exc
        return tokens, failures

    def _draw(self, row: torch.Tensor, seq: GenSequence) -> int:
        """Sample from ``softmax(row / temperature)`` restricted to the top-p nucleus."""
        import torch

        params = seq.sampling
        assert params.temperature is not None
        # Shift so the largest logit is 0 before dividing: a tiny temperature then sends
        # the others to -inf (a sharp but valid distribution) instead of overflowing.
        row = (row - row.max()) / params.temperature
        if params.top_p is not None and params.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            cum = torch.cumsum(probs, dim=-1)
            # Drop tokens once the mass before them already reaches top_p; the most likely
            # token always stays (top_p may round to 0 in the logits' dtype).
            drop = (cum - probs) >= params.top_p
            drop[0] = False
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
        probs = torch.softmax(row, dim=-1)
        if seq.generator is None:
            seq.generator = self._make_generator(params.seed)
        return int(torch.multinomial(probs, 1, generator=seq.generator).item())

    def _make_generator(self, seed: int | None) -> Any:
        import random

        import torch

        gen = torch.Generator(device=self._device)
        gen.manual_seed(seed if seed is not None else random.SystemRandom().getrandbits(63))
        return gen

    # ------------------------------------------------------------------ results
    def _emit(self, seq: GenSequence, token: int, t: float) -> None:
        seq.output_ids.append(token)
        seq.timeline.mark_tokens(1, t)
        self._tokens_generated += 1
        reason: FinishReason | None = None
        if (not seq.ignore_eos and token in self.eos_token_ids) or token in seq.stop_token_ids:
            reason = "stop"
        elif len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= self.max_context:
            reason = "length"
        if seq.stream:
            seq.sink(TokenEvent((token,)))
        if reason is not None:
            self._running.remove(seq)
            kv = self._release_kv(seq, discard=False)
            self._finish(seq, FinishEvent(reason, list(seq.output_ids), None, kv))

    def _release_kv(self, seq: GenSequence, *, discard: bool) -> KVRequestStats | None:
        stats = None
        if seq.has_kv:
            seq.has_kv = False
            seq.kv_tokens = 0
            try:
                stats = self.kv.free(seq.seq_id, discard=discard)
            except Exception:  # pragma: no cover - accounting bug; never hang consumers
                _log.exception("freeing the KV of %s failed", seq.seq_id)
        try:
            self.runner.release(seq.seq_id)
        except Exception:  # pragma: no cover - never leave stale per-sequence state
            _log.exception("releasing runner state of %s failed; resetting it", seq.seq_id)
            self.runner.reset()
        return stats

    def _finish(self, seq: GenSequence, event: FinishEvent) -> None:
        if seq.finished:
            return
        seq.finished = True
        self._finished += 1
        seq.timeline.mark_completed()
        try:
            seq.sink(event)
        except Exception:  # pragma: no cover - a sink must not kill the worker
            _log.exception("delivering the result of %s failed", seq.seq_id)

    def _apply_cancels(self, seq_ids: set[str]) -> None:
        for seq in [s for s in (*self._running, *self._waiting) if s.seq_id in seq_ids]:
            if seq in self._running:
                self._running.remove(seq)
            else:
                self._waiting.remove(seq)
            kv = self._release_kv(seq, discard=False)
            self._finish(
                seq,
                FinishEvent(
                    "error",
                    list(seq.output_ids),
                    Error(code=ErrorCode.UNAVAILABLE, message="request cancelled", retryable=True),
                    kv,
                    cancelled=True,
                ),
            )

    def _fail_all(self, error: Error) -> None:
        seqs = [*self._running, *self._waiting]
        self._running.clear()
        self._waiting.clear()
        for seq in seqs:
            kv = self._release_kv(seq, discard=True)
            self._finish(seq, FinishEvent("error", list(seq.output_ids), error, kv))

    def _terminate_all(self, error: Error) -> None:
        with self._cond:
            self._stop_requested = True
            new, self._inbox = self._inbox, []
            self._cancels = set()
        self._waiting.extend(new)
        self._fail_all(error)
