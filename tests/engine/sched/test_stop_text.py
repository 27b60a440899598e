"""Output text ends before the first stop string, in execute and in streams."""

from __future__ import annotations

import itertools

from hypothesis import example, given
from hypothesis import strategies as st

from sagellm_backend.engine.mock import MockEngine, MockEngineConfig
from sagellm_backend.engine.sched._stop_text import StopTextStream, cut_at_stop

from ..conftest import make_request

ALPHABET = "ab \u00e9\U0001f600"
PROMPT = "tell me a story"


# a longer stop string that starts earlier is completed by the next chunk
@example(text=" aa", cuts=[2], stops=["a", " aa"])
@given(
    text=st.text(alphabet=ALPHABET, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=12),
    stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_streamed_text_is_the_text_cut_at_the_first_stop(
    text: str, cuts: list[int], stops: list[str]
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    stream = StopTextStream(stops)
    sent = []
    for chunk in chunks:
        sent.append(stream.feed(chunk))
        released = "".join(sent)
        assert not any(s in released for s in stops)
        assert cut_at_stop(text, stops).startswith(released)
    sent.append(stream.end())
    assert "".join(sent) == cut_at_stop(text, stops) == stream.text


def test_cut_at_stop() -> None:
    assert cut_at_stop("hello world", ["o w", "ld"]) == "hell"
    assert cut_at_stop("hello", ["x"]) == "hello"
    assert cut_at_stop("hello", []) == "hello"


async def test_engines_return_the_text_before_the_stop_string() -> None:
    engine = MockEngine(MockEngineConfig("m", 0.0, 0.0))
    await engine.start()
    try:
        free = await engine.execute(make_request(PROMPT, 12))
        words = [engine.tokenizer.decode([t]) for t in free.output_tokens]
        k = next(i for i in range(3, 12) if words[i] not in "".join(words[:i]))
        stop = words[k]  # the k-th word, which the text before it does not contain
        got = await engine.execute(make_request(PROMPT, 12, metadata={"stop": [stop]}))
        assert got.finish_reason == "stop"
        assert got.output_text == "".join(words[:k])  # the stop string is left out
        assert got.output_tokens == free.output_tokens[: k + 1]  # its tokens are kept
        cut = make_request(PROMPT, 12, stream=True, metadata={"stop": [stop]})
        events = [ev async for ev in engine.stream(cut)]
        deltas, end = events[1:-1], events[-1]
        assert "".join(d.chunk for d in deltas) == end.output_text == got.output_text
        assert [t for d in deltas for t in d.chunk_tokens] == end.output_tokens
        assert end.output_tokens == got.output_tokens
    finally:
        await engine.stop()
