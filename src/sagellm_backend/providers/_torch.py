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

Collectives:
    ``init_distributed()`` joins (or adopts) a ``torch.distributed`` process group: gloo for
    cpu, NCCL for cuda. ``all_reduce(tensor, op)`` reduces in place with ``op`` in
    ``sum, avg, max, min, product`` (``avg`` on gloo is a sum divided by the world size);
    ``all_gather(tensor)`` returns a new tensor holding every rank's tensor concatenated
    along dim 0 in rank order (a 0-d tensor gathers to shape ``[world_size]``). Without a
    process group both have single-rank semantics: ``all_reduce`` leaves the tensor as it is
    and ``all_gather`` returns a copy (shape ``[1]`` for a 0-d tensor). With collectives
    disabled (``enable_collectives=False`` or no usable backend) both raise
    :class:`~sagellm_backend.errors.CapabilityNotSupportedError`.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from sagellm_backend.base import Event, KVBlock, Stream
from sagellm_backend.capability import CapabilityDescriptor, DType, KernelKind, parse_dtype
from sagellm_backend.errors import (
    CapabilityNotSupportedError,
    ConfigError,
    DependencyMissingError,
    InvalidStateError,
    UnsupportedDTypeError,
)
from sagellm_backend.kernels.registry import KernelRegistry

if TYPE_CHECKING:
    import torch

    from sagellm_backend.kv.manager import KVCacheManager
    from sagellm_backend.kv.provider_kv import ProviderKV
    from sagellm_backend.kv.spec import KVSpec

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

#: What to run when torch is missing.
TORCH_INSTALL_HINT = "pip install 'isagellm-backend[torch]'"

#: Valid ``op`` values of :meth:`TorchProviderBase.all_reduce`.
COLLECTIVE_OPS: tuple[str, ...] = ("sum", "avg", "max", "min", "product")

_MIB = 1 << 20


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


@dataclass(frozen=True)
class TorchProviderOptions:
    """Options of the torch providers (config dict keys or factory keyword arguments).

    Attributes:
        device: ``"cpu"``; ``"cuda"`` / ``"cuda:N"`` for the cuda provider.
        kv_memory_bytes: byte budget of the default KV pool (the one ``kv_block_alloc``
            uses); exclusive with ``kv_memory_fraction``.
        kv_memory_fraction: budget as a fraction (0, 1] of the device's free memory when
            KV is first used. Neither given: the device layer's default (cpu: min(512 MiB,
            10% of available RAM); cuda: 50% of free device memory). The budget caps the
            ``kv_block_alloc`` pool plus every ``create_kv_manager`` pool; nothing is
            allocated until a pool is created.
        kv_block_pool_bytes: size of the pool behind ``kv_block_alloc`` (default: a
            quarter of the budget), created on the first ``kv_block_alloc``.
        offload_memory_bytes: byte budget of each offload (host) pool; default: the device
            budget, capped at 25% of available host RAM.
        kv_spec: geometry of the default pool (default
            :data:`~sagellm_backend.kv.spec.DEFAULT_KV_SPEC`).
        enable_collectives: False disables collectives (capability ``has_collective``
            False; calls raise).
        provider_id: id stamped on KV blocks (default: a fresh unique id).
        use_torch: cpu only: None (default) uses torch when it is importable; False keeps
            KV pages in host memory without torch even when it is installed (no torch
            kernels, single-rank collectives). The cuda backend always needs torch.
    """

    device: str | None = None
    kv_memory_bytes: int | None = None
    kv_memory_fraction: float | None = None
    kv_block_pool_bytes: int | None = None
    offload_memory_bytes: int | None = None
    kv_spec: KVSpec | None = None
    enable_collectives: bool = True
    provider_id: str | None = None
    use_torch: bool | None = None

    def __post_init__(self) -> None:
        for name in ("kv_memory_bytes", "kv_block_pool_bytes", "offload_memory_bytes"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise ConfigError(f"{name} must be a positive integer of bytes, got {value!r}")
        frac = self.kv_memory_fraction
        if frac is not None:
            if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 < frac <= 1:
                raise ConfigError(f"kv_memory_fraction must be in (0, 1], got {frac!r}")
            if self.kv_memory_bytes is not None:
                raise ConfigError("give kv_memory_bytes or kv_memory_fraction, not both")
        if self.use_torch is not None and not isinstance(self.use_torch, bool):
            raise ConfigError(f"use_torch must be None, True or False, got {self.use_torch!r}")
        if not isinstance(self.enable_collectives, bool):
            raise ConfigError(f"enable_collectives must be a bool, got {self.enable_collectives!r}")
        if self.device is not None and not isinstance(self.device, str):
            raise ConfigError(
                f"device must be a string such as 'cpu' or 'cuda:0', got {self.device!r}"
            )
        if self.kv_spec is not None:
            from sagellm_backend.kv.spec import KVSpec

            if not isinstance(self.kv_spec, KVSpec):
                raise ConfigError(f"kv_spec must be a KVSpec, got {self.kv_spec!r}")


_OPTION_NAMES = tuple(f.name for f in fields(TorchProviderOptions))


def parse_provider_config(
    kind: str, config: Any = None, overrides: Mapping[str, Any] | None = None
) -> tuple[TorchProviderOptions, list[int] | None]:
    """Normalise a backend config into :class:`TorchProviderOptions`.

    Accepts ``None``, a mapping (option names, plus ``kind`` and ``device_ids``), a
    :class:`TorchProviderOptions`, or a sagellm-core ``BackendConfig``-like object (attributes
    ``kind``, ``device``, ``device_ids``; any option names it has as attributes are read too).
    ``overrides`` (factory keyword arguments) win over ``config``.

    Returns:
        The options and the ``device_ids`` given (None when absent).

    Raises:
        ConfigError: unknown keys, a ``kind`` other than ``kind``, or invalid values.
    """
    values: dict[str, Any] = {}
    if config is None:
        pass
    elif isinstance(config, TorchProviderOptions):
        values = {n: getattr(config, n) for n in _OPTION_NAMES}
    elif isinstance(config, Mapping):
        values = dict(config)
    else:
        for name in ("kind", "device", "device_ids", *_OPTION_NAMES):
            if hasattr(config, name):
                values[name] = getattr(config, name)
    values.update(overrides or {})
    given_kind = values.pop("kind", None)
    if given_kind is not None and str(given_kind) != kind:
        raise ConfigError(f"config kind {given_kind!r} given to the {kind!r} backend factory")
    device_ids = values.pop("device_ids", None)
    unknown = sorted(set(values) - set(_OPTION_NAMES))
    if unknown:
        valid = ", ".join(("kind", "device_ids", *_OPTION_NAMES))
        raise ConfigError(f"unknown {kind} backend option(s) {unknown}; valid options: {valid}")
    if device_ids is not None:
        if isinstance(device_ids, int) and not isinstance(device_ids, bool):
            device_ids = [device_ids]
        if not isinstance(device_ids, list | tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in device_ids
        ):
            raise ConfigError(
                f"device_ids must be a list of device indices >= 0, got {device_ids!r}"
            )
        device_ids = list(device_ids)
    try:
        return TorchProviderOptions(**values), device_ids
    except TypeError as exc:  # pragma: no cover - unknown keys are caught above
        raise ConfigError(str(exc)) from exc


class TorchProviderBase:
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

    @property
    def kernels(self) -> KernelRegistry:
        """The kernel registry (its kinds are ``capability().supported_kernels``)."""
        return self._kernels

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
        ``offload_kv_used_bytes``, ...). Device extras: cpu ``process_rss``; cuda
        ``peak_reserved``.
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
    def register_kernel(
        self,
        name: str,
        impl: Callable[..., Any],
        *,
        kind: KernelKind | None = None,
        dtypes: Iterable[DType] = (),
        replace: bool = False,
        description: str = "",
    ) -> None:
        """Register ``impl`` under ``name``.

        Raises:
            KernelAlreadyRegisteredError: ``name`` exists and ``replace`` is False.
            UnsupportedDTypeError: ``dtypes`` names a dtype this provider does not support.
        """
        checked = [self.check_dtype(d) for d in dtypes]
        self._kernels.register(
            name, impl, kind=kind, dtypes=checked, description=description, replace=replace
        )

    def get_kernel(self, name: str) -> Callable[..., Any]:
        """The kernel registered under ``name`` (``KernelNotFoundError``, a KeyError, if none)."""
        return self._kernels.get(name)

    # ------------------------------------------------------------------ collectives
    @property
    def is_distributed(self) -> bool:
        """Whether a torch.distributed process group is initialised in this process."""
        dist = self._dist()
        return dist is not None and bool(dist.is_initialized())

    @property
    def rank(self) -> int:
        """This process's rank (0 without a process group)."""
        return int(self._dist().get_rank()) if self.is_distributed else 0

    @property
    def world_size(self) -> int:
        """Ranks in the process group (1 without one)."""
        return int(self._dist().get_world_size()) if self.is_distributed else 1

    def init_distributed(
        self,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        init_method: str | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        """Join a torch.distributed process group (gloo on cpu, NCCL on cuda).

        ``rank``/``world_size`` default to the ``RANK``/``WORLD_SIZE`` environment
        variables; ``init_method`` defaults to ``env://`` (``MASTER_ADDR``/``MASTER_PORT``).
        If a process group is already initialised in this process it is adopted (and not
        destroyed by :meth:`close`), provided it uses this device's backend.

        Raises:
            CapabilityNotSupportedError: collectives are disabled or unusable here.
            ConfigError: rank/world size/rendezvous settings are missing or invalid.
        """
        backend = self._require_collectives()
        dist = self._dist()
        if dist is None:  # no torch: one rank is all there can be
            rank = _env_int("RANK", rank) if rank is not None or "RANK" in os.environ else 0
            world_size = (
                _env_int("WORLD_SIZE", world_size)
                if world_size is not None or "WORLD_SIZE" in os.environ
                else 1
            )
            if world_size != 1 or rank != 0:
                raise DependencyMissingError(
                    f"collectives across {world_size} ranks need torch.distributed, and this "
                    f"{self.kind} provider runs without torch (not installed, or "
                    f"use_torch=False): {TORCH_INSTALL_HINT}; without torch it runs a single "
                    "rank (world_size=1, rank=0)"
                )
            return
        with self._lock:
            if dist.is_initialized():
                current = str(dist.get_backend())
                if backend not in current:  # "gloo" or e.g. "cpu:gloo,cuda:nccl"
                    raise ConfigError(
                        f"a {current!r} process group is already initialised; the "
                        f"{self.kind} backend needs {backend!r}"
                    )
                return
            rank = _env_int("RANK", rank)
            world_size = _env_int("WORLD_SIZE", world_size)
            if world_size < 1 or not 0 <= rank < world_size:
                raise ConfigError(
                    f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
                )
            if init_method is None:
                missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
                if missing:
                    raise ConfigError(
                        f"init_distributed: set {' and '.join(missing)} or pass init_method "
                        "(e.g. 'tcp://127.0.0.1:29500')"
                    )
                init_method = "env://"
            if timeout_s <= 0:
                raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
            self._layer.prepare_collectives()
            dist.init_process_group(
                backend=backend,
                init_method=init_method,
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
            )
            self._owns_group = True

    def shutdown_distributed(self) -> None:
        """Destroy the process group if this provider created it (idempotent)."""
        with self._lock:
            dist = self._dist()
            if self._owns_group and dist is not None and dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False

    def all_reduce(self, tensor: Any, op: str = "sum") -> None:
        """Reduce ``tensor`` in place across ranks.

        Args:
            tensor: a torch tensor on this provider's device (cpu tensors for gloo).
            op: one of ``sum, avg, max, min, product``.

        Raises:
            ValueError: unknown ``op`` (listing the valid ones), or ``avg`` of an integer
                tensor, or a tensor on another device.
            CapabilityNotSupportedError: collectives are disabled here.
        """
        op_name = _check_op(op)
        self._require_collectives()
        if self._torch is None:
            _check_host_tensor(tensor, "all_reduce")
            return  # single rank without torch: the reduction of one tensor is itself
        self._check_collective_tensor(tensor, "all_reduce")
        if op_name == "avg" and not (tensor.is_floating_point() or tensor.is_complex()):
            raise ValueError(f"all_reduce op 'avg' needs a floating tensor, got {tensor.dtype}")
        if not self.is_distributed:
            return  # single rank: the reduction of one tensor is itself
        dist = self._dist()
        assert dist is not None
        reduce_op = dist.ReduceOp
        if op_name == "avg":
            if str(dist.get_backend()) == "nccl":
                dist.all_reduce(tensor, op=reduce_op.AVG)
            else:  # gloo has no AVG
                dist.all_reduce(tensor, op=reduce_op.SUM)
                tensor.div_(dist.get_world_size())
            return
        ops = {
            "sum": reduce_op.SUM,
            "max": reduce_op.MAX,
            "min": reduce_op.MIN,
            "product": reduce_op.PRODUCT,
        }
        dist.all_reduce(tensor, op=ops[op_name])

    def all_gather(self, tensor: Any) -> Any:
        """Gather ``tensor`` from every rank; returns a new tensor.

        Every rank must pass a tensor of the same shape and dtype. The result is the
        ranks' tensors concatenated along dim 0 in rank order (``[world_size * n, ...]``
        for an input of ``[n, ...]``; ``[world_size]`` for a 0-d input).

        Raises:
            CapabilityNotSupportedError: collectives are disabled here.
            ValueError: a tensor on another device.
        """
        self._require_collectives()
        if self._torch is None:
            _check_host_tensor(tensor, "all_gather")
            return [tensor] if _is_number(tensor) else copy.deepcopy(list(tensor))
        self._check_collective_tensor(tensor, "all_gather")
        src = tensor.reshape(1) if tensor.dim() == 0 else tensor
        if not self.is_distributed:
            return src.clone()
        dist = self._dist()
        assert dist is not None
        src = src.contiguous()
        parts = [self._torch.empty_like(src) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, src)
        return self._torch.cat(parts, dim=0)

    def _dist(self) -> Any:
        if self._torch is None:
            return None
        dist = self._torch.distributed
        return dist if dist.is_available() else None

    def _require_collectives(self) -> str:
        backend = self._collective_backend
        if backend is None:
            why = (
                "collectives are disabled (enable_collectives=False)"
                if not self._options.enable_collectives
                else f"torch.distributed has no usable backend for {self.device_type} here"
            )
            raise CapabilityNotSupportedError(
                f"{self.kind} backend: {why}; capability().has_collective is False"
            )
        return backend

    def _check_collective_tensor(self, tensor: Any, what: str) -> None:
        if not isinstance(tensor, self._torch.Tensor):
            raise TypeError(f"{what} needs a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != self.torch_device.type:
            raise ValueError(
                f"{what}: tensor is on {tensor.device}, the {self.kind} backend's "
                f"collectives run on {self.device}"
            )

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

    @property
    def kv(self) -> ProviderKV:
        """The KV core (created on first access): pools, blocks, managers, figures."""
        return self._kv_core()

    def kv_block_alloc(self, num_tokens: int, dtype: DType) -> KVBlock:
        """Reserve real KV pages for ``num_tokens`` tokens of ``dtype`` on this device.

        Raises:
            UnsupportedDTypeError: ``dtype`` is not supported here (names the supported ones).
            KVCacheExhaustedError: not enough free pages (the pool is unchanged).
        """
        checked = self.check_dtype(dtype)
        return self._kv_core().alloc(num_tokens, checked)

    def kv_block_free(self, block: KVBlock) -> None:
        """Release ``block`` (InvalidKVBlockError on double free or a foreign block)."""
        self._kv_core().free(block)

    def kv_block_copy(self, src: KVBlock, dst: KVBlock) -> None:
        """Copy ``src``'s K/V into ``dst`` (same dtype, ``dst`` large enough; any devices)."""
        self._kv_core().copy(src, dst)

    def kv_block_migrate(self, block: KVBlock, target_device: str) -> KVBlock:
        """Move ``block``'s bytes to ``target_device`` and release the source block.

        Targets: this device and its offload devices (cuda: ``"cpu"``).

        Raises:
            UnsupportedDeviceError: another target (the message lists the valid ones).
        """
        return self._kv_core().migrate(block, target_device)

    def get_kv_tensor(self, block: KVBlock) -> list[Any]:
        """Writable zero-copy views of ``block``'s pages, in token order.

        Each view is ``[num_layers, 2, tokens_per_page(dtype), kv_heads, head_dim]`` in the
        block's dtype, on the block's device (index 0 of dim 1 is K, 1 is V).
        """
        return self._kv_core().tensor(block)

    def create_kv_manager(
        self,
        spec: KVSpec | None = None,
        *,
        memory_bytes: int | None = None,
        num_pages: int | None = None,
        enable_prefix_caching: bool = True,
    ) -> KVCacheManager:
        """A :class:`~sagellm_backend.kv.manager.KVCacheManager` over real tensors here.

        Its pool holds ``num_pages`` pages, or as many as fit in ``memory_bytes``, or what is
        left of the KV budget; it is charged to the budget until
        :meth:`release_kv_manager`. ``manager.storage.layer_kv(layer)`` gives the flat-slot
        K/V caches that the ``paged_attention`` kernel reads.

        ``spec`` None means the provider's KV spec (``kv_spec`` option).

        Raises:
            ConfigError: (a ValueError) an invalid argument, naming the valid values.
            UnsupportedDTypeError: ``spec.dtype`` is not supported here.
            KVCacheExhaustedError: the budget cannot hold the pool.
        """
        return self._kv_core().create_manager(
            spec,
            memory_bytes=memory_bytes,
            num_pages=num_pages,
            enable_prefix_caching=enable_prefix_caching,
        )

    def release_kv_manager(self, manager: KVCacheManager) -> None:
        """Return a manager's pool to the KV budget (it must hold no sequences).

        A second release of the same manager is a no-op.
        """
        self._kv_core().release_manager(manager)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_host_tensor(tensor: Any, what: str) -> None:
    """Without torch, collectives take a number or a (nested) list/tuple of numbers."""

    def ok(v: Any) -> bool:
        return _is_number(v) or (isinstance(v, list | tuple) and all(ok(x) for x in v))

    if not ok(tensor):
        raise TypeError(
            f"{what} without torch takes a number or a (nested) list of numbers, got "
            f"{type(tensor).__name__}; install torch for tensors: {TORCH_INSTALL_HINT}"
        )


def _check_op(op: str) -> str:
    name = str(op).lower() if isinstance(op, str) else None
    if name not in COLLECTIVE_OPS:
        raise ValueError(f"unknown collective op {op!r}; valid ops: {', '.join(COLLECTIVE_OPS)}")
    return name


def _env_int(var: str, value: int | None) -> int:
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{var.lower()} must be an int, got {value!r}")
        return value
    raw = os.environ.get(var)
    if raw is None:
        raise ConfigError(
            f"init_distributed: pass {var.lower()}= or set the {var} environment variable"
        )
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable {var}={raw!r} is not an integer") from exc
