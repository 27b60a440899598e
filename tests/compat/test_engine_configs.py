"""Point 2: engine factories take any attribute-style config or a mapping."""

from __future__ import annotations

import dataclasses
import importlib.util
import types
from typing import Any

import pydantic
import pytest

from sagellm_backend.engine import (
    CPUEngine,
    EngineFactory,
    HFCudaEngine,
    MockEngine,
    create_cpu_engine,
    create_cuda_engine,
    create_mock_engine,
)
from sagellm_backend.errors import ConfigError


@dataclasses.dataclass
class PluginConfig:
    """A third-party plugin's own config: our fields plus some of its own."""

    engine_id: str = "plugin-0"
    model: str = "mock-model"
    max_batch_size: int = 3
    max_output_tokens: int = 7
    mock_mode: bool = True
    plugin_color: str = "red"  # not ours: ignored


class PydanticConfig(pydantic.BaseModel):
    engine_id: str = "pyd-0"
    model_path: str = "mock-model"
    max_batch_size: int = 2
    max_output_tokens: int = 5
    mock_mode: bool = True
    temperature: float = 0.7  # not ours: ignored


class PropertyConfig:
    """Fields as properties of a plain class."""

    @property
    def engine_id(self) -> str:
        return "prop-0"

    @property
    def model(self) -> str:
        return "mock-model"

    max_batch_size = 2
    max_output_tokens = 4
    mock_mode = True


def _configs() -> list[Any]:
    return [
        types.SimpleNamespace(
            engine_id="ns-0",
            model="mock-model",
            max_batch_size=2,
            max_output_tokens=6,
            mock_mode=True,
            unrelated=object(),
        ),
        PluginConfig(),
        PydanticConfig(),
        PropertyConfig(),
        types.MappingProxyType(
            {
                "engine_id": "map-0",
                "model": "mock-model",
                "max_batch_size": 2,
                "max_output_tokens": 6,
                "mock_mode": True,
            }
        ),
    ]


@pytest.mark.parametrize("config", _configs(), ids=lambda c: type(c).__name__)
@pytest.mark.parametrize(
    ("factory", "engine_cls"),
    [(create_cpu_engine, CPUEngine), (create_cuda_engine, HFCudaEngine)],
    ids=["cpu", "cuda"],
)
def test_hf_factories_take_attribute_configs(config: Any, factory: Any, engine_cls: type) -> None:
    engine = factory(config)
    assert isinstance(engine, engine_cls)
    assert engine.config.engine_id.endswith("-0")
    assert engine.config.max_batch_size == 2 or engine.config.max_batch_size == 3
    assert engine.config.mock_mode is True


@pytest.mark.parametrize("config", _configs(), ids=lambda c: type(c).__name__)
def test_mock_factory_and_engine_factory_take_attribute_configs(config: Any) -> None:
    engine = create_mock_engine(config)
    assert isinstance(engine, MockEngine) and engine.config.engine_id.endswith("-0")
    made = EngineFactory.create("mock", config)
    assert isinstance(made, MockEngine) and made.config.engine_id == engine.config.engine_id


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="EngineFactory.create('cpu') checks that torch and transformers are installed",
)
def test_engine_factory_create_cpu_takes_a_namespace() -> None:
    ns = types.SimpleNamespace(model="mock-model", max_batch_size=2, mock_mode=True, x=1)
    assert isinstance(EngineFactory.create("cpu", ns), CPUEngine)


def test_missing_required_fields_are_all_named() -> None:
    with pytest.raises(ConfigError) as info:
        create_cuda_engine(types.SimpleNamespace(engine_id="x", colour="blue"))
    for name in ("model_path", "max_batch_size", "max_new_tokens"):
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="model_path"):
        create_cpu_engine(types.SimpleNamespace(max_batch_size=2))


def test_mapping_typos_are_still_errors() -> None:
    with pytest.raises(ConfigError, match="colour"):
        create_cpu_engine({"model": "m", "mock_mode": True, "colour": 1})


def test_non_config_objects_are_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="attribute"):
        create_cpu_engine(42)


def test_get_info_keeps_every_key_of_0_1_1_2() -> None:
    """0.1.1.2's MockEngine.get_info keys, with its ``request_count`` rule (every request
    received while running, rejected ones too, never reset) and ``mock_mode``."""
    import asyncio

    from sagellm_protocol import Request

    from sagellm_backend.engine.mock import MockEngine, MockEngineConfig

    published = {
        "engine_id", "model_path", "device", "max_batch_size", "is_running", "mock_mode",
        "simulate_latency_ms", "simulate_ttft_ms", "request_count",
    }  # fmt: skip

    def request(i: int, prompt: str = "hello world") -> Request:
        return Request(
            request_id=f"r{i}", trace_id="t", model="m", prompt=prompt, max_tokens=3,
            stream=False,
        )  # fmt: skip

    engine = MockEngine(MockEngineConfig("info", 0.0, 0.0))
    info = engine.get_info()
    assert published <= set(info), published - set(info)
    assert info["mock_mode"] is True and info["request_count"] == 0

    async def body() -> list[int]:
        counts = []
        await engine.start()
        for i in range(3):
            await engine.execute(request(i))
        counts.append(engine.get_info()["request_count"])
        async for _ in engine.stream(request(9)):
            pass
        counts.append(engine.get_info()["request_count"])
        bad = await engine.execute(request(10, prompt="x" * 200_000))  # longer than context
        assert bad.finish_reason == "error"
        counts.append(engine.get_info()["request_count"])
        await engine.stop()
        await engine.start()
        counts.append(engine.get_info()["request_count"])
        await engine.stop()
        return counts

    assert asyncio.run(body()) == [3, 4, 5, 5]


def test_a_plugin_engine_inherits_the_0_1_1_2_info_keys() -> None:
    from sagellm_backend.engine.base import BaseEngine, EngineConfig

    class PluginEngine(BaseEngine):
        @classmethod
        def backend_type(cls) -> str:
            return "plugin"

        async def start(self) -> None:
            self._running = True

        async def stop(self) -> None:
            self._running = False

        async def execute(self, request: Any) -> Any:
            raise NotImplementedError

        async def stream(self, request: Any) -> Any:  # pragma: no cover - not called
            raise NotImplementedError
            yield

    info = PluginEngine(EngineConfig(engine_id="p", mock_mode=True)).get_info()
    expected = {"engine_id": "p", "model_path": None, "device": "mock", "max_batch_size": 32}
    assert {k: info[k] for k in expected} == expected
    assert info["is_running"] is False and info["mock_mode"] is True
