"""Soak (``benchmarks/soak.py``): nothing lost, nothing leaked, RSS flat.

CI sizes: 2,000 mock requests and 64 requests on the tiny Llama; the full sizes (10,000
and 500) are ``@pytest.mark.slow`` here and the default of
``python benchmarks/soak.py``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SOAK_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sagellm_soak_benchmark", SOAK_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


soak = _load()


def _check(result: dict[str, Any], *, cancel: float, faults: float | None) -> None:
    print(json.dumps({k: v for k, v in result.items() if k != "checks"}, indent=1))
    failed = [name for name, ok in result["checks"].items() if not ok]
    assert not failed, (failed, result)
    assert result["ok"]
    n = result["requests"]
    assert result["lost"] == 0 and result["duplicated"] == 0
    assert result["kv_after"] == {"seqs": 0, "pages_used": 0}
    assert result["leaked_tasks"] == [] and result["leaked_threads"] == []
    assert result["rss_growth_pct"] <= 5.0
    # the workload really had its cancellations and faults
    planned = result["planned_cancellations"]
    assert 0.5 * cancel * n <= planned <= 1.5 * cancel * n
    # a cancellation that lands after the request finished leaves a normal result
    assert max(1, 0.25 * planned) <= result["cancelled_total"] <= planned
    if faults is not None:
        injected = sum(v for k, v in result["errors_by_kind"].items() if "injected" in k)
        assert 0.4 * faults * n <= injected <= 1.6 * faults * n
    assert sum(result["outcomes"].values()) == n


def test_mock_soak_ci_size() -> None:
    _check(soak.run_mock_soak(2000), cancel=0.10, faults=0.05)


@pytest.mark.hf
def test_hf_soak_ci_size(tiny_llama: str) -> None:
    _check(soak.run_hf_soak(64, concurrency=16), cancel=0.10, faults=None)


@pytest.mark.slow
def test_mock_soak_full_size() -> None:
    _check(soak.run_mock_soak(10_000), cancel=0.10, faults=0.05)


@pytest.mark.slow
@pytest.mark.hf
def test_hf_soak_full_size(tiny_llama: str) -> None:
    _check(soak.run_hf_soak(500, concurrency=16), cancel=0.10, faults=None)


@pytest.mark.cuda
@pytest.mark.hf
def test_hf_soak_on_cuda(tiny_llama: str) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _check(soak.run_hf_soak(64, concurrency=16, device="cuda"), cancel=0.10, faults=None)


def test_soak_detects_a_kv_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """The soak's checks can fail: a request whose KV is never freed is caught."""
    from sagellm_backend.engine.sched.scheduler import Scheduler

    real = Scheduler._release
    calls = {"n": 0}

    def leaky(self: Scheduler, seq: Any, *, discard: bool = False) -> Any:
        calls["n"] += 1
        if calls["n"] == 250:  # in the measured part
            seq.has_kv = False
            return None
        return real(self, seq, discard=discard)

    monkeypatch.setattr(Scheduler, "_release", leaky)
    result = soak.run_mock_soak(300)
    assert not result["ok"]
    assert result["kv_after"]["seqs"] == 1
    assert not result["checks"]["KV pool empty"]
    assert not result["checks"]["provider KV released"]


def test_soak_cli_json() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(SOAK_PATH),
            *("--mock-requests", "300", "--hf-requests", "0", "--engines", "0", "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    (result,) = data["results"]
    assert data["ok"] and result["ok"] and result["requests"] == 300
    for key in ("req_per_s", "rss_before_mb", "rss_after_mb", "errors_by_kind", "cancellations"):
        assert key in result


def test_engines_soak_gives_everything_back() -> None:
    """Issue 19: engines created, served with and stopped on one provider leak nothing."""
    result = soak.run_engines_soak(12, kind="mock")
    assert result["ok"], result
    assert result["provider_kv_bytes_after"] == 0 and result["leaked_threads"] == []


@pytest.mark.hf
def test_engines_soak_cpu() -> None:
    result = soak.run_engines_soak(8, kind="cpu")
    assert result["ok"], result
