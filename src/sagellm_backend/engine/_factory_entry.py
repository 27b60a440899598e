"""One engine kind known to :class:`~sagellm_backend.engine.factory.EngineFactory`.

Part of :mod:`sagellm_backend.engine.factory` (which re-exports :class:`EngineEntry` and
:data:`EngineFactoryFn`): what an entry is, how it loads (built-in module, entry point),
what its hooks say, how a registration is checked and how an entry builds an engine.

Invariants: an entry's loader runs at most once, and its failure is kept in
:attr:`EngineEntry.error` and raised again on every later use; kind names are compared in
:func:`norm_kind` form (lower-case, ``-`` and white space equal ``_``).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sagellm_backend.engine._plugin import normalize_engine_config
from sagellm_backend.engine.base import BaseEngine, EngineConfig
from sagellm_backend.errors import BackendError, ConfigError, PluginConflictError, PluginLoadError

__all__ = [
    "EngineEntry",
    "EngineFactoryFn",
    "builtin_loader",
    "check_registration",
    "construct_engine",
    "entry_point_loader",
    "norm_kind",
]

#: ``factory(config, provider) -> engine``: the sagellm-core plugin calling convention.
EngineFactoryFn = Callable[[Any, Any], Any]


def norm_kind(name: str) -> str:
    """The canonical spelling of a kind name: lower-case, ``-`` and white space as ``_``."""
    return re.sub(r"[-\s]+", "_", name.strip().lower())


@dataclass
class EngineEntry:
    """One kind known to the factory.

    Attributes:
        name: the kind.
        source: ``"builtin"``, ``"entry_point"`` or ``"registered"``.
        engine_class: the engine class, once known (entry points may only give a factory).
        factory: ``factory(config, provider)``, used for configs that are not an
            :class:`EngineConfig` instance (dicts, sagellm-core configs, None).
        loader: loads ``(engine_class, factory)`` on first use (built-ins, entry points).
        aliases: extra names of this kind.
        entry_point: ``module:attr`` it comes from (display).
        package: providing distribution (display).
        error: the load failure, when loading failed.
        priority_override: priority given at registration (else the class's ``priority()``).
    """

    name: str
    source: str
    engine_class: type[BaseEngine] | None = None
    factory: EngineFactoryFn | None = None
    loader: Callable[[], tuple[type[BaseEngine] | None, EngineFactoryFn | None]] | None = None
    aliases: tuple[str, ...] = ()
    entry_point: str = ""
    package: str = ""
    error: BaseException | None = None
    priority_override: int | None = None
    _hooks: Any = field(default=None, repr=False)

    def load(self) -> None:
        """Run the loader once; a failure is kept in ``error`` and raised again each call."""
        if self.error is not None:
            raise self.error
        if self.loader is None:
            return
        loader, self.loader = self.loader, None
        try:
            cls, fn = loader()
        except (PluginLoadError, PluginConflictError) as exc:
            self.error = exc
            raise
        except Exception as exc:
            err = PluginLoadError(
                f"engine kind {self.name!r} ({self.entry_point or self.source}) failed to load: "
                f"{type(exc).__name__}: {exc}",
                group="sagellm.engines",
                name=self.name,
            )
            err.__cause__ = exc
            self.error = err
            raise err from exc
        self.engine_class = cls or self.engine_class
        self.factory = fn or self.factory

    def hooks(self) -> Any:
        """Object carrying is_available/priority (the class, else the factory)."""
        return self.engine_class if self.engine_class is not None else self.factory

    def status(self) -> tuple[bool, int, str]:
        """(available, priority, reason); a hook that raises becomes an error (raised)."""
        self.load()
        hooks = self.hooks()
        priority = self.priority_override
        if priority is None:
            hook = getattr(hooks, "priority", None)
            value = hook() if callable(hook) else 0
            if isinstance(value, bool) or not isinstance(value, int):
                raise PluginLoadError(
                    f"engine kind {self.name!r}: priority() must return an int, got {value!r}",
                    group="sagellm.engines",
                    name=self.name,
                )
            priority = value
        check = getattr(hooks, "is_available", None)
        if not callable(check):
            return True, priority, "declares no is_available() hook, so assumed available"
        ok = check()
        if not isinstance(ok, bool):
            raise PluginLoadError(
                f"engine kind {self.name!r}: is_available() must return a bool, got {ok!r}",
                group="sagellm.engines",
                name=self.name,
            )
        if ok:
            return True, priority, "is_available() returned True"
        why = getattr(hooks, "unavailable_reason", None)
        return False, priority, str(why()) if callable(why) else "is_available() returned False"


def builtin_loader(
    module: str, cls_name: str, fn_name: str
) -> Callable[[], tuple[type[BaseEngine] | None, EngineFactoryFn | None]]:
    """Loader of a built-in kind: imports ``module`` and returns its class and factory."""

    def load() -> tuple[type[BaseEngine] | None, EngineFactoryFn | None]:
        mod = importlib.import_module(module)
        cls = getattr(mod, cls_name)
        fn = getattr(mod, fn_name, None)
        return cls, fn

    return load


def entry_point_loader(
    kind: str, registry: Any
) -> Callable[[], tuple[type[BaseEngine] | None, EngineFactoryFn | None]]:
    """Loader of an entry-point kind: an engine class, or else a ``factory(config, backend)``.

    Args:
        kind: the entry-point name.
        registry: the :class:`~sagellm_backend.registry.PluginRegistry` that discovered it.
    """

    def load() -> tuple[type[BaseEngine] | None, EngineFactoryFn | None]:
        obj = registry.load(kind)  # PluginLoadError / PluginConflictError, by name
        if isinstance(obj, type) and issubclass(obj, BaseEngine):
            return obj, None
        if not callable(obj):
            raise PluginLoadError(
                f"sagellm.engines plugin {kind!r} resolves to {obj!r}, which is neither an "
                "engine class nor a factory(config, backend)",
                group="sagellm.engines",
                name=kind,
            )
        return None, obj

    return load


def check_registration(
    engine: type[BaseEngine] | str,
    engine_class: type[BaseEngine] | None,
    factory: EngineFactoryFn | None,
    priority: int | None,
) -> tuple[str, type[BaseEngine] | None]:
    """Validate the arguments of :meth:`EngineFactory.register`.

    Returns:
        ``(kind name as given, engine class or None)``.

    Raises:
        ConfigError: bad name/class, neither class nor factory, or a bad priority.
    """
    if isinstance(engine, type):
        if engine_class is not None:
            raise ConfigError("register(EngineClass) takes no second engine class")
        engine_class = engine
        if not issubclass(engine_class, BaseEngine):
            raise ConfigError(f"register needs a BaseEngine subclass, got {engine_class!r}")
        name = engine_class.backend_type()
    else:
        name = engine
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"engine kind must be a non-empty string, got {name!r}")
    if engine_class is not None and not (
        isinstance(engine_class, type) and issubclass(engine_class, BaseEngine)
    ):
        raise ConfigError(
            f"engine_class for kind {name!r} must be a BaseEngine subclass, got {engine_class!r}"
        )
    if engine_class is None and factory is None:
        raise ConfigError(f"register({name!r}) needs an engine_class or a factory")
    if factory is not None and not callable(factory):
        raise ConfigError(f"factory for kind {name!r} must be callable, got {factory!r}")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise ConfigError(f"priority for kind {name!r} must be an int, got {priority!r}")
    return name, engine_class


def construct_engine(entry: EngineEntry, config: Any, provider: Any) -> Any:
    """Build ``entry``'s engine from ``config`` (on ``provider`` when given).

    An :class:`EngineConfig` instance goes to the engine class as is (a copy when
    ``provider`` overrides its provider); other configs go to the entry's factory when it
    has one, else are normalised into a base :class:`EngineConfig` for the class.

    Raises:
        PluginLoadError: the factory raised something other than a configuration or
            dependency error (chained); those are re-raised as they are.
    """
    engine_cls = entry.engine_class
    if isinstance(config, EngineConfig) and engine_cls is not None:
        if provider is not None:
            config = copy.copy(config)
            config.provider = provider
        return engine_cls(config)
    if entry.factory is not None:
        try:
            return entry.factory(config, provider)
        except (BackendError, ValueError, TypeError, ImportError):
            raise  # the factory's own words about the config or a missing dependency
        except Exception as exc:
            raise PluginLoadError(
                f"engine kind {entry.name!r} ({entry.entry_point}): the factory raised "
                f"{type(exc).__name__}: {exc}",
                group="sagellm.engines",
                name=entry.name,
            ) from exc
    assert engine_cls is not None
    settings = normalize_engine_config(config, provider)
    base_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    extra = dict(settings.extra)
    metadata = extra.pop("metadata", {}) or {}
    direct = {k: extra.pop(k) for k in list(extra) if k in base_fields}
    kwargs: dict[str, Any] = {
        "engine_id": settings.engine_id,
        "model_path": settings.model_path,
        "provider": settings.provider,
        "metadata": {**metadata, **extra},
        **direct,
    }
    if settings.device is not None:
        kwargs["device"] = settings.device
    if settings.max_batch_size is not None:
        kwargs["max_batch_size"] = settings.max_batch_size
    return engine_cls(EngineConfig(**kwargs))
