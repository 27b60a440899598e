"""`sagellm-backend info`: tables, JSON, exit status, and the subcommand registry."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from sagellm_backend import cli
from sagellm_backend.cli import command as cli_command
from sagellm_backend.registry import (
    BACKENDS_GROUP,
    ENGINES_GROUP,
    BackendRegistry,
    PluginRegistry,
)

PLUGIN_SRC = """
from sagellm_backend.capability import CapabilityDescriptor, DType, KernelKind

class Provider:
    def capability(self):
        return CapabilityDescriptor(
            device_name="Fake XPU 9000", device_type="xpu",
            total_memory_bytes=8 * 2**30, available_memory_bytes=6 * 2**30,
            supported_dtypes=[DType.FP16, DType.BF16],
            supported_kernels=[KernelKind.MATMUL, KernelKind.ATTENTION],
            has_stream=True, has_event=True, has_collective=False, has_graph_exec=True,
        )
    def create_stream(self): ...
    def create_event(self): ...
    def all_reduce(self, tensor, op): ...
    def all_gather(self, tensor): ...
    def kv_block_alloc(self, num_tokens, dtype): ...
    def kv_block_free(self, block): ...
    def kv_block_copy(self, src, dst): ...
    def kv_block_migrate(self, block, target_device): ...
    def memory_stats(self): return {"allocated": 3 * 2**20, "peak": 4 * 2**20, "total": 8 * 2**30}
    def clear_cache(self): ...
    def register_kernel(self, name, impl): ...
    def get_kernel(self, name): ...

def xpu(config=None, **kw):
    return Provider()
xpu.is_available = lambda: True
xpu.priority = lambda: 60

def gpu(config=None, **kw):
    raise AssertionError("an unavailable backend must not be created by info")
gpu.is_available = lambda: False
gpu.unavailable_reason = lambda: "no GPU visible"

def exploding(config=None, **kw):
    raise RuntimeError("device reset")

def engine(config, backend):
    return None
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    name = f"fakecli_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN_SRC))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def registries(
    module: str, backends: dict[str, str], engines: dict[str, str] | None = None, env=None
) -> tuple[BackendRegistry, PluginRegistry]:
    eps = [importlib.metadata.EntryPoint(k, v, BACKENDS_GROUP) for k, v in backends.items()]
    eps += [importlib.metadata.EntryPoint(k, v, ENGINES_GROUP) for k, v in (engines or {}).items()]
    return (
        BackendRegistry(entry_points=eps, environ=env or {}),
        PluginRegistry(ENGINES_GROUP, entry_points=eps),
    )


def test_info_shows_device_capabilities_memory_and_selection(plugin: str) -> None:
    backends, engines = registries(
        plugin,
        {"xpu": f"{plugin}:xpu", "cuda": f"{plugin}:gpu"},
        {"xpu": f"{plugin}:engine"},
    )
    info = cli.collect_info(backends=backends, engines=engines)
    assert info["ok"] is True
    rows = {row["kind"]: row for row in info["backends"]}
    xpu = rows["xpu"]
    assert xpu["device"] == "Fake XPU 9000"
    assert xpu["capability"]["supported_dtypes"] == ["fp16", "bf16"]
    assert xpu["memory"]["allocated"] == 3 * 2**20
    assert rows["cuda"]["state"] == "unavailable" and rows["cuda"]["capability"] is None
    assert info["selection"]["kind"] == "xpu"
    json.dumps(info)

    text = cli.render_info(info)
    lines = [line for line in text.splitlines() if line.startswith("xpu ")]
    assert len(lines) == 3, text  # backends table, capability matrix, engines table
    summary, matrix, engine = lines
    for expected in (
        "available",
        "60",
        "Fake XPU 9000 (xpu)",
        "6.0 GiB free of 8.0 GiB, 3.0 MiB allocated",
    ):
        assert expected in summary, (expected, summary)
    assert matrix.split() == ["xpu", "fp16,bf16", "matmul,attention", "yes", "yes", "no", "yes"]
    assert engine.split()[:2] == ["xpu", "available"]
    assert "cuda " in text and text.count("cuda ") == 1  # unavailable: no matrix row
    assert max(len(line) for line in text.splitlines() if not line.startswith(" ")) <= 110
    assert "cuda: no GPU visible" in text
    assert "Selected backend: xpu" in text
    assert "Engines" in text and f"{plugin}:engine" in text


def test_info_is_not_ok_when_a_plugin_is_broken(plugin: str) -> None:
    backends, engines = registries(
        plugin,
        {"xpu": f"{plugin}:xpu", "ghost": f"{plugin}_missing:factory"},
        {"broken": f"{plugin}:no_such_engine"},
    )
    info = cli.collect_info(backends=backends, engines=engines)
    assert info["ok"] is False
    ghost = next(row for row in info["backends"] if row["kind"] == "ghost")
    assert ghost["state"] == "error" and "ModuleNotFoundError" in ghost["error"]
    assert info["selection"]["kind"] == "xpu"  # the broken one hides nothing
    text = cli.render_info(info)
    assert "ghost: sagellm.backends plugin 'ghost'" in text
    assert "broken: sagellm.engines plugin 'broken'" in text


def test_info_reports_inspection_failures(plugin: str) -> None:
    backends, engines = registries(plugin, {"boom": f"{plugin}:exploding"})
    info = cli.collect_info(backends=backends, engines=engines)
    assert info["ok"] is False
    assert "RuntimeError: device reset" in info["backends"][0]["inspect_error"]
    assert "could not be inspected" in cli.render_info(info)
    quick = cli.collect_info(
        inspect=False,
        backends=registries(plugin, {"boom": f"{plugin}:exploding"})[0],
        engines=engines,
    )
    assert quick["ok"] is True and quick["backends"][0]["capability"] is None


def test_info_flags_an_invalid_override(plugin: str) -> None:
    backends, engines = registries(
        plugin, {"xpu": f"{plugin}:xpu"}, env={"SAGELLM_BACKEND": "nvidia"}
    )
    info = cli.collect_info(backends=backends, engines=engines)
    assert info["ok"] is False
    assert info["selection"]["kind"] is None
    assert "ConfigError" in info["selection"]["error"]
    assert "valid kinds: xpu" in info["selection"]["error"]


def test_no_backend_available_is_a_state_not_a_fault(plugin: str) -> None:
    backends, engines = registries(plugin, {"cuda": f"{plugin}:gpu"})
    info = cli.collect_info(backends=backends, engines=engines)
    assert info["ok"] is True
    assert "BackendNotAvailableError" in info["selection"]["error"]
    assert "No backend selected" in cli.render_info(info)


def test_an_override_that_cannot_run_here_is_a_fault(plugin: str) -> None:
    backends, engines = registries(
        plugin, {"cuda": f"{plugin}:gpu"}, env={"SAGELLM_BACKEND": "cuda"}
    )
    info = cli.collect_info(backends=backends, engines=engines)
    assert info["ok"] is False
    assert "not available on this machine" in info["selection"]["error"]


def test_main_info_json_on_the_installed_plugins(capsys: pytest.CaptureFixture[str]) -> None:
    """Every built-in entry point loads and the mock is inspected for real."""
    status = cli.main(["info", "--json"])
    info = json.loads(capsys.readouterr().out)
    rows = {row["kind"]: row for row in info["backends"]}
    assert {"mock", "cpu", "cuda"} <= set(rows)
    assert {"mock", "cpu", "cuda", "hf_cuda"} <= {row["kind"] for row in info["engines"]}
    broken = [r["kind"] for r in info["backends"] + info["engines"] if r["state"] == "error"]
    assert broken == [], [r["reason"] for r in info["backends"] + info["engines"]]
    mock = rows["mock"]
    assert mock["state"] == "available" and mock["package"].startswith("isagellm-backend==")
    assert mock["capability"]["supported_dtypes"]
    assert {"allocated", "peak", "total"} <= set(mock["memory"])
    assert info["selection"]["kind"] != "mock"
    assert status == 0


def test_main_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["info", "--no-inspect"])
    out = capsys.readouterr().out
    assert out.startswith("sagellm-backend ")
    assert "KIND" in out and "mock" in out


@pytest.mark.parametrize("argv", [[], ["nonsense"], ["info", "--bogus"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage: sagellm-backend" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from sagellm_backend import __version__

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sagellm-backend {__version__}"


def test_commands_can_be_registered_by_other_modules(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli_command, "_COMMANDS", dict(cli_command._COMMANDS))
    seen: list[argparse.Namespace] = []

    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--times", type=int, required=True)

    def run(args: argparse.Namespace) -> int:
        seen.append(args)
        return 7

    cli.register_command(cli.Command("echo", "echo things", add, run))
    assert cli.main(["echo", "--times", "3"]) == 7
    assert seen[0].times == 3
    with pytest.raises(ValueError, match="already registered"):
        cli.register_command(cli.Command("echo", "again", add, run))
    with pytest.raises(ValueError, match="non-empty word"):
        cli.register_command(cli.Command("", "x", add, run))
    cli.register_command(cli.Command("echo", "replaced", add, lambda a: 0), replace=True)
    assert cli.main(["echo", "--times", "1"]) == 0
    assert "echo" in cli.build_parser().format_help()


def test_console_script_runs_without_importing_torch() -> None:
    code = (
        "import sys\n"
        "from sagellm_backend import cli\n"
        "cli.build_parser()\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "info" in result.stdout


def test_engine_rows_take_the_engine_class_availability(
    plugin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sagellm_backend.engine.factory import EngineFactory
    from sagellm_backend.errors import ConfigError

    def engine_info(kind: str) -> dict[str, object]:
        if kind == "xpu":
            return {"name": "XpuEngine", "is_available": False, "reason": "no XPU runtime"}
        raise ConfigError(f"unknown engine kind {kind!r}")

    monkeypatch.setattr(EngineFactory, "engine_info", staticmethod(engine_info))
    backends, engines = registries(
        plugin, {"xpu": f"{plugin}:xpu"}, {"xpu": f"{plugin}:engine", "solo": f"{plugin}:engine"}
    )
    info = cli.collect_info(backends=backends, engines=engines)
    rows = {row["kind"]: row for row in info["engines"]}
    assert rows["xpu"]["state"] == "unavailable" and rows["xpu"]["engine"] == "XpuEngine"
    assert rows["xpu"]["reason"] == "no XPU runtime"
    assert rows["solo"]["state"] == "available" and rows["solo"]["engine"] is None
    assert info["ok"] is True  # unavailable is a state, not a fault
    assert "xpu: no XPU runtime" in cli.render_info(info)
