"""Lazy public names (PEP 562): one resolver shared by the packages that export lazily.

A package keeps a table ``{public name: module that defines it}`` (written module by module
with :func:`lazy_table`) and a module-level ``__getattr__`` that calls :func:`resolve_lazy`.
Invariants: a name is imported on its first access only, then cached in the package
namespace (so ``__getattr__`` is not called for it again); an unknown name raises the same
``AttributeError`` Python itself raises.
Importing this module imports only :mod:`importlib`.
"""

from __future__ import annotations

import importlib
from collections.abc import Container, Iterable, Mapping
from typing import Any

__all__ = ["lazy_table", "resolve_lazy"]


def lazy_table(modules: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """The ``{public name: module}`` table of ``{module: the names it defines}``.

    The names keep the order of ``modules`` and of each module's names; a name listed under
    two modules belongs to the later one.
    """
    return {name: module for module, names in modules.items() for name in names}


def resolve_lazy(
    namespace: dict[str, Any],
    table: Mapping[str, str],
    name: str,
    submodules: Container[str] = (),
) -> Any:
    """Import and return the lazily exported ``name`` of the package owning ``namespace``.

    Args:
        namespace: the package's ``globals()``; the resolved value is stored in it.
        table: public name -> dotted name of the module that defines it.
        name: the attribute asked for.
        submodules: names of the package's submodules that are returned (imported) as
            attributes even before anything imported them; they are not cached here.

    Returns:
        The value of ``name``.

    Raises:
        AttributeError: ``name`` is neither in ``table`` nor in ``submodules``.
    """
    module = table.get(name)
    package = namespace["__name__"]
    if module is None:
        if name in submodules:  # e.g. ``sagellm_backend.base`` after a bare import
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    namespace[name] = value
    return value
