"""Creating engines from the registry of :class:`~sagellm_backend.engine.factory.EngineFactory`.

:class:`EngineCreation` is EngineFactory's creation half: ``create`` (a named kind, or
``"auto"``), ``select`` and the order ``create("auto")`` tries. The rules are those of the
:mod:`~sagellm_backend.engine.factory` module docstring (availability asked before
building; ``mock`` tried last; a kind that cannot serve the config or machine is passed over
with a WARNING; an engine's own error keeps its type and gets a note naming the kind).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, cast

from sagellm_backend._registry_plugins import add_note_once
from sagellm_backend.engine._factory_entry import EngineEntry, construct_engine, norm_kind
from sagellm_backend.engine._plugin import is_backend_provider
from sagellm_backend.engine.base import BaseEngine
from sagellm_backend.errors import (
    BackendError,
    BackendNotAvailableError,
    ConfigError,
    DependencyMissingError,
    PluginLoadError,
)

__all__ = ["EngineCreation"]

_log = logging.getLogger("sagellm_backend.engine.factory")

#: Kinds ``create("auto")`` tries last, whatever their priority (0.1.1.2's fallback).
_AUTO_FALLBACK = frozenset({"mock"})
#: What an object a kind's factory returns must have to count as an engine.
_ENGINE_METHODS = ("start", "stop", "execute", "stream")


class EngineCreation:
    """Creation half of EngineFactory (class-level; a mixin).

    Invariants: the host class provides the registry -- ``_lock`` guards ``_entries``
    (resolved kind -> :class:`EngineEntry`), ``_ensure()`` discovers the kinds once,
    ``_status(entry)`` gives (available, priority, reason, load error) and
    ``resolve_kind(name)`` maps a kind or alias to its key or raises ConfigError.
    """

    if TYPE_CHECKING:
        _lock: ClassVar[threading.RLock]
        _entries: ClassVar[dict[str, EngineEntry]]

        @classmethod
        def _ensure(cls) -> None: ...

        @classmethod
        def _status(cls, entry: EngineEntry) -> tuple[bool, int, str, BaseException | None]: ...

        @classmethod
        def resolve_kind(cls, name: str) -> str: ...

    @classmethod
    def _auto_order(cls) -> list[str]:
        """The available kinds ``create("auto")`` tries, in order (see the module docstring).

        Raises:
            BackendNotAvailableError: none is available (the message lists every kind's
                state).
        """
        with cls._lock:
            cls._ensure()
            entries = list(cls._entries.values())
        rows = []
        summary = []
        for entry in sorted(entries, key=lambda e: e.name):
            ok, priority, reason, _ = cls._status(entry)
            summary.append(
                f"{entry.name}: {'available' if ok else 'unavailable'} (priority {priority}; "
                f"{reason})"
            )
            fallback = entry.name in _AUTO_FALLBACK
            if ok and (priority >= 0 or fallback):
                rows.append((fallback, -priority, entry.name))
        if not rows:
            states = "; ".join(summary) or "no engine kinds are registered"
            raise BackendNotAvailableError(
                f"no engine can be auto-selected here ({states}); register one or install a "
                "plugin package"
            )
        return [name for *_, name in sorted(rows)]

    @classmethod
    def select(cls) -> str:
        """The kind ``create("auto")`` tries first: the highest-priority available one.

        ``mock`` only when no other kind with a priority >= 0 is available.

        Raises:
            BackendNotAvailableError: no kind is available (every kind's state listed).
        """
        return cls._auto_order()[0]

    @classmethod
    def create(
        cls, backend_type: str | None = "auto", config: Any = None, provider: Any = None
    ) -> BaseEngine:
        """Create an engine.

        Args:
            backend_type: a kind or alias, or ``"auto"``/None (the ``kind`` of ``config`` if
                it has one, else the highest-priority available kind).
            config: the engine's own config (an :class:`EngineConfig` subclass instance), a
                dict, a sagellm-core ``EngineConfig``, or None.
            provider: a backend provider to run on (overrides ``config.provider``).

        Raises:
            ConfigError: unknown kind (valid ones listed), bad config, or not a provider.
            BackendNotAvailableError: the kind cannot run here (with the reason).
            PluginLoadError / PluginConflictError: the kind is broken (named).
        """
        if provider is not None and not is_backend_provider(provider):
            raise ConfigError(
                f"EngineFactory.create provider must be a backend provider, "
                f"got {type(provider).__name__}"
            )
        kind = backend_type
        if kind is None or norm_kind(kind) == "auto":
            cfg_kind = cls._config_kind(config)
            kind = cfg_kind if cfg_kind is not None and norm_kind(cfg_kind) != "auto" else None
        if kind is None:
            return cls._create_auto(config, provider)
        return cls._create_kind(cls.resolve_kind(kind), config, provider)

    @classmethod
    def _create_auto(cls, config: Any, provider: Any) -> BaseEngine:
        """``create("auto")``: the first kind of :meth:`_auto_order` that takes ``config``."""
        passed: list[str] = []
        last: BackendError | None = None
        for key in cls._auto_order():
            try:
                engine = cls._create_kind(key, config, provider)
            except (ConfigError, BackendNotAvailableError, DependencyMissingError) as exc:
                passed.append(f"{key}: {type(exc).__name__}: {exc}")
                _log.warning("EngineFactory.create('auto'): passing over %s", passed[-1])
                last = exc
                continue
            if passed or key in _AUTO_FALLBACK:
                _log.warning(
                    "EngineFactory.create('auto'): using engine kind %r (%s)%s",
                    key,
                    type(engine).__name__,
                    "" if passed else ": no other engine kind is available here",
                )
            return engine
        raise BackendNotAvailableError(
            "no engine kind could be created for this config: " + "; ".join(passed)
        ) from last

    @classmethod
    def _create_kind(cls, key: str, config: Any, provider: Any) -> BaseEngine:
        """Create the engine of the resolved kind ``key`` (availability asked first)."""
        entry = cls._entries[key]
        ok, _, reason, error = cls._status(entry)
        if error is not None:
            raise error
        if not ok:
            raise BackendNotAvailableError(
                f"engine kind {key!r} is not available on this machine: {reason}"
            )
        engine = cls._build(entry, config, provider)
        if not all(callable(getattr(engine, m, None)) for m in _ENGINE_METHODS):
            raise PluginLoadError(
                f"engine kind {key!r} ({entry.entry_point}) returned {type(engine).__name__}, "
                f"which lacks {', '.join(m for m in _ENGINE_METHODS if not hasattr(engine, m))}",
                group="sagellm.engines",
                name=key,
            )
        return cast(BaseEngine, engine)

    @staticmethod
    def _config_kind(config: Any) -> str | None:
        if config is None:
            return None
        value = config.get("kind") if isinstance(config, Mapping) else getattr(config, "kind", None)
        return value if isinstance(value, str) and value else None

    @classmethod
    def _build(cls, entry: EngineEntry, config: Any, provider: Any) -> Any:
        package = f", from {entry.package}" if entry.package else ""
        note = f"while creating engine kind {entry.name!r} ({entry.source} {entry.entry_point}"
        note += f"{package})"
        try:
            return construct_engine(entry, config, provider)
        except PluginLoadError as exc:
            if (exc.group, exc.name) != ("sagellm.engines", entry.name):  # ours name it
                add_note_once(exc, note)
            raise
        except Exception as exc:
            add_note_once(exc, note)
            raise
