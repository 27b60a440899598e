"""sagellm-core 0.1.x drives our backends and the mock engine, unchanged.

Core resolves ``sagellm.backends`` / ``sagellm.engines`` entry points itself (loading every
entry point of the group), so this also proves each of our entry-point modules imports.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sagellm_core = pytest.importorskip("sagellm_core")

from sagellm_core import BackendConfig, EngineConfig, create_backend, create_engine  # noqa: E402
from sagellm_protocol import Request  # noqa: E402

from sagellm_backend.engine.mock import ENV_MOCK_OPTIONS, MockEngine  # noqa: E402

BACKENDS = ["mock", "cpu"]


def _request(i: int, max_tokens: int = 5, *, stream: bool = False) -> Request:
    return Request(
        request_id=f"core-{i}",
        trace_id=f"trace-{i}",
        model="mock-model",
        prompt=f"integration prompt number {i}",
        max_tokens=max_tokens,
        stream=stream,
    )


@pytest.fixture
def fast_mock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        ENV_MOCK_OPTIONS, json.dumps({"simulate_ttft_ms": 1.0, "simulate_latency_ms": 0.5})
    )


@pytest.mark.parametrize("backend_kind", BACKENDS)
async def test_core_creates_backend_and_mock_engine(backend_kind: str, fast_mock: None) -> None:
    if backend_kind == "cpu":
        pytest.importorskip("torch")
    backend = create_backend(BackendConfig(kind=backend_kind))
    engine = create_engine(
        EngineConfig(kind="mock", model="mock-model", max_batch_size=4, max_output_tokens=64),
        backend,
    )
    assert isinstance(engine, MockEngine)
    assert engine.provider is backend
    assert engine.config.max_batch_size == 4
    await engine.start()
    try:
        assert await engine.health_check()
        resp = await engine.execute(_request(0, 7))
        assert resp.error is None and resp.finish_reason == "length"
        assert len(resp.output_tokens) == 7
        trace = resp.metrics.component_trace
        assert trace is not None
        assert "sagellm-core" in trace and "sagellm-backend:MockEngine" in trace
        assert resp.metrics.kv_used_tokens > 0 and resp.metrics.kv_used_bytes > 0

        events = [ev async for ev in engine.stream(_request(1, 6, stream=True))]
        assert events[0].event == "start" and events[-1].event == "end"
        end = events[-1]
        assert "".join(ev.chunk for ev in events if ev.event == "delta") == end.output_text
        assert len(end.output_tokens) == 6
        assert end.metrics.component_trace == ["sagellm-core", "sagellm-backend:MockEngine"]

        capped = await engine.execute(_request(2, 65))  # max_output_tokens from core's config
        assert capped.finish_reason == "length" and len(capped.output_tokens) == 64
    finally:
        await engine.stop()
    assert not engine.is_running
    # KV went back to the provider's budget.
    assert backend.memory_stats()["kv_used_bytes"] == 0


def _demo(
    tmp_path: Path, backend_kind: str, *, concurrency: int, stream: bool, env: dict[str, str]
) -> tuple[dict[str, Any], str]:
    metrics_path = tmp_path / f"metrics-{backend_kind}.json"
    config = tmp_path / f"demo-{backend_kind}.yaml"
    config.write_text(
        "\n".join(
            [
                "backend:",
                f"  kind: {backend_kind}",
                "engine:",
                "  kind: mock",
                "  model: mock-model",
                "  max_batch_size: 8",
                "workload:",
                "  segments: [short]",
                f"  concurrency: {concurrency}",
                "  request_timeout_s: 60",
                "output:",
                f"  metrics_path: {metrics_path}",
                f"  report_path: {tmp_path / 'report.md'}",
                f"  log_path: {tmp_path / 'demo.log'}",
                "",
            ]
        )
    )
    from sagellm_core.config import load_config

    load_config(str(config))  # the file is a valid DemoConfig
    cmd = [sys.executable, "-m", "sagellm_core.demo", "--config", str(config), "--verbose"]
    if stream:
        cmd.append("--stream")
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **env},
        cwd=tmp_path,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert metrics_path.exists(), log
    return json.loads(metrics_path.read_text()), log


def _check_demo(metrics: dict[str, Any], log: str, at_least: int) -> None:
    # The demo exits 0 even when requests fail: check its own counts and metrics.
    segments = re.findall(r"Segment (\w+): (\d+)/(\d+) success, (\d+) failed", log)
    assert segments, log
    for _name, ok, total, failed in segments:
        assert int(failed) == 0, log
        assert int(ok) == int(total) >= at_least, log
    assert metrics["error_rate"] == 0.0
    assert metrics["ttft_ms"] > 0 and metrics["throughput_tps"] > 0
    assert "Traceback" not in log


def test_core_demo_runs_with_default_mock_latency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unchanged demo with 0.1.1.2 default latencies (50 ms TTFT, 10 ms/token)."""
    monkeypatch.delenv(ENV_MOCK_OPTIONS, raising=False)
    metrics, log = _demo(tmp_path, "mock", concurrency=2, stream=False, env={})
    _check_demo(metrics, log, at_least=2)
    assert metrics["ttft_ms"] >= 45.0  # the default simulated prefill
    assert 8.0 <= metrics["tbt_ms"] <= 30.0  # ~10 ms per token


@pytest.mark.parametrize("backend_kind", BACKENDS)
def test_core_demo_streaming_on_each_backend(tmp_path: Path, backend_kind: str) -> None:
    if backend_kind == "cpu":
        pytest.importorskip("torch")
    env = {ENV_MOCK_OPTIONS: json.dumps({"simulate_ttft_ms": 2.0, "simulate_latency_ms": 0.2})}
    metrics, log = _demo(tmp_path, backend_kind, concurrency=8, stream=True, env=env)
    _check_demo(metrics, log, at_least=8)
