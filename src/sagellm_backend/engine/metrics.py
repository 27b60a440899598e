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
import operator
import threading
import time
from dataclasses import dataclass, field

from sagellm_protocol import Metrics

from sagellm_backend.kv.stats import KVRequestStats

__all__ = ["ErrorRateCounter", "KVRequestStats", "RequestTimeline", "build_metrics", "now"]

# One offset so wall-clock timestamps are derived from the monotonic clock consistently.
_WALL_OFFSET = time.time() - time.perf_counter()


def now() -> float:
    """Monotonic clock in seconds (``time.perf_counter``)."""
    return time.perf_counter()


def to_wall(t: float) -> float:
    """Convert a :func:`now` reading to wall-clock seconds."""
    return t + _WALL_OFFSET


@dataclass(slots=True)
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


_NO_KV = KVRequestStats()
_sub = operator.sub
_mul = operator.mul
# Metrics' own pydantic-core validator (the one ``Metrics(**kw)`` runs), called directly.
_validate_metrics = Metrics.__pydantic_validator__.validate_python


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


def _itl_ms(times: list[float]) -> tuple[list[float], float]:
    """ITL gaps (ms) and their mean, exactly as :func:`build_metrics` defines them.

    For ``len(times) >= 2`` this returns what ``gaps = [(b - a) * 1000.0 for a, b in
    pairwise(times)]``, ``mean = sum(gaps) / len(gaps)`` and then, when ``min(gaps) < 0``,
    ``gaps = [g if g > 0.0 else 0.0 for g in gaps]`` give, bit for bit.

    Tokens of a multi-step burst share one instant, so a common timeline is a first token
    followed by equal ones: then every gap after the first is exactly ``+0.0`` (``x - x``
    of a finite number), ``sum`` gives ``0.0 + gaps[0]`` and only ``gaps[0]`` can be
    negative, so nothing is computed per token. Otherwise the gaps are mapped pairwise in C.
    """
    n = len(times)
    last = times[-1]
    # finite and nonzero: then equal values differ by exactly +0.0 (no signed zeros)
    if last and last - last == 0.0:
        same = times.count(last)
        if same == n or (same == n - 1 and times[0] != last):
            first = (times[1] - times[0]) * 1000.0
            gaps = [0.0] * (n - 1)
            if not first < 0.0:  # a negative first gap is clamped to the 0.0 already there
                gaps[0] = first
            return gaps, (0.0 + first) / (n - 1)
    gaps = list(map(_mul, map(_sub, times[1:], times[:-1]), itertools.repeat(1000.0)))
    mean = sum(gaps) / len(gaps)
    if min(gaps) < 0.0:
        gaps = [g if g > 0.0 else 0.0 for g in gaps]
    return gaps, mean


def build_metrics(
    timeline: RequestTimeline,
    *,
    error_rate: float,
    peak_mem_mb: int = 0,
    kv: KVRequestStats | None = None,
    component_trace: list[str] | None = None,
) -> Metrics:
    """Build protocol Metrics from a finished request's timeline (see module docstring).

    The result is fully validated by the protocol model's own validator (one call for
    Metrics and its nested Timestamps, fed a prepared dict: the same checks and the same
    ``model_fields_set`` as keyword construction, without the per-model ``__init__``
    overhead). Lists passed in are copied by validation, never shared with the result.
    """
    completed = timeline.completed
    if completed is None:
        completed = timeline.completed = now()
    queued = timeline.queued
    times = timeline.token_times
    n = len(times)
    tbt = tpot = 0.0
    itl: list[float] = []
    if n:
        first = times[0]
        ttft = (first - queued) * 1000.0
        if n > 1:
            itl, tbt = _itl_ms(times)
            tpot = (completed - first) * 1000.0 / (n - 1)
        executed = first
    else:
        ttft = 0.0
        executed = completed
    elapsed = completed - queued
    throughput = n / elapsed if elapsed > 0 else 0.0
    scheduled = timeline.scheduled
    if scheduled is None:
        scheduled = completed
    if kv is None:
        kv = _NO_KV
    hit = kv.prefix_hit_rate
    peak = int(peak_mem_mb)
    prefill = timeline.prefill_ms
    decode = timeline.decode_ms
    metrics: Metrics = _validate_metrics(
        {
            "ttft_ms": ttft if ttft > 0.0 else 0.0,
            "tbt_ms": tbt if tbt > 0.0 else 0.0,
            "tpot_ms": tpot if tpot > 0.0 else 0.0,
            "throughput_tps": throughput if throughput > 0.0 else 0.0,
            "peak_mem_mb": peak if peak > 0 else 0,
            "error_rate": 0.0 if error_rate < 0.0 else (1.0 if error_rate > 1.0 else error_rate),
            "kv_used_tokens": kv.used_tokens,
            "kv_used_bytes": kv.used_bytes,
            "prefix_hit_rate": 0.0 if hit < 0.0 else (1.0 if hit > 1.0 else hit),
            "evict_count": kv.evict_count,
            "evict_ms": kv.evict_ms,
            "prefill_ms": prefill if prefill > 0.0 else 0.0,
            "decode_ms": decode if decode > 0.0 else 0.0,
            "itl_list": itl,
            "timestamps": {
                "queued_at": queued + _WALL_OFFSET,
                "scheduled_at": scheduled + _WALL_OFFSET,
                "executed_at": executed + _WALL_OFFSET,
                "completed_at": completed + _WALL_OFFSET,
            },
            "component_trace": component_trace or None,
        }
    )
    return metrics
