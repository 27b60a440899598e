"""Per-device KV state of :class:`~sagellm_backend.kv.provider_kv.ProviderKV` and block helpers.

Internal: ``_DeviceKV`` is one device's budget, block pool and managers; ``_new_block``
builds a :class:`~sagellm_backend.base.KVBlock` without the frozen dataclass's overhead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sagellm_backend.base import KVBlock
from sagellm_backend.capability import DType
from sagellm_backend.kv.block_pool import BlockPool
from sagellm_backend.kv.manager import KVCacheManager
from sagellm_backend.kv.storage import KVStorage


@dataclass
class _DeviceKV:
    """KV state of one device (internal)."""

    device: str
    budget: int
    pool_bytes: int | None
    pool: BlockPool | None = None
    storage: KVStorage | None = None
    managers: list[KVCacheManager] = field(default_factory=list)
    manager_bytes: int = 0
    peak: int = 0

    def charge(self) -> int:
        """Bytes of the budget in use now."""
        total = self.manager_bytes
        if self.pool is not None and self.storage is not None:
            total += self.storage.nbytes if self.storage.preallocated else self.pool.used_bytes
        return total

    def pools(self) -> list[BlockPool]:
        out = [m.pool for m in self.managers]
        if self.pool is not None:
            out.append(self.pool)
        return out


def _make_block_fast() -> Callable[..., KVBlock]:
    """A KVBlock constructor that skips the frozen dataclass's per-field ``__setattr__``.

    The result is an ordinary, equal and hashable :class:`KVBlock` (``__dict__`` filled
    directly, which is what the frozen ``__init__`` does field by field). Falls back to the
    regular constructor if KVBlock ever stops having a ``__dict__``.
    """
    if "__slots__" in vars(KVBlock) or not hasattr(KVBlock, "__dataclass_fields__"):
        return KVBlock  # pragma: no cover - depends on base.KVBlock's definition
    new = object.__new__

    def make(
        handle: int,
        num_tokens: int,
        dtype: DType,
        device: str,
        pages: tuple[int, ...],
        owner: str,
        num_bytes: int,
    ) -> KVBlock:
        block = new(KVBlock)
        block.__dict__.update(
            handle=handle,
            num_tokens=num_tokens,
            dtype=dtype,
            device=device,
            pages=pages,
            owner=owner,
            num_bytes=num_bytes,
        )
        return block

    return make


_new_block = _make_block_fast()


def _check_num_tokens(num_tokens: object) -> int:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
        raise TypeError(f"num_tokens must be an int, got {type(num_tokens).__name__}")
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    return num_tokens
