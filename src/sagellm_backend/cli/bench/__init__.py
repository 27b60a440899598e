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
import datetime as _dt
import json
import statistics
import time
from pathlib import Path
from typing import Any, TextIO

from sagellm_backend.cli._common import (
    UsageError,
    create_engine,
    engine_description,
    engine_settings,
    register_guarded,
    resolve_engine_kind,
    resolve_model,
)
from sagellm_backend.cli._options import add_engine_arguments, non_negative_int, positive_int
from sagellm_backend.cli._table import Progress
from sagellm_backend.cli.bench.loadgen import measure, run_hf_baseline
from sagellm_backend.cli.bench.report import load_average, machine_info, render_report
from sagellm_backend.cli.bench.stats import CONTRACT, ContractCheck, evaluate_contract, summarize
from sagellm_backend.cli.bench.workload import (
    DEFAULT_INPUT_LEN,
    DEFAULT_OUTPUT_LEN,
    DEFAULT_REQUESTS,
    Workload,
    build_workload,
    read_prompts_file,
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
    load_at_start = load_average()
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
        "machine": machine_info(load_at_start),
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
        # the HF engines' context; the mock's max_model_len
        context = getattr(engine, "max_context", 0) or engine.get_info().get("max_model_len", 0)
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
        results, duration, kv_before, kv_after, live = await measure(
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


register_guarded(
    "bench",
    add_arguments,
    run,
    help="load-test an engine: throughput, latency percentiles, KV, contract verdicts",
    description=(
        "Send --requests requests at --concurrency to the engine and report throughput, "
        "TTFT/TBT/TPOT/ITL percentiles, memory, KV and prefix-cache figures and the error "
        "rate; --baseline hf measures plain transformers generate on the same requests in "
        "the same run; the sageLLM Year-1/Year-2 contract is checked; --json FILE writes "
        "everything for CI."
    ),
)
