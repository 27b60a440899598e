"""Conformance checks of KV blocks and memory figures.

Alloc/free cycles give the memory back; live handles are distinct; double free, use after
free and foreign or forged blocks are refused and change nothing; exhaustion raises a
``MemoryError`` subclass atomically; copy and migrate keep their semantics; concurrent
alloc/free is safe; ``memory_stats()`` is consistent and ``clear_cache()`` keeps live
blocks. Part of :class:`~sagellm_backend.testing.conformance.ProviderConformance`.
"""

from __future__ import annotations

import threading

import pytest

from sagellm_backend.base import BackendProvider, KVBlock
from sagellm_backend.testing._conformance_base import ConformanceBase, ProviderFactory, is_count

__all__ = ["KVChecks"]


class KVChecks(ConformanceBase):
    """KV block lifecycle, copy/migrate, concurrency and memory-statistics checks."""

    def test_alloc_free_cycles_return_memory(self, provider: BackendProvider) -> None:
        """KV figures rise with every allocation and return exactly after the frees."""
        dtype = self._dtype(provider)
        baseline = self._kv_state(provider)
        blocks = []
        previous = baseline
        for tokens in (1, 16, 17, 100):
            blocks.append(provider.kv_block_alloc(tokens, dtype))
            now = self._kv_state(provider)
            for key in self.kv_tracking_keys:
                assert now[key] > previous[key], f"{key} did not rise on alloc({tokens})"
            previous = now
        for block in blocks:
            provider.kv_block_free(block)
        assert self._kv_state(provider) == baseline
        for _ in range(50):
            provider.kv_block_free(provider.kv_block_alloc(self.kv_tokens, dtype))
        assert self._kv_state(provider) == baseline

    def test_live_blocks_have_distinct_handles(self, provider: BackendProvider) -> None:
        """No two live blocks share a handle."""
        dtype = self._dtype(provider)
        blocks = [provider.kv_block_alloc(16, dtype) for _ in range(20)]
        assert len({b.handle for b in blocks}) == len(blocks)
        for block in blocks:
            provider.kv_block_free(block)

    def test_double_free_is_refused(self, provider: BackendProvider) -> None:
        """A second free raises ValueError and changes nothing."""
        dtype = self._dtype(provider)
        keep = provider.kv_block_alloc(16, dtype)
        block = provider.kv_block_alloc(self.kv_tokens, dtype)
        provider.kv_block_free(block)
        before = self._kv_state(provider)
        with pytest.raises(ValueError):
            provider.kv_block_free(block)
        assert self._kv_state(provider) == before
        provider.kv_block_free(keep)

    def test_foreign_and_forged_blocks_are_refused(
        self, provider: BackendProvider, provider_factory: ProviderFactory
    ) -> None:
        """Blocks of another provider instance, or made up, raise ValueError."""
        dtype = self._dtype(provider)
        other = provider_factory()
        try:
            theirs = other.kv_block_alloc(self.kv_tokens, dtype)
            mine = provider.kv_block_alloc(self.kv_tokens, dtype)
            before = self._kv_state(provider)
            with pytest.raises(ValueError):
                provider.kv_block_free(theirs)
            forged = KVBlock(
                handle=mine.handle + 10**9,
                num_tokens=self.kv_tokens,
                dtype=dtype,
                device=mine.device,
                pages=mine.pages,
                owner=mine.owner,
                num_bytes=mine.num_bytes,
            )
            with pytest.raises(ValueError):
                provider.kv_block_free(forged)
            assert self._kv_state(provider) == before
            other.kv_block_free(theirs)  # still valid for its owner
            provider.kv_block_free(mine)
        finally:
            close = getattr(other, "close", None)
            if callable(close):
                close()

    def test_use_after_free_is_refused(self, provider: BackendProvider) -> None:
        """Copying from/to or migrating a freed block raises ValueError."""
        dtype = self._dtype(provider)
        live = provider.kv_block_alloc(self.kv_tokens, dtype)
        dead = provider.kv_block_alloc(self.kv_tokens, dtype)
        provider.kv_block_free(dead)
        with pytest.raises(ValueError):
            provider.kv_block_copy(dead, live)
        with pytest.raises(ValueError):
            provider.kv_block_copy(live, dead)
        with pytest.raises(ValueError):
            provider.kv_block_migrate(dead, live.device)
        provider.kv_block_free(live)

    def test_oversized_request_raises_memory_error_and_changes_nothing(
        self, provider: BackendProvider
    ) -> None:
        """A request far beyond capacity raises a MemoryError subclass, all or nothing."""
        dtype = self._dtype(provider)
        keep = provider.kv_block_alloc(16, dtype)
        before = self._kv_state(provider)
        with pytest.raises(MemoryError):
            provider.kv_block_alloc(2**40, dtype)
        assert self._kv_state(provider) == before
        provider.kv_block_free(provider.kv_block_alloc(self.kv_tokens, dtype))
        provider.kv_block_free(keep)

    def test_filling_the_pool_then_exhaustion_is_atomic(self, provider: BackendProvider) -> None:
        """Fill the pool; one more token fails cleanly; freeing makes room again."""
        dtype = self._dtype(provider)
        baseline = self._kv_state(provider)
        blocks = self._fill_pool(provider, dtype)
        assert blocks, "the pool could not hold a single token"
        full = self._kv_state(provider)
        with pytest.raises(MemoryError):
            provider.kv_block_alloc(1, dtype)
        assert self._kv_state(provider) == full
        largest = max(blocks, key=lambda b: b.num_tokens)
        provider.kv_block_free(largest)
        blocks.remove(largest)
        again = provider.kv_block_alloc(largest.num_tokens, dtype)
        assert self._kv_state(provider) == full
        blocks.append(again)
        for block in blocks:
            provider.kv_block_free(block)
        assert self._kv_state(provider) == baseline

    def test_copy_semantics(self, provider: BackendProvider) -> None:
        """Copy into a large-enough block of the same dtype; refuse smaller or other-dtype.

        The data check compares every page but the last (a partial last page is copied
        only up to ``src.num_tokens``, whose position inside the page is layout-specific).
        """
        supported = provider.capability().supported_dtypes
        dtype = supported[0]
        tokens = self.kv_tokens * 4
        src = provider.kv_block_alloc(tokens, dtype)
        dst = provider.kv_block_alloc(tokens, dtype)
        bigger = provider.kv_block_alloc(tokens * 2, dtype)
        small = provider.kv_block_alloc(max(1, tokens // 8), dtype)
        filled = self.fill_kv(provider, src, seed=1) and self.fill_kv(provider, dst, seed=2)
        before_src = self.kv_contents(provider, src)
        if filled and before_src is not None:
            before_dst = self.kv_contents(provider, dst)
            assert not self._same(before_src[:-1], before_dst[:-1] if before_dst else None), (
                "fill_kv() did not change the block's contents (get_kv_tensor returned a copy?)"
            )
        before = self._kv_state(provider)
        provider.kv_block_copy(src, dst)
        provider.kv_block_copy(src, bigger)
        assert self._kv_state(provider) == before, "a copy allocates nothing"
        after_src = self.kv_contents(provider, src)
        after_dst = self.kv_contents(provider, dst)
        after_big = self.kv_contents(provider, bigger)
        if before_src is not None and after_src is not None:
            assert self._same(after_src, before_src), "kv_block_copy changed its source"
            assert after_dst is not None and after_big is not None
            body = len(after_src) - 1
            assert self._same(after_dst[:body], after_src[:body]), "copy did not move the data"
            assert self._same(after_big[:body], after_src[:body]), "copy did not move the data"
        with pytest.raises(ValueError):
            provider.kv_block_copy(src, small)
        if len(supported) > 1:
            other = provider.kv_block_alloc(tokens * 2, supported[1])
            with pytest.raises(ValueError):
                provider.kv_block_copy(src, other)
            provider.kv_block_free(other)
        for block in (src, dst, bigger, small):
            provider.kv_block_free(block)

    def test_migrate_semantics(self, provider: BackendProvider) -> None:
        """Migrate keeps tokens, dtype and data; a real move releases the source block."""
        dtype = self._dtype(provider)
        baseline = self._kv_state(provider)
        probe = provider.kv_block_alloc(self.kv_tokens, dtype)
        targets = self.migrate_targets if self.migrate_targets is not None else (probe.device,)
        provider.kv_block_free(probe)
        for target in targets:
            block = provider.kv_block_alloc(self.kv_tokens * 4, dtype)
            self.fill_kv(provider, block, seed=3)
            data = self.kv_contents(provider, block)
            moved = provider.kv_block_migrate(block, target)
            assert isinstance(moved, KVBlock)
            assert moved.device == target, (moved.device, target)
            assert (moved.num_tokens, moved.dtype) == (block.num_tokens, block.dtype)
            moved_data = self.kv_contents(provider, moved)
            if data is not None and moved_data is not None:
                assert self._same(moved_data, data), f"migrate to {target} changed the data"
            if moved.handle != block.handle:
                with pytest.raises(ValueError):
                    provider.kv_block_free(block)  # the source was released
            provider.kv_block_free(moved)
        assert self._kv_state(provider) == baseline

    def test_migrate_to_an_unknown_device_is_refused(self, provider: BackendProvider) -> None:
        """An unsupported target raises ValueError; the block stays valid."""
        dtype = self._dtype(provider)
        block = provider.kv_block_alloc(self.kv_tokens, dtype)
        before = self._kv_state(provider)
        with pytest.raises(ValueError):
            provider.kv_block_migrate(block, self.unsupported_migrate_target)
        assert self._kv_state(provider) == before
        provider.kv_block_free(block)

    def test_concurrent_alloc_free(self, provider: BackendProvider) -> None:
        """Threads allocating and freeing at once lose nothing and share no handle."""
        dtype = self._dtype(provider)
        baseline = self._kv_state(provider)
        errors: list[BaseException] = []
        handles: list[set[int]] = []

        def work() -> None:
            seen: set[int] = set()
            try:
                for i in range(100):
                    block = provider.kv_block_alloc(1 + (i % 3) * 16, dtype)
                    seen.add(block.handle)
                    provider.kv_block_free(block)
            except BaseException as exc:  # reported below
                errors.append(exc)
            handles.append(seen)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        assert self._kv_state(provider) == baseline

    # memory ---------------------------------------------------------------------------

    def test_memory_stats_keys_and_consistency(self, provider: BackendProvider) -> None:
        """Required keys are non-negative ints; peak >= allocated; total >= allocated."""
        dtype = self._dtype(provider)
        stats = provider.memory_stats()
        missing = [k for k in self.required_memory_keys if k not in stats]
        assert not missing, f"memory_stats() lacks {missing} (has: {sorted(stats)})"
        for key, value in stats.items():
            assert is_count(value) and value >= 0, f"memory_stats()[{key!r}] = {value!r}"
        blocks = [provider.kv_block_alloc(self.kv_tokens * 4, dtype) for _ in range(4)]
        during = provider.memory_stats()
        assert during["peak"] >= during["allocated"]
        assert during["total"] >= during["allocated"]
        assert during["peak"] >= stats["peak"], "peak never decreases"
        for block in blocks:
            provider.kv_block_free(block)
        after = provider.memory_stats()
        assert after["peak"] >= during["peak"], "peak never decreases"

    def test_clear_cache_keeps_live_blocks(self, provider: BackendProvider) -> None:
        """clear_cache releases only unreferenced memory: live blocks stay valid."""
        dtype = self._dtype(provider)
        block = provider.kv_block_alloc(self.kv_tokens, dtype)
        before = self._kv_state(provider)
        provider.clear_cache()
        assert self._kv_state(provider) == before
        provider.kv_block_free(block)
