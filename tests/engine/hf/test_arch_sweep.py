"""More architectures through CPUEngine: 4 concurrent requests equal one-at-a-time generate.

Tiny random models built here from a transformers config (2-3 layers, hidden 64, vocab
1024; the tokenizer of ``tiny-llama``, prompts given as token ids) for architectures the
catalogue models of ``test_any_model.py`` do not cover: every runner kind (paged, the
batched fallback, the per-sequence runner with and without merged decode steps). Each case:
prompts of 1, 7, 40 and 23 tokens with 8-12 new tokens, submitted together, greedy, EOS
ignored; the tokens must equal ``model.generate`` on each request alone, and the KV pool
must be empty afterwards.
"""

from __future__ import annotations

import asyncio
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from .conftest import Reference, make_request, wait_until

pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

_LLAMA: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
_MHA = {k: v for k, v in _LLAMA.items() if k != "num_key_value_heads"}
#: the decoder of an encoder-decoder model (its causal-LM class) and its encoder's sizes
_SEQ2SEQ: dict[str, Any] = {
    "d_model": 64,
    "decoder_attention_heads": 4,
    "decoder_ffn_dim": 128,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "encoder_layers": 2,
}

#: model_type -> (config fields, the runner the engine must pick).
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "qwen3": ({**_LLAMA, "head_dim": 16}, "paged"),
    "qwen3_moe": (
        {
            **_LLAMA,
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
        "paged",
    ),
    "phi": ({**_LLAMA, "partial_rotary_factor": 0.5}, "paged"),
    "gemma3_text": (
        {
            **_LLAMA,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        "paged",
    ),
    "olmo2": (dict(_LLAMA), "paged"),
    "cohere": (dict(_LLAMA), "paged"),
    "gpt_bigcode": (
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024, "n_inner": 128},
        "paged",
    ),
    "gptj": (
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024, "n_inner": 128}
        | {"rotary_dim": 8},
        "paged",
    ),
    "codegen": (
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024, "n_inner": 128}
        | {"n_ctx": 1024, "rotary_dim": 8},
        "paged",
    ),
    "gemma": ({**_LLAMA, "head_dim": 16}, "paged"),
    "olmo": (dict(_LLAMA), "paged"),
    "granite": (dict(_LLAMA), "paged"),
    "persimmon": (dict(_MHA), "paged"),
    "helium": ({**_LLAMA, "head_dim": 16}, "paged"),
    "glm": ({**_LLAMA, "head_dim": 16}, "paged"),
    "smollm3": ({**_LLAMA, "no_rope_layer_interval": 2}, "paged"),
    "stablelm": (dict(_LLAMA), "hf-batched"),
    "xglm": (
        {
            "d_model": 64,
            "ffn_dim": 128,
            "num_layers": 2,
            "attention_heads": 4,
            "max_position_embeddings": 1024,
        },
        "hf-batched",
    ),
    "falcon": (
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        "hf-batched",
    ),
    "mpt": (
        {"d_model": 64, "n_heads": 4, "n_layers": 2, "expansion_ratio": 2, "max_seq_len": 1024},
        "hf-batched",
    ),
    "biogpt": (dict(_MHA), "hf-batched"),
    "falcon_mamba": (
        {"hidden_size": 64, "state_size": 8, "num_hidden_layers": 2, "expand": 2},
        "hf-sequential",
    ),
    "lfm2": ({**_LLAMA, "layer_types": ["conv", "full_attention"]}, "hf-sequential"),
    # positions from the cache length, not the mask: left padding would shift them, so the
    # start-up probe sends them to the per-sequence runner
    "bart": (
        {
            **_SEQ2SEQ,
            "is_decoder": True,
            "forced_eos_token_id": None,  # a summarization default generate() would apply
        },
        "hf-sequential",
    ),
    "whisper": (dict(_SEQ2SEQ), "hf-sequential"),
    # cache layers holding more than K/V (an indexer's keys; compressed attention)
    "deepseek_v32": (
        {
            "head_dim": 8,
            "hidden_size": 64,
            "index_head_dim": 16,
            "index_n_heads": 4,
            "intermediate_size": 128,
            "kv_lora_rank": 16,
            "max_position_embeddings": 1024,
            "moe_intermediate_size": 32,
            "n_group": 1,
            "n_routed_experts": 4,
            "num_attention_heads": 4,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 2,
            "num_key_value_heads": 4,
            "q_lora_rank": 32,
            "qk_head_dim": 16,
            "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 8,
            "topk_group": 1,
            "v_head_dim": 16,
            "layer_types": ["indexed_attention", "indexed_attention"],
            "mlp_layer_types": ["dense", "sparse"],
        },
        "hf-sequential",
    ),
    "deepseek_v4": (
        {
            "head_dim": 16,
            "hidden_size": 64,
            "index_head_dim": 16,
            "index_n_heads": 4,
            "max_position_embeddings": 1024,
            "moe_intermediate_size": 32,
            "n_routed_experts": 4,
            "num_attention_heads": 4,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 3,
            "o_lora_rank": 16,
            "q_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "sliding_window": 16,
            "layer_types": [
                "heavily_compressed_attention",
                "compressed_sparse_attention",
                "heavily_compressed_attention",
            ],
            "mlp_layer_types": ["hash_moe", "moe", "moe"],
        },
        "hf-sequential",
    ),
    # layers of different head_dim (Gemma 4's wider full-attention heads): no global head_dim
    "gemma4_text": (
        {
            **_LLAMA,
            "head_dim": 16,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"],
            "per_layer_config": {"01": {"head_dim": 32}},
            "hidden_size_per_layer_input": 16,
            "vocab_size_per_layer_input": 1024,
        },
        "hf-batched",
    ),
    "jamba": (
        {
            **_LLAMA,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "mamba_d_state": 8,
            "mamba_d_conv": 4,
            "mamba_expand": 2,
            "mamba_dt_rank": 8,
            "use_mamba_kernels": False,
        },
        "hf-sequential",
    ),
}


def _build(model_type: str, fields: dict[str, Any], root: Path) -> str:
    """A tiny random ``model_type`` model with tiny-llama's tokenizer, under ``root``."""
    import torch
    import transformers

    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    out = root / model_type
    if (out / "config.json").is_file():
        return str(out)
    cfg = transformers.AutoConfig.for_model(
        model_type,
        vocab_size=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        **fields,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float32).eval()
    finally:
        torch.random.set_rng_state(state)
    for key, value in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 0)):
        setattr(model.generation_config, key, value)
    model.save_pretrained(out, safe_serialization=True)
    src = Path(ensure_tiny_model("tiny-llama"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    return str(out)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arch_sweep")


@pytest.mark.parametrize("model_type", list(CASES))
async def test_concurrent_requests_equal_solo_generate(
    model_type: str, models_root: Path, engine_factory: Any
) -> None:
    fields, runner = CASES[model_type]
    path = _build(model_type, fields, models_root)
    rng = random.Random(0)
    sizes = ((1, 8), (7, 12), (40, 10), (23, 9))  # (prompt tokens, new tokens)
    work = [([rng.randrange(4, 1024) for _ in range(n)], k) for n, k in sizes]
    ref = Reference(path)
    expected = [ref.greedy(ids, k) for ids, k in work]
    engine = engine_factory(path, max_batch_size=4, max_new_tokens=64)
    await engine.start()
    assert engine.runner_name == runner
    responses = await asyncio.wait_for(
        asyncio.gather(
            *(engine.execute(make_request("ids", k, prompt_token_ids=ids)) for ids, k in work)
        ),
        120,
    )
    for i, (resp, want) in enumerate(zip(responses, expected, strict=True)):
        assert resp.error is None, (model_type, i, resp.error)
        assert list(resp.output_tokens) == want, (model_type, i)
    await wait_until(lambda: engine.kv_manager.stats().num_seqs == 0)
    assert engine.kv_manager.stats().kv_used_tokens == 0


#: model_type -> (config fields, what the refusal says): models the engine cannot serve.
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "openai-gpt": ({"n_embd": 64, "n_head": 4, "n_layer": 2}, "takes no transformers cache"),
    "rwkv": (
        {
            "attention_hidden_size": 64,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
        },
        "its own 'state'",
    ),
    # a cache argument, but its own dict: feeding a prompt in two parts fails
    "xlm": ({"emb_dim": 64, "n_heads": 4, "n_layers": 2}, "does not continue a sequence"),
}


@pytest.mark.parametrize("model_type", list(REFUSED))
async def test_models_without_a_usable_cache_are_refused_at_start(
    model_type: str, models_root: Path, engine_factory: Any
) -> None:
    from sagellm_backend.engine.runners.select import describe_runner_for_path
    from sagellm_backend.errors import ConfigError

    path = _build(model_type, REFUSED[model_type][0], models_root)
    says = REFUSED[model_type][1]
    engine = engine_factory(path)
    with pytest.raises(ConfigError, match="cannot be served") as info:
        await engine.start()
    assert says in str(info.value)
    assert not engine.is_running
    if model_type != "xlm":  # known from the config alone (``info --model``)
        with pytest.raises(ConfigError, match=says):
            describe_runner_for_path(path)


@pytest.mark.parametrize(("model_type", "expected"), [("bart", False), ("falcon", True)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_padding_probe_tells_position_errors_from_rounding(
    model_type: str, expected: bool, dtype: str, models_root: Path
) -> None:
    """BART's decoder takes positions from the cache length: padding breaks it in any dtype;
    Falcon's follow the mask: bf16 rounding between batch shapes must not fail it."""
    from sagellm_backend.engine.hf.loader import load_model_and_tokenizer
    from sagellm_backend.engine.runners._probe import padded_batches_match
    from sagellm_backend.engine.runners.hf_cache import HFBatchedRunner

    path = _build(model_type, CASES[model_type][0], models_root)
    model, _ = load_model_and_tokenizer(path, device="cpu", dtype=dtype)
    runner = HFBatchedRunner(model, max_context=256)
    ok, why = padded_batches_match(runner)
    assert ok is expected and (why == "") is expected
    if not expected:
        assert "left-padded batches change its logits" in why
    assert runner._seqs == {} and runner._kept is None  # the probe leaves nothing behind


_ERGO: dict[str, Any] = {
    "first_dense_intermediate_size": 128,
    "hidden_size": 64,
    "max_position_embeddings": 1024,
    "moe_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "shared_intermediate_size": 32,
    "sliding_window": 16,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
    "mlp_layer_types": ["dense", "sparse", "sparse"],
}


async def test_fp32_embeddings_beside_bf16_layers(models_root: Path, engine_factory: Any) -> None:
    """Ergo keeps its embeddings and norms in float32 (``_keep_in_fp32_modules``) while its
    layers compute in bfloat16: the KV pool takes the layers' dtype, which the paged runner
    checks against the keys and values the layers compute (before: the pool took the
    embeddings' float32 and every step failed writing bf16 values into it)."""
    import torch

    from sagellm_backend.engine.hf.loader import load_model_and_tokenizer
    from sagellm_backend.engine.hf.runner import model_compute_dtype

    transformers = pytest.importorskip("transformers")
    if "ergo" not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no ergo")
    path = _build("ergo", _ERGO, models_root)
    model, _ = load_model_and_tokenizer(path, device="cpu", dtype="bfloat16")
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model_compute_dtype(model) == torch.bfloat16
    engine = engine_factory(path, torch_dtype="bfloat16")
    await engine.start()
    assert engine.runner_name == "paged"
    assert engine.kv_manager.spec.dtype.value == "bf16"
    rng = random.Random(1)
    work = [([rng.randrange(4, 1024) for _ in range(n)], 6) for n in (3, 30)]
    responses = await asyncio.wait_for(
        asyncio.gather(
            *(engine.execute(make_request("ids", k, prompt_token_ids=ids)) for ids, k in work)
        ),
        120,
    )
    assert [r.error for r in responses] == [None, None]
    assert [len(r.output_tokens) for r in responses] == [6, 6]
