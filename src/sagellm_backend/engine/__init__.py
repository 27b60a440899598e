"""Engine layer: BaseEngine, EngineFactory, MockEngine, HF engines (lazy), entry-point factories.

Importing this package never imports torch; HF engine names resolve on first access.
"""

from __future__ import annotations

from typing import Any

from sagellm_backend._lazy import resolve_lazy
from sagellm_backend.engine.base import BaseEngine, EngineConfig

_LAZY: dict[str, str] = {
    "EngineFactory": "sagellm_backend.engine.factory",
    "MockEngine": "sagellm_backend.engine.mock",
    "MockEngineConfig": "sagellm_backend.engine.mock",
    "create_mock_engine": "sagellm_backend.engine.mock",
    "HFCudaEngine": "sagellm_backend.engine.hf_cuda",
    "HFCudaEngineConfig": "sagellm_backend.engine.hf_cuda",
    "create_cuda_engine": "sagellm_backend.engine.hf_cuda",
    "CPUEngine": "sagellm_backend.engine.cpu",
    "CPUEngineConfig": "sagellm_backend.engine.cpu",
    "create_cpu_engine": "sagellm_backend.engine.cpu",
    "EmbeddingEngine": "sagellm_backend.engine.embedding",
    "EmbeddingEngineConfig": "sagellm_backend.engine.embedding",
}


def __getattr__(name: str) -> Any:
    """Resolve lazily imported names (PEP 562)."""
    return resolve_lazy(globals(), _LAZY, name)


__all__ = ["BaseEngine", "EngineConfig", *sorted(_LAZY)]
