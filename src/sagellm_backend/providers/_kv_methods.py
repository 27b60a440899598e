"""The KV half of a provider's API, forwarded to its :class:`ProviderKV`.

:class:`ProviderKVMethods` is shared by the mock and the torch providers, so that
``kv_block_alloc/free/copy/migrate``, ``get_kv_tensor`` and ``create/release_kv_manager``
have one implementation and the same semantics everywhere (see
:mod:`sagellm_backend.kv.provider_kv`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sagellm_backend.base import KVBlock
from sagellm_backend.capability import DType

if TYPE_CHECKING:
    from sagellm_backend.kv.manager import KVCacheManager
    from sagellm_backend.kv.provider_kv import ProviderKV
    from sagellm_backend.kv.spec import KVSpec


class ProviderKVMethods:
    """KV methods of a provider (a mixin).

    Invariants: the host class sets ``_kv`` (its ProviderKV, or None until
    :meth:`_kv_core` creates it) and ``_dtype_set``: the dtypes it supports, whose
    ``kv_block_alloc`` then checks any other dtype with its own ``check_dtype`` first (its
    message, before ``num_tokens`` is looked at); None leaves every check to ProviderKV, in
    ProviderKV's order (``num_tokens``, then dtype).
    """

    _kv: ProviderKV | None
    _dtype_set: frozenset[DType] | None

    if TYPE_CHECKING:

        def check_dtype(self, dtype: DType | str) -> DType: ...

    def _kv_core(self) -> ProviderKV:
        """The provider's ProviderKV (created on first use where the host class allows)."""
        kv = self._kv
        assert kv is not None, "ProviderKVMethods: the host class must set _kv"
        return kv

    @property
    def kv(self) -> ProviderKV:
        """The KV core: pools, blocks, managers, figures."""
        return self._kv_core()

    def kv_block_alloc(self, num_tokens: int, dtype: DType) -> KVBlock:
        """Reserve KV pages for ``num_tokens`` tokens of ``dtype`` on the provider's device.

        Raises:
            ValueError: ``num_tokens <= 0`` (TypeError if not an int).
            UnsupportedDTypeError: ``dtype`` is not supported here (names the supported ones).
            KVCacheExhaustedError: not enough pages or budget (or an injected fault); nothing
                changes.
        """
        dtypes = self._dtype_set
        if dtypes is not None and (type(dtype) is not DType or dtype not in dtypes):
            dtype = self.check_dtype(dtype)  # raises with this provider's message
        kv = self._kv
        return (kv if kv is not None else self._kv_core()).alloc(num_tokens, dtype)

    def kv_block_free(self, block: KVBlock) -> None:
        """Release ``block`` (InvalidKVBlockError on double free or a foreign block)."""
        kv = self._kv
        (kv if kv is not None else self._kv_core()).free(block)

    def kv_block_copy(self, src: KVBlock, dst: KVBlock) -> None:
        """Copy ``src``'s K/V into ``dst`` (same dtype, ``dst`` large enough; any devices).

        The mock's storage has no bytes: content tags move instead.
        """
        self._kv_core().copy(src, dst)

    def kv_block_migrate(self, block: KVBlock, target_device: str) -> KVBlock:
        """Move ``block`` to ``target_device`` and release the source block.

        Targets: this device and its offload devices (cuda and the mock: ``"cpu"``).

        Raises:
            UnsupportedDeviceError: another target (the message lists the valid ones).
        """
        return self._kv_core().migrate(block, target_device)

    def get_kv_tensor(self, block: KVBlock) -> list[Any]:
        """Per-page handles of ``block``'s data, in token order.

        Torch providers: writable zero-copy views ``[num_layers, 2, tokens_per_page(dtype),
        kv_heads, head_dim]`` in the block's dtype, on the block's device (index 0 of dim 1
        is K, 1 is V). The mock: one :class:`~sagellm_backend.kv.storage.PageRef` per page.
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
        """A :class:`~sagellm_backend.kv.manager.KVCacheManager` charged to the KV budget.

        Its pool holds ``num_pages`` pages, or as many as fit in ``memory_bytes``, or what is
        left of the budget (the mock's: ``max_memory_mb``); it is charged until
        :meth:`release_kv_manager`. With torch, ``manager.storage.layer_kv(layer)`` gives
        the flat-slot K/V caches that the ``paged_attention`` kernel reads.

        ``spec`` None means the provider's KV spec.

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
