"""Where the bytes of KV pages live.

Two implementations of one small interface (:class:`KVStorage`), both constructed as
``Storage(spec, num_pages, device)`` so a provider can inject either as its storage factory:

* :class:`AccountingStorage` (mock provider): no K/V bytes, only the same capacity and
  page-range rules as real storage, plus a *content tag* per page that copies/reads/writes
  carry along, so tests can check that a copy or migration really moved page contents.
* :class:`TorchKVStorage` (cpu/cuda providers with torch): one preallocated tensor of shape
  ``[num_layers, 2, num_pages, block_size, num_kv_heads, head_dim]`` in the spec dtype
  (index 0 of the second axis is K, 1 is V). torch is imported only when it is created.
* :class:`HostKVStorage` (cpu provider without torch): one preallocated ``bytearray`` of
  host memory, page-major (page ``p`` is bytes ``[p * page_bytes, (p + 1) * page_bytes)``,
  laid out inside as ``[num_layers, 2, tokens, num_kv_heads, head_dim]``); copies and
  migrations really move the bytes; page views are writable ``memoryview`` objects.

Other dtypes on the same pages (the generic ``kv_block_alloc(num_tokens, dtype)`` API): a
page is ``spec.page_bytes`` bytes whatever the dtype. For a page ``p`` the bytes of each
``(layer, k/v)`` pair are one contiguous run, so reinterpreting every run as ``dtype`` gives
a zero-copy view ``[num_layers, 2, num_pages, tokens_per_page(dtype), kv_heads, head_dim']``
(:meth:`TorchKVStorage.dtype_view`; ``head_dim' = head_dim // 2`` for INT4, which is stored
packed two per byte as ``uint8``). Page copies are byte copies, so they are exact for any
dtype.

Layout: the interface and its shared checks are in :mod:`._storage_base`, the three
storages in ``_accounting_storage``, ``_host_storage`` and ``_torch_storage``; every public
name is importable from here.
"""

from __future__ import annotations

from sagellm_backend.kv._accounting_storage import AccountingPages, AccountingStorage, PageRef
from sagellm_backend.kv._host_storage import HOST_FORMATS, HostKVStorage, HostPages
from sagellm_backend.kv._storage_base import KVStorage, StorageFactory
from sagellm_backend.kv._torch_storage import TorchKVStorage, torch_dtype_of

__all__ = [
    "HOST_FORMATS",
    "AccountingPages",
    "AccountingStorage",
    "HostKVStorage",
    "HostPages",
    "KVStorage",
    "PageRef",
    "StorageFactory",
    "TorchKVStorage",
    "torch_dtype_of",
]
