"""Kernel registry and built-in kernels (the torch ones load lazily)."""

from sagellm_backend.kernels.registry import KernelRegistry, KernelSpec

__all__ = ["KernelRegistry", "KernelSpec"]
