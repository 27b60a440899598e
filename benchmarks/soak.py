"""Soak: many requests with cancellations and injected faults -- nothing lost, nothing leaked.

Two workloads, each in its own event loop (``asyncio.run``) so that thread checks see the
loop's executor threads shut down:

1. **mock**: ``--mock-requests`` requests (default 10,000) through one MockEngine at zero
   simulated latency on a MockBackendProvider, ``--concurrency`` workers (default 64) over
   ``max_batch_size=32`` and a 512-page KV pool (so requests queue for KV), prompts of 1 to
   200 words and 1 to 64 output tokens, half ``execute`` and half ``stream``; 10% are
   cancelled (an ``execute`` or ``stream`` task cancelled after a random number of loop
   iterations -- queued, prefilling or decoding --, or a stream consumer that stops after
   k tokens) and 5% fail by injection (``simulate_failure_rate=0.05``).
2. **hf**: ``--hf-requests`` requests (default 500) through a CPUEngine on the offline tiny
   Llama (``ensure_tiny_model("tiny-llama")``) at ``--hf-concurrency`` 16, prompts of 1 to
   120 words, 1 to 32 output tokens, greedy with EOS ignored, 10% cancelled (task cancelled
   after 0-40 ms, or stream closed after k tokens).

3. **engines**: ``--engines`` engines (default 50) created, served with (a few requests
   each) and stopped one after another on one provider -- CPUEngines on the tiny Llama
   (``--engines-kind cpu``, the default when torch is installed) or MockEngines (``mock``).
   Checks: RSS growth over the second half at most 5%, engine threads back to baseline,
   the provider's KV allocation back to zero.

Each request workload first runs a warm-up (10% of the requests, at most 500, at least 16) on the
same engine, then measures the steady-state part. Checks (the exit status is 1 if any
fails):

* every request gets exactly one terminal result (a Response, one stream end event, or its
  cancellation), and the engine accounted for every request it was given;
* the KV pool is empty afterwards (no sequence, no page in use; ``check_invariants``);
* asyncio tasks and Python threads are back to their baseline after ``stop()``;
* RSS growth over the steady-state part is at most 5% (psutil, after ``gc.collect()``).

Figures printed: requests, outcomes, errors by kind, cancellations by kind, duration,
requests/s, RSS before/after and growth, leaked tasks/threads.

Usage::

    python benchmarks/soak.py                         # full size: 10,000 mock + 500 hf
    python benchmarks/soak.py --quick                 # CI size: 2,000 mock + 64 hf
    python benchmarks/soak.py --mock-requests 10000 --hf-requests 0 --json out.json
    python benchmarks/soak.py --json                  # JSON on stdout
    python benchmarks/soak.py --hf-device cuda        # the hf workload on HFCudaEngine
    python benchmarks/soak.py --mock-requests 0 --hf-requests 0 --engines 50
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import os
import platform
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagellm_protocol import Request

# _workload sits next to this file: on sys.path when run as a script, added when loaded by path.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import WORDS

MAX_RSS_GROWTH = 0.05
#: Threads some libraries start once per process (not engine threads): tqdm's monitor,
#: started by transformers' weight-loading progress bar.
GLOBAL_THREAD_PREFIXES = ("tqdm_monitor",)


def _prompt(rng: random.Random, max_words: int) -> str:
    n = rng.choice((1, 2, 5, 10, 20, 40, 80, max_words))
    n = rng.randint(1, n)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@dataclass
class Plan:
    """One request of the workload (decided before the measured part starts)."""

    prompt: str
    max_tokens: int
    action: str  # execute | stream | cancel_execute | cancel_stream | abandon_stream
    cancel_after: float  # loop iterations (mock) or seconds (hf) before cancelling
    stop_after: int  # tokens read before a stream consumer gives up (abandon_stream)


def make_plans(
    n: int, *, seed: int, cancel_fraction: float, max_words: int, max_tokens: int, hf: bool
) -> list[Plan]:
    """The deterministic request plan of a workload."""
    rng = random.Random(seed)
    plans = []
    for _ in range(n):
        prompt = _prompt(rng, max_words)
        mt = rng.randint(1, max_tokens)
        if rng.random() < cancel_fraction:
            action = rng.choice(("cancel_execute", "cancel_stream", "abandon_stream"))
        else:
            action = rng.choice(("execute", "stream"))
        after = rng.uniform(0.0, 0.04) if hf else float(rng.randint(0, 60))
        plans.append(Plan(prompt, mt, action, after, rng.randint(1, mt)))
    return plans


@dataclass
class Tally:
    """What the consumers saw (preallocated before the measured part)."""

    terminal: list[int]
    submitted: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    cancellations: collections.Counter[str] = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)
    tokens: int = 0

    def result(self, i: int, finish_reason: str, error: Any, ntokens: int) -> None:
        self.terminal[i] += 1
        self.outcomes[finish_reason] += 1
        self.tokens += ntokens
        if finish_reason == "error":
            code = getattr(getattr(error, "code", None), "name", "UNKNOWN")
            message = str(getattr(error, "message", ""))
            kind = "injected" if "injected" in message else message.split(":")[0][:40]
            self.errors[f"{code} ({kind})"] += 1

    def cancelled(self, i: int, how: str) -> None:
        self.terminal[i] += 1
        self.outcomes["cancelled"] += 1
        self.cancellations[how] += 1


def _request(i: int, plan: Plan, prefix: str, hf: bool) -> Request:
    return Request(
        request_id=f"{prefix}-{i}",
        trace_id=f"soak-{prefix}-{i}",
        model="soak",
        prompt=plan.prompt,
        max_tokens=plan.max_tokens,
        stream=plan.action.endswith("stream"),
        metadata={"ignore_eos": True} if hf else None,
    )


async def _one(engine: Any, i: int, plan: Plan, tally: Tally, prefix: str, hf: bool) -> None:
    """Run one planned request and record its single terminal result."""
    request = _request(i, plan, prefix, hf)

    async def do_execute() -> None:
        tally.submitted += 1  # execute() queues the request before its first suspension
        resp = await engine.execute(request)
        tally.result(i, resp.finish_reason, resp.error, len(resp.output_tokens))
        if resp.finish_reason == "length" and len(resp.output_tokens) != plan.max_tokens:
            tally.problems.append(f"{request.request_id}: {len(resp.output_tokens)} tokens")

    async def do_stream(stop_after: int | None) -> None:
        ends = 0
        got = 0
        tally.submitted += 1  # the first __anext__ queues it before any suspension
        gen = engine.stream(request)
        async with contextlib.aclosing(gen) as events:
            async for ev in events:
                if ev.event == "delta":
                    got += len(ev.chunk_tokens)
                    if stop_after is not None and got >= stop_after:
                        tally.cancelled(i, "stream consumer stopped after k tokens")
                        return
                elif ev.event == "end":
                    ends += 1
                    tally.result(i, ev.finish_reason, ev.error, got)
        if ends != 1:
            tally.problems.append(f"{request.request_id}: {ends} end events")

    action = plan.action
    if action == "execute":
        await do_execute()
    elif action == "stream":
        await do_stream(None)
    elif action == "abandon_stream":
        await do_stream(plan.stop_after)
    else:
        task = asyncio.ensure_future(
            do_execute() if action == "cancel_execute" else do_stream(None)
        )
        if hf:
            await asyncio.sleep(plan.cancel_after)
        else:
            for _ in range(int(plan.cancel_after)):
                await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if tally.terminal[i] == 0:  # else the consumer already had its end event
                tally.cancelled(i, f"{action.split('_')[1]} task cancelled")


async def _drive(
    engine: Any, plans: list[Plan], tally: Tally, concurrency: int, prefix: str, hf: bool
) -> None:
    counter = iter(range(len(plans)))

    async def worker() -> None:
        for i in counter:
            await _one(engine, i, plans[i], tally, prefix, hf)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _until_idle(engine: Any, idle: Callable[[Any], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    await asyncio.sleep(0.01)
    while not idle(engine) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.01)


def _rss() -> int:
    import psutil

    gc.collect()
    return int(psutil.Process().memory_info().rss)


def _live_threads(baseline: set[int | None]) -> list[str]:
    return [
        t.name
        for t in threading.enumerate()
        if t.ident not in baseline
        and t.is_alive()
        and not t.name.startswith(GLOBAL_THREAD_PREFIXES)
    ]


async def _soak(
    make_engine: Callable[[], Awaitable[Any]],
    kv_of: Callable[[Any], Any],
    accounted: Callable[[Any], int],
    idle: Callable[[Any], bool],
    plans: list[Plan],
    warmup: list[Plan],
    *,
    concurrency: int,
    hf: bool,
) -> dict[str, Any]:
    base_tasks = {t for t in asyncio.all_tasks() if not t.done()}
    engine = await make_engine()
    warm = Tally(terminal=[0] * len(warmup))
    await _drive(engine, warmup, warm, concurrency, "warm", hf)
    await _until_idle(engine, idle)
    tally = Tally(terminal=[0] * len(plans))
    accounted_before = accounted(engine)
    rss_before = _rss()
    t0 = time.perf_counter()
    await _drive(engine, plans, tally, concurrency, "soak", hf)
    duration = time.perf_counter() - t0
    await _until_idle(engine, idle)  # the engine applies the last cancellations
    rss_after = _rss()
    kv = kv_of(engine)
    stats = kv.stats()
    kv.pool.check_invariants()
    engine_accounted = accounted(engine) - accounted_before
    kv_figures = {"seqs": stats.num_seqs, "pages_used": kv.pool.num_used}
    await engine.stop()
    await asyncio.sleep(0)
    leaked_tasks = [
        t.get_name() for t in asyncio.all_tasks() if not t.done() and t not in base_tasks
    ]
    lost = sum(1 for c in tally.terminal if c == 0)
    duplicated = sum(1 for c in tally.terminal if c > 1)
    growth = (rss_after - rss_before) / rss_before
    return {
        "requests": len(plans),
        "warmup_requests": len(warmup),
        "concurrency": concurrency,
        "outcomes": dict(tally.outcomes),
        "errors_by_kind": dict(tally.errors),
        "cancellations": dict(tally.cancellations),
        "cancelled_total": sum(tally.cancellations.values()),
        "planned_cancellations": sum(
            1 for p in plans if "cancel" in p.action or "abandon" in p.action
        ),
        "output_tokens": tally.tokens,
        "duration_s": round(duration, 3),
        "req_per_s": round(len(plans) / duration, 1),
        "lost": lost,
        "duplicated": duplicated,
        "problems": tally.problems[:10],
        "submitted": tally.submitted,
        "engine_accounted": engine_accounted,
        "kv_after": kv_figures,
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
        "rss_growth_pct": round(100 * growth, 2),
        "leaked_tasks": leaked_tasks,
    }


def _finish_checks(result: dict[str, Any], threads_before: set[int | None]) -> dict[str, Any]:
    deadline = time.monotonic() + 3.0
    while _live_threads(threads_before) and time.monotonic() < deadline:
        time.sleep(0.01)
    result["leaked_threads"] = _live_threads(threads_before)
    n = result["requests"]
    checks = {
        "one terminal result per request": result["lost"] == 0 and result["duplicated"] == 0,
        "no wrong token counts or stream shapes": not result["problems"],
        "engine accounted for every request it was given": result["engine_accounted"]
        == result["submitted"]
        and result["submitted"] >= 0.9 * n,
        "KV pool empty": result["kv_after"] == {"seqs": 0, "pages_used": 0},
        "no task left": not result["leaked_tasks"],
        "no thread left": not result["leaked_threads"],
        f"RSS growth <= {100 * MAX_RSS_GROWTH:.0f}%": result["rss_growth_pct"]
        <= 100 * MAX_RSS_GROWTH,
    }
    result["checks"] = checks
    result["ok"] = all(checks.values())
    return result


def _warmup_size(n: int) -> int:
    return max(16, min(500, n // 10))


def _workload_plans(
    requests: int, *, seed: int, cancel_fraction: float, max_words: int, max_tokens: int, hf: bool
) -> tuple[list[Plan], list[Plan]]:
    """(measured plans, warm-up plans) of a workload; the warm-up's seed is ``seed + 1``."""
    plans = make_plans(
        requests,
        seed=seed,
        cancel_fraction=cancel_fraction,
        max_words=max_words,
        max_tokens=max_tokens,
        hf=hf,
    )
    warmup = make_plans(
        _warmup_size(requests),
        seed=seed + 1,
        cancel_fraction=cancel_fraction,
        max_words=max_words,
        max_tokens=max_tokens,
        hf=hf,
    )
    return plans, warmup


def _run_soak(
    make_engine: Callable[[], Awaitable[Any]],
    accounted: Callable[[Any], int],
    idle: Callable[[Any], bool],
    plans: list[Plan],
    warmup: list[Plan],
    *,
    concurrency: int,
    hf: bool,
) -> tuple[dict[str, Any], set[int | None]]:
    """Run :func:`_soak` in a fresh event loop: (its figures, the threads alive before it)."""
    threads = {t.ident for t in threading.enumerate()}
    result = asyncio.run(
        _soak(
            make_engine,
            lambda e: e.kv_manager,
            accounted,
            idle,
            plans,
            warmup,
            concurrency=concurrency,
            hf=hf,
        )
    )
    return result, threads


def run_mock_soak(
    requests: int = 2000,
    *,
    seed: int = 11,
    concurrency: int = 64,
    cancel_fraction: float = 0.10,
    fault_rate: float = 0.05,
) -> dict[str, Any]:
    """The mock workload (see the module docstring); returns its figures and checks."""
    from sagellm_backend.engine.mock import MockEngine, MockEngineConfig
    from sagellm_backend.providers.mock import MockBackendProvider

    plans, warmup = _workload_plans(
        requests, seed=seed, cancel_fraction=cancel_fraction, max_words=200, max_tokens=64, hf=False
    )
    provider = MockBackendProvider()

    async def make_engine() -> Any:
        engine = MockEngine(
            MockEngineConfig(
                "soak-mock",
                0.0,
                0.0,
                fault_rate,
                max_batch_size=32,
                kv_num_pages=512,
                seed=seed,
                provider=provider,
            )
        )
        await engine.start()
        return engine

    def accounted(engine: Any) -> int:
        info = engine.get_info()
        return int(info["completed"] + info["failed"] + info["cancelled"])

    def idle(engine: Any) -> bool:
        info = engine.get_info()
        return bool(info["waiting"] == 0 and info["running"] == 0)

    result, threads = _run_soak(
        make_engine, accounted, idle, plans, warmup, concurrency=concurrency, hf=False
    )
    result["workload"] = "mock"
    result["fault_rate"] = fault_rate
    result["provider_kv_used_bytes_after_stop"] = provider.memory_stats()["kv_used_bytes"]
    result = _finish_checks(result, threads)
    result["checks"]["provider KV released"] = (
        result["provider_kv_used_bytes_after_stop"] == 0
        and provider.memory_stats()["num_kv_managers"] == 0
    )
    result["ok"] = all(result["checks"].values())
    return result


def _hf_engine(path: str, device: str) -> Any:
    common: dict[str, Any] = {
        "engine_id": "soak-hf",
        "model_path": path,
        "max_batch_size": 16,
        "max_new_tokens": 32,
        "kv_cache_memory_bytes": 16 << 20,
    }
    if device == "cpu":
        from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig

        return CPUEngine(CPUEngineConfig(**common))
    from sagellm_backend.engine.hf_cuda import HFCudaEngine, HFCudaEngineConfig

    dev = "cuda:0" if device == "cuda" else device
    return HFCudaEngine(
        HFCudaEngineConfig(
            **common,
            device=dev,
            dtype="float32",
            device_map=dev,
            load_in_8bit=False,
            load_in_4bit=False,
            trust_remote_code=False,
        )
    )


def run_hf_soak(
    requests: int = 64,
    *,
    seed: int = 12,
    concurrency: int = 16,
    cancel_fraction: float = 0.10,
    model: str = "tiny-llama",
    device: str = "cpu",
) -> dict[str, Any]:
    """The tiny-HF-model workload (see the module docstring); returns figures and checks.

    ``device="cpu"`` runs CPUEngine; ``"cuda"``/``"cuda:N"`` runs HFCudaEngine (fp32, the
    whole model on that device) with the same workload.
    """
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    path = str(ensure_tiny_model(model))
    plans, warmup = _workload_plans(
        requests, seed=seed, cancel_fraction=cancel_fraction, max_words=120, max_tokens=32, hf=True
    )
    engine = _hf_engine(path, device)

    async def make_engine() -> Any:
        await engine.start()
        return engine

    def accounted(e: Any) -> int:
        return int(e.get_info()["scheduler"]["finished"])

    def idle(e: Any) -> bool:
        sched = e.get_info()["scheduler"]
        return bool(sched["waiting"] == 0 and sched["running"] == 0)

    result, threads = _run_soak(
        make_engine, accounted, idle, plans, warmup, concurrency=concurrency, hf=True
    )
    result["workload"] = f"hf ({model}, {type(engine).__name__} on {device})"
    return _finish_checks(result, threads)


def _provider_kv_bytes(provider: Any) -> int:
    """Bytes of KV the provider has handed out to managers (pools charged to its budget)."""
    stats = provider.memory_stats()
    if "kv_reserved_bytes" in stats:
        return int(stats["kv_reserved_bytes"])
    return int(stats.get("kv_pool_bytes", 0))


def run_engines_soak(
    engines: int = 50, *, kind: str = "cpu", requests_per_engine: int = 4
) -> dict[str, Any]:
    """Create, serve with and stop ``engines`` engines in turn on one provider.

    RSS is compared between the engine at the half-way mark and the last one (the first
    engines pay one-time costs: model load, imports, allocator growth).
    """
    if kind == "cpu":
        from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig
        from sagellm_backend.providers.cpu import CPUBackendProvider
        from sagellm_backend.testing.tiny_models import ensure_tiny_model

        path = str(ensure_tiny_model("tiny-llama"))
        provider: Any = CPUBackendProvider(kv_memory_bytes=64 << 20)

        def make(i: int) -> Any:
            return CPUEngine(
                CPUEngineConfig(
                    engine_id=f"soak-{i}",
                    model_path=path,
                    max_batch_size=4,
                    max_new_tokens=16,
                    provider=provider,
                )
            )
    else:
        from sagellm_backend.engine.mock import MockEngine, MockEngineConfig
        from sagellm_backend.providers.mock import MockBackendProvider

        provider = MockBackendProvider()

        def make(i: int) -> Any:
            return MockEngine(MockEngineConfig(f"soak-{i}", 0.0, 0.0, provider=provider))

    threads_before = {t.ident for t in threading.enumerate()}
    kv_before = _provider_kv_bytes(provider)
    rss: list[int] = []
    failures: list[str] = []

    async def one(i: int) -> None:
        engine = make(i)
        await engine.start()
        reqs = [
            Request(
                request_id=f"e{i}-{j}",
                trace_id="soak",
                model="m",
                prompt=f"engine {i} request {j} says hello",
                max_tokens=8,
                stream=False,
                metadata={"ignore_eos": True},
            )
            for j in range(requests_per_engine)
        ]
        for resp in await asyncio.gather(*(engine.execute(r) for r in reqs)):
            if resp.finish_reason != "length":
                failures.append(f"engine {i}: {resp.finish_reason} {resp.error}")
        await engine.stop()

    async def body() -> None:
        for i in range(engines):
            await one(i)
            gc.collect()
            rss.append(_rss())

    t0 = time.perf_counter()
    asyncio.run(body())
    duration = time.perf_counter() - t0
    gc.collect()
    mid = rss[len(rss) // 2]
    growth = (rss[-1] - mid) / mid
    leaked = _live_threads(threads_before)
    kv_after = _provider_kv_bytes(provider)
    checks = {
        "every request served": not failures,
        f"RSS growth <= {100 * MAX_RSS_GROWTH:.0f}% (second half)": growth <= MAX_RSS_GROWTH,
        "threads back to baseline": not leaked,
        "provider KV allocation back to zero": kv_after == 0,
    }
    return {
        "workload": f"engines-{kind}",
        "engines": engines,
        "requests_per_engine": requests_per_engine,
        "duration_s": round(duration, 3),
        "rss_first_mb": round(rss[0] / 2**20, 1),
        "rss_mid_mb": round(mid / 2**20, 1),
        "rss_last_mb": round(rss[-1] / 2**20, 1),
        "rss_growth_pct": round(100 * growth, 2),
        "provider_kv_bytes_before": kv_before,
        "provider_kv_bytes_after": kv_after,
        "leaked_threads": leaked,
        "failures": failures[:5],
        "checks": checks,
        "ok": all(checks.values()),
    }


def _print_engines(result: dict[str, Any]) -> None:
    print(f"\n== {result['workload']}: {result['engines']} engines created, served, stopped")
    print(
        f"  duration {result['duration_s']} s; RSS first {result['rss_first_mb']} MB, "
        f"mid {result['rss_mid_mb']} MB, last {result['rss_last_mb']} MB "
        f"({result['rss_growth_pct']:+.2f}% over the second half)"
    )
    print(
        f"  provider KV bytes before {result['provider_kv_bytes_before']}, after "
        f"{result['provider_kv_bytes_after']}; leaked threads {result['leaked_threads']}"
    )
    for name, ok in result["checks"].items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")


def _print(result: dict[str, Any]) -> None:
    print(
        f"\n== {result['workload']}: {result['requests']} requests "
        f"(+{result['warmup_requests']} warm-up), concurrency {result['concurrency']}"
    )
    print(
        f"  duration {result['duration_s']} s, {result['req_per_s']} req/s, "
        f"{result['output_tokens']} output tokens"
    )
    print(f"  outcomes: {result['outcomes']}")
    print(f"  errors by kind: {result['errors_by_kind']}")
    print(f"  cancellations ({result['cancelled_total']}): {result['cancellations']}")
    print(
        f"  lost {result['lost']}, duplicated {result['duplicated']}, submitted "
        f"{result['submitted']}, engine accounted {result['engine_accounted']}"
    )
    print(f"  KV after: {result['kv_after']}")
    print(
        f"  RSS {result['rss_before_mb']} MB -> {result['rss_after_mb']} MB "
        f"({result['rss_growth_pct']:+.2f}%)"
    )
    print(f"  leaked tasks {result['leaked_tasks']}, leaked threads {result['leaked_threads']}")
    for name, ok in result["checks"].items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mock-requests", type=int, default=None, help="default 10000")
    parser.add_argument("--hf-requests", type=int, default=None, help="default 500")
    parser.add_argument("--quick", action="store_true", help="CI size: 2000 mock, 64 hf")
    parser.add_argument("--concurrency", type=int, default=64, help="mock workers")
    parser.add_argument("--hf-concurrency", type=int, default=16)
    parser.add_argument(
        "--hf-device", default="cpu", help="cpu (CPUEngine) or cuda[:N] (HFCudaEngine)"
    )
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--engines", type=int, default=None, help="engines to create/serve/stop (default 50)"
    )
    parser.add_argument(
        "--engines-kind", choices=("cpu", "mock"), default=None, help="default cpu if torch"
    )
    parser.add_argument(
        "--json", nargs="?", const="-", default=None, metavar="FILE", help="write JSON"
    )
    args = parser.parse_args(argv)
    mock_n = (
        args.mock_requests if args.mock_requests is not None else (2000 if args.quick else 10_000)
    )
    hf_n = args.hf_requests if args.hf_requests is not None else (64 if args.quick else 500)
    quiet = args.json == "-"
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "results": [],
    }
    if mock_n > 0:
        result = run_mock_soak(mock_n, seed=args.seed, concurrency=args.concurrency)
        out["results"].append(result)
        if not quiet:
            _print(result)
    if hf_n > 0:
        result = run_hf_soak(
            hf_n, seed=args.seed + 1, concurrency=args.hf_concurrency, device=args.hf_device
        )
        out["results"].append(result)
        if not quiet:
            _print(result)
    engines_n = args.engines if args.engines is not None else (10 if args.quick else 50)
    if engines_n > 0:
        import importlib.util

        kind = args.engines_kind or (
            "cpu" if importlib.util.find_spec("transformers") is not None else "mock"
        )
        result = run_engines_soak(engines_n, kind=kind)
        out["results"].append(result)
        if not quiet:
            _print_engines(result)
    out["ok"] = all(r["ok"] for r in out["results"])
    if args.json is not None:
        text = json.dumps(out, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as fh:
                fh.write(text)
    if not quiet:
        print(f"\n{'ALL CHECKS PASSED' if out['ok'] else 'SOME CHECKS FAILED'}")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
