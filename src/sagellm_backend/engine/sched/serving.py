"""What a started engine serves with: the :class:`Serving` set and the detokenizer interface.

An engine's ``_build_serving`` returns one :class:`Serving`; the
:class:`~sagellm_backend.engine.sched.engine.ScheduledEngine` life cycle starts its driver
and gives everything back through ``Serving.release`` (exactly once: when the driver ends,
or through :func:`undo_serving` when a start is undone).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sagellm_backend.engine._streaming import RequestLimits
from sagellm_backend.engine.sched.scheduler import Scheduler

__all__ = ["Detokenizer", "Serving", "undo_serving"]

_log = logging.getLogger("sagellm_backend.engine.sched.engine")


class Detokenizer:
    """Incremental text of a token stream: ``add(ids) -> text``, ``flush() -> tail``."""

    def add(self, ids: list[int]) -> str:  # pragma: no cover - interface
        """Text of ``ids`` that is final now."""
        raise NotImplementedError

    def flush(self) -> str:  # pragma: no cover - interface
        """Text held back so far."""
        raise NotImplementedError


@dataclass
class Serving:
    """What a started engine serves with (built by ``_build_serving``).

    Attributes:
        scheduler: the scheduler (its ``kv`` is the engine's KV manager).
        runner: the model runner.
        limits: what requests may ask for.
        tokenize: prompt text -> token ids.
        new_detok: an incremental detokenizer for one request (a fresh one, unless it is
            stateless and may be shared).
        release: gives everything taken from the provider back (the KV manager); called
            once, from the driver's thread when it ends, or on an undone start.
        threaded: run steps in a worker thread (torch runners).
        thread_init: called first in the worker thread.
        thread_context: context manager factory around the worker loop.
        interrupt: ends a step that is blocked outside the engine (e.g. a collective on a
            hung tensor-parallel rank); called by ``stop()`` when the driver did not join in
            time, so that ``stop()`` still returns promptly. None: nothing to interrupt.
    """

    scheduler: Scheduler
    runner: Any
    limits: RequestLimits
    tokenize: Callable[[str], list[int]]
    new_detok: Callable[[], Detokenizer]
    release: Callable[[], None]
    threaded: bool
    thread_init: Callable[[], None] | None = None
    thread_context: Callable[[], Any] | None = None
    interrupt: Callable[[], None] | None = None


def undo_serving(serving: Serving) -> None:
    """Give back what an undone start took (errors are logged, never raised)."""
    try:
        serving.release()
    except Exception:
        _log.exception("releasing an undone start failed")
