"""engine/_plugin.py: config normalisation for the sagellm.engines factories."""

from __future__ import annotations

from typing import Any

import pytest
from sagellm_core import EngineConfig as CoreEngineConfig

from sagellm_backend.engine._plugin import (
    PluginEngineSettings,
    core_component_trace,
    is_backend_provider,
    normalize_engine_config,
    reject_unknown_keys,
)
from sagellm_backend.engine.base import EngineConfig
from sagellm_backend.errors import ConfigError


class _Provider:
    def capability(self) -> None: ...

    def kv_block_alloc(self, num_tokens: int, dtype: Any) -> None: ...


def test_core_config_is_mapped_and_flagged() -> None:
    cfg = CoreEngineConfig(
        kind="mock",
        model="tiny",
        max_batch_size=4,
        max_input_tokens=100,
        max_output_tokens=50,
        device="cpu",
    )
    provider = _Provider()
    s = normalize_engine_config(cfg, provider)
    assert isinstance(s, PluginEngineSettings)
    assert s.from_core is True
    assert (s.kind, s.model, s.model_path, s.device) == ("mock", "tiny", "tiny", "cpu")
    assert (s.max_batch_size, s.max_input_tokens, s.max_output_tokens) == (4, 100, 50)
    assert s.provider is provider
    assert s.engine_id.startswith("mock-tiny-")
    assert s.extra == {}


def test_core_config_model_path_wins_for_path() -> None:
    cfg = CoreEngineConfig(kind="cpu", model="name", model_path="/models/x")
    s = normalize_engine_config(cfg)
    assert (s.model, s.model_path) == ("name", "/models/x")


def test_dict_config_keeps_unknown_keys_in_extra() -> None:
    s = normalize_engine_config(
        {"engine_id": "e1", "kind": "cpu", "model_path": "/m", "dtype": "float32", "x": 1}
    )
    assert s.engine_id == "e1" and s.from_core is False
    assert (s.model, s.model_path) == ("/m", "/m")
    assert s.extra == {"dtype": "float32", "x": 1}
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['x'\]"):
        reject_unknown_keys(s, {"dtype"}, "cpu engine")
    reject_unknown_keys(s, {"dtype", "x"}, "cpu engine")


def test_none_config_generates_an_id() -> None:
    a = normalize_engine_config(None)
    b = normalize_engine_config(None)
    assert a.engine_id and b.engine_id and a.engine_id != b.engine_id
    assert a.kind is None and a.max_batch_size is None and a.provider is None


def test_dataclass_config_and_metadata() -> None:
    provider = _Provider()
    cfg = EngineConfig(
        engine_id="e2",
        model_path="/m",
        device="cpu",
        max_batch_size=3,
        provider=provider,
        metadata={"dtype": "bfloat16"},
    )
    s = normalize_engine_config(cfg)
    assert (s.engine_id, s.model_path, s.device, s.max_batch_size) == ("e2", "/m", "cpu", 3)
    assert s.provider is provider
    assert s.extra["dtype"] == "bfloat16"
    assert s.extra["mock_mode"] is False


def test_dict_from_core_flag() -> None:
    assert normalize_engine_config({"from_core": True}).from_core is True
    with pytest.raises(ConfigError, match="from_core"):
        normalize_engine_config({"from_core": "yes"})


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": True}, "max_batch_size"),
        ({"max_input_tokens": -1}, "max_input_tokens"),
        ({"max_output_tokens": "5"}, "max_output_tokens"),
        ({"kind": ""}, "kind"),
        ({"model": 3}, "model"),
        ({"device": "  "}, "device"),
        ({"engine_id": 7}, "engine_id"),
        ({"provider": object()}, "provider"),
        (42, "int"),
    ],
)
def test_bad_values_name_the_field(config: Any, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        normalize_engine_config(config)


def test_backend_must_be_a_provider() -> None:
    with pytest.raises(ConfigError, match="backend"):
        normalize_engine_config({}, backend="cpu")
    assert normalize_engine_config({}, backend=_Provider()).provider is not None


def test_provider_detection() -> None:
    assert is_backend_provider(_Provider())
    assert not is_backend_provider(None)
    assert not is_backend_provider(object())


def test_component_trace() -> None:
    assert core_component_trace("MockEngine", True) == [
        "sagellm-core",
        "sagellm-backend:MockEngine",
    ]
    assert core_component_trace("CPUEngine", False) == ["sagellm-backend:CPUEngine"]
