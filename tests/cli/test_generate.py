"""`sagellm-backend generate`: text, streaming, protocol JSON, exit codes, usage errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sagellm_protocol import Response, StreamEventDelta, StreamEventEnd, StreamEventStart

from sagellm_backend import cli
from sagellm_backend.cli import generate
from sagellm_backend.engine.mock import MockEngine, MockEngineConfig, MockTokenizer

FAST_MOCK = ["--engine", "mock", "--mock-ttft-ms", "0", "--mock-latency-ms", "0"]
HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


class Recorder:
    """A stdout stand-in that records every write with the time it happened."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, str]] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append((time.perf_counter(), text))
        return len(text)

    def flush(self) -> None:
        self.flushes += 1

    def isatty(self) -> bool:
        return False

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.writes)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("sagellm-backend")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sagellm_backend.cli"]


# ----------------------------------------------------------------------------- mock engine


def test_json_is_the_protocol_response(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(
        ["generate", *FAST_MOCK, "--prompt", "hello world", "--max-tokens", "5", "--json"], capsys
    )
    assert code == 0, err
    response = Response.model_validate_json(out.strip())
    assert response.finish_reason == "length"
    assert len(response.output_tokens) == 5
    assert response.output_text == MockTokenizer().decode(response.output_tokens)
    m = response.metrics
    assert len(m.itl_list) == 4
    assert m.ttft_ms >= 0 and m.tpot_ms >= 0 and m.throughput_tps > 0
    assert m.error_rate == 0.0
    assert m.component_trace == ["sagellm-backend:MockEngine"]
    ts = m.timestamps
    assert ts is not None
    assert ts.queued_at <= ts.scheduled_at <= ts.executed_at <= ts.completed_at
    assert response.error is None
    # --json prints nothing else on stdout.
    assert out.count("\n") == 1


def test_stream_json_lines_are_the_protocol_events(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(
        ["generate", *FAST_MOCK, "--prompt", "abc def", "--max-tokens", "4", "--stream", "--json"],
        capsys,
    )
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in lines] == ["start", "delta", "delta", "delta", "delta", "end"]
    start = StreamEventStart.model_validate(lines[0])
    deltas = [StreamEventDelta.model_validate(e) for e in lines[1:-1]]
    end = StreamEventEnd.model_validate(lines[-1])
    assert start.prompt_tokens == len(MockTokenizer().encode("abc def"))
    assert "".join(d.chunk for d in deltas) == end.output_text
    assert [t for d in deltas for t in d.chunk_tokens] == end.output_tokens
    assert end.finish_reason == "length" and len(end.output_tokens) == 4


def test_text_output_matches_the_response_and_summarises_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["generate", *FAST_MOCK, "--prompt", "same prompt", "--max-tokens", "6"]
    code, text, err = run_main(argv, capsys)
    assert code == 0
    _, js, _ = run_main([*argv, "--json"], capsys)
    response = Response.model_validate_json(js)
    assert text == response.output_text + "\n"
    assert "6 tokens, finish length" in err and "MockEngine" in err
    code, streamed, _ = run_main([*argv, "--stream"], capsys)
    assert code == 0 and streamed == text


def test_stream_prints_each_chunk_as_it_is_produced(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    argv = ["generate", "--engine", "mock", "--mock-ttft-ms", "0", "--mock-latency-ms", "25"]
    code = cli.main([*argv, "--prompt", "tick", "--max-tokens", "5", "--stream"])
    assert code == 0, capsys.readouterr().err
    chunks = [(t, s) for t, s in recorder.writes if s.strip()]
    assert len(chunks) == 5  # one write per token, not one at the end
    # Written while the engine was still producing: spread over the 4 decode steps.
    assert chunks[-1][0] - chunks[0][0] >= 4 * 0.025 * 0.8
    assert recorder.flushes >= 5


def test_metrics_flag_prints_every_metrics_field(capsys: pytest.CaptureFixture[str]) -> None:
    from sagellm_protocol import Metrics

    code, _, err = run_main(
        ["generate", *FAST_MOCK, "--prompt", "x", "--max-tokens", "3", "--metrics"], capsys
    )
    assert code == 0
    for name in Metrics.model_fields:
        assert name in err, name


def test_a_failed_request_exits_1_with_its_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing_engine(settings: Any) -> MockEngine:
        return MockEngine(MockEngineConfig(settings.engine_id, 0.0, 0.0, 1.0))

    monkeypatch.setattr(generate, "create_engine", failing_engine)
    code, out, err = run_main(
        ["generate", "--engine", "mock", "--prompt", "x", "--max-tokens", "3", "--json"], capsys
    )
    assert code == 1
    assert Response.model_validate_json(out).finish_reason == "error"
    assert "error: the request failed: " in err and "injected failure" in err


# ----------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--engine", "tpu", "--prompt", "x"], ["--engine", "'cpu'", "'cuda'", "'mock'"]),
        (["--engine", "mock", "--prompt", "x", "--max-tokens", "0"], ["--max-tokens", ">= 1"]),
        (["--engine", "mock", "--prompt", "x", "--temperature", "3"], ["--temperature", "[0, 2]"]),
        (["--engine", "mock", "--prompt", "x", "--temperature", "nan"], ["--temperature"]),
        (
            ["--engine", "mock", "--prompt", "x", "--temperature", "1", "--top-p", "1.5"],
            ["--top-p", "(0, 1]"],
        ),
        (["--engine", "mock", "--prompt", "x", "--top-p", "0.5"], ["--top-p", "--temperature"]),
        (["--engine", "mock"], ["--prompt"]),
        (["--engine", "cpu", "--prompt", "x"], ["--model is required", "tiny-llama"]),
        (
            ["--engine", "cpu", "--model", "/no/such/model/dir", "--prompt", "x"],
            ["--model", "no such directory"],
        ),
        (["--engine", "mock", "--prompt", "x", "--device", "cuda:0"], ["--device", "cuda only"]),
        (["--engine", "mock", "--prompt", "x", "--threads", "0"], ["--threads"]),
    ],
)
def test_bad_arguments_are_usage_errors(
    args: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    err = usage_error(["generate", *args], capsys)
    assert "usage: sagellm-backend generate" in err
    for text in expected:
        assert text in err, (text, err)


# ----------------------------------------------------------------------------- HF engines


@pytest.mark.hf
@pytest.mark.skipif(not HAS_HF, reason="needs torch and transformers")
def test_cpu_engine_streams_the_tiny_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(
        [
            "generate",
            "--engine",
            "cpu",
            "--model",
            "tiny-llama",
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "6",
            "--ignore-eos",
            "--stream",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["event"] == "start" and events[0]["prompt_tokens"] > 0
    end = StreamEventEnd.model_validate(events[-1])
    deltas = [StreamEventDelta.model_validate(e) for e in events[1:-1]]
    assert len(end.output_tokens) == 6 and end.finish_reason == "length"
    assert [t for d in deltas for t in d.chunk_tokens] == end.output_tokens
    assert "".join(d.chunk for d in deltas) == end.output_text
    trace = end.metrics.component_trace or []
    assert trace[0] == "sagellm-backend:CPUEngine"
    assert end.metrics.kv_used_tokens > 0


@pytest.mark.hf
@pytest.mark.skipif(not HAS_HF, reason="needs torch and transformers")
def test_cuda_engine_without_a_gpu_is_a_one_line_runtime_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sagellm_backend.engine.hf_cuda import HFCudaEngine

    if HFCudaEngine.is_available():
        pytest.skip("a CUDA GPU is available here")
    code, out, err = run_main(
        ["generate", "--engine", "cuda", "--model", "tiny-llama", "--prompt", "x"], capsys
    )
    assert code == 1
    assert out == ""
    lines = [line for line in err.splitlines() if line.startswith("sagellm-backend generate")]
    assert len(lines) == 1 and "error:" in lines[0]
    assert "Traceback" not in err


@pytest.mark.hf
@pytest.mark.skipif(not HAS_HF, reason="needs torch and transformers")
def test_unloadable_hub_id_is_a_one_line_runtime_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_main(
        ["generate", "--engine", "cpu", "--model", "no-such-org/no-such-model", "--prompt", "x"],
        capsys,
    )
    assert code == 1
    assert "sagellm-backend generate: error: " in err and "no-such-org/no-such-model" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- console script


def test_console_script_json_and_usage_error() -> None:
    cmd = console_script()
    ok = subprocess.run(
        [*cmd, "generate", *FAST_MOCK, "--prompt", "hi", "--max-tokens", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(Response.model_validate_json(ok.stdout).output_tokens) == 3
    bad = subprocess.run(
        [*cmd, "generate", "--engine", "nope", "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2
    assert "invalid choice: 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_options_of_another_engine_are_named_as_ignored(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["generate", "--engine", "mock", "--prompt", "hi", "--max-tokens", "2"]
    assert cli.main([*args, "--threads", "2", "--dtype", "bfloat16"]) == 0
    err = capsys.readouterr().err
    assert "--threads and --dtype are ignored: they do not apply to the mock engine" in err
    assert cli.main(args) == 0
    assert "ignored" not in capsys.readouterr().err
