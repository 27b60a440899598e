"""Building one offline tiny model: its transformers config, seeded weights, saved files.

Part of :mod:`sagellm_backend.testing.tiny_models`, which owns the cache (where a model
lives, when it is complete, the atomic publish). Invariants: :func:`build_model` draws the
weights from the spec's seed and restores torch's global RNG state afterwards; it writes
only into the directory it is given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sagellm_backend.errors import ConfigError
from sagellm_backend.testing._tiny_specs import TinyModelSpec
from sagellm_backend.testing._tiny_tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    build_tokenizer,
    import_deps,
)

__all__ = ["build_model", "model_config"]

# Rotary decoders configured with the Llama field names.
_ROPE_DECODERS = frozenset(
    {
        "mistral",
        "qwen2",
        "phi3",
        "gemma2",
        "starcoder2",
        "qwen3_next",
        "recurrent_gemma",
        "deepseek_v3",
        "mixtral",
    }
)
# Architectures whose tokenizer prepends ``<s>`` (as their hub tokenizers do).
_BOS_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "phi3", "gemma2"})


# The config field each spec dimension sets, per architecture: (config field, spec field).
_LLAMA_STYLE_FIELDS = (
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "intermediate_size"),
    ("num_hidden_layers", "num_layers"),
    ("num_attention_heads", "num_heads"),
    ("num_key_value_heads", "num_kv_heads"),
    ("max_position_embeddings", "max_position_embeddings"),
)
_CONFIG_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "llama": _LLAMA_STYLE_FIELDS,
    "gpt2": (
        ("n_embd", "hidden_size"),
        ("n_inner", "intermediate_size"),
        ("n_layer", "num_layers"),
        ("n_head", "num_heads"),
        ("n_positions", "max_position_embeddings"),
    ),
    "opt": (
        ("hidden_size", "hidden_size"),
        ("ffn_dim", "intermediate_size"),
        ("num_hidden_layers", "num_layers"),
        ("num_attention_heads", "num_heads"),
        ("max_position_embeddings", "max_position_embeddings"),
        ("word_embed_proj_dim", "hidden_size"),
    ),
    "bloom": (("hidden_size", "hidden_size"), ("n_layer", "num_layers"), ("n_head", "num_heads")),
    # Mamba: no attention; its inner width is ``expand * hidden_size`` (an extra field).
    "mamba": (("hidden_size", "hidden_size"), ("num_hidden_layers", "num_layers")),
    # GPT-NeoX has no grouped-query attention: every field but the KV heads.
    "gpt_neox": tuple(f for f in _LLAMA_STYLE_FIELDS if f[0] != "num_key_value_heads"),
    **dict.fromkeys(sorted(_ROPE_DECODERS), _LLAMA_STYLE_FIELDS),
}
# Fields set for one architecture whatever the spec says.
_FIXED_FIELDS: dict[str, dict[str, Any]] = {"llama": {"rms_norm_eps": 1e-6}}


def model_config(spec: TinyModelSpec, transformers: Any) -> Any:
    """The transformers config of ``spec`` (``transformers``: the imported module).

    The spec's dimensions under the architecture's field names, the fixed special token
    ids, untied embeddings, and the spec's ``extra`` fields.

    Raises:
        ConfigError: ``spec.architecture`` is not one the builder knows.
    """
    names = _CONFIG_FIELDS.get(spec.architecture)
    if names is None:
        raise ConfigError(
            f"tiny model {spec.name!r}: unknown architecture {spec.architecture!r}; valid: "
            f"llama, gpt2, opt, bloom, gpt_neox, mamba, {', '.join(sorted(_ROPE_DECODERS))}"
        )
    fields = {field: getattr(spec, attr) for field, attr in names}
    fields.update(_FIXED_FIELDS.get(spec.architecture, {}))
    common: dict[str, Any] = {
        "vocab_size": spec.vocab_size,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "tie_word_embeddings": False,
    }
    return transformers.AutoConfig.for_model(
        spec.architecture, **fields, **common, **dict(spec.extra)
    )


def build_model(spec: TinyModelSpec, out: Path) -> None:
    """Write the complete model ``spec`` into the empty directory ``out``."""
    torch, transformers, _ = import_deps()
    tokenizer = build_tokenizer(spec.vocab_size, add_bos=spec.architecture in _BOS_ARCHITECTURES)
    tokenizer.model_max_length = spec.max_position_embeddings
    config = model_config(spec, transformers)
    if spec.architecture == "llama":
        model_cls = transformers.LlamaForCausalLM
    elif spec.architecture == "gpt2":
        model_cls = transformers.GPT2LMHeadModel
    else:
        model_cls = transformers.AutoModelForCausalLM.from_config
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.seed)
        model = model_cls(config).to(torch.float32).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    hf_logging = transformers.utils.logging
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    # Name the class every transformers >= 4.56 knows (5.x would write its own alias).
    tok_config_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8"))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True), encoding="utf-8")
