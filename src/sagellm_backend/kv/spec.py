"""KV-cache geometry: how many bytes one token and one page of K/V take.

A *page* (also called a block) holds ``block_size`` tokens of K and V for every layer in the
spec dtype, so it is a fixed number of bytes (:attr:`KVSpec.page_bytes`). The generic
provider API (``kv_block_alloc(num_tokens, dtype)``) may ask for another dtype; the pages
stay the same size and hold :meth:`KVSpec.tokens_per_page` tokens of that dtype instead.

Invariants:
    * every field is a positive integer and ``dtype`` is a protocol :class:`DType`;
    * ``bytes_per_token * block_size == page_bytes``;
    * ``tokens_per_page(spec.dtype) == block_size``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from sagellm_backend.capability import DType, dtype_bits, parse_dtype

__all__ = ["DEFAULT_KV_SPEC", "KVSpec"]


def model_config_field(config: Any, *names: str) -> Any:
    """The first of ``names`` that ``config`` sets to a value other than None, else None.

    ``config`` is a Hugging Face model config: a mapping (read by key, e.g. a parsed
    ``config.json``) or any object (read by attribute; a missing one counts as None).

    A field that varies from layer to layer (transformers' heterogeneous configs, whose
    global attribute raises, e.g. Gemma 4's wider full-attention heads) reads as its
    largest per-layer value: a spec built from it bounds every layer's K/V from above.
    """
    for name in names:
        if isinstance(config, Mapping):
            value = config.get(name)
        else:
            try:
                value = getattr(config, name, None)
            except RuntimeError:  # a per-layer attribute with no single global value
                layers = getattr(config, "per_layer_config", None)
                if layers is None:
                    raise
                value = _largest_per_layer(layers, name)
        if value is not None:
            return value
    return None


def _largest_per_layer(layers: Any, name: str) -> int | None:
    """The largest integer ``name`` among the per-layer configs ``layers`` (None if none)."""
    values = [getattr(layer, name, None) for layer in layers]
    ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    return max(ints) if ints else None


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"KVSpec.{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class KVSpec:
    """Geometry of a paged KV cache.

    Attributes:
        num_layers: transformer layers that keep K/V.
        num_kv_heads: key/value heads per layer (GQA: fewer than the attention heads).
        head_dim: elements per head.
        block_size: tokens per page.
        dtype: element type of the stored K/V.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16
    dtype: DType = DType.FP16

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            _positive_int(name, getattr(self, name))
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if (self.elements_per_token * dtype_bits(self.dtype)) % 8:
            raise ValueError(
                f"KVSpec: a token of {self.dtype.value} is not a whole number of bytes"
            )

    @property
    def elements_per_token(self) -> int:
        """K and V elements of one token over all layers: ``2 * layers * kv_heads * head_dim``."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def bytes_per_token_of(self, dtype: DType | str) -> int:
        """Bytes one token takes when its K/V are stored as ``dtype``."""
        return self.elements_per_token * dtype_bits(parse_dtype(dtype)) // 8

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes in the spec dtype."""
        return self.bytes_per_token_of(self.dtype)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page: ``bytes_per_token * block_size``."""
        return self.bytes_per_token * self.block_size

    def tokens_per_page(self, dtype: DType | str | None = None) -> int:
        """Tokens of ``dtype`` (default: the spec dtype) that fit in one page.

        A page is :attr:`page_bytes` bytes whatever the dtype, so a wider dtype fits fewer
        tokens (FP32 in an FP16 spec: ``block_size // 2``) and a narrower one more. When the
        page is not a whole multiple of the token size the remainder of the page is unused.

        Raises:
            ValueError: not even one token of ``dtype`` fits in a page.
        """
        d = self.dtype if dtype is None else parse_dtype(dtype)
        tokens = self.page_bytes // self.bytes_per_token_of(d)
        if tokens < 1:
            raise ValueError(
                f"a {self.page_bytes}-byte page cannot hold one {d.value} token "
                f"({self.bytes_per_token_of(d)} bytes); use a larger block_size"
            )
        return tokens

    def pages_for(self, num_tokens: int, dtype: DType | str | None = None) -> int:
        """Pages needed for ``num_tokens`` tokens of ``dtype`` (ceil division)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        per_page = self.tokens_per_page(dtype)
        return -(-num_tokens // per_page)

    def num_pages_for_bytes(self, memory_bytes: int) -> int:
        """Whole pages that fit in ``memory_bytes``."""
        if memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
        return memory_bytes // self.page_bytes

    def with_block_size(self, block_size: int) -> KVSpec:
        """Return a copy of this spec with another ``block_size``."""
        return KVSpec(self.num_layers, self.num_kv_heads, self.head_dim, block_size, self.dtype)

    def with_dtype(self, dtype: DType | str) -> KVSpec:
        """Return a copy of this spec with another dtype."""
        return KVSpec(
            self.num_layers, self.num_kv_heads, self.head_dim, self.block_size, parse_dtype(dtype)
        )

    @classmethod
    def from_model_config(
        cls,
        hf_config: Any,
        *,
        block_size: int = 16,
        dtype: DType | str = DType.FP16,
    ) -> KVSpec:
        """Build a spec from a Hugging Face model config (an object or a dict).

        Reads ``num_hidden_layers`` (GPT-2: ``n_layer``), ``num_key_value_heads`` falling back
        to ``num_attention_heads`` (GPT-2: ``n_head``), and ``head_dim`` falling back to
        ``hidden_size // num_attention_heads`` (GPT-2: ``n_embd // n_head``). Multimodal
        configs are read through ``get_text_config()`` when they have it.

        Raises:
            ValueError: naming the fields that are missing or not positive integers.
        """
        cfg = hf_config
        getter = getattr(cfg, "get_text_config", None)
        if callable(getter):
            cfg = getter()

        field = partial(model_config_field, cfg)
        layers = field("num_hidden_layers", "n_layer", "num_layers")
        heads = field("num_attention_heads", "n_head")
        kv_heads = field("num_key_value_heads", "n_kv_heads", "multi_query_group_num")
        if kv_heads is None:
            kv_heads = heads
        head_dim = field("head_dim")
        if head_dim is None:
            hidden = field("hidden_size", "n_embd")
            if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
                head_dim = hidden // heads
        missing = [
            name
            for name, value in (
                ("num_hidden_layers/n_layer", layers),
                ("num_key_value_heads/num_attention_heads/n_head", kv_heads),
                ("head_dim or hidden_size/n_embd with num_attention_heads", head_dim),
            )
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ]
        if missing:
            raise ValueError(
                "cannot derive the KV geometry from the model config; missing or invalid: "
                + "; ".join(missing)
            )
        return cls(int(layers), int(kv_heads), int(head_dim), block_size, parse_dtype(dtype))


#: Used by ``kv_block_alloc`` when nothing else is configured: a Llama-2-7B-like geometry
#: (32 layers, 32 KV heads of 128, FP16): 512 KiB per token, 8 MiB per 16-token page.
DEFAULT_KV_SPEC = KVSpec(num_layers=32, num_kv_heads=32, head_dim=128, block_size=16)
