"""The torch provider core shared by the cpu and cuda providers.

:class:`TorchProviderBase` implements the whole :class:`~sagellm_backend.base.BackendProvider`
contract on torch: capability enforcement, streams/events, memory statistics, the KV cache on
real tensors (through :class:`~sagellm_backend.kv.provider_kv.ProviderKV`), the kernel
registry and collectives on ``torch.distributed``. What differs per device lives in a small
*device layer* (:class:`DeviceLayer`): the cpu one in :mod:`.cpu`, the cuda one in :mod:`.cuda`
(the only module allowed to call the CUDA runtime). CPU tests therefore exercise nearly all of
the CUDA provider's code.

This module does not import torch at import time: torch is imported when a provider is
created, so the provider modules (and their ``sagellm.backends`` entry points) import on a
machine without torch. A provider class decides with :meth:`TorchProviderBase._load_torch`
whether torch is required (cuda: its factory fails with the pip command) or optional (cpu:
without torch it keeps KV pages in host memory, registers no torch kernels and has
single-rank collectives; see :mod:`.cpu`).

Collectives are :class:`~._torch_collectives.TorchCollectives` (gloo on cpu, NCCL on cuda).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sagellm_backend.capability import CapabilityDescriptor, DType, parse_dtype
from sagellm_backend.errors import (
    ConfigError,
    DependencyMissingError,
    InvalidStateError,
    UnsupportedDTypeError,
)
from sagellm_backend.kernels.registry import KernelRegistry
from sagellm_backend.providers._kernel_methods import ProviderKernelMethods
from sagellm_backend.providers._kv_methods import ProviderKVMethods
from sagellm_backend.providers._torch_collectives import COLLECTIVE_OPS, TorchCollectives
from sagellm_backend.providers._torch_device import (
    TORCH_INSTALL_HINT,
    DeviceLayer,
    DeviceMemory,
    require_torch,
    torch_installed,
)
from sagellm_backend.providers._torch_options import TorchProviderOptions, parse_provider_config

if TYPE_CHECKING:
    import torch

    from sagellm_backend.base import Event, Stream
    from sagellm_backend.kv.provider_kv import ProviderKV

__all__ = [
    "COLLECTIVE_OPS",
    "TORCH_INSTALL_HINT",
    "DeviceLayer",
    "DeviceMemory",
    "TorchProviderBase",
    "TorchProviderOptions",
    "parse_provider_config",
    "require_torch",
    "torch_installed",
]

_MIB = 1 << 20


class TorchProviderBase(ProviderKVMethods, ProviderKernelMethods, TorchCollectives):
    """A :class:`~sagellm_backend.base.BackendProvider` on torch over a :class:`DeviceLayer`.

    Invariants:
        * ``capability()`` is read from the device at call time (memory) and from the
          registry (kernels); every dtype/collective call is checked against it.
        * The KV core (:class:`~sagellm_backend.kv.provider_kv.ProviderKV`) is created on
          first KV use, with the budget read then; its pools hold real tensors on their
          device (the own device, plus host offload pools where the layer has them).
          ``memory_stats()['kv_pool_bytes']`` is the capacity of the pools created so far
          on the own device; ``offload_kv_*`` keys cover the offload devices.
        * After :meth:`close` every KV call raises
          :class:`~sagellm_backend.errors.InvalidStateError`.
        * Process groups this provider created are destroyed by :meth:`close`; groups it
          adopted (initialised by someone else) are left alone.
    """

    #: Backend kind (the ``sagellm.backends`` entry-point name).
    kind: str = "torch"

    def __init__(
        self,
        layer: DeviceLayer,
        options: TorchProviderOptions | None = None,
        *,
        storage_factory: Any = None,
    ) -> None:
        self._options = options or TorchProviderOptions()
        self._torch = self._load_torch(self._options)
        self._layer = layer
        if storage_factory is None:
            from sagellm_backend.kv.storage import HostKVStorage, TorchKVStorage

            storage_factory = TorchKVStorage if self._torch is not None else HostKVStorage
        self._storage_factory = storage_factory
        self._id = self._options.provider_id or f"{self.kind}-{uuid.uuid4().hex[:12]}"
        self._dtypes: list[DType] = list(layer.supported_dtypes())
        self._dtype_set: frozenset[DType] | None = frozenset(self._dtypes)
        self._kernels = KernelRegistry()
        if self._torch is not None:  # kernels are registered only where they can run
            from sagellm_backend.kernels.torch_kernels import register_builtin_kernels

            register_builtin_kernels(self._kernels, dtypes=frozenset(self._dtypes))
        backend = layer.collective_backend()
        self._collective_backend = backend if self._options.enable_collectives else None
        self._lock = threading.RLock()
        self._kv: ProviderKV | None = None
        self._owns_group = False
        self._closed = False

    def _load_torch(self, options: TorchProviderOptions) -> Any:
        """Return torch, or None where this provider runs without it (default: torch is required).

        Raises:
            DependencyMissingError: torch is required and not installed (with the pip command).
            ConfigError: ``use_torch=False`` for a provider that cannot run without torch.
        """
        if options.use_torch is False:
            raise ConfigError(
                f"the {self.kind} backend always runs on torch; use_torch=False is a cpu "
                "backend option"
            )
        return require_torch(f"the {self.kind} backend")

    @property
    def uses_torch(self) -> bool:
        """Whether this provider's KV pages and collectives are torch tensors."""
        return self._torch is not None

    # ------------------------------------------------------------------ identity
    @property
    def provider_id(self) -> str:
        """Id stamped on every KV block of this provider."""
        return self._id

    @property
    def device(self) -> str:
        """Torch device string of this provider's tensors (``"cpu"``, ``"cuda:0"``)."""
        return self._layer.device

    @property
    def device_type(self) -> str:
        """``"cpu"`` or ``"cuda"``."""
        return self._layer.device_type

    @property
    def torch_device(self) -> torch.device:
        """This provider's device as a ``torch.device``.

        Raises:
            DependencyMissingError: this provider runs without torch (torch is not installed).
        """
        return self._need_torch("torch_device").device(self._layer.device)  # type: ignore[no-any-return]

    def _need_torch(self, what: str) -> Any:
        if self._torch is None:
            raise DependencyMissingError(
                f"{what} of the {self.kind} backend needs torch, which is not installed: "
                f"{TORCH_INSTALL_HINT}"
            )
        return self._torch

    @property
    def options(self) -> TorchProviderOptions:
        """The options this provider was created with."""
        return self._options

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r}, id={self._id!r})"

    # ------------------------------------------------------------------ capability
    def capability(self) -> CapabilityDescriptor:
        """Describe the device as it is now (memory is read at call time)."""
        mem = self._layer.memory()
        return CapabilityDescriptor(
            device_name=self._layer.device_name(),
            device_type=self._layer.device_type,
            compute_capability=self._layer.compute_capability(),
            total_memory_bytes=mem.total,
            available_memory_bytes=mem.free,
            supported_dtypes=list(self._dtypes),
            supported_kernels=self._kernels.kinds(),
            has_stream=True,
            has_event=True,
            has_collective=self._collective_backend is not None,
            has_graph_exec=self._layer.has_graph_exec,
            max_memory_mb=mem.total // _MIB,
        )

    @property
    def supported_dtypes(self) -> list[DType]:
        """Dtypes this provider accepts, in protocol order."""
        return list(self._dtypes)

    def check_dtype(self, dtype: DType | str) -> DType:
        """Return ``dtype`` as a :class:`DType` if supported here.

        Raises:
            UnsupportedDTypeError: naming the supported dtypes.
        """
        try:
            parsed = parse_dtype(dtype)
        except ValueError as exc:
            raise UnsupportedDTypeError(
                f"unknown dtype {dtype!r}; supported dtypes of the {self.kind} backend on "
                f"{self.device}: {self._dtype_list()}"
            ) from exc
        if parsed not in self._dtypes:
            raise UnsupportedDTypeError(
                f"dtype {parsed.value} is not supported by the {self.kind} backend on "
                f"{self.device}; supported dtypes: {self._dtype_list()}"
            )
        return parsed

    def torch_dtype(self, dtype: DType | str) -> torch.dtype:
        """The torch dtype of a supported protocol dtype (see :meth:`check_dtype`)."""
        from sagellm_backend.kernels.torch_kernels import to_torch_dtype

        self._need_torch("torch_dtype")
        return to_torch_dtype(self.check_dtype(dtype))

    def _dtype_list(self) -> str:
        return ", ".join(d.value for d in self._dtypes)

    # ------------------------------------------------------------------ streams/events
    def create_stream(self) -> Stream:
        """A new stream on this provider's device."""
        return self._layer.create_stream()

    def create_event(self) -> Event:
        """A new timing event (record it with ``stream.record_event`` or ``event.record()``)."""
        return self._layer.create_event()

    def synchronize(self) -> None:
        """Wait until all work queued on the device has finished."""
        self._layer.synchronize()

    # ------------------------------------------------------------------ memory
    def memory_stats(self) -> dict[str, int]:
        """Memory figures in bytes.

        Keys (always present): ``allocated``, ``reserved``, ``peak``, ``total``, ``free``
        (see :class:`DeviceMemory` for their source on each device); ``kv_pool_bytes``
        (capacity of the KV pools created so far on this device: the ``kv_block_alloc``
        pool and every manager's), ``kv_used_bytes`` (bytes of the pages in use there),
        ``kv_free_bytes`` (their difference). Once KV is used, also the figures of
        :meth:`~sagellm_backend.kv.provider_kv.ProviderKV.stats` (``kv_budget_bytes``,
        ``kv_reserved_bytes``, ``num_kv_blocks``, ``kv_evict_count``,
        ``offload_kv_used_bytes``, ...). Device extras, with 0.1.1.2's keys: cpu
        ``process_rss``, ``rss``, ``vms``, ``available``, ``used``; cuda ``peak_reserved``,
        ``allocated_bytes``, ``reserved_bytes``, ``allocated_mb``, ``reserved_mb``.
        """
        mem = self._layer.memory()
        stats: dict[str, int] = {
            "allocated": mem.allocated,
            "reserved": mem.reserved,
            "peak": mem.peak,
            "total": mem.total,
            "free": mem.free,
        }
        stats.update(mem.extra)
        kv = self._kv
        kv_stats = kv.stats() if kv is not None else {}
        stats["kv_pool_bytes"] = int(kv_stats.get("kv_pool_bytes", 0))
        stats["kv_used_bytes"] = int(kv_stats.get("kv_used_bytes", 0))
        stats["kv_free_bytes"] = stats["kv_pool_bytes"] - stats["kv_used_bytes"]
        for key, value in kv_stats.items():
            stats.setdefault(key, int(value))
        return stats

    def reset_peak_memory_stats(self) -> None:
        """Reset the ``peak`` counter where the device allows it (cuda; cpu cannot)."""
        self._layer.reset_peak_memory()

    def clear_cache(self) -> None:
        """Release cached memory nothing references.

        Drops every evictable (unreferenced, prefix-cached) KV page of this provider's
        pools, then has the device release its allocator cache (cuda: ``empty_cache``;
        cpu: ``malloc_trim`` where glibc provides it).
        """
        kv = self._kv
        if kv is not None:
            kv.clear_cache()
        self._layer.empty_cache()

    # ------------------------------------------------------------------ kernels
    def get_kernel(self, name: str) -> Callable[..., Any]:
        """The kernel registered under ``name`` (``KernelNotFoundError``, a KeyError, if none)."""
        return self._kernels.get(name)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Destroy the process group this provider created and drop its KV pools.

        Idempotent. Blocks handed out before are invalid afterwards.
        """
        self.shutdown_distributed()
        with self._lock:
            self._kv = None
            self._closed = True
        self._layer.empty_cache()

    def __enter__(self) -> TorchProviderBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ KV cache
    def _kv_core(self) -> ProviderKV:
        """The provider's :class:`ProviderKV`, created on first use (budget read then)."""
        kv = self._kv
        if kv is not None:
            return kv
        with self._lock:
            if self._closed:
                raise InvalidStateError(f"{self!r} is closed")
            if self._kv is None:
                self._kv = self._build_kv()
            return self._kv

    def _build_kv(self) -> ProviderKV:
        from sagellm_backend.kv.provider_kv import ProviderKV
        from sagellm_backend.kv.spec import DEFAULT_KV_SPEC

        opts = self._options
        budget = self.kv_budget_bytes()
        spec = opts.kv_spec or DEFAULT_KV_SPEC
        offload: dict[str, int] = {}
        for dev in self._layer.offload_devices():
            offload[dev] = opts.offload_memory_bytes or self._default_offload_budget(budget)
        aliases = {f"{self._layer.device_type}:0": self._layer.device}
        if self._layer.device_type != self._layer.device:
            aliases[self._layer.device_type] = self._layer.device
        return ProviderKV(
            owner=self._id,
            device=self._layer.device,
            supported_dtypes=self._dtypes,
            storage_factory=self._storage_factory,
            memory_bytes=budget,
            spec=spec,
            block_pool_bytes=opts.kv_block_pool_bytes,
            offload=offload,
            aliases={k: v for k, v in aliases.items() if k != v},
        )

    def kv_budget_bytes(self) -> int:
        """KV byte budget on this device (fixed once the KV core exists).

        ``kv_memory_bytes``, else ``kv_memory_fraction`` of free device memory now, else the
        device default (see :class:`TorchProviderOptions`).
        """
        kv = self._kv
        if kv is not None:
            return int(kv.device_stats()["kv_budget_bytes"])
        opts = self._options
        if opts.kv_memory_bytes is not None:
            return opts.kv_memory_bytes
        free = self._layer.memory().free
        if opts.kv_memory_fraction is not None:
            return int(free * opts.kv_memory_fraction)
        return self._layer.default_kv_budget(free)

    def _default_offload_budget(self, device_budget: int) -> int:
        try:
            import psutil

            host_free = int(psutil.virtual_memory().available)
        except ImportError:  # pragma: no cover - psutil ships with the torch extra
            host_free = device_budget
        return min(device_budget, host_free // 4)
