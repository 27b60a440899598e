"""create_mock_engine: the sagellm.engines entry point and its config forms."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from sagellm_core import EngineConfig as CoreEngineConfig

from sagellm_backend.engine.mock import (
    ENV_MOCK_OPTIONS,
    MockEngine,
    MockEngineConfig,
    create_mock_engine,
)
from sagellm_backend.errors import ConfigError
from sagellm_backend.providers.mock import MockBackendProvider

from ..conftest import make_request


def test_entry_point_resolves_to_create_mock_engine() -> None:
    eps = {ep.name: ep for ep in entry_points(group="sagellm.engines")}
    assert eps["mock"].load() is create_mock_engine


def test_every_engine_entry_point_module_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "from importlib.metadata import entry_points\n"
        "for ep in entry_points(group='sagellm.engines'):\n"
        "    if ep.value.startswith('sagellm_backend'):\n"
        "        assert callable(ep.load()), ep\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def test_from_core_config_with_backend() -> None:
    provider = MockBackendProvider()
    cfg = CoreEngineConfig(
        kind="mock", model="m", max_batch_size=3, max_input_tokens=50, max_output_tokens=9
    )
    eng = create_mock_engine(cfg, provider)
    assert isinstance(eng, MockEngine)
    assert eng.provider is provider
    assert eng.config.max_batch_size == 3 and eng.config.model_path == "m"
    assert eng.config.max_input_tokens == 50 and eng.config.max_output_tokens == 9
    await eng.start()
    try:
        resp = await eng.execute(make_request(max_tokens=2))
        assert resp.metrics.component_trace == ["sagellm-core", "sagellm-backend:MockEngine"]
        assert provider.memory_stats()["kv_used_bytes"] == 0
    finally:
        await eng.stop()


async def test_from_dict_with_options() -> None:
    eng = create_mock_engine(
        {"engine_id": "d1", "simulate_ttft_ms": 0.0, "simulate_latency_ms": 0.0, "seed": 5}
    )
    assert eng.engine_id == "d1"
    assert eng.config.seed == 5 and eng.config.device == "mock"
    await eng.start()
    try:
        resp = await eng.execute(make_request(max_tokens=2))
        assert resp.metrics.component_trace == ["sagellm-backend:MockEngine"]
    finally:
        await eng.stop()


def test_none_config_and_generated_id() -> None:
    eng = create_mock_engine()
    assert eng.engine_id.startswith("engine-")
    assert eng.config.simulate_latency_ms == 10.0


def test_mock_engine_config_passthrough() -> None:
    cfg = MockEngineConfig("p1", 0.0, 0.0)
    assert create_mock_engine(cfg).config is cfg
    provider = MockBackendProvider()
    eng = create_mock_engine(cfg, provider)
    assert eng.config.provider is provider and cfg.provider is None


def test_legacy_positional_form() -> None:
    eng = create_mock_engine("legacy", 1.5, 2.5, max_batch_size=2)
    assert eng.engine_id == "legacy"
    assert (eng.config.simulate_latency_ms, eng.config.simulate_ttft_ms) == (1.5, 2.5)
    assert eng.config.max_batch_size == 2
    eng2 = create_mock_engine("legacy2", simulate_ttft_ms=0.0)
    assert eng2.config.simulate_ttft_ms == 0.0


@pytest.mark.parametrize(
    ("config", "backend", "needle"),
    [
        ({"engine_id": "x", "flux": 1}, None, "flux"),
        ({"kind": "cpu"}, None, "expected 'mock'"),
        ({"simulate_latency_ms": -1}, None, "simulate_latency_ms"),
        ({}, "not-a-provider", "backend"),
        (MockEngineConfig("z"), 42, "provider"),
    ],
)
def test_bad_configs(config: object, backend: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        create_mock_engine(config, backend)


def test_extra_arguments_need_the_string_form() -> None:
    with pytest.raises(ConfigError, match="no further arguments"):
        create_mock_engine({}, None, 3.0)


def test_env_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_MOCK_OPTIONS, json.dumps({"simulate_latency_ms": 0, "jitter_ms": 1.0}))
    eng = create_mock_engine(CoreEngineConfig(kind="mock", model="m"))
    assert eng.config.simulate_latency_ms == 0.0 and eng.config.jitter_ms == 1.0
    # dict keys override the environment
    eng2 = create_mock_engine({"simulate_latency_ms": 3.0})
    assert eng2.config.simulate_latency_ms == 3.0
    monkeypatch.setenv(ENV_MOCK_OPTIONS, "{not json")
    with pytest.raises(ConfigError, match=ENV_MOCK_OPTIONS):
        create_mock_engine({})
    monkeypatch.setenv(ENV_MOCK_OPTIONS, json.dumps({"bogus": 1}))
    with pytest.raises(ConfigError, match="bogus"):
        create_mock_engine({})
    monkeypatch.setenv(ENV_MOCK_OPTIONS, "[1]")
    with pytest.raises(ConfigError, match="JSON object"):
        create_mock_engine({})


def test_the_0_1_1_form_by_keyword() -> None:
    """sagellm_core.mock_engine.create_mock_engine(engine_id=...), as 0.1.1.2 took it."""
    eng = create_mock_engine(engine_id="kw", simulate_latency_ms=1.5, simulate_ttft_ms=2.5)
    assert eng.engine_id == "kw"
    assert (eng.config.simulate_latency_ms, eng.config.simulate_ttft_ms) == (1.5, 2.5)
    with pytest.raises(ConfigError, match="engine_id must be a str"):
        create_mock_engine(engine_id=3)


async def test_core_defaults_neither_serialise_nor_reject_requests() -> None:
    """sagellm-core's EngineConfig defaults max_batch_size to 1, which 0.1.1.2's mock ignored:
    only a value set explicitly limits the batch. max_output_tokens caps the output (the HF
    engines' rule) instead of failing the request."""
    default = create_mock_engine(CoreEngineConfig(kind="mock", model="m"))
    assert default.config.max_batch_size == MockEngineConfig("x").max_batch_size
    explicit = create_mock_engine(CoreEngineConfig(kind="mock", model="m", max_batch_size=1))
    assert explicit.config.max_batch_size == 1
    capped = create_mock_engine(CoreEngineConfig(kind="mock", model="m", max_output_tokens=4))
    await capped.start()
    try:
        resp = await capped.execute(make_request(max_tokens=9))
        assert resp.finish_reason == "length" and len(resp.output_tokens) == 4
    finally:
        await capped.stop()
