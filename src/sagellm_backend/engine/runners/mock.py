"""MockRunner: a simulated model behind the runner interface (no torch, no dependencies).

The simulated model: the next token after a context is a pure function of the whole
context (prompt and generated tokens), so the same prompt always yields the same greedy
output, a preempted and recomputed sequence continues exactly where it was, and output
``i`` of a prompt never depends on what else is in the batch. Every row is returned as
:class:`~sagellm_backend.engine.sched.sampler.SparseLogits`: the most likely token (a
spaced word of the :class:`~sagellm_backend.engine.mock.tokenizer.MockTokenizer`) and, when
the sampler asks (temperature, top-k, top-p, repetition penalty), eight candidate words
with falling logits, so sampling settings and seeds act on the mock as on a real model.

Simulated time: :attr:`MockRunner.last_step_seconds` is what the step just computed would
take -- ``ttft_ms`` when it computes prompt tokens plus ``latency_ms`` when it decodes, plus
seeded jitter and every ``slow_step_every``-th step ``slow_step_ms`` more. The driver waits
that long (the runner itself never sleeps).

Faults: with ``failure_rate`` a sequence is doomed when its prompt is first seen (a draw of
the runner's ``random.Random(seed)``, so the same arrivals repeat exactly) and its first
logits row is an error; with ``eos_probability`` a row is EOS with that chance
(deterministic per context).

Multi-step decoding: with no simulated time at all (``latency_ms``, ``ttft_ms``,
``jitter_ms`` and slow steps all zero) a step has no duration a consumer could observe, so
the runner declares :attr:`MockRunner.max_decode_steps` = :data:`BURST_STEPS` and runs a
chunk's ``num_steps`` decode steps in one call: each token is the top token of the context
so far, fed back as the next input -- exactly the tokens single steps give (EOS draws
included), returned as one list in the chunk's row. With any simulated time it declares 1,
so every token keeps its own step and its own timestamp.

Invariants: per-sequence state is one integer (the context hash), rebuilt from position 0
whenever a chunk starts there; :meth:`release` forgets it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from sagellm_backend.engine.mock.tokenizer import MockTokenizer
from sagellm_backend.engine.runners.base import SeqChunk
from sagellm_backend.engine.sched.sampler import SparseLogits
from sagellm_backend.errors import BackendNotAvailableError

__all__ = ["BURST_STEPS", "InjectedFailureError", "MockRunner"]

_MASK53 = (1 << 53) - 1


class InjectedFailureError(BackendNotAvailableError):
    """A simulated failure of one request (UNAVAILABLE, retryable)."""

    retryable = True


_NUM_CANDIDATES = 8

#: Most decode steps of one chunk in one call at zero simulated time (the scheduler also
#: ends a burst at the sequence's last page).
BURST_STEPS = 64


class MockRunner:
    """The simulated model (see the module docstring).

    Args:
        tokenizer: the vocabulary the model speaks.
        latency_ms: time of a decode step.
        ttft_ms: time of a step that computes prompt tokens.
        jitter_ms: uniform extra time ``[0, jitter_ms]`` per step.
        slow_step_every / slow_step_ms: every N-th step takes ``slow_step_ms`` longer.
        failure_rate: chance that a sequence fails at its first logits row.
        eos_probability: chance that a row's top token is EOS.
        seed: seed of the jitter and fault generator.
    """

    name = "mock"
    uses_paged_kv = False
    device = "mock"

    def __init__(
        self,
        tokenizer: MockTokenizer,
        *,
        latency_ms: float = 0.0,
        ttft_ms: float = 0.0,
        jitter_ms: float = 0.0,
        slow_step_every: int = 0,
        slow_step_ms: float = 0.0,
        failure_rate: float = 0.0,
        eos_probability: float = 0.0,
        seed: int | None = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.latency_ms = latency_ms
        self.ttft_ms = ttft_ms
        self.jitter_ms = jitter_ms
        self.slow_step_every = slow_step_every
        self.slow_step_ms = slow_step_ms
        self.failure_rate = failure_rate
        self.eos_probability = eos_probability
        self.rng = random.Random(seed)
        self.steps = 0
        self.last_step_seconds = 0.0
        self._state: dict[str, int] = {}
        self._doomed: set[str] = set()
        self._n_words = tokenizer.num_output_words
        self._word0 = MockTokenizer.WORD_OFFSET
        timed = latency_ms > 0 or ttft_ms > 0 or jitter_ms > 0
        timed = timed or bool(slow_step_every and slow_step_ms > 0)
        #: decode steps one chunk may run per call (see the module docstring)
        self.max_decode_steps = 1 if timed else BURST_STEPS

    def execute(self, chunks: Sequence[SeqChunk]) -> SparseLogits:
        """Advance each chunk's context hash; one logits row per chunk that asks."""
        self.steps += 1
        state = self._state
        n_words = self._n_words
        word0 = self._word0
        eos_p = self.eos_probability
        top: list[int] = []
        hashes: list[int] = []
        errors: dict[int, BaseException] | None = None
        prefill = decode = False
        doomed = self._doomed
        if eos_p <= 0 and self.failure_rate <= 0 and not doomed:
            # the common case (no faults, no EOS draws): the same hashes, a tighter loop
            fold = self._fold
            for c in chunks:
                sid = c.seq_id
                toks = c.token_ids
                h = state.get(sid)
                if h is not None and c.start and len(toks) == 1:
                    decode = True
                    h = state[sid] = hash((h, toks[0]))
                    k = c.num_steps
                    if k > 1:  # a burst: feed each top token back
                        t = word0 + h % n_words
                        burst = [t]
                        add = burst.append
                        for _ in range(k - 1):
                            h = hash((h, t))
                            t = word0 + h % n_words
                            add(t)
                        state[sid] = h
                        hashes.append(h)
                        top.append(burst)  # type: ignore[arg-type]
                        continue
                else:
                    prefill = True
                    h = fold(sid, c, h)
                if c.need_logits:
                    hashes.append(h)
                    top.append(word0 + h % n_words)
            chunks = ()
        for c in chunks:
            sid = c.seq_id
            toks = c.token_ids
            h = state.get(sid)
            if len(toks) == 1 and c.start and h is not None:  # a decode step
                decode = True
                h = hash((h, toks[0]))
                state[sid] = h
                if c.num_steps > 1:
                    h = self._burst(sid, h, c.num_steps, top)
                    hashes.append(h)
                    continue
                if not c.need_logits:
                    continue
            else:
                prefill = True
                h = self._fold(sid, c, h)
                if not c.need_logits:
                    continue
            if doomed and sid in doomed:
                if errors is None:
                    errors = {}
                errors[len(top)] = InjectedFailureError(
                    f"injected failure (simulate_failure_rate={self.failure_rate})"
                )
            hashes.append(h)
            top.append(self._top(h))
        ms = (self.ttft_ms if prefill else 0.0) + (self.latency_ms if decode else 0.0)
        if self.jitter_ms > 0:
            ms += self.rng.uniform(0.0, self.jitter_ms)
        if self.slow_step_every and self.steps % self.slow_step_every == 0:
            ms += self.slow_step_ms
        self.last_step_seconds = ms / 1000.0

        def expand(row: int) -> tuple[list[int], list[float]]:
            h = hashes[row]
            ids = [top[row]]
            for j in range(2, 2 + 2 * _NUM_CANDIDATES):
                if len(ids) == _NUM_CANDIDATES:
                    break
                cand = word0 + hash((h, j)) % n_words
                if cand not in ids:
                    ids.append(cand)
            return ids, [-0.5 * k for k in range(len(ids))]

        return SparseLogits(top, expand, errors)

    def _top(self, h: int) -> int:
        """The most likely token after the context with hash ``h`` (EOS draws included)."""
        eos_p = self.eos_probability
        if eos_p > 0 and (hash((h, 1)) & _MASK53) * (1.0 / (1 << 53)) < eos_p:
            return MockTokenizer.EOS_ID
        return self._word0 + h % self._n_words

    def _burst(self, sid: str, h: int, k: int, top: list[int]) -> int:
        """Run ``k`` decode steps from hash ``h``; append the token list as one row."""
        t = self._top(h)
        burst = [t]
        for _ in range(k - 1):
            h = hash((h, t))
            t = self._top(h)
            burst.append(t)
        self._state[sid] = h
        top.append(burst)  # type: ignore[arg-type]
        return h

    def _fold(self, sid: str, c: SeqChunk, h: int | None) -> int:
        """The context hash after a prompt (or recompute) chunk; draws the fault at start."""
        if h is None or c.start == 0:
            h = 0
            if (
                self.failure_rate > 0
                and sid not in self._doomed
                and self.rng.random() < self.failure_rate
            ):
                self._doomed.add(sid)
        for t in c.token_ids:
            h = hash((h, t))
        self._state[sid] = h
        return h

    def release(self, seq_id: str) -> None:
        """Forget the sequence's context hash (and whether it is doomed)."""
        self._state.pop(seq_id, None)
        self._doomed.discard(seq_id)

    def reset(self) -> None:
        """Forget every sequence."""
        self._state.clear()
        self._doomed.clear()
