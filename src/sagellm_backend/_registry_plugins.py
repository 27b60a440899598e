"""Loading of one entry-point group's plugins, their hooks and their state on this machine.

Part of :mod:`sagellm_backend.registry` (which re-exports every public name here; see its
docstring for the plugin hooks). :class:`PluginRegistry` is generic over the group: the
backend registry and the engine factory both build on it.

Invariants: a plugin's own fault (import error, conflicting registrations, a raising or
ill-typed hook) never escapes :meth:`PluginRegistry.status`: it becomes an ``error`` state
carrying the exception; each kind is imported at most once per registry (the object or the
error is cached until :meth:`PluginRegistry.refresh`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sagellm_backend._registry_discovery import PluginRecord, discover
from sagellm_backend.errors import ConfigError, PluginConflictError, PluginLoadError

__all__ = ["PluginRegistry", "PluginState", "PluginStatus", "add_note_once"]

# The records logged here are the registry's: keep the logger users configure.
logger = logging.getLogger("sagellm_backend.registry")


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
