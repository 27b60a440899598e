"""What an engine reports per request: Metrics, error results, error rate and peak memory.

:class:`RequestResults` is the part of a
:class:`~sagellm_backend.engine.sched.engine.ScheduledEngine` that turns finished sequences
(and requests rejected before they were queued) into protocol ``Metrics`` and ``Response``
objects.

Invariants:
    * every request that ends -- served, failed or rejected early -- is counted exactly once
      in the error rate, at the moment its Metrics are built;
    * ``peak_mem_mb`` is the provider's own peak where it reports one (read at most every
      :data:`PEAK_TTL_S` seconds), else the peak of the KV pages in use that
      :meth:`RequestResults.note_kv_peak` saw.
"""

from __future__ import annotations

import math
from typing import Any

from sagellm_protocol import Error, Metrics, Response

from sagellm_backend.engine._streaming import error_response
from sagellm_backend.engine.metrics import ErrorRateCounter, RequestTimeline, build_metrics, now
from sagellm_backend.engine.sched.seq import SchedSeq
from sagellm_backend.errors import to_protocol_error

__all__ = ["PEAK_TTL_S", "RequestResults"]

_MIB = 1 << 20
#: How long a reading of the provider's peak memory is reused for request metrics.
PEAK_TTL_S = 0.02


class RequestResults:
    """Metrics and early error results of one engine's requests (see the module docstring).

    Args:
        component_trace: the engine's component trace, put in every Metrics.
    """

    __slots__ = ("_peak_bytes", "_peak_mb", "_peak_read_at", "early_failed", "errors", "trace")

    def __init__(self, component_trace: list[str]) -> None:
        self.trace = component_trace
        self.errors = ErrorRateCounter()
        #: requests rejected before they were queued (the scheduler never saw them)
        self.early_failed = 0
        self._peak_bytes = 0
        self._peak_mb = 0
        self._peak_read_at = -1.0

    def note_kv_peak(self, kv: Any) -> None:
        """Remember the bytes of ``kv``'s pages in use if they are a new peak."""
        used = (kv.pool.num_pages - kv.pool.num_free) * kv.spec.page_bytes
        if used > self._peak_bytes:
            self._peak_bytes = used

    def peak_mem_mb(self, provider: Any) -> int:
        """``provider``'s peak memory (MiB), read at most every :data:`PEAK_TTL_S` seconds.

        Without a provider (or when its ``memory_stats`` fails) the KV peak noted so far.
        """
        t = now()
        if t - self._peak_read_at < PEAK_TTL_S:
            return self._peak_mb
        if provider is None:
            return self._peak_bytes // _MIB
        try:
            stats = provider.memory_stats()
        except Exception:  # pragma: no cover - a provider bug must not fail the request
            return self._peak_bytes // _MIB
        peak = stats.get("peak", stats.get("allocated", 0))
        self._peak_mb = math.ceil(int(peak) / _MIB) if peak else 0
        self._peak_read_at = t
        return self._peak_mb

    def metrics(self, seq: SchedSeq, provider: Any) -> Metrics:
        """The Metrics of a finished sequence (counts it in the error rate)."""
        return build_metrics(
            seq.timeline,
            error_rate=self.errors.record(seq.finish_reason == "error"),
            peak_mem_mb=self.peak_mem_mb(provider),
            kv=seq.kv_stats,
            component_trace=self.trace,
        )

    def error_result(self, request: Any, exc: BaseException | Error, provider: Any) -> Response:
        """The terminal error Response of a request rejected before it was queued."""
        self.early_failed += 1
        metrics = build_metrics(
            RequestTimeline(),
            error_rate=self.errors.record(True),
            peak_mem_mb=self.peak_mem_mb(provider),
            component_trace=self.trace,
        )
        error = exc if isinstance(exc, Error) else to_protocol_error(exc)
        return error_response(request, error, metrics)
