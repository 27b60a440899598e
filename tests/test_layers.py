"""No module imports from a higher layer (issue 14): the package is a stack of floors.

Floors, lowest first (a module may import its own floor and the floors below):

0. ``errors``, ``capability`` (and ``_capability_types``), ``base``, ``_validate``, ``_lazy``,
   ``_version``: shared types;
1. ``kv``, ``kernels``: KV-cache management and the kernel registry;
2. ``providers``: backend providers (they own KV managers and kernels);
3. ``registry`` (and its ``_registry_*`` parts): plugin discovery over providers and engines;
4. ``engine``: engines, scheduler, runners (imports providers through the registry);
5. ``cli``, ``testing``: tools and test kits on top of everything.

The package's ``__init__`` is the facade (lazy exports of every floor) and is not a floor.
Every import is read from the source (function-local and ``TYPE_CHECKING`` ones too), so a
lazy import that reaches up is caught as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sagellm_backend

ROOT = Path(sagellm_backend.__file__).resolve().parent
FLOORS = {
    "errors": 0,
    "capability": 0,
    "_capability_types": 0,
    "base": 0,
    "_validate": 0,
    "_lazy": 0,
    "_version": 0,
    "kv": 1,
    "kernels": 1,
    "providers": 2,
    "registry": 3,
    "_registry_discovery": 3,
    "_registry_plugins": 3,
    "engine": 4,
    "cli": 5,
    "testing": 5,
}


def _floor(parts: tuple[str, ...]) -> int | None:
    """Floor of ``sagellm_backend.<parts>`` (None for the facade)."""
    if not parts or parts[0] in ("__init__", "__main__"):
        return None
    return FLOORS[parts[0]]


def _imports(path: Path, module: tuple[str, ...]) -> list[tuple[int, tuple[str, ...]]]:
    """(line, imported sagellm_backend sub-path) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[int, tuple[str, ...]]] = []
    package = module[:-1] if path.name != "__init__.py" else module
    for node in ast.walk(tree):
        names: list[str] = []
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                names = [".".join(("sagellm_backend", *base, *(node.module or "").split(".")))]
            elif node.module:
                names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "sagellm_backend":
                found.append((node.lineno, tuple(p for p in parts[1:] if p)))
    return found


def test_every_floor_is_known() -> None:
    tops = {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}
    tops -= {"__init__", "__main__"}
    assert tops <= set(FLOORS), sorted(tops - set(FLOORS))


def test_no_module_imports_from_a_higher_floor() -> None:
    bad: list[str] = []
    checked = 0
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = tuple(rel.parts)
        own = _floor(parts)
        if own is None:
            continue
        checked += 1
        for line, target in _imports(path, parts):
            floor = _floor(target)
            if floor is not None and floor > own:
                bad.append(f"{'/'.join(parts)}.py:{line} imports {'.'.join(target)}")
    assert checked > 50  # the walk saw the package
    assert not bad, "imports from a higher floor:\n" + "\n".join(bad)
