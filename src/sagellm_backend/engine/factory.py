"""EngineFactory: the registry of engine kinds, auto-selection and creation.

Kinds come from three places, all shown by :meth:`EngineFactory.get_engine_info`:

* **built-in** (``mock``, ``cpu``, ``cuda``): engine classes of this package, imported on
  first use (importing their modules never imports torch);
* **entry points** of the ``sagellm.engines`` group from other distributions, discovered
  with :class:`sagellm_backend.registry.PluginRegistry` (this package's own entry points are
  the built-ins above and are not loaded twice);
* **registered** at run time with :meth:`EngineFactory.register` /
  :meth:`EngineFactory.register_engine`.

Invariants:
    * A kind that fails to load (import error, hook raising, two distributions claiming it)
      is reported by name in :meth:`get_engine_info` and when it is asked for; it never hides
      the other kinds and never makes listing raise.
    * ``create("auto")`` tries the available kinds with a priority >= 0, highest first (ties
      broken by name), then ``mock`` last, as 0.1.1.2 did: a kind that cannot serve the
      config (``ConfigError``, e.g. no ``model_path``) or this machine
      (``BackendNotAvailableError``, ``DependencyMissingError``) is passed over with a
      WARNING log naming it and why, so a fallback to the simulation is never silent. Other
      kinds with a negative priority are only created by name. When every kind is passed
      over, the error lists each one's reason.
    * An unknown kind raises :class:`~sagellm_backend.errors.ConfigError` listing the kinds
      that exist; aliases (``hf_cuda`` -> ``cuda``, ...) resolve before lookup.
    * :meth:`EngineFactory.create` asks the kind's ``is_available()`` hook before building
      anything, for a named kind too (``BackendRegistry.create`` does the same).
    * An engine class's or factory's own error (:class:`~sagellm_backend.errors.BackendError`,
      ``ValueError``, ``TypeError``, ``ImportError``; anything from an engine class) keeps its
      type and gets a PEP 678 note (``exc.__notes__``) naming the kind and where it comes
      from; any other exception of a factory is wrapped in a ``PluginLoadError`` (chained).
    * All state is class-level and guarded by one lock.

One kind's entry (loading, hooks, registration checks, construction) is
:mod:`sagellm_backend.engine._factory_entry`; creation from the registry (``create``,
``select``) is :mod:`sagellm_backend.engine._factory_create`; this module holds the
registry of kinds.

Example:
    >>> from sagellm_backend.engine.factory import EngineFactory
    >>> engine = EngineFactory.create("mock", {"engine_id": "m0", "simulate_ttft_ms": 0.0})
    >>> type(engine).__name__
    'MockEngine'
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from sagellm_backend._lazy import resolve_lazy
from sagellm_backend._registry_discovery import normalize_dist
from sagellm_backend.base import BackendProvider as BackendProvider  # 0.1.1.2 export
from sagellm_backend.engine._factory_create import EngineCreation
from sagellm_backend.engine._factory_entry import (
    EngineEntry,
    EngineFactoryFn,
    builtin_loader,
    check_registration,
    entry_point_loader,
    norm_kind,
)
from sagellm_backend.engine._plugin import normalize_engine_config as normalize_engine_config
from sagellm_backend.engine.base import BaseEngine
from sagellm_backend.engine.base import EngineConfig as EngineConfig
from sagellm_backend.errors import BackendError as BackendError
from sagellm_backend.errors import (
    ConfigError,
    PluginConflictError,
)

# The ``X as X`` imports (BackendError, EngineConfig, normalize_engine_config) keep names
# that were importable from this module before EngineEntry moved out importable here.
__all__ = ["BUILTIN_ENGINES", "ENGINE_ALIASES", "EngineEntry", "EngineFactory", "EngineFactoryFn"]

_log = logging.getLogger(__name__)

#: 0.1.1.2 names this module also exports (resolved lazily: the mock engine module is
#: imported on first access only).
_LAZY_COMPAT = dict.fromkeys(("MockEngine", "create_mock_engine"), "sagellm_backend.engine.mock")


def __getattr__(name: str) -> Any:
    """Resolve ``MockEngine`` / ``create_mock_engine`` (0.1.1.2 exports) on first access."""
    return resolve_lazy(globals(), _LAZY_COMPAT, name)


#: 0.1.1.2 name of :data:`EngineFactoryFn`.
AdapterFactory = EngineFactoryFn

#: Built-in kinds: (module, engine class name, entry-point factory name).
BUILTIN_ENGINES: Mapping[str, tuple[str, str, str]] = {
    "mock": ("sagellm_backend.engine.mock", "MockEngine", "create_mock_engine"),
    "cpu": ("sagellm_backend.engine.cpu", "CPUEngine", "create_cpu_engine"),
    "cuda": ("sagellm_backend.engine.hf_cuda", "HFCudaEngine", "create_cuda_engine"),
}

#: Alternative spellings of kinds (lower-case, ``-`` and ``_`` equivalent).
ENGINE_ALIASES: Mapping[str, str] = {
    "hf_cuda": "cuda",
    "hfcuda": "cuda",
    "huggingface_cuda": "cuda",
    "gpu": "cuda",
    "hf_cpu": "cpu",
    "cpu_engine": "cpu",
    "mock_engine": "mock",
}

_OWN_DISTRIBUTIONS = frozenset({"isagellm-backend"})


class EngineFactory(EngineCreation):
    """Class-level registry of engine kinds (see the module docstring).

    Creation (``create``, ``select``, the ``"auto"`` order) is
    :class:`~sagellm_backend.engine._factory_create.EngineCreation`.
    """

    _lock: ClassVar[threading.RLock] = threading.RLock()
    _entries: ClassVar[dict[str, EngineEntry]] = {}
    _aliases: ClassVar[dict[str, str]] = {}
    _discovered: ClassVar[bool] = False
    _entry_points: ClassVar[list[importlib.metadata.EntryPoint] | None] = None

    # ------------------------------------------------------------------ discovery
    @classmethod
    def _ensure(cls) -> None:
        with cls._lock:
            if cls._discovered:
                return
            cls._discovered = True
            for alias, target in ENGINE_ALIASES.items():
                cls._aliases.setdefault(alias, target)
            for name, (module, cls_name, fn_name) in BUILTIN_ENGINES.items():
                if name in cls._entries:
                    continue
                cls._entries[name] = EngineEntry(
                    name=name,
                    source="builtin",
                    loader=builtin_loader(module, cls_name, fn_name),
                    entry_point=f"{module}:{cls_name}",
                    package="isagellm-backend",
                )
            cls._discover_entry_points()

    @classmethod
    def _discover_entry_points(cls) -> None:
        from sagellm_backend.registry import ENGINES_GROUP, PluginRegistry

        registry = PluginRegistry(ENGINES_GROUP, entry_points=cls._entry_points)
        for kind, record in registry.records().items():
            own = [
                s
                for s in record.sources
                if s.dist_name is not None and normalize_dist(s.dist_name) in _OWN_DISTRIBUTIONS
            ]
            foreign = [s for s in record.sources if s not in own]
            target = cls._aliases.get(norm_kind(kind), norm_kind(kind))
            if own and not foreign and target in cls._entries:
                continue  # our own entry point: the built-in (or its alias) covers it
            if target in cls._entries and cls._entries[target].source == "builtin":
                # A third-party distribution claims a built-in kind: refuse to choose.
                claims = "; ".join(f"{s.package} ({s.value})" for s in record.sources)
                entry = cls._entries[target]
                entry.error = PluginConflictError(
                    f"engine kind {target!r} is built into isagellm-backend and also "
                    f"registered by {claims}; uninstall the other distribution"
                )
                continue
            cls._entries[kind] = EngineEntry(
                name=kind,
                source="entry_point",
                loader=entry_point_loader(kind, registry),
                entry_point=record.value,
                package=record.package,
            )

    @classmethod
    def refresh(cls, entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> None:
        """Forget everything and rediscover the built-ins and the ``sagellm.engines`` group.

        Args:
            entry_points: use these instead of the installed entry points (tests).
        """
        with cls._lock:
            cls._entries = {}
            cls._aliases = {}
            cls._discovered = False
            cls._entry_points = None if entry_points is None else list(entry_points)
        cls._ensure()

    @classmethod
    def clear_registry(cls) -> None:
        """Remove every kind, built-ins included (:meth:`refresh` brings them back)."""
        with cls._lock:
            cls._entries = {}
            cls._aliases = {}
            cls._discovered = True

    # ------------------------------------------------------------------ registration
    @classmethod
    def register(
        cls,
        engine_cls: type[BaseEngine] | str,
        engine_class: type[BaseEngine] | None = None,
        *,
        factory: EngineFactoryFn | None = None,
        aliases: Iterable[str] = (),
        priority: int | None = None,
        replace: bool = False,
    ) -> None:
        """Register a kind: ``register(EngineClass)`` (0.1.1.x) or ``register("kind", ...)``.

        Args:
            engine_cls: an engine class (its ``backend_type()`` is the kind) or the kind name
                (case-insensitive; ``-`` equals ``_``).
            engine_class: the engine class when ``engine_cls`` is a name.
            factory: ``factory(config, provider)`` for dict/None/foreign configs.
            aliases: other names of the kind.
            priority: overrides the class's ``priority()`` for auto-selection.
            replace: allow replacing a different registration of the kind.

        Raises:
            ConfigError: bad name/class, neither class nor factory, or the kind is already
                registered to something else without ``replace=True``.
        """
        name, engine_class = check_registration(engine_cls, engine_class, factory, priority)
        key = norm_kind(name)
        alias_keys = tuple(norm_kind(a) for a in aliases)
        with cls._lock:
            cls._ensure()
            old = cls._entries.get(key)
            if old is not None and not replace:
                if old.loader is not None:
                    with contextlib.suppress(Exception):
                        old.load()
                same = old.engine_class is engine_class and old.error is None
                if not same:
                    raise ConfigError(
                        f"engine kind {key!r} is already registered ({old.source}: "
                        f"{old.engine_class or old.entry_point}); pass replace=True to replace it"
                    )
                # Re-registering the same class keeps its factory unless a new one is given.
                factory = factory or old.factory
            cls._entries[key] = EngineEntry(
                name=key,
                source="registered",
                engine_class=engine_class,
                factory=factory,
                aliases=alias_keys,
                entry_point=(
                    f"{engine_class.__module__}:{engine_class.__qualname__}"
                    if engine_class is not None
                    else getattr(factory, "__qualname__", repr(factory))
                ),
                priority_override=priority,
            )
            cls._aliases.pop(key, None)
            for alias in alias_keys:
                cls._aliases[alias] = key

    @classmethod
    def register_engine(
        cls,
        engine_cls: type[BaseEngine],
        *,
        name: str | None = None,
        factory: EngineFactoryFn | None = None,
        aliases: Iterable[str] = (),
        priority: int | None = None,
        replace: bool = False,
    ) -> type[BaseEngine]:
        """Register ``engine_cls`` under ``name`` (default ``engine_cls.backend_type()``).

        Usable as a class decorator; returns the class.
        """
        if not (isinstance(engine_cls, type) and issubclass(engine_cls, BaseEngine)):
            raise ConfigError(f"register_engine needs a BaseEngine subclass, got {engine_cls!r}")
        kind = name if name is not None else engine_cls.backend_type()
        cls.register(
            kind, engine_cls, factory=factory, aliases=aliases, priority=priority, replace=replace
        )
        return engine_cls

    @classmethod
    def unregister(cls, engine_cls: type[BaseEngine] | str) -> bool:
        """Remove a kind (by class or name) and its aliases; False if it was not registered."""
        engine = engine_cls
        with cls._lock:
            cls._ensure()
            if isinstance(engine, type):
                keys = [k for k, e in cls._entries.items() if e.engine_class is engine]
                if not keys and issubclass(engine, BaseEngine):
                    keys = [norm_kind(engine.backend_type())]
            else:
                key = norm_kind(engine)
                keys = [cls._aliases.get(key, key)]
            removed = False
            for key in keys:
                if cls._entries.pop(key, None) is not None:
                    removed = True
                    for alias in [a for a, t in cls._aliases.items() if t == key]:
                        del cls._aliases[alias]
            return removed

    # ------------------------------------------------------------------ queries
    @classmethod
    def resolve_kind(cls, name: str) -> str:
        """Canonical kind of ``name`` (aliases resolved).

        Raises:
            ConfigError: unknown kind (the message lists the known ones).
        """
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"engine kind must be a non-empty string, got {name!r}")
        key = norm_kind(name)
        with cls._lock:
            cls._ensure()
            key = cls._aliases.get(key, key)
            if key not in cls._entries:
                raise ConfigError(
                    f"unknown engine kind {name!r}; valid kinds: "
                    f"{', '.join(cls._known_names()) or '(none registered)'}, or 'auto' "
                    f"(available here: {', '.join(cls.available_backends()) or 'none'})"
                )
            return key

    @classmethod
    def _known_names(cls) -> list[str]:
        return sorted(cls._entries)

    @classmethod
    def _status(cls, entry: EngineEntry) -> tuple[bool, int, str, BaseException | None]:
        try:
            ok, priority, reason = entry.status()
        except Exception as exc:
            if entry.error is None:
                entry.error = exc
            return False, entry.priority_override or 0, f"{type(exc).__name__}: {exc}", exc
        return ok, priority, reason, None

    @classmethod
    def all_backends(cls) -> list[str]:
        """Every known kind, sorted (broken and unavailable ones included)."""
        with cls._lock:
            cls._ensure()
            return cls._known_names()

    @classmethod
    def available_backends(cls) -> list[str]:
        """Kinds that load and can run here, highest priority first (then by name)."""
        with cls._lock:
            cls._ensure()
            entries = list(cls._entries.values())
        rows = []
        for entry in entries:
            ok, priority, _, _ = cls._status(entry)
            if ok:
                rows.append((-priority, entry.name))
        return [name for _, name in sorted(rows)]

    @classmethod
    def available_engines(cls) -> list[str]:
        """Same as :meth:`available_backends` (0.1.1.x name)."""
        return cls.available_backends()

    @classmethod
    def get_engine_info(cls) -> list[dict[str, Any]]:
        """Describe every kind, sorted by kind (see :meth:`engine_info` for the keys)."""
        with cls._lock:
            cls._ensure()
            entries = sorted(cls._entries.values(), key=lambda e: e.name)
        return [cls._info(e) for e in entries]

    @classmethod
    def engine_info(cls, kind: str) -> dict[str, Any]:
        """Describe one kind (aliases accepted).

        Keys: ``name`` (engine class name, or the kind when only a factory is known),
        ``backend_type`` and ``kind`` (the kind), ``priority``, ``is_available``, ``source``
        (builtin / entry_point / registered), ``entry_point``, ``package``, ``reason``,
        ``error`` (``"Type: message"`` or None) and ``aliases``.

        Raises:
            ConfigError: unknown kind.
        """
        return cls._info(cls._entries[cls.resolve_kind(kind)])

    @classmethod
    def _info(cls, entry: EngineEntry) -> dict[str, Any]:
        ok, priority, reason, error = cls._status(entry)
        err = entry.error or error
        aliases = sorted(a for a, t in cls._aliases.items() if t == entry.name)
        return {
            "name": entry.engine_class.__name__ if entry.engine_class else entry.name,
            "backend_type": entry.name,
            "kind": entry.name,
            "priority": priority,
            "is_available": ok,
            "source": entry.source,
            "entry_point": entry.entry_point,
            "package": entry.package,
            "reason": reason,
            "error": None if err is None else f"{type(err).__name__}: {err}",
            "aliases": aliases,
        }
