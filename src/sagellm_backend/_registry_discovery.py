"""Entry-point discovery: which distributions register which kind, nothing imported.

Part of :mod:`sagellm_backend.registry` (which re-exports every public name here): the
records of one entry-point group, read from the installed metadata (or a list given by
tests), before any plugin is imported.

Invariants: :func:`discover` imports no plugin; a :class:`PluginRecord` holds one source
per *distinct* distribution (an editable install shadowing a site-packages copy of the same
distribution is one source, the first on ``sys.path``), so more than one source is a
conflict that :meth:`PluginRecord.load` refuses to resolve.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sagellm_backend.errors import PluginConflictError, PluginLoadError

__all__ = ["PluginRecord", "PluginSource", "discover", "normalize_dist"]


def normalize_dist(name: str) -> str:
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
        return normalize_dist(a.dist_name) == normalize_dist(b.dist_name)
    return a.dist_name is None and b.dist_name is None and a.value == b.value
