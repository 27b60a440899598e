"""``sagellm-backend info``: the installed backends and engines, and the auto-selection.

It shows every installed backend and engine plugin: kind, providing package, state
(available / unavailable / error and why), and for each available backend the device,
capability matrix and memory read from a freshly created provider, followed by the
backend auto-selection and its reason. ``--json`` prints the same as one JSON object.
Exit status: 0, or 1 when a plugin is broken (failed to load, conflicting registrations,
raising hooks), an available backend could not be inspected, ``SAGELLM_BACKEND`` names
an unknown kind or one that cannot run here, or ``--model`` cannot be read.

Invariant: importing this module imports neither torch nor transformers (``--no-inspect``
never does; inspecting a torch provider does, inside :func:`collect_info`).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from sagellm_backend._version import __version__
from sagellm_backend.cli.command import Command, register_command
from sagellm_backend.errors import BackendError, ConfigError, PluginConflictError, PluginLoadError
from sagellm_backend.registry import (
    ENGINES_GROUP,
    ENV_BACKEND,
    BackendRegistry,
    PluginRegistry,
    PluginState,
    PluginStatus,
)

__all__ = ["collect_info", "render_info"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return value


def _inspect_backend(registry: BackendRegistry, status: PluginStatus) -> dict[str, Any]:
    """Create an available backend and read its capability and memory."""
    try:
        provider = registry.create(status.name)
        try:
            capability = _jsonable(provider.capability())
            memory = {str(k): int(v) for k, v in provider.memory_stats().items()}
        finally:
            close = getattr(provider, "close", None)
            if callable(close):
                close()
    except Exception as exc:
        return {"inspect_error": f"{type(exc).__name__}: {exc}"}
    return {
        "device": capability.get("device_name") or capability.get("device_type"),
        "capability": capability,
        "memory": memory,
    }


def _engine_row(status: PluginStatus) -> dict[str, Any]:
    """An engine entry point's row, with the engine class's own availability check.

    Engine entry points name factory functions; whether the engine can run here is known
    to :class:`~sagellm_backend.engine.factory.EngineFactory` (the engine class's
    ``is_available()``), so a loaded kind it knows takes its answer.
    """
    row = status.to_dict()
    row["engine"] = None
    if status.state is not PluginState.AVAILABLE:
        return row
    from sagellm_backend.engine.factory import EngineFactory

    try:
        described = EngineFactory.engine_info(status.name)
    except (ConfigError, KeyError):  # a kind only the entry point knows
        return row
    row["engine"] = described.get("name")
    if not described.get("is_available"):
        row.update(state=PluginState.UNAVAILABLE.value, available=False, reason=described["reason"])
    elif described.get("reason"):
        row["reason"] = described["reason"]
    return row


def collect_info(
    *,
    inspect: bool = True,
    backends: BackendRegistry | None = None,
    engines: PluginRegistry | None = None,
) -> dict[str, Any]:
    """Gather what ``sagellm-backend info`` shows, as JSON-ready data.

    Args:
        inspect: create each available backend to read its device, capability and memory
            (imports torch for the torch providers).
        backends: the backend registry to describe (default: the installed plugins).
        engines: the engine registry to describe (default: the installed plugins).

    Returns:
        ``{"version", "env", "backends": [...], "engines": [...], "selection", "ok"}``;
        ``ok`` is False when a plugin is broken, an inspection failed or the override is
        invalid or names a backend that cannot run here (the CLI's exit status 1).
    """
    backends = BackendRegistry() if backends is None else backends
    engines = PluginRegistry(ENGINES_GROUP) if engines is None else engines
    ok = True
    backend_rows: list[dict[str, Any]] = []
    for status in backends.statuses():
        row = status.to_dict()
        row.update(device=None, capability=None, memory=None, inspect_error=None)
        if status.state is PluginState.ERROR:
            ok = False
        elif status.available and inspect:
            row.update(_inspect_backend(backends, status))
            ok = ok and row["inspect_error"] is None
        backend_rows.append(row)
    engine_rows = []
    for status in engines.statuses():
        ok = ok and status.state is not PluginState.ERROR
        engine_rows.append(_engine_row(status))
    selection: dict[str, Any]
    try:
        chosen = backends.select()
        selection = {"kind": chosen.kind, "source": chosen.source, "reason": chosen.reason}
    except (ConfigError, PluginLoadError, PluginConflictError) as exc:
        ok = False
        selection = {"kind": None, "source": None, "error": f"{type(exc).__name__}: {exc}"}
    except BackendError as exc:
        # Auto-selection finding nothing that runs here is a state, not a fault; a kind the
        # user forced (SAGELLM_BACKEND) that cannot run here is a misconfiguration.
        if backends.forced_kind is not None:
            ok = False
        selection = {"kind": None, "source": None, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "version": __version__,
        "env": {ENV_BACKEND: os.environ.get(ENV_BACKEND)},
        "backends": backend_rows,
        "engines": engine_rows,
        "selection": selection,
        "ok": ok,
    }


def _fmt_bytes(value: Any) -> str:
    if not isinstance(value, int) or isinstance(value, bool):
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"  # pragma: no cover - loop always returns


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def _memory(row: dict[str, Any]) -> str:
    capability = row.get("capability") or {}
    memory = row.get("memory") or {}
    total = capability.get("total_memory_bytes") or memory.get("total")
    free = capability.get("available_memory_bytes")
    if free is None:
        free = memory.get("free")
    text = f"{_fmt_bytes(free)} free of {_fmt_bytes(total)}" if free is not None else ""
    text = text or f"{_fmt_bytes(total)} total"
    if "allocated" in memory:
        text += f", {_fmt_bytes(memory['allocated'])} allocated"
    return text


def render_info(info: dict[str, Any]) -> str:
    """Format :func:`collect_info` output as terminal tables (about 100 columns wide).

    One table of backends (state, priority, package, device, memory), one capability matrix
    of the inspected backends, one table of engines, the reasons for every state that is
    not ``available``, and the auto-selection with its reason.
    """
    out = [f"sagellm-backend {info['version']}", "", "Backends (entry points sagellm.backends)"]
    rows, matrix, notes = [], [], []
    for row in info["backends"]:
        capability = row.get("capability") or {}
        inspected = bool(capability)
        device = row.get("device") or "-"
        if inspected and capability.get("device_type") and capability["device_type"] != device:
            device = f"{device} ({capability['device_type']})"
        rows.append(
            [
                row["kind"],
                row["state"],
                str(row["priority"]),
                row["package"],
                device,
                _memory(row) if inspected else "-",
            ]
        )
        if inspected:
            matrix.append(
                [
                    row["kind"],
                    ",".join(capability.get("supported_dtypes", [])) or "-",
                    ",".join(capability.get("supported_kernels", [])) or "-",
                    _yes(capability.get("has_stream")),
                    _yes(capability.get("has_event")),
                    _yes(capability.get("has_collective")),
                    _yes(capability.get("has_graph_exec")),
                ]
            )
        if row["state"] != PluginState.AVAILABLE.value:
            notes.append(f"  {row['kind']}: {row['reason']}")
        if row.get("inspect_error"):
            notes.append(f"  {row['kind']}: could not be inspected: {row['inspect_error']}")
    out.append(_table(["KIND", "STATE", "PRIO", "PACKAGE", "DEVICE", "MEMORY"], rows))
    if matrix:
        out += ["", "Capability matrix (available backends)"]
        out.append(
            _table(["KIND", "DTYPES", "KERNELS", "STREAM", "EVENT", "COLLECTIVE", "GRAPH"], matrix)
        )
    if notes:
        out += ["", "Why:", *notes]
    out += ["", "Engines (entry points sagellm.engines)"]
    engine_rows = [
        [row["kind"], row["state"], row.get("engine") or "-", row["package"], row["entry_point"]]
        for row in info["engines"]
    ]
    out.append(_table(["KIND", "STATE", "ENGINE", "PACKAGE", "ENTRY POINT"], engine_rows))
    engine_notes = [
        f"  {row['kind']}: {row['reason']}"
        for row in info["engines"]
        if row["state"] != PluginState.AVAILABLE.value
    ]
    if engine_notes:
        out += ["", "Why:", *engine_notes]
    selection = info["selection"]
    env = info["env"].get(ENV_BACKEND)
    out += ["", f"{ENV_BACKEND}={env}" if env else f"{ENV_BACKEND} is not set"]
    if selection.get("kind"):
        out.append(f"Selected backend: {selection['kind']}")
        out.append(f"  because: {selection['reason']}")
    else:
        out.append(f"No backend selected: {selection['error']}")
    model_runner = info.get("model_runner")
    if model_runner is not None:
        out.append("")
        if "error" in model_runner:
            out.append(f"Model {model_runner['model']}: {model_runner['error']}")
        else:
            out.append(
                f"Model {model_runner['model']} ({model_runner['architecture']}, model_type "
                f"{model_runner['model_type']}): runner {model_runner['runner']}"
            )
            out.append(f"  because: {model_runner['reason']}")
    return "\n".join(out)


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--no-inspect",
        dest="inspect",
        action="store_false",
        help="do not create the available backends (skips device, capability and memory)",
    )
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="also tell which model runner the HF engines use for this model (a model "
        "directory or a built-in offline model name), and why",
    )


def _info_run(args: argparse.Namespace, stream: TextIO | None = None) -> int:
    out = sys.stdout if stream is None else stream
    info = collect_info(inspect=args.inspect)
    if getattr(args, "model", None):
        from sagellm_backend.cli._common import resolve_model
        from sagellm_backend.engine.runners.select import describe_runner_for_path

        try:
            path, _ = resolve_model("cpu", args.model, err=sys.stderr)
            assert path is not None
            info["model_runner"] = {"model": args.model, **describe_runner_for_path(path)}
        except Exception as exc:  # a bad path must not hide the rest of the report
            info["model_runner"] = {"model": args.model, "error": str(exc)}
            info["ok"] = False
    if args.json:
        json.dump(info, out, indent=2, default=str)
        out.write("\n")
    else:
        out.write(render_info(info) + "\n")
    return 0 if info["ok"] else 1


register_command(
    Command(
        name="info",
        help="list backends and engines, their state, device, capabilities and memory",
        add_arguments=_info_arguments,
        run=_info_run,
        description=(
            "Show every installed sagellm.backends and sagellm.engines plugin with its "
            "providing package and state, the device/capability/memory of each available "
            "backend, and which backend auto-selection picks and why. Exit status 1 when a "
            "plugin is broken, SAGELLM_BACKEND names an unknown kind or one that cannot run "
            "here, or --model cannot be read."
        ),
    )
)
