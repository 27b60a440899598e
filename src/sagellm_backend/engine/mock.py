"""MockEngine: a faithful, dependency-free simulation of a continuous-batching engine.

What is simulated, and what is real:

* **Real**: the step loop (one asyncio task per engine) that admits queued requests up to
  ``max_batch_size`` per step, so queueing shows up in TTFT; KV accounting through the
  provider's :class:`~sagellm_backend.kv.manager.KVCacheManager` (pages, prefix reuse,
  eviction); every Metrics field, built by :func:`~sagellm_backend.engine.metrics.build_metrics`
  from recorded instants; cancellation, ``stop()`` and bad-input handling.
* **Simulated**: the model. A prompt is tokenized by :class:`MockTokenizer` (deterministic,
  lossless); output token ``i`` of a prompt is a pure function of the prompt and ``i``
  (``temperature``/``top_p`` are validated but do not change it); a
  step takes ``simulate_ttft_ms`` when it prefills and ``simulate_latency_ms`` when it
  decodes (plus seeded jitter and injected slow steps). Zero latency is allowed.

Invariants:
    * ``max_tokens`` is honoured exactly (finish ``"length"``) unless ``eos_probability > 0``
      makes the sequence end early with EOS (finish ``"stop"``; EOS is not in the output).
    * KV admission waits while the pool is full (the request stays queued) and fails only a
      request that can never fit (``RESOURCE_EXHAUSTED``).
    * A cancelled request (``execute`` task cancelled, stream closed or abandoned) releases
      its KV pages on the loop's next step; ``stop()`` ends every request in flight with a
      terminal ``finish_reason="error"`` result and leaves the KV pool empty.
    * Faults (``simulate_failure_rate``, ``fail_at_start``, slow steps) come from a
      ``random.Random(seed)``, so a run with the same arrivals repeats exactly.

Metrics: times from :class:`~sagellm_backend.engine.metrics.RequestTimeline` (prefill_ms and
decode_ms are the measured durations of the steps the request took part in); the KV fields
from the manager's per-request stats at completion; ``peak_mem_mb`` is the peak of the
engine's KV pool use (the only memory a simulated model has); ``error_rate`` over every
request this engine finished. Generated tokens reach the KV manager once per page (pages are
allocated exactly when needed), so mid-flight token counts in ``get_info()["kv"]`` may lag by
less than one page per running request; per-request figures at completion are exact.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagellm_protocol import Error, ErrorCode, Request, Response
from sagellm_protocol import Metrics as Metrics  # 0.1.1.2 export
from sagellm_protocol import StreamEventDelta as StreamEventDelta  # 0.1.1.2 export
from sagellm_protocol import StreamEventEnd as StreamEventEnd  # 0.1.1.2 export
from sagellm_protocol import StreamEventStart as StreamEventStart  # 0.1.1.2 export

from sagellm_backend.engine._plugin import (
    core_component_trace,
    is_backend_provider,
    normalize_engine_config,
)
from sagellm_backend.engine._streaming import (
    FinishReason,
    TokenChannel,
    delta_event,
    end_event,
    error_response,
    start_event,
    validate_request,
)
from sagellm_backend.engine.base import BaseEngine, EngineConfig, StreamEvent
from sagellm_backend.engine.metrics import (
    ErrorRateCounter,
    KVRequestStats,
    RequestTimeline,
    build_metrics,
    now,
)
from sagellm_backend.errors import (
    BackendNotAvailableError,
    ConfigError,
    KVCacheExhaustedError,
    to_protocol_error,
)

if TYPE_CHECKING:
    from sagellm_backend.kv.manager import KVCacheManager
    from sagellm_backend.kv.spec import KVSpec

__all__ = [
    "ENV_MOCK_OPTIONS",
    "MockEngine",
    "MockEngineConfig",
    "MockTokenizer",
    "create_mock_engine",
]

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
_MIB = 1 << 20


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a fast, well-distributed 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _letters(index: int) -> str:
    """Bijective base-26 word for ``index >= 0`` ("a".."z", "aa".."zz", "aaa"..)."""
    n = index + 1
    out: list[str] = []
    while n:
        n, r = divmod(n - 1, 26)
        out.append(chr(97 + r))
    return "".join(reversed(out))


_WORDS_PER_FORM = 26 + 26**2 + 26**3  # words of 1-3 lowercase letters


@functools.lru_cache(maxsize=8)
def _word_table(num_words: int) -> tuple[tuple[str, ...], dict[str, int]]:
    """Word pieces by index and their ids (shared by tokenizers of one size; read-only)."""
    pieces = tuple(
        (" " + _letters(i) if i < _WORDS_PER_FORM else _letters(i - _WORDS_PER_FORM))
        for i in range(num_words)
    )
    offset = MockTokenizer.WORD_OFFSET
    return pieces, {p: offset + i for i, p in enumerate(pieces)}


# Response's own pydantic-core validator (the one ``Response(**kw)`` runs), called directly.
_validate_response = Response.__pydantic_validator__.validate_python

# A piece is a word (" ?[a-z]{1,3}", looked up) or a maximal run of characters that cannot
# start a word (neither a letter nor a space before a letter), which is byte-encoded whole:
# the same ids as splitting that run into single characters, with one regex match.
_PIECE_RE = re.compile(r" ?[a-z]{1,3}|(?:[^a-z ]| (?![a-z]))+")
_CHUNK_CACHE_SIZE = 1 << 16


class MockTokenizer:
    """Deterministic, lossless tokenizer of a fixed synthetic vocabulary.

    Layout: ``0`` pad, ``1`` bos, ``2`` eos, ``3..258`` the 256 byte values, then words of
    one to three lowercase ASCII letters with a leading space (``" ab"``), then the same
    words without it, as far as ``vocab_size`` allows. Text is split greedily into such
    words; everything else falls back to UTF-8 bytes.

    Invariants: ``decode(encode(text)) == text`` for every ``str``; the output tokens the
    mock engine generates are spaced words, so ``encode(decode(ids)) == ids`` for them.
    """

    PAD_ID = 0
    BOS_ID = 1
    EOS_ID = 2
    BYTE_OFFSET = 3
    WORD_OFFSET = 3 + 256
    MIN_VOCAB_SIZE = 512

    def __init__(self, vocab_size: int = 32000) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise ConfigError(f"vocabulary_size must be an int, got {vocab_size!r}")
        if vocab_size < self.MIN_VOCAB_SIZE:
            raise ConfigError(
                f"vocabulary_size must be >= {self.MIN_VOCAB_SIZE} (3 special + 256 byte "
                f"tokens + words), got {vocab_size}"
            )
        self.vocab_size = vocab_size
        num_words = min(vocab_size - self.WORD_OFFSET, 2 * _WORDS_PER_FORM)
        self._pieces, self._piece_to_id = _word_table(num_words)
        self._chunk_cache: dict[str, tuple[int, ...]] = {}
        #: number of spaced-word ids, from which output tokens are drawn
        self.num_output_words = min(num_words, _WORDS_PER_FORM)

    def encode(self, text: str) -> list[int]:
        """Tokenize ``text`` (no special tokens added).

        A piece never spans a space other than its first character, so the text is split
        before every space and each chunk is tokenized on its own (and memoised, as word
        caches in real tokenizers do); the result equals tokenizing the whole text.
        """
        ids: list[int] = []
        cache = self._chunk_cache
        first = True
        for part in text.split(" "):
            chunk = part if first else " " + part
            first = False
            if not chunk:
                continue
            cached = cache.get(chunk)
            if cached is None:
                cached = self._encode_chunk(chunk)
                if len(cache) >= _CHUNK_CACHE_SIZE:
                    cache.clear()
                cache[chunk] = cached
            ids.extend(cached)
        return ids

    def _encode_chunk(self, text: str) -> tuple[int, ...]:
        ids: list[int] = []
        lookup = self._piece_to_id.get
        byte_id = _BYTE_IDS.__getitem__
        for piece in _PIECE_RE.findall(text):
            tid = lookup(piece)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(map(byte_id, piece.encode("utf-8", "surrogatepass")))
        return tuple(ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Detokenize ``ids`` (special tokens are dropped).

        Raises:
            ValueError: an id is outside ``[0, vocab_size)``.
        """
        parts: list[str] = []
        buf = bytearray()
        for tid in ids:
            if not 0 <= tid < self.vocab_size:
                raise ValueError(f"token id {tid} outside the vocabulary [0, {self.vocab_size})")
            if self.BYTE_OFFSET <= tid < self.WORD_OFFSET:
                buf.append(tid - self.BYTE_OFFSET)
                continue
            if buf:
                parts.append(buf.decode("utf-8", "surrogatepass"))
                buf.clear()
            if tid >= self.WORD_OFFSET and tid - self.WORD_OFFSET < len(self._pieces):
                parts.append(self._pieces[tid - self.WORD_OFFSET])
        if buf:
            parts.append(buf.decode("utf-8", "surrogatepass"))
        return "".join(parts)

    def token_text(self, token_id: int) -> str:
        """Text of one generated (word) token."""
        return self._pieces[token_id - self.WORD_OFFSET]


#: byte value -> its token id (read by MockTokenizer._encode_chunk)
_BYTE_IDS = tuple(range(MockTokenizer.BYTE_OFFSET, MockTokenizer.BYTE_OFFSET + 256))


_CONFIG_FIELDS = (
    "simulate_latency_ms",
    "simulate_ttft_ms",
    "simulate_failure_rate",
    "vocabulary_size",
    "jitter_ms",
    "seed",
    "default_max_tokens",
    "max_input_tokens",
    "max_output_tokens",
    "eos_probability",
    "kv_spec",
    "kv_memory_bytes",
    "kv_num_pages",
    "enable_prefix_caching",
    "fail_at_start",
    "slow_step_every",
    "slow_step_ms",
    "strict_model",
    "component_trace",
)
_BASE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig))
DEFAULT_KV_NUM_PAGES = 2048


def _check_float(name: str, value: Any, lo: float, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"MockEngineConfig.{name} must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        rng = f">= {lo}" if hi == math.inf else f"in [{lo}, {hi}]"
        raise ConfigError(f"MockEngineConfig.{name} must be {rng}, got {value!r}")
    return float(value)


def _check_int(name: str, value: Any, lo: int, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        none = " or None" if optional else ""
        raise ConfigError(f"MockEngineConfig.{name} must be an int >= {lo}{none}, got {value!r}")
    return value


def _check_bool(name: str, value: Any) -> None:
    # Strict: 1, "yes" or None are not flags (a truthy string would silently enable a mode).
    if not isinstance(value, bool):
        raise ConfigError(f"MockEngineConfig.{name} must be a bool (True/False), got {value!r}")


def _bool_fields(cls: type[EngineConfig]) -> tuple[str, ...]:
    """Names of the dataclass fields of ``cls`` annotated ``bool`` (base class included)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.type in ("bool", bool))


@dataclass(init=False)
class MockEngineConfig(EngineConfig):
    """Configuration of :class:`MockEngine` (0.1.1.2 constructor kept, options added).

    Positional/0.1.1.2 arguments: ``engine_id``, ``simulate_latency_ms`` (per output token
    after the first), ``simulate_ttft_ms`` (prefill step), ``simulate_failure_rate``
    (probability a request fails), ``vocabulary_size``; ``**kwargs`` take the
    :class:`~sagellm_backend.engine.base.EngineConfig` fields (model_path, device,
    max_batch_size, mock_mode, provider, metadata).

    Keyword options:
        jitter_ms: uniform random extra time ``[0, jitter_ms]`` per step.
        seed: seed of the jitter/fault random generator.
        default_max_tokens: used for a request whose ``max_tokens`` is None.
        max_input_tokens / max_output_tokens: limits; a request beyond them gets an
            INVALID_ARGUMENT error result.
        eos_probability: chance that a generated token is EOS (0 = never; deterministic per
            prompt and position).
        kv_spec: KV geometry (default: 4 layers x 2 kv heads x 64 head dim, fp16, page 16).
        kv_memory_bytes / kv_num_pages: KV pool size (default 2048 pages).
        enable_prefix_caching: reuse cached full blocks of a repeated prompt prefix.
        fail_at_start: ``start()`` raises BackendNotAvailableError.
        slow_step_every / slow_step_ms: every N-th step takes ``slow_step_ms`` longer.
        strict_model: a request whose ``model`` differs from ``model_path`` is rejected.
        component_trace: override of the Metrics.component_trace this engine reports.
    """

    simulate_latency_ms: float = 10.0
    simulate_ttft_ms: float = 50.0
    simulate_failure_rate: float = 0.0
    vocabulary_size: int = 32000
    jitter_ms: float = 0.0
    seed: int | None = 0
    default_max_tokens: int = 128
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    eos_probability: float = 0.0
    kv_spec: KVSpec | None = None
    kv_memory_bytes: int | None = None
    kv_num_pages: int | None = None
    enable_prefix_caching: bool = True
    fail_at_start: bool = False
    slow_step_every: int = 0
    slow_step_ms: float = 0.0
    strict_model: bool = False
    component_trace: list[str] | None = None

    def __init__(
        self,
        engine_id: str,
        simulate_latency_ms: float = 10.0,
        simulate_ttft_ms: float = 50.0,
        simulate_failure_rate: float = 0.0,
        vocabulary_size: int = 32000,
        *,
        jitter_ms: float = 0.0,
        seed: int | None = 0,
        default_max_tokens: int = 128,
        max_input_tokens: int | None = None,
        max_output_tokens: int | None = None,
        eos_probability: float = 0.0,
        kv_spec: KVSpec | None = None,
        kv_memory_bytes: int | None = None,
        kv_num_pages: int | None = None,
        enable_prefix_caching: bool = True,
        fail_at_start: bool = False,
        slow_step_every: int = 0,
        slow_step_ms: float = 0.0,
        strict_model: bool = False,
        component_trace: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - set(_BASE_FIELDS))
        if unknown:
            raise ConfigError(
                f"MockEngineConfig got unknown field(s) {unknown}; valid: "
                f"{sorted({'engine_id', *_BASE_FIELDS, *_CONFIG_FIELDS})}"
            )
        kwargs.setdefault("mock_mode", True)
        base = EngineConfig(engine_id=engine_id, **kwargs)
        for f in dataclasses.fields(EngineConfig):
            setattr(self, f.name, getattr(base, f.name))
        if not isinstance(engine_id, str) or not engine_id.strip():
            raise ConfigError(
                f"MockEngineConfig.engine_id must be a non-empty string, got {engine_id!r}"
            )
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(
                f"MockEngineConfig.device must be a non-empty string, got {self.device!r}"
            )
        _check_int("max_batch_size", self.max_batch_size, 1)
        if self.model_path is not None and not isinstance(self.model_path, str):
            raise ConfigError(
                f"MockEngineConfig.model_path must be a string or None, got {self.model_path!r}"
            )
        if not isinstance(self.metadata, dict):
            raise ConfigError(f"MockEngineConfig.metadata must be a dict, got {self.metadata!r}")
        self.simulate_latency_ms = _check_float("simulate_latency_ms", simulate_latency_ms, 0.0)
        self.simulate_ttft_ms = _check_float("simulate_ttft_ms", simulate_ttft_ms, 0.0)
        self.simulate_failure_rate = _check_float(
            "simulate_failure_rate", simulate_failure_rate, 0.0, 1.0
        )
        vocab = _check_int("vocabulary_size", vocabulary_size, MockTokenizer.MIN_VOCAB_SIZE)
        assert vocab is not None
        self.vocabulary_size = vocab
        self.jitter_ms = _check_float("jitter_ms", jitter_ms, 0.0)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"MockEngineConfig.seed must be an int or None, got {seed!r}")
        self.seed = seed
        dmt = _check_int("default_max_tokens", default_max_tokens, 1)
        assert dmt is not None
        self.default_max_tokens = dmt
        self.max_input_tokens = _check_int("max_input_tokens", max_input_tokens, 1, optional=True)
        self.max_output_tokens = _check_int(
            "max_output_tokens", max_output_tokens, 1, optional=True
        )
        self.eos_probability = _check_float("eos_probability", eos_probability, 0.0, 1.0)
        if kv_spec is not None and not hasattr(kv_spec, "block_size"):
            raise ConfigError(
                f"MockEngineConfig.kv_spec must be a sagellm_backend.kv.KVSpec, got {kv_spec!r}"
            )
        self.kv_spec = kv_spec
        self.kv_memory_bytes = _check_int("kv_memory_bytes", kv_memory_bytes, 1, optional=True)
        self.kv_num_pages = _check_int("kv_num_pages", kv_num_pages, 1, optional=True)
        if kv_memory_bytes is not None and kv_num_pages is not None:
            raise ConfigError(
                "MockEngineConfig: give kv_memory_bytes or kv_num_pages, not both "
                f"(got {kv_memory_bytes!r} and {kv_num_pages!r})"
            )
        self.enable_prefix_caching = enable_prefix_caching
        self.fail_at_start = fail_at_start
        self.strict_model = strict_model
        for name in _bool_fields(type(self)):  # every bool field, the base ones included
            _check_bool(name, getattr(self, name))
        sse = _check_int("slow_step_every", slow_step_every, 0)
        assert sse is not None
        self.slow_step_every = sse
        self.slow_step_ms = _check_float("slow_step_ms", slow_step_ms, 0.0)
        if component_trace is not None and (
            not isinstance(component_trace, list)
            or not all(isinstance(c, str) for c in component_trace)
        ):
            raise ConfigError(
                f"MockEngineConfig.component_trace must be a list of str, got {component_trace!r}"
            )
        self.component_trace = component_trace
        if self.provider is not None and not is_backend_provider(self.provider):
            raise ConfigError(
                "MockEngineConfig.provider must be a backend provider, "
                f"got {type(self.provider).__name__}"
            )


@dataclass(eq=False, slots=True)
class _Seq:
    """One request inside the engine (owned by the step loop once queued)."""

    request: Request
    seq_id: str
    prompt_ids: list[int]
    max_tokens: int
    prompt_hash: int
    channel: TokenChannel
    timeline: RequestTimeline = field(default_factory=RequestTimeline)
    fail: bool = False
    need_pages: int = 0
    held_pages: int = 0
    kv_tokens: int = 0
    pending: list[int] = field(default_factory=list)
    has_kv: bool = False
    prefilled: bool = False


class MockEngine(BaseEngine):
    """Continuous-batching engine over a simulated model (see the module docstring).

    Example:
        >>> import asyncio
        >>> from sagellm_protocol import Request
        >>> async def main() -> str:
        ...     engine = MockEngine(MockEngineConfig("m0", 0.0, 0.0))
        ...     await engine.start()
        ...     req = Request(request_id="r1", trace_id="t1", model="mock", prompt="hi",
        ...                   max_tokens=3, stream=False)
        ...     resp = await engine.execute(req)
        ...     await engine.stop()
        ...     return resp.finish_reason
        >>> asyncio.run(main())
        'length'
    """

    def __init__(self, config: MockEngineConfig | EngineConfig) -> None:
        if not isinstance(config, MockEngineConfig):
            if not isinstance(config, EngineConfig):
                raise ConfigError(
                    f"MockEngine needs a MockEngineConfig, got {type(config).__name__}"
                )
            base = {f.name: getattr(config, f.name) for f in dataclasses.fields(EngineConfig)}
            config = MockEngineConfig(**base)
        super().__init__(config)
        self._cfg: MockEngineConfig = config
        self.tokenizer = MockTokenizer(config.vocabulary_size)
        self._trace = (
            list(config.component_trace)
            if config.component_trace is not None
            else core_component_trace(type(self).__name__, False)
        )
        self._provider: Any = config.provider
        self._kv: KVCacheManager | None = None
        self._rng = random.Random(config.seed)
        self._errors = ErrorRateCounter()
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._batch: list[_Seq] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reserved_pages = 0
        self._seq_counter = 0
        self._step_count = 0
        # set by _cancel: some channel may have been cancelled since the last batch scan
        self._cancel_seen = False
        self._peak_kv_bytes = 0
        self._counts = {"completed": 0, "failed": 0, "cancelled": 0}

    # ------------------------------------------------------------------ class info
    @classmethod
    def backend_type(cls) -> str:
        """Kind served: ``"mock"``."""
        return "mock"

    @classmethod
    def is_available(cls) -> bool:
        """Always available (no dependencies)."""
        return True

    @classmethod
    def priority(cls) -> int:
        """0, as in 0.1.1.x (EngineFactory never auto-selects the mock anyway)."""
        return 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def provider(self) -> Any:
        """The backend provider whose KV manager this engine uses (after start)."""
        return self._provider

    @property
    def kv_manager(self) -> KVCacheManager | None:
        """The engine's KV cache manager while running (None before start and after stop)."""
        return self._kv

    async def start(self) -> None:
        """Create the KV manager (from the provider) and the step loop.

        Raises:
            BackendNotAvailableError: ``fail_at_start`` is set (injected fault).
            RuntimeError: already running.
        """
        if self._running:
            raise RuntimeError(f"MockEngine {self.engine_id!r} is already running")
        if self._cfg.fail_at_start:
            raise BackendNotAvailableError(
                f"MockEngine {self.engine_id!r}: injected failure at start (fail_at_start=True)"
            )
        if self._kv is None:
            self._kv = self._create_kv_manager()
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._running = True
        self._loop_task = self._loop.create_task(
            self._step_loop(), name=f"MockEngine[{self.engine_id}].step_loop"
        )

    async def stop(self) -> None:
        """End every request in flight with an error result, stop the loop, free KV.

        The KV manager goes back to the provider (``release_kv_manager``), so its pages
        return to the provider's memory budget; ``start()`` creates a new one.
        """
        if not self._running:
            return
        self._running = False
        task = self._loop_task
        self._loop_task = None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        stopped = Error(
            code=ErrorCode.UNAVAILABLE,
            message=f"MockEngine {self.engine_id!r} stopped before the request finished",
            retryable=True,
        )
        pending = [*self._batch, *self._waiting]
        self._batch.clear()
        self._waiting.clear()
        for seq in pending:
            if seq.channel.cancelled:
                self._release(seq)
                self._counts["cancelled"] += 1
            else:
                self._finish(seq, "error", stopped)
        self._reserved_pages = 0
        self._release_kv_manager()

    def _release_kv_manager(self) -> None:
        """Give the (now empty) KV pool back to the provider's memory budget."""
        kv, self._kv = self._kv, None
        release = getattr(self._provider, "release_kv_manager", None)
        if kv is not None and callable(release):
            try:
                release(kv)
            except Exception:  # keep stopping; the provider reports its own state
                logger.warning(
                    "MockEngine %r: provider refused to release its KV manager",
                    self.engine_id,
                    exc_info=True,
                )

    def _create_kv_manager(self) -> KVCacheManager:
        from sagellm_backend.kv.spec import KVSpec

        cfg = self._cfg
        spec = cfg.kv_spec or KVSpec(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16)
        if self._provider is None:
            from sagellm_backend.providers.mock import MockBackendProvider

            self._provider = MockBackendProvider()
        num_pages = cfg.kv_num_pages
        if num_pages is None and cfg.kv_memory_bytes is None:
            num_pages = DEFAULT_KV_NUM_PAGES
        create = getattr(self._provider, "create_kv_manager", None)
        if callable(create):
            manager: KVCacheManager = create(
                spec,
                memory_bytes=cfg.kv_memory_bytes,
                num_pages=num_pages,
                enable_prefix_caching=cfg.enable_prefix_caching,
            )
            return manager
        # A third-party provider without a KV manager: account pages ourselves.
        from sagellm_backend.kv.block_pool import BlockPool
        from sagellm_backend.kv.manager import KVCacheManager

        if num_pages is None:
            assert cfg.kv_memory_bytes is not None
            num_pages = cfg.kv_memory_bytes // spec.page_bytes
            if num_pages < 1:
                raise ConfigError(
                    f"MockEngineConfig.kv_memory_bytes={cfg.kv_memory_bytes} is smaller than one "
                    f"KV page ({spec.page_bytes} bytes)"
                )
        pool = BlockPool(
            num_pages, page_bytes=spec.page_bytes, enable_caching=cfg.enable_prefix_caching
        )
        return KVCacheManager(pool, spec, enable_prefix_caching=cfg.enable_prefix_caching)

    # ------------------------------------------------------------------ public API
    async def execute(self, request: Request) -> Response:
        """Run ``request`` to completion (bad input -> ``finish_reason="error"``).

        Raises:
            RuntimeError: the engine is not running, or called from another event loop.
        """
        seq, early = self._submit(request, streaming=False)
        if seq is None:
            assert early is not None
            return early
        channel = seq.channel
        try:
            if not channel.finished:
                assert self._loop is not None  # _submit checked we run on it
                await channel.finished_future(self._loop)
        except asyncio.CancelledError:
            self._cancel(seq)
            raise
        assert channel.metrics is not None
        request = seq.request
        # Response's own validator (what Response(**kw) runs) on a prepared dict; it copies
        # output_tokens, so the channel's list is never shared with the result.
        response: Response = _validate_response(
            {
                "request_id": request.request_id,
                "trace_id": request.trace_id,
                "output_text": "".join(channel.texts),
                "output_tokens": channel.tokens,
                "finish_reason": channel.finish_reason,
                "metrics": channel.metrics,
                "error": channel.error,
            }
        )
        return response

    def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        """Yield start, deltas and end for ``request`` (see :mod:`engine.base` invariants).

        Raises:
            RuntimeError: (on first iteration) the engine is not running.
        """
        return self._stream(request)

    async def _stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        seq, early = self._submit(request, streaming=True)
        eid = self.engine_id
        if seq is None:
            assert early is not None
            yield start_event(request, eid, None)
            yield end_event(
                request,
                eid,
                output_text=early.output_text,
                output_tokens=early.output_tokens,
                finish_reason="error",
                metrics=early.metrics,
                error=early.error,
            )
            return
        channel = seq.channel
        sent = 0
        try:
            yield start_event(request, eid, len(seq.prompt_ids))
            while True:
                produced = len(channel.tokens)
                if produced > sent:
                    chunk = "".join(channel.texts[sent:produced])
                    ids = channel.tokens[sent:produced]
                    sent = produced
                    yield delta_event(request, eid, chunk, ids)
                    continue
                if channel.finished:
                    assert channel.metrics is not None
                    yield end_event(
                        request,
                        eid,
                        output_text=channel.text,
                        output_tokens=list(channel.tokens),
                        finish_reason=channel.finish_reason,
                        metrics=channel.metrics,
                        error=channel.error,
                    )
                    return
                await channel.wait_progress()
        finally:
            if not channel.finished:
                self._cancel(seq)

    def get_info(self) -> dict[str, Any]:
        """Engine description plus simulation settings, counters and KV stats."""
        info = super().get_info()
        cfg = self._cfg
        info.update(
            simulate_latency_ms=cfg.simulate_latency_ms,
            simulate_ttft_ms=cfg.simulate_ttft_ms,
            simulate_failure_rate=cfg.simulate_failure_rate,
            jitter_ms=cfg.jitter_ms,
            vocabulary_size=cfg.vocabulary_size,
            steps=self._step_count,
            waiting=len(self._waiting),
            running=len(self._batch),
            **self._counts,
        )
        if self._kv is not None:
            stats = self._kv.stats()
            is_dc = dataclasses.is_dataclass(stats) and not isinstance(stats, type)
            info["kv"] = dataclasses.asdict(stats) if is_dc else stats
        return info

    # ------------------------------------------------------------------ submission
    def _check_loop(self) -> None:
        if not self._running:
            raise RuntimeError(f"MockEngine {self.engine_id!r} is not running; call start()")
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(
                f"MockEngine {self.engine_id!r} serves the event loop it was started on; "
                "it was called from another loop"
            )

    def _error_result(self, request: Any, exc: BaseException) -> Response:
        timeline = RequestTimeline()
        metrics = build_metrics(
            timeline,
            error_rate=self._errors.record(True),
            peak_mem_mb=self._peak_kv_bytes // _MIB,
            component_trace=self._trace,
        )
        self._counts["failed"] += 1
        return error_response(request, to_protocol_error(exc), metrics)

    def _submit(self, request: Request, *, streaming: bool) -> tuple[_Seq | None, Response | None]:
        """Validate and enqueue; returns (seq, None) or (None, terminal error response)."""
        self._check_loop()
        cfg = self._cfg
        try:
            max_tokens = validate_request(request, default_max_tokens=cfg.default_max_tokens)
            if cfg.max_output_tokens is not None and max_tokens > cfg.max_output_tokens:
                raise ConfigError(
                    f"request.max_tokens={max_tokens} exceeds the engine's max_output_tokens="
                    f"{cfg.max_output_tokens}"
                )
            if cfg.strict_model and cfg.model_path and request.model != cfg.model_path:
                raise ConfigError(
                    f"request.model={request.model!r} is not served by this engine "
                    f"(model {cfg.model_path!r})"
                )
            prompt_ids = self.tokenizer.encode(request.prompt)
            if cfg.max_input_tokens is not None and len(prompt_ids) > cfg.max_input_tokens:
                raise ConfigError(
                    f"request.prompt has {len(prompt_ids)} tokens, more than the engine's "
                    f"max_input_tokens={cfg.max_input_tokens}"
                )
        except ConfigError as exc:
            return None, self._error_result(request, exc)
        digest = hashlib.blake2b(request.prompt.encode("utf-8", "surrogatepass"), digest_size=8)
        self._seq_counter += 1
        seq = _Seq(
            request=request,
            seq_id=f"{request.request_id}#{self._seq_counter}",
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            prompt_hash=int.from_bytes(digest.digest(), "little"),
            channel=TokenChannel(streaming=streaming),
        )
        self._waiting.append(seq)
        assert self._wakeup is not None
        self._wakeup.set()
        return seq, None

    def _cancel(self, seq: _Seq) -> None:
        """Consumer gave up: the loop frees the request on its next step."""
        if seq.channel.finished:
            return
        seq.channel.cancel()
        self._cancel_seen = True
        if self._wakeup is not None:
            self._wakeup.set()
        if not self._running:  # stopped: nothing else will clean up
            self._release(seq)

    # ------------------------------------------------------------------ step loop
    async def _step_loop(self) -> None:
        wakeup = self._wakeup
        assert wakeup is not None
        while True:
            if not self._waiting and not self._batch:
                wakeup.clear()
                await wakeup.wait()
                continue
            try:
                self._drop_cancelled()
                self._admit()
                if not self._batch:
                    continue
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not hang consumers: fail the batch
                failed = Error(
                    code=ErrorCode.UNAVAILABLE,
                    message=f"MockEngine step failed: {type(exc).__name__}: {exc}",
                    retryable=True,
                )
                logger.exception("MockEngine %r: step failed", self.engine_id)
                for seq in self._batch:
                    if not seq.channel.finished:
                        self._finish(seq, "error", failed)
                self._batch.clear()

    def _drop_cancelled(self) -> None:
        # Only _cancel cancels a channel, and it sets _cancel_seen: no scan without one.
        if self._cancel_seen:
            self._cancel_seen = False
            self._drop_cancelled_running()
        while self._waiting and self._waiting[0].channel.cancelled:
            self._waiting.popleft()
            self._counts["cancelled"] += 1

    def _drop_cancelled_running(self) -> None:
        if any(s.channel.cancelled for s in self._batch):
            keep: list[_Seq] = []
            for seq in self._batch:
                if seq.channel.cancelled:
                    self._release(seq)
                    self._counts["cancelled"] += 1
                else:
                    keep.append(seq)
            self._batch = keep

    def _admit(self) -> None:
        """Move queued requests into the batch while slots and KV pages allow (FIFO)."""
        kv = self._kv
        assert kv is not None
        block_size = kv.spec.block_size
        total_pages = kv.pool.num_pages
        cfg = self._cfg
        limit = cfg.max_batch_size
        failure_rate = cfg.simulate_failure_rate
        waiting = self._waiting
        batch = self._batch
        while waiting and len(batch) < limit:
            seq = waiting[0]
            if seq.channel.cancelled:
                waiting.popleft()
                self._counts["cancelled"] += 1
                continue
            # KV held at the end: prompt + every output token but the last.
            final_tokens = len(seq.prompt_ids) + seq.max_tokens - 1
            need = -(-final_tokens // block_size)
            if need > total_pages:
                self._waiting.popleft()
                self._finish(
                    seq,
                    "error",
                    Error(
                        code=ErrorCode.RESOURCE_EXHAUSTED,
                        message=(
                            f"request needs {need} KV pages ({len(seq.prompt_ids)} prompt + "
                            f"{seq.max_tokens} max_tokens tokens, {block_size} per page) but "
                            f"the pool holds {total_pages}"
                        ),
                        retryable=False,
                    ),
                )
                continue
            if not kv.can_allocate((need + self._reserved_pages) * block_size):
                if batch:
                    return  # wait for running requests to free pages
                # Nothing running can free pages: the pool is held elsewhere.
                self._waiting.popleft()
                self._finish(
                    seq,
                    "error",
                    Error(
                        code=ErrorCode.RESOURCE_EXHAUSTED,
                        message=f"KV pool exhausted: {need} pages needed, none can be freed",
                        retryable=True,
                    ),
                )
                continue
            try:
                kv.allocate(seq.seq_id, seq.prompt_ids)
            except KVCacheExhaustedError as exc:
                if batch:
                    return
                waiting.popleft()
                self._finish(seq, "error", exc.to_protocol())
                continue
            waiting.popleft()
            seq.has_kv = True
            seq.kv_tokens = prompt_len = len(seq.prompt_ids)
            seq.held_pages = held = -(-prompt_len // block_size)
            seq.need_pages = need
            self._reserved_pages += need - held
            if failure_rate > 0:
                seq.fail = self._rng.random() < failure_rate
            tl = seq.timeline
            if tl.scheduled is None:  # RequestTimeline.mark_scheduled, inlined
                tl.scheduled = now()
            batch.append(seq)

    def _step_seconds(self, prefill: bool, decode: bool) -> float:
        cfg = self._cfg
        ms = (cfg.simulate_ttft_ms if prefill else 0.0) + (
            cfg.simulate_latency_ms if decode else 0.0
        )
        if cfg.jitter_ms > 0:
            ms += self._rng.uniform(0.0, cfg.jitter_ms)
        if cfg.slow_step_every and self._step_count % cfg.slow_step_every == 0:
            ms += cfg.slow_step_ms
        return ms / 1000.0

    async def _step(self) -> None:
        self._step_count += 1
        batch = self._batch
        states = {s.prefilled for s in batch}  # one scan for both questions
        any_prefill = False in states
        any_decode = True in states
        t0 = now()
        await asyncio.sleep(self._step_seconds(any_prefill, any_decode))
        t1 = now()
        elapsed_ms = (t1 - t0) * 1000.0
        self._drop_cancelled()
        kv = self._kv
        assert kv is not None
        block_size = kv.spec.block_size
        caching = self._cfg.enable_prefix_caching
        eos_p = self._cfg.eos_probability
        tok = self.tokenizer
        n_words = tok.num_output_words
        pieces = tok._pieces
        word_offset = MockTokenizer.WORD_OFFSET
        mark_computed = kv.mark_computed
        keep: list[_Seq] = []
        for seq in self._batch:
            tl = seq.timeline
            if not seq.prefilled:
                seq.prefilled = True
                tl.prefill_ms += elapsed_ms
                if caching:
                    mark_computed(seq.seq_id, len(seq.prompt_ids))
                if seq.fail:
                    self._finish(
                        seq,
                        "error",
                        Error(
                            code=ErrorCode.UNAVAILABLE,
                            message=(
                                "injected failure (simulate_failure_rate="
                                f"{self._cfg.simulate_failure_rate})"
                            ),
                            retryable=True,
                        ),
                    )
                    continue
            else:
                tl.decode_ms += elapsed_ms
            channel = seq.channel
            tokens = channel.tokens
            pos = len(tokens)
            # h = _mix64(seq.prompt_hash ^ (pos * 0x9E3779B97F4A7C15 & _MASK64)), inlined
            x = ((seq.prompt_hash ^ (pos * 0x9E3779B97F4A7C15 & _MASK64)) + 0x9E3779B97F4A7C15) & (
                _MASK64
            )
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
            h = x ^ (x >> 31)
            if eos_p > 0 and (_mix64(h) >> 11) * (1.0 / (1 << 53)) < eos_p:
                tl.mark_tokens(0, t1)
                self._finish(seq, "stop", None)
                continue
            word = h % n_words
            token = word_offset + word
            # channel.push(token, tok.token_text(token)), inlined: a channel in the batch is
            # never finished (finishing removes it from the batch)
            tokens.append(token)
            channel.texts.append(pieces[word])
            if channel._event is not None:
                channel._event.set()
            tl.token_times.append(t1)  # tl.mark_tokens(1, t1); scheduled was set at admission
            if pos + 1 >= seq.max_tokens:
                self._finish(seq, "length", None)
                continue
            # The token's K/V is written by the next step. It is handed to the KV manager
            # when it needs a new page (then with the tokens pending since the last page)
            # and at the end, so there is one manager call per page, not per token.
            seq.kv_tokens += 1
            pending = seq.pending
            pending.append(token)
            if seq.kv_tokens > seq.held_pages * block_size:
                try:
                    kv.append(seq.seq_id, pending)
                except KVCacheExhaustedError as exc:  # e.g. an injected provider fault
                    self._finish(seq, "error", exc.to_protocol())
                    continue
                pending.clear()
                seq.held_pages += 1
                self._reserved_pages -= 1
            keep.append(seq)
        self._batch = keep
        used = kv.pool.num_used * kv.spec.page_bytes
        if used > self._peak_kv_bytes:
            self._peak_kv_bytes = used

    # ------------------------------------------------------------------ completion
    def _release(self, seq: _Seq, *, discard: bool = False) -> KVRequestStats | None:
        """Free the request's KV pages and reservation; returns its KV stats (idempotent)."""
        if not seq.has_kv:
            return None
        seq.has_kv = False
        self._reserved_pages -= seq.need_pages - seq.held_pages
        kv = self._kv
        assert kv is not None
        return kv.free(seq.seq_id, discard=discard)

    def _finish(self, seq: _Seq, reason: FinishReason, error: Error | None) -> None:
        """Release the request and hand its terminal result to the consumer."""
        failed = reason == "error"
        if seq.has_kv and not failed and seq.kv_tokens > len(seq.prompt_ids):
            kv = self._kv
            assert kv is not None
            if seq.pending:  # fits in the pages already held: no allocation, cannot fail
                kv.append(seq.seq_id, seq.pending)
                seq.pending.clear()
            if self._cfg.enable_prefix_caching:  # the prompt was marked at prefill
                kv.mark_computed(seq.seq_id, seq.kv_tokens)
        kv_stats = self._release(seq, discard=failed)
        metrics = build_metrics(
            seq.timeline,
            error_rate=self._errors.record(failed),
            peak_mem_mb=self._peak_kv_bytes // _MIB,
            kv=kv_stats,
            component_trace=self._trace,
        )
        self._counts["failed" if failed else "completed"] += 1
        seq.channel.finish(reason, metrics, error)


#: Environment variable with MockEngineConfig options (a JSON object) for engines created by
#: :func:`create_mock_engine` from a dict/sagellm-core config. sagellm-core 0.1.x's
#: EngineConfig forbids extra fields, so this is how its CI sets e.g. zero latency.
ENV_MOCK_OPTIONS = "SAGELLM_MOCK_ENGINE_OPTIONS"
_ENV_ALLOWED = frozenset(_CONFIG_FIELDS) - {"kv_spec", "component_trace"}


def _env_options() -> dict[str, Any]:
    raw = os.environ.get(ENV_MOCK_OPTIONS, "").strip()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{ENV_MOCK_OPTIONS} must be a JSON object: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{ENV_MOCK_OPTIONS} must be a JSON object, got {raw!r}")
    unknown = sorted(set(data) - _ENV_ALLOWED)
    if unknown:
        raise ConfigError(
            f"{ENV_MOCK_OPTIONS} has unknown option(s) {unknown}; valid: {sorted(_ENV_ALLOWED)}"
        )
    return data


_MAPPED_EXTRA = set(_CONFIG_FIELDS) | {"mock_mode", "metadata", "engine_id"}


def create_mock_engine(
    config: Any = None, backend: Any = None, *args: Any, **kwargs: Any
) -> MockEngine:
    """``sagellm.engines`` entry point: build a MockEngine from any accepted config.

    Args:
        config: a :class:`MockEngineConfig` (used as is), a sagellm-core 0.1.x
            ``EngineConfig``, a dict (EngineConfig fields plus MockEngineConfig options),
            or None. A string is the 0.1.1.x form
            ``create_mock_engine(engine_id, simulate_latency_ms=10.0, simulate_ttft_ms=50.0,
            **kwargs)``, with ``args``/``kwargs`` passed to :class:`MockEngineConfig`.
        backend: the provider sagellm-core created (its KV manager is used).
        *args: only with the string form (see above).
        **kwargs: only with the string form (see above).

    Raises:
        ConfigError: an unknown or invalid field (the message lists the valid ones).

    For dict/sagellm-core/None configs, options in the JSON object of the environment
    variable ``SAGELLM_MOCK_ENGINE_OPTIONS`` (e.g. ``{"simulate_latency_ms": 0}``) apply first;
    keys of a dict config override them.
    """
    if isinstance(config, str):
        positional = ([] if backend is None else [backend]) + list(args)
        return MockEngine(MockEngineConfig(config, *positional, **kwargs))
    if args or kwargs:
        raise ConfigError(
            "create_mock_engine(config, backend) takes no further arguments unless config is "
            f"an engine_id string; got {len(args)} positional and {sorted(kwargs)} keyword"
        )
    if isinstance(config, MockEngineConfig):
        if backend is not None:
            if not is_backend_provider(backend):
                raise ConfigError(
                    f"create_mock_engine backend must be a provider, got {type(backend).__name__}"
                )
            config = copy.copy(config)
            config.provider = backend
        return MockEngine(config)
    settings = normalize_engine_config(config, backend)
    if settings.kind is not None and settings.kind != "mock":
        raise ConfigError(f"create_mock_engine got engine kind {settings.kind!r}, expected 'mock'")
    unknown = sorted(set(settings.extra) - _MAPPED_EXTRA)
    if unknown:
        raise ConfigError(
            f"mock engine config has unknown field(s) {unknown}; valid: "
            f"{sorted(_MAPPED_EXTRA | {'kind', 'model', 'model_path', 'device', 'max_batch_size'})}"
        )
    options = _env_options()
    options.update({k: v for k, v in settings.extra.items() if k in _CONFIG_FIELDS})
    if settings.max_input_tokens is not None:
        options["max_input_tokens"] = settings.max_input_tokens
    if settings.max_output_tokens is not None:
        options["max_output_tokens"] = settings.max_output_tokens
    options.setdefault(
        "component_trace", core_component_trace(MockEngine.__name__, settings.from_core)
    )
    base: dict[str, Any] = {
        "model_path": settings.model_path,
        "device": settings.device or "mock",
        "provider": settings.provider,
    }
    if settings.max_batch_size is not None:
        base["max_batch_size"] = settings.max_batch_size
    if "mock_mode" in settings.extra:
        base["mock_mode"] = settings.extra["mock_mode"]
    if "metadata" in settings.extra:
        base["metadata"] = settings.extra["metadata"]
    return MockEngine(MockEngineConfig(settings.engine_id, **options, **base))
