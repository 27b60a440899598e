"""MockEngineConfig: the configuration of the mock engine (0.1.1.2 constructor, options added).

Every field is declared once, on the dataclass (name, type, default); the constructor
validates each through :mod:`sagellm_backend._validate` in a fixed order, so the first
invalid field (in that order) is the one reported.

Invariants: a constructed config holds only valid values (numbers finite and in range,
flags real bools, at most one of ``kv_memory_bytes`` / ``kv_num_pages``); every failure is
a :class:`~sagellm_backend.errors.ConfigError` naming ``MockEngineConfig.<field>``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sagellm_backend._validate import (
    check_bool,
    check_int,
    check_number,
    check_text,
    invalid,
    is_int,
)
from sagellm_backend.engine.base import EngineConfig
from sagellm_backend.engine.mock.tokenizer import MockTokenizer
from sagellm_backend.engine.options import EngineOptions
from sagellm_backend.errors import ConfigError

if TYPE_CHECKING:
    from sagellm_backend.kv.spec import KVSpec

__all__ = ["DEFAULT_MOCK_CONTEXT", "OPTION_FIELDS", "MockEngineConfig"]

#: Context length of the simulated model (prompt + output), unless ``max_model_len`` is set.
DEFAULT_MOCK_CONTEXT = 32768
_BASE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig))
# Defaults of the 0.1.1.2 positional parameters (the fields' and the constructor's).
_LATENCY_MS = 10.0
_TTFT_MS = 50.0
_FAILURE_RATE = 0.0
_VOCABULARY_SIZE = 32000
_Check = Callable[[str, Any], Any]


def _field(name: str) -> str:
    return f"MockEngineConfig.{name}"


def _number(lo: float, hi: float = math.inf) -> _Check:
    def check(name: str, value: Any) -> float:
        return check_number(_field(name), value, lo=lo, hi=hi)

    return check


def _int(lo: int, *, optional: bool = False) -> _Check:
    valid = f"an int >= {lo}" + (" or None" if optional else "")

    def check(name: str, value: Any) -> int | None:
        if optional:
            return check_int(_field(name), value, lo=lo, optional=True, valid=valid)
        return check_int(_field(name), value, lo=lo, valid=valid)

    return check


def _seed(name: str, value: Any) -> int | None:
    if value is not None and not is_int(value):
        raise invalid(_field(name), "an int or None", value)
    return value


def _kv_spec(name: str, value: Any) -> Any:
    if value is not None and not hasattr(value, "block_size"):
        raise invalid(_field(name), "a sagellm_backend.kv.KVSpec", value)
    return value


def _trace(name: str, value: Any) -> list[str] | None:
    if value is not None and (
        not isinstance(value, list) or not all(isinstance(c, str) for c in value)
    ):
        raise invalid(_field(name), "a list of str", value)
    return value


def _flag(name: str, value: Any) -> bool:
    return check_bool(_field(name), value, valid="a bool (True/False)")


#: (field, check) in validation order, before the flags are checked ...
_CHECKS: tuple[tuple[str, _Check], ...] = (
    ("simulate_latency_ms", _number(0.0)),
    ("simulate_ttft_ms", _number(0.0)),
    ("simulate_failure_rate", _number(0.0, 1.0)),
    ("vocabulary_size", _int(MockTokenizer.MIN_VOCAB_SIZE)),
    ("jitter_ms", _number(0.0)),
    ("seed", _seed),
    ("default_max_tokens", _int(1)),
    ("max_model_len", _int(2)),
    ("max_input_tokens", _int(1, optional=True)),
    ("max_output_tokens", _int(1, optional=True)),
    ("eos_probability", _number(0.0, 1.0)),
    ("kv_spec", _kv_spec),
    ("kv_memory_bytes", _int(1, optional=True)),
    ("kv_num_pages", _int(1, optional=True)),
)
#: ... and after them.
_LATE_CHECKS: tuple[tuple[str, _Check], ...] = (
    ("slow_step_every", _int(0)),
    ("slow_step_ms", _number(0.0)),
    ("component_trace", _trace),
)


@dataclass(init=False)
class MockEngineConfig(EngineConfig):
    """Configuration of :class:`MockEngine` (0.1.1.2 constructor kept, options added).

    The constructor is 0.1.1.2's ``(engine_id, simulate_latency_ms=10.0,
    simulate_ttft_ms=50.0, simulate_failure_rate=0.0, vocabulary_size=32000, **kwargs)``;
    ``kwargs`` take the keyword options declared below (each documented at its field, with
    its default) and the :class:`~sagellm_backend.engine.base.EngineConfig` fields
    (model_path, device, max_batch_size, mock_mode -- default True here --, provider,
    metadata).

    Raises:
        ConfigError: an unknown keyword (the message lists the valid ones) or an invalid
            value (naming ``MockEngineConfig.<field>``, the value and what is valid).
    """

    #: Simulated time per output token after the first (ms).
    simulate_latency_ms: float = _LATENCY_MS
    #: Simulated time of a prefill step (ms).
    simulate_ttft_ms: float = _TTFT_MS
    #: Probability that a request fails (injected fault).
    simulate_failure_rate: float = _FAILURE_RATE
    #: Vocabulary of the mock tokenizer (at least ``MockTokenizer.MIN_VOCAB_SIZE``).
    vocabulary_size: int = _VOCABULARY_SIZE
    #: Uniform random extra time ``[0, jitter_ms]`` per step.
    jitter_ms: float = 0.0
    #: Seed of the jitter/fault random generator.
    seed: int | None = 0
    #: Used for a request whose ``max_tokens`` is None, only when given explicitly;
    #: otherwise such a request is rejected, as the HF engines reject it.
    default_max_tokens: int = 128
    #: Prompt limit; a longer request gets an INVALID_ARGUMENT error result.
    max_input_tokens: int | None = None
    #: Output cap: a request asking more gets at most this many tokens (as the HF engines'
    #: ``max_new_tokens``, and what sagellm-core's ``max_output_tokens`` maps to).
    max_output_tokens: int | None = None
    #: Chance that a generated token is EOS (0 = never; deterministic per prompt, position).
    eos_probability: float = 0.0
    #: KV geometry (default: 4 layers x 2 kv heads x 64 head dim, fp16, page 16).
    kv_spec: KVSpec | None = None
    #: KV pool size in bytes (give this or ``kv_num_pages``; default 2048 pages).
    kv_memory_bytes: int | None = None
    #: KV pool size in pages.
    kv_num_pages: int | None = None
    #: Reuse cached full blocks of a repeated prompt prefix.
    enable_prefix_caching: bool = True
    #: ``start()`` raises BackendNotAvailableError (injected fault).
    fail_at_start: bool = False
    #: Every N-th step takes ``slow_step_ms`` longer (0 = never).
    slow_step_every: int = 0
    #: Extra time of a slow step (ms).
    slow_step_ms: float = 0.0
    #: A request whose ``model`` differs from ``model_path`` is rejected.
    strict_model: bool = False
    #: Override of the Metrics.component_trace this engine reports.
    component_trace: list[str] | None = None
    #: Context length of the simulated model: a prompt as long is rejected and
    #: ``max_tokens`` is capped to what is left, as the HF engines do.
    max_model_len: int = DEFAULT_MOCK_CONTEXT

    def __init__(
        self,
        engine_id: str,
        simulate_latency_ms: float = _LATENCY_MS,
        simulate_ttft_ms: float = _TTFT_MS,
        simulate_failure_rate: float = _FAILURE_RATE,
        vocabulary_size: int = _VOCABULARY_SIZE,
        **kwargs: Any,
    ) -> None:
        options = {
            "simulate_latency_ms": simulate_latency_ms,
            "simulate_ttft_ms": simulate_ttft_ms,
            "simulate_failure_rate": simulate_failure_rate,
            "vocabulary_size": vocabulary_size,
        }
        options.update({k: kwargs.pop(k) for k in _OPTION_DEFAULTS if k in kwargs})
        unknown = sorted(set(kwargs) - set(_BASE_FIELDS))
        if unknown:
            raise ConfigError(
                f"MockEngineConfig got unknown field(s) {unknown}; valid: "
                f"{sorted({'engine_id', *_BASE_FIELDS, *_OPTION_DEFAULTS})}"
            )
        kwargs.setdefault("mock_mode", True)
        base = EngineConfig(engine_id=engine_id, **kwargs)
        for f in dataclasses.fields(EngineConfig):
            setattr(self, f.name, getattr(base, f.name))
        self._check_base_fields()
        #: whether default_max_tokens was given (it then applies to max_tokens=None)
        self.default_max_tokens_given = "default_max_tokens" in options
        values = {**_OPTION_DEFAULTS, **options}
        self._set_checked(_CHECKS, values)
        if self.kv_memory_bytes is not None and self.kv_num_pages is not None:
            raise ConfigError(
                "MockEngineConfig: give kv_memory_bytes or kv_num_pages, not both "
                f"(got {self.kv_memory_bytes!r} and {self.kv_num_pages!r})"
            )
        for name in _FLAGS:  # every bool field, the base ones included
            setattr(self, name, _flag(name, values.get(name, getattr(self, name))))
        self._set_checked(_LATE_CHECKS, values)
        if self.provider is not None:
            from sagellm_backend.engine._plugin import is_backend_provider

            if not is_backend_provider(self.provider):
                raise ConfigError(
                    "MockEngineConfig.provider must be a backend provider, "
                    f"got {type(self.provider).__name__}"
                )

    def _set_checked(self, checks: tuple[tuple[str, _Check], ...], values: dict[str, Any]) -> None:
        """Set each field of ``checks`` to its checked (normalised) value from ``values``."""
        for name, check in checks:
            setattr(self, name, check(name, values[name]))

    def _check_base_fields(self) -> None:
        """Check the :class:`EngineConfig` fields (the flags are checked with the others)."""
        check_text(_field("engine_id"), self.engine_id)
        check_text(_field("device"), self.device, strip=False)
        _int(1)("max_batch_size", self.max_batch_size)
        if self.model_path is not None and not isinstance(self.model_path, str):
            raise invalid(_field("model_path"), "a string or None", self.model_path)
        if not isinstance(self.metadata, dict):
            raise invalid(_field("metadata"), "a dict", self.metadata)

    def engine_options(self) -> EngineOptions:
        """The shared :class:`~sagellm_backend.engine.options.EngineOptions` this config sets.

        ``kv_memory_bytes`` is the engines' ``kv_cache_memory_bytes``; prefix caching,
        ``max_model_len`` and ``max_input_tokens`` keep their names. The other options are
        at their defaults (the mock's KV geometry comes from ``kv_spec``).
        """
        return EngineOptions(
            kv_cache_memory_bytes=self.kv_memory_bytes,
            enable_prefix_caching=self.enable_prefix_caching,
            max_model_len=self.max_model_len,
            max_input_tokens=self.max_input_tokens,
        )


#: Default of every MockEngineConfig option (a field that is not an EngineConfig field).
_OPTION_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(MockEngineConfig) if f.name not in _BASE_FIELDS
}
#: The bool fields (base ones included), in declaration order.
_FLAGS = tuple(f.name for f in dataclasses.fields(MockEngineConfig) if f.type in ("bool", bool))
#: Names of the MockEngineConfig options (its fields that are not EngineConfig fields).
OPTION_FIELDS = tuple(_OPTION_DEFAULTS)
