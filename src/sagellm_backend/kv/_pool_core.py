"""Lock-held internals of :class:`~sagellm_backend.kv.block_pool.BlockPool`.

:class:`PoolCore` holds the operations on the pool's per-page lists and intrusive free
queue (data structures and invariants: see :mod:`sagellm_backend.kv.block_pool`). Every
method assumes the caller holds the pool's lock; the public, locking API is BlockPool's.
Callers inside ``kv`` (the manager, ProviderKV) use these directly to do several steps
under one acquisition.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from time import perf_counter

from sagellm_backend.errors import InvalidKVBlockError, KVCacheExhaustedError


class PoolCore:
    """Per-page state and lock-held operations of a BlockPool (a base class).

    Invariants: the subclass's ``__init__`` sets every attribute below and then calls
    :meth:`_init_queue`; ``_head``/``_tail`` are the sentinel indices ``num_pages`` and
    ``num_pages + 1`` of ``_next``/``_prev``.
    """

    alloc_guard: Callable[[int], None] | None
    enable_caching: bool
    evict_count: int
    evict_ms: float
    _n: int
    _head: int
    _tail: int
    _ref: list[int]
    _hash: list[int | None]
    _cache: dict[int, int]
    _num_free: int
    _num_cached_free: int
    _next: list[int]
    _prev: list[int]

    # ------------------------------------------------------------------ internals (lock held)
    def _init_queue(self) -> None:
        n = self._n
        nxt = list(range(1, n + 1))
        nxt[n - 1] = self._tail
        nxt += [0, -1]  # head -> 0, tail -> none
        prv = [self._head, *range(n - 1)]
        prv += [-1, n - 1]  # head <- none, tail <- last page
        self._next = nxt
        self._prev = prv
        self._ref = [0] * n
        self._num_free = n

    def _iter_queue(self) -> Iterator[int]:
        nxt = self._next
        p = nxt[self._head]
        tail = self._tail
        steps = 0
        while p != tail:
            yield p
            p = nxt[p]
            steps += 1
            if steps > self._n:
                raise AssertionError("free queue contains a cycle")

    def _check_range(self, page: int) -> None:
        if isinstance(page, bool) or not isinstance(page, int) or not 0 <= page < self._n:
            raise InvalidKVBlockError(
                f"page id {page!r} is not in this pool (valid: 0..{self._n - 1})"
            )

    def _exhausted(self, n: int) -> KVCacheExhaustedError:
        return KVCacheExhaustedError(
            f"KV cache exhausted: need {n} pages, {self._num_free} free "
            f"({self._num_cached_free} of them cached and evictable) of {self._n}"
        )

    def _allocate(self, n: int) -> list[int]:
        if n <= 0:
            if n == 0:
                return []
            raise ValueError(f"cannot allocate {n} pages; n must be >= 0")
        if n > self._num_free:
            raise self._exhausted(n)
        if self.alloc_guard is not None:
            self.alloc_guard(n)
        return self._allocate_unguarded(n)

    def _allocate_unguarded(self, n: int) -> list[int]:
        # Caller checked 0 <= n <= num_free and ran the guard.
        nxt = self._next
        ref = self._ref
        hashes = self._hash
        out: list[int] = []
        p = nxt[self._head]
        t_evict: float | None = None
        for _ in range(n):
            ref[p] = 1
            h = hashes[p]
            if h is not None:
                # Cached pages sit behind every uncached one, so from here on every popped
                # page is an eviction: one timer pair covers them all.
                if t_evict is None:
                    t_evict = perf_counter()
                hashes[p] = None
                del self._cache[h]
                self._num_cached_free -= 1
                self.evict_count += 1
            out.append(p)
            p = nxt[p]
        nxt[self._head] = p
        self._prev[p] = self._head
        self._num_free -= n
        if t_evict is not None:
            self.evict_ms += (perf_counter() - t_evict) * 1000.0
        return out

    def _take_one(self) -> int:
        """Take the head page of the free queue with refcount 1 and return its id.

        Lock held; the caller checked ``num_free >= 1`` and ran the guard. A cached head
        page is evicted (general path); an uncached one is unlinked in O(1).
        """
        nxt = self._next
        head = self._head
        p = nxt[head]
        if self._hash[p] is not None:
            return self._allocate_unguarded(1)[0]
        q = nxt[p]
        nxt[head] = q
        self._prev[q] = head
        self._ref[p] = 1
        self._num_free -= 1
        return p

    def _release_one(self, p: int) -> None:
        """Drop one reference from page ``p``; an uncached page reaching 0 goes to the head.

        Lock held; the caller guarantees ``0 <= p < num_pages`` and ``ref_count(p) > 0``
        (e.g. a page it allocated and still owns).
        """
        ref = self._ref
        if ref[p] != 1 or self._hash[p] is not None:
            self._free((p,), validate=False)
            return
        ref[p] = 0
        nxt = self._next
        head = self._head
        b = nxt[head]
        nxt[head] = p
        self._prev[p] = head
        nxt[p] = b
        self._prev[b] = p
        self._num_free += 1

    def _validate_decref(self, pages: Sequence[int]) -> None:
        n = self._n
        ref = self._ref
        for p in pages:
            # fast path: exact ints in range with a reference (bools/floats fail type())
            if type(p) is not int or not 0 <= p < n or ref[p] <= 0:
                if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n:
                    raise InvalidKVBlockError(
                        f"page id {p!r} is not in this pool (valid: 0..{n - 1})"
                    )
                if ref[p] <= 0:
                    raise InvalidKVBlockError(f"page {p} is already free (double free)")
        if len(pages) > 1 and len(set(pages)) != len(pages):
            for p, k in Counter(pages).items():
                if ref[p] < k:
                    raise InvalidKVBlockError(
                        f"page {p} freed {k} times but has only {ref[p]} reference(s)"
                    )

    def _free(self, pages: Iterable[int], validate: bool = True) -> None:
        # validate=False: the caller guarantees distinct, referenced, in-range page ids
        # (the manager's own block tables).
        seq = pages if type(pages) is list or type(pages) is tuple else list(pages)
        if validate:
            self._validate_decref(seq)
        ref = self._ref
        hashes = self._hash
        nxt = self._next
        prv = self._prev
        freed = 0
        for p in seq:
            r = ref[p] - 1
            ref[p] = r
            if r == 0:
                freed += 1
                if hashes[p] is None:  # worthless: reuse first
                    b = nxt[self._head]
                    nxt[self._head] = p
                    prv[p] = self._head
                    nxt[p] = b
                    prv[b] = p
                else:  # cached: most recently used end
                    a = prv[self._tail]
                    nxt[a] = p
                    prv[p] = a
                    nxt[p] = self._tail
                    prv[self._tail] = p
                    self._num_cached_free += 1
        self._num_free += freed

    def _unlink(self, p: int) -> None:
        a = self._prev[p]
        b = self._next[p]
        self._next[a] = b
        self._prev[b] = a

    def _incref(self, pages: Iterable[int], validate: bool = True) -> None:
        # validate=False: the caller guarantees in-range pages that are in use or cached
        # (prefix-cache hits found under the same lock).
        seq = pages if isinstance(pages, list | tuple) else list(pages)
        n = self._n
        ref = self._ref
        hashes = self._hash
        if validate:
            for p in seq:
                if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n:
                    raise InvalidKVBlockError(
                        f"page id {p!r} is not in this pool (valid: 0..{n - 1})"
                    )
                if ref[p] == 0 and hashes[p] is None:
                    raise InvalidKVBlockError(
                        f"page {p} is free and caches nothing; only cached pages can be shared"
                    )
        for p in seq:
            if ref[p] == 0:
                self._unlink(p)
                self._num_free -= 1
                self._num_cached_free -= 1
            ref[p] += 1

    def _cache_page(self, page: int, block_hash: int) -> bool:
        self._check_range(page)
        if self._ref[page] <= 0:
            raise InvalidKVBlockError(f"page {page} is free; only pages in use can be cached")
        current = self._hash[page]
        if current is not None:
            if current == block_hash:
                return True
            raise InvalidKVBlockError(
                f"page {page} already caches hash {current}; cannot re-cache it as {block_hash}"
            )
        if not self.enable_caching or block_hash in self._cache:
            return False
        self._hash[page] = block_hash
        self._cache[block_hash] = page
        return True

    def _uncache(self, page: int) -> bool:
        h = self._hash[page]
        if h is None:
            return False
        self._hash[page] = None
        del self._cache[h]
        if self._ref[page] == 0:  # keep "uncached before cached" in the free queue
            self._num_cached_free -= 1
            self._unlink(page)
            b = self._next[self._head]
            self._next[self._head] = page
            self._prev[page] = self._head
            self._next[page] = b
            self._prev[b] = page
        return True

    def _evict_all(self) -> int:
        if not self._num_cached_free:
            return 0
        t0 = perf_counter()
        count = 0
        for p in self._iter_queue():
            h = self._hash[p]
            if h is not None:
                self._hash[p] = None
                del self._cache[h]
                count += 1
        # Every free page is now uncached, so the queue order invariant holds as is.
        self._num_cached_free = 0
        self.evict_count += count
        self.evict_ms += (perf_counter() - t0) * 1000.0
        return count
