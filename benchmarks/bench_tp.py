"""Tensor parallelism on CPU: the engine at 1 and 2 ranks on the same workload, one run.

Workload: the ``bench-llama`` model (random Llama, hidden 512, intermediate 1536, 8
layers, 8/4 heads, vocab 8000, fp32) built offline by
:func:`sagellm_backend.testing.tiny_models.ensure_tiny_model`; 16 concurrent requests with
seeded prompts of 16-200 tokens drawn from :data:`_workload.WORDS`, exactly 64 new tokens
each (greedy, eos ignored). ``CPUEngine`` with ``tensor_parallel_size`` 1 (``--threads``
torch threads) and 2 (gloo, ``--threads / 2`` threads per rank, so both use the same cores).

Printed per size: output tokens/s and its ratio to 1 rank, steps, rank 0's step time and
the share of it spent in communication -- the all-reduces of the row-parallel layers (two
per decoder layer per step, ``T x hidden`` fp32 each) and the plan broadcast plus step
status -- with the bytes all-reduced per step. Rank 0's all-reduce time includes waiting
for the slower rank, so on a shared machine it also measures imbalance, not only the wire.
Greedy tokens at 2 ranks are compared with 1 rank (mismatches counted).

On a 2-core machine 2 ranks need not be faster (they split the same two cores); the figure
to watch is the communication share.

Run:  python benchmarks/bench_tp.py [--quick] [--threads N] [--repeat N] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workload import WORDS


def _probe_rank(rank: int, port: int, shapes: list[tuple[int, int]], iters: int, out: Any) -> None:
    """One rank of the all-reduce probe: time ``iters`` gloo all-reduces per shape."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    try:
        times = []
        for rows, cols in shapes:
            t = torch.ones(rows, cols)
            for _ in range(5):
                dist.all_reduce(t)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(t)
            times.append((time.perf_counter() - t0) / iters)
        if rank == 0:
            out.send(times)
    finally:
        dist.destroy_process_group()


def probe_all_reduce(shapes: list[tuple[int, int]], iters: int) -> list[float]:
    """Seconds per gloo all-reduce of each ``[rows, cols]`` fp32 shape, 2 local processes.

    Both processes do nothing else, so this is the communication itself, without the wait
    for a slower rank that the engine's all-reduce time also contains.
    """
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    procs = [ctx.Process(target=_probe_rank, args=(r, port, shapes, iters, send)) for r in range(2)]
    for p in procs:
        p.start()
    times: list[float] = recv.recv()
    for p in procs:
        p.join()
    return times


def make_prompts(rng: random.Random, n: int) -> list[str]:
    """``n`` seeded prompts of about 16-200 tokens (words from the shared vocabulary)."""
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(16, 200) * 2 // 3)) for _ in range(n)
    ]


async def run_size(
    model_path: str, tp: int, prompts: list[str], new_tokens: int, threads: int, repeat: int
) -> dict[str, Any]:
    """Start an engine at ``tp`` ranks, warm it, time the workload ``repeat`` times."""
    from sagellm_protocol import Request

    from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig

    engine = CPUEngine(
        CPUEngineConfig(
            engine_id=f"bench-tp{tp}",
            model_path=model_path,
            max_batch_size=len(prompts),
            max_new_tokens=new_tokens,
            num_threads=max(1, threads // tp),
            tensor_parallel_size=tp,
            enable_prefix_caching=False,
        )
    )

    def request(i: int, text: str, n: int) -> Request:
        return Request(
            request_id=f"tp{tp}-{i}",
            trace_id=f"tp{tp}-{i}",
            model="bench",
            prompt=text,
            max_tokens=n,
            stream=False,
            metadata={"ignore_eos": True},
        )

    t0 = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - t0
    try:
        await engine.execute(request(-1, prompts[0], 4))  # warm-up
        passes: list[dict[str, Any]] = []
        tokens: list[list[int]] = []
        for _ in range(repeat):
            runner = engine._runner
            if hasattr(runner, "reset_stats"):
                runner.reset_stats()
            t0 = time.perf_counter()
            outs = await asyncio.gather(
                *[engine.execute(request(i, p, new_tokens)) for i, p in enumerate(prompts)]
            )
            wall = time.perf_counter() - t0
            for out in outs:
                if out.finish_reason != "length":
                    raise RuntimeError(f"request failed: {out.error}")
            tokens = [list(o.output_tokens) for o in outs]
            n_out = sum(len(t) for t in tokens)
            info = engine.get_info()
            stats = info.get("tensor_parallel", {}).get("stats", {})
            passes.append({"wall_s": wall, "tok_s": n_out / wall, **stats})
        info = engine.get_info()
    finally:
        await engine.stop()
    best = sorted(passes, key=lambda p: p["tok_s"])[len(passes) // 2]
    return {
        "tp": tp,
        "start_s": start_s,
        "tok_s": best["tok_s"],
        "tok_s_runs": [p["tok_s"] for p in passes],
        "pass": best,
        "tokens": tokens,
        "ranks": info.get("tensor_parallel", {}).get("ranks", []),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 requests, 16 new tokens")
    ap.add_argument("--model", help="model directory (default: bench-llama, built offline)")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in all (split by rank)")
    ap.add_argument("--repeat", type=int, default=1, help="passes per size; median reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-probe", action="store_true", help="skip the all-reduce probe")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = ap.parse_args(argv)
    requests = args.requests or (8 if args.quick else 16)
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    if min(requests, new_tokens, args.threads, args.repeat) < 1:
        ap.error("--requests, --new-tokens, --threads and --repeat must be >= 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    model_path = args.model or str(ensure_tiny_model("bench-llama"))
    prompts = make_prompts(random.Random(args.seed), requests)
    load = os.getloadavg()[0]
    print(
        f"model {model_path}; {requests} requests x {new_tokens} new tokens; {args.threads} "
        f"threads in all; {os.cpu_count()} CPUs; load average {load:.2f} (a shared machine "
        "makes absolute figures noisy: compare within this run)"
    )
    results = [
        asyncio.run(run_size(model_path, tp, prompts, new_tokens, args.threads, args.repeat))
        for tp in (1, 2)
    ]
    base = results[0]["tok_s"]
    print(
        f"\n{'ranks':>5} {'tok/s':>8} {'vs 1':>6} {'steps':>6} {'step ms':>8} "
        f"{'comm %':>7} {'allreduce %':>12} {'plan %':>7} {'KB/step':>8} {'start s':>8}"
    )
    for r in results:
        p = r["pass"]
        head = f"{r['tp']:>5} {r['tok_s']:>8.1f} {r['tok_s'] / base:>5.2f}x"
        if not p.get("steps"):  # one rank: no communication
            print(
                f"{head} {'-':>6} {'-':>8} {'-':>7} {'-':>12} {'-':>7} {'-':>8} "
                f"{r['start_s']:>8.1f}"
            )
            continue
        steps, step_s = p["steps"], p["step_s"]
        print(
            f"{head} {steps:>6} {1000 * step_s / steps:>8.1f} {100 * p['comm_share']:>6.1f}% "
            f"{100 * p['all_reduce_s'] / step_s:>11.1f}% {100 * p['plan_s'] / step_s:>6.1f}% "
            f"{p['all_reduce_bytes'] / steps / 1024:>8.1f} {r['start_s']:>8.1f}"
        )
    mismatches = sum(
        a != b for a, b in zip(results[0]["tokens"], results[1]["tokens"], strict=True)
    )
    print(f"\ngreedy outputs at 2 ranks differing from 1 rank: {mismatches} of {requests}")
    for rank in results[1]["ranks"]:
        print(
            f"rank {rank['rank']}: {rank['num_heads']} heads / {rank['num_kv_heads']} kv heads, "
            f"KV page {rank['kv_page_bytes']} B, weights {rank['weight_bytes'] / 2**20:.1f} MiB"
        )
    if len(results[1]["tok_s_runs"]) > 1:
        print(
            "tok/s runs:",
            {r["tp"]: [round(x, 1) for x in r["tok_s_runs"]] for r in results},
            "median ratio",
            round(
                statistics.median(results[1]["tok_s_runs"])
                / statistics.median(results[0]["tok_s_runs"]),
                3,
            ),
        )
    probe: dict[str, Any] = {}
    p2 = results[1]["pass"]
    if not args.no_probe and p2.get("steps"):
        from sagellm_backend.testing.tiny_models import tiny_model_spec

        hidden = tiny_model_spec("bench-llama").hidden_size if not args.model else None
        if hidden is None:
            import json as _json

            cfg = _json.loads((Path(model_path) / "config.json").read_text())
            hidden = int(cfg.get("hidden_size") or cfg.get("n_embd"))
        shapes = [(1, hidden), (requests, hidden), (2048, hidden)]
        secs = probe_all_reduce(shapes, 50 if args.quick else 200)
        print("\ngloo all-reduce between 2 otherwise idle local processes (fp32):")
        for (r, c), t in zip(shapes, secs, strict=True):
            print(f"  [{r:>5} x {c}] {r * c * 4 / 1024:>8.1f} KiB  {t * 1e6:>9.1f} us")
        # Linear cost model from the probe: a fixed latency per call plus a cost per byte.
        per_byte = (secs[2] - secs[0]) / ((2048 - 1) * hidden * 4)
        latency = secs[0] - per_byte * hidden * 4
        wire_s = latency * p2["all_reduce_calls"] + per_byte * p2["all_reduce_bytes"]
        wire = wire_s / p2["step_s"]
        print(
            f"engine at 2 ranks: {p2['all_reduce_calls'] / p2['steps']:.0f} all-reduces and "
            f"{p2['all_reduce_bytes'] / p2['steps'] / 1024:.0f} KiB per step; at the probe's "
            f"{latency * 1e6:.0f} us + {per_byte * 2**20 * 1e3:.2f} ms/MiB the communication "
            f"itself is {100 * wire:.1f}% of step time (the rest of the measured "
            f"{100 * p2['all_reduce_s'] / p2['step_s']:.1f}% is waiting for the slower rank)"
        )
        probe = {"shapes": shapes, "seconds": secs, "wire_share": wire}
    if args.json:
        slim = [{k: v for k, v in r.items() if k != "tokens"} for r in results]
        Path(args.json).write_text(
            json.dumps({"results": slim, "mismatches": mismatches, "probe": probe}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
