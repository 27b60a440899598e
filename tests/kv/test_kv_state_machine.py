"""Property test: random alloc / share (prefix) / append / compute / free / evict sequences.

The model tracks what each page must contain; the checks after every step are the pool's
own invariants plus: refcount of a page == number of owners holding it, free + used ==
total, ``kv_used_tokens`` equals a brute-force recount, prefix hits only ever return pages
whose computed content is exactly the requested prefix, and once every owner is gone the
pool is full again with only evictable cached pages left.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from sagellm_backend.errors import KVCacheExhaustedError
from sagellm_backend.kv.block_pool import BlockPool
from sagellm_backend.kv.manager import KVCacheManager
from sagellm_backend.kv.spec import KVSpec

B = 4
NUM_PAGES = 16
SPEC = KVSpec(num_layers=1, num_kv_heads=1, head_dim=2, block_size=B)
PREFIXES = [(), (1, 2, 3, 4), (1, 2, 3, 4, 5, 6, 7, 8), (9, 9, 9, 9, 9, 9)]

tokens_st = st.lists(st.integers(0, 3), min_size=0, max_size=14) | st.integers(1, 3).flatmap(
    lambda k: st.lists(st.integers(0, 1), min_size=B * k, max_size=B * k)  # whole blocks
)


class KVMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    @initialize()
    def setup(self) -> None:
        self.pool = BlockPool(NUM_PAGES, page_bytes=SPEC.page_bytes)
        self.m = KVCacheManager(self.pool, SPEC)
        self.tokens: dict[str, list[int]] = {}
        self.raw: list[int] = []  # pages held directly on the pool by another owner
        self.content: dict[int, tuple[int, ...]] = {}  # page -> prefix whose K/V it holds
        self.counter = 0

    def snapshot(self) -> tuple[object, ...]:
        return (
            self.pool.free_queue(),
            [self.pool.ref_count(p) for p in range(NUM_PAGES)],
            self.m.stats(),
            {s: self.m.block_table(s) for s in self.tokens},
        )

    @rule(target=seqs, prefix=st.sampled_from(PREFIXES), tail=tokens_st)
    def allocate(self, prefix: tuple[int, ...], tail: list[int]) -> str:
        return self._allocate([*prefix, *tail] or [0])

    @rule(target=seqs, sid=seqs, extra=st.just([]) | st.lists(st.integers(0, 3), max_size=5))
    def allocate_copy(self, sid: str, extra: list[int]) -> str:
        """A new request whose prompt repeats an existing one (the sharing case)."""
        if sid not in self.tokens:
            return "dead"
        return self._allocate([*self.tokens[sid], *extra])

    def _allocate(self, toks: list[int]) -> str:
        sid = f"s{self.counter}"
        self.counter += 1
        before = self.snapshot()
        try:
            cached = self.m.allocate(sid, toks)
        except KVCacheExhaustedError:
            assert self.snapshot() == before
            return "dead"
        assert cached % B == 0 and cached <= len(toks) - 1
        table = self.m.block_table(sid)
        assert len(table) == -(-len(toks) // B)
        for i in range(cached // B):  # a hit must hold exactly this prefix
            assert self.content.get(table[i]) == tuple(toks[: (i + 1) * B])
        for p in table[cached // B :]:
            self.content.pop(p, None)  # fresh page: content undefined until computed
        self.tokens[sid] = toks
        return sid

    @rule(sid=seqs, extra=st.lists(st.integers(0, 3), min_size=1, max_size=9))
    def append(self, sid: str, extra: list[int]) -> None:
        if sid not in self.tokens:
            return
        old = self.m.block_table(sid)
        before = self.snapshot()
        try:
            self.m.append(sid, extra)
        except KVCacheExhaustedError:
            assert self.snapshot() == before
            return
        for p in self.m.block_table(sid)[len(old) :]:
            self.content.pop(p, None)
        self.tokens[sid] += extra

    @rule(sid=seqs, frac=st.sampled_from([1.0, 0.5]) | st.floats(0, 1))
    def compute(self, sid: str, frac: float) -> None:
        if sid not in self.tokens:
            return
        toks = self.tokens[sid]
        n = int(len(toks) * frac)
        done = self.m.num_computed_tokens(sid)
        if n > done:
            table = self.m.block_table(sid)
            start = self.m.num_cached_tokens(sid) // B
            for i in range(start, n // B):  # the model writes the K/V of full blocks
                self.content[table[i]] = tuple(toks[: (i + 1) * B])
        self.m.mark_computed(sid, n)

    @rule(sid=consumes(seqs), discard=st.booleans())
    def free(self, sid: str, discard: bool) -> None:
        if sid not in self.tokens:
            return
        stats = self.m.free(sid, discard=discard)
        assert stats.used_tokens == len(self.tokens.pop(sid))

    @rule(n=st.integers(1, 4))
    def raw_alloc(self, n: int) -> None:
        try:
            pages = self.pool.allocate(n)
        except KVCacheExhaustedError:
            return
        for p in pages:
            self.content.pop(p, None)
        self.raw += pages

    @precondition(lambda self: bool(self.raw))
    @rule()
    def raw_free(self) -> None:
        self.pool.free([self.raw.pop()])

    @rule()
    def evict(self) -> None:
        evictable = self.pool.num_evictable
        assert self.m.clear_cache() == evictable
        assert self.pool.num_evictable == 0

    @invariant()
    def pool_consistent(self) -> None:
        if not hasattr(self, "pool"):
            return
        self.pool.check_invariants()
        owners: Counter[int] = Counter(self.raw)
        for sid in self.tokens:
            owners.update(self.m.block_table(sid))
        for p in range(NUM_PAGES):
            assert self.pool.ref_count(p) == owners[p]
        assert self.pool.num_free + self.pool.num_used == NUM_PAGES
        assert self.pool.num_used == len(owners)
        fill: dict[int, int] = {}
        for sid, toks in self.tokens.items():
            for i, p in enumerate(self.m.block_table(sid)):
                fill[p] = max(fill.get(p, 0), min(B, len(toks) - i * B))
        s = self.m.stats()
        assert s.kv_used_tokens == sum(fill.values())
        # the manager's own pages (the raw pool users are not its footprint)
        assert s.kv_used_bytes == len(fill) * SPEC.page_bytes
        assert s.num_pages - s.num_free_pages == len(set(fill) | set(self.raw))
        assert s.num_seqs == len(self.tokens)
        assert 0.0 <= s.prefix_hit_rate <= 1.0

    def teardown(self) -> None:
        if not hasattr(self, "pool"):
            return
        for sid in list(self.tokens):
            self.m.free(sid)
        self.pool.free(self.raw)
        assert self.pool.num_free == NUM_PAGES
        assert self.pool.num_evictable == self.pool.num_cached
        self.m.clear_cache()
        assert self.pool.num_cached == 0
        self.pool.check_invariants()


KVMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestKVStateMachine = KVMachine.TestCase
