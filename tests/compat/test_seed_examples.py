"""The usage examples of the published 0.1.1.2 package page, through the public API only."""

from __future__ import annotations

import importlib.metadata

import pytest
from sagellm_protocol import Request

from sagellm_backend import DType, MockBackendProvider
from seed_fields import SEED_CUDA_FIELDS


def test_mock_backend_example() -> None:
    backend = MockBackendProvider(supported_dtypes=[DType.FP16, DType.BF16], has_collective=True)
    cap = backend.capability()
    assert cap.supported_dtypes == [DType.FP16, DType.BF16]
    block = backend.kv_block_alloc(128, DType.FP16)
    assert block.num_tokens == 128 and block.dtype == DType.FP16
    backend.kv_block_free(block)


def test_hf_cuda_config_examples_construct() -> None:
    from sagellm_backend.engine.hf_cuda import HFCudaEngine, HFCudaEngineConfig

    config = HFCudaEngineConfig(**SEED_CUDA_FIELDS)
    assert isinstance(HFCudaEngine(config), HFCudaEngine)  # construction needs no GPU
    quant = HFCudaEngineConfig(
        **{
            **SEED_CUDA_FIELDS,
            "engine_id": "hf-002",
            "model_path": "meta-llama/Llama-2-7b-hf",
            "dtype": "auto",
            "load_in_4bit": True,
            "max_new_tokens": 512,
            "max_batch_size": 4,
        }
    )
    assert quant.load_in_4bit and not quant.load_in_8bit


async def test_hf_cuda_mock_mode_example_serves_without_gpu_or_torch() -> None:
    from sagellm_backend.engine.hf_cuda import HFCudaEngine, HFCudaEngineConfig

    mock_config = HFCudaEngineConfig(
        **{
            **SEED_CUDA_FIELDS,
            "engine_id": "hf-mock",
            "model_path": "mock-model",
            "max_new_tokens": 64,
            "max_batch_size": 2,
        },
        mock_mode=True,
    )
    assert mock_config.device == "cuda:0"  # CUDA semantics kept, mock provider underneath
    engine = HFCudaEngine(mock_config)
    await engine.start()
    try:
        request = Request(
            request_id="r1",
            trace_id="t1",
            model="mock-model",
            prompt="hello",
            max_tokens=8,
            stream=False,
        )
        response = await engine.execute(request)
        m = response.metrics
        for name in (
            "ttft_ms",
            "tbt_ms",
            "tpot_ms",
            "throughput_tps",
            "peak_mem_mb",
            "error_rate",
            "kv_used_tokens",
            "kv_used_bytes",
            "prefix_hit_rate",
            "evict_count",
            "evict_ms",
        ):
            assert getattr(m, name) is not None, name
        assert response.output_text
        events = [e async for e in engine.stream(request.model_copy(update={"stream": True}))]
        assert events[0].event == "start" and events[-1].event == "end"
    finally:
        await engine.stop()


@pytest.mark.parametrize(
    ("group", "name", "target"),
    [
        ("sagellm.backends", "mock", "sagellm_backend.providers.mock:create_mock_backend"),
        ("sagellm.backends", "cpu", "sagellm_backend.providers.cpu:create_cpu_backend"),
        ("sagellm.engines", "mock", "sagellm_backend.engine:create_mock_engine"),
        ("sagellm.engines", "cpu", "sagellm_backend.engine:create_cpu_engine"),
        ("sagellm.engines", "cuda", "sagellm_backend.engine:create_cuda_engine"),
        ("sagellm.engines", "hf_cuda", "sagellm_backend.engine:create_cuda_engine"),
    ],
)
def test_published_entry_points_resolve(group: str, name: str, target: str) -> None:
    (ep,) = [e for e in importlib.metadata.entry_points(group=group) if e.name == name]
    assert ep.value == target
    assert callable(ep.load())
