"""The figures of a ``bench`` run and their verdicts against the sageLLM contract.

:func:`summarize` turns the requests' results and the KV figures into JSON-ready numbers
(throughput; TTFT, TBT, TPOT, ITL and end-to-end latency distributions; memory; KV and
prefix-cache figures; errors); :func:`evaluate_contract` checks them against
:data:`CONTRACT` (Year 1: TTFT <= 100 ms, TBT <= 20 ms, TPOT <= 20 ms, output throughput
>= 50 tok/s, error rate <= 5%; Year 2: prefix hit rate >= 0.7).

Invariant: pure functions of their arguments (None where a figure could not be measured).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sagellm_backend.cli._metrics import peak_rss_bytes, percentile
from sagellm_backend.cli.bench.loadgen import LiveCounters, RequestResult
from sagellm_backend.cli.bench.workload import Workload

__all__ = ["CONTRACT", "LATENCIES", "ContractCheck", "evaluate_contract", "summarize"]

LATENCIES = ("ttft", "tbt", "tpot", "itl", "e2e")


@dataclass(frozen=True)
class ContractCheck:
    """One line of the sageLLM contract.

    Attributes:
        id: stable key (``year1.ttft``).
        stage: ``year1`` or ``year2``.
        label: what is checked, for the table.
        figure: the measured figure (``ttft``, ``tbt``, ``tpot`` -- latencies in ms at the
            ``--contract-stat`` statistic --, ``output_tok_s``, ``error_rate``,
            ``prefix_hit_rate``).
        op: ``"<="`` or ``">="``.
        threshold: the bound.
        unit: unit of the bound for display.
    """

    id: str
    stage: str
    label: str
    figure: str
    op: str
    threshold: float
    unit: str


#: The sageLLM demo contract: Year 1 (latency, throughput, errors) and Year 2 (prefix reuse).
CONTRACT: tuple[ContractCheck, ...] = (
    ContractCheck("year1.ttft", "year1", "TTFT", "ttft", "<=", 100.0, "ms"),
    ContractCheck("year1.tbt", "year1", "TBT", "tbt", "<=", 20.0, "ms"),
    ContractCheck("year1.tpot", "year1", "TPOT", "tpot", "<=", 20.0, "ms"),
    ContractCheck("year1.throughput", "year1", "throughput", "output_tok_s", ">=", 50.0, "tok/s"),
    ContractCheck("year1.error_rate", "year1", "error rate", "error_rate", "<=", 0.05, ""),
    ContractCheck(
        "year2.prefix_hit_rate", "year2", "prefix hit rate", "prefix_hit_rate", ">=", 0.7, ""
    ),
)


def _dist(values: Sequence[float]) -> dict[str, float | int | None]:
    vals = [float(v) for v in values]
    return {
        "count": len(vals),
        "mean": statistics.fmean(vals) if vals else None,
        "p50": percentile(vals, 50),
        "p90": percentile(vals, 90),
        "p99": percentile(vals, 99),
        "min": min(vals) if vals else None,
        "max": max(vals) if vals else None,
    }


def _kv_delta(before: Any, after: Any, name: str) -> float | int | None:
    if before is None or after is None:
        return None
    value: float | int = getattr(after, name) - getattr(before, name)
    return value


def summarize(
    results: list[RequestResult],
    duration: float,
    wl: Workload,
    kv_before: Any,
    kv_after: Any,
    live: LiveCounters,
    provider_memory: dict[str, int] | None,
) -> dict[str, Any]:
    """Every figure of the run (JSON-ready; None where a figure could not be measured)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(len(r.output_tokens) for r in ok)
    in_tokens_ok = sum(r.prompt_tokens for r in ok)
    metrics = [r.metrics for r in ok if r.metrics is not None]
    multi = [r.metrics for r in ok if r.metrics is not None and len(r.output_tokens) > 1]
    all_metrics = [r.metrics for r in results if r.metrics is not None]
    latency = {
        "ttft": _dist([m.ttft_ms for m in metrics]),
        "tbt": _dist([m.tbt_ms for m in multi]),
        "tpot": _dist([m.tpot_ms for m in multi]),
        # isagellm-protocol 0.1.0 has no itl_list: then no ITL figures (count 0)
        "itl": _dist([float(x) for m in metrics for x in getattr(m, "itl_list", None) or ()]),
        "e2e": _dist([r.latency_s * 1000.0 for r in ok]),
    }
    hit = _kv_delta(kv_before, kv_after, "prefix_hit_tokens")
    query = _kv_delta(kv_before, kv_after, "prefix_query_tokens")
    request_peak_tokens = max((m.kv_used_tokens for m in all_metrics), default=0)
    request_peak_bytes = max((m.kv_used_bytes for m in all_metrics), default=0)
    kv: dict[str, Any] = {
        "prefix_hit_rate": (hit / query) if hit is not None and query else None,
        "prefix_hit_tokens": hit,
        "prefix_query_tokens": query,
        "request_prefix_hit_rate_mean": (
            statistics.fmean(m.prefix_hit_rate for m in metrics) if metrics else None
        ),
        "kv_used_tokens_peak": max(live.kv_peak_tokens, request_peak_tokens),
        "kv_used_bytes_peak": max(live.kv_peak_bytes, request_peak_bytes),
        "request_kv_used_tokens_max": request_peak_tokens,
        "request_kv_used_bytes_max": request_peak_bytes,
        "evict_count": _kv_delta(kv_before, kv_after, "evict_count"),
        "evict_ms": _kv_delta(kv_before, kv_after, "evict_ms"),
        "pool": None if kv_after is None else dataclasses.asdict(kv_after),
    }
    errors = [f"request {r.index}: {r.error}" for r in results if not r.ok]
    per_request = [_request_record(r) for r in results]
    return {
        "duration_s": duration,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "error_rate": (len(results) - len(ok)) / len(results) if results else 0.0,
        "input_tokens": sum(r.prompt_tokens for r in results),
        "output_tokens": out_tokens,
        "throughput": {
            "output_tok_s": out_tokens / duration if duration > 0 else None,
            "total_tok_s": (in_tokens_ok + out_tokens) / duration if duration > 0 else None,
            "req_s": len(ok) / duration if duration > 0 else None,
        },
        "latency_ms": latency,
        "memory": {
            "peak_mem_mb": max((m.peak_mem_mb for m in all_metrics), default=None),
            "peak_rss_bytes": live.rss_peak,
            "process_max_rss_bytes": peak_rss_bytes(),
            "provider": provider_memory,
        },
        "kv": kv,
        "errors": errors[:20],
        "per_request": per_request,
        "finish_reasons": dict(
            sorted(
                {
                    reason: sum(1 for r in results if r.finish_reason == reason)
                    for reason in {r.finish_reason for r in results}
                }.items()
            )
        ),
    }


def _request_record(r: RequestResult) -> dict[str, Any]:
    """One request's figures for the JSON report (engine Metrics where there are any)."""
    m = r.metrics
    ts = getattr(m, "timestamps", None)
    return {
        "index": r.index,
        "ok": r.ok,
        "finish_reason": r.finish_reason,
        "error": r.error,
        "prompt_tokens": r.prompt_tokens,
        "output_tokens": len(r.output_tokens),
        "latency_ms": r.latency_s * 1000.0,
        "ttft_ms": None if m is None else m.ttft_ms,
        "tbt_ms": None if m is None else m.tbt_ms,
        "tpot_ms": None if m is None else m.tpot_ms,
        "prefix_hit_rate": None if m is None else m.prefix_hit_rate,
        "kv_used_tokens": None if m is None else m.kv_used_tokens,
        "queued_at": None if ts is None else ts.queued_at,
        "scheduled_at": None if ts is None else ts.scheduled_at,
        "executed_at": None if ts is None else ts.executed_at,
        "completed_at": None if ts is None else ts.completed_at,
    }


def _figure(results: dict[str, Any], figure: str, stat: str) -> float | None:
    if figure in LATENCIES:
        value = results["latency_ms"][figure][stat]
    elif figure == "output_tok_s":
        value = results["throughput"]["output_tok_s"]
    elif figure == "error_rate":
        value = results["error_rate"]
    elif figure == "prefix_hit_rate":
        value = results["kv"]["prefix_hit_rate"]
    else:  # pragma: no cover - CONTRACT names only the figures above
        raise KeyError(figure)
    return None if value is None else float(value)


def evaluate_contract(
    results: dict[str, Any], *, stat: str, shared_prefix: int, output_len: int
) -> dict[str, Any]:
    """Verdicts of :data:`CONTRACT` on the figures of :func:`summarize`.

    A check is *not applicable* (``passed`` None) when its figure cannot exist for the
    workload: TBT/TPOT with ``output_len`` 1, the prefix hit rate without a shared prefix.
    An applicable check whose figure is missing (no request completed) fails.

    Returns:
        ``{"statistic", "checks": [...], "year1": {"passed"}, "year2": {"passed"},
        "passed"}``; a stage's ``passed`` is None when none of its checks applies.
    """
    checks = []
    for c in CONTRACT:
        note = ""
        applicable = True
        if c.figure in ("tbt", "tpot") and output_len < 2:
            applicable, note = False, "needs --output-len >= 2"
        if c.figure == "prefix_hit_rate" and shared_prefix == 0:
            applicable, note = False, "the workload has no shared prefix (--shared-prefix L)"
        measured = _figure(results, c.figure, stat)
        passed: bool | None = None
        if applicable:
            if measured is None:
                passed, note = False, "not measured (no completed request)"
            else:
                passed = measured <= c.threshold if c.op == "<=" else measured >= c.threshold
        checks.append(
            {
                "id": c.id,
                "stage": c.stage,
                "label": c.label,
                "figure": c.figure,
                "statistic": stat if c.figure in LATENCIES else None,
                "op": c.op,
                "threshold": c.threshold,
                "unit": c.unit,
                "measured": measured,
                "applicable": applicable,
                "passed": passed,
                "note": note,
            }
        )
    verdict: dict[str, Any] = {"statistic": stat, "checks": checks}
    overall: list[bool] = []
    for stage in ("year1", "year2"):
        stage_checks = [c["passed"] for c in checks if c["stage"] == stage and c["applicable"]]
        stage_passed = all(stage_checks) if stage_checks else None
        verdict[stage] = {"passed": stage_passed}
        if stage_passed is not None:
            overall.append(stage_passed)
    verdict["passed"] = all(overall) if overall else None
    return verdict
