"""Engine layer: BaseEngine, EngineFactory, MockEngine, HF engines (lazy), entry-point factories.

Importing this package never imports torch; HF engine names resolve on first access.
"""

from __future__ import annotations

from typing import Any

from sagellm_backend._lazy import lazy_table, resolve_lazy
from sagellm_backend.engine.base import BaseEngine, EngineConfig

_LAZY = lazy_table(
    {
        "sagellm_backend.engine.factory": ("EngineFactory",),
        "sagellm_backend.engine.mock": ("MockEngine", "MockEngineConfig", "create_mock_engine"),
        "sagellm_backend.engine.hf_cuda": (
            "HFCudaEngine",
            "HFCudaEngineConfig",
            "create_cuda_engine",
        ),
        "sagellm_backend.engine.cpu": ("CPUEngine", "CPUEngineConfig", "create_cpu_engine"),
        "sagellm_backend.engine.embedding": ("EmbeddingEngine", "EmbeddingEngineConfig"),
    }
)


def __getattr__(name: str) -> Any:
    """Resolve lazily imported names (PEP 562)."""
    return resolve_lazy(globals(), _LAZY, name)


__all__ = ["BaseEngine", "EngineConfig", *sorted(_LAZY)]
