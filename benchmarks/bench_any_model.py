"""The engine on architectures other than Llama, against plain transformers, one run.

Workload (issue 15): 16 concurrent requests, seeded prompts of 16-200 tokens, exactly 64
new tokens each (greedy, eos ignored), torch with 2 threads, on random models of about the
``bench-llama`` size built offline by
:func:`sagellm_backend.testing.tiny_models.ensure_tiny_model`: ``bench-gpt2`` and
``bench-phi3`` and ``bench-llama``, all served by the generic paged runner (a hand-written
Llama runner was compared with it here until it was removed: in the same run it was no
faster, 0.96x wall, 0.98x CPU time).

Per model, in the same process and the same pass (phases interleaved pass by pass, each
ratio taken inside one pass, medians over ``--repeat`` passes):

1. ``model.generate`` one request at a time (*sequential*);
2. ``model.generate`` on a left-padded static batch of all requests (*static*);
3. the engine (``CPUEngine``) with every request submitted at once (*engine*);
4. with ``--one-decode-group``: the engine with the generic runner's decode attention as one
   padded group (``decode_split_saving = 1.0``, the behaviour before decode rows were grouped
   by length) (*engine_1group*);
5. with ``--gather-decode``: the engine with the generic runner's decode cache off (every
   decode step gathers each sequence's pages in every layer, the behaviour before the decode
   cache) (*engine_gather*);
6. with ``--serial-prefill``: the engine with the per-sequence runner's batched prefill off
   (every new prompt its own forward, the behaviour before prompts were batched)
   (*engine_serial_prefill*);
7. with ``--rebuild-batch``: the engine with the batched fallback runner's kept decode batch
   off (the padded batch cache rebuilt from the sequences' own K/V every step, the behaviour
   before it was kept, with decode rows in the padded forward of the step's prompts)
   (*engine_rebuild*).

``--stagger-ms MS`` submits engine request ``i`` at ``i * MS`` ms instead of all at once
(prompts arrive while others decode; the static batch cannot, so compare engine variants).

Greedy outputs are compared token by token with 1. The machine may be shared: compare
only the ratios printed by one run.

Threads: as in ``bench_hf_engine.py``, every torch phase runs in a thread of its own that
ends with it and an engine runs only during its phase, so one OpenMP team is alive at a
time. (With two alive -- e.g. baselines in the main thread, the engine in its driver
thread -- libgomp stops spin-waiting between parallel regions: on the 2-CPU reference
machine a 16-row decode step of ``bench-gpt2`` took ~15% longer and small ops such as
``tanh`` and ``layer_norm`` 2-4x longer, in whichever thread ran second.)

``--models bench-mamba`` and ``--models bench-qwen3-next`` measure the per-sequence runner
(``hf-sequential``: models with recurrent state keep one cache per sequence, merged into
batches for decode steps and new prompts where the model allows it) on a random Mamba and a
random hybrid Qwen3-Next of similar size; ``--models bench-bloom`` the batched fallback
runner (``hf-batched``: the model's own attention and cache, here BLOOM's ALiBi).

Run:  python benchmarks/bench_any_model.py [--models bench-gpt2,bench-phi3,bench-llama]
      [--quick] [--repeat N] [--requests N] [--new-tokens N] [--one-decode-group]
      [--gather-decode] [--serial-prefill] [--rebuild-batch] [--stagger-ms MS] [--json FILE]
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

from bench_hf_engine import (
    PhaseResult,
    Workload,
    alone,
    compare,
    encode,
    make_engine,
    make_texts,
    run_engine_concurrent,
    run_sequential,
    run_static,
    serving,
)

_THREADS_DEFAULT = 2


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from sagellm_backend.engine.hf.loader import load_model_and_tokenizer
    from sagellm_backend.testing.tiny_models import CORPUS, ensure_tiny_model

    path = str(alone(lambda: ensure_tiny_model(name)))
    model, tokenizer = alone(
        lambda: load_model_and_tokenizer(
            path, device="cpu", dtype="float32", device_map=None, trust_remote_code=False
        )
    )
    n_params = sum(p.numel() for p in model.parameters())
    rng = random.Random(args.seed)
    words = [w for w in CORPUS.split() if w.isprintable()]
    lengths = [rng.randint(16, 200) for _ in range(args.requests)]
    texts = make_texts(tokenizer, rng, lengths, words)
    wl = Workload(texts, encode(tokenizer, texts), args.new_tokens)
    print(
        f"\n== {name}: {type(model).__name__}, {n_params / 1e6:.1f}M params; prompts "
        f"{min(map(len, wl.ids))}-{max(map(len, wl.ids))} tokens "
        f"({sum(map(len, wl.ids))} in all), {args.new_tokens} new tokens each",
        flush=True,
    )
    loop = asyncio.new_event_loop()
    engines: dict[str, Any] = {}
    variants = ["engine"]
    if args.one_decode_group:
        variants.append("engine_1group")
    if args.gather_decode:
        variants.append("engine_gather")
    if args.serial_prefill:
        variants.append("engine_serial_prefill")
    if args.rebuild_batch:
        variants.append("engine_rebuild")

    def configure(key: str) -> Any:
        def apply(eng: Any) -> None:  # after each start (a restart builds a new runner)
            if key == "engine_1group":
                runner = getattr(eng, "_runner", None)
                if not hasattr(runner, "decode_split_saving"):
                    raise SystemExit("--one-decode-group: the engine's runner has no decode groups")
                runner.decode_split_saving = 1.0  # type: ignore[union-attr]
            if key == "engine_gather":
                cache = getattr(getattr(eng, "_runner", None), "_dcache", None)
                if cache is None:
                    raise SystemExit("--gather-decode: the engine's runner has no decode cache")
                cache.budget_bytes = 0
            if key == "engine_serial_prefill":
                runner = getattr(eng, "_runner", None)
                if not getattr(runner, "batched_prefill", False):
                    raise SystemExit("--serial-prefill: the engine's runner batches no prefill")
                runner.batched_prefill = False  # type: ignore[union-attr]
            if key == "engine_rebuild":
                runner = getattr(eng, "_runner", None)
                if not hasattr(runner, "keep_batch"):
                    raise SystemExit("--rebuild-batch: the engine's runner keeps no batch")
                runner.keep_batch = False  # type: ignore[union-attr]

        return apply

    def engine_phase(key: str) -> Any:
        with serving(engines[key], loop, wl.ids[0], configure(key)) as eng:
            return run_engine_concurrent(eng, wl, loop, args.stagger_ms)

    try:
        for key in variants:
            engines[key] = eng = make_engine(path, args, prefix_caching=False)
            with serving(eng, loop, wl.ids[0], configure(key)):  # loads the model once
                print(f"  {key}: runner {eng.runner_name}", flush=True)
        runs: dict[str, list[PhaseResult]] = {}
        outputs: dict[str, list[list[int]]] = {}

        def warm_up() -> None:
            with torch.inference_mode():
                model.generate(torch.tensor([wl.ids[0]]), max_new_tokens=2, do_sample=False)

        alone(warm_up)
        for i in range(args.repeat):
            print(f"  pass {i + 1}/{args.repeat}", flush=True)
            phases: list[tuple[str, Any]] = []
            if not args.skip_sequential:
                phases.append(
                    ("sequential", lambda: alone(lambda: run_sequential(model, tokenizer, wl)))
                )
            phases.append(("static", lambda: alone(lambda: run_static(model, tokenizer, wl))))
            for key in variants:
                phases.append((key, lambda k=key: engine_phase(k)))
            for key, fn in phases:
                cpu0 = time.process_time()
                res, outputs[key] = fn()
                res.extra["cpu_s"] = time.process_time() - cpu0
                runs.setdefault(key, []).append(res)
    finally:
        loop.close()
    ref_key = "sequential" if "sequential" in outputs else "static"
    checks = {
        k: compare(f"{k} vs {ref_key}", v, outputs[ref_key])["identical"]
        for k, v in outputs.items()
        if k != ref_key
    }

    def ratio(num: str, den: str, cpu: bool = False) -> float | None:
        if num not in runs or den not in runs:
            return None
        if cpu:  # output tokens per CPU-second of this process
            vals = [
                (a.output_tokens / a.extra["cpu_s"]) / (b.output_tokens / b.extra["cpu_s"])
                for a, b in zip(runs[num], runs[den], strict=True)
            ]
        else:
            vals = [a.tok_per_s / b.tok_per_s for a, b in zip(runs[num], runs[den], strict=True)]
        return float(statistics.median(vals))

    def fmt(x: float | None) -> str:
        return f"{x:.2f}x" if x else "-"

    table: dict[str, Any] = {}
    print(
        f"  {'phase':<16} {'tok/s':>8} {'vs static':>9} {'vs seq':>7} {'tok/cpu-s':>9} "
        f"{'vs static (cpu)':>15} {'TTFT p50':>9}"
    )
    for key, passes in runs.items():
        tps = float(statistics.median(r.tok_per_s for r in passes))
        tpc = float(statistics.median(r.output_tokens / r.extra["cpu_s"] for r in passes))
        vs_static, vs_seq = ratio(key, "static"), ratio(key, "sequential")
        vs_static_cpu = ratio(key, "static", cpu=True)
        ttfts = [r.ttft_p50_ms for r in passes if r.ttft_p50_ms is not None]
        ttft = float(statistics.median(ttfts)) if ttfts else None
        table[key] = {
            "ttft_p50_ms": ttft,
            "tok_per_s": tps,
            "tok_per_cpu_s": tpc,
            "vs_static": vs_static,
            "vs_static_cpu": vs_static_cpu,
            "vs_sequential": vs_seq,
            "runs_s": [r.seconds for r in passes],
        }
        print(
            f"  {key:<16} {tps:>8.1f} {fmt(vs_static):>9} {fmt(vs_seq):>7} {tpc:>9.1f} "
            f"{fmt(vs_static_cpu):>15} {f'{ttft:.0f} ms' if ttft else '-':>9}"
        )
    return {"model": name, "params": n_params, "phases": table, "identical": checks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="bench-gpt2,bench-phi3,bench-llama")
    ap.add_argument("--quick", action="store_true", help="8 requests, 16 new tokens")
    ap.add_argument("--requests", type=int, help="number of requests (default 16, quick 8)")
    ap.add_argument("--new-tokens", type=int, help="new tokens per request (default 64)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=_THREADS_DEFAULT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-sequential", action="store_true", help="no one-at-a-time phase")
    ap.add_argument(
        "--one-decode-group",
        action="store_true",
        help="also run the engine with decode attention as one padded group",
    )
    ap.add_argument(
        "--gather-decode",
        action="store_true",
        help="also run the engine with the decode cache off (pages gathered every step)",
    )
    ap.add_argument(
        "--serial-prefill",
        action="store_true",
        help="also run the engine with the per-sequence runner's batched prefill off",
    )
    ap.add_argument(
        "--rebuild-batch",
        action="store_true",
        help="also run the engine with the batched fallback runner's kept batch off",
    )
    ap.add_argument(
        "--stagger-ms",
        type=float,
        default=0.0,
        help="engine phases: submit request i at i * this many ms (arrivals while serving)",
    )
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    args.requests = args.requests or (8 if args.quick else 16)
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    if min(args.requests, args.new_tokens, args.repeat, args.threads) < 1:
        ap.error("--requests, --new-tokens, --repeat and --threads must be >= 1")
    args.dtype = "float32"
    args.max_batch_size = max(16, args.requests)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, load "
        f"average {load[0]:.2f} (a shared machine: compare only ratios inside this run)"
    )
    results = [bench_model(m.strip(), args) for m in args.models.split(",") if m.strip()]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
