"""What 8-bit and 4-bit weights save and cost on the CPU: one run, four engines side by side.

Workload (the one of ``bench_hf_engine.py``): 16 concurrent requests with seeded prompts of
16-200 tokens and exactly 64 new tokens each (greedy, eos ignored), torch with 2 threads,
on the ``bench-llama`` geometry (hidden 512, intermediate 1536, 8 layers, 8/4 heads, vocab
8000, ~33M parameters) with its weights drawn at init 0.1 (DESIGN.md: at the default 0.02 a
random model's logits are nearly tied, so greedy agreement would say little).  The model
is built once and cached next to the tiny models.

Variants, each a ``CPUEngine`` (prefix cache off, so every pass computes every prompt):

* ``fp32``: float32 weights and activations (the baseline);
* ``bf16``: bfloat16 weights and activations;
* ``int8``: bitsandbytes LLM.int8 linear layers, the rest in ``--quant-dtype``;
* ``nf4``: bitsandbytes 4-bit nf4 (double quantisation) linear layers computing in
  ``--quant-dtype``, the rest in ``--quant-dtype``.

For each: output tokens/s (median of ``--repeat`` interleaved passes, and its ratio to
fp32 inside each pass), the weight memory the engine reports (``get_info()``: all
parameters, buffers and quantisation state; and the part in linear layers), and greedy
agreement with fp32: the share of requests whose tokens are identical and the mean length
of the common prefix.  No exact-match assertion: quantised outputs may differ.

Run:  python benchmarks/bench_quant.py [--quick] [--repeat N] [--variants fp32,int8]
      [--model PATH] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("fp32", "bf16", "int8", "nf4")
_BUILD_VERSION = 1


def bench_model(init: float, seed: int) -> Path:
    """The bench-llama geometry with weights drawn at ``init`` (built once, then cached)."""
    from sagellm_backend.testing.tiny_models import default_cache_root, ensure_tiny_model

    base = ensure_tiny_model("bench-llama")
    final = default_cache_root() / f"bench-llama-init{init:g}-s{seed}-v{_BUILD_VERSION}"
    if (final / "model.safetensors").is_file():
        return final
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(base)
    config.initializer_range = init
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    finally:
        torch.random.set_rng_state(state)
    model.generation_config = transformers.GenerationConfig.from_pretrained(base)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (base / name).is_file():
            shutil.copy(base / name, tmp / name)
    try:
        os.rename(tmp, final)
    except OSError:  # another process published it first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def variant_fields(variant: str, quant_dtype: str) -> dict[str, Any]:
    """CPUEngineConfig fields of one variant."""
    if variant == "fp32":
        return {"torch_dtype": "float32"}
    if variant == "bf16":
        return {"torch_dtype": "bfloat16"}
    if variant == "int8":
        return {"torch_dtype": quant_dtype, "load_in_8bit": True}
    if variant == "nf4":
        return {"torch_dtype": quant_dtype, "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    raise ValueError(f"unknown variant {variant!r}; valid: {VARIANTS}")


def agreement(got: list[list[int]], ref: list[list[int]]) -> dict[str, float]:
    """Share of identical requests and mean common-prefix length against ``ref``."""
    prefixes = []
    for a, b in zip(got, ref, strict=True):
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        prefixes.append(n)
    same = sum(a == b for a, b in zip(got, ref, strict=True))
    return {
        "identical_share": same / len(ref),
        "mean_common_prefix": statistics.fmean(prefixes),
        "new_tokens": float(statistics.fmean(len(r) for r in ref)),
    }


def logit_error(model_path: str, variant: str, quant_dtype: str, prompts: list[list[int]]) -> float:
    """Relative error of the prompts' next-token logits against fp32 (one forward each).

    A separate load of the variant (the engine's model is busy being served); the figure
    is ``||logits - logits_fp32|| / ||logits_fp32||`` over every prompt position.
    """
    import torch

    from sagellm_backend.engine.hf.loader import load_model_and_tokenizer

    def logits(fields: dict[str, Any]) -> list[Any]:
        dtype = fields.pop("torch_dtype")
        model, _ = load_model_and_tokenizer(model_path, device="cpu", dtype=dtype, **fields)
        with torch.inference_mode():
            return [model(torch.tensor([ids])).logits[0].float() for ids in prompts]

    ref = logits(variant_fields("fp32", quant_dtype))
    got = logits(variant_fields(variant, quant_dtype))
    num = sum(float((g - r).norm() ** 2) for g, r in zip(got, ref, strict=True))
    den = sum(float(r.norm() ** 2) for r in ref)
    return (num / den) ** 0.5


async def run_pass(engine: Any, prompts: list[list[int]], n: int, tag: str) -> tuple[float, Any]:
    from bench_hf_engine import make_request

    reqs = [make_request(i, ids, n, tag) for i, ids in enumerate(prompts)]
    t0 = time.perf_counter()
    responses = await asyncio.gather(*(engine.execute(r) for r in reqs))
    secs = time.perf_counter() - t0
    failed = [r for r in responses if r.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"{tag}: {len(failed)} requests failed, first: {failed[0].error}")
    return secs, responses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: bench-llama at --init)")
    ap.add_argument("--quick", action="store_true", help="8 requests, 16 new tokens")
    ap.add_argument("--requests", type=int, help="number of requests (default 16, quick 8)")
    ap.add_argument("--new-tokens", type=int, help="new tokens per request (default 64)")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved passes; medians")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument(
        "--quant-dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the unquantised layers and 4-bit compute of int8/nf4",
    )
    ap.add_argument("--init", type=float, default=0.1, help="initializer_range of the model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        ap.error(f"--variants: unknown {bad}; valid: {VARIANTS}")
    if "fp32" not in variants:
        variants.insert(0, "fp32")  # the baseline of every ratio
    args.requests = args.requests or (8 if args.quick else 16)
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    if min(args.requests, args.new_tokens, args.repeat, args.threads) < 1:
        ap.error("--requests, --new-tokens, --repeat and --threads must be >= 1")

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    from bench_hf_engine import encode, make_request, make_texts
    from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig
    from sagellm_backend.engine.hf.loader import load_model_and_tokenizer
    from sagellm_backend.testing.tiny_models import CORPUS

    model_path = args.model or str(bench_model(args.init, args.seed))
    _, tokenizer = load_model_and_tokenizer(model_path, device="cpu", dtype="float32")
    rng = random.Random(args.seed)
    vocab_words = [w for w in CORPUS.split() if w.isprintable()]
    lengths = [rng.randint(16, 200) for _ in range(args.requests)]
    prompts = encode(tokenizer, make_texts(tokenizer, rng, lengths, vocab_words))
    print(
        f"model {model_path}, torch {torch.__version__}, {args.threads} threads, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (a shared machine: "
        "compare ratios inside this run only)"
    )
    print(
        f"workload: {args.requests} requests, prompts {min(map(len, prompts))}-"
        f"{max(map(len, prompts))} tokens ({sum(map(len, prompts))} in all), "
        f"{args.new_tokens} new tokens each, greedy, eos ignored; repeat {args.repeat}"
    )

    loop = asyncio.new_event_loop()
    engines: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        for v in variants:
            t0 = time.perf_counter()
            engine = CPUEngine(
                CPUEngineConfig(
                    engine_id=f"bench-quant-{v}",
                    model_path=model_path,
                    max_batch_size=args.requests,
                    max_new_tokens=args.new_tokens,
                    num_threads=args.threads,
                    enable_prefix_caching=False,
                    kv_cache_memory_bytes=256 << 20,
                    **variant_fields(v, args.quant_dtype),
                )
            )
            loop.run_until_complete(engine.start())
            loop.run_until_complete(engine.execute(make_request(0, prompts[0], 2, "warm")))
            engines[v] = engine
            info = engine.get_info()
            results[v] = {
                "start_s": time.perf_counter() - t0,
                "runner": info["runner"],
                "weight_memory": info["weight_memory"],
                "passes_s": [],
                "ratio_to_fp32": [],
            }
        outputs: dict[str, list[list[int]]] = {}
        for i in range(args.repeat):
            print(f"pass {i + 1}/{args.repeat} ...", flush=True)
            for v in variants:
                secs, responses = loop.run_until_complete(
                    run_pass(engines[v], prompts, args.new_tokens, f"{v}-{i}")
                )
                results[v]["passes_s"].append(secs)
                outputs[v] = [list(r.output_tokens) for r in responses]
            for v in variants:
                results[v]["ratio_to_fp32"].append(
                    results["fp32"]["passes_s"][-1] / results[v]["passes_s"][-1]
                )
    finally:
        for engine in engines.values():
            loop.run_until_complete(engine.stop())
        loop.close()

    n_out = args.requests * args.new_tokens
    base_w = results["fp32"]["weight_memory"]
    print(
        f"\n{'variant':8} {'tok/s':>7} {'vs fp32':>8} {'weights MiB':>12} {'vs fp32':>8} "
        f"{'linear MiB':>11} {'vs fp32':>8} {'identical':>10} {'prefix':>12} {'logit err':>10}"
    )
    for v in variants:
        r = results[v]
        w = r["weight_memory"]
        r["tok_per_s"] = n_out / statistics.median(r["passes_s"])
        r["ratio"] = statistics.median(r["ratio_to_fp32"])
        r["agreement"] = agreement(outputs[v], outputs["fp32"])
        r["logit_rel_err"] = logit_error(model_path, v, args.quant_dtype, prompts[:4])
        a = r["agreement"]
        print(
            f"{v:8} {r['tok_per_s']:7.0f} {r['ratio']:7.2f}x "
            f"{w['total_bytes'] / 2**20:12.1f} {w['total_bytes'] / base_w['total_bytes']:7.2f}x "
            f"{w['linear_bytes'] / 2**20:11.1f} "
            f"{w['linear_bytes'] / base_w['linear_bytes']:7.2f}x "
            f"{a['identical_share']:9.0%} {a['mean_common_prefix']:5.1f}/{a['new_tokens']:<5.0f} "
            f"{r['logit_rel_err']:10.3f}"
        )
    print(
        "weights: parameters, buffers and quantisation state the engine holds (lm_head and "
        "embeddings stay unquantised); linear: the linear layers' part; identical/prefix: "
        "greedy agreement with fp32; logit err: relative error of the prompt logits vs fp32 "
        "(4 prompts, a separate load)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "results": results}, indent=2), encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
