"""MockRunner: a simulated model behind the runner interface (no torch, no dependencies).

The simulated model: the next token after a context is a pure function of the whole
context (prompt and generated tokens), so the same prompt always yields the same greedy
output, a preempted and recomputed sequence continues exactly where it was, and output
``i`` of a prompt never depends on what else is in the batch. Every row is returned as
:class:`~sagellm_backend.engine.sched.sampler.SparseLogits`: the most likely token (a
spaced word of the :class:`~sagellm_backend.engine.mock.tokenizer.MockTokenizer`) and, when
the sampler asks (temperature, top-k, top-p, repetition penalty), eight candidate words
with falling logits, so sampling settings and seeds act on the mock as on a real model.

How the model works: its state after a context is a pair ``(anchor, j)``. The greedy
continuation of an anchor is a run of :data:`ORBIT` tokens, read from a fixed pseudo-random
table of the vocabulary's words at offset ``anchor mod table size`` (an *orbit*); ``j`` counts
the orbit's tokens the context has followed. A token that is the orbit's next one advances
``j``; any other token (a sampled non-top token, EOS) -- and the last token of an orbit, and
every prompt token (positions below the chunk's ``prompt_len``) -- starts a new orbit:
``anchor = hash((anchor, token))``, ``j = 0``. So the state is a fold over the whole
context (a prompt folds as a plain hash chain), while a greedy run of ``k`` tokens is a
slice of the table (no per-token work; see multi-step decoding below).

Simulated time: :attr:`MockRunner.last_step_seconds` is what the step just computed would
take -- ``ttft_ms`` when it computes prompt tokens plus ``latency_ms`` when it decodes, plus
seeded jitter and every ``slow_step_every``-th step ``slow_step_ms`` more. The driver waits
that long (the runner itself never sleeps).

Faults: with ``failure_rate`` a sequence is doomed when its prompt is first seen (a draw of
the runner's ``random.Random(seed)``, so the same arrivals repeat exactly) and its first
logits row is an error; with ``eos_probability`` a row is EOS with that chance
(deterministic per state).

Multi-step decoding: with no simulated time at all (``latency_ms``, ``ttft_ms``,
``jitter_ms`` and slow steps all zero) a step has no duration a consumer could observe, so
the runner declares :attr:`MockRunner.max_decode_steps` = :data:`BURST_STEPS` and runs a
chunk's ``num_steps`` decode steps in one call: each token is the top token of the context
so far, fed back as the next input -- exactly the tokens single steps give (EOS draws
included), returned as one list in the chunk's row. With any simulated time it declares 1,
so every token keeps its own step and its own timestamp.

Invariants: per-sequence state is one ``(anchor, j)`` pair, rebuilt from the root state
whenever a chunk starts at position 0; :meth:`release` forgets it. The table depends only
on the vocabulary (one per word count, shared by every runner of a process).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence

from sagellm_backend.engine.mock.tokenizer import MockTokenizer
from sagellm_backend.engine.runners.base import SeqChunk
from sagellm_backend.engine.sched.sampler import SparseLogits
from sagellm_backend.errors import BackendNotAvailableError

__all__ = ["BURST_STEPS", "ORBIT", "InjectedFailureError", "MockRunner"]

_MASK53 = (1 << 53) - 1


class InjectedFailureError(BackendNotAvailableError):
    """A simulated failure of one request (UNAVAILABLE, retryable)."""

    retryable = True


_NUM_CANDIDATES = 8

#: Most decode steps of one chunk in one call at zero simulated time (the scheduler also
#: ends a burst at the sequence's last page).
BURST_STEPS = 64
#: Tokens of one orbit (a greedy run read from the table; see the module docstring).
ORBIT = 64
_LAST = ORBIT - 1
#: Distinct orbit offsets of the token table (a power of two: offset = anchor & _MASK).
_TABLE_SIZE = 1 << 15
_MASK = _TABLE_SIZE - 1
#: The state before any token.
_ROOT = (0, 0)
# Tags that keep the hashes of EOS draws and candidates apart from transition hashes.
_EOS_TAG = -1
_CANDIDATE_TAG = -2

State = tuple[int, int]


@functools.lru_cache(maxsize=8)
def _token_table(word0: int, n_words: int) -> list[int]:
    """The greedy tokens of every orbit: orbit ``o`` is ``table[o : o + ORBIT]``.

    Ints and tuples of ints hash the same in every process, so the table (and every output)
    is the same across runs.
    """
    return [word0 + hash((i, 0x51A7)) % n_words for i in range(_TABLE_SIZE + ORBIT)]


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
        self._state: dict[str, State] = {}
        self._doomed: set[str] = set()
        self._n_words = tokenizer.num_output_words
        self._word0 = MockTokenizer.WORD_OFFSET
        self._table = _token_table(self._word0, self._n_words)
        timed = latency_ms > 0 or ttft_ms > 0 or jitter_ms > 0
        timed = timed or bool(slow_step_every and slow_step_ms > 0)
        #: decode steps one chunk may run per call (see the module docstring)
        self.max_decode_steps = 1 if timed else BURST_STEPS

    def execute(self, chunks: Sequence[SeqChunk]) -> SparseLogits:
        """Advance each chunk's state; one row per chunk that asks (a burst: its tokens)."""
        self.steps += 1
        state = self._state
        table = self._table
        doomed = self._doomed
        # no faults and no EOS draws: the top token is the table entry of the state
        plain = self.eos_probability <= 0 and self.failure_rate <= 0 and not doomed
        top: list[int] = []
        rows: list[State] = []
        errors: dict[int, BaseException] | None = None
        prefill = decode = False
        for c in chunks:
            sid = c.seq_id
            toks = c.token_ids
            st = state.get(sid)
            if st is not None and c.start and len(toks) == 1:  # a decode step
                decode = True
                h, j = st = _next_state(table, *st, toks[0])
                k = c.num_steps
                if k > 1:  # a burst: k tokens, each fed back as the next input
                    burst, st = _greedy_run(table, h, j, k) if plain else self._run(h, j, k)
                    state[sid] = st
                    rows.append(st)
                    top.append(burst)  # type: ignore[arg-type]
                    continue
                state[sid] = st
            else:
                prefill = True
                st = self._fold(sid, c, st)
            if not c.need_logits:
                continue
            if doomed and sid in doomed:
                if errors is None:
                    errors = {}
                errors[len(top)] = InjectedFailureError(
                    f"injected failure (simulate_failure_rate={self.failure_rate})"
                )
            rows.append(st)
            top.append(table[(st[0] & _MASK) + st[1]] if plain else self._top(st))
        ms = (self.ttft_ms if prefill else 0.0) + (self.latency_ms if decode else 0.0)
        if self.jitter_ms > 0:
            ms += self.rng.uniform(0.0, self.jitter_ms)
        if self.slow_step_every and self.steps % self.slow_step_every == 0:
            ms += self.slow_step_ms
        self.last_step_seconds = ms / 1000.0
        word0 = self._word0
        n_words = self._n_words

        def expand(row: int) -> tuple[list[int], list[float]]:
            h, j = rows[row]
            key = hash((h, j, _CANDIDATE_TAG))
            ids = [top[row]]
            for c in range(2, 2 + 2 * _NUM_CANDIDATES):
                if len(ids) == _NUM_CANDIDATES:
                    break
                cand = word0 + hash((key, c)) % n_words
                if cand not in ids:
                    ids.append(cand)
            return ids, [-0.5 * k for k in range(len(ids))]

        return SparseLogits(top, expand, errors)

    def _top(self, st: State) -> int:
        """The most likely token in state ``st`` (EOS draws included)."""
        h, j = st
        eos_p = self.eos_probability
        if eos_p > 0 and (hash((h, j, _EOS_TAG)) & _MASK53) * (1.0 / (1 << 53)) < eos_p:
            return MockTokenizer.EOS_ID
        return self._table[(h & _MASK) + j]

    def _run(self, h: int, j: int, k: int) -> tuple[list[int], State]:
        """``k`` greedy tokens from state ``(h, j)``, one at a time (EOS draws included).

        Returns the tokens and the state in which the last one was produced.
        """
        table = self._table
        st = (h, j)
        out: list[int] = []
        while True:
            t = self._top(st)
            out.append(t)
            if len(out) == k:
                return out, st
            st = _next_state(table, *st, t)

    def _fold(self, sid: str, c: SeqChunk, st: State | None) -> State:
        """The state after a prompt (or recompute) chunk; draws the fault at position 0.

        A prompt token always starts a new orbit (it is not the model's output), so the
        prompt part folds as a plain hash chain; generated tokens (a chunk recomputed after
        preemption) follow :func:`_next_state`, as when they were decoded.
        """
        if st is None or c.start == 0:
            st = _ROOT
            if (
                self.failure_rate > 0
                and sid not in self._doomed
                and self.rng.random() < self.failure_rate
            ):
                self._doomed.add(sid)
        h, j = st
        toks = c.token_ids
        in_prompt = c.prompt_len - c.start
        if in_prompt > 0:
            for t in toks if in_prompt >= len(toks) else toks[:in_prompt]:
                h = hash((h, t))
            j = 0
            toks = toks[in_prompt:]
        if toks:
            table = self._table
            for t in toks:  # _next_state, inlined
                if t != table[(h & _MASK) + j] or j == _LAST:
                    h = hash((h, t))
                    j = 0
                else:
                    j += 1
        st = self._state[sid] = (h, j)
        return st

    def release(self, seq_id: str) -> None:
        """Forget the sequence's state (and whether it is doomed)."""
        self._state.pop(seq_id, None)
        self._doomed.discard(seq_id)

    def reset(self) -> None:
        """Forget every sequence."""
        self._state.clear()
        self._doomed.clear()


def _next_state(table: list[int], h: int, j: int, t: int) -> State:
    """The state after token ``t`` in state ``(h, j)``: the model's one rule.

    The orbit's next token advances ``j``; any other token, and the orbit's last one, starts
    a new orbit.
    """
    if t != table[(h & _MASK) + j] or j == _LAST:
        return (hash((h, t)), 0)
    return (h, j + 1)


def _greedy_run(table: list[int], h: int, j: int, k: int) -> tuple[list[int], State]:
    """``k`` greedy tokens from state ``(h, j)`` without EOS draws: slices of the table.

    The same tokens as ``k`` single steps (the last token of an orbit starts the next one,
    as in a step). Returns the tokens and the state in which the last one was produced.
    """
    o = h & _MASK
    if j + k <= ORBIT:
        return table[o + j : o + j + k], (h, j + k - 1)
    out = table[o + j : o + ORBIT]
    while True:
        h = hash((h, out[-1]))
        o = h & _MASK
        need = k - len(out)
        if need <= ORBIT:
            out += table[o : o + need]
            return out, (h, need - 1)
        out += table[o : o + ORBIT]
