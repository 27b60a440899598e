"""`sagellm-backend demo`: backends, selection, streamed generation, metrics; the parser."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sagellm_protocol import Metrics

from sagellm_backend import cli
from sagellm_backend.cli._metrics import metrics_rows
from sagellm_backend.engine.metrics import KVRequestStats, RequestTimeline, build_metrics
from sagellm_backend.registry import ENV_BACKEND

HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
FAST_MOCK = ["--engine", "mock", "--mock-ttft-ms", "0", "--mock-latency-ms", "0"]


class Recorder:
    """A stdout stand-in that records every write with the time it happened."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.writes.append((time.perf_counter(), text))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.writes)


def field_names_in(text: str) -> list[str]:
    """The Metrics fields missing from ``text`` (timestamps appear as timestamps.<name>)."""
    missing = []
    for name in Metrics.model_fields:
        if name == "timestamps":
            keys = ("queued_at", "scheduled_at", "executed_at", "completed_at")
            missing += [k for k in keys if f"timestamps.{k}" not in text]
        elif name not in text:
            missing.append(name)
    return missing


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("sagellm-backend")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sagellm_backend.cli"]


@pytest.mark.hf
@pytest.mark.skipif(not HAS_HF, reason="needs torch and transformers")
def test_default_demo_runs_the_tiny_model_on_the_selected_backend(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sagellm_backend.registry import select_backend

    monkeypatch.delenv(ENV_BACKEND, raising=False)
    selected = select_backend().kind
    code = cli.main(["demo", "--max-tokens", "8"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "[1/4] Backends found" in out
    for kind in ("cpu", "cuda", "mock"):
        assert f"  {kind} " in out
    assert f"Selected backend: {selected}" in out and "because: auto-selected" in out
    assert "tiny-llama" in out and "random" in out
    engine = {"cpu": "CPUEngine", "cuda": "HFCudaEngine"}[selected]
    assert f"{engine} on {selected}" in out and "started in" in out
    assert "output tokens in" in out and "8 output tokens" in out
    assert "finish reason length" in out or "finish reason stop" in out
    assert "Metrics of this request" in out
    assert field_names_in(out) == []
    assert f"sagellm-backend:{engine}" in out


def test_mock_demo_streams_token_by_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    argv = ["demo", "--engine", "mock", "--mock-ttft-ms", "0", "--mock-latency-ms", "25"]
    code = cli.main([*argv, "--max-tokens", "5", "--prompt", "count with me"])
    assert code == 0, capsys.readouterr().err
    text = recorder.text
    start = next(i for i, (_, s) in enumerate(recorder.writes) if s == "  output: ")
    end = next(i for i, (_, s) in enumerate(recorder.writes) if "output tokens in" in s)
    chunks = recorder.writes[start + 1 : end]
    assert len(chunks) == 5, chunks
    assert chunks[-1][0] - chunks[0][0] >= 4 * 0.025 * 0.8  # printed while generating
    assert "Engine kind: mock (requested with --engine mock" in text
    assert "5 output tokens in 5 deltas" in text
    assert "prompt: count with me" in text
    assert field_names_in(text) == []


def test_env_override_selects_the_mock(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV_BACKEND, "mock")
    code = cli.main(["demo", "--mock-ttft-ms", "0", "--mock-latency-ms", "0", "--max-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Selected backend: mock" in out and f"because: {ENV_BACKEND}=mock" in out
    assert "MockEngine on mock" in out and "3 output tokens" in out


def test_unknown_env_backend_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV_BACKEND, "bogus")
    code = cli.main(["demo", *FAST_MOCK[2:]])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("sagellm-backend demo: error: ConfigError:") and "'bogus'" in err
    assert "Backends found" in out  # what could be shown was shown first


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--max-tokens", "0"], "--max-tokens"),
        (["--engine", "nope"], "invalid choice: 'nope'"),
        (["--temperature", "-1"], "--temperature"),
        (["--engine", "mock", "--mock-latency-ms", "-5"], "--mock-latency-ms"),
    ],
)
def test_bad_arguments_are_usage_errors(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: sagellm-backend demo" in err and expected in err


def test_metrics_rows_cover_every_field() -> None:
    timeline = RequestTimeline()
    timeline.mark_scheduled()
    timeline.mark_tokens(1)
    timeline.mark_tokens(1)
    timeline.mark_tokens(1)
    metrics = build_metrics(
        timeline,
        error_rate=0.0,
        peak_mem_mb=12,
        kv=KVRequestStats(used_tokens=40, used_bytes=4096, prefix_hit_rate=0.5),
        component_trace=["sagellm-core", "sagellm-backend:CPUEngine"],
    )
    rows = metrics_rows(metrics)
    names = [r[0] for r in rows]
    assert all(len(r) == 3 for r in rows)
    text = "\n".join(" ".join(r) for r in rows)
    assert field_names_in(text) == []
    by_name = dict((r[0], r[1]) for r in rows)
    assert by_name["kv_used_tokens"] == "40 tokens"
    assert by_name["peak_mem_mb"] == "12 MiB"
    assert by_name["prefix_hit_rate"] == "0.5"
    assert by_name["component_trace"] == "sagellm-core\nsagellm-backend:CPUEngine"
    assert by_name["itl_list"].startswith("2 gaps")
    assert by_name["timestamps.queued_at"].endswith("(+0.00 ms)")
    assert names.index("timestamps.queued_at") < names.index("timestamps.completed_at")


def test_console_script_demo_on_the_mock() -> None:
    result = subprocess.run(
        [*console_script(), "demo", *FAST_MOCK, "--max-tokens", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Metrics of this request" in result.stdout and "3 output tokens" in result.stdout


def test_building_the_parser_and_every_help_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from sagellm_backend import cli\n"
        "parser = cli.build_parser()\n"
        "for name in ('generate', 'bench', 'demo'):\n"
        "    try:\n"
        "        cli.main([name, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (name, e.code)\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print(sorted(cli.commands()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "['bench', 'demo', 'generate', 'info']"
    assert "--shared-prefix" in result.stdout and "--stream" in result.stdout


def test_mock_generate_and_bench_import_no_torch() -> None:
    # (The demo asks every backend whether it is available, and cuda must ask torch.)
    code = (
        "import sys\n"
        "from sagellm_backend import cli\n"
        "argv = ['--engine', 'mock', '--mock-ttft-ms', '0', '--mock-latency-ms', '0']\n"
        "assert cli.main(['generate', *argv, '--prompt', 'x', '--max-tokens', '2']) == 0\n"
        "assert cli.main(['bench', *argv, '--requests', '2', '--input-len', '4',\n"
        "                 '--output-len', '2', '--no-progress']) == 0\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
