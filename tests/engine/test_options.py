"""One options type (:mod:`sagellm_backend.engine.options`) for the engine configs."""

from __future__ import annotations

import dataclasses

import pytest

from sagellm_backend.engine.cpu import CPUEngineConfig
from sagellm_backend.engine.hf_cuda import HFCudaEngineConfig
from sagellm_backend.engine.mock import MockEngineConfig
from sagellm_backend.engine.options import (
    ENGINE_OPTION_DEFAULTS,
    EngineOptionFields,
    EngineOptions,
    resolve_engine_options,
)
from sagellm_backend.errors import ConfigError


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_the_face_configs_inherit_the_one_declaration() -> None:
    options = _names(EngineOptions)
    assert list(ENGINE_OPTION_DEFAULTS) == options
    for cls in (EngineOptionFields, CPUEngineConfig, HFCudaEngineConfig):
        assert issubclass(cls, EngineOptions)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in options:
            assert fields[name].default == ENGINE_OPTION_DEFAULTS[name]
            assert fields[name].kw_only
    # EngineConfig's fields stay first (the published positional order)
    assert _names(EngineOptionFields)[:2] == ["engine_id", "model_path"]


def test_resolve_reads_fields_and_metadata() -> None:
    cfg = CPUEngineConfig("c", model_path="/m", block_size=32, metadata={"runner": "hf"})
    opts = resolve_engine_options("CPUEngineConfig", cfg)
    assert type(opts) is EngineOptions
    assert (opts.block_size, opts.runner) == (32, "hf")
    with pytest.raises(ConfigError, match=r"CPUEngineConfig.block_size=32 conflicts"):
        resolve_engine_options(
            "CPUEngineConfig", dataclasses.replace(cfg, metadata={"block_size": 8})
        )


def test_mock_config_maps_onto_engine_options() -> None:
    cfg = MockEngineConfig(
        "m",
        kv_memory_bytes=1 << 20,
        enable_prefix_caching=False,
        max_model_len=64,
        max_input_tokens=10,
    )
    opts = cfg.engine_options()
    assert opts == EngineOptions(
        kv_cache_memory_bytes=1 << 20,
        enable_prefix_caching=False,
        max_model_len=64,
        max_input_tokens=10,
    )
    default = MockEngineConfig("m").engine_options()
    assert default.max_model_len == 32768 and default.kv_cache_memory_bytes is None
