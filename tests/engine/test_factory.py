"""EngineFactory: built-ins, registration, aliases, auto-selection, sagellm.engines plugins."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sagellm_core import EngineConfig as CoreEngineConfig
from sagellm_protocol import Request, Response

from sagellm_backend.engine.base import BaseEngine, EngineConfig, StreamEvent
from sagellm_backend.engine.factory import EngineFactory
from sagellm_backend.engine.mock import MockEngine, MockEngineConfig
from sagellm_backend.errors import (
    BackendNotAvailableError,
    ConfigError,
    PluginConflictError,
    PluginLoadError,
)


@pytest.fixture(autouse=True)
def _fresh_factory() -> Iterator[None]:
    EngineFactory.refresh()
    yield
    EngineFactory.refresh()


class _FakeEngine(BaseEngine):
    available = True
    prio = 5

    async def start(self) -> None:
        self._running = True

    async def stop(self) -> None:
        self._running = False

    async def execute(self, request: Request) -> Response:
        raise NotImplementedError

    def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        raise NotImplementedError

    @classmethod
    def backend_type(cls) -> str:
        return "fake"

    @classmethod
    def is_available(cls) -> bool:
        return cls.available

    @classmethod
    def priority(cls) -> int:
        return cls.prio


class _Provider:
    def capability(self) -> None: ...

    def kv_block_alloc(self, num_tokens: int, dtype: Any) -> None: ...


# ---------------------------------------------------------------------------- built-ins


def test_builtins_are_listed() -> None:
    kinds = EngineFactory.all_backends()
    assert {"mock", "cpu", "cuda"} <= set(kinds)
    assert "mock" in EngineFactory.available_backends()
    assert EngineFactory.available_engines() == EngineFactory.available_backends()
    info = {i["kind"]: i for i in EngineFactory.get_engine_info()}
    assert info["mock"]["name"] == "MockEngine"
    assert info["mock"]["source"] == "builtin"
    assert info["mock"]["is_available"] is True
    assert info["mock"]["error"] is None
    assert {"name", "backend_type", "priority", "is_available"} <= set(info["cuda"])


def test_create_mock_from_dict_and_config() -> None:
    eng = EngineFactory.create("mock", {"engine_id": "m1", "simulate_ttft_ms": 0.0})
    assert isinstance(eng, MockEngine)
    assert eng.engine_id == "m1"
    cfg = MockEngineConfig("m2", 1.0, 2.0)
    eng2 = EngineFactory.create("mock", cfg)
    assert eng2.config is cfg
    provider = _Provider()
    eng3 = EngineFactory.create("mock", cfg, provider=provider)
    assert eng3.config.provider is provider
    assert cfg.provider is None  # the caller's config is not modified


def test_create_uses_config_kind_for_auto() -> None:
    eng = EngineFactory.create("auto", {"kind": "mock", "engine_id": "m3"})
    assert isinstance(eng, MockEngine)
    core = EngineFactory.create(None, CoreEngineConfig(kind="mock", model="x"))
    assert isinstance(core, MockEngine)
    assert core.config.model_path == "x"


def test_unknown_kind_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        EngineFactory.create("tpu", {"engine_id": "x"})
    msg = str(info.value)
    assert "'tpu'" in msg and "mock" in msg and "cuda" in msg


def test_aliases_resolve() -> None:
    assert EngineFactory.resolve_kind("hf_cuda") == "cuda"
    assert EngineFactory.resolve_kind("HF-CUDA") == "cuda"
    assert EngineFactory.resolve_kind("mock_engine") == "mock"
    assert EngineFactory.engine_info("hf_cuda")["kind"] == "cuda"
    assert "hf_cuda" in EngineFactory.engine_info("cuda")["aliases"]


def test_provider_must_be_a_provider() -> None:
    with pytest.raises(ConfigError, match="provider"):
        EngineFactory.create("mock", {"engine_id": "x"}, provider="cpu")


# ---------------------------------------------------------------------------- registration


def test_register_legacy_class_form_and_unregister() -> None:
    EngineFactory.register(_FakeEngine)
    assert "fake" in EngineFactory.all_backends()
    eng = EngineFactory.create("fake", EngineConfig(engine_id="f1"))
    assert isinstance(eng, _FakeEngine)
    # A dict config becomes an EngineConfig (unknown keys go to metadata).
    eng2 = EngineFactory.create("fake", {"engine_id": "f2", "device": "cpu", "color": "red"})
    assert eng2.config.device == "cpu" and eng2.config.metadata == {"color": "red"}
    EngineFactory.register(_FakeEngine)  # same class again: fine
    assert EngineFactory.unregister(_FakeEngine) is True
    assert EngineFactory.unregister(_FakeEngine) is False
    assert "fake" not in EngineFactory.all_backends()


def test_register_conflict_needs_replace() -> None:
    class Other(_FakeEngine):
        pass

    EngineFactory.register("fake", _FakeEngine, aliases=["phony"])
    assert EngineFactory.resolve_kind("phony") == "fake"
    with pytest.raises(ConfigError, match="already registered"):
        EngineFactory.register("fake", Other)
    EngineFactory.register("fake", Other, replace=True)
    assert EngineFactory.engine_info("fake")["name"] == "Other"
    with pytest.raises(ConfigError, match="already registered"):
        EngineFactory.register(MockEngine.backend_type(), _FakeEngine)
    assert EngineFactory.unregister("phony") is True


def test_register_engine_decorator_and_factory() -> None:
    calls: list[tuple[Any, Any]] = []

    def make(config: Any, provider: Any) -> _FakeEngine:
        calls.append((config, provider))
        return _FakeEngine(EngineConfig(engine_id="from-factory"))

    assert EngineFactory.register_engine(_FakeEngine, name="deco", factory=make) is _FakeEngine
    provider = _Provider()
    eng = EngineFactory.create("deco", {"anything": 1}, provider=provider)
    assert eng.engine_id == "from-factory"
    assert calls == [({"anything": 1}, provider)]


@pytest.mark.parametrize(
    "error",
    [
        ValueError("max_batch_size must be >= 1"),
        TypeError("make() got an unexpected keyword argument 'x'"),
        ImportError("libfoo missing"),
        ConfigError("device 'npu:3' does not exist"),
        BackendNotAvailableError("device lost"),
    ],
)
def test_factory_errors_keep_their_type_and_name_the_kind(error: Exception) -> None:
    def make(config: Any, provider: Any) -> _FakeEngine:
        raise error

    EngineFactory.register("noisy", factory=make)
    for _ in range(2):  # the same object raised twice carries the note once
        with pytest.raises(type(error)) as info:
            EngineFactory.create("noisy", {})
        assert info.value is error
        notes = getattr(info.value, "__notes__", [])
        assert len(notes) == 1, notes
        assert notes[0].startswith("while creating engine kind 'noisy' (registered ")
        assert "make" in notes[0]


def test_engine_class_errors_name_the_kind_and_factory_crashes_are_wrapped() -> None:
    with pytest.raises(ConfigError, match="mock_mode") as info:
        EngineFactory.create("mock", {"engine_id": "m", "mock_mode": "yes"})
    assert any("engine kind 'mock' (builtin" in n for n in info.value.__notes__)

    def crash(config: Any, provider: Any) -> _FakeEngine:
        raise KeyError("handle")

    EngineFactory.register("crashy", factory=crash)
    with pytest.raises(PluginLoadError, match=r"'crashy'.*factory raised KeyError") as err:
        EngineFactory.create("crashy", {})
    assert isinstance(err.value.__cause__, KeyError)
    assert not getattr(err.value, "__notes__", [])  # the message names the kind already


@pytest.mark.parametrize(
    ("args", "kwargs", "needle"),
    [
        (("",), {"factory": lambda c, p: None}, "non-empty"),
        (("x", int), {}, "BaseEngine subclass"),
        (("x",), {}, "engine_class or a factory"),
        (("x",), {"factory": 3}, "callable"),
        (("x", _FakeEngine), {"priority": "high"}, "priority"),
    ],
)
def test_register_rejects_bad_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        EngineFactory.register(*args, **kwargs)


def test_clear_registry_and_refresh() -> None:
    EngineFactory.clear_registry()
    assert EngineFactory.all_backends() == []
    with pytest.raises(ConfigError, match="none registered"):
        EngineFactory.create("mock", {"engine_id": "x"})
    EngineFactory.refresh()
    assert "mock" in EngineFactory.all_backends()


# ---------------------------------------------------------------------------- auto


def test_auto_picks_highest_priority_available_and_mock_only_last(
    caplog: pytest.LogCaptureFixture,
) -> None:
    EngineFactory.clear_registry()
    with pytest.raises(BackendNotAvailableError, match="no engine kinds are registered"):
        EngineFactory.create("auto", {"engine_id": "x"})
    EngineFactory.register("mock", MockEngine)
    assert EngineFactory.select() == "mock"
    with caplog.at_level("WARNING", logger="sagellm_backend.engine.factory"):
        assert isinstance(EngineFactory.create("auto", {"engine_id": "x"}), MockEngine)
    assert "using engine kind 'mock' (MockEngine): no other engine kind" in caplog.text

    class Low(_FakeEngine):
        prio = 1

    class High(_FakeEngine):
        prio = 50

    class Down(_FakeEngine):
        prio = 99
        available = False

    EngineFactory.register("low", Low)
    EngineFactory.register("high", High)
    EngineFactory.register("down", Down)
    assert EngineFactory.select() == "high"
    assert EngineFactory.available_backends()[0] == "high"
    assert "down" not in EngineFactory.available_backends()
    eng = EngineFactory.create(config=EngineConfig(engine_id="a1"))
    assert isinstance(eng, High)
    with pytest.raises(BackendNotAvailableError, match="'down' is not available"):
        EngineFactory.create("down", EngineConfig(engine_id="d"))
    EngineFactory.register("low", Low, priority=100, replace=True)
    assert EngineFactory.select() == "low"


# ---------------------------------------------------------------------------- entry points


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A module directory on sys.path with a unique package name."""
    name = f"h3plugin_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    yield tmp_path, name
    sys.path.remove(str(tmp_path))
    for mod in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[mod]


def _ep(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group="sagellm.engines")


def test_third_party_entry_points_appear_and_broken_ones_are_named(
    plugin_dir: tuple[Path, str],
) -> None:
    root, pkg = plugin_dir
    (root / pkg / "good.py").write_text(
        textwrap.dedent(
            """
            from sagellm_backend.engine.mock import MockEngine, MockEngineConfig
            CALLS = []
            def factory(config, backend):
                CALLS.append((config, backend))
                return MockEngine(MockEngineConfig("third-party"))
            factory.priority = lambda: 3
            """
        )
    )
    (root / pkg / "broken.py").write_text("import no_such_module_h3\n")
    (root / pkg / "raises.py").write_text(
        "def factory(config, backend):\n    raise RuntimeError('boom in factory')\n"
    )
    (root / pkg / "junk.py").write_text("def factory(config, backend):\n    return 42\n")
    installed = list(importlib.metadata.entry_points(group="sagellm.engines"))
    EngineFactory.refresh(
        [
            *installed,
            _ep("thirdparty", f"{pkg}.good:factory"),
            _ep("brokenkind", f"{pkg}.broken:factory"),
            _ep("raiser", f"{pkg}.raises:factory"),
            _ep("junk", f"{pkg}.junk:factory"),
        ]
    )
    kinds = EngineFactory.all_backends()
    assert {"mock", "cpu", "cuda", "thirdparty", "brokenkind", "raiser", "junk"} <= set(kinds)
    info = {i["kind"]: i for i in EngineFactory.get_engine_info()}
    assert info["thirdparty"]["source"] == "entry_point"
    assert info["thirdparty"]["is_available"] is True and info["thirdparty"]["priority"] == 3
    assert info["brokenkind"]["is_available"] is False
    assert "brokenkind" in info["brokenkind"]["error"]
    assert "no_such_module_h3" in info["brokenkind"]["error"]
    # the built-ins still work
    assert info["mock"]["is_available"] is True
    assert isinstance(EngineFactory.create("mock", {"engine_id": "ok"}), MockEngine)
    # the good plugin is created with the sagellm-core convention factory(config, backend)
    provider = _Provider()
    eng = EngineFactory.create("thirdparty", {"k": 1}, provider=provider)
    assert eng.engine_id == "third-party"
    good = sys.modules[f"{pkg}.good"]
    assert [({"k": 1}, provider)] == good.CALLS
    with pytest.raises(PluginLoadError, match="brokenkind"):
        EngineFactory.create("brokenkind", {})
    with pytest.raises(PluginLoadError, match=r"raiser.*boom in factory"):
        EngineFactory.create("raiser", {})
    with pytest.raises(PluginLoadError, match=r"junk.*lacks"):
        EngineFactory.create("junk", {})


def test_third_party_claiming_a_builtin_kind_is_a_conflict(plugin_dir: tuple[Path, str]) -> None:
    root, pkg = plugin_dir
    (root / pkg / "dup.py").write_text("def factory(config, backend):\n    return None\n")
    installed = list(importlib.metadata.entry_points(group="sagellm.engines"))
    EngineFactory.refresh([*installed, _ep("mock", f"{pkg}.dup:factory")])
    with pytest.raises(PluginConflictError, match="mock"):
        EngineFactory.create("mock", {"engine_id": "x"})
    assert EngineFactory.engine_info("mock")["error"] is not None
    # other kinds are unaffected
    assert "cuda" in EngineFactory.all_backends()


def test_own_entry_points_are_not_loaded_twice() -> None:
    info = {i["kind"]: i for i in EngineFactory.get_engine_info()}
    assert "hf_cuda" not in info  # an alias of the built-in cuda, not a second kind
    assert info["mock"]["source"] == "builtin"


def test_auto_passes_over_a_kind_that_cannot_take_the_config(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """0.1.1.2's rule: a config no real engine can serve (no model) gets the mock, logged."""
    EngineFactory.clear_registry()
    EngineFactory.register("mock", MockEngine)

    class NeedsModel(_FakeEngine):
        prio = 50

        def __init__(self, config: Any) -> None:
            if getattr(config, "model_path", None) is None:
                raise ConfigError("needs-model engine config is missing model_path")
            super().__init__(config)

    EngineFactory.register("needs_model", NeedsModel)
    assert EngineFactory.select() == "needs_model"
    with caplog.at_level("WARNING", logger="sagellm_backend.engine.factory"):
        engine = EngineFactory.create("auto", EngineConfig(engine_id="a"))
    assert isinstance(engine, MockEngine) and engine.engine_id == "a"
    assert "passing over needs_model: ConfigError: needs-model engine config is missing" in (
        caplog.text
    )
    assert "using engine kind 'mock'" in caplog.text
    real = EngineFactory.create("auto", EngineConfig(engine_id="b", model_path="/m"))
    assert isinstance(real, NeedsModel)


def test_auto_lists_every_reason_when_no_kind_takes_the_config() -> None:
    EngineFactory.clear_registry()

    class Picky(_FakeEngine):
        prio = 5

        def __init__(self, config: Any) -> None:
            raise ConfigError(f"{type(self).__name__} refuses {config.engine_id!r}")

    class Pickier(Picky):
        prio = 7

    EngineFactory.register("picky", Picky)
    EngineFactory.register("pickier", Pickier)
    with pytest.raises(BackendNotAvailableError) as info:
        EngineFactory.create("auto", EngineConfig(engine_id="z"))
    message = str(info.value)
    assert message.index("pickier: ConfigError: Pickier refuses 'z'") < message.index(
        "picky: ConfigError: Picky refuses 'z'"
    )
    assert isinstance(info.value.__cause__, ConfigError)


def test_auto_does_not_pass_over_a_kind_that_fails_otherwise() -> None:
    """Only "cannot serve this" errors move on; a plugin's bug surfaces as itself."""
    EngineFactory.clear_registry()
    EngineFactory.register("mock", MockEngine)

    class Broken(_FakeEngine):
        prio = 5

        def __init__(self, config: Any) -> None:
            raise ZeroDivisionError("bug in the plugin")

    EngineFactory.register("broken", Broken)
    with pytest.raises(ZeroDivisionError, match="bug in the plugin"):
        EngineFactory.create("auto", EngineConfig(engine_id="q"))
