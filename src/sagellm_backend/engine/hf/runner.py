"""Model facts the HF engine core reads off a loaded transformers model.

The runners live in :mod:`sagellm_backend.engine.runners` (``paged.PagedRunner``,
``hf_cache.HFBatchedRunner``; ``select.select_runner`` picks one). The hand-written
Llama-family forward that used to live here was removed: in the same benchmark run
(``benchmarks/bench_any_model.py``, ``bench-llama``) it was not faster than the generic
paged runner (0.96x wall, 0.98x CPU time over 3 passes).

Invariants:
    * Nothing here calls a device-specific API.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["model_compute_dtype", "model_context_length"]


def model_compute_dtype(model: Any) -> torch.dtype:
    """Dtype activations (and K/V) have: most of the model's floating-point weights'.

    The runners' :func:`~sagellm_backend.engine.runners.hf_cache.compute_dtype`.
    """
    from sagellm_backend.engine.runners.hf_cache import compute_dtype

    return compute_dtype(model)


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
