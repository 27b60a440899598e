"""MockRunner, the simulated model: bursts, recomputation and prompt dependence."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_backend.engine.mock.tokenizer import MockTokenizer
from sagellm_backend.engine.runners.base import SeqChunk
from sagellm_backend.engine.runners.mock import ORBIT, MockRunner

TOK = MockTokenizer(32000)
WORD0 = MockTokenizer.WORD_OFFSET
prompts = st.lists(st.integers(WORD0, TOK.word_end - 1), min_size=1, max_size=40)


def _prefill(runner: MockRunner, sid: str, prompt: list[int], prompt_len: int | None = None) -> int:
    """Compute ``prompt`` from position 0; the first greedy token."""
    n = len(prompt) if prompt_len is None else prompt_len
    chunk = SeqChunk(sid, list(prompt), 0, [], True, prompt_len=n)
    token = runner.execute([chunk]).top1[0]
    assert isinstance(token, int)
    return token


def _single_steps(runner: MockRunner, sid: str, first: int, start: int, k: int) -> list[int]:
    """``k`` greedy tokens from ``first`` (at position ``start``), one decode step each."""
    out = [first]
    while len(out) < k + 1:
        top = runner.execute([SeqChunk(sid, [out[-1]], start + len(out) - 1, [], True)]).top1
        token = top[0]
        assert isinstance(token, int)
        out.append(token)
    return out[1:]


def _burst(runner: MockRunner, sid: str, first: int, start: int, k: int) -> list[int]:
    chunk = SeqChunk(sid, [first], start, [], True, num_steps=k)
    row = runner.execute([chunk]).top1[0]
    assert isinstance(row, list)
    return row


@settings(max_examples=60, deadline=None)
@given(prompt=prompts, lead=st.integers(0, 2 * ORBIT), k=st.integers(2, 3 * ORBIT))
def test_a_burst_gives_the_tokens_of_single_steps(prompt: list[int], lead: int, k: int) -> None:
    """From any point of an orbit (``lead`` single steps first), across orbit boundaries."""
    steps, burst = MockRunner(TOK), MockRunner(TOK)
    first = _prefill(steps, "s", prompt)
    assert _prefill(burst, "s", prompt) == first
    n = len(prompt)
    if lead:
        led = _single_steps(steps, "s", first, n, lead)
        assert _single_steps(burst, "s", first, n, lead) == led
        first, n = led[-1], n + lead
    expected = _single_steps(steps, "s", first, n, k)
    assert _burst(burst, "s", first, n, k) == expected
    # both runners are in the same state afterwards: the next step agrees
    after_steps = _single_steps(steps, "s", expected[-1], n + k, 3)
    assert _single_steps(burst, "s", expected[-1], n + k, 3) == after_steps


@settings(max_examples=20, deadline=None)
@given(prompt=prompts, k=st.integers(2, 2 * ORBIT))
def test_a_burst_with_eos_draws_gives_the_tokens_of_single_steps(prompt: list[int], k: int) -> None:
    steps, burst = MockRunner(TOK, eos_probability=0.05), MockRunner(TOK, eos_probability=0.05)
    first = _prefill(steps, "s", prompt)
    assert _prefill(burst, "s", prompt) == first
    expected = _single_steps(steps, "s", first, len(prompt), k)
    assert _burst(burst, "s", first, len(prompt), k) == expected


@settings(max_examples=30, deadline=None)
@given(prompt=prompts, k=st.integers(1, 2 * ORBIT))
def test_a_recomputed_sequence_continues_where_it_was(prompt: list[int], k: int) -> None:
    """A fresh runner given prompt + outputs in one chunk (preemption) predicts the same."""
    runner = MockRunner(TOK)
    first = _prefill(runner, "s", prompt)
    out = [first, *_single_steps(runner, "s", first, len(prompt), k)]
    fresh = MockRunner(TOK)
    context = prompt + out[:-1]
    assert _prefill(fresh, "r", context, len(prompt)) == out[-1]


@settings(max_examples=30, deadline=None)
@given(prompt=st.lists(st.integers(WORD0, TOK.word_end - 1), min_size=2, max_size=40))
def test_a_chunked_prompt_gives_the_same_state(prompt: list[int]) -> None:
    whole, parts = MockRunner(TOK), MockRunner(TOK)
    first = _prefill(whole, "s", prompt)
    cut = len(prompt) // 2
    n = len(prompt)
    parts.execute([SeqChunk("s", prompt[:cut], 0, [], False, prompt_len=n)])
    top = parts.execute([SeqChunk("s", prompt[cut:], cut, [], True, prompt_len=n)]).top1
    assert top[0] == first
    assert _burst(parts, "s", first, n, 20) == _burst(whole, "s", first, n, 20)


def test_outputs_depend_on_the_prompt() -> None:
    """Different prompts give different greedy outputs (the table has 32,768 orbits)."""
    runner = MockRunner(TOK)
    outputs = set()
    for i in range(300):
        prompt = TOK.encode(f"prompt number {i} of the test")
        first = _prefill(runner, f"s{i}", prompt)
        outputs.add((first, *_burst(runner, f"s{i}", first, len(prompt), 7)))
    assert len(outputs) >= 295
    again = MockRunner(TOK)
    prompt = TOK.encode("prompt number 0 of the test")
    first = _prefill(again, "x", prompt)
    assert (first, *_burst(again, "x", first, len(prompt), 7)) in outputs
