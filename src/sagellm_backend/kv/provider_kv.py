"""ProviderKV: the KV half of every provider (kv_block_* methods, managers, memory figures).

A provider owns one :class:`ProviderKV` and forwards ``kv_block_alloc/free/copy/migrate``,
``get_kv_tensor`` and ``create_kv_manager`` to it; the storage is injected
(:class:`~sagellm_backend.kv.storage.AccountingStorage` for the mock,
:class:`~sagellm_backend.kv.storage.TorchKVStorage` for torch providers), so every provider
has the same semantics.

Memory model, per device (the provider's own device plus optional offload devices such as
a host pool for ``cuda:0 -> cpu``):

* each device has a byte *budget*;
* the *block pool* behind ``kv_block_alloc`` is created on first use. Its pages are charged
  to the budget while they are in use when the storage only accounts (mock), or in full
  when the storage preallocates real memory (torch);
* each manager made by :meth:`ProviderKV.create_manager` owns a pool of its own, charged in
  full (it is preallocated) until :meth:`ProviderKV.release_manager`;
* an allocation that would take the charge over the budget raises
  :class:`~sagellm_backend.errors.KVCacheExhaustedError` (RESOURCE_EXHAUSTED) and changes
  nothing.

Blocks: ``kv_block_alloc(num_tokens, dtype)`` reserves ``ceil(num_tokens /
spec.tokens_per_page(dtype))`` pages of the provider's :class:`KVSpec` (a page is a fixed
number of bytes; see :mod:`sagellm_backend.kv.storage` for other dtypes). Every block
carries ``owner`` (the provider id) and a handle that is never reused; a handle below the
counter that is no longer live is dead, so double free and use after free are detected
without remembering freed handles.

Thread safety: one lock guards the provider's tables and its block pools: a block pool is
only ever used under the provider lock, which therefore calls the pool's lock-held
internals without taking the pool's own lock. Managers' pools take their own locks (lock
order: provider, then pool).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from sagellm_backend.base import KVBlock
from sagellm_backend.capability import DType, parse_dtype
from sagellm_backend.errors import (
    ConfigError,
    InvalidKVBlockError,
    KVCacheExhaustedError,
    UnsupportedDeviceError,
    UnsupportedDTypeError,
)
from sagellm_backend.kv._device_kv import _BlockBuilder, _check_num_tokens, _DeviceKV
from sagellm_backend.kv._provider_managers import ProviderKVManagers
from sagellm_backend.kv.block_pool import BlockPool
from sagellm_backend.kv.manager import KVCacheManager
from sagellm_backend.kv.spec import DEFAULT_KV_SPEC, KVSpec
from sagellm_backend.kv.storage import KVStorage, StorageFactory

__all__ = ["ProviderKV"]


class ProviderKV(ProviderKVManagers):
    """KV blocks, managers and KV memory figures of one provider.

    Args:
        owner: the provider's unique id (stamped on every block as ``owner``).
        device: the provider's device string (``"mock:0"``, ``"cpu"``, ``"cuda:0"``).
        supported_dtypes: dtypes the provider advertises; others raise
            :class:`UnsupportedDTypeError`.
        storage_factory: ``factory(spec, num_pages, device) -> KVStorage``.
        memory_bytes: KV budget on ``device`` in bytes.
        spec: geometry of the pages behind ``kv_block_alloc`` (default
            :data:`~sagellm_backend.kv.spec.DEFAULT_KV_SPEC`).
        block_pool_bytes: size of the ``kv_block_alloc`` pool on ``device``. Default: the
            whole budget when the storage only accounts; a quarter of it when the storage
            preallocates real memory.
        offload: extra devices that can hold KV (``{"cpu": budget_bytes}``), targets of
            :meth:`migrate`; their block pools are as large as their budget.
        aliases: alternative spellings of device names; ``"x"`` already means ``"x:0"``
            when ``"x:0"`` is one of the devices.
        alloc_guard: ``guard(n_pages)`` run before every allocation in every pool (fault
            injection); it may raise, leaving everything unchanged. It is also the initial
            :attr:`block_guard`.

    Attributes:
        block_guard: the guard of the ``kv_block_alloc`` pools (settable; None: none). It
            runs with the provider lock held, after :attr:`block_pages_handed_out` already
            counts the request (taken back if it raises).
        block_pages_handed_out: pages handed out by :meth:`alloc` and :meth:`migrate` so
            far (cumulative; written under the provider lock, so a reader from another
            thread sees a value no older than the last completed allocation).
    """

    def __init__(
        self,
        *,
        owner: str,
        device: str,
        supported_dtypes: Iterable[DType | str],
        storage_factory: StorageFactory,
        memory_bytes: int,
        spec: KVSpec = DEFAULT_KV_SPEC,
        block_pool_bytes: int | None = None,
        offload: Mapping[str, int] | None = None,
        aliases: Mapping[str, str] | None = None,
        alloc_guard: Callable[[int], None] | None = None,
    ) -> None:
        if not owner:
            raise ConfigError("ProviderKV: owner must be a non-empty string")
        if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes < 0:
            raise ConfigError(f"ProviderKV: memory_bytes must be an int >= 0, got {memory_bytes!r}")
        if block_pool_bytes is not None and block_pool_bytes < 0:
            raise ConfigError(f"ProviderKV: block_pool_bytes must be >= 0, got {block_pool_bytes}")
        self.owner = owner
        self.device = device
        self.spec = spec
        self.supported_dtypes: tuple[DType, ...] = tuple(parse_dtype(d) for d in supported_dtypes)
        if not self.supported_dtypes:
            raise ConfigError("ProviderKV: supported_dtypes is empty")
        self._supported = frozenset(self.supported_dtypes)
        self._factory = storage_factory
        self._alloc_guard = alloc_guard
        self.block_guard: Callable[[int], None] | None = alloc_guard
        self.block_pages_handed_out = 0
        self._aliases = {k.strip().lower(): v for k, v in (aliases or {}).items()}
        self._lock = threading.Lock()
        self._devices: dict[str, _DeviceKV] = {
            device: _DeviceKV(device, memory_bytes, block_pool_bytes)
        }
        for dev, budget in (offload or {}).items():
            if dev == device:
                raise ConfigError(
                    f"ProviderKV: offload device {dev!r} is the provider's own device"
                )
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
                raise ConfigError(f"ProviderKV: offload budget for {dev!r} must be an int >= 0")
            self._devices[dev] = _DeviceKV(dev, budget, budget)
        for dev in self._devices:  # "cuda" means "cuda:0" unless said otherwise
            base, sep, index = dev.partition(":")
            if sep and index == "0":
                self._aliases.setdefault(base.lower(), dev)
        self._live: dict[int, KVBlock] = {}
        self._next_handle = 1
        self._tokens_per_page: dict[DType, int] = {}
        self._own = self._devices[device]
        self._released: weakref.WeakSet[KVCacheManager] = weakref.WeakSet()
        #: dtype as the caller spelt it (DType or str) -> (DType, tokens per page); only
        #: supported dtypes are entered, so a hit needs no further check.
        self._dtype_cache: dict[object, tuple[DType, int]] = {}
        if not getattr(storage_factory, "preallocated", False):
            # Accounting pools cost nothing: create the block pool now so that capacity
            # figures are meaningful before the first allocation.
            # (A budget below one page is reported by kv_block_alloc instead.)
            with contextlib.suppress(KVCacheExhaustedError):
                self._block_pool(self._devices[device])

    # ------------------------------------------------------------------ helpers
    @property
    def devices(self) -> list[str]:
        """Devices this provider can hold KV on (its own first)."""
        return list(self._devices)

    def normalize_device(self, device: str) -> str:
        """Map ``device`` to one of :attr:`devices`.

        Raises:
            UnsupportedDeviceError: naming the valid devices.
        """
        if isinstance(device, str):
            if device in self._devices:
                return device
            key = device.strip().lower()
            key = self._aliases.get(key, key)
            if key in self._devices:
                return key
        valid = ", ".join(repr(d) for d in self._devices)
        raise UnsupportedDeviceError(
            f"device {device!r} cannot hold KV for provider {self.owner}; valid devices: {valid}"
        )

    def check_dtype(self, dtype: DType | str) -> DType:
        """Return ``dtype`` as a :class:`DType` if the provider supports it.

        Raises:
            UnsupportedDTypeError: naming the supported dtypes.
        """
        try:
            d = dtype if isinstance(dtype, DType) else parse_dtype(dtype)
        except ValueError:
            d = None
        if d is None or d not in self._supported:
            supported = ", ".join(x.value for x in self.supported_dtypes)
            shown = dtype.value if isinstance(dtype, DType) else repr(dtype)
            raise UnsupportedDTypeError(
                f"dtype {shown} is not supported by provider {self.owner}; "
                f"supported dtypes: {supported}"
            )
        return d

    def tokens_per_page(self, dtype: DType | str) -> int:
        """Tokens of ``dtype`` per page of the block-API pools."""
        d = self.check_dtype(dtype)
        per_page = self._tokens_per_page.get(d)
        if per_page is None:
            per_page = self._tokens_per_page[d] = self.spec.tokens_per_page(d)
        return per_page

    def _device_kv(self, device: str | None) -> _DeviceKV:
        return self._devices[self.device if device is None else self.normalize_device(device)]

    def _block_pool(self, dev: _DeviceKV) -> tuple[BlockPool, KVStorage]:
        if dev.pool is not None and dev.storage is not None:
            return dev.pool, dev.storage
        page = self.spec.page_bytes
        preallocated = bool(getattr(self._factory, "preallocated", False))
        size = dev.pool_bytes
        if size is None:
            size = dev.budget // 4 if preallocated else dev.budget
        if preallocated:
            size = min(size, dev.budget - dev.charge())
        num_pages = size // page
        if num_pages < 1:
            raise KVCacheExhaustedError(
                f"KV budget on {dev.device} leaves {size} bytes for the block pool, less than "
                f"one {page}-byte page of {self.spec}; raise the memory budget or use a smaller "
                "KV spec"
            )
        storage = self._factory(self.spec, num_pages, dev.device)
        # No guard on the pool itself: alloc()/_alloc_locked run it (under self._lock, after
        # the capacity check), which keeps the pool on its one-page fast path.
        pool = BlockPool(num_pages, page_bytes=page, enable_caching=False)
        dev.pool, dev.storage = pool, storage
        dev.accounting = not storage.preallocated
        dev.peak = max(dev.peak, dev.charge())
        return pool, storage

    def _validate(self, block: object, what: str = "block") -> KVBlock:
        if not isinstance(block, KVBlock):
            raise InvalidKVBlockError(f"{what} must be a KVBlock, got {type(block).__name__}")
        if block.owner != self.owner:
            raise InvalidKVBlockError(
                f"{what} {block.handle} belongs to provider {block.owner or '(none)'!r}, "
                f"not {self.owner!r}"
            )
        live = self._live.get(block.handle)
        if live is None:
            if 0 < block.handle < self._next_handle:
                raise InvalidKVBlockError(
                    f"{what} {block.handle} was already freed or migrated (use after free)"
                )
            raise InvalidKVBlockError(f"{what} {block.handle} was never allocated here")
        if live != block:
            raise InvalidKVBlockError(
                f"{what} {block.handle} does not match the live block with that handle"
            )
        return live

    def _block_pool_exhausted(
        self, dev: _DeviceKV, pool: BlockPool, num_tokens: int, dtype: DType, n: int
    ) -> KVCacheExhaustedError:
        """The error of a ``kv_block_alloc`` the block pool cannot hold, with what to change."""
        base = pool._exhausted(n)
        return KVCacheExhaustedError(
            f"{base}: {num_tokens} {dtype.value} tokens on {dev.device} need {n} pages of "
            f"{pool.page_bytes} bytes ({self.spec}). The kv_block_alloc pool holds "
            f"{pool.num_pages * pool.page_bytes} bytes of the {dev.budget}-byte KV budget; "
            "free blocks, or raise kv_block_pool_bytes / kv_memory_bytes, or give a smaller "
            "kv_spec"
        )

    def _alloc_locked(
        self, num_tokens: int, dtype: DType, per_page: int, dev: _DeviceKV
    ) -> KVBlock:
        """Allocate a block on ``dev`` (lock held; ``num_tokens``/``dtype`` checked).

        ``per_page`` is ``tokens_per_page(dtype)``. Checks, in this order: the budget (an
        accounting pool's pages in use are charged), then free pages; then the guard runs.
        Any failure leaves everything unchanged. The device's block pool is only ever used
        under the provider lock, so its lock-held internals are called without its lock.
        """
        pool = dev.pool
        if pool is None:
            pool = self._block_pool(dev)[0]
        n = 1 if num_tokens <= per_page else (num_tokens + per_page - 1) // per_page
        page_bytes = pool.page_bytes
        free_pages = pool._num_free  # num_free without the property call (hot path)
        nbytes = n * page_bytes
        charge = 0
        if dev.accounting:  # preallocated storage was charged in full when it was made
            charge = dev.manager_bytes + (pool._n - free_pages) * page_bytes + nbytes
            if charge > dev.budget:
                free = dev.budget - charge + nbytes
                raise KVCacheExhaustedError(
                    f"KV memory exhausted on {dev.device}: {num_tokens} {dtype.value} tokens "
                    f"need {nbytes} bytes ({n} pages); {free} of {dev.budget} bytes free"
                )
        if n > free_pages:
            raise self._block_pool_exhausted(dev, pool, num_tokens, dtype, n)
        self.block_pages_handed_out += n
        guard = self.block_guard
        if guard is not None:
            try:
                guard(n)
            except BaseException:
                self.block_pages_handed_out -= n
                raise
        handle = self._next_handle
        self._next_handle = handle + 1
        b = _BlockBuilder()  # becomes an ordinary KVBlock below (see _BlockBuilder)
        b.handle = handle
        b.num_tokens = num_tokens
        b.dtype = dtype
        b.device = dev.device
        b.pages = (pool._take_one(),) if n == 1 else tuple(pool._allocate_unguarded(n))
        b.owner = self.owner
        b.num_bytes = nbytes
        b.__class__ = KVBlock  # type: ignore[assignment]
        block = cast(KVBlock, b)
        self._live[handle] = block
        if charge > dev.peak:
            dev.peak = charge
        return block

    # ------------------------------------------------------------------ block API
    def alloc(self, num_tokens: int, dtype: DType | str, *, device: str | None = None) -> KVBlock:
        """Reserve pages for ``num_tokens`` tokens of ``dtype`` (default: own device).

        Arguments are checked in this order: ``num_tokens``, ``dtype``, ``device``. A dtype
        seen before is looked up in a cache keyed by the caller's spelling (only supported
        dtypes are entered), so the common case validates each argument once and takes one
        lock.

        Raises:
            ValueError: ``num_tokens <= 0`` (TypeError if not an int).
            UnsupportedDTypeError: ``dtype`` is not supported (names the supported ones).
            UnsupportedDeviceError: ``device`` cannot hold KV.
            KVCacheExhaustedError: not enough pages or budget; nothing changed.
        """
        if type(num_tokens) is not int or num_tokens <= 0:
            _check_num_tokens(num_tokens)
        try:
            entry = self._dtype_cache.get(dtype)
        except TypeError:  # unhashable: certainly not a dtype
            entry = None
        if entry is None:
            d = self.check_dtype(dtype)
            entry = (d, self.tokens_per_page(d))
            self._dtype_cache[dtype] = entry
        dev = self._own if device is None else self._device_kv(device)
        lock = self._lock
        lock.acquire()  # explicit acquire/release: cheaper than `with` on CPython 3.11
        try:
            return self._alloc_locked(num_tokens, entry[0], entry[1], dev)
        finally:
            lock.release()

    def free(self, block: KVBlock) -> None:
        """Release ``block`` (exactly once).

        The block handed out by :meth:`alloc` is recognised by identity; anything else is
        validated in full (:meth:`_validate`) before anything changes.

        Raises:
            InvalidKVBlockError: double free, use after free, or a foreign block; nothing
                changes.
        """
        lock = self._lock
        lock.acquire()
        try:
            live = self._live.get(block.handle) if type(block) is KVBlock else None
            if live is None or live is not block:  # not the object handed out: validate
                live = self._validate(block)
            pool = self._devices[live.device].pool
            assert pool is not None
            pages = live.pages
            if len(pages) == 1:
                pool._release_one(pages[0])
            else:
                pool._free(pages, validate=False)  # distinct pages this block owns
            del self._live[live.handle]
        finally:
            lock.release()

    def copy(self, src: KVBlock, dst: KVBlock) -> None:
        """Copy the K/V of ``src`` into the first ``src.num_tokens`` tokens of ``dst``.

        Works across devices. Tokens of ``dst`` after ``src.num_tokens`` are left as they were.

        Raises:
            InvalidKVBlockError: a block is not live here, the dtypes differ, or ``dst`` holds
                fewer tokens than ``src``.
        """
        with self._lock:
            s = self._validate(src, "source block")
            d = self._validate(dst, "destination block")
            if s.handle == d.handle:
                return
            if s.dtype != d.dtype:
                raise InvalidKVBlockError(
                    f"cannot copy a {s.dtype.value} block into a {d.dtype.value} block"
                )
            if d.num_tokens < s.num_tokens:
                raise InvalidKVBlockError(
                    f"destination block {d.handle} holds {d.num_tokens} tokens, fewer than the "
                    f"{s.num_tokens} of source block {s.handle}"
                )
            per_page = self.tokens_per_page(s.dtype)
            npages = len(s.pages)
            tail = s.num_tokens - (npages - 1) * per_page
            src_storage = self._devices[s.device].storage
            dst_storage = self._devices[d.device].storage
            assert src_storage is not None and dst_storage is not None
            dst_pages = list(d.pages[:npages])
            if s.device == d.device:
                src_storage.copy_pages(list(s.pages), dst_pages, tail_tokens=tail, dtype=s.dtype)
            else:
                dst_storage.write_pages(
                    dst_pages,
                    src_storage.read_pages(list(s.pages)),
                    tail_tokens=tail,
                    dtype=s.dtype,
                )

    def migrate(self, block: KVBlock, target_device: str) -> KVBlock:
        """Move ``block``'s data to ``target_device`` and release the source.

        Returns the new block (new handle, pages on the target). Migrating to the device the
        block is already on returns the block unchanged.

        Raises:
            UnsupportedDeviceError: the target cannot hold KV (lists the valid targets).
            InvalidKVBlockError: the block is not live here.
            KVCacheExhaustedError: the target has no room; the source is untouched.
        """
        target = self.normalize_device(target_device)
        with self._lock:
            src = self._validate(block)
            if target == src.device:
                return src
            src_dev = self._devices[src.device]
            dst_dev = self._devices[target]
            new = self._alloc_locked(
                src.num_tokens, src.dtype, self.tokens_per_page(src.dtype), dst_dev
            )
            assert src_dev.storage is not None and dst_dev.storage is not None
            assert src_dev.pool is not None and dst_dev.pool is not None
            try:
                data = src_dev.storage.read_pages(list(src.pages))
                dst_dev.storage.write_pages(list(new.pages), data)
            except BaseException:
                dst_dev.pool._free(new.pages, validate=False)
                del self._live[new.handle]
                raise
            src_dev.pool._free(src.pages, validate=False)
            del self._live[src.handle]
            return new

    def tensor(self, block: KVBlock) -> list[Any]:
        """Per-page handles of a live block's data, in token order.

        Torch storage: writable zero-copy views ``[num_layers, 2, tokens_per_page(dtype),
        kv_heads, head_dim]`` in the block's dtype. Accounting storage (mock):
        :class:`~sagellm_backend.kv.storage.PageRef` descriptors.
        """
        with self._lock:
            live = self._validate(block)
            storage = self._devices[live.device].storage
            assert storage is not None
            return storage.page_views(list(live.pages), live.dtype)

    def read(self, block: KVBlock) -> Any:
        """A copy of the block's whole pages (``storage.read_pages``)."""
        with self._lock:
            live = self._validate(block)
            storage = self._devices[live.device].storage
            assert storage is not None
            return storage.read_pages(list(live.pages))

    def storage_of(self, block: KVBlock) -> KVStorage:
        """The storage holding a live block's pages."""
        with self._lock:
            live = self._validate(block)
            storage = self._devices[live.device].storage
            assert storage is not None
            return storage

    def live_blocks(self) -> list[KVBlock]:
        """Blocks allocated and not yet freed."""
        with self._lock:
            return list(self._live.values())

    def __repr__(self) -> str:
        return f"ProviderKV(owner={self.owner!r}, devices={self.devices}, spec={self.spec})"
