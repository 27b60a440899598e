"""Request figures for the terminal: the protocol Metrics as table rows, percentiles.

Invariant: pure functions of their arguments (except :func:`peak_rss_bytes`, which reads
this process's resource usage); importing this module imports neither torch nor
transformers.
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
from collections.abc import Sequence
from typing import Any

from sagellm_backend.cli._table import fmt_bytes, fmt_ms

__all__ = ["METRIC_DOCS", "metrics_rows", "peak_rss_bytes", "percentile"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


#: Metrics field -> (unit, meaning) for the table; fields not listed use the protocol's text.
METRIC_DOCS: dict[str, tuple[str, str]] = {
    "ttft_ms": ("ms", "queued -> first output token"),
    "tbt_ms": ("ms", "mean gap between output tokens"),
    "tpot_ms": ("ms", "(completed - first token) / (n - 1)"),
    "throughput_tps": ("tok/s", "output tokens / request lifetime"),
    "peak_mem_mb": ("MiB", "peak memory of the engine's provider"),
    "error_rate": ("", "failed / finished requests (engine)"),
    "kv_used_tokens": ("tokens", "KV slots held at completion"),
    "kv_used_bytes": ("bytes", "KV page bytes held at completion"),
    "prefix_hit_rate": ("", "prompt share from the prefix cache"),
    "evict_count": ("", "cached KV pages evicted"),
    "evict_ms": ("ms", "time spent evicting"),
    "spec_accept_rate": ("", "speculative decoding (0: unused)"),
    "prefill_ms": ("ms", "time in prompt (prefill) steps"),
    "decode_ms": ("ms", "time in decode steps"),
    "kv_transfer_count": ("", "KV migrations between devices"),
    "kv_transfer_bytes": ("bytes", "bytes of KV migrated"),
    "kv_transfer_ms": ("ms", "time migrating KV"),
    "comm_overhead_ms": ("ms", "collective communication time"),
    "allreduce_count": ("", "all-reduce calls"),
    "allgather_count": ("", "all-gather calls"),
    "itl_list": ("ms", "gaps between output tokens"),
    "timestamps": ("", "wall-clock instants of the request"),
    "component_trace": ("", "components the request went through"),
}

_TIMESTAMP_DOCS = {
    "queued_at": "entered the engine's queue",
    "scheduled_at": "admitted to a running batch",
    "executed_at": "first output token produced",
    "completed_at": "finished",
}


def _fmt_value(value: Any, unit: str) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        if unit == "bytes":
            return f"{value:,} ({fmt_bytes(value)})" if value >= 1024 else f"{value} B"
        return f"{value:,}" + (f" {unit}" if unit else "")
    if isinstance(value, float):
        if unit == "ms":
            return f"{fmt_ms(value)} ms"
        if unit == "":
            return f"{value:.4g}"
        return f"{value:,.1f} {unit}"
    return str(value)


def _clock(epoch_s: float) -> str:
    return _dt.datetime.fromtimestamp(epoch_s).strftime("%H:%M:%S.%f")[:-3]


def metrics_rows(metrics: Any) -> list[list[str]]:
    """Rows ``[field, value, meaning]`` covering every field of a protocol Metrics.

    ``itl_list`` is summarised (count, min, p50, p90, max), ``timestamps`` expands into
    one row per instant (local clock time and milliseconds after ``queued_at``), and
    ``component_trace`` has one component per line (multi-line cells: see
    :func:`~sagellm_backend.cli._table.render_table`). Fields this table does not know (a newer
    protocol) are shown with their value and the protocol's description.
    """
    rows: list[list[str]] = []
    fields = type(metrics).model_fields
    for name, info in fields.items():
        value = getattr(metrics, name)
        unit, meaning = METRIC_DOCS.get(name, ("", (info.description or "").strip()))
        if name == "itl_list":
            gaps = [float(v) for v in value or []]
            if gaps:
                summary = (
                    f"{len(gaps)} gaps (ms)\nmin {min(gaps):.2f}, p50 {percentile(gaps, 50):.2f}"
                    f"\np90 {percentile(gaps, 90):.2f}, max {max(gaps):.2f}"
                )
            else:
                summary = "0 gaps (< 2 tokens)"
            rows.append([name, summary, meaning])
        elif name == "timestamps":
            if value is None:
                rows.append([name, "-", meaning])
                continue
            base = float(value.queued_at)
            for key, doc in _TIMESTAMP_DOCS.items():
                stamp = getattr(value, key, None)
                if stamp is None:
                    continue
                rel = (float(stamp) - base) * 1000.0
                rows.append([f"timestamps.{key}", f"{_clock(float(stamp))} (+{rel:.2f} ms)", doc])
        elif name == "component_trace":
            rows.append([name, "\n".join(value) if value else "-", meaning])
        else:
            rows.append([name, _fmt_value(value, unit), meaning])
    return rows


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far (``getrusage``), None if unknown."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)
