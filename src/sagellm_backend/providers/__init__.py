"""Backend providers: mock (no dependencies), cpu (host memory; torch when installed), cuda.

The 0.1.1.2 names are exported here; each is resolved on first attribute access (PEP 562),
so importing this package imports no provider module, and never torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sagellm_backend._lazy import lazy_table, resolve_lazy

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


def __getattr__(name: str) -> Any:
    """Resolve the lazily imported provider names (PEP 562)."""
    return resolve_lazy(globals(), _LAZY, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CPUBackendProvider",
    "CudaBackendProvider",
    "MockBackendProvider",
    "create_cpu_backend",
    "create_cuda_backend",
    "create_mock_backend",
]
