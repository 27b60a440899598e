"""Broken third-party plugins: reported by name, never hiding the others.

A temporary package provides ``sagellm.backends`` and ``sagellm.engines`` entry points that
fail in each way a plugin can: the module raises on import, the factory raises, the
availability hook raises, the factory returns junk. The installed entry points plus these
are served by a monkeypatched ``importlib.metadata.entry_points`` (and sagellm-core's own
reference to it), so every consumer sees the same "installed" set.

What our side guarantees (asserted below):

* :class:`~sagellm_backend.registry.BackendRegistry` and
  :class:`~sagellm_backend.engine.factory.EngineFactory` list every kind; a broken one is
  in the ``error`` state with its name and cause, listing never raises, creating it raises
  :class:`~sagellm_backend.errors.PluginLoadError` naming it (cause chained), and the
  built-in kinds and healthy plugins are created normally; auto-selection skips broken
  kinds.
* sagellm-core 0.1.x (``create_backend``/``create_engine``) still creates the built-in
  kinds while a third-party plugin whose *factory* (or availability hook) is broken is
  installed: it only calls the factory of the kind asked for.
* sagellm-core 0.1.x imports *every* entry point of a group before choosing one
  (``list_entry_points``), so a third-party plugin whose *module fails to import* breaks
  sagellm-core for every kind. That is sagellm-core's behaviour, not ours; our entry-point
  modules import without torch and never fail, and our own registry keeps working.
"""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sagellm_backend.engine.factory import EngineFactory
from sagellm_backend.engine.mock import MockEngine
from sagellm_backend.errors import PluginLoadError
from sagellm_backend.providers.mock import MockBackendProvider
from sagellm_backend.registry import (
    BACKENDS_GROUP,
    ENGINES_GROUP,
    BackendRegistry,
    PluginState,
    list_backends,
    list_engines,
)

_MODULES = {
    "broken_import": "import sagellm_no_such_dependency_xyz\n",
    "factory_raises": textwrap.dedent(
        """
        def create_backend(config=None, **kw):
            raise RuntimeError("backend factory exploded")
        def create_engine(config, backend):
            raise RuntimeError("engine factory exploded")
        """
    ),
    "hook_raises": textwrap.dedent(
        """
        from sagellm_backend.providers.mock import MockBackendProvider
        def create_backend(config=None, **kw):
            return MockBackendProvider()
        def is_available():
            raise OSError("driver query crashed")
        """
    ),
    "junk": textwrap.dedent(
        """
        def create_backend(config=None, **kw):
            return 42
        def create_engine(config, backend):
            return "not an engine"
        """
    ),
    "good": textwrap.dedent(
        """
        from sagellm_backend.engine.mock import MockEngine, MockEngineConfig
        from sagellm_backend.providers.mock import MockBackendProvider
        def create_backend(config=None, **kw):
            return MockBackendProvider(device_name="third-party")
        def create_engine(config, backend):
            return MockEngine(MockEngineConfig("third-party-engine", 0.0, 0.0))
        def priority():
            return 1
        """
    ),
}

BROKEN = {
    "xbroken_import": "sagellm_no_such_dependency_xyz",
    "xfactory_raises": "exploded",
    "xhook_raises": "driver query crashed",
    "xjunk": "",
}


@pytest.fixture
def plugin_package(tmp_path: Path) -> Iterator[str]:
    name = f"sagellm_test_plugins_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for module, source in _MODULES.items():
        (pkg / f"{module}.py").write_text(source)
    sys.path.insert(0, str(tmp_path))
    yield name
    sys.path.remove(str(tmp_path))
    for mod in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[mod]


def _eps(pkg: str, modules: tuple[str, ...]) -> list[importlib.metadata.EntryPoint]:
    out = []
    for module in modules:
        out.append(
            importlib.metadata.EntryPoint(
                name=f"x{module}", value=f"{pkg}.{module}:create_backend", group=BACKENDS_GROUP
            )
        )
        if module != "hook_raises":
            out.append(
                importlib.metadata.EntryPoint(
                    name=f"x{module}", value=f"{pkg}.{module}:create_engine", group=ENGINES_GROUP
                )
            )
    return out


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch, plugin_package: str) -> Iterator[Any]:
    """``install(*modules)``: make those plugin modules look installed, everywhere."""
    real = importlib.metadata.entry_points
    installed = [ep for group in (BACKENDS_GROUP, ENGINES_GROUP) for ep in real(group=group)]

    def do(*modules: str) -> None:
        extra = _eps(plugin_package, modules)

        def fake(**params: Any) -> Any:
            group = params.get("group")
            if group in (BACKENDS_GROUP, ENGINES_GROUP):
                return [ep for ep in (*installed, *extra) if ep.group == group]
            return real(**params)

        monkeypatch.setattr(importlib.metadata, "entry_points", fake)
        core_plugins = sys.modules.get("sagellm_core.plugins")
        if core_plugins is not None and hasattr(core_plugins, "entry_points"):
            monkeypatch.setattr(core_plugins, "entry_points", fake)
        EngineFactory.refresh()

    yield do
    EngineFactory.refresh()


# ---------------------------------------------------------------------------- our registry


def test_backend_registry_reports_each_broken_plugin_by_name(install: Any) -> None:
    install("broken_import", "factory_raises", "hook_raises", "junk", "good")
    registry = BackendRegistry(environ={})
    statuses = {s.name: s for s in registry.statuses()}  # never raises
    assert {"mock", "cpu", "cuda", "xgood", *BROKEN} <= set(statuses)
    load_error = statuses["xbroken_import"]
    assert load_error.state is PluginState.ERROR and not load_error.loaded
    assert "xbroken_import" in load_error.reason and BROKEN["xbroken_import"] in load_error.reason
    assert isinstance(load_error.error, PluginLoadError)
    assert isinstance(load_error.error.__cause__, ImportError)
    hook = statuses["xhook_raises"]
    assert hook.state is PluginState.ERROR and "driver query crashed" in hook.reason
    # factories are only called on create: these two load fine
    assert statuses["xfactory_raises"].state is PluginState.AVAILABLE
    assert statuses["xjunk"].state is PluginState.AVAILABLE
    # the built-ins and the healthy plugin are unaffected
    assert statuses["mock"].state is PluginState.AVAILABLE
    assert statuses["xgood"].state is PluginState.AVAILABLE
    assert isinstance(registry.create("mock"), MockBackendProvider)
    good = registry.create("xgood")
    assert good.capability().device_name == "third-party"
    # creating a broken kind names it; the cause is chained
    with pytest.raises(PluginLoadError, match="xbroken_import") as info:
        registry.create("xbroken_import")
    assert isinstance(info.value.__cause__, ImportError)
    with pytest.raises(PluginLoadError, match=r"xfactory_raises.*backend factory exploded") as info:
        registry.create("xfactory_raises")
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(PluginLoadError, match=r"xhook_raises.*driver query crashed"):
        registry.select("xhook_raises")
    # create() asks the hooks first, like select() and EngineFactory.create (its factory
    # would work, but the plugin is broken)
    with pytest.raises(PluginLoadError, match=r"xhook_raises.*driver query crashed"):
        registry.create("xhook_raises")
    with pytest.raises(PluginLoadError, match=r"xjunk.*not a BackendProvider"):
        registry.create("xjunk")
    # auto-selection skips the broken kinds and is not hidden by them
    chosen = registry.select()
    assert chosen.kind not in BROKEN and chosen.kind != "mock"
    assert "xbroken_import" in chosen.reason  # the summary names every kind's state
    # the module-level listings never raise either
    names = {s.name for s in list_backends()}
    assert set(BROKEN) <= names
    assert {"xbroken_import", "xfactory_raises", "xjunk"} <= {s.name for s in list_engines()}


def test_engine_factory_reports_each_broken_plugin_by_name(install: Any) -> None:
    install("broken_import", "factory_raises", "junk", "good")
    info = {i["kind"]: i for i in EngineFactory.get_engine_info()}  # never raises
    assert {"mock", "cpu", "cuda", "xgood", "xbroken_import", "xfactory_raises"} <= set(info)
    broken = info["xbroken_import"]
    assert broken["is_available"] is False
    assert "xbroken_import" in broken["error"] and BROKEN["xbroken_import"] in broken["error"]
    assert info["mock"]["error"] is None and info["mock"]["is_available"] is True
    assert info["xgood"]["is_available"] is True
    assert isinstance(EngineFactory.create("mock", {"engine_id": "m"}), MockEngine)
    assert EngineFactory.create("xgood", {}).engine_id == "third-party-engine"
    with pytest.raises(PluginLoadError, match="xbroken_import"):
        EngineFactory.create("xbroken_import", {})
    with pytest.raises(PluginLoadError, match=r"xfactory_raises.*engine factory exploded"):
        EngineFactory.create("xfactory_raises", {})
    with pytest.raises(PluginLoadError, match="xjunk"):
        EngineFactory.create("xjunk", {})
    assert EngineFactory.select() not in ("xbroken_import", "xfactory_raises", "mock")
    # asking again gives the same named error (the failure is remembered, not retried)
    with pytest.raises(PluginLoadError, match="xbroken_import"):
        EngineFactory.create("xbroken_import", {})


# ---------------------------------------------------------------------------- sagellm-core


async def _core_mock_roundtrip() -> None:
    from sagellm_core import BackendConfig, EngineConfig, create_backend, create_engine

    backend = create_backend(BackendConfig(kind="mock"))
    assert isinstance(backend, MockBackendProvider)
    engine = create_engine(EngineConfig(kind="mock", model="m", max_batch_size=2), backend)
    assert isinstance(engine, MockEngine)
    await engine.start()
    from .conftest import make_request

    resp = await engine.execute(make_request(max_tokens=3))
    assert resp.finish_reason == "length"
    await engine.stop()


async def test_core_creates_builtins_while_a_broken_factory_is_installed(install: Any) -> None:
    pytest.importorskip("sagellm_core")
    from sagellm_core import BackendConfig, create_backend

    install("factory_raises", "hook_raises", "junk", "good")
    await _core_mock_roundtrip()
    # the broken kinds fail only when asked for, with their own error
    with pytest.raises(RuntimeError, match="backend factory exploded"):
        create_backend(BackendConfig(kind="xfactory_raises"))


async def test_core_with_a_plugin_that_fails_to_import(install: Any) -> None:
    """sagellm-core 0.1.x loads every entry point: an import-broken plugin breaks it.

    Documented limitation (sagellm-core's ``list_entry_points``); our registry and engine
    factory keep creating the built-in kinds and name the broken plugin.
    """
    pytest.importorskip("sagellm_core")
    from sagellm_core import BackendConfig, create_backend

    install("broken_import")
    with pytest.raises(ImportError, match="sagellm_no_such_dependency_xyz"):
        create_backend(BackendConfig(kind="mock"))
    # our side still works and says why
    assert isinstance(BackendRegistry(environ={}).create("mock"), MockBackendProvider)
    assert isinstance(EngineFactory.create("mock", {"engine_id": "m"}), MockEngine)
    status = BackendRegistry(environ={}).status("xbroken_import")
    assert status.state is PluginState.ERROR and "xbroken_import" in status.reason
