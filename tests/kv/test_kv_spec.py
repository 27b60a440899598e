from __future__ import annotations

from types import SimpleNamespace

import pytest

from sagellm_backend.capability import DType
from sagellm_backend.kv.spec import DEFAULT_KV_SPEC, KVSpec


def test_bytes_arithmetic() -> None:
    spec = KVSpec(num_layers=4, num_kv_heads=2, head_dim=8, block_size=16, dtype=DType.FP16)
    assert spec.elements_per_token == 2 * 4 * 2 * 8
    assert spec.bytes_per_token == 128 * 2
    assert spec.page_bytes == 256 * 16
    assert spec.tokens_per_page(DType.FP16) == 16
    assert spec.tokens_per_page(DType.BF16) == 16
    assert spec.tokens_per_page(DType.FP32) == 8
    assert spec.tokens_per_page(DType.INT8) == 32
    assert spec.tokens_per_page(DType.INT4) == 64
    assert spec.pages_for(17) == 2
    assert spec.pages_for(17, DType.FP32) == 3
    assert spec.pages_for(0) == 0
    assert spec.num_pages_for_bytes(spec.page_bytes * 3 + 1) == 3


def test_default_spec_is_llama7b_like() -> None:
    assert DEFAULT_KV_SPEC.bytes_per_token == 512 * 1024
    assert DEFAULT_KV_SPEC.page_bytes == 8 * 1024 * 1024


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_layers": 0, "num_kv_heads": 1, "head_dim": 1},
        {"num_layers": 1, "num_kv_heads": -1, "head_dim": 1},
        {"num_layers": 1, "num_kv_heads": 1, "head_dim": 1, "block_size": 0},
        {"num_layers": 1.5, "num_kv_heads": 1, "head_dim": 1},
        {"num_layers": True, "num_kv_heads": 1, "head_dim": 1},
        {"num_layers": 1, "num_kv_heads": 1, "head_dim": 1, "dtype": "nope"},
    ],
)
def test_invalid_spec(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        KVSpec(**kwargs)  # type: ignore[arg-type]


def test_dtype_names_are_parsed() -> None:
    assert KVSpec(1, 1, 2, dtype="bfloat16").dtype is DType.BF16


def test_page_too_small_for_wider_dtype() -> None:
    spec = KVSpec(1, 1, 2, block_size=1, dtype=DType.INT8)
    with pytest.raises(ValueError, match="cannot hold one fp32 token"):
        spec.tokens_per_page(DType.FP32)


def test_from_llama_like_config() -> None:
    cfg = SimpleNamespace(
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        hidden_size=512,
        head_dim=None,
    )
    spec = KVSpec.from_model_config(cfg, block_size=32, dtype="fp32")
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (8, 4, 64)
    assert spec.block_size == 32 and spec.dtype is DType.FP32


def test_from_config_explicit_head_dim_and_mha_fallback() -> None:
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "head_dim": 32}
    spec = KVSpec.from_model_config(cfg)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 4, 32)


def test_from_gpt2_config() -> None:
    cfg = SimpleNamespace(n_layer=12, n_head=12, n_embd=768)
    spec = KVSpec.from_model_config(cfg)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (12, 12, 64)


def test_from_real_transformers_configs() -> None:
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaConfig(
        num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, hidden_size=256
    )
    spec = KVSpec.from_model_config(llama)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (3, 2, 32)
    gpt2 = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=128)
    spec = KVSpec.from_model_config(gpt2)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 4, 32)


class _PerLayerHeads:
    """A heterogeneous config: ``head_dim`` has no global value, only per-layer ones."""

    num_hidden_layers = 2
    num_attention_heads = 4
    num_key_value_heads = 2
    hidden_size = 64
    per_layer_config = (SimpleNamespace(head_dim=16), SimpleNamespace(head_dim=48))

    @property
    def head_dim(self) -> int:
        raise RuntimeError("'head_dim' is a per-layer attribute")


def test_per_layer_fields_read_as_their_largest_value() -> None:
    spec = KVSpec.from_model_config(_PerLayerHeads())
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 2, 48)


def test_a_raising_field_without_per_layer_configs_is_not_hidden() -> None:
    class Broken:
        num_hidden_layers = 2
        num_attention_heads = 4

        @property
        def head_dim(self) -> int:
            raise RuntimeError("broken config")

    with pytest.raises(RuntimeError, match="broken config"):
        KVSpec.from_model_config(Broken())


def test_from_a_real_heterogeneous_transformers_config() -> None:
    transformers = pytest.importorskip("transformers")
    try:
        config = transformers.AutoConfig.for_model(
            "gemma4_text",
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_size=64,
            head_dim=16,
            layer_types=["sliding_attention", "full_attention"],
            per_layer_config={"01": {"head_dim": 32}},
        )
    except ValueError:
        pytest.skip("this transformers has no gemma4_text")
    spec = KVSpec.from_model_config(config)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 2, 32)


def test_from_config_missing_fields_named() -> None:
    with pytest.raises(ValueError, match="num_hidden_layers"):
        KVSpec.from_model_config({"num_attention_heads": 4, "hidden_size": 64})
