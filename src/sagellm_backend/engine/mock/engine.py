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
import os
from typing import Any

from sagellm_backend.engine._plugin import (
    core_component_trace,
    is_backend_provider,
    normalize_engine_config,
)
from sagellm_backend.engine._streaming import RequestLimits
from sagellm_backend.engine.base import EngineConfig
from sagellm_backend.engine.mock.config import (
    DEFAULT_MOCK_CONTEXT,
    OPTION_FIELDS,
    MockEngineConfig,
)
from sagellm_backend.engine.mock.serving import (
    DEFAULT_KV_NUM_PAGES,
    create_mock_kv_manager,
    make_mock_serving,
    release_to,
)
from sagellm_backend.engine.mock.tokenizer import MockTokenizer
from sagellm_backend.engine.sched.engine import ScheduledEngine, Serving
from sagellm_backend.errors import BackendNotAvailableError, ConfigError

# MockEngineConfig, the DEFAULT_* constants and the serving helpers live in .config and
# .serving; they are re-exported here, where they were defined before.
__all__ = [
    "DEFAULT_KV_NUM_PAGES",
    "DEFAULT_MOCK_CONTEXT",
    "ENV_MOCK_OPTIONS",
    "MockEngine",
    "MockEngineConfig",
    "create_mock_engine",
    "create_mock_kv_manager",
    "make_mock_serving",
    "release_to",
]

#: Config fields :meth:`MockEngine.get_info` reports as they are.
_INFO_FIELDS = (
    "simulate_latency_ms",
    "simulate_ttft_ms",
    "simulate_failure_rate",
    "jitter_ms",
    "vocabulary_size",
    "max_model_len",
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

    async def start(self) -> None:
        """Create the KV manager (from the provider) and start serving.

        Returns at once when already running (0.1.1.2's rule).

        Raises:
            BackendNotAvailableError: ``fail_at_start`` is set (injected fault).
        """
        if self._cfg.fail_at_start and not self._running:
            raise BackendNotAvailableError(
                f"MockEngine {self.engine_id!r}: injected failure at start (fail_at_start=True)"
            )
        await super().start()

    def _build_serving(self) -> Serving:
        cfg = self._cfg
        options = cfg.engine_options()
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
            options=options,
            kv_spec=cfg.kv_spec,
            kv_num_pages=cfg.kv_num_pages,
            max_batch_size=cfg.max_batch_size,
            limits=RequestLimits(
                vocab_size=cfg.vocabulary_size,
                max_context=cfg.max_model_len,
                max_input_tokens=options.max_input_tokens,
                max_new_tokens=cfg.max_output_tokens,
                default_max_tokens=cfg.default_max_tokens if cfg.default_max_tokens_given else None,
                model=cfg.model_path if cfg.strict_model else None,
            ),
        )
        self._provider = provider
        return serving

    def get_info(self) -> dict[str, Any]:
        """Engine description plus simulation settings, counters and KV stats."""
        info = super().get_info()
        info["mock_mode"] = True  # a MockEngine always simulates (as 0.1.1.2 reported)
        cfg = self._cfg
        info.update({name: getattr(cfg, name) for name in _INFO_FIELDS})
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
_ENV_ALLOWED = frozenset(OPTION_FIELDS) - {"kv_spec", "component_trace"}


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


_MAPPED_EXTRA = set(OPTION_FIELDS) | {"mock_mode", "metadata", "engine_id"}


def _explicit(config: Any, name: str) -> bool:
    """Whether ``config`` sets ``name`` itself (not a pydantic model's default).

    sagellm-core's ``EngineConfig`` defaults ``max_batch_size`` to 1; 0.1.1.2's MockEngine
    ignored it (every request ran at once), so only a value the user set limits the mock's
    batch, and the default leaves :class:`MockEngineConfig`'s own.
    """
    fields_set = getattr(config, "model_fields_set", None)
    return fields_set is None or name in fields_set


def create_mock_engine(
    config: Any = None, backend: Any = None, *args: Any, **kwargs: Any
) -> MockEngine:
    """``sagellm.engines`` entry point: build a MockEngine from any accepted config.

    Args:
        config: a :class:`MockEngineConfig` (used as is), a sagellm-core 0.1.x
            ``EngineConfig`` (its ``max_batch_size`` only when set explicitly: the default
            of 1 leaves MockEngineConfig's), a dict (EngineConfig fields plus
            MockEngineConfig options), or None. A string is the 0.1.1.x form
            ``create_mock_engine(engine_id, simulate_latency_ms=10.0, simulate_ttft_ms=50.0,
            **kwargs)``, with ``args``/``kwargs`` passed to :class:`MockEngineConfig`.
        backend: the provider sagellm-core created (its KV manager is used).
        *args: only with the string form (see above).
        **kwargs: only with the string form (see above); ``engine_id=`` also gives it.

    Raises:
        ConfigError: an unknown or invalid field (the message lists the valid ones).

    For dict/sagellm-core/None configs, options in the JSON object of the environment
    variable ``SAGELLM_MOCK_ENGINE_OPTIONS`` (e.g. ``{"simulate_latency_ms": 0}``) apply first;
    keys of a dict config override them.
    """
    if config is None and backend is None and not args and "engine_id" in kwargs:
        config = kwargs.pop("engine_id")  # the 0.1.1.x form by keyword
        if not isinstance(config, str):
            raise ConfigError(f"create_mock_engine engine_id must be a str, got {config!r}")
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
    options.update({k: v for k, v in settings.extra.items() if k in OPTION_FIELDS})
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
    if settings.max_batch_size is not None and _explicit(config, "max_batch_size"):
        base["max_batch_size"] = settings.max_batch_size
    if "mock_mode" in settings.extra:
        base["mock_mode"] = settings.extra["mock_mode"]
    if "metadata" in settings.extra:
        base["metadata"] = settings.extra["metadata"]
    return MockEngine(MockEngineConfig(settings.engine_id, **options, **base))
