"""KV managers and KV memory figures of :class:`~sagellm_backend.kv.provider_kv.ProviderKV`.

:class:`ProviderKVManagers` is the half of ProviderKV that builds and releases
:class:`KVCacheManager` pools charged to a device's budget, and reports the figures
(:meth:`ProviderKVManagers.device_stats`, :meth:`ProviderKVManagers.stats`). Its methods
take the provider's lock (lock order: provider, then pool).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from sagellm_backend.base import KVBlock
from sagellm_backend.capability import DType
from sagellm_backend.errors import (
    ConfigError,
    InvalidKVBlockError,
    InvalidStateError,
    KVCacheExhaustedError,
)
from sagellm_backend.kv._device_kv import _DeviceKV
from sagellm_backend.kv.block_pool import BlockHashFn, BlockPool, hash_block_tokens
from sagellm_backend.kv.manager import KVCacheManager
from sagellm_backend.kv.spec import KVSpec
from sagellm_backend.kv.storage import StorageFactory


class ProviderKVManagers:
    """Managers and figures of a ProviderKV (a mixin over its tables).

    Invariants: the host class sets ``owner``, ``spec``, ``_factory``, ``_alloc_guard``,
    ``_lock``, ``_devices`` (own device first), ``_live`` and ``_released`` (managers
    released here, so a second release is a no-op).
    """

    owner: str
    spec: KVSpec
    _factory: StorageFactory
    _alloc_guard: Callable[[int], None] | None
    _lock: threading.Lock
    _devices: dict[str, _DeviceKV]
    _live: dict[int, KVBlock]
    _released: weakref.WeakSet[KVCacheManager]

    if TYPE_CHECKING:

        @property
        def devices(self) -> list[str]: ...

        def check_dtype(self, dtype: DType | str) -> DType: ...

        def _device_kv(self, device: str | None) -> _DeviceKV: ...

    # ------------------------------------------------------------------ managers
    def create_manager(
        self,
        spec: KVSpec | None = None,
        *,
        memory_bytes: int | None = None,
        num_pages: int | None = None,
        enable_prefix_caching: bool = True,
        device: str | None = None,
        hash_fn: BlockHashFn = hash_block_tokens,
    ) -> KVCacheManager:
        """Build a :class:`KVCacheManager` with its own pool and storage.

        Size: ``num_pages`` pages, or as many as fit in ``memory_bytes``, or (neither given)
        everything left of the device's budget. The pool is charged to the budget in full.

        Raises:
            ConfigError: (a ValueError) ``spec`` is not a KVSpec; both ``memory_bytes`` and
                ``num_pages`` given; ``num_pages < 1``; ``memory_bytes`` below one page;
                an argument of the wrong type -- each naming the valid values.
            UnsupportedDTypeError: ``spec.dtype`` is not supported.
            KVCacheExhaustedError: the budget cannot hold the pool (or a single page).
        """
        spec = self.spec if spec is None else spec
        if not isinstance(spec, KVSpec):
            raise ConfigError(
                f"spec must be a KVSpec (or None for the provider's {self.spec}), "
                f"got {type(spec).__name__} {spec!r}"
            )
        self.check_dtype(spec.dtype)
        if memory_bytes is not None and num_pages is not None:
            raise ConfigError("give memory_bytes or num_pages, not both")
        for name, value in (("memory_bytes", memory_bytes), ("num_pages", num_pages)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name} must be an int or None, got {value!r}")
        if num_pages is not None and num_pages < 1:
            raise ConfigError(
                f"num_pages must be >= 1 (or None for what the budget leaves), got {num_pages}"
            )
        if memory_bytes is not None and memory_bytes < spec.page_bytes:
            raise ConfigError(
                f"memory_bytes must hold at least one {spec.page_bytes}-byte page of {spec} "
                f"(>= {spec.page_bytes}, or None for what the budget leaves), got {memory_bytes}"
            )
        with self._lock:
            dev = self._device_kv(device)
            available = dev.budget - dev.charge()
            if num_pages is None:
                size = available if memory_bytes is None else memory_bytes
                num_pages = size // spec.page_bytes
            need = num_pages * spec.page_bytes
            if num_pages < 1 or need > available:
                raise KVCacheExhaustedError(
                    f"cannot create a KV manager of {num_pages} pages ({need} bytes, "
                    f"{spec.page_bytes} per page) on {dev.device}: {available} of "
                    f"{dev.budget} budget bytes are free"
                )
            try:
                storage = self._factory(spec, num_pages, dev.device)
            except (MemoryError, RuntimeError) as exc:
                text = str(exc)
                if not isinstance(exc, MemoryError) and not (
                    "allocate" in text or "out of memory" in text
                ):
                    raise
                raise KVCacheExhaustedError(
                    f"cannot allocate a KV pool of {num_pages} pages ({need} bytes, "
                    f"{spec.page_bytes} per page) on {dev.device}: the device refused "
                    f"({text.splitlines()[0] if text else type(exc).__name__}); ask for "
                    "fewer pages or bytes"
                ) from exc
            pool = BlockPool(
                num_pages,
                page_bytes=spec.page_bytes,
                enable_caching=enable_prefix_caching,
                alloc_guard=self._alloc_guard,
            )
            manager = KVCacheManager(
                pool,
                spec,
                storage=storage,
                enable_prefix_caching=enable_prefix_caching,
                hash_fn=hash_fn,
            )
            dev.managers.append(manager)
            dev.manager_bytes += need
            dev.peak = max(dev.peak, dev.charge())
            return manager

    def release_manager(self, manager: KVCacheManager) -> None:
        """Return a manager's pool to the budget (the manager must hold no sequences).

        Releasing a manager that was already released here is a no-op.

        Raises:
            InvalidStateError: sequences are still allocated in it.
            InvalidKVBlockError: the manager was not created here.
        """
        with self._lock:
            if manager in self._released:
                return
            for dev in self._devices.values():
                for i, m in enumerate(dev.managers):
                    if m is manager:
                        if len(manager):
                            raise InvalidStateError(
                                f"cannot release a KV manager holding {len(manager)} sequences"
                            )
                        del dev.managers[i]
                        dev.manager_bytes -= manager.pool.num_pages * manager.spec.page_bytes
                        self._released.add(manager)
                        return
        raise InvalidKVBlockError(
            f"this KV manager was not created by this provider ({self.owner}); release it "
            "with the provider that created it"
        )

    def managers(self, device: str | None = None) -> list[KVCacheManager]:
        """Managers created on ``device`` (default: own device) and not released."""
        with self._lock:
            return list(self._device_kv(device).managers)

    # ------------------------------------------------------------------ figures
    def clear_cache(self) -> int:
        """Evict every unreferenced cached page in every pool; return how many."""
        with self._lock:
            pools = [p for dev in self._devices.values() for p in dev.pools()]
        return sum(p.evict_all() for p in pools)

    def evict_cached(self) -> int:
        """Alias of :meth:`clear_cache`."""
        return self.clear_cache()

    def device_stats(self, device: str | None = None) -> dict[str, int]:
        """KV figures of one device in bytes/counts.

        Keys: ``kv_budget_bytes``, ``kv_allocated_bytes`` (charged to the budget),
        ``kv_peak_bytes``, ``kv_reserved_bytes`` (bytes that exist: preallocated pools and
        managers), ``kv_pool_bytes`` (KV capacity: managers' pools plus the block pool, an
        accounting block pool counted only up to what the budget leaves it),
        ``kv_used_bytes`` (pages in use * page bytes), ``num_kv_blocks`` (live blocks
        there), ``num_kv_managers``, ``kv_evict_count``.
        """
        with self._lock:
            dev = self._device_kv(device)
            pools = dev.pools()
            reserved = dev.manager_bytes
            capacity = dev.manager_bytes
            if dev.pool is not None and dev.storage is not None:
                if dev.storage.preallocated:
                    reserved += dev.storage.nbytes
                    capacity += dev.storage.nbytes
                else:  # accounting pool: bounded by what the budget leaves it
                    capacity += min(dev.pool.total_bytes, max(dev.budget - dev.manager_bytes, 0))
            return {
                "kv_budget_bytes": dev.budget,
                "kv_allocated_bytes": dev.charge(),
                "kv_peak_bytes": dev.peak,
                "kv_reserved_bytes": reserved,
                "kv_pool_bytes": capacity,
                "kv_used_bytes": sum(p.used_bytes for p in pools),
                "num_kv_blocks": sum(1 for b in self._live.values() if b.device == dev.device),
                "num_kv_managers": len(dev.managers),
                "kv_evict_count": sum(p.evict_count for p in pools),
            }

    def stats(self) -> dict[str, int]:
        """KV figures of the provider: :meth:`device_stats` of its own device, plus more.

        Adds ``offload_kv_used_bytes`` and ``offload_kv_budget_bytes`` summed over the
        offload devices; ``num_kv_blocks`` counts live blocks on every device.
        """
        out = self.device_stats()
        offload_used = 0
        offload_budget = 0
        for dev in self.devices[1:]:
            s = self.device_stats(dev)
            offload_used += s["kv_used_bytes"]
            offload_budget += s["kv_budget_bytes"]
        out["offload_kv_used_bytes"] = offload_used
        out["offload_kv_budget_bytes"] = offload_budget
        with self._lock:
            out["num_kv_blocks"] = len(self._live)
        return out
