"""Blocks built by ProviderKV's fast path are ordinary KVBlocks (identity, equality, pickling)."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import threading

import pytest

from sagellm_backend.base import KVBlock
from sagellm_backend.capability import DType
from sagellm_backend.errors import InvalidKVBlockError, KVCacheExhaustedError
from sagellm_backend.kv.spec import KVSpec
from sagellm_backend.providers.mock import MockBackendProvider

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=16)


def test_fast_block_is_a_plain_frozen_kvblock() -> None:
    p = MockBackendProvider(kv_spec=SPEC)
    block = p.kv_block_alloc(40, DType.FP16)
    assert type(block) is KVBlock
    same = KVBlock(
        block.handle,
        40,
        DType.FP16,
        "mock:0",
        block.pages,
        p.provider_id,
        len(block.pages) * SPEC.page_bytes,
    )
    assert block == same and hash(block) == hash(same)
    assert dataclasses.asdict(block) == dataclasses.asdict(same)
    assert vars(block) == vars(same)
    with pytest.raises(dataclasses.FrozenInstanceError):
        block.handle = 99  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(block)) == block
    assert copy.deepcopy(block) == block
    # an equal copy is accepted by free (validated in full), the original is then dead
    p.kv_block_free(copy.copy(block))
    with pytest.raises(InvalidKVBlockError, match="already freed"):
        p.kv_block_free(block)


def test_single_and_multi_page_blocks_return_their_pages() -> None:
    p = MockBackendProvider(kv_spec=SPEC)
    pool_free = p.kv.device_stats()["kv_used_bytes"]
    one = p.kv_block_alloc(16, DType.FP16)
    many = p.kv_block_alloc(16 * 5, DType.FP16)
    assert len(one.pages) == 1 and len(many.pages) == 5
    assert not set(one.pages) & set(many.pages)
    assert p.kv.device_stats()["kv_used_bytes"] == 6 * SPEC.page_bytes
    p.kv_block_free(many)
    p.kv_block_free(one)
    assert p.kv.device_stats()["kv_used_bytes"] == pool_free
    assert p.kv.stats()["num_kv_blocks"] == 0


def test_alloc_free_from_threads_keeps_the_pool_consistent() -> None:
    p = MockBackendProvider(kv_spec=SPEC, max_memory_mb=1)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(2000):
                b = p.kv_block_alloc(1 + (seed * 7 + i) % 40, DType.FP16)
                p.kv_block_free(b)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = p.kv.device_stats()
    assert stats["kv_used_bytes"] == 0 and stats["num_kv_blocks"] == 0
    pool = p.kv._own.pool
    assert pool is not None
    pool.check_invariants()
    assert pool.num_free == pool.num_pages


def test_kv_fault_limit_is_exact_across_block_api_and_managers_from_threads() -> None:
    # The block API is counted by ProviderKV and the managers by the mock's guard; with a
    # fault limit set, the two together must never hand out more than the limit.
    limit = 300
    p = MockBackendProvider(kv_spec=SPEC, fail_kv_after_pages=limit)
    manager = p.create_kv_manager(num_pages=512)
    handed_after_manager = p.kv_pages_handed_out
    assert handed_after_manager == 0  # creating a manager hands out no pages
    got: list[int] = [0, 0]
    lock = threading.Lock()

    def blocks() -> None:
        while True:
            try:
                p.kv_block_alloc(16, DType.FP16)  # one page, kept
            except KVCacheExhaustedError:
                return
            with lock:
                got[0] += 1

    def sequences(tag: int) -> None:
        i = 0
        while True:
            try:
                manager.allocate(
                    f"s{tag}-{i}", list(range(tag * 10_000 + i * 16, tag * 10_000 + i * 16 + 16))
                )
            except KVCacheExhaustedError:
                return
            with lock:
                got[1] += 1
            i += 1

    threads = [threading.Thread(target=blocks) for _ in range(2)]
    threads += [threading.Thread(target=sequences, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] + got[1] == limit
    assert p.kv_pages_handed_out == limit
    assert p.kv.block_pages_handed_out == got[0]
    p.set_kv_fault(None)
    p.kv_block_alloc(16, DType.FP16)  # the limit is gone
    assert p.kv_pages_handed_out == limit + 1
