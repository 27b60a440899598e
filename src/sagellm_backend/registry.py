"""Entry-point discovery of backends (``sagellm.backends``) and engines (``sagellm.engines``).

Hardware plugins register a factory under an entry-point group; this module finds them,
reports their state, picks the best one for this machine and creates it. The discovery
itself is generic over the group so the engine factory reuses it for ``sagellm.engines``.

Invariants (the faults of other plugin systems this module avoids):

* **Nothing is swallowed.** A plugin that raises while importing (or whose
  ``is_available()`` raises) is reported by entry-point name with the original exception
  chained (:class:`~sagellm_backend.errors.PluginLoadError`); it never hides the other
  kinds, and listing never raises because of one broken plugin.
* **No silent choice between two candidates.** Two *different* distributions registering
  the same kind is a :class:`~sagellm_backend.errors.PluginConflictError` when that kind is
  used. The same distribution seen twice (an editable install shadowing a site-packages
  copy) is one candidate: the first one on ``sys.path`` wins, as in the import system.
* **The override is validated up front.** ``SAGELLM_BACKEND=kind`` naming an unknown kind
  raises :class:`~sagellm_backend.errors.ConfigError` listing the valid kinds before
  anything is created; naming an unavailable one raises with the reason.
* **The choice is explained.** :meth:`BackendRegistry.select` returns a :class:`Selection`
  with the chosen ``kind`` and a human-readable ``reason`` (also logged at INFO).
* **The mock is never auto-selected.** Kinds with a negative priority (the built-in
  ``mock``) are created only when asked for by name.
* **Creating checks like selecting.** :meth:`BackendRegistry.create` goes through
  :meth:`BackendRegistry.select` whatever names the kind (argument, config ``kind``,
  ``SAGELLM_BACKEND`` or auto), so the ``is_available()`` hook is asked before the factory
  is called: an unavailable kind raises
  :class:`~sagellm_backend.errors.BackendNotAvailableError` with the plugin's reason, a
  raising hook a :class:`~sagellm_backend.errors.PluginLoadError` naming the plugin --
  exactly what ``select(kind)`` raises. ``EngineFactory.create`` does the same for engines.
* **Factory errors keep their type and name the plugin.** A factory's configuration or
  dependency error (:class:`~sagellm_backend.errors.BackendError`, ``ValueError``,
  ``TypeError``, ``ImportError``) is re-raised as is, so callers can still catch
  ``ValueError`` / ``ConfigError`` / ``DependencyMissingError``, with a PEP 678 note
  (``exc.__notes__``, shown in tracebacks and by the CLI) naming the kind, the entry point
  and the distribution; anything else is wrapped in a ``PluginLoadError`` (cause chained).

Plugin hooks (all optional, looked up on the object the entry point resolves to -- a
provider class with classmethods, or a factory function carrying attributes -- and, when it
has none, on the module that defines that object):

* ``is_available() -> bool``: cheap check whether the kind can run here (dependencies
  importable, device present). It must not create heavy objects. Without it the kind is
  assumed available once it loads.
* ``unavailable_reason() -> str | None``: why ``is_available()`` is False (shown by
  ``sagellm-backend info``).
* ``priority() -> int``: auto-selection priority, higher wins. Without it the built-in
  table applies (``cuda`` 100, ``cpu`` 10, ``mock`` -1) and any other kind gets 0.

Example:
    >>> from sagellm_backend.registry import BackendRegistry
    >>> registry = BackendRegistry()
    >>> "mock" in registry.kinds()
    True
    >>> backend = registry.create("mock")
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sagellm_backend.base import BackendProvider
from sagellm_backend.errors import (
    BackendError,
    BackendNotAvailableError,
    ConfigError,
    PluginConflictError,
    PluginLoadError,
)

__all__ = [
    "BACKENDS_GROUP",
    "BUILTIN_BACKEND_PRIORITIES",
    "ENGINES_GROUP",
    "ENV_BACKEND",
    "BackendRegistry",
    "PluginRecord",
    "PluginRegistry",
    "PluginSource",
    "PluginState",
    "PluginStatus",
    "Selection",
    "create_backend",
    "discover",
    "list_backends",
    "list_engines",
    "select_backend",
]

logger = logging.getLogger(__name__)

#: Entry-point group of backend providers (factory signature ``factory(config=None, **kw)``).
BACKENDS_GROUP = "sagellm.backends"
#: Entry-point group of engines (factory signature ``factory(config, backend)``).
ENGINES_GROUP = "sagellm.engines"
#: Environment variable that overrides backend auto-selection.
ENV_BACKEND = "SAGELLM_BACKEND"
#: Auto-selection priorities of the built-in kinds; a negative priority is never auto-selected.
BUILTIN_BACKEND_PRIORITIES: Mapping[str, int] = {"cuda": 100, "cpu": 10, "mock": -1}

_AUTO = "auto"


def _normalize_dist(name: str) -> str:
    """PEP 503 normalisation, so ``isagellm_backend`` and ``isagellm-backend`` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class PluginSource:
    """One distribution's registration of a kind.

    Attributes:
        value: the entry-point value (``"package.module:factory"``).
        dist_name: the providing distribution's name (None for an entry point without one).
        dist_version: its version (None when unknown).
        entry_point: the underlying entry point (what :meth:`PluginRecord.load` imports).
    """

    value: str
    dist_name: str | None
    dist_version: str | None
    entry_point: importlib.metadata.EntryPoint = field(compare=False, repr=False)

    @property
    def package(self) -> str:
        """``name==version`` of the providing distribution, for display."""
        if self.dist_name is None:
            return "(no distribution)"
        return f"{self.dist_name}=={self.dist_version}" if self.dist_version else self.dist_name

    @classmethod
    def from_entry_point(cls, ep: importlib.metadata.EntryPoint) -> PluginSource:
        """Build a source from an entry point, reading its distribution if it has one."""
        dist = getattr(ep, "dist", None)
        name: str | None = None
        version: str | None = None
        if dist is not None:
            name = dist.name
            version = dist.version
        return cls(value=ep.value, dist_name=name, dist_version=version, entry_point=ep)


@dataclass(frozen=True)
class PluginRecord:
    """Every registration of one kind in one group (before anything is imported).

    Invariant: ``sources`` is non-empty and holds one entry per *distinct* distribution;
    more than one means a conflict, and :meth:`load` refuses to pick.

    Attributes:
        group: the entry-point group.
        name: the kind (entry-point name).
        sources: the registrations, in discovery (``sys.path``) order.
    """

    group: str
    name: str
    sources: tuple[PluginSource, ...]

    @property
    def conflict(self) -> bool:
        """True when two different distributions register this kind."""
        return len(self.sources) > 1

    @property
    def value(self) -> str:
        """Entry-point value of the (first) registration."""
        return self.sources[0].value

    @property
    def dist_name(self) -> str | None:
        """Providing distribution of the (first) registration."""
        return self.sources[0].dist_name

    @property
    def dist_version(self) -> str | None:
        """Version of the providing distribution of the (first) registration."""
        return self.sources[0].dist_version

    @property
    def package(self) -> str:
        """Display form of the providing distribution(s)."""
        return " | ".join(s.package for s in self.sources)

    def conflict_error(self) -> PluginConflictError:
        """The error describing this record's conflict (only meaningful if ``conflict``)."""
        claims = "; ".join(f"{s.package} ({s.value})" for s in self.sources)
        names = " or ".join(s.dist_name or "?" for s in self.sources)
        return PluginConflictError(
            f"{self.group} kind {self.name!r} is registered by more than one distribution: "
            f"{claims}. Uninstall one of them (pip uninstall {names}) so the kind is "
            "unambiguous."
        )

    def load(self) -> Any:
        """Import the entry point and return the object it names.

        Raises:
            PluginConflictError: two distributions register this kind.
            PluginLoadError: the import (or attribute lookup) raised; the original exception
                is chained as ``__cause__``.
        """
        if self.conflict:
            raise self.conflict_error()
        source = self.sources[0]
        try:
            return source.entry_point.load()
        except Exception as exc:
            raise PluginLoadError(
                f"{self.group} plugin {self.name!r} (entry point {self.name} = {source.value}, "
                f"from {source.package}) failed to load: {type(exc).__name__}: {exc}",
                group=self.group,
                name=self.name,
            ) from exc


def _select_group(
    group: str, entry_points: Iterable[importlib.metadata.EntryPoint] | None
) -> list[importlib.metadata.EntryPoint]:
    if entry_points is None:
        # Looked up at call time so tests can monkeypatch importlib.metadata.entry_points.
        return list(importlib.metadata.entry_points(group=group))
    return [ep for ep in entry_points if ep.group == group]


def discover(
    group: str, *, entry_points: Iterable[importlib.metadata.EntryPoint] | None = None
) -> dict[str, PluginRecord]:
    """Find the registrations of ``group`` without importing any of them.

    Args:
        group: entry-point group, e.g. :data:`BACKENDS_GROUP` or :data:`ENGINES_GROUP`.
        entry_points: entry points to use instead of the installed ones (tests, embedding).

    Returns:
        Records by kind, sorted by kind. A kind registered by two different distributions
        has two sources (a conflict); duplicates of one distribution are collapsed.
    """
    grouped: dict[str, list[PluginSource]] = {}
    for ep in _select_group(group, entry_points):
        source = PluginSource.from_entry_point(ep)
        sources = grouped.setdefault(ep.name, [])
        if any(_same_distribution(source, seen) for seen in sources):
            continue
        sources.append(source)
    return {
        name: PluginRecord(group=group, name=name, sources=tuple(sources))
        for name, sources in sorted(grouped.items())
    }


def _same_distribution(a: PluginSource, b: PluginSource) -> bool:
    if a.dist_name is not None and b.dist_name is not None:
        return _normalize_dist(a.dist_name) == _normalize_dist(b.dist_name)
    return a.dist_name is None and b.dist_name is None and a.value == b.value


class PluginState(StrEnum):
    """State of a kind on this machine."""

    AVAILABLE = "available"
    """Loaded, and can run here."""
    UNAVAILABLE = "unavailable"
    """Loaded, but cannot run here (missing device or dependency)."""
    ERROR = "error"
    """Failed to load, conflicting registrations, or its availability check raised."""


@dataclass(frozen=True)
class PluginStatus:
    """What discovery found out about one kind.

    Attributes:
        group: entry-point group.
        name: the kind.
        value: entry-point value (of the first registration).
        package: providing distribution(s), ``name==version``.
        dist_name: providing distribution (first registration).
        dist_version: its version.
        state: available / unavailable / error.
        reason: why (the availability hook's answer, or the error message).
        priority: auto-selection priority (higher wins; negative: never auto-selected).
        loaded: whether the entry point imported successfully.
        error: the exception behind an ``error`` state (None otherwise).
    """

    group: str
    name: str
    value: str
    package: str
    dist_name: str | None
    dist_version: str | None
    state: PluginState
    reason: str
    priority: int
    loaded: bool
    error: BaseException | None = field(default=None, compare=False, repr=False)

    @property
    def available(self) -> bool:
        """True when the kind loaded and can run here."""
        return self.state is PluginState.AVAILABLE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the error as its type name and message)."""
        return {
            "group": self.group,
            "kind": self.name,
            "entry_point": self.value,
            "package": self.package,
            "dist_name": self.dist_name,
            "dist_version": self.dist_version,
            "state": self.state.value,
            "available": self.available,
            "loaded": self.loaded,
            "priority": self.priority,
            "reason": self.reason,
            "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
        }


class PluginRegistry:
    """Discovery, loading and state of the kinds of one entry-point group.

    Discovery runs once per instance (call :meth:`refresh` to rescan). Loaded objects and
    load errors are cached per kind, so listing and creating import each plugin once.
    Thread-safe.

    Args:
        group: the entry-point group.
        entry_points: entry points to use instead of the installed ones (tests).
        priorities: default priorities by kind for plugins without a ``priority()`` hook.
        default_priority: priority of a kind in neither the hook nor ``priorities``.
    """

    def __init__(
        self,
        group: str,
        *,
        entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
        priorities: Mapping[str, int] | None = None,
        default_priority: int = 0,
    ) -> None:
        self.group = group
        self._entry_points = None if entry_points is None else list(entry_points)
        self._priorities = dict(priorities or {})
        self._default_priority = default_priority
        self._lock = threading.RLock()
        self._records: dict[str, PluginRecord] | None = None
        self._loaded: dict[str, Any] = {}
        self._errors: dict[str, Exception] = {}

    def refresh(self) -> None:
        """Forget discovery and load results; the next call rescans the entry points."""
        with self._lock:
            self._records = None
            self._loaded.clear()
            self._errors.clear()

    def records(self) -> dict[str, PluginRecord]:
        """Registrations by kind (nothing imported)."""
        with self._lock:
            if self._records is None:
                self._records = discover(self.group, entry_points=self._entry_points)
            return dict(self._records)

    def kinds(self) -> list[str]:
        """Every registered kind, sorted (including broken ones)."""
        return list(self.records())

    def record(self, kind: str) -> PluginRecord:
        """The registration of ``kind``.

        Raises:
            ConfigError: no plugin registers ``kind``; the message lists the valid kinds.
        """
        records = self.records()
        found = records.get(kind)
        if found is None:
            raise ConfigError(
                f"unknown {self.group} kind {kind!r}; valid kinds: "
                f"{', '.join(records) or '(none installed)'}"
            )
        return found

    def load(self, kind: str) -> Any:
        """Import ``kind``'s entry point (cached) and return the object it names.

        Raises:
            ConfigError: unknown kind.
            PluginConflictError: two distributions register ``kind``.
            PluginLoadError: the import raised (original exception chained).
        """
        record = self.record(kind)
        with self._lock:
            if kind in self._loaded:
                return self._loaded[kind]
            if kind in self._errors:
                raise self._errors[kind]
            try:
                obj = record.load()
            except (PluginConflictError, PluginLoadError) as exc:
                self._errors[kind] = exc
                logger.warning("%s", exc)
                raise
            self._loaded[kind] = obj
            return obj

    def status(self, kind: str) -> PluginStatus:
        """Load ``kind`` and ask its hooks whether it can run here.

        Never raises for a plugin's own fault: that becomes an ``error`` state carrying the
        exception. Raises :class:`ConfigError` only for an unknown kind.
        """
        record = self.record(kind)
        base: dict[str, Any] = {
            "group": self.group,
            "name": kind,
            "value": record.value,
            "package": record.package,
            "dist_name": record.dist_name,
            "dist_version": record.dist_version,
        }
        try:
            obj = self.load(kind)
        except (PluginConflictError, PluginLoadError) as exc:
            return self._error_status(base, kind, exc, loaded=False)
        try:
            priority = self._priority_of(kind, obj)
            available, reason = self._availability_of(obj)
        except Exception as exc:
            error = PluginLoadError(
                f"{self.group} plugin {kind!r} ({record.value}, from {record.package}): "
                f"its availability hooks raised {type(exc).__name__}: {exc}",
                group=self.group,
                name=kind,
            )
            error.__cause__ = exc
            logger.warning("%s", error)
            return self._error_status(base, kind, error, loaded=True)
        return PluginStatus(
            **base,
            state=PluginState.AVAILABLE if available else PluginState.UNAVAILABLE,
            reason=reason,
            priority=priority,
            loaded=True,
        )

    def _error_status(
        self, base: dict[str, Any], kind: str, error: Exception, *, loaded: bool
    ) -> PluginStatus:
        """The ``error`` state of ``kind`` (``base``: its entry-point fields) with ``error``."""
        return PluginStatus(
            **base,
            state=PluginState.ERROR,
            reason=str(error),
            priority=self._priorities.get(kind, self._default_priority),
            loaded=loaded,
            error=error,
        )

    def statuses(self) -> list[PluginStatus]:
        """:meth:`status` of every kind, sorted by kind."""
        return [self.status(kind) for kind in self.kinds()]

    def _priority_of(self, kind: str, obj: Any) -> int:
        hook = _hook(obj, "priority")
        if hook is not None:
            value = hook()
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"priority() must return an int, got {value!r}")
            return value
        return self._priorities.get(kind, self._default_priority)

    @staticmethod
    def _availability_of(obj: Any) -> tuple[bool, str]:
        hook = _hook(obj, "is_available")
        if hook is None:
            return True, "loaded; declares no is_available() hook, so assumed available"
        result = hook()
        if not isinstance(result, bool):
            raise TypeError(f"is_available() must return a bool, got {result!r}")
        if result:
            return True, "is_available() returned True"
        why = _hook(obj, "unavailable_reason")
        text = why() if why is not None else None
        return False, str(text) if text else "is_available() returned False"


def add_note_once(exc: BaseException, note: str) -> None:
    """Attach ``note`` (PEP 678) to ``exc`` unless it already carries it.

    Used where an exception passes through unwrapped, to say which plugin raised it; an
    exception re-raised through the same path twice (a cached object) gets the note once.
    """
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)


def _hook(obj: Any, name: str) -> Callable[[], Any] | None:
    """A plugin hook: an attribute of the entry-point object, else of its defining module."""
    found = getattr(obj, name, None)
    if callable(found):
        return found  # type: ignore[no-any-return]
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    found = getattr(module, name, None) if module is not None else None
    return found if callable(found) else None


@dataclass(frozen=True)
class Selection:
    """The outcome of :meth:`BackendRegistry.select`.

    Attributes:
        kind: the chosen backend kind.
        reason: why it was chosen, in words (also logged).
        source: ``"explicit"`` (named by the caller), ``"env"`` (``SAGELLM_BACKEND``) or
            ``"auto"`` (highest-priority available kind).
        candidates: the status of every kind considered (auto selection only).
    """

    kind: str
    reason: str
    source: str
    candidates: tuple[PluginStatus, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "kind": self.kind,
            "reason": self.reason,
            "source": self.source,
            "candidates": [c.to_dict() for c in self.candidates],
        }


class BackendRegistry(PluginRegistry):
    """The ``sagellm.backends`` kinds: listing, auto-selection and creation.

    Args:
        entry_points: entry points to use instead of the installed ones (tests).
        environ: environment to read ``SAGELLM_BACKEND`` from (default ``os.environ``).
        priorities: overrides of :data:`BUILTIN_BACKEND_PRIORITIES`.
    """

    def __init__(
        self,
        *,
        entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
        environ: Mapping[str, str] | None = None,
        priorities: Mapping[str, int] | None = None,
    ) -> None:
        merged = dict(BUILTIN_BACKEND_PRIORITIES)
        merged.update(priorities or {})
        super().__init__(BACKENDS_GROUP, entry_points=entry_points, priorities=merged)
        self._environ = environ

    def _env_override(self) -> str | None:
        environ = os.environ if self._environ is None else self._environ
        value = environ.get(ENV_BACKEND, "").strip()
        return value or None

    def select(self, kind: str | None = None) -> Selection:
        """Choose a backend kind.

        Order: an explicit ``kind`` (other than ``"auto"``), else ``SAGELLM_BACKEND``
        (other than ``"auto"``), else the available kind with the highest priority (ties
        broken by name, and reported). Kinds with a negative priority (the mock) are never
        auto-selected.

        Raises:
            ConfigError: the named kind (argument or ``SAGELLM_BACKEND``) is unknown.
            PluginLoadError / PluginConflictError: the named kind is broken.
            BackendNotAvailableError: the named kind cannot run here, or (auto) no kind can;
                the message gives every kind's state and reason.
        """
        if kind is not None and kind != _AUTO:
            return self._named(kind, source="explicit", how=f"requested explicitly ({kind!r})")
        env = self._env_override()
        if env is not None and env != _AUTO:
            if env not in self.records():
                raise ConfigError(
                    f"{ENV_BACKEND}={env!r} is not an installed backend kind; valid kinds: "
                    f"{', '.join(self.kinds()) or '(none installed)'}, or 'auto'"
                )
            return self._named(env, source="env", how=f"{ENV_BACKEND}={env}")
        return self._auto()

    def _named(self, kind: str, *, source: str, how: str) -> Selection:
        status = self.status(kind)  # ConfigError for an unknown kind
        if status.state is PluginState.ERROR:
            assert status.error is not None
            raise status.error
        if status.state is PluginState.UNAVAILABLE:
            raise BackendNotAvailableError(
                f"backend {kind!r} ({how}) is not available on this machine: {status.reason}"
            )
        selection = Selection(kind=kind, reason=f"{how}; {status.reason}", source=source)
        logger.info("backend %r selected: %s", kind, selection.reason)
        return selection

    def _auto(self) -> Selection:
        statuses = self.statuses()  # broken plugins were logged (WARNING) while loading
        candidates = sorted(
            (s for s in statuses if s.available and s.priority >= 0),
            key=lambda s: (-s.priority, s.name),
        )
        summary = "; ".join(_describe(s) for s in statuses) or "no backend plugins installed"
        if not candidates:
            raise BackendNotAvailableError(
                "no backend can be auto-selected on this machine (" + summary + "). "
                f"Install one (e.g. pip install 'isagellm-backend[torch]'), or ask for the mock "
                f"explicitly with kind='mock' or {ENV_BACKEND}=mock."
            )
        best = candidates[0]
        ties = [c.name for c in candidates[1:] if c.priority == best.priority]
        tie_note = f" (tied with {', '.join(ties)}; chosen by name)" if ties else ""
        reason = (
            f"auto-selected: highest-priority available backend, priority {best.priority}"
            f"{tie_note}. Considered: {summary}"
        )
        selection = Selection(
            kind=best.name, reason=reason, source="auto", candidates=tuple(statuses)
        )
        logger.info("backend %r selected: %s", best.name, reason)
        return selection

    def create(self, kind: str | None = None, config: Any = None, **kwargs: Any) -> Any:
        """Create a backend provider.

        The kind goes through :meth:`select` first, however it is named, so a kind whose
        ``is_available()`` hook says no is refused before its factory runs (as by
        ``select(kind)`` and ``EngineFactory.create``).

        Args:
            kind: backend kind, or None/``"auto"`` to :meth:`select` one. When None and
                ``config`` has a ``kind`` (a sagellm-core ``BackendConfig``, or a dict with a
                ``"kind"`` key), that kind is used.
            config: passed to the factory as its first argument (the sagellm-core calling
                convention ``factory(config)``); omitted when None.
            **kwargs: passed to the factory.

        Returns:
            The provider; it satisfies :class:`~sagellm_backend.base.BackendProvider`.

        Raises:
            ConfigError: unknown kind; or whatever configuration error the factory raises.
            PluginLoadError: the plugin failed to import, its availability hooks raised, its
                factory raised an unexpected exception (chained), or it returned something
                that is not a provider.
            PluginConflictError: two distributions register the kind.
            BackendNotAvailableError: the kind's ``is_available()`` hook returned False (the
                message gives its reason), auto-selection found nothing, or the factory
                refused.
            ValueError / TypeError / ImportError / BackendError: the factory's own error,
                re-raised with its type and a note naming the plugin (``exc.__notes__``).
        """
        if kind is None:
            kind = _config_kind(config)
        kind = self.select(kind).kind  # load + availability hooks, for a named kind too
        factory = self.load(kind)
        if not callable(factory):
            raise PluginLoadError(
                f"{self.group} plugin {kind!r} ({self.record(kind).value}) is not callable: "
                f"{factory!r}",
                group=self.group,
                name=kind,
            )
        try:
            provider = factory(config, **kwargs) if config is not None else factory(**kwargs)
        except (BackendError, ValueError, TypeError, ImportError) as exc:
            # Configuration errors, missing device/dependency: the factory's own words and
            # type (callers catch ValueError/ConfigError/DependencyMissingError), plus which
            # plugin said them.
            record = self.record(kind)
            add_note_once(
                exc,
                f"while creating backend {kind!r} from entry point {self.group}: {kind} = "
                f"{record.value} ({record.package})",
            )
            raise
        except Exception as exc:
            raise PluginLoadError(
                f"{self.group} plugin {kind!r} ({self.record(kind).value}): the factory raised "
                f"{type(exc).__name__}: {exc}",
                group=self.group,
                name=kind,
            ) from exc
        if not isinstance(provider, BackendProvider):
            missing = [
                name for name in _PROVIDER_METHODS if not callable(getattr(provider, name, None))
            ]
            raise PluginLoadError(
                f"{self.group} plugin {kind!r} ({self.record(kind).value}) returned "
                f"{type(provider).__name__}, which is not a BackendProvider "
                f"(missing: {', '.join(missing)})",
                group=self.group,
                name=kind,
            )
        return provider


_PROVIDER_METHODS = (
    "capability",
    "create_stream",
    "create_event",
    "all_reduce",
    "all_gather",
    "kv_block_alloc",
    "kv_block_free",
    "kv_block_copy",
    "kv_block_migrate",
    "memory_stats",
    "clear_cache",
    "register_kernel",
    "get_kernel",
)


def _describe(status: PluginStatus) -> str:
    return f"{status.name}: {status.state.value} (priority {status.priority}; {status.reason})"


def _config_kind(config: Any) -> str | None:
    if config is None:
        return None
    value = config.get("kind") if isinstance(config, Mapping) else getattr(config, "kind", None)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"config kind must be a non-empty string, got {value!r}")
    return value


def list_backends() -> list[PluginStatus]:
    """Status of every installed ``sagellm.backends`` kind (never raises for broken plugins)."""
    return BackendRegistry().statuses()


def list_engines() -> list[PluginStatus]:
    """Status of every installed ``sagellm.engines`` kind (never raises for broken plugins)."""
    return PluginRegistry(ENGINES_GROUP).statuses()


def select_backend(kind: str | None = None) -> Selection:
    """Choose a backend kind (see :meth:`BackendRegistry.select`)."""
    return BackendRegistry().select(kind)


def create_backend(kind: str | None = None, config: Any = None, **kwargs: Any) -> Any:
    """Create a backend provider by kind, or the best one here (see :meth:`BackendRegistry.create`).

    Example:
        >>> from sagellm_backend import create_backend
        >>> backend = create_backend("mock")
    """
    return BackendRegistry().create(kind, config, **kwargs)
