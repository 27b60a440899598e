"""Per-device KV state of :class:`~sagellm_backend.kv.provider_kv.ProviderKV` and block helpers.

Internal: ``_DeviceKV`` is one device's budget, block pool and managers;
``_BlockBuilder`` builds :class:`~sagellm_backend.base.KVBlock` objects cheaply;
``_check_num_tokens`` raises the errors of a bad ``num_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sagellm_backend.capability import DType
from sagellm_backend.kv.block_pool import BlockPool
from sagellm_backend.kv.manager import KVCacheManager
from sagellm_backend.kv.storage import KVStorage


@dataclass
class _DeviceKV:
    """KV state of one device (internal).

    Invariants: ``pool`` and ``storage`` are both None (block pool not made yet) or both
    set; ``accounting`` is ``not storage.preallocated`` once they are set (pages in use are
    charged to ``budget``; preallocated storage is charged in full).
    """

    device: str
    budget: int
    pool_bytes: int | None
    pool: BlockPool | None = None
    storage: KVStorage | None = None
    accounting: bool = False
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


class _BlockBuilder:
    """Mutable twin of the frozen :class:`KVBlock`, for building one without ``__init__``.

    Usage: ``b = _BlockBuilder()``, set the seven KVBlock fields as attributes, then
    ``b.__class__ = KVBlock``. The result is an ordinary KVBlock (equal to, and hashing
    like, ``KVBlock(...)`` with the same fields; CPython materialises its ``__dict__`` on
    the class change), built in about half the time of the frozen ``__init__`` with its
    per-field ``object.__setattr__``. Both classes are plain heap types with ``__dict__``
    and ``__weakref__``, which is what makes ``__class__`` assignment between them legal;
    ``tests/kv/test_provider_kv_blocks.py`` checks the result.
    """

    # annotations only (no class attributes): instances keep an empty, plain layout
    handle: int
    num_tokens: int
    dtype: DType
    device: str
    pages: tuple[int, ...]
    owner: str
    num_bytes: int


def _check_num_tokens(num_tokens: object) -> int:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
        raise TypeError(f"num_tokens must be an int, got {type(num_tokens).__name__}")
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    return num_tokens
