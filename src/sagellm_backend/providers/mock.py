"""MockBackendProvider: a faithful, dependency-free provider for CI and development.

It keeps real accounting and fails the way real providers do, so code tested against it
behaves the same on hardware:

* **Capability matrix**: dtypes, kernels, streams/events/collectives/graphs, memory, device
  name/type, batch/sequence limits are configurable, and what it advertises it enforces:
  an unsupported dtype raises :class:`~sagellm_backend.errors.UnsupportedDTypeError` (a
  ``ValueError``) naming the supported ones; collectives with ``has_collective=False`` and
  streams/events with ``has_stream``/``has_event`` False raise
  :class:`~sagellm_backend.errors.CapabilityNotSupportedError` (``NotImplementedError``);
  an unknown kernel raises :class:`~sagellm_backend.errors.KernelNotFoundError` (``KeyError``)
  naming the registered ones.
* **KV cache**: the shared :class:`~sagellm_backend.kv.provider_kv.ProviderKV` over
  :class:`~sagellm_backend.kv.storage.AccountingStorage` (no bytes, real pages, refcounts,
  budget = ``max_memory_mb``), plus a simulated host pool (``offload_device="cpu"``) as a
  migration target. ``get_kv_tensor(block)`` returns one
  :class:`~sagellm_backend.kv.storage.PageRef` descriptor per page.
* **Kernels**: real pure-Python implementations (on nested lists of numbers) of the kinds it
  advertises: ``matmul`` (MATMUL), ``attention`` (ATTENTION), ``layer_norm``/``rms_norm``
  (LAYERNORM), ``softmax`` (SOFTMAX), ``silu_and_mul`` (FUSION).
  ``capability().supported_kernels`` is derived from the registry.
* **Events** measure real elapsed time (``time.perf_counter``); mock work is synchronous, so
  ``synchronize`` returns at once.
* **Collectives** simulate ``world_size`` ranks that all hold the same data: with one rank
  ``all_reduce`` is an in-place no-op and ``all_gather`` returns a one-element gather; with
  ``N`` ranks ``sum`` multiplies by ``N``, ``product`` raises to the power ``N``, ``avg``/
  ``max``/``min`` keep the value, and ``all_gather`` concatenates ``N`` copies along the
  first axis. Calls are counted in ``collective_calls``.
* **Fault injection** (for sagellm-core's CI): ``fail_on_init``, ``fail_kv_after_pages``,
  ``failing_kernels``, ``kernel_latency_ms``, ``collective_latency_ms``; also settable later
  with :meth:`MockBackendProvider.inject_kernel_failure` / :meth:`MockBackendProvider.clear_faults`.

Memory figures (:meth:`MockBackendProvider.memory_stats`, bytes unless noted): ``total``
(``max_memory_mb``), ``allocated`` (KV charged to the budget: pages of live blocks plus
every KV manager's pool), ``peak`` (highest ``allocated``), ``free`` (``total -
allocated``), ``reserved`` (= ``allocated``: the mock has no caching allocator),
``kv_pool_bytes``, ``kv_used_bytes``, ``num_kv_blocks``, the 0.1.1.x keys
``allocated_bytes``/``reserved_bytes``/``allocated_mb``/``reserved_mb``, and the
``kv_*``/``offload_*`` figures of :meth:`ProviderKV.stats`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sagellm_backend.base import Event as Event  # 0.1.1.2 export
from sagellm_backend.base import KVBlock as KVBlock  # 0.1.1.2 export
from sagellm_backend.base import Stream as Stream  # 0.1.1.2 export
from sagellm_backend.capability import CapabilityDescriptor, DType, KernelKind
from sagellm_backend.errors import (
    BackendNotAvailableError,
    CapabilityNotSupportedError,
    ConfigError,
)
from sagellm_backend.kernels.registry import KernelRegistry
from sagellm_backend.kv.provider_kv import ProviderKV
from sagellm_backend.kv.spec import DEFAULT_KV_SPEC, KVSpec
from sagellm_backend.kv.storage import AccountingStorage
from sagellm_backend.providers._kernel_methods import ProviderKernelMethods
from sagellm_backend.providers._kv_methods import ProviderKVMethods
from sagellm_backend.providers._mock_config import (
    InjectedFaultError,
    KernelFault,
    _capability_matrix,
    _check_flags,
    _check_names,
    _faulty_kernel,
    _kernel_faults,
    _kernel_latencies,
    _mock_options,
    _non_negative,
    _positive_int,
)
from sagellm_backend.providers._mock_faults import MockFaults
from sagellm_backend.providers._mock_kernels import _BUILTIN_KERNELS, _gather, _reduce_in_place
from sagellm_backend.providers._mock_streams import MockEvent, MockStream

__all__ = [
    "COLLECTIVE_OPS",
    "InjectedFaultError",
    "MockBackendProvider",
    "MockEvent",
    "MockStream",
    "create_mock_backend",
]

MIB = 1 << 20

#: Reduction ops accepted by ``all_reduce``.
COLLECTIVE_OPS: tuple[str, ...] = ("sum", "avg", "max", "min", "product")


class MockBackendProvider(MockFaults, ProviderKVMethods, ProviderKernelMethods):
    """Mock :class:`~sagellm_backend.base.BackendProvider` with real accounting (see module).

    The first five parameters are the 0.1.1.x constructor; the rest are keyword-only.

    Args:
        supported_dtypes: dtypes it accepts (DType or names); None or empty -> FP16, BF16.
        supported_kernels: kernel kinds to register built-in kernels for; None or empty ->
            MATMUL, ATTENTION.
        has_collective: whether all_reduce/all_gather work.
        has_graph_exec: advertised only (the mock has no graphs).
        max_memory_mb: memory budget of the device; the KV cache is charged to it.
        has_stream: whether create_stream works.
        has_event: whether create_event works.
        device: device string of its KV blocks (``"mock:0"``).
        device_name: ``capability().device_name``.
        device_type: ``capability().device_type``.
        compute_capability: ``capability().compute_capability``.
        max_batch_size: advertised limit (engines read it).
        max_sequence_length: advertised limit (engines read it).
        kv_spec: geometry of the ``kv_block_alloc`` pages (default: Llama-7B-like).
        kv_block_size: override the block size of ``kv_spec``.
        offload_device: simulated host pool for ``kv_block_migrate`` (None: no offload).
        offload_memory_mb: budget of that pool (default ``max_memory_mb``).
        world_size: simulated ranks for collectives.
        rank: this provider's rank (``0 <= rank < world_size``).
        device_ids: device ids it stands for (reported by ``info()``).
        fail_on_init: raise :class:`BackendNotAvailableError` from the constructor (a str
            is used as the reason).
        fail_kv_after_pages: after this many KV pages have been handed out in total (block
            API and managers together), every allocation raises
            :class:`KVCacheExhaustedError`.
        failing_kernels: kernel names whose calls raise: an iterable of names
            (:class:`InjectedFaultError`), or a mapping name -> exception instance or class.
        kernel_latency_ms: sleep before each kernel call: one number or per-name mapping.
        collective_latency_ms: sleep in each collective call.

    Raises:
        ConfigError: a parameter is invalid (the message names it).
        BackendNotAvailableError: ``fail_on_init`` is set.
    """

    def __init__(
        self,
        supported_dtypes: Iterable[DType | str] | None = None,
        supported_kernels: Iterable[KernelKind | str] | None = None,
        has_collective: bool = True,
        has_graph_exec: bool = False,
        max_memory_mb: int = 16384,
        *,
        has_stream: bool = True,
        has_event: bool = True,
        device: str = "mock:0",
        device_name: str = "mock",
        device_type: str = "mock",
        compute_capability: str | None = None,
        max_batch_size: int | None = None,
        max_sequence_length: int | None = None,
        kv_spec: KVSpec | None = None,
        kv_block_size: int | None = None,
        offload_device: str | None = "cpu",
        offload_memory_mb: int | None = None,
        world_size: int = 1,
        rank: int = 0,
        device_ids: Iterable[int] | None = None,
        fail_on_init: bool | str = False,
        fail_kv_after_pages: int | None = None,
        failing_kernels: Mapping[str, BaseException | type[BaseException]]
        | Iterable[str]
        | None = None,
        kernel_latency_ms: float | Mapping[str, float] = 0.0,
        collective_latency_ms: float = 0.0,
    ) -> None:
        if fail_on_init:
            reason = fail_on_init if isinstance(fail_on_init, str) else "fail_on_init=True"
            raise BackendNotAvailableError(
                f"mock backend failed to start (injected fault: {reason})"
            )
        dtypes, kinds = _capability_matrix(supported_dtypes, supported_kernels)
        self._dtypes = dtypes
        _check_flags(
            has_collective=has_collective,
            has_graph_exec=has_graph_exec,
            has_stream=has_stream,
            has_event=has_event,
        )
        _positive_int("max_memory_mb", max_memory_mb)
        _positive_int("max_batch_size", max_batch_size, allow_none=True)
        _positive_int("max_sequence_length", max_sequence_length, allow_none=True)
        _positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be an int in 0..{world_size - 1}, got {rank!r}")
        _check_names(device=device, device_name=device_name, device_type=device_type)
        if kv_spec is not None and not isinstance(kv_spec, KVSpec):
            raise ConfigError(f"kv_spec must be a KVSpec, got {type(kv_spec).__name__}")
        spec = kv_spec or DEFAULT_KV_SPEC
        if kv_block_size is not None:
            spec = spec.with_block_size(int(_positive_int("kv_block_size", kv_block_size) or 0))
        if offload_device is not None and (
            not isinstance(offload_device, str) or offload_device == device
        ):
            raise ConfigError(
                f"offload_device must be None or a device string other than {device!r}, "
                f"got {offload_device!r}"
            )
        offload_mb = max_memory_mb if offload_memory_mb is None else offload_memory_mb
        _positive_int("offload_memory_mb", offload_mb)
        _positive_int("fail_kv_after_pages", fail_kv_after_pages, allow_none=True)

        self.provider_id = f"mock-{uuid.uuid4().hex[:12]}"
        self.device = device
        ids = tuple(device_ids or ())
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ConfigError(f"device_ids must be non-negative integers, got {list(ids)!r}")
        self.device_ids: tuple[int, ...] = ids
        self.world_size = world_size
        self.rank = rank
        self.has_graph_exec = has_graph_exec
        # What capability() reports that never changes; it adds the live figures.
        self._fixed_capability = CapabilityDescriptor(
            device_name=device_name,
            device_type=device_type,
            compute_capability=compute_capability,
            total_memory_bytes=max_memory_mb * MIB,
            has_stream=has_stream,
            has_event=has_event,
            has_collective=has_collective,
            max_memory_mb=max_memory_mb,
            max_batch_size=max_batch_size,
            max_sequence_length=max_sequence_length,
        )
        self._lock = threading.Lock()
        self.collective_calls: dict[str, int] = {"all_reduce": 0, "all_gather": 0}
        self._collective_latency_s = (
            _non_negative("collective_latency_ms", collective_latency_ms) / 1e3
        )
        self._kernel_latency_s, self._default_kernel_latency_s = _kernel_latencies(
            kernel_latency_ms
        )
        self._kernel_faults: dict[str, KernelFault] = _kernel_faults(failing_kernels)
        self._fail_kv_after = fail_kv_after_pages
        self._manager_pages = 0  # pages handed out by managers' pools (under self._lock)

        self._kernels = KernelRegistry()
        for kind in dict.fromkeys(kinds):
            for name, impl, description in _BUILTIN_KERNELS[kind]:
                self._kernels.register(name, impl, kind=kind, description=description, builtin=True)

        aliases: dict[str, str] = {}
        if ":" in device:
            aliases[device.split(":", 1)[0]] = device
        self._dtype_set = None  # ProviderKV checks num_tokens, then dtype
        self._kv: ProviderKV | None = ProviderKV(
            owner=self.provider_id,
            device=device,
            supported_dtypes=self._dtypes,
            storage_factory=AccountingStorage,
            memory_bytes=max_memory_mb * MIB,
            spec=spec,
            offload=None if offload_device is None else {offload_device: offload_mb * MIB},
            aliases=aliases,
            alloc_guard=self._kv_guard,
        )
        self._arm_block_guard()

    # ------------------------------------------------------------------ capability
    def capability(self) -> CapabilityDescriptor:
        """The configured capability matrix; kernels are the kinds registered now."""
        allocated = self.kv.stats()["kv_allocated_bytes"]
        return dataclasses.replace(
            self._fixed_capability,
            available_memory_bytes=self._fixed_capability.total_memory_bytes - allocated,
            supported_dtypes=list(self._dtypes),
            supported_kernels=self._kernels.kinds(),
            has_graph_exec=self.has_graph_exec,
        )

    def check_dtype(self, dtype: DType | str) -> DType:
        """Return ``dtype`` if supported, else raise :class:`UnsupportedDTypeError`."""
        return self.kv.check_dtype(dtype)

    # ------------------------------------------------------------------ streams / events
    def create_stream(self) -> MockStream:
        """A new :class:`MockStream` (CapabilityNotSupportedError if ``has_stream`` is False)."""
        if not self._fixed_capability.has_stream:
            raise CapabilityNotSupportedError(
                "this mock backend was configured with has_stream=False; streams are unsupported"
            )
        return MockStream()

    def create_event(self) -> MockEvent:
        """A new :class:`MockEvent` (CapabilityNotSupportedError if ``has_event`` is False)."""
        if not self._fixed_capability.has_event:
            raise CapabilityNotSupportedError(
                "this mock backend was configured with has_event=False; events are unsupported"
            )
        return MockEvent()

    # ------------------------------------------------------------------ collectives
    def _begin_collective(self, name: str) -> None:
        if not self._fixed_capability.has_collective:
            raise CapabilityNotSupportedError(
                f"{name}: collective operations are not supported by this backend "
                "(has_collective=False)"
            )
        with self._lock:
            self.collective_calls[name] += 1
        if self._collective_latency_s:
            time.sleep(self._collective_latency_s)

    def all_reduce(self, tensor: Any, op: str = "sum") -> None:
        """Reduce ``tensor`` in place over the simulated ranks (see module docstring).

        Raises:
            CapabilityNotSupportedError: ``has_collective`` is False.
            ValueError: ``op`` is not one of sum, avg, max, min, product.
            TypeError: ``world_size > 1`` and ``tensor`` is not a list or torch-like tensor.
        """
        if not self._fixed_capability.has_collective:
            raise CapabilityNotSupportedError(
                "all_reduce: collective operations are not supported by this backend "
                "(has_collective=False)"
            )
        name = op.lower() if isinstance(op, str) else None
        if name not in COLLECTIVE_OPS:
            raise ConfigError(
                f"unknown collective op {op!r}; valid ops: {', '.join(COLLECTIVE_OPS)}"
            )
        self._begin_collective("all_reduce")
        if self.world_size > 1:
            _reduce_in_place(tensor, name, self.world_size)

    def all_gather(self, tensor: Any) -> Any:
        """Gather ``tensor`` from every simulated rank; returns a new list/tensor.

        Raises:
            CapabilityNotSupportedError: ``has_collective`` is False.
            TypeError: ``tensor`` is not a list, number or torch-like tensor.
        """
        self._begin_collective("all_gather")
        return _gather(tensor, self.world_size)

    # ------------------------------------------------------------------ memory
    def memory_stats(self) -> dict[str, int]:
        """Memory figures (keys in the module docstring); real accounting, not constants."""
        kv = self.kv.stats()
        total = self._fixed_capability.total_memory_bytes
        allocated = kv["kv_allocated_bytes"]
        stats = {
            "allocated": allocated,
            "peak": kv["kv_peak_bytes"],
            "total": total,
            "free": total - allocated,
            "reserved": allocated,
            "kv_pool_bytes": kv["kv_pool_bytes"],
            "kv_used_bytes": kv["kv_used_bytes"],
            "num_kv_blocks": kv["num_kv_blocks"],
            "allocated_bytes": allocated,
            "reserved_bytes": allocated,
            "allocated_mb": allocated // MIB,
            "reserved_mb": allocated // MIB,
        }
        for key, value in kv.items():
            stats.setdefault(key, value)
        return stats

    def clear_cache(self) -> None:
        """Evict every unreferenced prefix-cached KV page (the mock has no allocator cache)."""
        self.kv.clear_cache()

    # ------------------------------------------------------------------ kernels
    def unregister_kernel(self, name: str) -> None:
        """Remove a kernel (KernelNotFoundError if absent)."""
        self._kernels.remove(name)

    def get_kernel(self, name: str) -> Callable[..., Any]:
        """The kernel registered under ``name``.

        With an injected failure or latency for ``name`` a wrapper that sleeps/raises and
        then calls the kernel is returned; otherwise the registered callable itself.

        Raises:
            KernelNotFoundError: no such kernel (the message lists the registered ones).
        """
        impl = self._kernels.get(name)
        fault_set = name in self._kernel_faults
        delay = self._kernel_latency_s.get(name, self._default_kernel_latency_s)
        if not fault_set and not delay:
            return impl
        return _faulty_kernel(name, impl, fault_set, self._kernel_faults.get(name), delay)

    # ------------------------------------------------------------------ misc
    def info(self) -> dict[str, Any]:
        """Plain-data description for ``sagellm-backend info``."""
        return {
            "kind": "mock",
            "provider_id": self.provider_id,
            "device": self.device,
            "device_ids": list(self.device_ids),
            "kv_devices": self.kv.devices,
            "kv_spec": repr(self.kv.spec),
            "world_size": self.world_size,
            "rank": self.rank,
            "kernels": self._kernels.names(),
        }

    def __repr__(self) -> str:
        dtypes = ",".join(d.value for d in self._dtypes)
        return (
            f"MockBackendProvider(id={self.provider_id!r}, device={self.device!r}, "
            f"dtypes=[{dtypes}], max_memory_mb={self._fixed_capability.max_memory_mb})"
        )


def create_mock_backend(config: Any = None, **kwargs: Any) -> MockBackendProvider:
    """Entry point of the ``mock`` kind (``sagellm.backends``).

    Args:
        config: None, a dict of :class:`MockBackendProvider` parameters (plus ``kind``), or a
            sagellm-core ``BackendConfig``-like object: its ``kind`` must be ``"mock"``, its
            ``device`` becomes the mock's device string, and ``device_ids`` is recorded (the
            device defaults to ``mock:<first id>``).
        **kwargs: parameters that override ``config``.

    Raises:
        ConfigError: unknown keys (the message lists the valid ones), or a kind other than
            ``"mock"``.
    """
    return MockBackendProvider(**_mock_options(config, kwargs))
