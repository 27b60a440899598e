"""The MockEngine benchmark script runs and checks its own invariants (smoke size)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_mock_engine.py"


def test_bench_quick_json() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--streams", "200", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    (tp,) = data["throughput"]
    assert tp["requests"] == 2000 and tp["engine_req_per_s"] > 0 and tp["baseline_req_per_s"] > 0
    # the protocol floor does the per-request work of the API without KV or a scheduler
    assert tp["protocol_floor_req_per_cpu_s"] > 0
    streams = data["streams"]
    assert streams["streams"] == 200
    assert streams["lost_or_wrong"] == 0 and streams["kv_empty_after"] is True
