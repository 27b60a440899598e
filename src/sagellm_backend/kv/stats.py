"""Per-request KV figures: what a request's KV footprint was when it finished.

:class:`KVRequestStats` is produced by :meth:`~sagellm_backend.kv.manager.KVCacheManager.free`
(and ``request_stats``) and consumed by the engines' metrics
(:func:`~sagellm_backend.engine.metrics.build_metrics`). It lives in ``kv/`` so that the KV
layer never imports from the engine layer above it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KVRequestStats"]


@dataclass(frozen=True)
class KVRequestStats:
    """KV-cache figures of one request at completion (from the KV manager).

    Attributes:
        used_tokens: token slots the request's pages held.
        used_bytes: bytes of those pages.
        prefix_hit_rate: share of the prompt served from the prefix cache (0..1).
        evict_count: cached pages evicted to make room for this request.
        evict_ms: milliseconds spent on those evictions.
    """

    used_tokens: int = 0
    used_bytes: int = 0
    prefix_hit_rate: float = 0.0
    evict_count: int = 0
    evict_ms: float = 0.0
