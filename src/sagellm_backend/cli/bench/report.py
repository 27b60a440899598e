"""The human-readable tables of a ``bench`` report, and where it was measured.

Invariant: :func:`render_report` reads only the report's JSON-ready data (what ``--json``
writes), so the tables and the JSON always agree.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from sagellm_backend.cli._table import (
    fmt_bytes,
    fmt_count,
    fmt_float,
    fmt_ms,
    fmt_pct,
    render_table,
)

__all__ = ["load_average", "machine_info", "render_report"]


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (2 decimals), None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on POSIX
        return None


def machine_info(load_at_start: list[float] | None) -> dict[str, Any]:
    """Where the figures were measured (a loaded machine makes them meaningless)."""
    torch_mod = sys.modules.get("torch")
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": getattr(torch_mod, "__version__", None),
        "torch_threads": torch_mod.get_num_threads() if torch_mod is not None else None,
        "load_average_start": load_at_start,
        "load_average_end": load_average(),
    }


def _verdict_text(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[passed]


def _measured_text(check: dict[str, Any]) -> str:
    value = check["measured"]
    if value is None:
        return "-"
    if check["figure"] in ("error_rate", "prefix_hit_rate"):
        return f"{value:.3f}" if check["figure"] == "prefix_hit_rate" else fmt_pct(value)
    if check["unit"] == "ms":
        return f"{fmt_ms(value)} ms"
    return f"{value:,.1f} {check['unit']}"


def _target_text(check: dict[str, Any]) -> str:
    if check["figure"] == "error_rate":
        return f"{check['op']} {check['threshold'] * 100:g}%"
    unit = f" {check['unit']}" if check["unit"] else ""
    return f"{check['op']} {check['threshold']:g}{unit}"


def render_report(report: dict[str, Any]) -> str:
    """The human-readable tables of a ``--json`` report."""
    res = report["results"]
    cfg = report["config"]
    lines: list[str] = []
    thr = res["throughput"]
    lines.append(
        f"Results: {res['completed']}/{res['requests']} requests completed in "
        f"{res['duration_s']:.2f} s ({res['failed']} failed, error rate "
        f"{fmt_pct(res['error_rate'])})"
    )
    load = report["machine"].get("load_average_start")
    if load:
        lines.append(
            f"  load average {load[0]:.2f} on {report['machine']['cpus']} CPUs at the start "
            "(busy machines give noisy figures)"
        )
    lines.append(
        render_table(
            ["THROUGHPUT", "VALUE"],
            [
                ["output tokens/s", fmt_float(thr["output_tok_s"])],
                ["total tokens/s (prompt + output)", fmt_float(thr["total_tok_s"])],
                ["requests/s", fmt_float(thr["req_s"], 2)],
                ["output tokens", fmt_count(res["output_tokens"])],
                ["prompt tokens", fmt_count(res["input_tokens"])],
            ],
            indent=2,
        )
    )
    lines.append("")
    names = {
        "ttft": "TTFT (time to first token)",
        "tbt": "TBT (mean gap, per request)",
        "tpot": "TPOT (per output token)",
        "itl": "ITL (every token gap)",
        "e2e": "end-to-end latency",
    }
    rows = []
    for key, name in names.items():
        d = res["latency_ms"][key]
        rows.append(
            [name, *(fmt_ms(d[s]) for s in ("mean", "p50", "p90", "p99", "max")), str(d["count"])]
        )
    lines.append(
        render_table(["LATENCY (ms)", "MEAN", "P50", "P90", "P99", "MAX", "N"], rows, indent=2)
    )
    lines.append("")
    mem, kv = res["memory"], res["kv"]
    mem_rows = [
        [
            "peak memory, engine (Metrics.peak_mem_mb)",
            "-" if mem["peak_mem_mb"] is None else f"{mem['peak_mem_mb']:,} MiB",
        ],
        ["peak RSS of this process during the run", fmt_bytes(mem["peak_rss_bytes"])],
        [
            "KV used at peak (tokens / bytes)",
            f"{fmt_count(kv['kv_used_tokens_peak'])} / {fmt_bytes(kv['kv_used_bytes_peak'])}",
        ],
        [
            "prefix hit rate (hit / queried prompt tokens)",
            "-"
            if kv["prefix_hit_rate"] is None
            else f"{kv['prefix_hit_rate']:.3f} ({fmt_count(kv['prefix_hit_tokens'])} / "
            f"{fmt_count(kv['prefix_query_tokens'])})",
        ],
        [
            "prefix hit rate, mean of requests",
            fmt_float(kv["request_prefix_hit_rate_mean"], 3),
        ],
        [
            "evictions (count / time)",
            f"{fmt_count(kv['evict_count'])} / {fmt_ms(kv['evict_ms'])} ms",
        ],
    ]
    pool = kv.get("pool")
    if pool:
        mem_rows.append(
            [
                "KV pool (pages x page size, block size)",
                f"{pool['num_pages']:,} x {fmt_bytes(pool['page_bytes'])} = "
                f"{fmt_bytes(pool['total_bytes'])}, {pool['block_size']} tokens/page",
            ]
        )
    lines.append(render_table(["MEMORY AND KV CACHE", "VALUE"], mem_rows, indent=2))
    if res["errors"]:
        lines.append("")
        lines.append("Errors (first ones):")
        lines.extend(f"  {e}" for e in res["errors"][:5])
    base = report.get("baselines") or {}
    if base:
        lines.append("")
        lines.append(
            "Baseline: plain transformers generate, same weights, same prompt ids, same run"
        )
        rows = [
            [
                f"engine ({cfg['engine']}, concurrency {cfg['concurrency']})",
                f"{res['duration_s']:.2f}",
                fmt_float(thr["output_tok_s"]),
                "-",
                "-",
            ]
        ]
        for mode, b in base.items():
            ratio = report["ratios"].get(f"engine_vs_{mode}")
            what = (
                "one request at a time"
                if mode == "sequential"
                else (f"left-padded static batches of {b['batch_size']}")
            )
            rows.append(
                [
                    f"generate, {what}",
                    f"{b['seconds']:.2f}",
                    fmt_float(b["output_tok_s"]),
                    "-" if ratio is None else f"{ratio:.2f}x",
                    f"{b['same_tokens']}/{b['compared']}",
                ]
            )
        lines.append(
            render_table(
                ["RUN", "SECONDS", "TOK/S", "ENGINE SPEEDUP", "SAME TOKENS"], rows, indent=2
            )
        )
        for mode in base:
            ratio = report["ratios"].get(f"engine_vs_{mode}")
            if ratio is not None:
                lines.append(f"  engine / generate {mode}: {ratio:.2f}x output tokens/s")
    contract = report["contract"]
    lines.append("")
    lines.append(
        f"sageLLM contract (latency statistic: {contract['statistic']}): Year-1 "
        f"{_verdict_text(contract['year1']['passed'])}, Year-2 "
        f"{_verdict_text(contract['year2']['passed'])}"
    )
    rows = []
    for c in contract["checks"]:
        label = c["label"] + (f" {c['statistic']}" if c["statistic"] else "")
        stage = "Year-1" if c["stage"] == "year1" else "Year-2"
        rows.append(
            [
                stage,
                label,
                _target_text(c),
                _measured_text(c),
                _verdict_text(c["passed"]),
                c["note"],
            ]
        )
    lines.append(
        render_table(["STAGE", "CHECK", "TARGET", "MEASURED", "VERDICT", "NOTE"], rows, indent=2)
    )
    return "\n".join(lines)
