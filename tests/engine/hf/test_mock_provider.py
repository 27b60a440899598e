"""The HF engines given a mock provider (sagellm-core's ``mock`` backend), and HFCudaEngine on a
machine without CUDA (the seed: "non-CUDA device: MockBackendProvider").

The mock stays the engine's provider; the model runs on a provider of the engine's own that
holds its K/V. Tokens must equal the same engine on its usual provider, and nothing may be
left in either provider after ``stop()``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

pytest.importorskip("transformers")

from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig, create_cpu_engine
from sagellm_backend.engine.hf_cuda import HFCudaEngine, HFCudaEngineConfig
from sagellm_backend.providers.cpu import CPUBackendProvider
from sagellm_backend.providers.mock import MockBackendProvider
from seed_fields import SEED_CUDA_FIELDS

from .conftest import make_request

pytestmark = pytest.mark.hf

PROMPTS = ["Hello there", "The quick brown fox", "1 2 3 4"]


async def _serve(engine: Any) -> list[list[int]]:
    await engine.start()
    try:
        responses = await asyncio.gather(
            *(
                engine.execute(make_request(p, max_tokens=6, request_id=f"r{i}"))
                for i, p in enumerate(PROMPTS)
            )
        )
    finally:
        info = engine.get_info()
        await engine.stop()
    assert all(r.finish_reason == "length" for r in responses), responses
    assert info["kv"]["num_seqs"] == 0
    return [list(r.output_tokens) for r in responses]


def _cpu_tokens(tiny_llama: str) -> list[list[int]]:
    engine = CPUEngine(CPUEngineConfig(engine_id="ref", model_path=tiny_llama, max_batch_size=4))
    return asyncio.run(_serve(engine))


def test_cpu_engine_serves_with_a_mock_provider(tiny_llama: str) -> None:
    mock = MockBackendProvider()
    before = mock.memory_stats()
    engine = create_cpu_engine(
        {"engine_id": "m", "model_path": tiny_llama, "max_batch_size": 4}, mock
    )
    got = asyncio.run(_serve(engine))
    assert got == _cpu_tokens(tiny_llama)
    assert engine.provider is mock  # the injected provider stays the engine's
    info = engine.get_info()
    assert info["provider"] == "MockBackendProvider"
    assert info["device_provider"] == "CPUBackendProvider"
    assert "device:CPUBackendProvider" in engine._results.trace
    after = mock.memory_stats()  # the mock held none of the model's K/V at any time
    assert (after["allocated"], after["peak"]) == (before["allocated"], before["peak"])


def test_cpu_engine_still_refuses_a_provider_of_another_device(tiny_llama: str) -> None:
    from sagellm_backend.errors import ConfigError

    other = MockBackendProvider(device_type="npu")
    engine = CPUEngine(CPUEngineConfig(engine_id="x", model_path=tiny_llama, provider=other))
    with pytest.raises(ConfigError, match=r"needs a cpu \(or mock\) provider.*'npu'"):
        asyncio.run(engine.start())


@pytest.mark.parametrize("given", ["none", "cpu"])
def test_cuda_engine_without_cuda_runs_on_the_cpu(
    given: str, tiny_llama: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No provider: a MockBackendProvider, the model on an own cpu provider (the seed's rule);
    sagellm-core's cpu backend: the model on it. Both as 0.1.1.2 ran them without CUDA."""
    pytest.importorskip("torch")
    if HFCudaEngine.is_available():
        pytest.skip("a CUDA device is available here")
    assert HFCudaEngine.unavailable_reason()  # the factory's automatic choice skips it
    cpu = CPUBackendProvider() if given == "cpu" else None
    fields = {**SEED_CUDA_FIELDS, "model_path": tiny_llama, "dtype": "float32", "provider": cpu}
    engine = HFCudaEngine(HFCudaEngineConfig(**fields))
    with caplog.at_level(logging.WARNING, logger="sagellm_backend.engine.hf_cuda"):
        got = asyncio.run(_serve(engine))
    assert "no CUDA device" in caplog.text and "on the CPU" in caplog.text
    if cpu is None:
        assert isinstance(engine.provider, MockBackendProvider)
        assert isinstance(engine._device_provider, CPUBackendProvider)
    else:
        assert engine.provider is cpu and engine._device_provider is None
        assert "device_provider" not in engine.get_info()
    assert got == _cpu_tokens(tiny_llama)
