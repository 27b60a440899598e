#!/usr/bin/env python3
"""Diff the public surface of the published isagellm-backend 0.1.1.2 against this project.

Usage::

    python scripts/check_compat.py                 # download the wheel from the index
    python scripts/check_compat.py --wheel W.whl   # or use a wheel file / unpacked dir
    python scripts/check_compat.py --dump-only     # print both surfaces as JSON

The published wheel is fetched with ``pip download --no-deps`` into a temporary directory
and unpacked there. Each side's surface is recorded in a *separate* Python process (the
published one with the unpacked wheel first on ``sys.path``, the project one as installed):

* every module the wheel ships: whether it imports (and the error if not), its ``__all__``
  and its public names (not starting with ``_``, not modules, defined in sagellm);
* each public class: its public methods and properties with their signatures, its
  dataclass fields (default, or required), its enum members;
* each public function's signature;
* the ``sagellm.backends`` / ``sagellm.engines`` entry points.

A *difference* is something code written against 0.1.1.2 could notice: a name, method,
parameter, field, enum member or entry point that is gone; a parameter that became
required, moved position or lost its keyword name; a default that changed; a module that
no longer imports. Additions are reported but are not differences. Each difference has a
stable id (printed); it is allowed only when ``docs/compat.md`` has a list item starting
with that id in backticks followed by its reason, e.g.::

    - `sagellm_backend.engine.hf_cuda.HFCudaEngineConfig.device: default` -- reason ...

Exit status: 0 when every difference is listed (and every listed id is still a
difference), 1 otherwise, 2 when the wheel cannot be obtained.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

PACKAGE = "isagellm-backend"
VERSION = "0.1.1.2"
ROOT = Path(__file__).resolve().parent.parent
COMPAT_DOC = ROOT / "docs" / "compat.md"
EP_GROUPS = ("sagellm.backends", "sagellm.engines")

# The dumper runs in a child process: it must be self-contained source.
_DUMPER = r"""
import dataclasses, enum, importlib, inspect, json, sys

modules = json.loads(sys.argv[1])
wanted = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
out = {}

def sig(obj):
    try:
        s = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = []
    for p in s.parameters.values():
        default = None
        if p.default is not inspect.Parameter.empty:
            default = _repr(p.default)
        params.append([p.name, p.kind.name, p.default is not inspect.Parameter.empty, default])
    return params

def _repr(v):
    if isinstance(v, enum.Enum):
        return f"{type(v).__name__}.{v.name}"
    if callable(v) and hasattr(v, "__name__"):
        return f"<callable {v.__name__}>"
    r = repr(v)
    return r if " at 0x" not in r else f"<{type(v).__name__}>"

def ours(obj):
    mod = getattr(obj, "__module__", None) or ""
    return mod.startswith("sagellm")

def describe_class(cls):
    d = {"kind": "class", "methods": {}, "properties": [], "fields": None, "enum": None}
    if issubclass(cls, enum.Enum):
        d["enum"] = {m.name: _repr(m.value) for m in cls}
    if dataclasses.is_dataclass(cls):
        fields = {}
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            if f.default is not dataclasses.MISSING:
                fields[f.name] = {"required": False, "default": _repr(f.default)}
            elif f.default_factory is not dataclasses.MISSING:
                fields[f.name] = {"required": False, "default": _repr(f.default_factory())}
            else:
                fields[f.name] = {"required": True, "default": None}
        d["fields"] = fields
    for name in dir(cls):
        if name.startswith("_") and name != "__init__":
            continue
        try:
            raw = inspect.getattr_static(cls, name)
        except AttributeError:
            continue
        if isinstance(raw, property) or type(raw).__name__ == "cached_property":
            d["properties"].append(name)
            continue
        if isinstance(raw, (staticmethod, classmethod)):
            d["methods"][name] = sig(getattr(cls, name))
        elif inspect.isfunction(raw):
            s = sig(raw)
            d["methods"][name] = s[1:] if s else s  # drop self
    for klass in cls.__mro__:
        for slot in getattr(klass, "__dict__", {}).get("__slots__", ()):
            if not slot.startswith("_") and slot not in d["properties"]:
                d["properties"].append(slot)
    if d["enum"] is not None:
        d["methods"] = {}
    return d

for name in modules:
    entry = {"error": None, "all": None, "names": {}}
    try:
        mod = importlib.import_module(name)
    except BaseException as exc:  # noqa: BLE001
        entry["error"] = f"{type(exc).__name__}: {exc}"
        out[name] = entry
        continue
    all_ = getattr(mod, "__all__", None)
    entry["all"] = sorted(all_) if all_ is not None else None
    names = set(all_ or ())
    names |= {n for n in wanted.get(name, ()) if hasattr(mod, n)}  # lazy (PEP 562) names
    for n in dir(mod):
        if n.startswith("_") or n in names or n == "TYPE_CHECKING":
            continue
        v = getattr(mod, n)
        if inspect.ismodule(v):
            continue
        if (inspect.isclass(v) or inspect.isfunction(v)) and not ours(v):
            continue
        if not (inspect.isclass(v) or inspect.isfunction(v)):
            # constants: keep plain public data, skip typing helpers and loggers
            if type(v).__module__ not in ("builtins",) or n in ("annotations",):
                continue
        names.add(n)
    for n in sorted(names):
        try:
            v = getattr(mod, n)
        except BaseException as exc:  # noqa: BLE001
            entry["names"][n] = {"kind": "error", "error": f"{type(exc).__name__}: {exc}"}
            continue
        if inspect.isclass(v):
            entry["names"][n] = describe_class(v)
        elif callable(v):
            entry["names"][n] = {"kind": "function", "sig": sig(v)}
        else:
            entry["names"][n] = {"kind": "value", "value": _repr(v)}
    out[name] = entry
print("@@SURFACE@@" + json.dumps(out))
"""


def fetch_wheel(dest: Path) -> Path:
    """Download the published wheel (no dependencies) into ``dest`` and return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        "-d",
        str(dest),
        f"{PACKAGE}=={VERSION}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise SystemExit(
            f"check_compat: could not download {PACKAGE}=={VERSION}: {proc.stderr.strip()[-800:]}"
        )
    return wheels[0]


def unpack(wheel: Path, dest: Path) -> Path:
    """Unpack ``wheel`` into ``dest`` (a directory is returned as is)."""
    if wheel.is_dir():
        return wheel
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(dest)
    return dest


def wheel_modules(root: Path) -> list[str]:
    """Dotted names of the modules a wheel directory ships (``.py`` or ``.pyc``)."""
    found: set[str] = set()
    pkg = root / "sagellm_backend"
    for path in pkg.rglob("*"):
        if "__pycache__" in path.parts or path.suffix not in (".py", ".pyc"):
            continue
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        found.add(".".join(parts))
    return sorted(found)


def wheel_entry_points(root: Path) -> dict[str, dict[str, str]]:
    """Entry points of the unpacked wheel, by group."""
    eps: dict[str, dict[str, str]] = {}
    for info in root.glob("*.dist-info/entry_points.txt"):
        group = None
        for line in info.read_text().splitlines():
            line = line.strip()
            if line.startswith("[") and line.endswith("]"):
                group = line[1:-1]
            elif "=" in line and group in EP_GROUPS:
                k, v = (s.strip() for s in line.split("=", 1))
                eps.setdefault(group, {})[k] = v
    return eps


def installed_entry_points() -> dict[str, dict[str, str]]:
    """Entry points this project declares (pyproject.toml; the installed metadata if absent)."""
    import tomllib

    pyproject = ROOT / "pyproject.toml"
    if pyproject.exists():
        data = tomllib.loads(pyproject.read_text())
        eps = data.get("project", {}).get("entry-points", {})
        return {g: dict(eps.get(g, {})) for g in EP_GROUPS if g in eps}
    from importlib.metadata import entry_points  # pragma: no cover

    return {g: {e.name: e.value for e in entry_points(group=g)} for g in EP_GROUPS}


def dump(
    modules: list[str], path_first: Path | None, wanted: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """Record the surface of ``modules`` in a child process.

    ``wanted`` names per module are looked up too (names a module resolves lazily with a
    module ``__getattr__`` are not in its ``dir()``).
    """
    env = dict(os.environ)
    if path_first is not None:
        env["PYTHONPATH"] = str(path_first)
    else:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p
        )
    proc = subprocess.run(
        [sys.executable, "-c", _DUMPER, json.dumps(modules), json.dumps(wanted or {})],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("@@SURFACE@@"):
            return json.loads(line[len("@@SURFACE@@") :])  # type: ignore[no-any-return]
    raise SystemExit(f"check_compat: surface dump failed:\n{proc.stderr[-2000:]}")


def _params_diff(where: str, old: list[Any] | None, new: list[Any] | None) -> list[str]:
    """Differences a caller of signature ``old`` would notice with ``new``."""
    if old is None or new is None:
        return []
    out: list[str] = []
    new_by_name = {p[0]: (i, p) for i, p in enumerate(new)}
    has_var_kw = any(p[1] == "VAR_KEYWORD" for p in new)
    has_var_pos = any(p[1] == "VAR_POSITIONAL" for p in new)
    old_names = {p[0] for p in old}
    matched: set[str] = set()
    for i, (name, kind, has_default, default) in enumerate(old):
        if kind in ("VAR_POSITIONAL", "VAR_KEYWORD"):
            if not any(p[1] == kind for p in new):
                out.append(f"{where}({name}): no longer accepts *{kind.lower()}")
            continue
        found = new_by_name.get(name)
        if found is None and name.startswith("_") and i < len(new):
            found = (i, new[i])  # a private-named parameter is positional: match by place
        if found is None:
            if not (has_var_kw or (kind == "POSITIONAL_ONLY" and has_var_pos)):
                out.append(f"{where}({name}): parameter removed")
            continue
        j, (nname, nkind, nhas_default, ndefault) = found
        matched.add(nname)
        if kind in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD") and (
            j != i or nkind not in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")
        ):
            out.append(f"{where}({name}): positional position changed")
        if kind in ("POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY") and nkind == "POSITIONAL_ONLY":
            out.append(f"{where}({name}): no longer accepted by keyword")
        if has_default and not nhas_default:
            out.append(f"{where}({name}): now required")
        elif has_default and nhas_default and default != ndefault:
            out.append(f"{where}({name}): default {default} -> {ndefault}")
    for name, kind, has_default, _ in new:
        if (
            name not in old_names | matched
            and not has_default
            and kind
            not in (
                "VAR_POSITIONAL",
                "VAR_KEYWORD",
            )
        ):
            out.append(f"{where}({name}): new required parameter")
    return out


def _class_diff(where: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if new.get("kind") != "class":
        return [f"{where}: no longer a class"]
    new_members = set(new["methods"]) | set(new["properties"])
    for m in sorted(old["properties"]):
        if m not in new_members:
            out.append(f"{where}.{m}: property removed")
    for m, s in sorted(old["methods"].items()):
        if m == "__init__" and old.get("fields") is not None and new.get("fields") is not None:
            continue  # a dataclass's __init__ is its fields, compared below
        if m not in new_members:
            out.append(f"{where}.{m}: method removed")
        elif m in new["methods"]:
            out += _params_diff(f"{where}.{m}", s, new["methods"][m])
    if old.get("fields") is not None:
        new_fields = new.get("fields")
        if new_fields is None:  # no longer a dataclass: attributes + __init__ parameters
            init = {p[0]: p for p in (new["methods"].get("__init__") or [])}
            new_fields = {
                f: {"required": not (f in init and init[f][2]), "default": spec["default"]}
                for f, spec in old["fields"].items()
                if f in new_members
            }
        for f, spec in old["fields"].items():
            nf = new_fields.get(f)
            if nf is None:
                out.append(f"{where}.{f}: field removed")
            elif not spec["required"] and nf["required"]:
                out.append(f"{where}.{f}: field now required")
            elif not spec["required"] and spec["default"] != nf["default"]:
                out.append(f"{where}.{f}: field default {spec['default']} -> {nf['default']}")
    if old.get("enum") is not None:
        new_enum = new.get("enum") or {}
        for k, v in old["enum"].items():
            if k not in new_enum:
                out.append(f"{where}.{k}: enum member removed")
            elif new_enum[k] != v:
                out.append(f"{where}.{k}: enum value {v} -> {new_enum[k]}")
    return out


def diff(
    old: dict[str, Any],
    new: dict[str, Any],
    old_eps: dict[str, dict[str, str]],
    new_eps: dict[str, dict[str, str]],
) -> tuple[list[str], list[str]]:
    """Return (differences, additions) between the published and the project surface."""
    diffs: list[str] = []
    added: list[str] = []
    for mod, o in sorted(old.items()):
        n = new.get(mod)
        if n is None or n["error"]:
            if not o["error"]:
                why = n["error"] if n else "missing"
                diffs.append(f"{mod}: module does not import ({why})")
            continue
        if o["error"]:
            continue  # published module unusable here: nothing to compare against
        if o["all"] is not None:
            new_all = set(n["all"] or ())
            for name in o["all"]:
                if name not in new_all:
                    diffs.append(f"{mod}.__all__: {name} missing")
        for name, od in sorted(o["names"].items()):
            nd = n["names"].get(name)
            where = f"{mod}.{name}"
            if nd is None:
                diffs.append(f"{where}: name missing")
            elif nd.get("kind") == "error":
                if od.get("kind") != "error":
                    diffs.append(f"{where}: does not resolve ({nd['error']})")
            elif od["kind"] == "class":
                diffs += _class_diff(where, od, nd)
            elif od["kind"] == "function":
                if nd["kind"] not in ("function", "class"):
                    diffs.append(f"{where}: no longer callable")
                elif nd["kind"] == "function":
                    diffs += _params_diff(where, od["sig"], nd["sig"])
            elif od["kind"] == "value" and nd.get("value") != od["value"]:
                diffs.append(f"{where}: value {od['value']} -> {nd.get('value')}")
        added += [f"{mod}.{x}" for x in sorted(set(n["names"]) - set(o["names"]))]
    for group, eps in sorted(old_eps.items()):
        for name, target in sorted(eps.items()):
            got = new_eps.get(group, {}).get(name)
            if got is None:
                diffs.append(f"entry point {group}:{name}: missing")
            elif got != target:
                diffs.append(f"entry point {group}:{name}: {target} -> {got}")
    for group, eps in sorted(new_eps.items()):
        added += [
            f"entry point {group}:{k}" for k in sorted(set(eps) - set(old_eps.get(group, {})))
        ]
    return diffs, added


_ALLOWED = re.compile(r"^\s*[-*]\s+`([^`]+)`\s*(?:--|—|:)\s*(\S.*)$")


def allowed_differences(path: Path = COMPAT_DOC) -> dict[str, str]:
    """``{difference id: reason}`` from the list items of ``docs/compat.md``."""
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _ALLOWED.match(line)
        if m:
            out[m.group(1).strip()] = m.group(2).strip()
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the check; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--wheel", type=Path, help="published wheel file or unpacked directory")
    ap.add_argument("--dump-only", action="store_true", help="print both surfaces as JSON")
    ap.add_argument("--show-additions", action="store_true", help="list names 0.1.1.2 lacks")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sagellm-compat-") as tmp:
        tmpdir = Path(tmp)
        wheel = args.wheel or fetch_wheel(tmpdir / "dl")
        root = unpack(wheel, tmpdir / "whl")
        modules = wheel_modules(root)
        old = dump(modules, root)
        new = dump(modules, None, {m: sorted(o["names"]) for m, o in old.items()})
        old_eps = wheel_entry_points(root)
    new_eps = installed_entry_points()
    if args.dump_only:
        print(json.dumps({"published": old, "project": new}, indent=1, sort_keys=True))
        return 0
    diffs, added = diff(old, new, old_eps, new_eps)
    allowed = allowed_differences()
    unlisted = [d for d in diffs if d not in allowed]
    skipped = sorted(m for m, o in old.items() if o["error"])

    def compared(diff_id: str) -> bool:  # its published module imported here
        owners = [m for m in old if diff_id == m or diff_id.startswith((m + ".", m + ":"))]
        return not owners or max(owners, key=len) not in skipped

    stale = sorted(d for d in set(allowed) - set(diffs) if compared(d))
    print(f"check_compat: {PACKAGE}=={VERSION}: {len(modules)} modules, {len(diffs)} differences")
    for m in skipped:
        print(f"  (published {m} does not import here: {old[m]['error']})")
    for d in diffs:
        print(f"  {'allowed' if d in allowed else 'NOT LISTED'}: {d}")
    if args.show_additions:
        for a in added:
            print(f"  added: {a}")
    for s in stale:
        print(f"  STALE (listed in docs/compat.md but no longer a difference): {s}")
    if unlisted or stale:
        print(
            f"check_compat: FAIL: {len(unlisted)} difference(s) not listed in docs/compat.md, "
            f"{len(stale)} stale entr(y/ies)"
        )
        return 1
    print("check_compat: OK (every difference is listed in docs/compat.md with its reason)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
