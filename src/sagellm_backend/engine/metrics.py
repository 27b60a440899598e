"""Per-request timing and the protocol :class:`~sagellm_protocol.Metrics` built from it.

Every engine records a :class:`RequestTimeline` (monotonic clock) while it serves a request
and calls :func:`build_metrics` once at the end. Nothing here invents a number: every field
is derived from recorded instants and counters, and fields an engine cannot measure stay at
the protocol default (0).

Definitions (all durations in milliseconds):
    * ``ttft_ms``: queued -> first output token.
    * ``itl_list``: gaps between consecutive output tokens.
    * ``tbt_ms``: mean of ``itl_list`` (0 with fewer than two tokens).
    * ``tpot_ms``: (completed - first token) / (tokens - 1) (0 with fewer than two tokens).
    * ``throughput_tps``: output tokens / (completed - queued) seconds.
    * ``error_rate``: the engine's failed / finished requests, this one included.
    * ``timestamps``: wall-clock seconds (``time.time()`` scale) of queued, scheduled
      (admitted to a batch), executed (first token produced) and completed.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

from sagellm_protocol import Metrics, Timestamps

__all__ = ["ErrorRateCounter", "KVRequestStats", "RequestTimeline", "build_metrics", "now"]

# One offset so wall-clock timestamps are derived from the monotonic clock consistently.
_WALL_OFFSET = time.time() - time.perf_counter()


def now() -> float:
    """Monotonic clock in seconds (``time.perf_counter``)."""
    return time.perf_counter()


def to_wall(t: float) -> float:
    """Convert a :func:`now` reading to wall-clock seconds."""
    return t + _WALL_OFFSET


@dataclass
class RequestTimeline:
    """Instants (monotonic seconds) in the life of one request.

    Invariant: queued <= scheduled <= first token <= each later token <= completed, for the
    instants that are set.
    """

    queued: float = field(default_factory=now)
    scheduled: float | None = None
    token_times: list[float] = field(default_factory=list)
    completed: float | None = None
    prefill_ms: float = 0.0
    decode_ms: float = 0.0

    def mark_scheduled(self, t: float | None = None) -> None:
        """Record admission into a running batch (first call wins)."""
        if self.scheduled is None:
            self.scheduled = now() if t is None else t

    def mark_tokens(self, count: int = 1, t: float | None = None) -> None:
        """Record ``count`` output tokens produced at one instant."""
        stamp = now() if t is None else t
        if self.scheduled is None:
            self.scheduled = stamp
        self.token_times.extend([stamp] * count)

    def mark_completed(self, t: float | None = None) -> None:
        """Record the end of the request (first call wins)."""
        if self.completed is None:
            self.completed = now() if t is None else t

    @property
    def first_token(self) -> float | None:
        """Instant of the first output token, if any."""
        return self.token_times[0] if self.token_times else None


@dataclass(frozen=True)
class KVRequestStats:
    """KV-cache figures of one request at completion (from the KV manager)."""

    used_tokens: int = 0
    used_bytes: int = 0
    prefix_hit_rate: float = 0.0
    evict_count: int = 0
    evict_ms: float = 0.0


class ErrorRateCounter:
    """Thread-safe count of finished and failed requests of one engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.finished = 0
        self.failed = 0

    def record(self, failed: bool) -> float:
        """Count one finished request and return the error rate including it."""
        with self._lock:
            self.finished += 1
            self.failed += int(failed)
            return self.failed / self.finished

    @property
    def rate(self) -> float:
        """Failed / finished so far (0.0 before any request finished)."""
        with self._lock:
            return self.failed / self.finished if self.finished else 0.0


def build_metrics(
    timeline: RequestTimeline,
    *,
    error_rate: float,
    peak_mem_mb: int = 0,
    kv: KVRequestStats | None = None,
    component_trace: list[str] | None = None,
) -> Metrics:
    """Build protocol Metrics from a finished request's timeline (see module docstring)."""
    timeline.mark_completed()
    completed = timeline.completed
    assert completed is not None
    first = timeline.first_token
    times = timeline.token_times
    itl = [(b - a) * 1000.0 for a, b in itertools.pairwise(times)]
    n = len(times)
    ttft = (first - timeline.queued) * 1000.0 if first is not None else 0.0
    tbt = sum(itl) / len(itl) if itl else 0.0
    tpot = (completed - first) * 1000.0 / (n - 1) if first is not None and n > 1 else 0.0
    elapsed = completed - timeline.queued
    throughput = n / elapsed if elapsed > 0 else 0.0
    scheduled = timeline.scheduled if timeline.scheduled is not None else completed
    executed = first if first is not None else completed
    kv = kv or KVRequestStats()
    return Metrics(
        ttft_ms=max(ttft, 0.0),
        tbt_ms=max(tbt, 0.0),
        tpot_ms=max(tpot, 0.0),
        throughput_tps=max(throughput, 0.0),
        peak_mem_mb=max(int(peak_mem_mb), 0),
        error_rate=min(max(error_rate, 0.0), 1.0),
        kv_used_tokens=kv.used_tokens,
        kv_used_bytes=kv.used_bytes,
        prefix_hit_rate=min(max(kv.prefix_hit_rate, 0.0), 1.0),
        evict_count=kv.evict_count,
        evict_ms=kv.evict_ms,
        prefill_ms=max(timeline.prefill_ms, 0.0),
        decode_ms=max(timeline.decode_ms, 0.0),
        itl_list=[max(x, 0.0) for x in itl],
        timestamps=Timestamps(
            queued_at=to_wall(timeline.queued),
            scheduled_at=to_wall(scheduled),
            executed_at=to_wall(executed),
            completed_at=to_wall(completed),
        ),
        component_trace=list(component_trace) if component_trace else None,
    )
