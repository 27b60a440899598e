"""HF engine configs (fail fast, each error names the field), mock mode, factories."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
from sagellm_protocol import Request

from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig, create_cpu_engine
from sagellm_backend.engine.hf_cuda import HFCudaEngine, HFCudaEngineConfig, create_cuda_engine
from sagellm_backend.errors import ConfigError
from seed_fields import SEED_CUDA_FIELDS as CUDA_FIELDS

from .conftest import make_request


# ---------------------------------------------------------------------------- HFCudaEngineConfig
def test_published_cuda_examples_construct() -> None:
    HFCudaEngineConfig(**CUDA_FIELDS)
    HFCudaEngineConfig(
        **{**CUDA_FIELDS, "dtype": "auto", "load_in_4bit": True, "max_batch_size": 4}
    )
    mock = HFCudaEngineConfig(**{**CUDA_FIELDS, "model_path": "mock-model", "mock_mode": True})
    assert mock.mock_mode and mock.device == "cuda:0"
    HFCudaEngineConfig(**{**CUDA_FIELDS, "device_map": {"": "cuda:0"}, "device": "cuda"})


@pytest.mark.parametrize(
    "field",
    [
        "model_path",
        "dtype",
        "device_map",
        "load_in_8bit",
        "load_in_4bit",
        "trust_remote_code",
        "max_new_tokens",
        "max_batch_size",
    ],
)
def test_every_documented_cuda_field_is_required(field: str) -> None:
    fields = {k: v for k, v in CUDA_FIELDS.items() if k != field}
    with pytest.raises(ConfigError, match=field):
        HFCudaEngineConfig(**fields)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"engine_id": ""}, ["engine_id"]),
        ({"device": "cpu"}, ["device", "'cpu'", "cuda:0"]),
        ({"device": "cuda:x"}, ["device"]),
        ({"dtype": "fp8"}, ["dtype", "'fp8'", "float16"]),
        ({"device_map": "everywhere"}, ["device_map", "'everywhere'", "auto"]),
        ({"device_map": {}}, ["device_map"]),
        ({"load_in_8bit": "no"}, ["load_in_8bit", "'no'"]),
        ({"load_in_8bit": True, "load_in_4bit": True}, ["mutually exclusive"]),
        (
            {"load_in_4bit": True, "bnb_4bit_quant_type": "int2"},
            ["bnb_4bit_quant_type", "'int2'", "nf4", "fp4"],
        ),
        ({"bnb_4bit_quant_type": "fp4"}, ["bnb_4bit_quant_type", "load_in_4bit=True"]),
        (
            {"load_in_4bit": True, "bnb_4bit_compute_dtype": "int8"},
            ["bnb_4bit_compute_dtype", "'int8'", "bfloat16"],
        ),
        ({"trust_remote_code": 1}, ["trust_remote_code"]),
        ({"max_new_tokens": 0}, ["max_new_tokens", "0", "> 0"]),
        ({"max_batch_size": -2}, ["max_batch_size", "-2"]),
        ({"max_batch_size": True}, ["max_batch_size"]),
        ({"provider": object()}, ["provider"]),
        ({"block_size": 0}, ["block_size"]),
        ({"runner": "fast"}, ["runner", "'fast'", "paged"]),
        ({"max_num_batched_tokens": 4}, ["max_num_batched_tokens", "max_batch_size"]),
        ({"kv_cache_memory_bytes": -1}, ["kv_cache_memory_bytes"]),
        (
            {"enable_prefix_caching": True, "metadata": {"block_size": 8}, "block_size": 32},
            ["block_size", "conflicts"],
        ),
    ],
)
def test_bad_cuda_fields_are_named(changes: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        HFCudaEngineConfig(**{**CUDA_FIELDS, **changes})
    for word in words:
        assert word in str(info.value)


def test_cuda_engine_needs_its_config() -> None:
    from sagellm_backend.engine.base import EngineConfig

    with pytest.raises(ConfigError, match="dtype"):
        HFCudaEngine(EngineConfig(engine_id="x", model_path="m", device="cuda:0"))
    with pytest.raises(ConfigError, match="HFCudaEngineConfig"):
        HFCudaEngine({"engine_id": "x"})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- CPUEngineConfig
def test_cpu_config_keeps_the_published_defaults() -> None:
    cfg = CPUEngineConfig(engine_id="c", model_path="/m")
    assert (cfg.max_new_tokens, cfg.torch_dtype, cfg.trust_remote_code) == (128, "float32", False)
    assert (cfg.low_cpu_mem_usage, cfg.load_in_8bit, cfg.num_threads) == (True, False, None)
    assert cfg.device == "cpu" and cfg.enable_prefix_caching


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"model_path": None}, ["model_path", "required"]),
        ({"device": "cuda:0"}, ["device", "'cuda:0'"]),
        ({"max_new_tokens": 0}, ["max_new_tokens"]),
        ({"max_batch_size": 0}, ["max_batch_size"]),
        ({"torch_dtype": "int8"}, ["torch_dtype", "'int8'", "float32"]),
        ({"num_threads": 0}, ["num_threads"]),
        ({"low_cpu_mem_usage": None}, ["low_cpu_mem_usage"]),
        ({"metadata": {"runner": "turbo"}}, ["runner", "'turbo'"]),
        ({"max_model_len": 0}, ["max_model_len"]),
        ({"enable_prefix_caching": "yes"}, ["enable_prefix_caching"]),
    ],
)
def test_bad_cpu_fields_are_named(changes: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        CPUEngineConfig(**{"engine_id": "c", "model_path": "/m", **changes})
    for word in words:
        assert word in str(info.value)


def test_metadata_options_are_read() -> None:
    engine = CPUEngine(
        CPUEngineConfig(engine_id="c", model_path="/m", metadata={"enable_prefix_caching": False})
    )
    assert engine.get_info()["options"]["enable_prefix_caching"] is False


# ---------------------------------------------------------------------------- mock mode
async def test_cuda_mock_mode_serves_simulated_generations() -> None:
    cfg = HFCudaEngineConfig(
        **{**CUDA_FIELDS, "model_path": "mock-model", "mock_mode": True, "max_new_tokens": 6}
    )
    engine = HFCudaEngine(cfg)
    await engine.start()
    try:
        resp = await engine.execute(make_request("hello mock", 50))
        assert resp.finish_reason == "length" and len(resp.output_tokens) == 6
        assert resp.metrics.component_trace is not None
        assert "sagellm-backend:HFCudaEngine" in resp.metrics.component_trace
        events = [ev async for ev in engine.stream(make_request("hello mock", 3))]
        assert [e.event for e in events] == ["start", "delta", "delta", "delta", "end"]
        assert engine.get_info()["mock_mode"] is True
        assert type(engine.provider).__name__ == "MockBackendProvider"
        assert await engine.health_check()
    finally:
        await engine.stop()


def test_mock_mode_start_needs_no_torch_or_transformers() -> None:
    code = textwrap.dedent(
        """
        import asyncio, sys
        for name in ("torch", "transformers", "huggingface_hub", "accelerate"):
            sys.modules[name] = None  # any import of them now fails
        from sagellm_protocol import Request
        from sagellm_backend.engine.hf_cuda import HFCudaEngine, HFCudaEngineConfig
        from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig

        async def main():
            cuda = HFCudaEngine(HFCudaEngineConfig(
                engine_id="hf-mock", model_path="mock-model", device="cuda:0",
                dtype="float16", device_map="auto", load_in_8bit=False, load_in_4bit=False,
                trust_remote_code=False, max_new_tokens=64, max_batch_size=2, mock_mode=True))
            cpu = CPUEngine(CPUEngineConfig(engine_id="cpu-mock", mock_mode=True))
            for engine in (cuda, cpu):
                await engine.start()
                r = await engine.execute(Request(request_id="r", trace_id="t", model="m",
                                                 prompt="hi", max_tokens=4, stream=False))
                assert r.finish_reason == "length", r
                await engine.stop()
            print("OK")

        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"


def test_engine_modules_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import sagellm_backend.engine.cpu, sagellm_backend.engine.hf_cuda\n"
        "import sagellm_backend.engine.hf.core\n"
        "from sagellm_backend.engine import CPUEngine, HFCudaEngine, create_cpu_engine\n"
        "print('OK')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------- factories
def test_cuda_factory_maps_a_core_config() -> None:
    core = pytest.importorskip("sagellm_core")
    cfg = core.EngineConfig(
        kind="hf_cuda", model="mock-model", max_batch_size=3, max_output_tokens=17
    )
    engine = create_cuda_engine(cfg)
    assert isinstance(engine, HFCudaEngine)
    c = engine.config
    assert isinstance(c, HFCudaEngineConfig)
    assert (c.max_batch_size, c.max_new_tokens, c.device, c.dtype) == (3, 17, "cuda:0", "auto")
    assert engine._trace_base == ["sagellm-core", "sagellm-backend:HFCudaEngine"]
    with pytest.raises(ConfigError, match="max_new_tokens"):
        create_cuda_engine(core.EngineConfig(kind="cuda", model="m", max_batch_size=2))
    with pytest.raises(ConfigError, match="expected 'cuda'"):
        create_cuda_engine(core.EngineConfig(kind="cpu", model="m", max_output_tokens=4))
    with pytest.raises(ConfigError, match="unknown field"):
        create_cuda_engine({"model": "m", "max_batch_size": 2, "max_new_tokens": 4, "turbo": 1})


async def test_cuda_factory_mock_mode_from_a_dict() -> None:
    engine = create_cuda_engine(
        {
            "engine_id": "e",
            "model": "mock",
            "max_batch_size": 2,
            "max_new_tokens": 5,
            "mock_mode": True,
            "dtype": "float16",
        }
    )
    await engine.start()
    try:
        resp = await engine.execute(make_request("x", 3))
        assert resp.finish_reason == "length"
    finally:
        await engine.stop()


@pytest.mark.hf
async def test_cpu_factory_with_a_core_config_and_provider(tiny_llama: str) -> None:
    core = pytest.importorskip("sagellm_core")
    from sagellm_backend.providers.cpu import CPUBackendProvider

    provider = CPUBackendProvider()
    cfg = core.EngineConfig(kind="cpu", model=tiny_llama, max_batch_size=2, max_output_tokens=5)
    engine = create_cpu_engine(cfg, provider)
    assert isinstance(engine, CPUEngine)
    assert engine.config.max_batch_size == 2 and engine.config.max_new_tokens == 5
    await engine.start()
    try:
        assert engine.provider is provider
        resp = await engine.execute(
            Request(
                request_id="r", trace_id="t", model="m", prompt="hello", max_tokens=50, stream=False
            )
        )
        assert len(resp.output_tokens) <= 5
        assert resp.metrics.component_trace is not None
        assert resp.metrics.component_trace[:2] == ["sagellm-core", "sagellm-backend:CPUEngine"]
    finally:
        await engine.stop()
    with pytest.raises(ConfigError, match="expected 'cpu'"):
        create_cpu_engine(core.EngineConfig(kind="cuda", model="m"))
    with pytest.raises(ConfigError, match="unknown field"):
        create_cpu_engine({"model": "m", "warp_speed": True})
    direct = create_cpu_engine({"model": "/m", "enable_prefix_caching": False, "num_threads": 2})
    assert direct.config.num_threads == 2


@pytest.mark.hf
def test_core_create_engine_resolves_our_entry_points(tiny_llama: str) -> None:
    core = pytest.importorskip("sagellm_core")
    create = getattr(core, "create_engine", None)
    if create is None:
        pytest.skip("this sagellm-core has no create_engine")
    engine = create(core.EngineConfig(kind="cpu", model=tiny_llama, max_output_tokens=4), None)
    assert type(engine).__name__ == "CPUEngine"
