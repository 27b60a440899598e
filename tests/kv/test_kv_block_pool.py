from __future__ import annotations

import contextlib
import threading

import pytest
from sagellm_protocol import ErrorCode

from sagellm_backend.errors import (
    InvalidKVBlockError,
    InvalidStateError,
    KVCacheExhaustedError,
)
from sagellm_backend.kv.block_pool import (
    ROOT_HASH,
    BlockPool,
    hash_block_tokens,
    sha256_block_hash,
)


def snapshot(pool: BlockPool) -> tuple[object, ...]:
    return (
        pool.free_queue(),
        [pool.ref_count(p) for p in range(pool.num_pages)],
        [pool.page_hash(p) for p in range(pool.num_pages)],
        pool.num_free,
        pool.num_cached,
        pool.evict_count,
    )


def test_allocate_in_id_order_and_free_to_head() -> None:
    pool = BlockPool(4, page_bytes=10)
    assert pool.allocate(2) == [0, 1]
    assert pool.num_used == 2 and pool.num_free == 2 and pool.used_bytes == 20
    pool.free([1])
    # an uncached freed page is worth nothing: reused first
    assert pool.free_queue() == [1, 2, 3]
    assert pool.allocate(1) == [1]
    pool.check_invariants()


def test_cached_pages_go_to_tail_and_are_evicted_lru() -> None:
    pool = BlockPool(4)
    pages = pool.allocate(4)
    for p in pages:
        assert pool.cache_page(p, 100 + p)
    pool.free([2])
    pool.free([0])
    pool.free([3, 1])
    assert pool.free_queue() == [2, 0, 3, 1]
    assert pool.num_evictable == 4
    # allocation evicts from the LRU end
    assert pool.allocate(2) == [2, 0]
    assert pool.evict_count == 2 and pool.evict_ms >= 0.0
    assert pool.lookup(102) is None and pool.lookup(100) is None
    assert pool.lookup(103) == 3
    pool.check_invariants()


def test_uncached_free_pages_are_used_before_evicting() -> None:
    pool = BlockPool(3)
    a, b, _c = pool.allocate(3)
    pool.cache_page(a, 1)
    pool.free([a])  # cached -> tail
    pool.free([b])  # uncached -> head
    assert pool.allocate(1) == [b]
    assert pool.evict_count == 0
    assert pool.lookup(1) == a
    pool.check_invariants()


def test_incref_of_cached_free_page_takes_it_off_the_queue() -> None:
    pool = BlockPool(3)
    (p,) = pool.allocate(1)
    pool.cache_page(p, 7)
    pool.free([p])
    assert pool.num_free == 3
    pool.incref([p])
    assert pool.ref_count(p) == 1 and pool.num_free == 2 and p not in pool.free_queue()
    pool.incref([p])
    assert pool.ref_count(p) == 2
    pool.free([p, p])
    assert pool.ref_count(p) == 0
    pool.check_invariants()


def test_incref_of_free_uncached_page_refused() -> None:
    pool = BlockPool(2)
    before = snapshot(pool)
    with pytest.raises(InvalidKVBlockError, match="caches nothing"):
        pool.incref([0])
    assert snapshot(pool) == before


def test_exhaustion_is_all_or_nothing() -> None:
    pool = BlockPool(4)
    pool.allocate(3)
    before = snapshot(pool)
    with pytest.raises(KVCacheExhaustedError) as info:
        pool.allocate(2)
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert isinstance(info.value, MemoryError)
    assert snapshot(pool) == before


def test_double_free_and_bad_ids_leave_pool_intact() -> None:
    pool = BlockPool(4)
    pages = pool.allocate(2)
    pool.free([pages[0]])
    before = snapshot(pool)
    with pytest.raises(InvalidKVBlockError, match="double free"):
        pool.free([pages[1], pages[0]])
    with pytest.raises(InvalidKVBlockError):
        pool.free([pages[1], pages[1]])  # only one reference
    for bad in (-1, 4, 1.0, True):
        with pytest.raises(InvalidKVBlockError):
            pool.free([bad])  # type: ignore[list-item]
    assert snapshot(pool) == before
    pool.check_invariants()


def test_cache_page_rules() -> None:
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    assert pool.cache_page(a, 5)
    assert pool.cache_page(a, 5)  # idempotent
    assert not pool.cache_page(b, 5)  # duplicate hash stays with a
    assert pool.page_hash(b) is None
    with pytest.raises(InvalidKVBlockError):
        pool.cache_page(a, 6)
    with pytest.raises(InvalidKVBlockError, match="free"):
        pool.cache_page(2, 9)
    disabled = BlockPool(2, enable_caching=False)
    (p,) = disabled.allocate(1)
    assert not disabled.cache_page(p, 1)
    assert disabled.num_cached == 0


def test_uncache_moves_free_page_to_head() -> None:
    pool = BlockPool(3)
    pages = pool.allocate(3)
    pool.cache_page(pages[0], 1)
    pool.free(pages)
    assert pool.free_queue()[-1] == pages[0]
    assert pool.uncache(pages[0])
    assert pool.free_queue()[0] == pages[0]
    assert not pool.uncache(pages[0])
    assert pool.evict_count == 0
    pool.check_invariants()


def test_evict_all_and_reset() -> None:
    pool = BlockPool(4)
    pages = pool.allocate(3)
    for i, p in enumerate(pages):
        pool.cache_page(p, i)
    pool.free(pages[:2])
    assert pool.evict_all() == 2
    assert pool.num_cached == 1 and pool.evict_count == 2
    with pytest.raises(InvalidStateError, match="in use"):
        pool.reset()
    pool.free(pages[2:])
    pool.reset()
    assert pool.num_cached == 0 and pool.free_queue() == [0, 1, 2, 3]
    pool.check_invariants()


def test_zero_and_negative_allocations() -> None:
    pool = BlockPool(1)
    assert pool.allocate(0) == []
    with pytest.raises(ValueError):
        pool.allocate(-1)
    with pytest.raises(ValueError):
        BlockPool(0)


def test_alloc_guard_can_refuse_without_changes() -> None:
    calls: list[int] = []

    def guard(n: int) -> None:
        calls.append(n)
        if sum(calls) > 3:
            raise KVCacheExhaustedError("injected")

    pool = BlockPool(8, alloc_guard=guard)
    pool.allocate(2)
    before = snapshot(pool)
    with pytest.raises(KVCacheExhaustedError, match="injected"):
        pool.allocate(2)
    assert snapshot(pool) == before


def test_hash_functions_are_deterministic_and_chained() -> None:
    toks = list(range(16))
    h1 = hash_block_tokens(ROOT_HASH, toks)
    assert h1 == hash_block_tokens(ROOT_HASH, tuple(toks))
    assert h1 != hash_block_tokens(h1, toks)
    assert h1 != hash_block_tokens(ROOT_HASH, toks[::-1])
    s1 = sha256_block_hash(ROOT_HASH, toks)
    assert s1 == sha256_block_hash(ROOT_HASH, toks) and s1 >= 0
    assert s1 != sha256_block_hash(s1, toks)


def test_hash_is_stable_across_processes() -> None:
    import subprocess
    import sys

    code = (
        "from sagellm_backend.kv.block_pool import hash_block_tokens, ROOT_HASH;"
        "print(hash_block_tokens(ROOT_HASH, list(range(16))))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outs == {str(hash_block_tokens(ROOT_HASH, list(range(16))))}


def test_concurrent_alloc_free_keeps_invariants() -> None:
    pool = BlockPool(64)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            held: list[int] = []
            for i in range(2000):
                if (i + seed) % 3 and pool.num_free:
                    with contextlib.suppress(KVCacheExhaustedError):
                        held += pool.allocate(1)
                elif held:
                    pool.free([held.pop()])
            pool.free(held)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.num_free == 64
    pool.check_invariants()
