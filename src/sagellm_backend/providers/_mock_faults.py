"""Fault injection of :class:`~sagellm_backend.providers.mock.MockBackendProvider`.

:class:`MockFaults` holds the KV page count behind ``fail_kv_after_pages`` (block API and
managers together), the guards that enforce it, and the methods that set or clear
injected faults later.

KV pages are counted in two places: ``ProviderKV.block_pages_handed_out`` for the block
API (under the provider's KV lock, with no guard call while no limit is set: the hot
path) and ``_manager_pages`` for managers' pools (under the mock's lock, in
:meth:`MockFaults._kv_guard`). While a limit is set the block API runs
:meth:`MockFaults._kv_block_guard` after counting its request, so each check under the
mock's lock sees every page counted so far, and the limit is exact across threads.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from sagellm_backend.errors import KVCacheExhaustedError
from sagellm_backend.providers._mock_config import KernelFault, _positive_int

if TYPE_CHECKING:
    from sagellm_backend.kv.provider_kv import ProviderKV


class MockFaults:
    """Injected KV and kernel faults of the mock provider (a mixin).

    Invariants: the host class sets ``_lock``, ``_fail_kv_after`` (None: no KV limit),
    ``_manager_pages``, ``_kernel_faults``, ``_kernel_latency_s``,
    ``_default_kernel_latency_s`` and ``_collective_latency_s``, creates its ProviderKV
    (``kv``) with ``alloc_guard=self._kv_guard`` and then calls :meth:`_arm_block_guard`.
    """

    _lock: threading.Lock
    _fail_kv_after: int | None
    _manager_pages: int
    _kernel_faults: dict[str, KernelFault]
    _kernel_latency_s: dict[str, float]
    _default_kernel_latency_s: float
    _collective_latency_s: float

    if TYPE_CHECKING:

        @property
        def kv(self) -> ProviderKV: ...

    # ------------------------------------------------------------------ KV page count
    @property
    def kv_pages_handed_out(self) -> int:
        """KV pages handed out since construction: block API and managers together."""
        return self._manager_pages + self.kv.block_pages_handed_out

    def _arm_block_guard(self) -> None:
        # Lock held or construction. Without a fault the block API needs no guard: its
        # pages are counted by ProviderKV (block_pages_handed_out) under the provider lock.
        self.kv.block_guard = None if self._fail_kv_after is None else self._kv_block_guard

    def _kv_fault(self, limit: int, handed_out: int, n: int) -> KVCacheExhaustedError:
        return KVCacheExhaustedError(
            f"KV cache exhausted (injected fault: fail_kv_after_pages={limit}, "
            f"{handed_out} pages handed out, {n} more requested)"
        )

    def _kv_guard(self, n: int) -> None:
        """Guard of the managers' pools: count ``n`` pages, or raise past the fault limit."""
        lock = self._lock
        lock.acquire()  # explicit acquire/release: cheaper than `with` on CPython 3.11
        try:
            limit = self._fail_kv_after
            if limit is not None:
                handed_out = self.kv_pages_handed_out
                if handed_out + n > limit:
                    raise self._kv_fault(limit, handed_out, n)
            self._manager_pages += n
        finally:
            lock.release()

    def _kv_block_guard(self, n: int) -> None:
        """Guard of the block API while a fault limit is set (``n`` is already counted)."""
        with self._lock:
            limit = self._fail_kv_after
            handed_out = self.kv_pages_handed_out - n
            if limit is not None and handed_out + n > limit:
                raise self._kv_fault(limit, handed_out, n)

    # ------------------------------------------------------------------ fault injection
    def inject_kernel_failure(
        self, name: str, error: BaseException | type[BaseException] | None = None
    ) -> None:
        """Make calls of kernel ``name`` (fetched after this) raise ``error``.

        ``error`` defaults to :class:`InjectedFaultError`.
        """
        self._kernel_faults[name] = error

    def set_kv_fault(self, fail_after_pages: int | None) -> None:
        """Fail KV allocations beyond ``fail_after_pages`` pages handed out in total.

        The count runs from construction (``kv_pages_handed_out``); None turns it off.
        """
        _positive_int("fail_after_pages", fail_after_pages, allow_none=True)
        with self._lock:
            self._fail_kv_after = fail_after_pages
            self._arm_block_guard()

    def clear_faults(self) -> None:
        """Remove every injected kernel/KV fault and latency."""
        with self._lock:
            self._kernel_faults.clear()
            self._kernel_latency_s.clear()
            self._default_kernel_latency_s = 0.0
            self._collective_latency_s = 0.0
            self._fail_kv_after = None
            self._arm_block_guard()
