"""The torch check and the device layer of the torch providers (:mod:`.cpu`, :mod:`.cuda`).

Nothing here imports torch at import time: :func:`require_torch` imports it on demand.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sagellm_backend.base import Event, Stream
from sagellm_backend.capability import DType
from sagellm_backend.errors import DependencyMissingError

#: What to run when torch is missing.
TORCH_INSTALL_HINT = "pip install 'isagellm-backend[torch]'"


def torch_installed() -> bool:
    """Whether torch can be imported here (checked without importing it)."""
    return importlib.util.find_spec("torch") is not None


def require_torch(what: str) -> Any:
    """Import and return torch, or raise :class:`DependencyMissingError` with the pip command.

    Args:
        what: the component that needs torch, for the message (e.g. ``"the cpu backend"``).
    """
    try:
        import torch
    except ImportError as exc:
        raise DependencyMissingError(
            f"{what} needs torch, which is not installed: {TORCH_INSTALL_HINT}"
        ) from exc
    return torch


@dataclass(frozen=True)
class DeviceMemory:
    """One reading of a device's memory, in bytes.

    Attributes:
        total: device memory (cpu: host RAM).
        free: memory available to new allocations (cpu: ``psutil`` available RAM).
        allocated: bytes held by live tensors (cpu: resident set size of this process).
        reserved: bytes held by the allocator, ``>= allocated`` (cpu: equal to allocated).
        peak: high-water mark of ``allocated`` since the last reset (cpu: peak RSS of the
            process, which cannot be reset).
        extra: device-specific figures merged into :meth:`TorchProviderBase.memory_stats`.
    """

    total: int
    free: int
    allocated: int
    reserved: int
    peak: int
    extra: Mapping[str, int] = field(default_factory=dict)


class DeviceLayer(Protocol):
    """The device-specific part of a torch provider (cpu in :mod:`.cpu`, cuda in :mod:`.cuda`).

    Attributes:
        device_type: ``"cpu"`` or ``"cuda"`` (the capability's ``device_type``).
        device: torch device string where the provider's tensors live (``"cuda:0"``).
        has_graph_exec: whether graph capture/replay is available.
    """

    device_type: str
    device: str
    has_graph_exec: bool

    def device_name(self) -> str:
        """Human-readable device name."""
        ...

    def compute_capability(self) -> str | None:
        """Compute capability (``"8.0"``) or CPU ISA level (``"AVX512"``)."""
        ...

    def supported_dtypes(self) -> list[DType]:
        """Dtypes the device computes and stores, in protocol order."""
        ...

    def memory(self) -> DeviceMemory:
        """Read the device's memory figures now."""
        ...

    def reset_peak_memory(self) -> None:
        """Reset the peak counter where the device allows it."""
        ...

    def empty_cache(self) -> None:
        """Release allocator-cached memory that no tensor uses."""
        ...

    def synchronize(self) -> None:
        """Wait for all work queued on the device."""
        ...

    def create_stream(self) -> Stream:
        """A new stream on the device."""
        ...

    def create_event(self) -> Event:
        """A new timing event."""
        ...

    def collective_backend(self) -> str | None:
        """The torch.distributed backend this device uses, or None when it is unusable."""
        ...

    def prepare_collectives(self) -> None:
        """Bind the process to the device before joining a process group."""
        ...

    def offload_devices(self) -> tuple[str, ...]:
        """Other devices the provider keeps KV pools on (cuda: ``("cpu",)`` for offload)."""
        ...

    def default_kv_budget(self, free_bytes: int) -> int:
        """Bytes for the default KV pool when no budget is configured."""
        ...
