"""Kernel registry: named implementations, each tagged with the KernelKind it implements.

Invariants:
    * A name maps to exactly one :class:`KernelSpec`; registering an existing name raises
      :class:`~sagellm_backend.errors.KernelAlreadyRegisteredError` unless ``replace=True``
      -- or unless the existing kernel is a provider's built-in default (``builtin=True``)
      and the new one is not: a user's own kernel takes the name over, as on 0.1.1.2,
      whose providers registered no kernels of their own.
    * :meth:`KernelRegistry.kinds` is derived from what is registered, so a provider's
      ``capability().supported_kernels`` never claims a kind it cannot run.
    * Lookups of unknown names raise :class:`~sagellm_backend.errors.KernelNotFoundError`
      (a ``KeyError``) that lists the registered names.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sagellm_backend.capability import DType, KernelKind
from sagellm_backend.errors import (
    ConfigError,
    KernelAlreadyRegisteredError,
    KernelNotFoundError,
)

__all__ = ["KernelRegistry", "KernelSpec"]


@dataclass(frozen=True)
class KernelSpec:
    """One registered kernel.

    Attributes:
        name: registry key (e.g. ``"paged_attention"``).
        impl: the callable.
        kind: the protocol :class:`KernelKind` it implements (None: not a standard kind).
        dtypes: dtypes it accepts; empty means "any dtype the provider supports".
        description: one line for ``sagellm-backend info``.
        builtin: a default the provider registered itself (a user kernel may replace it).
    """

    name: str
    impl: Callable[..., Any]
    kind: KernelKind | None = None
    dtypes: frozenset[DType] = field(default_factory=frozenset)
    description: str = ""
    builtin: bool = False


class KernelRegistry:
    """Thread-safe map from kernel name to :class:`KernelSpec`."""

    def __init__(self, specs: Iterable[KernelSpec] = ()) -> None:
        self._lock = threading.Lock()
        self._specs: dict[str, KernelSpec] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: KernelSpec, *, replace: bool = False) -> None:
        """Register ``spec``.

        A non-built-in ``spec`` replaces a built-in kernel of the same name without
        ``replace``, keeping the built-in's ``kind`` when it names none.

        Raises:
            KernelAlreadyRegisteredError: the name exists and ``replace`` is False (and it is
                not a built-in being replaced by a user kernel).
            ValueError: the name is empty or ``impl`` is not callable.
        """
        if not isinstance(spec.name, str) or not spec.name:
            raise ValueError(f"kernel name must be a non-empty string, got {spec.name!r}")
        if not callable(spec.impl):
            raise ValueError(f"kernel {spec.name!r}: impl must be callable, got {spec.impl!r}")
        with self._lock:
            old = self._specs.get(spec.name)
            if old is not None and not replace and (spec.builtin or not old.builtin):
                raise KernelAlreadyRegisteredError(
                    f"kernel {spec.name!r} is already registered; pass replace=True to override it"
                )
            if old is not None and old.builtin and spec.kind is None:
                spec = dataclasses.replace(spec, kind=old.kind)
            self._specs[spec.name] = spec

    def register(
        self,
        name: str,
        impl: Callable[..., Any],
        *,
        kind: KernelKind | None = None,
        dtypes: Iterable[DType] = (),
        description: str = "",
        replace: bool = False,
        builtin: bool = False,
    ) -> KernelSpec:
        """Build a :class:`KernelSpec` and :meth:`add` it; returns the spec."""
        spec = KernelSpec(name, impl, kind, frozenset(dtypes), description, builtin)
        self.add(spec, replace=replace)
        return spec

    def register_for(
        self,
        name: str,
        impl: Callable[..., Any],
        *,
        check_dtype: Callable[[Any], DType],
        kind: KernelKind | str | None = None,
        dtypes: Iterable[DType | str] = (),
        replace: bool = False,
        description: str = "",
    ) -> KernelSpec:
        """Register a provider's user kernel (:meth:`register`, with checked arguments).

        ``kind`` may be a KernelKind or its value; each of ``dtypes`` goes through the
        provider's ``check_dtype``.

        Raises:
            KernelAlreadyRegisteredError: see :meth:`add`.
            UnsupportedDTypeError: (from ``check_dtype``) a dtype the provider lacks.
            ConfigError: ``kind`` is not a KernelKind (the message lists the valid ones).
        """
        k: KernelKind | None = None
        if kind is not None:
            try:
                k = KernelKind(kind)
            except ValueError as exc:
                valid = ", ".join(x.value for x in KernelKind)
                raise ConfigError(f"unknown kernel kind {kind!r}; valid: {valid}") from exc
        checked = [check_dtype(d) for d in dtypes]
        return self.register(
            name, impl, kind=k, dtypes=checked, description=description, replace=replace
        )

    def remove(self, name: str) -> None:
        """Unregister ``name`` (KernelNotFoundError if absent)."""
        with self._lock:
            if name not in self._specs:
                raise self._missing(name)
            del self._specs[name]

    def spec(self, name: str) -> KernelSpec:
        """Return the spec registered under ``name``."""
        with self._lock:
            found = self._specs.get(name)
            if found is None:
                raise self._missing(name)
            return found

    def get(self, name: str) -> Callable[..., Any]:
        """Return the callable registered under ``name``."""
        return self.spec(name).impl

    def names(self) -> list[str]:
        """Registered names, sorted."""
        with self._lock:
            return sorted(self._specs)

    def kinds(self) -> list[KernelKind]:
        """The distinct KernelKinds implemented by registered kernels, in protocol order."""
        with self._lock:
            present = {s.kind for s in self._specs.values() if s.kind is not None}
        return [k for k in KernelKind if k in present]

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._specs

    def __len__(self) -> int:
        with self._lock:
            return len(self._specs)

    def _missing(self, name: str) -> KernelNotFoundError:
        names = ", ".join(sorted(self._specs)) or "(none)"
        return KernelNotFoundError(f"no kernel named {name!r}; registered kernels: {names}")
