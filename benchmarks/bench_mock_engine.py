"""MockEngine at zero simulated latency: throughput and 1,000 concurrent streams.

Measures, in one process and one run:

1. **baseline**: a minimal asyncio request loop (queue -> batch step -> resolve a future with
   a prebuilt Response) — the floor any asyncio engine pays per request;
   **protocol floor**: the same loop doing the per-request work the API itself asks of any
   mock engine, whatever its scheduler: tokenize the prompt, stamp each token, build the
   output text of ``max_tokens`` word tokens, the protocol ``Metrics`` and ``Response``
   (both validated by the protocol's pydantic models). No KV, no scheduler, no sampling:
   what is left between this and the engine is the engine's own cost;
2. **execute throughput**: requests/s through one MockEngine (KV through the mock
   provider's KV manager, full Metrics per request), reported with its ratio to 1.;
3. **streams**: N concurrent ``stream()`` consumers; every stream must have exactly one
   start and one end, deltas concatenating to the end's text, exactly ``max_tokens``
   tokens, and the KV pool must be empty afterwards ("nothing lost").

To measure another MockEngine with the same workload in the same session (e.g. the
published 0.1.1.2, which keeps no KV accounting), put it first on ``PYTHONPATH`` and pass
``--streams 0``; the KV checks apply only where ``get_info()`` reports ``kv``.

Usage::

    python benchmarks/bench_mock_engine.py            # full size
    python benchmarks/bench_mock_engine.py --quick    # CI smoke size
    python benchmarks/bench_mock_engine.py --json     # machine-readable
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sagellm_protocol import Metrics, Request, Response

from sagellm_backend.engine.mock import MockEngine, MockEngineConfig

try:  # this project's pieces for the protocol floor (absent from the published 0.1.1.2)
    from sagellm_backend.engine.metrics import RequestTimeline, build_metrics, now
    from sagellm_backend.engine.mock.tokenizer import MockTokenizer

    HAVE_FLOOR = True
except ImportError:
    HAVE_FLOOR = False

# _workload sits next to this file: on sys.path when run as a script, added when loaded by path.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import MOCK_BENCH_WORDS
from _workload import WORDS as ALL_WORDS

WORDS = ALL_WORDS[:MOCK_BENCH_WORDS]


def make_requests(
    n: int,
    max_tokens: int | tuple[int, int],
    seed: int = 0,
    prompt_words: tuple[int, int] = (4, 24),
) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.choices(WORDS, k=rng.randint(*prompt_words))
        mt = max_tokens if isinstance(max_tokens, int) else rng.randint(*max_tokens)
        out.append(
            Request(
                request_id=f"b{i}",
                trace_id=f"t{i}",
                model="mock",
                prompt=" ".join(words) + f" {i}",
                max_tokens=mt,
                stream=False,
            )
        )
    return out


class BaselineLoop:
    """Minimal asyncio batch loop: no tokens, no KV, no metrics — the asyncio floor."""

    def __init__(self, max_batch_size: int, max_tokens: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_tokens = max_tokens
        self.queue: collections.deque[tuple[Request, asyncio.Future[Response]]] = (
            collections.deque()
        )
        self.wakeup = asyncio.Event()
        self.metrics = Metrics(ttft_ms=0.0, throughput_tps=0.0, peak_mem_mb=0, error_rate=0.0)
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        running: list[Any] = []
        while True:
            while self.queue and len(running) < self.max_batch_size:
                running.append(self._admit(*self.queue.popleft()))
            if not running:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            await asyncio.sleep(0)
            running = self._step(running)

    def _admit(self, req: Request, fut: asyncio.Future[Response]) -> Any:
        """A queued request's entry in the running batch."""
        return (req, fut, [])

    def _step(self, running: list[Any]) -> list[Any]:
        """One step of every running request; the entries still running."""
        keep = []
        for req, fut, toks in running:
            toks.append(len(toks))
            if len(toks) >= self.max_tokens:
                fut.set_result(
                    Response(
                        request_id=req.request_id,
                        trace_id=req.trace_id,
                        output_text="",
                        output_tokens=toks,
                        finish_reason="length",
                        metrics=self.metrics,
                    )
                )
            else:
                keep.append((req, fut, toks))
        return keep

    async def execute(self, req: Request) -> Response:
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.queue.append((req, fut))
        self.wakeup.set()
        return await fut


class ProtocolFloorLoop(BaselineLoop):
    """:class:`BaselineLoop` plus the per-request work the protocol API asks of any engine.

    Per request: the prompt is tokenized (MockTokenizer), every step stamps a token time,
    and at the end the output text of ``max_tokens`` word tokens is decoded and real
    ``Metrics`` (from the stamps) and a ``Response`` are built and validated. Output ids are
    drawn in advance (no sampling cost); nothing is accounted in KV.
    """

    def __init__(self, max_batch_size: int, max_tokens: int, seed: int = 0) -> None:
        super().__init__(max_batch_size, max_tokens)
        self.tokenizer = MockTokenizer()
        rng = random.Random(seed)
        first, end = MockTokenizer.WORD_OFFSET, MockTokenizer.WORD_OFFSET
        end += self.tokenizer.num_output_words
        self.outputs = [[rng.randrange(first, end) for _ in range(max_tokens)] for _ in range(997)]
        self.served = 0

    def _admit(self, req: Request, fut: asyncio.Future[Response]) -> Any:
        prompt = self.tokenizer.encode(req.prompt)
        timeline = RequestTimeline()
        timeline.scheduled = now()
        return (req, fut, timeline, prompt)

    def _step(self, running: list[Any]) -> list[Any]:
        keep = []
        t = now()
        for item in running:
            req, fut, timeline, _prompt = item
            times = timeline.token_times
            times.append(t)
            if len(times) >= self.max_tokens:
                ids = self.outputs[self.served % len(self.outputs)]
                self.served += 1
                fut.set_result(
                    Response(
                        request_id=req.request_id,
                        trace_id=req.trace_id,
                        output_text=self.tokenizer.decode(ids),
                        output_tokens=ids,
                        finish_reason="length",
                        metrics=build_metrics(timeline, error_rate=0.0),
                    )
                )
            else:
                keep.append(item)
        return keep


async def drive(execute: Any, requests: list[Request], concurrency: int) -> tuple[float, float]:
    """Run every request through ``execute`` with ``concurrency`` workers.

    Returns:
        (wall seconds, process CPU seconds). On a shared machine the CPU time is the fairer
        figure: the wall time also counts the time other processes held the cores.
    """
    it = iter(requests)

    async def worker() -> None:
        for req in it:
            resp = await execute(req)
            if resp.finish_reason == "error":
                raise RuntimeError(f"request {req.request_id} failed: {resp.error}")

    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, time.process_time() - c0


async def bench_throughput(
    n: int,
    concurrency: int,
    batch: int,
    max_tokens: int,
    repeats: int,
    prompt_words: tuple[int, int] = (4, 24),
) -> dict[str, Any]:
    requests = make_requests(n, max_tokens, prompt_words=prompt_words)
    tokenizer = getattr(MockEngine(MockEngineConfig("tok")), "tokenizer", None)
    prompt_tokens = (
        statistics.mean(len(tokenizer.encode(r.prompt)) for r in requests[:500])
        if tokenizer is not None
        else float("nan")  # an engine without a tokenizer attribute (the published 0.1.1.2)
    )
    base_times, floor_times, eng_times = [], [], []
    for _ in range(repeats):
        loops: list[tuple[BaselineLoop, list[tuple[float, float]]]] = [
            (BaselineLoop(batch, max_tokens), base_times)
        ]
        if HAVE_FLOOR:
            loops.append((ProtocolFloorLoop(batch, max_tokens), floor_times))
        for loop, times in loops:
            loop.task = asyncio.create_task(loop.run())
            times.append(await drive(loop.execute, requests, concurrency))
            loop.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop.task
        try:
            config = MockEngineConfig("bench", 0.0, 0.0, max_batch_size=batch, kv_num_pages=8192)
        except TypeError:  # an engine without these options (the published 0.1.1.2)
            config = MockEngineConfig("bench", 0.0, 0.0)
        engine = MockEngine(config)
        await engine.start()
        eng_times.append(await drive(engine.execute, requests, concurrency))
        info = engine.get_info()
        if "kv" in info:  # this project's engine: every request completed, KV empty
            assert info["completed"] == n * 1 and info["failed"] == 0, info
            assert info["kv"]["num_seqs"] == 0
        await engine.stop()
    base = statistics.median(t for t, _ in base_times)
    eng = statistics.median(t for t, _ in eng_times)
    base_cpu = statistics.median(c for _, c in base_times)
    floor_cpu = statistics.median(c for _, c in floor_times) if floor_times else float("nan")
    eng_cpu = statistics.median(c for _, c in eng_times)
    return {
        "requests": n,
        "concurrency": concurrency,
        "max_batch_size": batch,
        "max_tokens": max_tokens,
        "prompt_words": list(prompt_words),
        "mean_prompt_tokens": prompt_tokens,
        "repeats": repeats,
        "baseline_req_per_s": n / base,
        "engine_req_per_s": n / eng,
        "engine_tokens_per_s": n * max_tokens / eng,
        "engine_vs_baseline": base / eng,
        "baseline_req_per_cpu_s": n / base_cpu,
        "engine_req_per_cpu_s": n / eng_cpu,
        "engine_vs_baseline_cpu": base_cpu / eng_cpu,
        "protocol_floor_req_per_cpu_s": n / floor_cpu,
        "protocol_floor_us_per_request_cpu": floor_cpu / n * 1e6,
        "engine_vs_protocol_floor_cpu": floor_cpu / eng_cpu,
        "engine_us_per_request_cpu": eng_cpu / n * 1e6,
        "engine_req_per_cpu_s_best": n / min(c for _, c in eng_times),
        "baseline_req_per_cpu_s_best": n / min(c for _, c in base_times),
        "engine_req_per_s_all": [n / t for t, _ in eng_times],
    }


async def bench_streams(n: int, batch: int, seed: int = 1) -> dict[str, Any]:
    requests = make_requests(n, (1, 32), seed)
    engine = MockEngine(MockEngineConfig("bench-streams", 0.0, 0.0, max_batch_size=batch))
    await engine.start()
    tok = engine.tokenizer

    async def consume(req: Request) -> tuple[int, int, bool]:
        starts = ends = 0
        chunks: list[str] = []
        ids: list[int] = []
        ok = False
        async for ev in engine.stream(req):
            if ev.event == "start":
                starts += 1
            elif ev.event == "delta":
                chunks.append(ev.chunk)
                ids.extend(ev.chunk_tokens)
            else:
                ends += 1
                ok = (
                    ev.finish_reason == "length"
                    and "".join(chunks) == ev.output_text
                    and ids == ev.output_tokens
                    and len(ids) == req.max_tokens
                    and tok.decode(ids) == ev.output_text
                )
        return starts, ends, ok

    t0 = time.perf_counter()
    results = await asyncio.gather(*(consume(r) for r in requests))
    elapsed = time.perf_counter() - t0
    kv = engine.kv_manager
    assert kv is not None
    kv_empty = kv.stats().num_seqs == 0 and kv.pool.num_used == 0
    await engine.stop()
    bad = [i for i, (s, e, ok) in enumerate(results) if (s, e, ok) != (1, 1, True)]
    tokens = sum(r.max_tokens for r in requests)
    return {
        "streams": n,
        "max_batch_size": batch,
        "tokens": tokens,
        "seconds": elapsed,
        "streams_per_s": n / elapsed,
        "tokens_per_s": tokens / elapsed,
        "lost_or_wrong": len(bad),
        "kv_empty_after": kv_empty,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "throughput": [],
    }
    words = (args.prompt_words[0], args.prompt_words[1])
    for mt in args.max_tokens:
        results["throughput"].append(
            await bench_throughput(
                args.requests, args.concurrency, args.batch, mt, args.repeats, words
            )
        )
    if args.streams > 0:
        results["streams"] = await bench_streams(args.streams, args.stream_batch)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256, help="engine max_batch_size")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--prompt-words", type=int, nargs=2, default=[4, 24], help="prompt length range, words"
    )
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--stream-batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.repeats, args.max_tokens = 2000, 1, [4]
    results = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("MockEngine, zero simulated latency (one engine, one event loop)")
        for r in results["throughput"]:
            print(
                f"  execute: {r['requests']} requests, prompts "
                f"~{r['mean_prompt_tokens']:.0f} tokens, {r['max_tokens']} output tokens, "
                f"concurrency {r['concurrency']}, batch {r['max_batch_size']} "
                f"(median of {r['repeats']}):\n"
                f"    wall: {r['engine_req_per_s']:,.0f} req/s "
                f"({r['engine_tokens_per_s']:,.0f} tok/s); baseline loop "
                f"{r['baseline_req_per_s']:,.0f} req/s; ratio {r['engine_vs_baseline']:.2f}x\n"
                f"    cpu:  {r['engine_req_per_cpu_s']:,.0f} req per CPU-s "
                f"({r['engine_us_per_request_cpu']:.1f} us/request); baseline loop "
                f"{r['baseline_req_per_cpu_s']:,.0f}; ratio {r['engine_vs_baseline_cpu']:.2f}x; "
                f"best run {r['engine_req_per_cpu_s_best']:,.0f} req per CPU-s"
            )
            if HAVE_FLOOR:
                print(
                    f"    protocol floor (loop + tokenize, text, Metrics, Response; no KV): "
                    f"{r['protocol_floor_req_per_cpu_s']:,.0f} req per CPU-s "
                    f"({r['protocol_floor_us_per_request_cpu']:.1f} us/request); engine "
                    f"{r['engine_vs_protocol_floor_cpu']:.2f}x of it"
                )
        s = results.get("streams")
        if s is None:
            return 0
        print(
            f"  streams: {s['streams']} concurrent, {s['tokens']} tokens in {s['seconds']:.2f} s "
            f"({s['streams_per_s']:,.0f} streams/s, {s['tokens_per_s']:,.0f} tok/s); "
            f"lost or wrong: {s['lost_or_wrong']}; KV empty after: {s['kv_empty_after']}"
        )
    s = results.get("streams")
    ok = s is None or (s["lost_or_wrong"] == 0 and s["kv_empty_after"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
