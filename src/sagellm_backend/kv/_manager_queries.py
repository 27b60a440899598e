"""Read-only queries of :class:`~sagellm_backend.kv.manager.KVCacheManager` and its records.

:class:`KVManagerQueries` is the half of KVCacheManager that answers questions about live
sequences and the cache (block tables, slot mappings, statistics) without changing them;
every method holds the pool's lock while it reads. :class:`KVStats` is re-exported by
:mod:`sagellm_backend.kv.manager`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sagellm_backend.errors import InvalidKVBlockError
from sagellm_backend.kv.block_pool import BlockPool
from sagellm_backend.kv.stats import KVRequestStats


@dataclass(frozen=True)
class KVStats:
    """Snapshot of a manager's KV cache (maps onto the protocol Metrics KV fields).

    Attributes:
        kv_used_tokens: token slots filled in the distinct pages referenced by this
            manager's live sequences (a page shared by several of them counted once).
        kv_used_bytes: those distinct pages * page_bytes.
        prefix_hit_rate: prefix-cache hit tokens / tokens queried by :meth:`allocate`.
        evict_count: cached pages evicted from the pool so far.
        evict_ms: milliseconds spent evicting from the pool so far.
        num_pages: pages in the pool.
        num_free_pages: pages nobody references (cached-but-evictable included).
        num_cached_pages: pages holding a cached block hash.
        num_evictable_pages: cached pages nobody references.
        num_seqs: live sequences.
        num_seq_tokens: tokens over all live sequences (a shared prefix counted per sequence).
        prefix_hit_tokens: tokens served from the cache by :meth:`allocate`.
        prefix_query_tokens: tokens passed to :meth:`allocate`.
        page_bytes: bytes per page.
        block_size: tokens per page.
        total_bytes: num_pages * page_bytes.

    ``kv_used_*``, ``num_seqs``, ``num_seq_tokens`` and ``prefix_*`` describe the manager;
    ``evict_*``, ``num_pages`` and ``num_*_pages`` describe its pool (shared with the other
    managers and direct users of that pool, if any). Pool-wide bytes in use are
    ``(num_pages - num_free_pages) * page_bytes`` (>= ``kv_used_bytes``).
    """

    kv_used_tokens: int
    kv_used_bytes: int
    prefix_hit_rate: float
    evict_count: int
    evict_ms: float
    num_pages: int
    num_free_pages: int
    num_cached_pages: int
    num_evictable_pages: int
    num_seqs: int
    num_seq_tokens: int
    prefix_hit_tokens: int
    prefix_query_tokens: int
    page_bytes: int
    block_size: int
    total_bytes: int


def _unknown_seq(seq_id: str) -> InvalidKVBlockError:
    return InvalidKVBlockError(f"unknown sequence {seq_id!r} (never allocated or freed)")


class _Seq:
    """State of one sequence (internal)."""

    __slots__ = (
        "evict_count",
        "evict_ms",
        "hashes",
        "hit_blocks",
        "num_computed",
        "num_registered",
        "pages",
        "query_tokens",
        "tokens",
    )

    def __init__(self, tokens: list[int], pages: list[int], hashes: list[int], hits: int) -> None:
        self.tokens = tokens
        self.pages = pages
        self.hashes = hashes  # chained hashes of the first len(hashes) full blocks
        self.hit_blocks = hits  # leading pages that came from the prefix cache
        self.num_registered = hits  # leading full blocks already cached (or found cached)
        self.num_computed = 0
        self.query_tokens = len(tokens)
        self.evict_count = 0
        self.evict_ms = 0.0


class KVManagerQueries:
    """Queries of a KVCacheManager (a mixin over its tables).

    Invariants: the host class sets ``pool``, ``_seqs`` (seq id -> :class:`_Seq`),
    ``_block_size``, ``_page_bytes``, ``_page_refs`` (page -> live sequences of this
    manager referencing it), ``_used_tokens``, ``_hit_tokens`` and ``_query_tokens``.
    """

    pool: BlockPool
    _seqs: dict[str, _Seq]
    _block_size: int
    _page_bytes: int
    _page_refs: dict[int, int]
    _used_tokens: int
    _hit_tokens: int
    _query_tokens: int

    # ------------------------------------------------------------------ queries
    def block_table(self, seq_id: str) -> list[int]:
        """Pages of the sequence in token order (a copy)."""
        with self.pool.lock:
            return list(self._get(seq_id).pages)

    def slot_mapping(self, seq_id: str, start: int, end: int) -> list[int]:
        """Storage slots of tokens ``start .. end-1`` of the sequence.

        Raises:
            InvalidKVBlockError: unknown ``seq_id`` or not ``0 <= start <= end <= num_tokens``.
        """
        with self.pool.lock:
            seq = self._get(seq_id)
            if not 0 <= start <= end <= len(seq.tokens):
                raise InvalidKVBlockError(
                    f"sequence {seq_id!r}: slot range {start}..{end} is outside "
                    f"0..{len(seq.tokens)}"
                )
            pages = seq.pages
        block = self._block_size
        out: list[int] = []
        i = start
        while i < end:
            b, off = divmod(i, block)
            stop = min(end, (b + 1) * block)
            base = pages[b] * block
            out.extend(range(base + off, base + off + (stop - i)))
            i = stop
        return out

    def num_tokens(self, seq_id: str) -> int:
        """Tokens held by the sequence."""
        with self.pool.lock:
            return len(self._get(seq_id).tokens)

    def num_computed_tokens(self, seq_id: str) -> int:
        """Tokens reported by :meth:`mark_computed` (0 at allocation)."""
        with self.pool.lock:
            return self._get(seq_id).num_computed

    def num_cached_tokens(self, seq_id: str) -> int:
        """Tokens of the sequence that came from the prefix cache at allocation."""
        with self.pool.lock:
            return self._get(seq_id).hit_blocks * self._block_size

    def token_ids(self, seq_id: str) -> list[int]:
        """The sequence's tokens (a copy)."""
        with self.pool.lock:
            return list(self._get(seq_id).tokens)

    def seq_ids(self) -> list[str]:
        """Live sequence ids."""
        with self.pool.lock:
            return list(self._seqs)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def __iter__(self) -> Iterator[str]:
        return iter(self.seq_ids())

    def request_stats(self, seq_id: str) -> KVRequestStats:
        """KV figures of one live sequence.

        ``used_tokens`` = its tokens, ``used_bytes`` = its pages * page_bytes (shared pages
        included), ``prefix_hit_rate`` = cached tokens / tokens at allocation,
        ``evict_count``/``evict_ms`` = evictions its own allocations caused.
        """
        with self.pool.lock:
            return self._request_stats(self._get(seq_id))

    def stats(self) -> KVStats:
        """Snapshot of this manager and its pool (see :class:`KVStats` for which is which)."""
        pool = self.pool
        with pool.lock:
            return KVStats(
                kv_used_tokens=self._used_tokens,
                kv_used_bytes=len(self._page_refs) * self._page_bytes,
                prefix_hit_rate=self._hit_tokens / self._query_tokens
                if self._query_tokens
                else 0.0,
                evict_count=pool.evict_count,
                evict_ms=pool.evict_ms,
                num_pages=pool.num_pages,
                num_free_pages=pool.num_free,
                num_cached_pages=pool.num_cached,
                num_evictable_pages=pool.num_evictable,
                num_seqs=len(self._seqs),
                num_seq_tokens=sum(len(s.tokens) for s in self._seqs.values()),
                prefix_hit_tokens=self._hit_tokens,
                prefix_query_tokens=self._query_tokens,
                page_bytes=self._page_bytes,
                block_size=self._block_size,
                total_bytes=pool.num_pages * self._page_bytes,
            )

    # ------------------------------------------------------------------ internals
    def _get(self, seq_id: str) -> _Seq:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise _unknown_seq(seq_id)
        return seq

    def _request_stats(self, seq: _Seq) -> KVRequestStats:
        return KVRequestStats(
            used_tokens=len(seq.tokens),
            used_bytes=len(seq.pages) * self._page_bytes,
            prefix_hit_rate=(
                seq.hit_blocks * self._block_size / seq.query_tokens if seq.query_tokens else 0.0
            ),
            evict_count=seq.evict_count,
            evict_ms=seq.evict_ms,
        )
