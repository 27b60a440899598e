"""Sweep transformers causal-LM architectures through CPUEngine.

For every ``model_type`` of ``transformers``' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (with
``--skip-covered``, minus those ``tests/engine/hf/test_arch_sweep.py`` and
``tests/engine/hf/test_any_model.py`` already cover) this script:

1. builds a tiny random model from the type's default config, shrunk automatically
   (hidden 64, 2-4 layers, 4 heads / 2 KV heads, head_dim 16, vocab 1024, few experts,
   sliding windows of 16, ...; per-type overrides in :data:`OVERRIDES`), saved with the
   tokenizer of ``tiny-llama``;
2. runs ``model.generate`` (greedy, EOS ignored) on four prompts of 1, 7, 40 and 23 token
   ids, each alone, as the reference;
3. starts a ``CPUEngine`` on it (``--dtype``, default float32; ``--max-batch-size``, default 4),
   submits the four requests together, compares the tokens with the reference, checks that
   the KV pool is empty afterwards, and stops the engine.

Each type is classified ``ok``, ``mismatch``, ``engine-error``, ``start-error``,
``not-buildable``, ``generate-fails`` or ``timeout``; the runner the engine picked is
recorded. The types run in a worker subprocess (one at a time, one torch thread) watched by
this process, so a hang or a crash costs one type, not the sweep.

Run (from the repository root, in its venv)::

    python scripts/arch_sweep.py --out /tmp/arch_sweep.json          # the whole sweep
    python scripts/arch_sweep.py --only mamba2 bamba                   # some types
    python scripts/arch_sweep.py --skip-covered                        # what tests miss

It writes the results as JSON to ``--out`` (default ``/tmp/arch_sweep.json``; the worker's
progress lines go to ``<out>.parts.jsonl``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

#: Types covered by tests/engine/hf/test_arch_sweep.py (CASES) and test_any_model.py.
COVERED = frozenset(
    {
        # test_arch_sweep.py CASES
        "qwen3",
        "qwen3_moe",
        "phi",
        "gemma3_text",
        "olmo2",
        "cohere",
        "gpt_bigcode",
        "gptj",
        "codegen",
        "gemma",
        "olmo",
        "granite",
        "persimmon",
        "helium",
        "glm",
        "smollm3",
        "stablelm",
        "xglm",
        "falcon",
        "mpt",
        "biogpt",
        "falcon_mamba",
        "lfm2",
        "jamba",
        "bart",
        "whisper",
        "deepseek_v32",
        "deepseek_v4",
        "gemma4_text",
        # REFUSED there (the engine refuses them at start, with the reason)
        "openai-gpt",
        "rwkv",
        "xlm",
        # test_any_model.py (tiny_models catalogue)
        "gpt2",
        "llama",
        "mistral",
        "qwen2",
        "phi3",
        "gemma2",
        "gpt_neox",
        "opt",
        "starcoder2",
        "mixtral",
        "bloom",
        "deepseek_v3",
        "mamba",
        "qwen3_next",
        "recurrent_gemma",
    }
)

#: (prompt tokens, new tokens) of the four concurrent requests.
SIZES = ((1, 8), (7, 12), (40, 10), (23, 9))

CLASSES = (
    "ok",
    "mismatch",
    "engine-error",
    "start-error",
    "timeout",
    "generate-fails",
    "not-buildable",
)

# ---------------------------------------------------------------------- tiny configs
_WIDTH = 64
#: attribute -> tiny value; applied where the attribute exists as an int larger than it.
SHRINK: dict[str, int] = {
    # widths
    **dict.fromkeys(
        (
            "hidden_size",
            "d_model",
            "n_embd",
            "embed_dim",
            "embedding_size",
            "embedding_dim",
            "emb_dim",
            "word_embed_proj_dim",
            "attention_hidden_size",
            "lru_width",
            "input_embedding_size",
            "output_embedding_size",
            "backbone_hidden_size",
            "router_hidden_size",
        ),
        _WIDTH,
    ),
    # MLP widths
    **dict.fromkeys(
        (
            "intermediate_size",
            "ffn_dim",
            "n_inner",
            "ffn_hidden_size",
            "d_ff",
            "dim_ff",
            "dff",
            "feed_forward_size",
            "decoder_ffn_dim",
            "encoder_ffn_dim",
            "intermediate_size_mlp",
            "mlp_only_intermediate_size",
            "first_dense_intermediate_size",
            "dense_intermediate_size",
        ),
        128,
    ),
    **dict.fromkeys(
        (
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "shared_intermediate_size",
            "shared_experts_intermediate_size",
            "moe_shared_expert_intermediate_size",
            "expert_ffn_hidden_size",
        ),
        32,
    ),
    # depth
    **dict.fromkeys(
        (
            "num_hidden_layers",
            "n_layer",
            "num_layers",
            "n_layers",
            "decoder_layers",
            "encoder_layers",
            "num_decoder_layers",
            "num_encoder_layers",
        ),
        2,
    ),
    # heads
    **dict.fromkeys(
        (
            "num_attention_heads",
            "n_head",
            "n_heads",
            "num_heads",
            "attention_heads",
            "decoder_attention_heads",
            "encoder_attention_heads",
            "num_decoder_attention_heads",
            "num_encoder_attention_heads",
            "swa_num_attention_heads",
            "linear_num_value_heads",
            "linear_num_heads",
            "index_n_heads",
            "index_num_heads",
        ),
        4,
    ),
    **dict.fromkeys(
        (
            "num_key_value_heads",
            "num_kv_heads",
            "n_kv_heads",
            "multi_query_group_num",
            "num_query_groups",
            "swa_num_key_value_heads",
            "linear_num_key_heads",
        ),
        2,
    ),
    **dict.fromkeys(
        (
            "head_dim",
            "attention_head_dim",
            "attention_head_size",
            "kv_channels",
            "d_head",
            "dim_head",
            "swa_head_dim",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_head_dim",
            "index_head_dim",
            "v_head_dim",
            "qk_head_dim",
            "hidden_size_per_layer_input",
        ),
        16,
    ),
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "rotary_dim": 8,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "o_lora_rank": 16,
    # experts
    **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"), 4),
    **dict.fromkeys(
        (
            "num_experts_per_tok",
            "moe_topk",
            "top_k",
            "num_selected_experts",
            "moe_k",
            "num_experts_per_token",
        ),
        2,
    ),
    **dict.fromkeys(
        (
            "n_shared_experts",
            "num_shared_experts",
            "moe_num_shared_experts",
            "n_group",
            "topk_group",
            "num_expert_group",
        ),
        1,
    ),
    # state sizes
    **dict.fromkeys(("mamba_d_state", "state_size", "ssm_state_size"), 8),
    # context
    **dict.fromkeys(
        (
            "max_position_embeddings",
            "n_positions",
            "n_ctx",
            "max_seq_len",
            "seq_length",
            "max_sequence_length",
            "original_max_position_embeddings",
            "max_target_positions",
        ),
        1024,
    ),
    **dict.fromkeys(
        (
            "sliding_window",
            "sliding_window_size",
            "attention_window_size",
            "local_attention_window_len",
        ),
        16,
    ),
    # vocabularies
    **dict.fromkeys(("vocab_size", "vocab_size_per_layer_input", "unpadded_vocab_size"), 1024),
}

#: Per-layer list attributes whose pattern picks the kept layers (first one found wins).
_PATTERN_KEYS = (
    "layer_types",
    "layers_block_type",
    "block_types",
    "attention_types",
    "mlp_layer_types",
    "hybrid_override_pattern",
)
#: Depth attributes (the first one found is the model's layer count).
_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")

#: model_type -> config fields set after the generic shrink (top level; ``text_config.X``
#: for the text sub-config).
#: Gemma 4: a full-attention layer with its own (wider) head_dim, as its every 6th layer.
_GEMMA4_TEXT: dict[str, Any] = {
    "num_hidden_layers": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "per_layer_config": {"01": {"head_dim": 32}},
    "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": 1024,
}

#: dots3: indexed MLA layers beside sliding layers with other head counts.
_DOTS3_TEXT: dict[str, Any] = {
    "num_hidden_layers": 2,
    "layer_types": ["indexed_attention", "sliding_attention"],
    "mlp_layer_types": ["dense", "sparse"],
    "per_layer_config": {
        "01": {"num_attention_heads": 2, "num_key_value_heads": 2, "qk_nope_head_dim": 8}
    },
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "index_n_heads": 4,
    "index_head_dim": 16,
    "index_topk": 16,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
}

OVERRIDES: dict[str, dict[str, Any]] = {
    "gemma4_text": _GEMMA4_TEXT,
    "gemma4_unified_text": {
        k: v for k, v in _GEMMA4_TEXT.items() if not k.endswith("_per_layer_input")
    },
    "gemma4": {f"text_config.{k}": v for k, v in _GEMMA4_TEXT.items()},
    "dots3_note_text": _DOTS3_TEXT,
    # nested attention/FFN configs given whole (the defaults do not survive save/load)
    "dbrx": {
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2},
    },
    "mamba2": {"num_heads": 8, "head_dim": 16, "expand": 2, "n_groups": 1, "chunk_size": 16},
    "falcon_h1": {
        "mamba_d_ssm": 128,
        "mamba_n_heads": 8,
        "mamba_d_head": 16,
        "mamba_n_groups": 1,
    },
    "nemotron_h": {"mamba_num_heads": 8, "mamba_head_dim": 16, "n_groups": 1},
    "zamba": {"attention_hidden_size": 128},
    "zamba2": {"attention_hidden_size": 128, "attention_head_dim": 32, "mamba_headdim": 16},
    "rwkv": {"attention_hidden_size": 64, "intermediate_size": 128},
    # defaults that do not build in this transformers (None where a number is needed)
    "nemotron": {"num_key_value_heads": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "deepseek_v2": {"num_experts_per_tok": 2, "n_group": 1, "topk_group": 1},
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 32,
        "indexer_compress_ratio": 4,
    },
    "qwen4_exp": {
        "text_config.indexer_n_heads": 2,
        "text_config.indexer_kv_heads": 1,
        "text_config.indexer_head_dim": 16,
        "text_config.indexer_budget": 32,
        "text_config.indexer_compress_ratio": 4,
    },
    "dory": {
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
        "n_input_layers": 1,
        "n_recurrent_layers": 2,
        "n_output_layers": 1,
    },
    "kolibri1_1": {
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "indexed_attention"],
        "kv_source_layers": [0, 1],
        "index_layers": [1],
        "mlp_only_layers": [0],
        "index_num_heads": 2,
    },
    "bamba": {
        "mamba_n_heads": 8,
        "mamba_d_head": 16,
        "mamba_n_groups": 1,
        "mamba_expand": 2,
        "attn_layer_indices": [1],
    },
    "granitemoehybrid": {
        "mamba_n_heads": 8,
        "mamba_d_head": 16,
        "mamba_n_groups": 1,
        "layer_types": ["mamba", "attention"],
    },
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "reformer": {"axial_pos_embds_dim": [16, 48], "axial_pos_shape": [32, 32]},
}


def _is_config(value: Any) -> bool:
    from transformers import PretrainedConfig

    return isinstance(value, PretrainedConfig)


def _get(cfg: Any, key: str) -> Any:
    """``cfg.key``, or None where reading it raises (per-layer attributes, properties)."""
    try:
        return getattr(cfg, key, None)
    except Exception:
        return None


def _index_list(key: str, value: Any, old_n: int) -> bool:
    """Whether ``value`` looks like a list of layer indices (not one entry per layer)."""
    return (
        isinstance(value, list)
        and bool(value)
        and len(value) != old_n
        and ("layer" in key or "idx" in key)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and all(0 <= v < old_n for v in value)
    )


def _layer_pick(cfg: Any, old_n: int, names: set[str]) -> list[int]:
    """Indices of the layers to keep: the first of each distinct per-layer pattern."""
    lists = [
        _get(cfg, k)
        for k in _PATTERN_KEYS
        if k in names and isinstance(_get(cfg, k), list) and len(_get(cfg, k)) == old_n
    ]
    for k in sorted(names):  # membership in a layer-index list is part of the pattern
        value = _get(cfg, k)
        if _index_list(k, value, old_n):
            lists.append([i in value for i in range(old_n)])
    pattern = _get(cfg, "hybrid_override_pattern")
    if isinstance(pattern, str) and len(pattern) == old_n:
        lists.append(list(pattern))
    if not lists:
        return [0, 1] if old_n >= 2 else list(range(old_n))
    seen: dict[tuple[Any, ...], int] = {}
    for i in range(old_n):
        key = tuple(repr(lst[i]) for lst in lists)
        seen.setdefault(key, i)
    picks = sorted(seen.values())[:4]
    i = 0
    while len(picks) < min(2, old_n):
        if i not in picks:
            picks.append(i)
        i += 1
    return sorted(picks)


def _shrink(cfg: Any, changed: dict[str, Any], prefix: str = "") -> None:
    """Shrink ``cfg`` in place (and its sub-configs); record what changed in ``changed``."""
    attrs = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    names = {k for k in set(attrs) | set(vars(cfg)) if not k.startswith("_")}
    old_heads = _get(cfg, "num_attention_heads")
    old_kv = _get(cfg, "num_key_value_heads")
    old_n = None
    for key in _DEPTH_KEYS:
        if isinstance(_get(cfg, key), int):
            old_n = _get(cfg, key)
            break
    picks = _layer_pick(cfg, old_n, names) if old_n else []
    rope = _get(cfg, "qk_rope_head_dim")
    mla_head = isinstance(rope, int) and _get(cfg, "head_dim") == rope

    def put(key: str, value: Any) -> None:
        try:
            setattr(cfg, key, value)
        except Exception:  # a read-only property
            return
        changed[prefix + key] = value

    for key in sorted(names):
        value = _get(cfg, key)
        if key == "head_dim" and value is None and old_heads:
            put(key, 16)
            continue
        if _is_config(value):
            _shrink(value, changed, f"{prefix}{key}.")
            continue
        target = SHRINK.get(key)
        if target is None or isinstance(value, bool) or not isinstance(value, int):
            continue
        if key in _DEPTH_KEYS or key in ("encoder_layers", "num_encoder_layers"):
            target = max(2, len(picks)) if picks else target
        if key == "num_key_value_heads" and old_kv is not None and old_kv == old_heads:
            target = 4  # keep MHA models MHA
        if key == "head_dim" and mla_head:
            target = SHRINK["qk_rope_head_dim"]  # MLA: head_dim is the rotary part
        if value > target or (key in ("vocab_size", "head_dim") and value != target):
            put(key, target)
    # Per-layer lists follow the kept layers; layer-index lists are remapped.
    if old_n:
        for key in sorted(names):
            value = _get(cfg, key)
            if isinstance(value, str) and key == "hybrid_override_pattern" and len(value) == old_n:
                put(key, "".join(value[i] for i in picks))
            if not isinstance(value, list) or not value:
                continue
            if len(value) == old_n:
                put(key, [value[i] for i in picks])
            elif _index_list(key, value, old_n):
                put(key, [j for j, i in enumerate(picks) if i in value])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in names:
            put(key, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}[key])
    if "tie_word_embeddings" in names:
        put("tie_word_embeddings", False)
    if "is_decoder" in names and not prefix:
        put("is_decoder", True)
    if "use_mamba_kernels" in names:
        put("use_mamba_kernels", False)


def tiny_config(model_type: str) -> tuple[Any, dict[str, Any]]:
    """The tiny config of ``model_type`` and the fields changed from its defaults."""
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type)
    changed: dict[str, Any] = {}
    _shrink(cfg, changed)
    for key, value in OVERRIDES.get(model_type, {}).items():
        target = cfg
        *path, last = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
        changed[key] = value
    # Re-run the config's own __init__/validation on the shrunk values.
    cfg = type(cfg).from_dict(cfg.to_dict())
    return cfg, changed


# ---------------------------------------------------------------------- one type
def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:400] if text else type(exc).__name__


def _tb_tail(exc: BaseException, n: int = 8) -> list[str]:
    lines = "".join(traceback.format_exception(exc)).rstrip().splitlines()
    return lines[-n:]


def _build(model_type: str, root: Path) -> tuple[str, dict[str, Any]]:
    import torch
    import transformers

    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    cfg, changed = tiny_config(model_type)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float32).eval()
    # A plain generation config: the defaults some types carry (forced_eos_token_id,
    # no_repeat_ngram_size, suppress_tokens, ...) would change the reference tokens.
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=0, decoder_start_token_id=None
    )
    out = root / model_type
    model.save_pretrained(out, safe_serialization=True)
    src = Path(ensure_tiny_model("tiny-llama"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    return str(out), changed


def _dtype() -> str:
    """The dtype models run in (``--dtype``, passed to the worker in the environment)."""
    return os.environ.get("ARCH_SWEEP_DTYPE", "float32")


def _reference(path: str, work: list[tuple[list[int], int]]) -> list[list[int]]:
    """Greedy tokens of ``model.generate`` on each request alone (the tests' Reference)."""
    import torch

    from sagellm_backend.engine.hf.loader import load_model_and_tokenizer
    from sagellm_backend.errors import ConfigError
    from sagellm_backend.testing.reference import greedy_reference

    try:
        model, _ = load_model_and_tokenizer(path, device="cpu", dtype=_dtype())
    except ConfigError:  # our loader refuses it: the engine will say so at start
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, _dtype())
        )
        model.eval()
    out = [greedy_reference(model, ids, n) for ids, n in work]
    del model
    return out


def _request(ids: list[int], n: int, rid: str) -> Any:
    from sagellm_protocol import Request

    return Request(
        request_id=rid,
        trace_id=f"trace-{rid}",
        model="tiny",
        prompt="ids",
        max_tokens=n,
        stream=False,
        temperature=None,
        top_p=None,
        metadata={"ignore_eos": True, "prompt_token_ids": ids},
    )


async def _serve(
    path: str, work: list[tuple[list[int], int]], rec: dict[str, Any], emit: Any
) -> None:
    """Run ``work`` concurrently on a CPUEngine; fill ``rec`` (runner, status, details)."""
    from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig

    engine = CPUEngine(
        CPUEngineConfig(
            engine_id=f"sweep-{rec['model_type']}",
            model_path=path,
            max_batch_size=int(os.environ.get("ARCH_SWEEP_BATCH", "4")),
            max_new_tokens=64,
            torch_dtype=_dtype(),
        )
    )
    try:
        try:
            await asyncio.wait_for(engine.start(), 120)
        except Exception as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else "start-error"
            rec.update(status=kind, error=_short(exc), traceback=_tb_tail(exc))
            return
        rec["runner"] = engine.runner_name
        emit({"model_type": rec["model_type"], "phase": "engine", "runner": engine.runner_name})
        reqs = [_request(ids, n, f"{rec['model_type']}-{i}") for i, (ids, n) in enumerate(work)]
        try:
            responses = await asyncio.wait_for(
                asyncio.gather(*(engine.execute(r) for r in reqs)), 120
            )
        except TimeoutError as exc:
            rec.update(status="timeout", error="requests did not finish in 120 s")
            rec["traceback"] = _tb_tail(exc)
            return
        except Exception as exc:
            rec.update(status="engine-error", error=_short(exc), traceback=_tb_tail(exc))
            return
        errors = [(i, r.error) for i, r in enumerate(responses) if r.error is not None]
        if errors:
            i, err = errors[0]
            rec.update(
                status="engine-error",
                error=f"request {i}: {getattr(err, 'message', err)}",
                error_detail=str(err)[:2000],
                failed_requests=[i for i, _ in errors],
            )
            return
        diffs = []
        for i, (resp, want) in enumerate(zip(responses, rec["expected"], strict=True)):
            got = list(resp.output_tokens)
            if got != want:
                pos = next(
                    (j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                    min(len(got), len(want)),
                )
                diffs.append(
                    {
                        "request": i,
                        "prompt_len": len(work[i][0]),
                        "first_diff": pos,
                        "got": got,
                        "want": want,
                    }
                )
        rec["got"] = [list(r.output_tokens) for r in responses]
        deadline = time.monotonic() + 5
        while engine.kv_manager.stats().num_seqs and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stats = engine.kv_manager.stats()
        rec["kv_after"] = {"num_seqs": stats.num_seqs, "kv_used_tokens": stats.kv_used_tokens}
        if diffs:
            d = diffs[0]
            rec.update(
                status="mismatch",
                diffs=diffs,
                error=(
                    f"request {d['request']} (prompt {d['prompt_len']} tokens) first differs at "
                    f"output position {d['first_diff']}; "
                    f"{len(diffs)}/{len(work)} requests differ"
                ),
            )
        elif stats.num_seqs or stats.kv_used_tokens:
            rec.update(
                status="engine-error",
                error=(
                    f"tokens equal but KV pool not empty afterwards: num_seqs={stats.num_seqs}, "
                    f"kv_used_tokens={stats.kv_used_tokens}"
                ),
            )
        else:
            rec["status"] = "ok"
    finally:
        if engine.is_running:
            try:
                await asyncio.wait_for(engine.stop(), 60)
            except Exception as exc:
                rec["stop_error"] = _short(exc)


def run_one(model_type: str, root: Path, emit: Any) -> dict[str, Any]:
    """Build, reference-generate and serve one type; return its record."""
    rec: dict[str, Any] = {"model_type": model_type, "runner": None}
    t0 = time.monotonic()
    rng = random.Random(0)
    work = [([rng.randrange(4, 1024) for _ in range(n)], k) for n, k in SIZES]
    mdir = Path(tempfile.mkdtemp(prefix=f"{model_type}-", dir=root))
    try:
        emit({"model_type": model_type, "phase": "build"})
        try:
            path, changed = _build(model_type, mdir)
        except Exception as exc:
            rec.update(status="not-buildable", error=_short(exc), traceback=_tb_tail(exc))
            with contextlib.suppress(Exception):
                rec["config"] = tiny_config(model_type)[1]
            return rec
        rec["config"] = changed
        emit({"model_type": model_type, "phase": "generate"})
        try:
            rec["expected"] = _reference(path, work)
        except Exception as exc:
            rec.update(status="generate-fails", error=_short(exc), traceback=_tb_tail(exc))
            return rec
        emit({"model_type": model_type, "phase": "start"})
        asyncio.run(_serve(path, work, rec, emit))
        return rec
    finally:
        rec["seconds"] = round(time.monotonic() - t0, 1)
        shutil.rmtree(mdir, ignore_errors=True)


def worker(types: list[str], parts: Path) -> None:
    """Run ``types`` in order, appending progress and results to ``parts`` (JSON lines)."""
    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    root = Path(tempfile.mkdtemp(prefix="arch_sweep_models-"))

    def emit(obj: dict[str, Any]) -> None:
        with parts.open("a", encoding="utf-8") as f:
            f.write(json.dumps(obj) + "\n")

    try:
        for model_type in types:
            rec = run_one(model_type, root, emit)
            emit({"model_type": model_type, "result": rec})
            print(f"[{rec['status']}] {model_type} ({rec.get('runner')}) {rec.get('error', '')}")
            sys.stdout.flush()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------- driver
def _read_parts(parts: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(results by type, last progress line by type)."""
    results: dict[str, dict[str, Any]] = {}
    phases: dict[str, dict[str, Any]] = {}
    if parts.exists():
        for line in parts.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "result" in obj:
                results[obj["model_type"]] = obj["result"]
            else:
                phases[obj["model_type"]] = {**phases.get(obj["model_type"], {}), **obj}
    return results, phases


def _lost(model_type: str, phase: dict[str, Any], why: str) -> dict[str, Any]:
    """The record of a type whose worker hung or died, classified by where it was."""
    where = phase.get("phase", "build")
    status = {
        "build": "not-buildable",
        "generate": "generate-fails",
        "start": "start-error",
    }.get(where, "engine-error")
    if why.startswith("timeout"):
        status = "timeout" if where in ("start", "engine") else status
    return {
        "model_type": model_type,
        "runner": phase.get("runner"),
        "status": status,
        "error": f"worker {why} during {where}",
    }


def drive(types: list[str], out: Path, per_type_s: float) -> list[dict[str, Any]]:
    """Run ``types`` in worker subprocesses, restarting past a hung or dead one."""
    parts = Path(str(out) + ".parts.jsonl")
    parts.unlink(missing_ok=True)
    lost: dict[str, dict[str, Any]] = {}
    while True:
        results, phases = _read_parts(parts)
        todo = [t for t in types if t not in results and t not in lost]
        if not todo:
            break
        cmd = [sys.executable, __file__, "--worker", str(parts), "--only", *todo]
        proc = subprocess.Popen(cmd)
        current, since = None, time.monotonic()
        why = None
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
            results, phases = _read_parts(parts)
            pending = [t for t in todo if t not in results]
            if proc.returncode is not None:
                if pending:
                    why = f"died (exit code {proc.returncode})"
                break
            head = pending[0] if pending else None
            if head != current:
                current, since = head, time.monotonic()
            elif time.monotonic() - since > per_type_s:
                why = f"timeout ({per_type_s:.0f} s)"
                proc.kill()
                proc.wait()
                break
        if why is not None:
            results, phases = _read_parts(parts)
            pending = [t for t in todo if t not in results]
            if pending:
                head = pending[0]
                lost[head] = _lost(head, phases.get(head, {}), why)
                print(f"[{lost[head]['status']}] {head}: {lost[head]['error']}", flush=True)
    results, _ = _read_parts(parts)
    results.update(lost)
    return [results[t] for t in types]


def table(records: list[dict[str, Any]]) -> str:
    """A markdown table of ``records`` and the counts per class."""
    rows = ["| model_type | status | runner | s | detail |", "|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (CLASSES.index(r["status"]), r["model_type"])):
        detail = str(r.get("error", "")).replace("|", "\\|").replace("\n", " ")[:160]
        rows.append(
            f"| {r['model_type']} | {r['status']} | {r.get('runner') or ''} | "
            f"{r.get('seconds', '')} | {detail} |"
        )
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{c}: {counts[c]}" for c in CLASSES if c in counts)
    return "\n".join(rows) + f"\n\n{len(records)} types -- {summary}\n"


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the sweep (or be its worker), write JSON, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/arch_sweep.json", help="JSON results file")
    ap.add_argument("--only", nargs="+", metavar="TYPE", help="run only these model types")
    ap.add_argument(
        "--skip-covered",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="skip the types the test suite already covers (default: run every type)",
    )
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the reference and the engine (16-bit: tokens may differ by rounding "
        "between batch shapes; errors are what to look for)",
    )
    ap.add_argument(
        "--max-batch-size",
        type=int,
        default=4,
        help="the engine's max_batch_size (below 4: requests queue and join running ones)",
    )
    ap.add_argument("--per-type-timeout", type=float, default=300.0, help="seconds per type")
    ap.add_argument("--worker", metavar="PARTS", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(list(args.only or []), Path(args.worker))
        return 0
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = list(args.only) if args.only else list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if args.skip_covered:
        types = [t for t in types if t not in COVERED]
    os.environ["ARCH_SWEEP_DTYPE"] = args.dtype
    os.environ["ARCH_SWEEP_BATCH"] = str(args.max_batch_size)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.monotonic()
    records = drive(types, Path(args.out), args.per_type_timeout)
    for r in records:  # keep the JSON small
        r.pop("expected", None) if r.get("status") == "ok" else None
        r.pop("got", None) if r.get("status") == "ok" else None
    payload = {
        "transformers": __import__("transformers").__version__,
        "seconds": round(time.monotonic() - t0, 1),
        "records": records,
    }
    Path(args.out).write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    print(table(records))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
