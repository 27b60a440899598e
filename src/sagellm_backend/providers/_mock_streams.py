"""Streams and events of the mock provider: synchronous work, real wall-clock timing."""

from __future__ import annotations

import time

from sagellm_backend._validate import require_instance
from sagellm_backend.errors import InvalidStateError

__all__ = ["MockEvent", "MockStream"]


class MockEvent:
    """Timing event; :meth:`record` stamps ``time.perf_counter()``."""

    def __init__(self) -> None:
        self._time: float | None = None

    @property
    def recorded(self) -> bool:
        """Whether the event has been recorded."""
        return self._time is not None

    def record(self, stream: MockStream | None = None) -> None:
        """Record the event now (mock work is synchronous, so "now" is the stream's end)."""
        self._time = time.perf_counter()
        if stream is not None:
            stream.num_events += 1

    def query(self) -> bool:
        """Whether the work before the event has finished (always, once recorded)."""
        return self._time is not None

    def synchronize(self) -> None:
        """Return at once: mock work completes synchronously."""

    def elapsed_ms(self, start: MockEvent) -> float:
        """Milliseconds from ``start`` to this event (real wall time between the records).

        Raises:
            TypeError: ``start`` is not a :class:`MockEvent`.
            InvalidStateError: either event was never recorded.
        """
        require_instance(start, MockEvent, "start must be a MockEvent")
        if start._time is None or self._time is None:
            which = "start" if start._time is None else "end"
            raise InvalidStateError(f"elapsed_ms: the {which} event was never recorded")
        return (self._time - start._time) * 1000.0


class MockStream:
    """Ordered queue of mock work (executed synchronously, so it is always drained)."""

    def __init__(self) -> None:
        self.num_events = 0
        self.num_synchronize = 0

    def synchronize(self) -> None:
        """Return at once (all work already ran); counted in ``num_synchronize``."""
        self.num_synchronize += 1

    def record_event(self, event: MockEvent) -> None:
        """Record ``event`` at the current end of this stream."""
        require_instance(event, MockEvent, "record_event expects a MockEvent").record(self)

    def wait_event(self, event: MockEvent) -> None:
        """Make later work wait for ``event`` (nothing to wait for in the mock)."""
        require_instance(event, MockEvent, "wait_event expects a MockEvent")
