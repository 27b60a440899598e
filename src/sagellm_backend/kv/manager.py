"""KVCacheManager: per-sequence block tables with prefix reuse, on top of a BlockPool.

This is what engines use. A sequence (request) gets a *block table*: the pool pages that hold
its tokens in order; token ``i`` lives in slot
``block_table[i // block_size] * block_size + i % block_size`` of the storage.

Prefix caching: every *full* block of a sequence has a chained hash
(``h_i = hash_fn(h_{i-1}, tokens[i*B:(i+1)*B])``, ``h_{-1} = ROOT_HASH``). Once the engine
reports that the K/V of a full block are written (:meth:`KVCacheManager.mark_computed`),
the block's page is registered in the pool's cache under its hash. A later
:meth:`KVCacheManager.allocate` looks up its own chain and shares the pages of the longest
cached prefix (refcount + 1), at most ``len(token_ids) - 1`` tokens so that the last token
is always computed; it returns how many tokens are already cached.

Invariants:
    * a sequence holds exactly ``ceil(num_tokens / block_size)`` pages, each referenced once
      by it; shared (prefix) pages are full blocks and are never written again;
    * only pages whose K/V were reported computed are ever cached, so freeing a sequence
      that was never computed (or :meth:`free` with ``discard=True``) does not leave
      unfinished pages in the cache;
    * :meth:`allocate` and :meth:`append` are all-or-nothing: on
      :class:`~sagellm_backend.errors.KVCacheExhaustedError` nothing changes (not even the
      LRU order or the statistics);
    * ``stats().kv_used_tokens`` and ``stats().kv_used_bytes`` are *this manager's*
      footprint: the distinct pages referenced by its live sequences (a page shared by
      several of them counted once), as filled token slots and as ``pages * page_bytes``.
      They are exact whatever else uses the pool: with one pool shared by several managers,
      a page that two managers reference counts for both, and the pool-wide occupancy is
      ``(num_pages - num_free_pages) * page_bytes``. Both are 0 when the manager holds no
      sequence. A shared page is always a full block in every sequence holding it (only
      full, computed blocks are cached), so its filled slots are ``block_size``; a
      sequence's partial last page is never shared.

Thread safety: every public method holds the pool's lock for its whole duration, so one
manager (and several managers on one pool) can be used from several threads.

Layout: the read-only queries and :class:`KVStats` are in :mod:`._manager_queries`
(re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence

from sagellm_backend.errors import InvalidKVBlockError, InvalidStateError, KVCacheExhaustedError
from sagellm_backend.kv._manager_queries import KVManagerQueries, KVStats, _Seq, _unknown_seq
from sagellm_backend.kv.block_pool import ROOT_HASH, BlockHashFn, BlockPool, hash_block_tokens
from sagellm_backend.kv.spec import KVSpec
from sagellm_backend.kv.stats import KVRequestStats
from sagellm_backend.kv.storage import KVStorage

__all__ = ["KVCacheManager", "KVStats"]


class KVCacheManager(KVManagerQueries):
    """Per-sequence paged KV allocation with longest-prefix reuse.

    Args:
        pool: the page pool (may be shared with other managers of the same geometry).
        spec: KV geometry; ``spec.page_bytes`` must match ``pool.page_bytes`` when that is set.
        storage: the storage holding the pool's pages (``layer_kv`` for engines), optional.
        enable_prefix_caching: share cached full blocks between sequences.
        hash_fn: block hash, :func:`~sagellm_backend.kv.block_pool.hash_block_tokens` by
            default (fast); :func:`~sagellm_backend.kv.block_pool.sha256_block_hash` for
            untrusted multi-tenant prompts.
    """

    def __init__(
        self,
        pool: BlockPool,
        spec: KVSpec,
        *,
        storage: KVStorage | None = None,
        enable_prefix_caching: bool = True,
        hash_fn: BlockHashFn = hash_block_tokens,
    ) -> None:
        if not isinstance(pool, BlockPool):
            raise TypeError(f"pool must be a BlockPool, got {type(pool).__name__}")
        if not isinstance(spec, KVSpec):
            raise TypeError(f"spec must be a KVSpec, got {type(spec).__name__}")
        if pool.page_bytes and pool.page_bytes != spec.page_bytes:
            raise ValueError(
                f"pool pages are {pool.page_bytes} bytes but the spec needs {spec.page_bytes}"
            )
        if storage is not None and (
            storage.num_pages != pool.num_pages or storage.spec.page_bytes != spec.page_bytes
        ):
            raise ValueError(
                f"storage holds {storage.num_pages} pages of {storage.spec.page_bytes} bytes; "
                f"the pool has {pool.num_pages} pages of {spec.page_bytes} bytes"
            )
        self.pool = pool
        self.spec = spec
        self.storage = storage
        self.enable_prefix_caching = bool(enable_prefix_caching) and pool.enable_caching
        self.hash_fn = hash_fn
        self._builtin_hash = hash_fn is hash_block_tokens
        self._block_size = spec.block_size
        self._page_bytes = spec.page_bytes
        self._seqs: dict[str, _Seq] = {}
        # page -> how many of this manager's live sequences reference it; its length is the
        # manager's distinct pages, and _used_tokens their filled slots (kv_used_* stats).
        self._page_refs: dict[int, int] = {}
        self._used_tokens = 0
        self._hit_tokens = 0
        self._query_tokens = 0

    @classmethod
    def counting(
        cls, spec: KVSpec, num_pages: int, *, enable_prefix_caching: bool = False
    ) -> KVCacheManager:
        """A manager over a fresh pool of ``num_pages`` pages with no storage.

        It admits, preempts and reports exactly as a pool of that size, and holds no K/V
        memory: for runners that keep K/V elsewhere (the model's own caches), and for
        providers that hand out no managers.
        """
        caching = enable_prefix_caching
        pool = BlockPool(num_pages, page_bytes=spec.page_bytes, enable_caching=caching)
        return cls(pool, spec, enable_prefix_caching=caching)

    # ------------------------------------------------------------------ allocation
    def allocate(self, seq_id: str, token_ids: Sequence[int]) -> int:
        """Reserve pages for every token of a new sequence; return the cached-token count.

        Reuses the pages of the longest cached prefix of full blocks, at most
        ``len(token_ids) - 1`` tokens (the last token is always computed).

        Raises:
            InvalidKVBlockError: ``seq_id`` is already allocated or ``token_ids`` is empty.
            KVCacheExhaustedError: not enough pages even after eviction; nothing changed.
        """
        n = len(token_ids)
        if n == 0:
            raise InvalidKVBlockError(f"sequence {seq_id!r}: token_ids is empty")
        tokens = list(token_ids)
        pool = self.pool
        block = self._block_size
        lock = pool.lock
        lock.acquire()  # explicit acquire/release (cheaper than `with` on the hot path)
        try:
            seqs = self._seqs
            if seq_id in seqs:
                raise InvalidKVBlockError(f"sequence {seq_id!r} is already allocated")
            if n > block and self.enable_prefix_caching:  # some full block could be cached
                hashes, hits = self._lookup(tokens)
            else:
                hashes, hits = [], []
            num_hits = len(hits)
            if num_hits:
                ref = pool._ref
                hits_free = sum(1 for p in hits if ref[p] == 0)
            else:
                hits_free = 0
            need = -(-n // block) - num_hits
            if need > pool._num_free - hits_free:
                raise KVCacheExhaustedError(
                    f"KV cache exhausted: sequence {seq_id!r} needs {need} new pages "
                    f"({n} tokens, {num_hits} blocks cached); {pool._num_free - hits_free} "
                    f"free of {pool.num_pages}"
                )
            guard = pool.alloc_guard
            if guard is not None and need:
                guard(need)
            evict_count, evict_ms = pool.evict_count, pool.evict_ms
            page_refs = self._page_refs
            held = 0  # hit pages another of our sequences already references: not new usage
            if num_hits:
                pool._incref(hits, validate=False)
                for p in hits:
                    count = page_refs.get(p, 0)
                    held += count > 0
                    page_refs[p] = count + 1
            new_pages = pool._allocate_unguarded(need)
            for p in new_pages:
                page_refs[p] = 1
            seq = _Seq(tokens, hits + new_pages if num_hits else new_pages, hashes, num_hits)
            evicted = pool.evict_count - evict_count
            if evicted:  # evict_ms only grows together with evict_count
                seq.evict_count = evicted
                seq.evict_ms = pool.evict_ms - evict_ms
            seqs[seq_id] = seq
            cached = num_hits * block
            self._used_tokens += n - held * block
            self._hit_tokens += cached
            self._query_tokens += n
            return cached
        finally:
            lock.release()

    def match_prefix(self, token_ids: Sequence[int]) -> int:
        """Tokens of ``token_ids`` that :meth:`allocate` would take from the cache now.

        Changes nothing (no refcount, LRU or statistics update); capped like
        :meth:`allocate` at ``len(token_ids) - 1``.
        """
        tokens = token_ids if isinstance(token_ids, list | tuple) else list(token_ids)
        with self.pool.lock:
            return len(self._lookup(tokens)[1]) * self._block_size

    def _lookup(self, tokens: Sequence[int]) -> tuple[list[int], list[int]]:
        """Chained hashes up to the first miss, and the cached pages before it (lock held)."""
        hashes: list[int] = []
        hits: list[int] = []
        block = self._block_size
        max_blocks = (len(tokens) - 1) // block
        if not self.enable_prefix_caching or max_blocks <= 0:
            return hashes, hits
        get = self.pool._cache.get
        parent = ROOT_HASH
        if self._builtin_hash:
            # hash_block_tokens inlined: block contents are hashed in C (tuple of a slice);
            # only the chain step runs in Python.
            for start in range(0, max_blocks * block, block):
                parent = hash((parent, hash(tuple(tokens[start : start + block]))))
                hashes.append(parent)
                page = get(parent)
                if page is None:
                    break
                hits.append(page)
        else:
            hash_fn = self.hash_fn
            for start in range(0, max_blocks * block, block):
                parent = hash_fn(parent, tokens[start : start + block])
                hashes.append(parent)
                page = get(parent)
                if page is None:
                    break
                hits.append(page)
        return hashes, hits

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether ``num_tokens`` tokens fit now without any prefix hit (evictions counted)."""
        return -(-num_tokens // self._block_size) <= self.pool.num_free

    def append(self, seq_id: str, token_ids: Sequence[int]) -> None:
        """Extend a sequence by ``token_ids``, allocating pages as needed.

        Raises:
            InvalidKVBlockError: unknown ``seq_id``.
            KVCacheExhaustedError: not enough pages; the sequence is unchanged.
        """
        k = len(token_ids)
        if k == 0:
            return
        pool = self.pool
        with pool.lock:
            seq = self._get(seq_id)
            total = len(seq.tokens) + k
            need = -(-total // self._block_size) - len(seq.pages)
            if need > 0:
                if need > pool._num_free:
                    raise KVCacheExhaustedError(
                        f"KV cache exhausted: sequence {seq_id!r} needs {need} more pages to "
                        f"grow to {total} tokens; {pool._num_free} free of {pool.num_pages}"
                    )
                self._take_pages(seq, need)
            # the new tokens land in the (never shared) partial last page or in new pages
            seq.tokens.extend(token_ids)
            self._used_tokens += k

    def reserve(self, seq_id: str, num_tokens: int) -> None:
        """Hold pages for ``num_tokens`` tokens of ``seq_id`` before the tokens exist.

        For multi-step decoding: the pages of a burst's positions are taken before the
        runner writes them, and the tokens follow with :meth:`append` (which then allocates
        nothing). Reserved pages count as used, are freed by :meth:`free`, and never hold a
        cached block until :meth:`mark_computed` covers them. Does nothing when the sequence
        already holds enough pages.

        Raises:
            InvalidKVBlockError: unknown ``seq_id``.
            KVCacheExhaustedError: not enough pages; the sequence is unchanged.
        """
        pool = self.pool
        with pool.lock:
            seq = self._get(seq_id)
            need = -(-num_tokens // self._block_size) - len(seq.pages)
            if need <= 0:
                return
            if need > pool._num_free:
                raise KVCacheExhaustedError(
                    f"KV cache exhausted: sequence {seq_id!r} needs {need} more pages to "
                    f"reserve {num_tokens} tokens; {pool._num_free} free of {pool.num_pages}"
                )
            self._take_pages(seq, need)

    def _take_pages(self, seq: _Seq, need: int) -> None:
        """Give ``seq`` ``need`` new pages (lock held, room checked)."""
        pool = self.pool
        if pool.alloc_guard is not None:
            pool.alloc_guard(need)
        evict_count, evict_ms = pool.evict_count, pool.evict_ms
        new_pages = pool._allocate_unguarded(need)
        seq.pages.extend(new_pages)
        page_refs = self._page_refs
        for p in new_pages:
            page_refs[p] = 1
        seq.evict_count += pool.evict_count - evict_count
        seq.evict_ms += pool.evict_ms - evict_ms

    def can_append(self, seq_id: str, num_new_tokens: int) -> bool:
        """Whether ``seq_id`` can grow by ``num_new_tokens`` tokens now."""
        with self.pool.lock:
            seq = self._get(seq_id)
            need = -(-(len(seq.tokens) + num_new_tokens) // self._block_size) - len(seq.pages)
            return need <= self.pool._num_free

    def mark_computed(self, seq_id: str, num_tokens: int) -> None:
        """Report that the K/V of the first ``num_tokens`` tokens are written.

        Full blocks among them become shareable (cached under their chained hash). Smaller
        values than an earlier call are ignored (computed tokens only grow).

        Raises:
            InvalidKVBlockError: unknown ``seq_id`` or ``num_tokens`` outside
                ``0..num_tokens(seq_id)``.
        """
        pool = self.pool
        lock = pool.lock
        lock.acquire()
        try:
            seq = self._seqs.get(seq_id)
            if seq is None:
                raise _unknown_seq(seq_id)
            if not 0 <= num_tokens <= len(seq.tokens):
                raise InvalidKVBlockError(
                    f"sequence {seq_id!r}: num_tokens {num_tokens} is outside 0..{len(seq.tokens)}"
                )
            if num_tokens <= seq.num_computed:
                return
            seq.num_computed = num_tokens
            if not self.enable_prefix_caching:
                return
            full = num_tokens // self._block_size
            registered = seq.num_registered
            if full <= registered:
                return
            if len(seq.hashes) < full:
                self._extend_hashes(seq, full)
            pages = seq.pages
            hashes = seq.hashes
            cache_page = pool._cache_page
            if pool.enable_caching:
                # Fast path of BlockPool._cache_page for our own pages (in range, referenced
                # by this sequence): an uncached page under a hash nobody caches yet. Every
                # other case (already cached, duplicate hash) goes through the pool.
                page_hash = pool._hash
                cache = pool._cache
                for i in range(registered, full):
                    page = pages[i]
                    h = hashes[i]
                    if page_hash[page] is None and h not in cache:
                        page_hash[page] = h
                        cache[h] = page
                    else:
                        cache_page(page, h)
            else:
                for i in range(registered, full):
                    cache_page(pages[i], hashes[i])
            seq.num_registered = full
        finally:
            lock.release()

    def _extend_hashes(self, seq: _Seq, full: int) -> None:
        hashes = seq.hashes
        tokens = seq.tokens
        block = self._block_size
        parent = hashes[-1] if hashes else ROOT_HASH
        builtin = self._builtin_hash
        hash_fn = self.hash_fn
        for start in range(len(hashes) * block, full * block, block):
            if builtin:  # hash_block_tokens inlined
                parent = hash((parent, hash(tuple(tokens[start : start + block]))))
            else:
                parent = hash_fn(parent, tokens[start : start + block])
            hashes.append(parent)

    def free(self, seq_id: str, *, discard: bool = False) -> KVRequestStats:
        """Release a sequence's pages and return its final :class:`KVRequestStats`.

        Cached pages stay cached (evictable) after their last owner frees them; pages are
        released last block first, so a prefix's first blocks are evicted last.

        Args:
            seq_id: the sequence.
            discard: also drop from the prefix cache the pages this sequence registered that
                nobody else references (use when its K/V may be invalid, e.g. the forward
                pass failed after :meth:`mark_computed`).

        Raises:
            InvalidKVBlockError: unknown ``seq_id`` (e.g. freed twice); nothing changes.
        """
        pool = self.pool
        lock = pool.lock
        lock.acquire()
        try:
            seq = self._seqs.pop(seq_id, None)
            if seq is None:
                raise _unknown_seq(seq_id)
            stats = self._request_stats(seq)
            page_refs = self._page_refs
            pages = seq.pages
            block = self._block_size
            num_tokens = len(seq.tokens)
            # Filled slots of the pages nobody else of ours holds: all of the sequence's
            # tokens minus those on pages another sequence still references.
            released_tokens = num_tokens
            last_page = pages[-1]
            for p in pages:
                count = page_refs[p] - 1
                if count:
                    page_refs[p] = count  # another of our sequences holds it (a full block)
                    released_tokens -= (
                        block if p != last_page else num_tokens - (len(pages) - 1) * block
                    )
                else:
                    del page_refs[p]
            if discard:
                ref = pool._ref
                for i in range(seq.hit_blocks, len(pages)):
                    if ref[pages[i]] == 1:
                        pool._uncache(pages[i])
            self._used_tokens -= released_tokens
            pool._free(pages[::-1], validate=False)
            return stats
        finally:
            lock.release()

    # ------------------------------------------------------------------ maintenance
    def clear_cache(self) -> int:
        """Evict every cached page nobody references; return how many."""
        return self.pool.evict_all()

    def reset(self) -> None:
        """Drop the whole prefix cache and the hit statistics.

        Raises:
            InvalidStateError: sequences are still allocated.
        """
        with self.pool.lock:
            if self._seqs:
                raise InvalidStateError(
                    f"cannot reset the KV manager: {len(self._seqs)} sequences are allocated"
                )
            self._hit_tokens = 0
            self._query_tokens = 0
        self.pool.reset()

    def __repr__(self) -> str:
        return (
            f"KVCacheManager(seqs={len(self._seqs)}, pool={self.pool!r}, "
            f"prefix_caching={self.enable_prefix_caching})"
        )
