"""The catalogue of offline tiny models: their geometry, by name.

Part of :mod:`sagellm_backend.testing.tiny_models` (which re-exports
:class:`TinyModelSpec`). Invariants: :data:`SPECS` is ordered smallest first (the
2-layer test models, then the ``bench-`` models); a spec's fields are all a builder reads,
so two builds of one spec by one builder version are identical (same seed, same weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SPECS", "TinyModelSpec"]


@dataclass(frozen=True)
class TinyModelSpec:
    """Geometry of one offline model.

    Attributes:
        name: the name :func:`ensure_tiny_model` accepts.
        architecture: ``config.model_type`` (llama, gpt2, mistral, qwen2, phi3, gemma2,
            gpt_neox, opt, starcoder2, bloom, mamba, qwen3_next, recurrent_gemma,
            deepseek_v3, mixtral).
        vocab_size: tokenizer and embedding size (they are equal).
        hidden_size: model width.
        intermediate_size: MLP width.
        num_layers: decoder layers.
        num_heads: attention heads.
        num_kv_heads: key/value heads (Llama GQA; GPT-2 uses ``num_heads``).
        max_position_embeddings: context length.
        seed: the torch seed the weights are drawn from.
        description: one line for listings.
        extra: further config fields of this architecture as ``(name, value)`` pairs
            (sliding window, soft-capping, ...); recorded in the cache marker only when
            non-empty, so the markers of models without extras are unchanged.
    """

    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    seed: int
    description: str
    extra: tuple[tuple[str, Any], ...] = ()


_TINY_GEOMETRY: dict[str, int] = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "max_position_embeddings": 1024,
}
_BENCH_GEOMETRY: dict[str, int] = {
    "vocab_size": 8000,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_layers": 8,
    "num_heads": 8,
    "num_kv_heads": 4,
    "max_position_embeddings": 4096,
}


def _spec(
    base: dict[str, int], name: str, architecture: str, seed: int, description: str, **kw: Any
) -> TinyModelSpec:
    """A spec with ``base`` geometry, overridden by ``kw`` (``extra`` is a dict, sorted)."""
    extra = tuple(sorted(kw.pop("extra", {}).items()))
    geometry: dict[str, Any] = {**base, **kw}
    return TinyModelSpec(
        name=name,
        architecture=architecture,
        seed=seed,
        description=description,
        extra=extra,
        **geometry,
    )


def _tiny(name: str, architecture: str, seed: int, description: str, **kw: Any) -> TinyModelSpec:
    """A 2-layer, hidden-64 model of ``architecture`` (vocab 1024, 4 heads / 2 KV heads)."""
    return _spec(_TINY_GEOMETRY, name, architecture, seed, description, **kw)


def _bench(name: str, architecture: str, seed: int, description: str, **kw: Any) -> TinyModelSpec:
    """An 8-layer, hidden-512 model of ``architecture`` (vocab 8000, 8 heads / 4 KV heads)."""
    return _spec(_BENCH_GEOMETRY, name, architecture, seed, description, **kw)


SPECS: dict[str, TinyModelSpec] = {
    "tiny-llama": _tiny(
        "tiny-llama",
        "llama",
        1234,
        "random Llama, 2 layers, hidden 64, GQA 4/2 heads, vocab 1024 (~0.2M params)",
        max_position_embeddings=2048,
    ),
    "tiny-gpt2": _tiny(
        "tiny-gpt2",
        "gpt2",
        4321,
        "random GPT-2, 2 layers, hidden 64, 4 heads, vocab 1024 (~0.2M params)",
        intermediate_size=256,
        num_kv_heads=4,
    ),
    "bench-llama": _bench(
        "bench-llama",
        "llama",
        2024,
        "random Llama, 8 layers, hidden 512, GQA 8/4 heads, vocab 8000, fp32 "
        "(~33M params; the DESIGN.md benchmark model)",
    ),
    "tiny-mistral": _tiny(
        "tiny-mistral",
        "mistral",
        501,
        "random Mistral, 2 layers, hidden 64, GQA 4/2, sliding window 24",
        extra={"sliding_window": 24},
    ),
    "tiny-qwen2": _tiny(
        "tiny-qwen2", "qwen2", 502, "random Qwen2, 2 layers, hidden 64, GQA 4/2, qkv bias"
    ),
    "tiny-phi3": _tiny("tiny-phi3", "phi3", 503, "random Phi-3, 2 layers, hidden 64, GQA 4/2"),
    "tiny-gemma2": _tiny(
        "tiny-gemma2",
        "gemma2",
        504,
        "random Gemma-2, 2 layers (sliding window 16, then global), attention and final "
        "logit soft-capping",
        extra={
            "sliding_window": 16,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
        },
    ),
    "tiny-gpt-neox": _tiny(
        "tiny-gpt-neox",
        "gpt_neox",
        505,
        "random GPT-NeoX (Pythia-style), 2 layers, hidden 64, 4 heads, partial rotary",
        num_kv_heads=4,
        extra={"rotary_pct": 0.5},
    ),
    "tiny-opt": _tiny(
        "tiny-opt", "opt", 506, "random OPT, 2 layers, hidden 64, 4 heads", num_kv_heads=4
    ),
    "tiny-starcoder2": _tiny(
        "tiny-starcoder2",
        "starcoder2",
        507,
        "random StarCoder2, 2 layers, hidden 64, GQA 4/2, sliding window 32",
        extra={"sliding_window": 32},
    ),
    "tiny-bloom": _tiny(
        "tiny-bloom",
        "bloom",
        508,
        "random BLOOM (ALiBi, no attention-backend support), 2 layers, hidden 64, 4 heads",
        num_kv_heads=4,
        intermediate_size=256,
    ),
    "tiny-mixtral": _tiny(
        "tiny-mixtral",
        "mixtral",
        513,
        "random Mixtral (sparse MoE: 4 experts, 2 per token), 2 layers, hidden 64, GQA 4/2",
        extra={"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "tiny-mamba": _tiny(
        "tiny-mamba",
        "mamba",
        509,
        "random Mamba (attention-free SSM: convolution and recurrent state), 2 layers, hidden 64",
        extra={"state_size": 8, "expand": 2, "conv_kernel": 4, "use_mambapy": False},
    ),
    "tiny-qwen3-next": _tiny(
        "tiny-qwen3-next",
        "qwen3_next",
        510,
        "random Qwen3-Next (hybrid: a gated linear-attention layer, then full attention), "
        "2 layers, hidden 64",
        extra={
            "head_dim": 16,
            "layer_types": ["linear_attention", "full_attention"],
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_conv_kernel_dim": 4,
            "mlp_only_layers": [0, 1],
        },
    ),
    "tiny-recurrent-gemma": _tiny(
        "tiny-recurrent-gemma",
        "recurrent_gemma",
        511,
        "random RecurrentGemma (state kept on its modules), 3 layers: recurrent, "
        "recurrent, local attention",
        num_layers=3,
        num_kv_heads=1,
        extra={
            "head_dim": 16,
            "lru_width": 64,
            "attention_window_size": 16,
            "conv1d_width": 4,
            "block_types": ["recurrent", "recurrent", "attention"],
        },
    ),
    "tiny-deepseek-v3": _tiny(
        "tiny-deepseek-v3",
        "deepseek_v3",
        512,
        "random DeepSeek-V3 (multi-head latent attention: keys and values of different "
        "widths; a dense layer, then MoE), 2 layers, hidden 64",
        num_kv_heads=4,
        extra={
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "topk_group": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
        },
    ),
    "bench-gpt2": _bench(
        "bench-gpt2",
        "gpt2",
        2025,
        "random GPT-2, 8 layers, hidden 512, 8 heads, vocab 8000, fp32 (~33M "
        "params; bench-llama's size)",
        intermediate_size=2048,
        num_kv_heads=8,
        max_position_embeddings=1024,
    ),
    "bench-phi3": _bench(
        "bench-phi3",
        "phi3",
        2026,
        "random Phi-3, 8 layers, hidden 512, GQA 8/4 heads, vocab 8000, fp32 "
        "(~33M params; bench-llama's size)",
    ),
    "bench-bloom": _bench(
        "bench-bloom",
        "bloom",
        2029,
        "random BLOOM (ALiBi), 8 layers, hidden 512, 8 heads, vocab 8000, fp32 (~30M params; "
        "the batched fallback runner's benchmark model)",
        num_kv_heads=8,
        intermediate_size=2048,
    ),
    "bench-mamba": _bench(
        "bench-mamba",
        "mamba",
        2027,
        "random Mamba, 8 layers, hidden 512 (inner 1024, state 16), vocab 8000, fp32 (~21M "
        "params; the per-sequence runner's benchmark model)",
        extra={"state_size": 16, "expand": 2, "conv_kernel": 4, "use_mambapy": False},
    ),
    "bench-qwen3-next": _bench(
        "bench-qwen3-next",
        "qwen3_next",
        2028,
        "random Qwen3-Next, 8 layers (3 gated linear-attention layers, then full attention, "
        "twice), hidden 512, dense MLPs, vocab 8000, fp32 (~30M params; the per-sequence "
        "runner on a hybrid model)",
        extra={
            "head_dim": 64,
            "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 2,
            "linear_num_value_heads": 8,
            "linear_num_key_heads": 4,
            "linear_key_head_dim": 64,
            "linear_value_head_dim": 64,
            "linear_conv_kernel_dim": 4,
            "mlp_only_layers": list(range(8)),
        },
    ),
}
# Smallest first: the 2-layer test models, then the benchmark models.
SPECS = dict(sorted(SPECS.items(), key=lambda item: item[0].startswith("bench-")))
