"""The sampler on dense (torch) logit rows: extreme but valid settings stay well defined."""

from __future__ import annotations

import pytest

from sagellm_backend.engine.sched.sampler import Sampler, SamplingParams
from sagellm_backend.engine.sched.seq import SchedSeq

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.hf


def _seq(params: SamplingParams, prompt: list[int]) -> SchedSeq:
    return SchedSeq("s", prompt, 4, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_temperature_below_the_dtype_range_keeps_the_top_token(dtype: torch.dtype) -> None:
    row = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    top = int(row.argmax())
    for temperature in (1e-46, 1e-300, 5e-324):
        seq = _seq(SamplingParams(temperature=temperature, seed=1), [1, 2])
        assert Sampler().sample(row, [seq], [0]) == [top]


def test_an_extreme_repetition_penalty_samples_among_the_boosted_tokens() -> None:
    row = torch.tensor([[2.0, 3.0, -1.0, 0.5, 1.0]])
    # 1e-300 rounds to 0 in float32: positive logits of seen tokens overflow to +inf
    params = SamplingParams(temperature=1.0, repetition_penalty=1e-300, seed=3)
    got = {Sampler().sample(row, [_seq(params, [0, 1, 2])], [0])[0] for _ in range(20)}
    assert got <= {0, 1} and got  # the two seen positive tokens tie at the top
    greedy = SamplingParams(repetition_penalty=1e-300)
    assert Sampler().sample(row, [_seq(greedy, [3])], [0]) == [3]
