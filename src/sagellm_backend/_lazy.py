"""Lazy public names (PEP 562): one resolver shared by the packages that export lazily.

A package keeps a table ``{public name: module that defines it}`` (written module by module
with :func:`lazy_table`) and a module-level ``__getattr__`` that calls :func:`resolve_lazy`
(:func:`lazy_module_hooks` makes it, with the matching ``__dir__``).
Invariants: a name is imported on its first access only, then cached in the package
namespace (so ``__getattr__`` is not called for it again); an unknown name raises the same
``AttributeError`` Python itself raises.
Importing this module imports only :mod:`importlib`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any

__all__ = ["lazy_module_hooks", "lazy_table", "resolve_lazy"]


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


def lazy_module_hooks(
    namespace: dict[str, Any],
    table: Mapping[str, str],
    submodules: Container[str] = (),
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of a package exporting ``table`` lazily.

    Args:
        namespace: the package's ``globals()``.
        table: public name -> dotted name of the module that defines it.
        submodules: as for :func:`resolve_lazy`.

    Returns:
        ``(__getattr__, __dir__)``: ``__getattr__(name)`` is :func:`resolve_lazy` of
        ``name``; ``__dir__()`` lists the namespace and every name of ``table``, sorted (so
        ``dir(package)`` shows the lazy names before their first access).
    """

    def module_getattr(name: str) -> Any:
        return resolve_lazy(namespace, table, name, submodules)

    def module_dir() -> list[str]:
        return sorted(set(namespace) | set(table))

    return module_getattr, module_dir
