"""Request validation and result/stream-event builders shared by the engines.

Conventions every engine in this package follows (see :mod:`sagellm_backend.engine.base`):

* A request is validated by :func:`validate_request` before it is queued; a failure is a
  :class:`~sagellm_backend.errors.ConfigError` naming the field, which the engine turns into
  a terminal result with ``finish_reason="error"`` (:func:`error_response`,
  :func:`end_event`) instead of raising.
* A stream is ``start``, ``delta*``, ``end``. Deltas carry the text and ids produced since the
  previous delta; the concatenated ``chunk`` strings equal the end event's ``output_text``.
* :class:`TokenChannel` is the hand-over between an engine's step loop (producer, on the
  event loop) and one consumer (``execute`` or ``stream``). The producer appends tokens and
  finishes the channel exactly once; the consumer may cancel it at any time, which the
  producer observes through :attr:`TokenChannel.cancelled` on its next step.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Literal

from sagellm_protocol import (
    Error,
    ErrorCode,
    Metrics,
    Request,
    Response,
    StreamEventDelta,
    StreamEventEnd,
    StreamEventStart,
)

from sagellm_backend.errors import ConfigError

__all__ = [
    "FinishReason",
    "TokenChannel",
    "delta_event",
    "end_event",
    "error_response",
    "internal_error",
    "request_ids",
    "start_event",
    "validate_request",
]

FinishReason = Literal["stop", "length", "error"]


def request_ids(request: Any) -> tuple[str, str]:
    """Return ``(request_id, trace_id)`` of anything, as strings ("" when missing)."""
    rid = getattr(request, "request_id", "")
    tid = getattr(request, "trace_id", "")
    return (rid if isinstance(rid, str) else str(rid), tid if isinstance(tid, str) else str(tid))


def validate_request(request: Any, *, default_max_tokens: int | None = None) -> int:
    """Check the fields engines rely on and return the effective ``max_tokens``.

    Requests built with ``Request.model_construct`` skip pydantic validation, so every field
    is checked again here.

    Args:
        request: the request to check (must be a protocol :class:`Request`).
        default_max_tokens: used when ``max_tokens`` is None (only possible via
            ``model_construct``); None means ``max_tokens`` is required.

    Returns:
        The number of tokens to generate (``>= 1``).

    Raises:
        ConfigError: a field is missing, of the wrong type or out of range; the message
            names the field and the valid range.
    """
    if not isinstance(request, Request):
        raise ConfigError(
            f"request must be a sagellm_protocol.Request, got {type(request).__name__}"
        )
    rid = getattr(request, "request_id", None)
    if not isinstance(rid, str) or not rid:
        raise ConfigError(f"request.request_id must be a non-empty string, got {rid!r}")
    tid = getattr(request, "trace_id", None)
    if not isinstance(tid, str):
        raise ConfigError(f"request.trace_id must be a string, got {tid!r}")
    prompt = getattr(request, "prompt", None)
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError(f"request.prompt must be a non-empty string, got {prompt!r}")
    max_tokens = getattr(request, "max_tokens", None)
    if max_tokens is None and default_max_tokens is not None:
        max_tokens = default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConfigError(f"request.max_tokens must be an integer >= 1, got {max_tokens!r}")
    temperature = getattr(request, "temperature", None)
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ConfigError(
            f"request.temperature must be None or a finite number >= 0, got {temperature!r}"
        )
    top_p = getattr(request, "top_p", None)
    if top_p is not None and (
        isinstance(top_p, bool)
        or not isinstance(top_p, int | float)
        or not math.isfinite(top_p)
        or not 0 < top_p <= 1
    ):
        raise ConfigError(f"request.top_p must be None or in (0, 1], got {top_p!r}")
    metadata = getattr(request, "metadata", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise ConfigError(f"request.metadata must be None or a dict, got {metadata!r}")
    return max_tokens


def error_response(
    request: Any, error: Error, metrics: Metrics, *, output_text: str = "", output_tokens: Any = ()
) -> Response:
    """Build a terminal Response with ``finish_reason="error"``."""
    rid, tid = request_ids(request)
    return Response(
        request_id=rid,
        trace_id=tid,
        output_text=output_text,
        output_tokens=list(output_tokens),
        finish_reason="error",
        metrics=metrics,
        error=error,
    )


def start_event(request: Any, engine_id: str, prompt_tokens: int | None) -> StreamEventStart:
    """Build the stream's start event."""
    rid, tid = request_ids(request)
    return StreamEventStart(
        request_id=rid, trace_id=tid, engine_id=engine_id, prompt_tokens=prompt_tokens
    )


def delta_event(request: Any, engine_id: str, chunk: str, tokens: list[int]) -> StreamEventDelta:
    """Build one delta event (``chunk`` is the text of ``tokens``)."""
    rid, tid = request_ids(request)
    return StreamEventDelta(
        request_id=rid, trace_id=tid, engine_id=engine_id, chunk=chunk, chunk_tokens=tokens
    )


def end_event(
    request: Any,
    engine_id: str,
    *,
    output_text: str,
    output_tokens: list[int],
    finish_reason: FinishReason,
    metrics: Metrics,
    error: Error | None = None,
) -> StreamEventEnd:
    """Build the stream's end event."""
    rid, tid = request_ids(request)
    return StreamEventEnd(
        request_id=rid,
        trace_id=tid,
        engine_id=engine_id,
        output_text=output_text,
        output_tokens=output_tokens,
        finish_reason=finish_reason,
        metrics=metrics,
        error=error,
    )


def internal_error(message: str, code: ErrorCode = ErrorCode.UNAVAILABLE) -> Error:
    """Shorthand for a protocol Error."""
    return Error(code=code, message=message, retryable=code is not ErrorCode.INVALID_ARGUMENT)


class TokenChannel:
    """One request's hand-over between the engine loop and its consumer.

    Invariants: ``tokens``/``texts`` only grow; :meth:`finish` is effective once (later
    calls are ignored) and after it no token is added; :attr:`cancelled` is set only by the
    consumer. All methods must be called on the event loop that created the channel.
    """

    __slots__ = (
        "_event",
        "_future",
        "cancelled",
        "error",
        "finish_reason",
        "finished",
        "metrics",
        "texts",
        "tokens",
    )

    def __init__(self, *, streaming: bool) -> None:
        self.tokens: list[int] = []
        self.texts: list[str] = []
        self.finished = False
        self.cancelled = False
        self.finish_reason: FinishReason = "error"
        self.metrics: Metrics | None = None
        self.error: Error | None = None
        self._future: asyncio.Future[None] | None = None
        self._event: asyncio.Event | None = asyncio.Event() if streaming else None

    def push(self, token: int, text: str) -> None:
        """Append one produced token (ignored once finished)."""
        if self.finished:
            return
        self.tokens.append(token)
        self.texts.append(text)
        if self._event is not None:
            self._event.set()

    def finish(self, reason: FinishReason, metrics: Metrics, error: Error | None = None) -> None:
        """Record the terminal result and wake the consumer (first call wins)."""
        if self.finished:
            return
        self.finished = True
        self.finish_reason = reason
        self.metrics = metrics
        self.error = error
        if self._event is not None:
            self._event.set()
        fut = self._future
        if fut is not None and not fut.done():
            fut.set_result(None)

    def cancel(self) -> None:
        """Consumer side: the result is no longer wanted."""
        self.cancelled = True

    async def wait_finished(self) -> None:
        """Wait until :meth:`finish` has been called."""
        if self.finished:
            return
        await self.finished_future(asyncio.get_running_loop())

    def finished_future(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future of ``loop`` (the channel's event loop) resolved by :meth:`finish`.

        Already resolved when the channel is finished. Awaiting it directly saves the
        coroutine frame of :meth:`wait_finished` on hot paths.
        """
        fut = self._future
        if fut is None:
            fut = self._future = loop.create_future()
            if self.finished:
                fut.set_result(None)
        return fut

    async def wait_progress(self) -> None:
        """Streaming consumers: wait for a new token or the finish (returns at once if any)."""
        event = self._event
        if event is None:
            raise RuntimeError("wait_progress() needs a channel created with streaming=True")
        await event.wait()
        event.clear()

    @property
    def text(self) -> str:
        """The output text so far."""
        return "".join(self.texts)
