"""Entry-point discovery of backends (``sagellm.backends``) and engines (``sagellm.engines``).

Hardware plugins register a factory under an entry-point group; this module finds them,
reports their state, picks the best one for this machine and creates it. The discovery
itself is generic over the group so the engine factory reuses it for ``sagellm.engines``.

Layout: discovery (records, nothing imported) is in :mod:`sagellm_backend._registry_discovery`,
the generic per-group loading and state in :mod:`sagellm_backend._registry_plugins`; this
module adds backend selection and creation and re-exports their public names.

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sagellm_backend._registry_discovery import PluginRecord, PluginSource, discover
from sagellm_backend._registry_plugins import (
    PluginRegistry,
    PluginState,
    PluginStatus,
    add_note_once,
)
from sagellm_backend.base import BackendProvider
from sagellm_backend.errors import (
    BackendError,
    BackendNotAvailableError,
    ConfigError,
    PluginLoadError,
)
from sagellm_backend.errors import (  # importable from here before the split; kept
    PluginConflictError as PluginConflictError,
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

    @property
    def forced_kind(self) -> str | None:
        """The kind ``SAGELLM_BACKEND`` forces (None when unset or ``"auto"``)."""
        env = self._env_override()
        return None if env is None or env == _AUTO else env

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
        env = self.forced_kind
        if env is not None:
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
