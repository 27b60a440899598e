"""Fused sibling projections (``fuse_projections``): same outputs, no extra weight memory."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("transformers")

import torch

from sagellm_backend.engine.runners._paged_fuse import fuse_projections

from .conftest import make_request, run


def _load(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_fused_siblings_give_the_separate_outputs_and_share_weight_memory(
    tiny_llama: str,
) -> None:
    model = _load(tiny_llama)
    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 5, attn.q_proj.in_features)
    plain = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)]
    groups, _ = fuse_projections(model, prepack=False)
    assert groups == 2 * len(model.model.layers)
    # the parameters are views of one fused tensor (no copy of the weights is kept)
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + (
        attn.q_proj.weight.numel() * 4
    )
    fused = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)]
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(a, b)
    # a sibling called with another input never returns a slice of the first one's output
    y = torch.randn_like(x)
    q_x = attn.q_proj(x)
    k_y = attn.k_proj(y)
    torch.testing.assert_close(q_x, plain[0])
    torch.testing.assert_close(k_y, torch.nn.functional.linear(y, attn.k_proj.weight))
    # fusing again (an engine restart on the same model) finds the groups fused
    assert fuse_projections(model, prepack=False)[0] == groups


def test_models_outside_the_fused_families_are_left_alone(tiny_gpt2: str) -> None:
    model = _load(tiny_gpt2)
    assert fuse_projections(model, prepack=True) == (0, 0)


def test_engine_tokens_are_the_same_with_and_without_fusion(
    tiny_llama: str, engine_factory: Any
) -> None:
    outputs = {}
    for fuse in (True, False):
        engine = engine_factory(tiny_llama, fuse_projections=fuse)

        async def cycle(engine: Any = engine) -> tuple[int, list[list[int]]]:
            await engine.start()
            groups = engine._runner.fused_groups
            outs = [
                await engine.execute(make_request(f"fused projections {i} " * (i + 1), 8))
                for i in range(3)
            ]
            await engine.stop()
            return groups, [list(o.output_tokens) for o in outs]

        outputs[fuse] = run(cycle())
    assert outputs[True][0] > 0 and outputs[False][0] == 0
    assert outputs[True][1] == outputs[False][1]
