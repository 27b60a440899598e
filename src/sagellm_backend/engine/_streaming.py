"""Request validation and result/stream-event builders shared by the engines.

Conventions every engine in this package follows (see :mod:`sagellm_backend.engine.base`):

* A request is validated by :func:`validate_request` before it is queued; a failure is a
  :class:`~sagellm_backend.errors.ConfigError` naming the field, which the engine turns into
  a terminal result with ``finish_reason="error"`` (:func:`error_response`,
  :func:`end_event`) instead of raising.
* A stream is ``start``, ``delta*``, ``end``. Deltas carry the text and ids produced since the
  previous delta; the concatenated ``chunk`` strings equal the end event's ``output_text``.
* :func:`prepare_request` is the one request-validation path of every engine: fields,
  ``metadata`` tuning keys, tokenization, vocabulary, context and token limits.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
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

from sagellm_backend.engine.sched.sampler import GREEDY, SamplingParams
from sagellm_backend.errors import ConfigError

__all__ = [
    "REQUEST_METADATA_KEYS",
    "FinishReason",
    "PreparedRequest",
    "RequestLimits",
    "delta_event",
    "end_event",
    "error_response",
    "internal_error",
    "prepare_request",
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
    if not isinstance(prompt, str):
        raise ConfigError(f"request.prompt must be a string, got {prompt!r}")
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
    return Response(
        **_terminal_fields(request, output_text, list(output_tokens), "error", metrics, error)
    )


def _terminal_fields(
    request: Any,
    output_text: str,
    output_tokens: list[int],
    finish_reason: FinishReason,
    metrics: Metrics,
    error: Error | None,
) -> dict[str, Any]:
    """The fields a Response and a stream's end event share."""
    rid, tid = request_ids(request)
    return {
        "request_id": rid,
        "trace_id": tid,
        "output_text": output_text,
        "output_tokens": output_tokens,
        "finish_reason": finish_reason,
        "metrics": metrics,
        "error": error,
    }


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
    fields = _terminal_fields(request, output_text, output_tokens, finish_reason, metrics, error)
    return StreamEventEnd(engine_id=engine_id, **fields)


def internal_error(message: str, code: ErrorCode = ErrorCode.UNAVAILABLE) -> Error:
    """Shorthand for a protocol Error."""
    return Error(code=code, message=message, retryable=code is not ErrorCode.INVALID_ARGUMENT)


_log = logging.getLogger(__name__)

#: The request ``metadata`` keys engines read (others are ignored, with one warning each).
REQUEST_METADATA_KEYS = (
    "ignore_eos",
    "prompt_token_ids",
    "repetition_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "top_k",
)


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What an engine accepts.

    Attributes:
        vocab_size: token ids must be in ``[0, vocab_size)``.
        max_context: prompt + output length; the prompt must be shorter.
        max_input_tokens: cap on the prompt length (None: only the context).
        max_new_tokens: ``max_tokens`` above it is lowered to it (None: no cap).
        default_max_tokens: used when ``max_tokens`` is None (None: it is required).
        model: when set, ``request.model`` must equal it.
        bos_token_id: a prompt that tokenizes to no tokens (``""``) starts from this one
            token, as transformers' ``generate()`` does without inputs (None: such a prompt
            is rejected).
    """

    vocab_size: int
    max_context: int
    max_input_tokens: int | None = None
    max_new_tokens: int | None = None
    default_max_tokens: int | None = None
    model: str | None = None
    bos_token_id: int | None = None


_NO_IDS: frozenset[int] = frozenset()


@dataclass(slots=True)
class PreparedRequest:
    """A validated request, ready for the scheduler."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    ignore_eos: bool
    stop_token_ids: frozenset[int]
    stop_strings: tuple[str, ...]


def _int_list(name: str, value: Any) -> list[int]:
    """``value`` as a list of ints: a list or tuple of integers (numpy's too), no bools."""
    if isinstance(value, list | tuple):
        if all(type(t) is int for t in value):
            return list(value)
        if all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in value):
            return [int(t) for t in value]
    raise ConfigError(f"request.metadata[{name!r}] must be a list of ints, got {value!r}")


def _sampling(request: Request, metadata: dict[str, Any]) -> SamplingParams:
    seed = metadata.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64
    ):
        raise ConfigError(f"request.metadata['seed'] must be an int in [0, 2**64), got {seed!r}")
    top_k = metadata.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ConfigError(f"request.metadata['top_k'] must be an int >= 0 (0 = off), got {top_k!r}")
    rp = metadata.get("repetition_penalty")
    if rp is not None and (
        isinstance(rp, bool) or not isinstance(rp, int | float) or not math.isfinite(rp) or rp <= 0
    ):
        raise ConfigError(
            f"request.metadata['repetition_penalty'] must be a finite number > 0, got {rp!r}"
        )
    temperature = request.temperature
    if not temperature and seed is None and top_k is None and rp is None:
        return GREEDY
    return SamplingParams(
        temperature=float(temperature) if temperature else None,
        top_p=float(request.top_p) if request.top_p is not None else None,
        top_k=top_k or None,
        repetition_penalty=float(rp) if rp is not None else None,
        seed=seed,
    )


def prepare_request(
    request: Any,
    limits: RequestLimits,
    tokenize: Callable[[str], list[int]],
    *,
    warned: set[str] | None = None,
) -> PreparedRequest:
    """Validate ``request`` the way every engine does; tokenize its prompt.

    Per-request options in ``request.metadata``: ``ignore_eos`` (bool), ``seed`` (int in
    ``[0, 2**64)``), ``top_k`` (int >= 0), ``repetition_penalty`` (> 0), ``stop_token_ids``
    (list of ints), ``stop`` (list of strings), ``prompt_token_ids`` (list of ints used
    instead of tokenizing ``prompt``). Other keys are ignored with one warning per key
    (``warned`` remembers which were reported), naming the valid ones.

    Raises:
        ConfigError: naming the field, the bad value and what is valid.
    """
    max_tokens = validate_request(request, default_max_tokens=limits.default_max_tokens)
    metadata: dict[str, Any] = request.metadata or {}
    if warned is not None and metadata:
        for key in metadata:
            if key not in REQUEST_METADATA_KEYS and key not in warned:
                warned.add(key)
                _log.warning(
                    "request.metadata key %r is not a request option and is ignored; "
                    "valid keys: %s",
                    key,
                    ", ".join(REQUEST_METADATA_KEYS),
                )
    # (a request built with model_construct may lack the field: it serves no model then)
    model = getattr(request, "model", None)
    if limits.model and model != limits.model:
        raise ConfigError(
            f"request.model={model!r} is not served by this engine (model {limits.model!r})"
        )
    stop_ids: Any = ()
    stops: Any = ()
    given: Any = None
    ignore_eos: bool = False
    if metadata:  # the options; a request without metadata has none to check
        ignore_eos = metadata.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ConfigError(f"request.metadata['ignore_eos'] must be a bool, got {ignore_eos!r}")
        sampling = _sampling(request, metadata)
        stop_ids = metadata.get("stop_token_ids", ())
        if not isinstance(stop_ids, list | tuple | set | frozenset) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in stop_ids
        ):
            raise ConfigError(
                f"request.metadata['stop_token_ids'] must be a list of ints, got {stop_ids!r}"
            )
        stops = metadata.get("stop", ())
        if isinstance(stops, str):
            stops = (stops,)
        if not isinstance(stops, list | tuple) or not all(isinstance(x, str) and x for x in stops):
            raise ConfigError(
                f"request.metadata['stop'] must be a list of non-empty strings, got {stops!r}"
            )
        given = metadata.get("prompt_token_ids")
    else:  # no metadata: no seed, top_k or penalty; greedy unless there is a temperature
        sampling = _sampling(request, metadata) if request.temperature else GREEDY
    if given is not None:
        ids = _int_list("prompt_token_ids", given)
    else:
        prompt = request.prompt
        try:
            if not prompt.isascii():  # ASCII always encodes
                prompt.encode("utf-8")
            ids = tokenize(prompt)
        except Exception as exc:  # e.g. a lone surrogate: not encodable as UTF-8
            raise ConfigError(
                f"request.prompt cannot be tokenized ({type(exc).__name__}: {exc}); give "
                "valid Unicode text"
            ) from exc
    if not ids:
        if given is not None:
            raise ConfigError(
                "request.metadata['prompt_token_ids'] has no tokens; give at least one token id"
            )
        if limits.bos_token_id is None:
            raise ConfigError(
                "request.prompt tokenizes to no tokens and the model has no BOS token to start "
                "from; give a prompt with some text"
            )
        ids = [limits.bos_token_id]  # unconditional generation, as generate() without inputs
    vocab = limits.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        bad = [t for t in ids if not 0 <= t < vocab]
        raise ConfigError(
            f"request prompt has token id(s) {sorted(set(bad))[:8]} outside the model's "
            f"vocabulary 0..{vocab - 1}"
        )
    n = len(ids)
    if limits.max_input_tokens is not None and n > limits.max_input_tokens:
        raise ConfigError(
            f"request.prompt has {n} tokens, more than the engine's max_input_tokens="
            f"{limits.max_input_tokens}"
        )
    if n >= limits.max_context:
        raise ConfigError(
            f"request.prompt has {n} tokens but the context length is {limits.max_context}; "
            "the prompt must be shorter than the context (at least one token is generated)"
        )
    cap = limits.max_context - n
    if limits.max_new_tokens is not None:
        cap = min(cap, limits.max_new_tokens)
    return PreparedRequest(
        prompt_ids=ids,
        max_tokens=min(max_tokens, cap),
        sampling=sampling,
        ignore_eos=ignore_eos,
        stop_token_ids=frozenset(int(t) for t in stop_ids) if stop_ids else _NO_IDS,
        stop_strings=tuple(stops),
    )
