"""Benchmark the HF engine core against plain transformers on the same requests, one run.

Workload (DESIGN.md "Measured on this kind of machine", issue 6 "Benchmark and targets"):
the ``bench-llama`` model (random Llama, hidden 512, intermediate 1536, 8 layers, 8/4
heads, vocab 8000, fp32, ~33M params) built offline by
:func:`sagellm_backend.testing.tiny_models.ensure_tiny_model`, torch with 2 threads,
16 concurrent requests with seeded prompts of 16-200 tokens and exactly 64 new tokens each
(eos ignored, greedy).

Measured in the same process, same prompts, same token ids:

1. ``model.generate`` one request at a time (the *sequential* baseline);
2. ``model.generate`` on a left-padded static batch of all requests (the *static* baseline);
3. the engine (``CPUEngine``) with every request submitted concurrently;
4. the engine with one request at a time (vs 1.);
5. prefix caching: requests sharing a 512-token system prompt, TTFT p50 with the engine's
   prefix cache on vs off, and its prefix hit rate.

Greedy outputs of 2.-4. are compared token by token with 1.; mismatches are printed.
Results: a table of output tokens/s, ratios, TTFT p50 and peak RSS per phase; ``--json
FILE`` writes everything.  ``--repeat N`` reports medians of N passes.

Threads: every torch phase (model build and load, the baselines) runs in a thread of its
own that ends with it (:func:`alone`), and an engine runs only during its own phases
(:func:`serving`; a restart reuses the loaded model). A thread that ran torch on CPU keeps
its OpenMP team until it ends, and with two teams alive libgomp stops spin-waiting between
parallel regions: on the 2-CPU reference machine small ops then took about 2x longer, in
whichever phase ran second. A server process has one torch thread, the engine's driver;
every phase is measured that way.

Run:  python benchmarks/bench_hf_engine.py [--quick] [--model PATH] [--repeat N] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sagellm_backend.cli.bench.loadgen import greedy_config

# Thread settings must be in place before torch is imported.
_THREADS_DEFAULT = 2


@dataclass
class Workload:
    """The prompts (text and the ids the tokenizer gives them) and the output length."""

    texts: list[str]
    ids: list[list[int]]
    new_tokens: int


@dataclass
class PhaseResult:
    """One measured phase (median over repeats where repeated)."""

    name: str
    seconds: float
    output_tokens: int
    tok_per_s: float
    peak_rss_mb: float
    ttft_p50_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    runs_s: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------- helpers

_T = TypeVar("_T")


def alone(fn: Callable[[], _T]) -> _T:
    """``fn()`` run in a thread of its own that ends with it (see "Threads" above)."""
    box: list[tuple[bool, Any]] = []

    def main() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # re-raised in the calling thread
            box.append((False, exc))

    thread = threading.Thread(target=main, name="bench-phase")
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


@contextmanager
def serving(
    engine: Any,
    loop: asyncio.AbstractEventLoop,
    warm_ids: list[int],
    configure: Callable[[Any], None] | None = None,
) -> Iterator[Any]:
    """``engine`` started for one phase (``configure``-d, warmed with one short request,
    not measured), stopped after it: its driver thread lives only during the phase."""
    loop.run_until_complete(engine.start())
    try:
        if configure is not None:
            configure(engine)
        loop.run_until_complete(engine.execute(make_request(0, warm_ids, 2, "warm")))
        yield engine
    finally:
        loop.run_until_complete(engine.stop())


class RssSampler:
    """Peak resident set size of this process while a block runs (sampled every 10 ms)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.01)

    def __enter__(self) -> RssSampler:
        self.peak = self._proc.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


@contextmanager
def timed() -> Iterator[list[float]]:
    box = [0.0]
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - t0


def p50(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def median_run(runs: list[PhaseResult]) -> PhaseResult:
    """The run with the median time, with every run's time and the highest RSS attached."""
    best = copy.copy(sorted(runs, key=lambda r: r.seconds)[len(runs) // 2])
    best.runs_s = [r.seconds for r in runs]
    best.peak_rss_mb = max(r.peak_rss_mb for r in runs)
    return best


def make_texts(
    tokenizer: Any, rng: random.Random, lengths: list[int], vocab_words: list[str]
) -> list[str]:
    """Seeded prompts built from real words, each about ``lengths[i]`` tokens long."""
    texts = []
    for target in lengths:
        words: list[str] = []
        while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < target:
            words.extend(rng.choice(vocab_words) for _ in range(max(1, target // 8)))
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:target]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """The ids the engine gets for each prompt (special tokens as the tokenizer adds them)."""
    return [list(tokenizer(t)["input_ids"]) for t in texts]


# ---------------------------------------------------------------------------- baselines


def run_sequential(model: Any, tokenizer: Any, wl: Workload) -> tuple[PhaseResult, list[list[int]]]:
    import torch

    gen = greedy_config(model, tokenizer, wl.new_tokens)
    outputs: list[list[int]] = []
    per_req: list[float] = []
    with RssSampler() as rss, timed() as t, torch.inference_mode():
        for ids in wl.ids:
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gen)
            per_req.append(time.perf_counter() - t0)
            outputs.append(out[0, len(ids) :].tolist())
    n_out = sum(len(o) for o in outputs)
    return (
        PhaseResult(
            "generate, one request at a time",
            t[0],
            n_out,
            n_out / t[0],
            rss.peak_mb,
            extra={"per_request_s": per_req},
        ),
        outputs,
    )


def run_static(model: Any, tokenizer: Any, wl: Workload) -> tuple[PhaseResult, list[list[int]]]:
    import torch

    gen = greedy_config(model, tokenizer, wl.new_tokens)
    width = max(len(i) for i in wl.ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    x = torch.tensor([[pad] * (width - len(i)) + i for i in wl.ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in wl.ids])
    with RssSampler() as rss, timed() as t, torch.inference_mode():
        out = model.generate(x, attention_mask=mask, generation_config=gen)
    outputs = [row[width:].tolist() for row in out]
    n_out = sum(len(o) for o in outputs)
    return (
        PhaseResult(
            f"generate, left-padded static batch of {len(wl.ids)}",
            t[0],
            n_out,
            n_out / t[0],
            rss.peak_mb,
            extra={"padded_prompt_tokens": width * len(wl.ids)},
        ),
        outputs,
    )


# ---------------------------------------------------------------------------- engine


def engine_available() -> str | None:
    """None when the engine can be benchmarked, else why not."""
    try:
        from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig  # noqa: F401
    except ImportError as exc:
        return f"sagellm_backend.engine.cpu.CPUEngine is not importable yet ({exc})"
    return None


def make_engine(model_path: str, args: argparse.Namespace, *, prefix_caching: bool) -> Any:
    from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig

    config = CPUEngineConfig(
        engine_id=f"bench-cpu-{'prefix' if prefix_caching else 'noprefix'}",
        model_path=model_path,
        device="cpu",
        max_batch_size=args.max_batch_size,
        max_new_tokens=args.new_tokens,
        torch_dtype=args.dtype,
        trust_remote_code=False,
        low_cpu_mem_usage=True,
        load_in_8bit=False,
        num_threads=args.threads,
        enable_prefix_caching=prefix_caching,
    )
    return CPUEngine(config)


def make_request(i: int, ids: list[int], new_tokens: int, tag: str) -> Any:
    """A greedy request for exactly ``new_tokens`` tokens on the prompt ids ``ids``.

    The ids go in ``metadata["prompt_token_ids"]`` so the engine computes on exactly the
    tokens ``generate`` gets; the prompt text is only informative.
    """
    from sagellm_protocol import Request

    return Request(
        request_id=f"{tag}-{i}",
        trace_id=f"bench-{tag}",
        model="bench",
        prompt=f"<{len(ids)} prompt tokens>",
        max_tokens=new_tokens,
        stream=False,
        temperature=None,
        top_p=None,
        metadata={"ignore_eos": True, "prompt_token_ids": list(ids)},
    )


async def _engine_concurrent(
    engine: Any, prompts: list[list[int]], n: int, tag: str, stagger_ms: float = 0.0
) -> tuple[Any, float]:
    """Every request at once, or request ``i`` submitted ``i * stagger_ms`` after the first."""
    reqs = [make_request(i, ids, n, tag) for i, ids in enumerate(prompts)]

    async def one(i: int, req: Any) -> Any:
        if stagger_ms:
            await asyncio.sleep(i * stagger_ms / 1000.0)
        return await engine.execute(req)

    t0 = time.perf_counter()
    responses = await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
    return responses, time.perf_counter() - t0


def _check_responses(responses: list[Any], name: str) -> None:
    errors = [r for r in responses if r.finish_reason == "error"]
    if errors:
        raise RuntimeError(f"{name}: {len(errors)} requests failed, first: {errors[0].error}")


def run_engine_concurrent(
    engine: Any, wl: Workload, loop: asyncio.AbstractEventLoop, stagger_ms: float = 0.0
) -> tuple[PhaseResult, list[list[int]]]:
    with RssSampler() as rss:
        responses, secs = loop.run_until_complete(
            _engine_concurrent(engine, wl.ids, wl.new_tokens, "conc", stagger_ms)
        )
    _check_responses(responses, "engine concurrent")
    outputs = [list(r.output_tokens) for r in responses]
    n_out = sum(len(o) for o in outputs)
    ttft = [r.metrics.ttft_ms for r in responses]
    return (
        PhaseResult(
            f"engine, {len(wl.ids)} concurrent requests",
            secs,
            n_out,
            n_out / secs,
            rss.peak_mb,
            ttft_p50_ms=p50(ttft),
            extra={"tpot_ms_p50": p50([r.metrics.tpot_ms for r in responses])},
        ),
        outputs,
    )


def run_engine_single(
    engine: Any, wl: Workload, loop: asyncio.AbstractEventLoop
) -> tuple[PhaseResult, list[list[int]]]:
    outputs: list[list[int]] = []
    ttft: list[float] = []
    with RssSampler() as rss, timed() as t:
        for i, ids in enumerate(wl.ids):
            resp = loop.run_until_complete(
                engine.execute(make_request(i, ids, wl.new_tokens, "single"))
            )
            _check_responses([resp], "engine single")
            outputs.append(list(resp.output_tokens))
            ttft.append(resp.metrics.ttft_ms)
    n_out = sum(len(o) for o in outputs)
    return (
        PhaseResult(
            "engine, one request at a time",
            t[0],
            n_out,
            n_out / t[0],
            rss.peak_mb,
            ttft_p50_ms=p50(ttft),
        ),
        outputs,
    )


def run_prefix(
    engine: Any,
    prompts: list[list[int]],
    system: list[int],
    n: int,
    loop: asyncio.AbstractEventLoop,
    tag: str,
) -> PhaseResult:
    # Warm the cache with the system prompt alone (the first user of a shared prefix),
    # then send every request at once.
    warm = loop.run_until_complete(engine.execute(make_request(0, system, 1, f"{tag}-warm")))
    _check_responses([warm], f"prefix warm-up ({tag})")
    with RssSampler() as rss:
        responses, secs = loop.run_until_complete(_engine_concurrent(engine, prompts, n, tag))
    _check_responses(responses, f"prefix ({tag})")
    n_out = sum(len(r.output_tokens) for r in responses)
    return PhaseResult(
        f"engine, shared {len(system)}-token prefix, prefix cache {tag}",
        secs,
        n_out,
        n_out / secs,
        rss.peak_mb,
        ttft_p50_ms=p50([r.metrics.ttft_ms for r in responses]),
        extra={"prefix_hit_rate": statistics.fmean(r.metrics.prefix_hit_rate for r in responses)},
    )


# ---------------------------------------------------------------------------- report


def compare(name: str, got: list[list[int]], ref: list[list[int]]) -> dict[str, Any]:
    bad = []
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        if g != r:
            first = next((k for k, (a, b) in enumerate(zip(g, r, strict=False)) if a != b), None)
            if first is None:
                first = min(len(g), len(r))
            bad.append({"request": i, "first_diff": first, "got_len": len(g), "ref_len": len(r)})
    if bad:
        print(f"  MISMATCH {name}: {len(bad)}/{len(ref)} requests differ from generate:")
        for b in bad[:8]:
            print(
                f"    request {b['request']}: first differing token at {b['first_diff']} "
                f"(lengths {b['got_len']} vs {b['ref_len']})"
            )
    else:
        print(f"  {name}: greedy tokens identical to generate for all {len(ref)} requests")
    return {"identical": not bad, "mismatches": bad}


def pass_ratio(runs: dict[str, list[PhaseResult]], num: str, den: str) -> float | None:
    """Median over passes of ``num`` tok/s / ``den`` tok/s, each ratio inside one pass."""
    if num not in runs or den not in runs:
        return None
    values = [a.tok_per_s / b.tok_per_s for a, b in zip(runs[num], runs[den], strict=True)]
    return float(statistics.median(values))


def print_table(runs: dict[str, list[PhaseResult]]) -> None:
    """Median tok/s per phase; ratio columns are per-pass ratios' medians."""
    hdr = f"{'phase':<50} {'tok/s':>8} {'vs seq':>7} {'vs static':>9} {'TTFT p50':>9} {'RSS MB':>7}"
    print()
    print(hdr)
    print("-" * len(hdr))
    for key, passes in runs.items():
        r = median_run(passes)
        vs_seq = pass_ratio(runs, key, "sequential")
        vs_static = pass_ratio(runs, key, "static")
        ttft = f"{r.ttft_p50_ms:.1f}" if r.ttft_p50_ms is not None else "-"
        print(
            f"{r.name:<50} {r.tok_per_s:>8.1f} "
            f"{f'{vs_seq:.2f}x' if vs_seq else '-':>7} "
            f"{f'{vs_static:.2f}x' if vs_static else '-':>9} {ttft:>9} {r.peak_rss_mb:>7.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF causal LM path or hub id (default: bench-llama)")
    ap.add_argument("--quick", action="store_true", help="8 requests, 16 new tokens")
    ap.add_argument("--requests", type=int, help="number of requests (default 16, quick 8)")
    ap.add_argument("--new-tokens", type=int, help="new tokens per request (default 64)")
    ap.add_argument("--prefix-len", type=int, default=512, help="shared system prompt tokens")
    ap.add_argument("--repeat", type=int, default=1, help="N interleaved passes; medians")
    ap.add_argument("--threads", type=int, default=_THREADS_DEFAULT, help="torch threads")
    ap.add_argument("--dtype", default="float32", help="float32|bfloat16|float16|auto")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-engine", action="store_true", help="baselines only")
    ap.add_argument("--skip-prefix", action="store_true", help="no prefix-caching scenario")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    args.requests = args.requests or (8 if args.quick else 16)
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    if args.requests < 1 or args.new_tokens < 1 or args.prefix_len < 1 or args.threads < 1:
        ap.error("--requests, --new-tokens, --prefix-len and --threads must be >= 1")

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    from sagellm_backend.engine.hf.loader import load_model_and_tokenizer
    from sagellm_backend.testing.tiny_models import CORPUS, ensure_tiny_model

    t0 = time.perf_counter()
    model_path = args.model or str(alone(lambda: ensure_tiny_model("bench-llama")))
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, tokenizer = alone(
        lambda: load_model_and_tokenizer(
            model_path,
            device="cpu",
            dtype=args.dtype,
            device_map=None,
            load_in_8bit=False,
            load_in_4bit=False,
            trust_remote_code=False,
        )
    )
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())

    rng = random.Random(args.seed)
    vocab_words = [w for w in CORPUS.split() if w.isprintable()]
    lengths = [rng.randint(16, 200) for _ in range(args.requests)]
    texts = make_texts(tokenizer, rng, lengths, vocab_words)
    wl = Workload(texts, encode(tokenizer, texts), args.new_tokens)
    prompt_tokens = sum(len(i) for i in wl.ids)
    print(
        f"model {model_path} ({n_params / 1e6:.1f}M params, {args.dtype}), torch "
        f"{torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; build "
        f"{build_s:.1f}s, load {load_s:.1f}s"
    )
    load_avg = os.getloadavg()
    print(
        f"load average {load_avg[0]:.2f} (figures are only meaningful on an otherwise idle "
        f"machine: compare ratios within one run)"
    )
    print(
        f"workload: {args.requests} requests, prompts {min(map(len, wl.ids))}-"
        f"{max(map(len, wl.ids))} tokens ({prompt_tokens} in all), {args.new_tokens} new "
        f"tokens each, greedy, eos ignored; repeat {args.repeat}"
    )

    # Warm-up: first calls pay one-off allocation and kernel selection costs.
    gen_warm = greedy_config(model, tokenizer, 2)

    def warm_up() -> None:
        with torch.inference_mode():
            model.generate(torch.tensor([wl.ids[0]]), generation_config=gen_warm)

    alone(warm_up)

    engine_note = "skipped (--skip-engine)" if args.skip_engine else engine_available()
    loop = asyncio.new_event_loop()
    engines: dict[str, Any] = {}
    if engine_note is None:
        # The throughput phases use the engine with the prefix cache off, so every pass
        # recomputes every prompt as generate does; a second engine has it on.
        engines["off"] = make_engine(model_path, args, prefix_caching=False)
        if not args.skip_prefix:
            engines["on"] = make_engine(model_path, args, prefix_caching=True)
        for eng in engines.values():  # loads the model once (restarts reuse it)
            with serving(eng, loop, wl.ids[0]):
                pass
    else:
        print(f"\nengine section skipped: {engine_note}")

    # Phases are interleaved pass by pass, so load drift on a shared machine hits every
    # phase alike; each ratio is computed inside a pass and its median reported.
    runs: dict[str, list[PhaseResult]] = {}
    outputs: dict[str, list[list[int]]] = {}
    system_text = make_texts(tokenizer, rng, [args.prefix_len], vocab_words)[0]
    system_ids = list(tokenizer(system_text)["input_ids"])
    try:
        for i in range(args.repeat):
            print(f"pass {i + 1}/{args.repeat} ...", flush=True)
            res, outputs["sequential"] = alone(lambda: run_sequential(model, tokenizer, wl))
            runs.setdefault("sequential", []).append(res)
            res, outputs["static"] = alone(lambda: run_static(model, tokenizer, wl))
            runs.setdefault("static", []).append(res)
            if "off" in engines:
                with serving(engines["off"], loop, wl.ids[0]) as eng:
                    res, outputs["engine_concurrent"] = run_engine_concurrent(eng, wl, loop)
                runs.setdefault("engine_concurrent", []).append(res)
                with serving(engines["off"], loop, wl.ids[0]) as eng:
                    res, outputs["engine_single"] = run_engine_single(eng, wl, loop)
                runs.setdefault("engine_single", []).append(res)
            if "on" in engines:
                # Fresh user questions each pass (same system prompt) so earlier passes'
                # prompts are not cache hits for later ones.
                pass_rng = random.Random(args.seed * 1000 + i)
                prompts = prefix_prompts(tokenizer, pass_rng, vocab_words, system_ids, args)
                for tag in ("off", "on"):
                    with serving(engines[tag], loop, wl.ids[0]) as eng:
                        res = run_prefix(eng, prompts, system_ids, args.new_tokens, loop, tag)
                    runs.setdefault(f"prefix_{tag}", []).append(res)
    finally:
        loop.close()

    print()
    checks: dict[str, Any] = {}
    ref = outputs["sequential"]
    for key, label in (
        ("static", "static batch"),
        ("engine_concurrent", "engine concurrent"),
        ("engine_single", "engine one at a time"),
    ):
        if key in outputs:
            checks[key] = compare(label, outputs[key], ref)
    phases = {k: median_run(v) for k, v in runs.items()}
    print_table(runs)
    summary = summarize(runs)
    for k, v in summary.items():
        print(f"  {k}: {v}")
    if args.json:
        result = {
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "model_path": model_path,
            "model_params": n_params,
            "prompt_tokens": prompt_tokens,
            "prompt_lengths": [len(i) for i in wl.ids],
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": sys.version.split()[0],
                "torch": torch.__version__,
            },
            "load_s": load_s,
            "load_avg_start": load_avg,
            "system_prompt_tokens": len(system_ids),
            "load_avg_end": os.getloadavg(),
            "engine": engine_note or "measured",
            "phases": {k: asdict(v) for k, v in phases.items()},
            "passes": {k: [asdict(r) for r in v] for k, v in runs.items()},
            "checks": checks,
            "summary": summary,
        }
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def prefix_prompts(
    tokenizer: Any,
    rng: random.Random,
    vocab_words: list[str],
    system: list[int],
    args: argparse.Namespace,
) -> list[list[int]]:
    """One request per user question (16-64 tokens), each starting with ``system``'s ids."""
    questions = make_texts(
        tokenizer, rng, [rng.randint(16, 64) for _ in range(args.requests)], vocab_words
    )
    tails = [list(tokenizer("\n" + q, add_special_tokens=False)["input_ids"]) for q in questions]
    return [system + t for t in tails]


def summarize(runs: dict[str, list[PhaseResult]]) -> dict[str, Any]:
    """Median over passes of each ratio, every ratio taken inside one pass."""

    def ratio(num: str, den: str, attr: str = "tok_per_s") -> float | None:
        if num not in runs or den not in runs:
            return None
        values = [
            getattr(a, attr) / getattr(b, attr)
            for a, b in zip(runs[num], runs[den], strict=True)
            if getattr(a, attr) and getattr(b, attr)
        ]
        return round(float(statistics.median(values)), 3) if values else None

    out: dict[str, Any] = {
        "static_vs_sequential": ratio("static", "sequential"),
        "engine_vs_static": ratio("engine_concurrent", "static"),
        "engine_vs_sequential": ratio("engine_concurrent", "sequential"),
        "engine_single_vs_generate": ratio("engine_single", "sequential"),
        "prefix_ttft_speedup": ratio("prefix_off", "prefix_on", "ttft_p50_ms"),
    }
    if "prefix_on" in runs:
        out["prefix_hit_rate"] = round(
            statistics.median(r.extra["prefix_hit_rate"] for r in runs["prefix_on"]), 3
        )
    return {k: v for k, v in out.items() if v is not None}


if __name__ == "__main__":
    sys.exit(main())
