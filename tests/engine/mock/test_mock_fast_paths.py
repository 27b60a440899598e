"""The hot-path shortcuts of the mock engine give exactly what the general code gives."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_backend.engine.metrics import RequestTimeline, _itl_ms, build_metrics
from sagellm_backend.engine.mock import MockTokenizer
from sagellm_backend.engine.mock.serving import _MockDetok


def _reference_gaps(times: list[float]) -> list[float]:
    return [(b - a) * 1000.0 for a, b in itertools.pairwise(times)]


def _reference_itl(times: list[float]) -> tuple[list[float], float]:
    """build_metrics' definition of the ITL list and its mean (tbt)."""
    gaps = _reference_gaps(times)
    mean = sum(gaps) / len(gaps)
    if min(gaps) < 0.0:
        gaps = [g if g > 0.0 else 0.0 for g in gaps]
    return gaps, mean


def _same_floats(a: list[float], b: list[float]) -> bool:
    """Equal element by element, signed zeros and NaNs included."""
    return len(a) == len(b) and all(
        (x != x and y != y) or (x == y and math.copysign(1.0, x) == math.copysign(1.0, y))
        for x, y in zip(a, b, strict=True)
    )


_EDGE_TIMES = [
    [1.0, 1.0],
    [1.0, 2.0, 2.0, 2.0],
    [2.0, 1.0, 1.0],
    [1.5, 1.5, 1.5],
    [1.5, 1.5, 1.0],
    [0.0, 0.0, -0.0],
    [-0.0, -0.0, 0.0],
    [1.0, -0.0, 0.0, -0.0],
    [float("inf"), float("inf"), float("inf")],
    [1.0, float("inf"), float("inf")],
    [float("nan"), float("nan"), float("nan")],
    [1, 1, 1],
    [1, 2.0, 2],
    [2.0, 1.0],
    [5.0, 4.0, 4.0, 4.0],
    [5.0, float("nan"), float("nan")],
    [float("nan"), 4.0, 4.0],
    [-0.0, 1.0, 1.0],
    [0.0, 1.0, 1.0],
]


def _check_itl(times: list[float]) -> None:
    gaps, mean = _itl_ms(times)
    ref_gaps, ref_mean = _reference_itl(times)
    assert _same_floats(gaps, ref_gaps)
    assert _same_floats([mean], [ref_mean])
    assert all(type(g) is float for g in gaps) and type(mean) is float


@pytest.mark.parametrize("times", _EDGE_TIMES)
def test_itl_equals_the_definition(times: list[float]) -> None:
    _check_itl(times)


@given(
    st.lists(
        st.sampled_from([0.0, -0.0, 1.0, 1.25, 2.5, 1e300, -1e300, 3, float("nan"), float("inf")]),
        min_size=2,
        max_size=8,
    )
)
@settings(max_examples=500, deadline=None)
def test_itl_equals_the_definition_for_any_times(times: list[float]) -> None:
    _check_itl(times)


def test_burst_timeline_metrics() -> None:
    tl = RequestTimeline(queued=10.0, scheduled=10.001, token_times=[10.002] + [10.005] * 63)
    tl.completed = 10.006
    m = build_metrics(tl, error_rate=0.0)
    assert m.itl_list == _reference_gaps(tl.token_times)
    assert m.itl_list[1:] == [0.0] * 62 and m.itl_list[0] == pytest.approx(3.0)
    assert m.tbt_ms == pytest.approx(3.0 / 63)


@pytest.mark.parametrize("vocab", [512, 600, 32000, 100_000])
def test_mock_detokenizer_equals_decode(vocab: int) -> None:
    tok = MockTokenizer(vocab)
    detok = _MockDetok(tok)
    rng = random.Random(vocab)
    for _ in range(2000):
        n = rng.randint(0, 6)
        if rng.random() < 0.5:  # generated words only (the fast path)
            ids = [rng.randrange(tok.WORD_OFFSET, tok.word_end) for _ in range(n)]
        else:  # anything, out of range included
            ids = [rng.randrange(-2, vocab + 2) for _ in range(n)]
        try:
            expected: str | type[BaseException] = tok.decode(ids)
        except ValueError:
            expected = ValueError
        if expected is ValueError:
            with pytest.raises(ValueError):
                detok.add(ids)
        else:
            assert detok.add(ids) == expected
    assert detok.flush() == ""


@given(st.text(alphabet=st.sampled_from("ab z\u00e9 \n.Q1"), max_size=60))
@settings(max_examples=200, deadline=None)
def test_memoised_encode_equals_a_fresh_tokenizer(text: str) -> None:
    warm = MockTokenizer(32000)
    warm.encode(text + " " + text)  # fills both chunk caches
    assert warm.encode(text) == MockTokenizer(32000).encode(text)
    assert warm.encode(text) == list(warm._encode_chunk(text))
