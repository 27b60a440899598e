"""Paged KV cache: geometry, block pool, prefix cache, manager, storage.

Importing this package does not import torch; :class:`TorchKVStorage` imports it when an
instance is created.
"""

from sagellm_backend.kv.block_pool import (
    ROOT_HASH,
    BlockHashFn,
    BlockPool,
    hash_block_tokens,
    sha256_block_hash,
)
from sagellm_backend.kv.manager import KVCacheManager, KVStats
from sagellm_backend.kv.provider_kv import ProviderKV
from sagellm_backend.kv.spec import DEFAULT_KV_SPEC, KVSpec
from sagellm_backend.kv.storage import (
    AccountingPages,
    AccountingStorage,
    KVStorage,
    PageRef,
    StorageFactory,
    TorchKVStorage,
)

__all__ = [
    "DEFAULT_KV_SPEC",
    "ROOT_HASH",
    "AccountingPages",
    "AccountingStorage",
    "BlockHashFn",
    "BlockPool",
    "KVCacheManager",
    "KVSpec",
    "KVStats",
    "KVStorage",
    "PageRef",
    "ProviderKV",
    "StorageFactory",
    "TorchKVStorage",
    "hash_block_tokens",
    "sha256_block_hash",
]
