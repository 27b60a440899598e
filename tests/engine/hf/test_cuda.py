"""HFCudaEngine on a real GPU (skipped without CUDA): dtypes, quantisation, batching."""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

import pytest

from sagellm_backend.engine.hf_cuda import HFCudaEngine, HFCudaEngineConfig

from .conftest import PROMPTS, make_request

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not HFCudaEngine.is_available(), reason=f"no CUDA: {HFCudaEngine.unavailable_reason()}"
    ),
]


def _config(path: str, **changes: Any) -> HFCudaEngineConfig:
    fields: dict[str, Any] = {
        "engine_id": "cuda-test",
        "model_path": path,
        "device": "cuda:0",
        "dtype": "float16",
        "device_map": "cuda:0",
        "load_in_8bit": False,
        "load_in_4bit": False,
        "trust_remote_code": False,
        "max_new_tokens": 32,
        "max_batch_size": 8,
    }
    fields.update(changes)
    return HFCudaEngineConfig(**fields)


def _reference(engine: Any, prompt: str, n: int) -> list[int]:
    """Greedy tokens of the engine's own (loaded, same-dtype) model through generate."""
    import torch

    model, tok = engine.model, engine.tokenizer
    ids = tok(prompt, return_tensors="pt").input_ids.to(model.device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return list(out[0, ids.shape[1] :].tolist())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
async def test_cuda_engine_greedy_matches_generate(tiny_llama: str, dtype: str) -> None:
    engine = HFCudaEngine(_config(tiny_llama, dtype=dtype))
    await engine.start()
    try:
        assert engine.runner_name == "paged"
        assert type(engine.provider).__name__ == "CudaBackendProvider"
        reqs = [make_request(p, 12) for p in PROMPTS]
        responses = await asyncio.gather(*(engine.execute(r) for r in reqs))
        same = sum(
            r.output_tokens == _reference(engine, q.prompt, 12)
            for q, r in zip(reqs, responses, strict=True)
        )
        # Half precision: batched and single-sequence kernels may round differently.
        assert same >= (len(reqs) if dtype == "float32" else len(reqs) - 1)
        assert all(r.metrics.peak_mem_mb > 0 for r in responses)
    finally:
        await engine.stop()
    assert engine.kv_manager.stats().num_seqs == 0


@pytest.mark.parametrize("bits", [8, 4])
async def test_cuda_engine_quantised(tiny_llama: str, bits: int) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    engine = HFCudaEngine(_config(tiny_llama, dtype="float16", **{f"load_in_{bits}bit": True}))
    await engine.start()
    try:
        responses = await asyncio.gather(*(engine.execute(make_request(p, 8)) for p in PROMPTS[:4]))
        for p, r in zip(PROMPTS[:4], responses, strict=True):
            assert r.finish_reason == "length", r.error
            assert len(r.output_tokens) == 8
            assert r.output_tokens[:2] == _reference(engine, p, 2)
    finally:
        await engine.stop()


async def test_cuda_engine_streams_and_cancels(tiny_llama: str) -> None:
    engine = HFCudaEngine(_config(tiny_llama, max_new_tokens=2000))
    await engine.start()
    try:
        stream = engine.stream(make_request(PROMPTS[0], 1500))
        n = 0
        async for event in stream:
            n += event.event == "delta"
            if n == 3:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        for _ in range(200):
            if engine.kv_manager.stats().num_seqs == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.kv_manager.stats().num_seqs == 0
    finally:
        await engine.stop()
