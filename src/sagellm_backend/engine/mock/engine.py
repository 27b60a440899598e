"""MockEngine = the shared scheduler + driver + the mock runner (a simulated model).

What is simulated, and what is real:

* **Real**: the continuous-batching scheduler every engine uses
  (:class:`~sagellm_backend.engine.sched.scheduler.Scheduler`: admission up to
  ``max_batch_size``, so queueing shows up in TTFT; KV accounting through the provider's
  :class:`~sagellm_backend.kv.manager.KVCacheManager` with prefix reuse and eviction, pages
  reserved for a request's final length at admission), the one sampler (temperature,
  top_p, top_k, repetition penalty and seed act on the mock as on a real model), the one
  request-validation path (the mock has a context length, ``max_model_len``, and a
  vocabulary, and enforces them), every Metrics field, cancellation, ``stop()`` and
  bad-input handling.
* **Simulated**: the model (:class:`~sagellm_backend.engine.runners.mock.MockRunner`). A
  prompt is tokenized by :class:`MockTokenizer` (deterministic, lossless); greedy output is
  a pure function of the prompt; a step takes ``simulate_ttft_ms`` when it prefills and
  ``simulate_latency_ms`` when it decodes (plus seeded jitter and injected slow steps).
  Zero latency is allowed: steps then run back to back on the event loop.

Invariants:
    * ``max_tokens`` is honoured exactly (finish ``"length"``) unless ``eos_probability > 0``
      makes the sequence end early with EOS (finish ``"stop"``; EOS is not in the output).
    * KV admission waits while the pool is full (the request stays queued) and fails only a
      request that can never fit (``RESOURCE_EXHAUSTED``).
    * A cancelled request releases its KV pages at the driver's next step; ``stop()`` ends
      every request in flight with a terminal ``finish_reason="error"`` result and gives the
      KV pool back to the provider.
    * Faults (``simulate_failure_rate``, ``fail_at_start``, slow steps) come from a
      ``random.Random(seed)``, so a run with the same arrivals repeats exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sagellm_backend.engine._plugin import (
    core_component_trace,
    is_backend_provider,
    normalize_engine_config,
)
from sagellm_backend.engine._streaming import RequestLimits
from sagellm_backend.engine.base import EngineConfig
from sagellm_backend.engine.mock.tokenizer import MockTokenizer
from sagellm_backend.engine.sched.engine import Detokenizer, ScheduledEngine, Serving
from sagellm_backend.errors import BackendNotAvailableError, ConfigError

if TYPE_CHECKING:
    from sagellm_backend.kv.manager import KVCacheManager
    from sagellm_backend.kv.spec import KVSpec

__all__ = [
    "ENV_MOCK_OPTIONS",
    "MockEngine",
    "MockEngineConfig",
    "create_mock_engine",
    "make_mock_serving",
]

#: Most tokens one mock step computes (the mock's steps cost nothing per token).
_MOCK_STEP_TOKENS = 1 << 20


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
    "max_model_len",
)
_BASE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig))
DEFAULT_KV_NUM_PAGES = 2048
#: Context length of the simulated model (prompt + output), unless ``max_model_len`` is set.
DEFAULT_MOCK_CONTEXT = 32768
_UNSET: Any = object()


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
        max_model_len: context length of the simulated model (default 32768): a prompt as
            long is rejected and ``max_tokens`` is capped to what is left, as the HF engines
            do.

    ``default_max_tokens`` applies to a request whose ``max_tokens`` is None only when it is
    given explicitly; otherwise such a request is rejected, as the HF engines reject it.
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
    max_model_len: int = DEFAULT_MOCK_CONTEXT

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
        default_max_tokens: int = _UNSET,
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
        max_model_len: int = DEFAULT_MOCK_CONTEXT,
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
        #: whether default_max_tokens was given (it then applies to max_tokens=None)
        self.default_max_tokens_given = default_max_tokens is not _UNSET
        if default_max_tokens is _UNSET:
            default_max_tokens = 128
        dmt = _check_int("default_max_tokens", default_max_tokens, 1)
        assert dmt is not None
        self.default_max_tokens = dmt
        mml = _check_int("max_model_len", max_model_len, 2)
        assert mml is not None
        self.max_model_len = mml
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


class _MockDetok(Detokenizer):
    """Incremental text of mock tokens (every generated token is a whole word)."""

    __slots__ = ("_decode", "_pieces")

    def __init__(self, tokenizer: MockTokenizer) -> None:
        self._decode = tokenizer.decode
        self._pieces = tokenizer._pieces

    def add(self, ids: list[int]) -> str:
        pieces = self._pieces
        off = MockTokenizer.WORD_OFFSET
        if ids and min(ids) >= off and max(ids) - off < len(pieces):  # words only
            return "".join([pieces[t - off] for t in ids])
        return self._decode(ids)

    def flush(self) -> str:
        return ""


def create_mock_kv_manager(
    provider: Any,
    spec: KVSpec | None,
    *,
    memory_bytes: int | None,
    num_pages: int | None,
    enable_prefix_caching: bool,
) -> tuple[Any, KVCacheManager]:
    """(provider, KV manager) for a mock-model engine; a MockBackendProvider if none given."""
    from sagellm_backend.kv.spec import KVSpec

    spec = spec or KVSpec(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16)
    if provider is None:
        from sagellm_backend.providers.mock import MockBackendProvider

        provider = MockBackendProvider()
    if num_pages is None and memory_bytes is None:
        num_pages = DEFAULT_KV_NUM_PAGES
    create = getattr(provider, "create_kv_manager", None)
    if callable(create):
        manager: KVCacheManager = create(
            spec,
            memory_bytes=memory_bytes,
            num_pages=num_pages,
            enable_prefix_caching=enable_prefix_caching,
        )
        return provider, manager
    # A third-party provider without a KV manager: account pages ourselves.
    from sagellm_backend.kv.block_pool import BlockPool
    from sagellm_backend.kv.manager import KVCacheManager

    if num_pages is None:
        assert memory_bytes is not None
        num_pages = memory_bytes // spec.page_bytes
        if num_pages < 1:
            raise ConfigError(
                f"MockEngineConfig.kv_memory_bytes={memory_bytes} is smaller than one "
                f"KV page ({spec.page_bytes} bytes)"
            )
    pool = BlockPool(num_pages, page_bytes=spec.page_bytes, enable_caching=enable_prefix_caching)
    return provider, KVCacheManager(pool, spec, enable_prefix_caching=enable_prefix_caching)


def release_to(provider: Any, kv: Any) -> None:
    """Give ``kv`` back to ``provider`` (when the provider hands out managers)."""
    release = getattr(provider, "release_kv_manager", None)
    if callable(release):
        release(kv)


def make_mock_serving(
    provider: Any,
    *,
    tokenizer: MockTokenizer,
    runner_options: dict[str, Any],
    kv_spec: KVSpec | None = None,
    kv_memory_bytes: int | None = None,
    kv_num_pages: int | None = None,
    enable_prefix_caching: bool = True,
    max_batch_size: int,
    limits: RequestLimits,
) -> tuple[Any, Serving]:
    """The serving set of a mock-model engine: (provider, Serving).

    Used by :class:`MockEngine` and by the HF engines in ``mock_mode``.
    """
    from sagellm_backend.engine.runners.mock import MockRunner
    from sagellm_backend.engine.sched.scheduler import Scheduler

    provider, kv = create_mock_kv_manager(
        provider,
        kv_spec,
        memory_bytes=kv_memory_bytes,
        num_pages=kv_num_pages,
        enable_prefix_caching=enable_prefix_caching,
    )
    try:
        runner = MockRunner(tokenizer, **runner_options)
        scheduler = Scheduler(
            kv,
            max_batch_size=max_batch_size,
            max_num_batched_tokens=max(_MOCK_STEP_TOKENS, max_batch_size),
            max_context=limits.max_context,
            eos_token_ids=[MockTokenizer.EOS_ID],
            paged=False,
            reserve_output=True,
            keep_eos=False,
            decode=tokenizer.decode,
        )
    except BaseException:
        release_to(provider, kv)
        raise
    return provider, Serving(
        scheduler=scheduler,
        runner=runner,
        limits=limits,
        tokenize=tokenizer.encode,
        new_detok=lambda: _MockDetok(tokenizer),
        release=lambda: release_to(provider, kv),
        threaded=False,
    )


class MockEngine(ScheduledEngine):
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
        trace = (
            list(config.component_trace)
            if config.component_trace is not None
            else core_component_trace(type(self).__name__, False)
        )
        super().__init__(config, component_trace=trace)
        self._cfg: MockEngineConfig = config
        self.tokenizer = MockTokenizer(config.vocabulary_size)
        self._runner_rng_seed = config.seed

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

    async def start(self) -> None:
        """Create the KV manager (from the provider) and start serving.

        Raises:
            BackendNotAvailableError: ``fail_at_start`` is set (injected fault).
            RuntimeError: already running.
        """
        if self._cfg.fail_at_start and not self._running:
            raise BackendNotAvailableError(
                f"MockEngine {self.engine_id!r}: injected failure at start (fail_at_start=True)"
            )
        await super().start()

    def _build_serving(self) -> Serving:
        cfg = self._cfg
        provider, serving = make_mock_serving(
            self._provider,
            tokenizer=self.tokenizer,
            runner_options={
                "latency_ms": cfg.simulate_latency_ms,
                "ttft_ms": cfg.simulate_ttft_ms,
                "jitter_ms": cfg.jitter_ms,
                "slow_step_every": cfg.slow_step_every,
                "slow_step_ms": cfg.slow_step_ms,
                "failure_rate": cfg.simulate_failure_rate,
                "eos_probability": cfg.eos_probability,
                "seed": cfg.seed,
            },
            kv_spec=cfg.kv_spec,
            kv_memory_bytes=cfg.kv_memory_bytes,
            kv_num_pages=cfg.kv_num_pages,
            enable_prefix_caching=cfg.enable_prefix_caching,
            max_batch_size=cfg.max_batch_size,
            limits=RequestLimits(
                vocab_size=cfg.vocabulary_size,
                max_context=cfg.max_model_len,
                max_input_tokens=cfg.max_input_tokens,
                max_output_tokens=cfg.max_output_tokens,
                default_max_tokens=cfg.default_max_tokens if cfg.default_max_tokens_given else None,
                model=cfg.model_path if cfg.strict_model else None,
            ),
        )
        self._provider = provider
        return serving

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
            max_model_len=cfg.max_model_len,
        )
        for key in ("steps", "waiting", "running", "completed", "failed", "cancelled"):
            info.setdefault(key, 0)
        runner = self._runner
        if runner is not None:
            info["steps"] = runner.steps  # counted when a step starts (it may be simulated)
        return info


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
