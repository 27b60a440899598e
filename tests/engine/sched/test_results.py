"""RequestResults: error rate, peak memory and early error results of an engine's requests."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from sagellm_protocol import Request

from sagellm_backend.engine.sched import _results
from sagellm_backend.engine.sched._results import RequestResults
from sagellm_backend.engine.sched.seq import SchedSeq
from sagellm_backend.errors import ConfigError

MIB = 1 << 20


class _Provider:
    def __init__(self, stats: dict[str, int]) -> None:
        self.stats = stats
        self.reads = 0

    def memory_stats(self) -> dict[str, int]:
        self.reads += 1
        return dict(self.stats)


def _kv(pages: int, free: int, page_bytes: int) -> Any:
    return SimpleNamespace(
        pool=SimpleNamespace(num_pages=pages, num_free=free),
        spec=SimpleNamespace(page_bytes=page_bytes),
    )


def _request() -> Request:
    return Request(
        request_id="r1", trace_id="t1", model="m", prompt="hi", max_tokens=4, stream=False
    )


def test_without_a_provider_the_peak_is_the_highest_kv_use_noted() -> None:
    res = RequestResults(["x"])
    res.note_kv_peak(_kv(100, 60, MIB))  # 40 MiB in use
    res.note_kv_peak(_kv(100, 90, MIB))  # 10 MiB: not a new peak
    assert res.peak_mem_mb(None) == 40


def test_the_provider_peak_is_read_at_most_every_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(_results, "now", lambda: clock[0])
    provider = _Provider({"peak": 5 * MIB + 1})
    res = RequestResults(["x"])
    assert res.peak_mem_mb(provider) == 6  # rounded up
    provider.stats = {"peak": 9 * MIB}
    clock[0] += _results.PEAK_TTL_S / 2
    assert res.peak_mem_mb(provider) == 6 and provider.reads == 1  # reused
    clock[0] += _results.PEAK_TTL_S
    assert res.peak_mem_mb(provider) == 9 and provider.reads == 2
    provider.stats = {"allocated": 2 * MIB}  # no "peak": the allocated bytes
    clock[0] += 1.0
    assert res.peak_mem_mb(provider) == 2


def test_error_results_and_served_requests_share_one_error_rate() -> None:
    res = RequestResults(["engine:test"])
    early = res.error_result(_request(), ConfigError("bad field"), None)
    assert early.finish_reason == "error" and early.error is not None
    assert "bad field" in early.error.message
    assert early.metrics.error_rate == 1.0 and early.metrics.component_trace == ["engine:test"]
    assert res.early_failed == 1
    seq = SchedSeq("s#1", [1, 2, 3], 4)
    seq.finish_reason = "length"
    seq.timeline.token_times.extend([seq.timeline.queued + 0.01] * 2)
    served = res.metrics(seq, None)
    assert served.error_rate == 0.5  # 1 failed of 2 finished
    assert res.early_failed == 1  # served requests are not early failures
