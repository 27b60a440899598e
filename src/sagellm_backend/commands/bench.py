"""``sagellm-backend bench``: load-test an engine and check it against the sageLLM contract.

Workload: ``--requests N`` requests, at most ``--concurrency C`` in flight (a new one is
sent as soon as one finishes), each asking for exactly ``--output-len`` tokens (end of
sequence ignored, greedy). Prompts are either synthetic -- ``--input-len`` seeded random
token ids of the model's vocabulary (special tokens excluded; the tokenizer's own leading
tokens such as BOS first) -- or the lines of ``--prompts-file`` (used in turn). With
``--shared-prefix L`` every prompt starts with the same L tokens (then the L-token prefix
comes before the ``--input-len`` tokens), and the warm-up request is that prefix alone, as
the first user of a shared system prompt would be. The HF engines get the exact token ids
(``Request.metadata["prompt_token_ids"]``); the mock engine gets text that its tokenizer
splits into exactly those lengths.

Measured (one warm-up request first, not counted): wall time from the first request sent
to the last finished; output/total tokens per second and requests per second; per-request
TTFT, TBT, TPOT and end-to-end latency and all inter-token gaps (ITL) as mean/p50/p90/p99/
max, from the engine's protocol Metrics; peak memory (the engine's ``peak_mem_mb`` and the
process's peak RSS sampled during the run); KV figures (peak used tokens/bytes, the run's
prefix hit rate = prompt tokens served from the prefix cache / prompt tokens queried,
evictions and their time) from the engine's KV manager before/after the run; error rate.

``--baseline hf`` then runs plain transformers ``model.generate`` on the same model
weights and the same prompt ids in the same process: one request at a time (sequential)
and left-padded static batches of ``--concurrency`` (``hf-sequential`` / ``hf-static``
pick one), and prints engine / baseline throughput and how many requests produced the same
greedy tokens as the engine.

The contract table checks the chosen statistic (``--contract-stat``, default p50) against
the sageLLM Year-1 demo contract (TTFT <= 100 ms, TBT <= 20 ms, TPOT <= 20 ms, output
throughput >= 50 tok/s, error rate <= 5%) and Year-2 (prefix hit rate >= 0.7; applicable
when the workload has a shared prefix).

Output: a progress line on stderr while it runs (one updating line on a TTY, a line per
quarter otherwise; ``--no-progress`` turns it off), then the tables on stdout. ``--json
FILE`` writes every figure, the configuration and the verdicts as one JSON object (``-``:
stdout, the tables then go to stderr). Exit status: 0; 1 when the engine cannot start,
no request completed, or ``--strict`` and an applicable contract check failed; 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sagellm_backend.cli import Command, register_command
from sagellm_backend.commands._common import (
    UsageError,
    add_engine_arguments,
    create_engine,
    describe_exception,
    engine_description,
    engine_settings,
    guarded,
    make_request,
    non_negative_int,
    peak_rss_bytes,
    percentile,
    positive_int,
    request_error_text,
    resolve_engine_kind,
    resolve_model,
)
from sagellm_backend.commands._table import (
    Progress,
    fmt_bytes,
    fmt_count,
    fmt_float,
    fmt_ms,
    fmt_pct,
    render_table,
)

__all__ = [
    "BASELINE_CHOICES",
    "CONTRACT",
    "JSON_SCHEMA",
    "ContractCheck",
    "add_arguments",
    "evaluate_contract",
    "run",
]

#: ``schema`` of the ``--json`` output; bumped when a field changes meaning or goes away.
JSON_SCHEMA = "sagellm-backend.bench/1"
#: Values of ``--baseline``.
BASELINE_CHOICES = ("none", "hf", "hf-sequential", "hf-static")
#: Values of ``--contract-stat``.
STAT_CHOICES = ("p50", "p90", "p99", "mean")
DEFAULT_REQUESTS = 16
DEFAULT_INPUT_LEN = 128
DEFAULT_OUTPUT_LEN = 64
_LATENCIES = ("ttft", "tbt", "tpot", "itl", "e2e")


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``bench``."""
    wl = parser.add_argument_group("workload")
    wl.add_argument(
        "--requests",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"requests to send (>= 1; default {DEFAULT_REQUESTS}, or one per line of "
        "--prompts-file)",
    )
    wl.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        metavar="C",
        help="most requests in flight at once (>= 1; default: all of them)",
    )
    wl.add_argument(
        "--input-len",
        type=positive_int,
        default=None,
        metavar="TOKENS",
        help=f"prompt tokens per request, synthetic prompts (default {DEFAULT_INPUT_LEN})",
    )
    wl.add_argument(
        "--output-len",
        type=positive_int,
        default=DEFAULT_OUTPUT_LEN,
        metavar="TOKENS",
        help=f"tokens generated per request, end of sequence ignored (default "
        f"{DEFAULT_OUTPUT_LEN})",
    )
    wl.add_argument(
        "--prompts-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="prompts instead of synthetic ones: one per line (a line holding a JSON string "
        "or an object with a 'prompt' field is decoded); used in turn",
    )
    wl.add_argument(
        "--shared-prefix",
        type=non_negative_int,
        default=0,
        metavar="TOKENS",
        help="prepend the same TOKENS-token prefix to every prompt (default 0: none)",
    )
    wl.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    wl.add_argument(
        "--warmup",
        type=non_negative_int,
        default=1,
        metavar="N",
        help="unmeasured requests before the run (default 1; with --shared-prefix the first "
        "is the prefix alone)",
    )
    wl.add_argument(
        "--no-stream",
        dest="stream",
        action="store_false",
        help="use execute() instead of streaming (progress advances as requests finish)",
    )
    wl.add_argument(
        "--max-batch-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="engine batch capacity (default: the concurrency)",
    )
    res = parser.add_argument_group("baseline, contract and output")
    res.add_argument(
        "--baseline",
        choices=BASELINE_CHOICES,
        default="none",
        help="also run plain transformers generate on the same requests: hf = sequential "
        "and static batches, hf-sequential / hf-static = one of them (cpu/cuda engines)",
    )
    res.add_argument(
        "--contract-stat",
        choices=STAT_CHOICES,
        default="p50",
        help="latency statistic checked against the contract (default p50)",
    )
    res.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 when an applicable contract check fails",
    )
    res.add_argument(
        "--json",
        metavar="FILE",
        default=None,
        help="write every figure, the configuration and the verdicts as JSON ('-': stdout)",
    )
    res.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    add_engine_arguments(
        parser,
        model_help="model to load: a Hugging Face model directory, a hub id, or a built-in "
        "offline model (bench-llama is the benchmark model, tiny-llama the fastest); "
        "required for cpu and cuda",
    )


# ----------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """The requests' prompts.

    Invariant: ``len(texts) == len(lengths)`` (== ``len(ids)`` when ids are given);
    ``lengths[i]`` is the prompt's token count as the engine sees it.
    """

    texts: list[str]
    ids: list[list[int]] | None
    lengths: list[int]
    output_len: int
    shared_prefix: int
    prefix_text: str
    prefix_ids: list[int] | None
    source: str


def read_prompts_file(path: Path) -> list[str]:
    """Prompts of a ``--prompts-file`` (see ``--help``).

    Raises:
        UsageError: missing/unreadable file, a bad JSON line, or no prompt in it.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--prompts-file {str(path)!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--prompts-file {str(path)!r}: cannot read it ({exc})") from None
    prompts: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line[0] in '{"':
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(
                    f"--prompts-file {str(path)!r} line {number}: not valid JSON ({exc.msg})"
                ) from None
            if isinstance(value, dict):
                value = value.get("prompt", value.get("text"))
            if not isinstance(value, str) or not value:
                raise UsageError(
                    f"--prompts-file {str(path)!r} line {number}: a JSON line must be a "
                    "non-empty string or an object with a 'prompt' string"
                )
            line = value
        prompts.append(line)
    if not prompts:
        raise UsageError(f"--prompts-file {str(path)!r} holds no prompt")
    return prompts


def _hf_workload(
    tokenizer: Any, args: argparse.Namespace, n: int, file_prompts: list[str] | None
) -> Workload:
    rng = random.Random(args.seed)
    specials = {int(t) for t in getattr(tokenizer, "all_special_ids", []) or []}
    pool = [i for i in range(len(tokenizer)) if i not in specials]
    if not pool:
        raise UsageError("the model's tokenizer has no ordinary tokens to build prompts from")
    lead = [int(t) for t in tokenizer("", add_special_tokens=True)["input_ids"]]

    def draw(k: int) -> list[int]:
        return [rng.choice(pool) for _ in range(max(0, k))]

    prefix: list[int] | None = None
    if args.shared_prefix:
        prefix = (lead + draw(args.shared_prefix))[: args.shared_prefix]
    ids: list[list[int]] = []
    if file_prompts is None:
        input_len = args.input_len or DEFAULT_INPUT_LEN
        for _ in range(n):
            if prefix is not None:
                ids.append(prefix + draw(input_len))
            else:
                ids.append((lead + draw(input_len))[:input_len])
    else:
        encoded = [
            [int(t) for t in tokenizer(p, add_special_tokens=prefix is None)["input_ids"]]
            for p in file_prompts
        ]
        for i in range(n):
            body = encoded[i % len(encoded)]
            ids.append((prefix or []) + body)
    texts = [tokenizer.decode(x, skip_special_tokens=False) or "<prompt>" for x in ids]
    return Workload(
        texts=texts,
        ids=ids,
        lengths=[len(x) for x in ids],
        output_len=args.output_len,
        shared_prefix=args.shared_prefix,
        prefix_text="" if prefix is None else tokenizer.decode(prefix),
        prefix_ids=prefix,
        source="synthetic" if file_prompts is None else f"file:{args.prompts_file}",
    )


def _mock_workload(
    tokenizer: Any, args: argparse.Namespace, n: int, file_prompts: list[str] | None
) -> Workload:
    rng = random.Random(args.seed)
    first = tokenizer.WORD_OFFSET
    words = tokenizer.num_output_words

    def draw(k: int) -> list[int]:
        return [first + rng.randrange(words) for _ in range(k)]

    prefix_ids = draw(args.shared_prefix) if args.shared_prefix else []
    prefix_text = tokenizer.decode(prefix_ids)
    texts: list[str] = []
    if file_prompts is None:
        input_len = args.input_len or DEFAULT_INPUT_LEN
        texts = [tokenizer.decode(prefix_ids + draw(input_len)) for _ in range(n)]
    else:
        texts = [prefix_text + file_prompts[i % len(file_prompts)] for i in range(n)]
    return Workload(
        texts=texts,
        ids=None,
        lengths=[len(tokenizer.encode(t)) for t in texts],
        output_len=args.output_len,
        shared_prefix=args.shared_prefix,
        prefix_text=prefix_text,
        prefix_ids=None,
        source="synthetic" if file_prompts is None else f"file:{args.prompts_file}",
    )


def build_workload(
    engine: Any, kind: str, args: argparse.Namespace, n: int, file_prompts: list[str] | None
) -> Workload:
    """The prompts of the run, from the started engine's tokenizer (see module docstring)."""
    tokenizer = engine.tokenizer
    if kind == "mock":
        return _mock_workload(tokenizer, args, n, file_prompts)
    return _hf_workload(tokenizer, args, n, file_prompts)


def _request(wl: Workload, i: int, label: str, stream: bool, tag: str) -> Any:
    metadata: dict[str, Any] = {"ignore_eos": True}
    if wl.ids is not None:
        metadata["prompt_token_ids"] = list(wl.ids[i])
    return make_request(
        f"{tag}-{i}",
        model=label,
        prompt=wl.texts[i],
        max_tokens=wl.output_len,
        stream=stream,
        metadata=metadata,
        trace_id=f"bench-{tag}",
    )


# ----------------------------------------------------------------------------- run


@dataclass
class RequestResult:
    """What one measured request gave (``metrics`` is the protocol Metrics, if any)."""

    index: int
    ok: bool
    prompt_tokens: int
    output_tokens: list[int]
    finish_reason: str
    latency_s: float
    error: str | None = None
    metrics: Any = None


@dataclass
class _Live:
    """Counters the requests update and the sampler reads (same event loop)."""

    tokens: int = 0
    finished: int = 0
    failed: int = 0
    kv_peak_tokens: int = 0
    kv_peak_bytes: int = 0
    rss_peak: int | None = None
    samples: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _kv_stats(engine: Any) -> Any:
    kv = getattr(engine, "kv_manager", None)
    if kv is None:
        return None
    try:
        return kv.stats()
    except Exception:  # a figure we cannot read is reported as missing, not fatal
        return None


def _rss_reader() -> Any:
    try:
        import psutil
    except ImportError:
        return None
    proc = psutil.Process()
    return lambda: int(proc.memory_info().rss)


async def _sample(engine: Any, live: _Live, progress: Progress, total_requests: int) -> None:
    rss = _rss_reader()
    interval = 0.05
    while True:
        stats = _kv_stats(engine)
        if stats is not None:
            live.kv_peak_tokens = max(live.kv_peak_tokens, int(stats.kv_used_tokens))
            live.kv_peak_bytes = max(live.kv_peak_bytes, int(stats.kv_used_bytes))
        if rss is not None:
            value = rss()
            live.rss_peak = value if live.rss_peak is None else max(live.rss_peak, value)
        live.samples += 1
        if live.done.is_set():
            return  # the caller closes the progress line with the final figures
        failed = f", {live.failed} failed" if live.failed else ""
        progress.update(live.tokens, f"{live.finished}/{total_requests} requests{failed}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.done.wait(), interval)


async def _one(
    engine: Any, request: Any, index: int, prompt_tokens: int, stream: bool, live: _Live
) -> RequestResult:
    from sagellm_protocol import StreamEventDelta, StreamEventEnd

    t0 = time.perf_counter()
    try:
        if stream:
            end: Any = None
            async for event in engine.stream(request):
                if isinstance(event, StreamEventDelta):
                    live.tokens += len(event.chunk_tokens)
                elif isinstance(event, StreamEventEnd):
                    end = event
            if end is None:
                raise RuntimeError("the stream ended without an end event")
            result = end
        else:
            result = await engine.execute(request)
            live.tokens += len(result.output_tokens)
    except Exception as exc:  # an engine fault fails this request, not the benchmark
        live.finished += 1
        live.failed += 1
        latency = time.perf_counter() - t0
        return RequestResult(
            index, False, prompt_tokens, [], "error", latency, error=describe_exception(exc)
        )
    latency = time.perf_counter() - t0
    ok = result.finish_reason != "error"
    live.finished += 1
    live.failed += 0 if ok else 1
    error = None
    if not ok:
        err = result.error
        error = f"{err.code}: {err.message}" if err is not None else "unknown error"
    return RequestResult(
        index,
        ok,
        prompt_tokens,
        list(result.output_tokens),
        str(result.finish_reason),
        latency,
        error=error,
        metrics=result.metrics,
    )


async def _measure(
    engine: Any,
    wl: Workload,
    *,
    label: str,
    concurrency: int,
    stream: bool,
    warmup: int,
    progress: Progress,
) -> tuple[list[RequestResult], float, Any, Any, _Live]:
    """Warm up, run every request (at most ``concurrency`` at once), sample; stops nothing."""
    await _warmup(engine, wl, label, warmup)
    n = len(wl.texts)
    requests = [_request(wl, i, label, stream, "bench") for i in range(n)]
    live = _Live()
    kv_before = _kv_stats(engine)
    sem = asyncio.Semaphore(concurrency)

    async def limited(i: int) -> RequestResult:
        async with sem:
            return await _one(engine, requests[i], i, wl.lengths[i], stream, live)

    sampler = asyncio.create_task(_sample(engine, live, progress, n))
    t0 = time.perf_counter()
    try:
        results = await asyncio.gather(*(limited(i) for i in range(n)))
    finally:
        duration = time.perf_counter() - t0
        live.done.set()
        await sampler
    kv_after = _kv_stats(engine)
    return list(results), duration, kv_before, kv_after, live


async def _warmup(engine: Any, wl: Workload, label: str, count: int) -> None:
    """``count`` unmeasured requests: the shared prefix alone first (if any), then others."""
    from sagellm_protocol import Request

    for k in range(count):
        if k == 0 and wl.shared_prefix:
            metadata: dict[str, Any] = {"ignore_eos": True}
            if wl.prefix_ids is not None:
                metadata["prompt_token_ids"] = list(wl.prefix_ids)
            prompt = wl.prefix_text or "<prefix>"
        else:
            # A prompt shaped like the measured ones but not one of them (no cache hits).
            src = wl.ids[0] if wl.ids is not None else None
            metadata = {"ignore_eos": True}
            if src is not None:
                rotated = src[len(src) // 2 :] + src[: len(src) // 2]
                metadata["prompt_token_ids"] = list(reversed(rotated))
            prompt = " ".join(reversed(wl.texts[0].split(" "))) or wl.texts[0]
        request = Request(
            request_id=f"warmup-{k}",
            trace_id="bench-warmup",
            model=label,
            prompt=prompt,
            max_tokens=min(2, wl.output_len),
            stream=False,
            metadata=metadata,
        )
        response = await engine.execute(request)
        if response.finish_reason == "error":
            raise RuntimeError(f"the warm-up request failed: {request_error_text(response.error)}")


# ----------------------------------------------------------------------------- figures


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
    live: _Live,
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
        "itl": _dist([float(x) for m in metrics for x in m.itl_list]),
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
    if figure in _LATENCIES:
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
                "statistic": stat if c.figure in _LATENCIES else None,
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


# ----------------------------------------------------------------------------- baseline


def _greedy_config(model: Any, tokenizer: Any, new_tokens: int) -> Any:
    """Greedy, exactly ``new_tokens`` tokens (end of sequence does not stop generation)."""
    import copy

    gen = copy.deepcopy(model.generation_config)
    gen.do_sample = False
    gen.temperature = None
    gen.top_p = None
    gen.top_k = None
    gen.max_new_tokens = new_tokens
    gen.min_new_tokens = None
    gen.max_length = None
    gen.eos_token_id = None
    pad = tokenizer.pad_token_id
    gen.pad_token_id = pad if pad is not None else 0
    return gen


def run_hf_baseline(
    engine: Any,
    wl: Workload,
    modes: Sequence[str],
    batch: int,
    engine_outputs: dict[int, list[int]],
    *,
    progress_stream: TextIO | None,
) -> dict[str, Any]:
    """Plain ``model.generate`` on the engine's own model weights and the same prompt ids.

    Args:
        engine: a started-then-stopped HF engine (its ``model`` and ``tokenizer``).
        wl: the workload (``ids`` required).
        modes: ``"sequential"`` and/or ``"static"`` (left-padded batches of ``batch``).
        batch: static batch size.
        engine_outputs: the engine's output ids by request index (completed requests).
        progress_stream: where to report each phase starting (None: silent).

    Returns:
        ``{mode: {"seconds", "output_tokens", "output_tok_s", "req_s", "same_tokens",
        "compared", "batch_size"}}``.
    """
    import torch

    model = engine.model
    tokenizer = engine.tokenizer
    if model is None or wl.ids is None:
        raise RuntimeError("the hf baseline needs a Hugging Face engine with its model loaded")
    device = next(model.parameters()).device
    gen = _greedy_config(model, tokenizer, wl.output_len)
    pad = int(gen.pad_token_id)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        warm = _greedy_config(model, tokenizer, 2)
        x = torch.tensor([wl.ids[0][:8]], device=device)
        model.generate(x, attention_mask=torch.ones_like(x), generation_config=warm)
        for mode in modes:
            if progress_stream is not None:
                progress_stream.write(f"baseline: transformers generate, {mode} ...\n")
                progress_stream.flush()
            outputs: list[list[int]] = []
            t0 = time.perf_counter()
            if mode == "sequential":
                for ids in wl.ids:
                    x = torch.tensor([ids], device=device)
                    y = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gen)
                    outputs.append(y[0, len(ids) :].tolist())
            else:
                for start in range(0, len(wl.ids), batch):
                    chunk = wl.ids[start : start + batch]
                    width = max(len(i) for i in chunk)
                    x = torch.tensor([[pad] * (width - len(i)) + i for i in chunk], device=device)
                    mask = torch.tensor(
                        [[0] * (width - len(i)) + [1] * len(i) for i in chunk], device=device
                    )
                    y = model.generate(x, attention_mask=mask, generation_config=gen)
                    outputs.extend(row[width:].tolist() for row in y)
            seconds = time.perf_counter() - t0
            n_out = sum(len(o) for o in outputs)
            compared = [i for i in engine_outputs if i < len(outputs)]
            out[mode] = {
                "seconds": seconds,
                "output_tokens": n_out,
                "output_tok_s": n_out / seconds if seconds > 0 else None,
                "req_s": len(outputs) / seconds if seconds > 0 else None,
                "same_tokens": sum(1 for i in compared if engine_outputs[i] == outputs[i]),
                "compared": len(compared),
                "batch_size": 1 if mode == "sequential" else batch,
            }
    return out


# ----------------------------------------------------------------------------- report


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on POSIX
        return None


def _machine(load_at_start: list[float] | None) -> dict[str, Any]:
    """Where the figures were measured (a loaded machine makes them meaningless)."""
    torch_mod = sys.modules.get("torch")
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": getattr(torch_mod, "__version__", None),
        "torch_threads": torch_mod.get_num_threads() if torch_mod is not None else None,
        "load_average_start": load_at_start,
        "load_average_end": _load_average(),
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


# ----------------------------------------------------------------------------- command


def _validate(args: argparse.Namespace, kind: str) -> tuple[list[str] | None, int, int]:
    """Check argument combinations; returns (file prompts, requests, concurrency)."""
    if args.prompts_file is not None and args.input_len is not None:
        raise UsageError("give --input-len or --prompts-file, not both")
    if args.baseline != "none" and kind not in ("cpu", "cuda"):
        raise UsageError(
            f"--baseline {args.baseline} runs transformers generate, so it needs --engine cpu "
            f"or cuda (the engine is {kind})"
        )
    file_prompts = None if args.prompts_file is None else read_prompts_file(args.prompts_file)
    n = args.requests or (len(file_prompts) if file_prompts is not None else DEFAULT_REQUESTS)
    concurrency = min(args.concurrency or n, n)
    return file_prompts, n, concurrency


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Execute ``bench`` (see the module docstring for output and exit status)."""
    kind, reason = resolve_engine_kind(args.engine)
    file_prompts, n, concurrency = _validate(args, kind)
    json_to_stdout = args.json == "-"
    text = err if json_to_stdout else out
    json_path = None if args.json in (None, "-") else Path(args.json)
    if json_path is not None and json_path.parent and not json_path.parent.is_dir():
        raise UsageError(
            f"--json {args.json!r}: directory {str(json_path.parent)!r} does not exist"
        )
    model_path, label = resolve_model(kind, args.model, err=err)
    max_batch = args.max_batch_size or concurrency
    settings = engine_settings(
        args,
        kind=kind,
        model_path=model_path,
        model_label=label,
        engine_id=f"bench-{kind}",
        max_batch_size=max_batch,
        max_new_tokens=args.output_len,
    )
    engine = create_engine(settings)
    started_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    load_at_start = _load_average()
    report = asyncio.run(_bench(engine, args, kind, label, file_prompts, n, concurrency, err))
    wl_info = report.pop("_workload")
    wl: Workload = wl_info["workload"]
    modes = {"hf": ["sequential", "static"], "hf-sequential": ["sequential"]}.get(
        args.baseline, ["static"] if args.baseline == "hf-static" else []
    )
    report["baselines"] = {}
    report["ratios"] = {}
    if modes:
        engine_outputs = wl_info["outputs"]
        report["baselines"] = run_hf_baseline(
            engine,
            wl,
            modes,
            concurrency,
            engine_outputs,
            progress_stream=None if args.no_progress else err,
        )
        engine_tps = report["results"]["throughput"]["output_tok_s"]
        for mode, b in report["baselines"].items():
            base_tps = b["output_tok_s"]
            report["ratios"][f"engine_vs_{mode}"] = (
                engine_tps / base_tps if engine_tps and base_tps else None
            )
    report["contract"] = evaluate_contract(
        report["results"],
        stat=args.contract_stat,
        shared_prefix=args.shared_prefix,
        output_len=args.output_len,
    )
    report["passed"] = report["contract"]["passed"]
    report = {
        "schema": JSON_SCHEMA,
        "started_at": started_at,
        **report,
        "config": {
            "engine": kind,
            "engine_requested": args.engine,
            "selection_reason": reason,
            "model": label,
            "model_path": model_path,
            "requests": n,
            "concurrency": concurrency,
            "input_len": None
            if file_prompts is not None
            else (args.input_len or DEFAULT_INPUT_LEN),
            "output_len": args.output_len,
            "shared_prefix": args.shared_prefix,
            "prompts_file": None if args.prompts_file is None else str(args.prompts_file),
            "seed": args.seed,
            "warmup": args.warmup,
            "stream": args.stream,
            "max_batch_size": max_batch,
            "dtype": args.dtype,
            "threads": args.threads,
            "prefix_caching": args.prefix_caching,
            "baseline": args.baseline,
            "contract_stat": args.contract_stat,
            "mock_ttft_ms": args.mock_ttft_ms if kind == "mock" else None,
            "mock_latency_ms": args.mock_latency_ms if kind == "mock" else None,
        },
        "machine": _machine(load_at_start),
    }
    from sagellm_backend._version import __version__

    report["version"] = __version__
    text.write("\n" + render_report(report) + "\n")
    text.flush()
    payload = json.dumps(report, indent=2, default=str, allow_nan=False)
    if json_to_stdout:
        out.write(payload + "\n")
        out.flush()
    elif json_path is not None:
        json_path.write_text(payload + "\n", encoding="utf-8")
        text.write(f"\nwrote {json_path}\n")
    results = report["results"]
    if results["completed"] == 0:
        first = results["errors"][0] if results["errors"] else "no request completed"
        err.write(f"sagellm-backend bench: error: every request failed ({first})\n")
        return 1
    if args.strict and report["passed"] is False:
        failed = [c["id"] for c in report["contract"]["checks"] if c["passed"] is False]
        err.write(f"sagellm-backend bench: contract failed: {', '.join(failed)}\n")
        return 1
    return 0


async def _bench(
    engine: Any,
    args: argparse.Namespace,
    kind: str,
    label: str,
    file_prompts: list[str] | None,
    n: int,
    concurrency: int,
    err: TextIO,
) -> dict[str, Any]:
    """Start the engine, build the workload, measure, stop; the report without baselines."""
    t0 = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - t0
    try:
        wl = build_workload(engine, kind, args, n, file_prompts)
        context = getattr(engine, "max_context", 0)
        longest = max(wl.lengths)
        if isinstance(context, int) and context > 0 and longest + wl.output_len > context:
            raise UsageError(
                f"prompts of up to {longest} tokens plus --output-len {wl.output_len} exceed "
                f"the model's context of {context} tokens; lower --input-len, --shared-prefix "
                "or --output-len"
            )
        description = engine_description(engine)
        prefix = f" ({wl.shared_prefix} of them a shared prefix)" if wl.shared_prefix else ""
        lengths = (
            f"{wl.lengths[0]}"
            if min(wl.lengths) == max(wl.lengths)
            else f"{min(wl.lengths)}-{max(wl.lengths)}"
        )
        if not args.no_progress:
            err.write(
                f"bench: {description}, model {label}, started in {start_s:.2f} s\n"
                f"bench: {n} requests, concurrency {concurrency}, prompts {lengths} tokens"
                f"{prefix}, {wl.output_len} output tokens each\n"
            )
            err.flush()
        progress = Progress(
            n * wl.output_len, "bench tokens", stream=err, enabled=not args.no_progress
        )
        results, duration, kv_before, kv_after, live = await _measure(
            engine,
            wl,
            label=label,
            concurrency=concurrency,
            stream=args.stream,
            warmup=args.warmup,
            progress=progress,
        )
        progress.done = live.tokens
        progress.close(f"{live.finished}/{n} requests, {duration:.2f}s")
        provider = getattr(engine, "provider", None)
        memory: dict[str, int] | None = None
        if provider is not None:
            with contextlib.suppress(Exception):
                memory = {str(k): int(v) for k, v in provider.memory_stats().items()}
        info = json.loads(json.dumps(engine.get_info(), default=str))
    finally:
        await engine.stop()
    summary = summarize(results, duration, wl, kv_before, kv_after, live, memory)
    return {
        "engine": {"kind": kind, "description": description, "start_s": start_s, "info": info},
        "workload": {
            "source": wl.source,
            "requests": n,
            "prompt_tokens": {
                "total": sum(wl.lengths),
                "min": min(wl.lengths),
                "max": max(wl.lengths),
                "mean": statistics.fmean(wl.lengths),
            },
            "shared_prefix": wl.shared_prefix,
            "output_len": wl.output_len,
            "ignore_eos": True,
            "sampling": "greedy",
        },
        "results": summary,
        "_workload": {
            "workload": wl,
            "outputs": {r.index: r.output_tokens for r in results if r.ok},
        },
    }


register_command(
    Command(
        name="bench",
        help="load-test an engine: throughput, latency percentiles, KV, contract verdicts",
        add_arguments=add_arguments,
        run=guarded("bench", run),
        description=(
            "Send --requests requests at --concurrency to the engine and report throughput, "
            "TTFT/TBT/TPOT/ITL percentiles, memory, KV and prefix-cache figures and the error "
            "rate; --baseline hf measures plain transformers generate on the same requests in "
            "the same run; the sageLLM Year-1/Year-2 contract is checked; --json FILE writes "
            "everything for CI."
        ),
    )
)
