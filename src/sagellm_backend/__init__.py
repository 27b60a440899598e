"""sagellm-backend: the hardware-abstraction layer of the sageLLM stack.

Importing this package is cheap and never imports torch or transformers: the names that
need them (the cpu/cuda providers, the HF engines, the embedding engine) are resolved
lazily on first attribute access.

Example:
    >>> from sagellm_backend import MockBackendProvider, DType
    >>> backend = MockBackendProvider(supported_dtypes=[DType.FP16, DType.BF16])
    >>> block = backend.kv_block_alloc(128, DType.FP16)
    >>> block.num_tokens
    128
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sagellm_backend._version import __version__
from sagellm_backend.base import BackendProvider, Event, KVBlock, Stream
from sagellm_backend.capability import CapabilityDescriptor, DType, KernelKind

if TYPE_CHECKING:
    from sagellm_backend.engine.base import BaseEngine, EngineConfig
    from sagellm_backend.engine.embedding import EmbeddingEngine, EmbeddingEngineConfig
    from sagellm_backend.engine.factory import EngineFactory
    from sagellm_backend.engine.mock import MockEngine, MockEngineConfig, create_mock_engine
    from sagellm_backend.providers.cpu import CPUBackendProvider, create_cpu_backend
    from sagellm_backend.providers.cuda import CudaBackendProvider, create_cuda_backend
    from sagellm_backend.providers.mock import MockBackendProvider, create_mock_backend
    from sagellm_backend.registry import BackendRegistry, create_backend, list_backends

_LAZY: dict[str, str] = {
    "MockBackendProvider": "sagellm_backend.providers.mock",
    "create_mock_backend": "sagellm_backend.providers.mock",
    "CPUBackendProvider": "sagellm_backend.providers.cpu",
    "create_cpu_backend": "sagellm_backend.providers.cpu",
    "CudaBackendProvider": "sagellm_backend.providers.cuda",
    "create_cuda_backend": "sagellm_backend.providers.cuda",
    "BaseEngine": "sagellm_backend.engine.base",
    "EngineConfig": "sagellm_backend.engine.base",
    "EngineFactory": "sagellm_backend.engine.factory",
    "MockEngine": "sagellm_backend.engine.mock",
    "MockEngineConfig": "sagellm_backend.engine.mock",
    "create_mock_engine": "sagellm_backend.engine.mock",
    "EmbeddingEngine": "sagellm_backend.engine.embedding",
    "EmbeddingEngineConfig": "sagellm_backend.engine.embedding",
    "BackendRegistry": "sagellm_backend.registry",
    "create_backend": "sagellm_backend.registry",
    "list_backends": "sagellm_backend.registry",
}


def __getattr__(name: str) -> Any:
    """Resolve the lazily imported public names (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BackendProvider",
    "BackendRegistry",
    "BaseEngine",
    "CPUBackendProvider",
    "CapabilityDescriptor",
    "CudaBackendProvider",
    "DType",
    "EmbeddingEngine",
    "EmbeddingEngineConfig",
    "EngineConfig",
    "EngineFactory",
    "Event",
    "KVBlock",
    "KernelKind",
    "MockBackendProvider",
    "MockEngine",
    "MockEngineConfig",
    "Stream",
    "__version__",
    "create_backend",
    "create_cpu_backend",
    "create_cuda_backend",
    "create_mock_backend",
    "create_mock_engine",
    "list_backends",
]
