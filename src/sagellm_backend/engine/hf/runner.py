"""Model helpers of the HF engine core, and the runner names earlier releases exported.

The runners themselves live in :mod:`sagellm_backend.engine.runners`:

* :class:`~sagellm_backend.engine.runners.paged.PagedRunner` -- every causal LM whose
  transformers class supports custom attention functions: the model's own forward on all
  scheduled tokens packed in one row, K/V in the provider's paged pool;
* :class:`~sagellm_backend.engine.runners.hf_cache.HFBatchedRunner` -- the others (bloom,
  falcon, mpt, ...): the model's own forward and HF cache, all sequences in one padded
  batch per step;
* :func:`~sagellm_backend.engine.runners.select.select_runner` picks one.

The hand-written Llama-family forward that used to live here was removed: in the same
benchmark run (``benchmarks/bench_any_model.py``, ``bench-llama``) it was not faster than
the generic paged runner (0.96x wall, 0.98x CPU time over 3 passes). The names
:class:`PagedDecoderRunner` and :class:`HFCacheRunner` remain as thin subclasses of the
runners that replaced them, for code that imports them.

Invariants:
    * Nothing here calls a device-specific API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sagellm_backend.engine.runners.base import ModelRunner, SeqChunk
from sagellm_backend.engine.runners.hf_cache import HFBatchedRunner
from sagellm_backend.engine.runners.paged import PagedRunner

__all__ = [
    "HFCacheRunner",
    "ModelRunner",
    "PagedDecoderRunner",
    "SeqChunk",
    "model_compute_dtype",
    "model_context_length",
    "model_device",
    "paged_unsupported_reason",
]


def model_device(model: Any) -> torch.device:
    """Device of the model's input embeddings (where inputs must go)."""
    emb = model.get_input_embeddings()
    return torch.device(emb.weight.device)


def model_compute_dtype(model: Any) -> torch.dtype:
    """Dtype activations (and K/V) have: the input embeddings' dtype."""
    emb = model.get_input_embeddings()
    dtype: torch.dtype = emb.weight.dtype
    return dtype


def model_context_length(config: Any) -> int:
    """Longest sequence the model handles.

    ``max_position_embeddings`` (GPT-2: ``n_positions``; 2048 when the config has neither).
    A sliding window does not shorten it: every runner honours the window (the paged
    runner in its attention, the batched fallback through the model's own mask).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if not isinstance(n, int) or n <= 0:
        n = 2048
    return int(n)


def paged_unsupported_reason(model: Any) -> str | None:
    """Why the paged runner cannot serve ``model`` (None when it can, by static checks)."""
    from sagellm_backend.engine.runners.select import describe_runner

    name, reason = describe_runner(model)
    return None if name == "paged" else reason


class PagedDecoderRunner(PagedRunner):
    """The earlier name of :class:`~sagellm_backend.engine.runners.paged.PagedRunner`.

    The tuning arguments of the removed hand-written runner are accepted and ignored.
    """

    def __init__(
        self,
        model: Any,
        layer_kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        *,
        block_size: int,
        max_context: int,
        fuse_projections: bool = True,
        prepack_weights: bool = True,
        decode_workspace_rows: int = 0,
        decode_workspace_bytes: int = 0,
    ) -> None:
        del fuse_projections, prepack_weights, decode_workspace_rows, decode_workspace_bytes
        super().__init__(model, layer_kv, block_size=block_size, max_context=max_context)


class HFCacheRunner(HFBatchedRunner):
    """The earlier name of :class:`~sagellm_backend.engine.runners.hf_cache.HFBatchedRunner`."""

    def __init__(self, model: Any, *, max_context: int) -> None:
        super().__init__(model, max_context=max_context)
