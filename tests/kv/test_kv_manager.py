from __future__ import annotations

import contextlib
import threading

import pytest

from sagellm_backend.engine.metrics import KVRequestStats
from sagellm_backend.errors import InvalidKVBlockError, InvalidStateError, KVCacheExhaustedError
from sagellm_backend.kv.block_pool import BlockPool, sha256_block_hash
from sagellm_backend.kv.manager import KVCacheManager
from sagellm_backend.kv.spec import KVSpec

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4, block_size=16)


def make(num_pages: int = 32, **kw: object) -> KVCacheManager:
    pool = BlockPool(num_pages, page_bytes=SPEC.page_bytes)
    return KVCacheManager(pool, SPEC, **kw)  # type: ignore[arg-type]


def test_two_requests_sharing_a_three_block_prefix() -> None:
    m = make()
    prefix = list(range(48))  # exactly 3 blocks of 16
    a = [*prefix, *range(1000, 1016)]  # 64 tokens
    b = [*prefix, *range(2000, 2010)]  # 58 tokens
    assert m.allocate("a", a) == 0
    m.mark_computed("a", len(a))
    assert m.allocate("b", b) == 48
    ta, tb = m.block_table("a"), m.block_table("b")
    assert ta[:3] == tb[:3]
    assert len(set(ta) | set(tb)) == 4 + 4 - 3
    for p in ta[:3]:
        assert m.pool.ref_count(p) == 2
    s = m.stats()
    assert s.prefix_hit_tokens == 48 and s.prefix_query_tokens == 64 + 58
    assert s.prefix_hit_rate == pytest.approx(48 / 122)
    assert s.num_free_pages == 32 - 5
    assert s.kv_used_bytes == 5 * SPEC.page_bytes
    assert s.kv_used_tokens == 64 + 58 - 48  # shared prefix counted once
    assert s.num_seq_tokens == 64 + 58
    rb = m.request_stats("b")
    assert rb == KVRequestStats(
        used_tokens=58,
        used_bytes=4 * SPEC.page_bytes,
        prefix_hit_rate=48 / 58,
        evict_count=0,
        evict_ms=0.0,
    )
    assert m.request_stats("a").prefix_hit_rate == 0.0


def test_match_prefix_changes_nothing() -> None:
    m = make()
    toks = list(range(40))
    m.allocate("a", toks)
    m.mark_computed("a", 40)
    m.free("a")
    queue, stats = m.pool.free_queue(), m.stats()
    assert m.match_prefix(toks) == 32
    assert m.match_prefix(tuple(toks[:33])) == 32
    assert m.match_prefix(toks[:32]) == 16  # capped at len - 1
    assert m.match_prefix([7, *toks]) == 0
    assert (m.pool.free_queue(), m.stats()) == (queue, stats)


def test_hit_is_capped_at_len_minus_one() -> None:
    m = make()
    toks = list(range(32))
    m.allocate("a", toks)
    m.mark_computed("a", 32)
    # identical 32-token prompt: only the first block may be reused (last token recomputed)
    assert m.allocate("b", toks) == 16
    assert m.allocate("c", [*toks, 5]) == 32


def test_nothing_is_cached_before_mark_computed() -> None:
    m = make()
    toks = list(range(40))
    m.allocate("a", toks)
    assert m.allocate("b", toks) == 0
    m.mark_computed("a", 20)  # one full block computed
    assert m.pool.num_cached == 1
    assert m.allocate("c", toks) == 16
    m.mark_computed("a", 10)  # smaller: ignored
    assert m.num_computed_tokens("a") == 20


def test_freed_prefix_stays_cached_then_is_evicted_lru() -> None:
    m = make(num_pages=4)
    toks = list(range(33))  # 3 pages, 2 full blocks
    m.allocate("a", toks)
    m.mark_computed("a", 33)
    m.free("a")
    s = m.stats()
    assert s.num_cached_pages == 2 and s.num_free_pages == 4 and s.kv_used_tokens == 0
    assert m.allocate("b", toks) == 32  # reuse after free
    m.free("b")
    # a different 4-page sequence must evict both cached pages
    m.allocate("c", list(range(100, 164)))
    s = m.stats()
    assert s.evict_count == 2 and s.num_cached_pages == 0
    assert m.request_stats("c").evict_count == 2


def test_prefix_roots_are_evicted_last() -> None:
    m = make(num_pages=5)
    toks = list(range(49))  # 4 pages, 3 full blocks
    m.allocate("a", toks)
    m.mark_computed("a", 49)
    m.free("a")
    # 4 pages: the 2 uncached free pages (never used, a's partial last page), then the two
    # cached tail blocks are evicted; the root block survives
    m.allocate("x", list(range(500, 564)))
    assert m.pool.num_cached == 1 and m.stats().evict_count == 2
    m.free("x")
    assert m.allocate("b", toks) == 16  # the root block survived


def test_append_grows_and_exhaustion_leaves_state_unchanged() -> None:
    m = make(num_pages=3)
    m.allocate("a", list(range(15)))
    m.append("a", [15])
    assert m.block_table("a") == [0] and m.num_tokens("a") == 16
    m.append("a", [16])
    assert len(m.block_table("a")) == 2
    m.allocate("b", [1])
    before = (m.block_table("a"), m.num_tokens("a"), m.stats())
    with pytest.raises(KVCacheExhaustedError):
        m.append("a", list(range(32)))
    assert (m.block_table("a"), m.num_tokens("a"), m.stats()) == before
    assert not m.can_append("a", 16) and m.can_append("a", 15)
    with pytest.raises(KVCacheExhaustedError):
        m.allocate("c", list(range(17)))
    assert "c" not in m and m.stats() == before[2]
    m.pool.check_invariants()


def test_exhaustion_with_prefix_hits_does_not_touch_lru_order() -> None:
    m = make(num_pages=3)
    toks = list(range(33))
    m.allocate("a", toks)
    m.mark_computed("a", 33)
    m.free("a")
    queue = m.pool.free_queue()
    with pytest.raises(KVCacheExhaustedError):
        m.allocate("b", [*toks[:32], *range(100, 140)])  # 2 hits + 3 new pages > 1 free
    assert m.pool.free_queue() == queue and m.pool.num_cached == 2


def test_slot_mapping_and_block_table() -> None:
    m = make()
    m.allocate("x", [9])  # take page 0 so the next sequence is not at 0
    m.allocate("a", list(range(40)))
    table = m.block_table("a")
    slots = m.slot_mapping("a", 0, 40)
    assert slots == [table[i // 16] * 16 + i % 16 for i in range(40)]
    assert m.slot_mapping("a", 17, 18) == [table[1] * 16 + 1]
    assert m.slot_mapping("a", 5, 5) == []
    with pytest.raises(InvalidKVBlockError):
        m.slot_mapping("a", 0, 41)
    with pytest.raises(InvalidKVBlockError):
        m.slot_mapping("a", 3, 2)


def test_bad_sequence_operations() -> None:
    m = make()
    with pytest.raises(InvalidKVBlockError, match="empty"):
        m.allocate("a", [])
    m.allocate("a", [1, 2])
    with pytest.raises(InvalidKVBlockError, match="already"):
        m.allocate("a", [1])
    with pytest.raises(InvalidKVBlockError):
        m.mark_computed("a", 3)
    m.free("a")
    for call in (
        lambda: m.free("a"),
        lambda: m.append("a", [1]),
        lambda: m.block_table("a"),
        lambda: m.request_stats("a"),
    ):
        with pytest.raises(InvalidKVBlockError, match="unknown sequence"):
            call()


def test_free_returns_final_stats_and_discard_uncaches() -> None:
    m = make()
    toks = list(range(40))
    m.allocate("a", toks)
    m.mark_computed("a", 40)
    stats = m.free("a", discard=True)
    assert stats.used_tokens == 40 and stats.used_bytes == 3 * SPEC.page_bytes
    assert m.pool.num_cached == 0
    assert m.allocate("b", toks) == 0


def test_discard_keeps_pages_shared_with_others() -> None:
    m = make()
    toks = list(range(40))
    m.allocate("a", toks)
    m.mark_computed("a", 40)
    m.allocate("b", toks)  # shares 2 blocks
    m.free("a", discard=True)
    assert m.pool.num_cached == 2  # still referenced by b, so kept
    assert m.allocate("c", toks) == 32


def test_prefix_caching_disabled() -> None:
    m = make(enable_prefix_caching=False)
    toks = list(range(40))
    m.allocate("a", toks)
    m.mark_computed("a", 40)
    assert m.allocate("b", toks) == 0
    assert m.pool.num_cached == 0
    assert m.stats().prefix_hit_rate == 0.0


def test_sha256_hash_fn_gives_same_reuse() -> None:
    m = make(hash_fn=sha256_block_hash)
    toks = list(range(50))
    m.allocate("a", toks)
    m.mark_computed("a", 50)
    assert m.allocate("b", toks) == 48


def test_duplicate_concurrent_blocks_are_cached_once() -> None:
    m = make()
    toks = list(range(32))
    m.allocate("a", toks)
    m.allocate("b", toks)  # computed concurrently with a, no hit
    m.mark_computed("a", 32)
    m.mark_computed("b", 32)
    assert m.pool.num_cached == 2
    m.free("a")
    m.free("b")
    m.pool.check_invariants()
    assert m.stats().num_evictable_pages == 2


def test_reset_and_clear_cache() -> None:
    m = make()
    m.allocate("a", list(range(33)))
    m.mark_computed("a", 33)
    with pytest.raises(InvalidStateError):
        m.reset()
    m.free("a")
    assert m.clear_cache() == 2
    m.reset()
    assert m.stats().prefix_query_tokens == 0 and m.pool.free_queue() == list(range(32))


def test_mismatched_pool_and_spec_rejected() -> None:
    with pytest.raises(ValueError, match="bytes"):
        KVCacheManager(BlockPool(4, page_bytes=7), SPEC)
    with pytest.raises(TypeError):
        KVCacheManager(object(), SPEC)  # type: ignore[arg-type]


def test_threads_allocate_append_free() -> None:
    m = make(num_pages=64)
    errors: list[BaseException] = []
    shared = list(range(32))

    def worker(w: int) -> None:
        try:
            for i in range(200):
                sid = f"{w}-{i}"
                try:
                    m.allocate(sid, [*shared, w, i])
                except KVCacheExhaustedError:
                    continue
                m.mark_computed(sid, 34)
                with contextlib.suppress(KVCacheExhaustedError):
                    m.append(sid, [1] * 20)
                m.free(sid)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(m) == 0 and m.stats().kv_used_tokens == 0
    assert m.pool.num_free == 64
    m.pool.check_invariants()
    assert m.stats().prefix_hit_tokens > 0


def test_managers_sharing_a_pool_report_their_own_footprint() -> None:
    """kv_used_* of a manager = distinct pages of its own sequences, whoever else shares."""
    pool = BlockPool(16, page_bytes=SPEC.page_bytes)
    a, b = KVCacheManager(pool, SPEC), KVCacheManager(pool, SPEC)
    prompt = list(range(40))  # 2 full blocks + 8 tokens
    a.allocate("x", prompt)
    a.mark_computed("x", 40)
    assert b.allocate("y", prompt) == 32  # shares the two full pages a holds
    b.allocate("z", [*prompt[:32], 99])  # same two pages, held twice by b
    sa, sb = a.stats(), b.stats()
    assert (sa.kv_used_tokens, sa.kv_used_bytes) == (40, 3 * SPEC.page_bytes)
    # b: pages {p0, p1, y's tail, z's tail}; p0/p1 once although two of its seqs hold them
    assert (sb.kv_used_tokens, sb.kv_used_bytes) == (32 + 8 + 1, 4 * SPEC.page_bytes)
    assert sa.num_pages - sa.num_free_pages == pool.num_used == 2 + 1 + 1 + 1
    a.free("x")  # b still holds the shared pages: a's footprint drops to nothing
    assert (a.stats().kv_used_tokens, a.stats().kv_used_bytes) == (0, 0)
    assert b.stats().kv_used_tokens == 41
    b.free("y")
    assert (b.stats().kv_used_tokens, b.stats().kv_used_bytes) == (33, 3 * SPEC.page_bytes)
    b.free("z")
    assert pool.num_used == 0
    assert (b.stats().kv_used_tokens, b.stats().kv_used_bytes) == (0, 0)
    assert (a.stats().kv_used_tokens, b.stats().kv_used_tokens) == (0, 0)


def test_used_tokens_exact_when_one_manager_rehits_its_own_page() -> None:
    """A hit on a page this manager already holds adds no usage; on a cached free one it does."""
    m = make()
    prompt = list(range(33))
    m.allocate("a", prompt)
    m.mark_computed("a", 33)
    m.allocate("b", prompt)  # 2 shared pages + own tail
    assert m.stats().kv_used_tokens == 33 + 1
    m.free("a")
    m.free("b")
    assert m.stats().kv_used_tokens == 0 and m.pool.num_cached == 2
    m.allocate("c", prompt)  # hits the two cached (unreferenced) pages: they count again
    assert (m.stats().kv_used_tokens, m.stats().kv_used_bytes) == (33, 3 * SPEC.page_bytes)
    m.free("c", discard=True)  # c registered nothing itself: the cached pages stay
    assert m.pool.num_cached == 2 and m.stats().kv_used_tokens == 0
