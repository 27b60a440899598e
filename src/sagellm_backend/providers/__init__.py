"""Backend providers: mock (no dependencies), cpu (host memory; torch when installed), cuda.

The 0.1.1.2 names are exported here; each is resolved on first attribute access (PEP 562),
so importing this package imports no provider module, and never torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sagellm_backend._lazy import lazy_module_hooks, lazy_table

if TYPE_CHECKING:
    from sagellm_backend.providers.cpu import CPUBackendProvider, create_cpu_backend
    from sagellm_backend.providers.cuda import CudaBackendProvider, create_cuda_backend
    from sagellm_backend.providers.mock import MockBackendProvider, create_mock_backend

_LAZY = lazy_table(
    {
        "sagellm_backend.providers.cpu": ("CPUBackendProvider", "create_cpu_backend"),
        "sagellm_backend.providers.cuda": ("CudaBackendProvider", "create_cuda_backend"),
        "sagellm_backend.providers.mock": ("MockBackendProvider", "create_mock_backend"),
    }
)


# PEP 562: the provider names resolve on first access; dir() lists them before that.
__getattr__, __dir__ = lazy_module_hooks(globals(), _LAZY)


__all__ = [
    "CPUBackendProvider",
    "CudaBackendProvider",
    "MockBackendProvider",
    "create_cpu_backend",
    "create_cuda_backend",
    "create_mock_backend",
]
