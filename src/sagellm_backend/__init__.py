"""sagellm-backend: the hardware-abstraction layer of the sageLLM stack.

Importing this package is cheap and never imports torch or transformers: every public name
is resolved lazily on first attribute access (PEP 562) -- the protocol types (which import
pydantic) on first use of any of them, the providers and engines when first named.

Example:
    >>> from sagellm_backend import MockBackendProvider, DType
    >>> backend = MockBackendProvider(supported_dtypes=[DType.FP16, DType.BF16])
    >>> block = backend.kv_block_alloc(128, DType.FP16)
    >>> block.num_tokens
    128
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sagellm_backend._lazy import lazy_module_hooks, lazy_table
from sagellm_backend._version import __version__

if TYPE_CHECKING:
    from sagellm_backend.base import BackendProvider, Event, KVBlock, Stream
    from sagellm_backend.capability import CapabilityDescriptor, DType, KernelKind
    from sagellm_backend.engine.base import BaseEngine, EngineConfig
    from sagellm_backend.engine.embedding import EmbeddingEngine, EmbeddingEngineConfig
    from sagellm_backend.engine.factory import EngineFactory
    from sagellm_backend.engine.mock import MockEngine, MockEngineConfig, create_mock_engine
    from sagellm_backend.providers.cpu import CPUBackendProvider, create_cpu_backend
    from sagellm_backend.providers.cuda import CudaBackendProvider, create_cuda_backend
    from sagellm_backend.providers.mock import MockBackendProvider, create_mock_backend
    from sagellm_backend.registry import BackendRegistry, create_backend, list_backends

_LAZY = lazy_table(
    {
        "sagellm_backend.base": ("BackendProvider", "Event", "KVBlock", "Stream"),
        "sagellm_backend.capability": ("CapabilityDescriptor", "DType", "KernelKind"),
        "sagellm_backend.providers.mock": ("MockBackendProvider", "create_mock_backend"),
        "sagellm_backend.providers.cpu": ("CPUBackendProvider", "create_cpu_backend"),
        "sagellm_backend.providers.cuda": ("CudaBackendProvider", "create_cuda_backend"),
        "sagellm_backend.engine.base": ("BaseEngine", "EngineConfig"),
        "sagellm_backend.engine.factory": ("EngineFactory",),
        "sagellm_backend.engine.mock": ("MockEngine", "MockEngineConfig", "create_mock_engine"),
        "sagellm_backend.engine.embedding": ("EmbeddingEngine", "EmbeddingEngineConfig"),
        "sagellm_backend.registry": ("BackendRegistry", "create_backend", "list_backends"),
    }
)


#: Submodules reachable as attributes before they are imported (they used to be imported
#: eagerly by this package).
_SUBMODULES = frozenset({"base", "capability", "errors", "engine", "providers", "kv", "registry"})


# PEP 562: the public names resolve on first access; dir() lists them before that.
__getattr__, __dir__ = lazy_module_hooks(globals(), _LAZY, _SUBMODULES)


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
