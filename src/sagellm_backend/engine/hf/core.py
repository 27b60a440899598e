"""The HF engine core shared by CPUEngine and HFCudaEngine.

:mod:`sagellm_backend.engine.cpu` and :mod:`sagellm_backend.engine.hf_cuda` are thin faces
over this module.

:class:`HFEngineCore` is a :class:`~sagellm_backend.engine.base.BaseEngine` over a Hugging
Face causal LM:

* ``start()`` loads the model and tokenizer (in a worker thread, through
  :func:`~sagellm_backend.engine.hf.loader.load_model_and_tokenizer`), creates or adopts the
  backend provider, asks it for a :class:`~sagellm_backend.kv.manager.KVCacheManager` sized
  for the model's KV geometry, builds a model runner (the paged runner for Llama-family
  models, the ``DynamicCache`` fallback otherwise) and starts the
  :class:`~sagellm_backend.engine.hf.scheduler.Scheduler` thread. The model, provider, KV
  manager and runner are kept across ``stop()``/``start()``.
* ``execute``/``stream`` tokenize and validate on the event loop, hand a
  :class:`~sagellm_backend.engine.hf.scheduler.GenSequence` to the scheduler and await its
  events, which the worker thread posts with ``loop.call_soon_threadsafe`` into a
  per-request :class:`asyncio.Queue`. Streaming text comes from an
  :class:`~sagellm_backend.engine.hf.detok.IncrementalDetokenizer`; ``execute`` decodes the
  same way, so ``execute`` text equals the concatenated stream deltas.
* Faces (CPU, CUDA) subclass it and provide :meth:`HFEngineCore._make_provider`,
  :meth:`HFEngineCore._thread_init` and their config mapping; with ``mock_mode`` they
  delegate every call to a :class:`~sagellm_backend.engine.mock.MockEngine` (no torch).

Per-request options (``Request.metadata``): ``ignore_eos`` (bool), ``seed`` (int, seeds the
request's sampler), ``stop_token_ids`` (list of ints that end the request with ``"stop"``),
``prompt_token_ids`` (list of ints used instead of tokenizing ``prompt``). Sampling is
greedy unless ``temperature > 0``; ``top_p`` applies when sampling. ``max_tokens`` is capped
by the engine's ``max_new_tokens`` and by the context left after the prompt.

Invariants (besides :mod:`sagellm_backend.engine.base`'s):
    * A bad request (prompt longer than the context or ``max_input_tokens``, empty after
      tokenization, token ids outside the vocabulary, invalid max_tokens/temperature/top_p
      or metadata, more KV than the whole pool) gets ``finish_reason="error"`` with
      INVALID_ARGUMENT (RESOURCE_EXHAUSTED for KV) and never reaches the scheduler.
    * A consumer that stops iterating a stream, or cancels the task awaiting ``execute``,
      has its request removed from the batch, and its KV freed, at the next step.
    * ``stop()`` returns within about 2 s with every request in flight ended by a terminal
      result; the scheduler thread is joined (or, if a step is still running, joined on the
      next ``start()``) and the KV manager holds no sequence afterwards.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import logging
import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from sagellm_protocol import Error, ErrorCode, Request, Response

from sagellm_backend.engine._streaming import (
    delta_event,
    end_event,
    error_response,
    request_ids,
    start_event,
    validate_request,
)
from sagellm_backend.engine.base import BaseEngine, EngineConfig, StreamEvent
from sagellm_backend.engine.metrics import (
    ErrorRateCounter,
    KVRequestStats,
    RequestTimeline,
    build_metrics,
)
from sagellm_backend.errors import (
    BackendNotAvailableError,
    ConfigError,
    KVCacheExhaustedError,
    to_protocol_error,
)

if TYPE_CHECKING:
    from sagellm_backend.engine._plugin import PluginEngineSettings
    from sagellm_backend.engine.hf.scheduler import FinishEvent, GenSequence, Scheduler
    from sagellm_backend.engine.mock import MockEngine
    from sagellm_backend.engine.runners.base import ModelRunner
    from sagellm_backend.kv.manager import KVCacheManager

__all__ = [
    "ENGINE_OPTION_DEFAULTS",
    "RUNNER_CHOICES",
    "EngineOptionFields",
    "EngineOptions",
    "HFEngineCore",
    "LoadSettings",
    "check_bool",
    "check_common_fields",
    "check_positive_int",
    "face_config_fields",
    "hf_unavailable_reason",
    "make_mock_engine",
    "resolve_engine_options",
    "with_provider",
]

_log = logging.getLogger(__name__)
_MIB = 1 << 20
_STOP_JOIN_S = 1.5

#: Values of the ``runner`` option.
RUNNER_CHOICES = ("auto", "paged", "hf")


@dataclass(frozen=True)
class EngineOptions:
    """Tuning options shared by the HF engines (config fields of the same names).

    Attributes:
        kv_cache_memory_bytes: bytes of the KV pool the engine asks its provider for; None
            takes what the provider's KV budget has left (a provider the engine creates
            itself gets this as its budget).
        block_size: tokens per KV page.
        enable_prefix_caching: reuse the K/V of cached full blocks of a repeated prompt
            prefix (paged runner only; the fallback runner always recomputes).
        max_num_batched_tokens: most tokens one step computes (prompt chunks are split to
            fit); bounds step latency and so ``stop()`` latency.
        max_model_len: cap on prompt + output length (None: the model's context length).
        max_input_tokens: cap on prompt length (None: only the context bounds it).
        runner: ``"auto"`` (paged for Llama-family models, else the fallback), ``"paged"``
            (error if the model is not supported) or ``"hf"`` (always the fallback).
        fuse_projections: fuse plain q/k/v and gate/up linear weights (paged runner).
        prepack_weights: on CPU with fp32 weights (MKL builds of torch), keep an
            MKL-prepacked copy of the linear weights for decode steps of 4..16 tokens,
            which run padded to 16 rows (paged runner; a second copy of the linear
            weights' memory, so turn it off for models that barely fit in RAM).
        decode_workspace_bytes: on CPU, bytes of the contiguous decode workspace that
            mirrors the decoding sequences' K/V so that decode attention does not gather
            pages every step (paged runner; 0 turns it off; beyond it steps gather).
    """

    kv_cache_memory_bytes: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_input_tokens: int | None = None
    runner: str = "auto"
    fuse_projections: bool = True
    prepack_weights: bool = True
    decode_workspace_bytes: int = 512 << 20


#: Option name -> default (the config dataclasses declare fields with these defaults).
ENGINE_OPTION_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(EngineOptions)
}


@dataclass(kw_only=True)
class EngineOptionFields(EngineConfig):
    """Base of the face configs: :class:`EngineConfig` plus the :class:`EngineOptions` fields.

    The option fields are keyword-only, so they follow every positional field a face
    declares (its published positional order is kept). Invariant: the names and defaults
    equal :data:`ENGINE_OPTION_DEFAULTS` (checked at import); the values are validated by
    :func:`resolve_engine_options`.
    """

    kv_cache_memory_bytes: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_input_tokens: int | None = None
    runner: str = "auto"
    fuse_projections: bool = True
    prepack_weights: bool = True
    decode_workspace_bytes: int = 512 << 20


_BASE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}
if {
    f.name: f.default for f in dataclasses.fields(EngineOptionFields) if f.name not in _BASE_FIELDS
} != ENGINE_OPTION_DEFAULTS:  # pragma: no cover - a development error
    raise AssertionError("EngineOptionFields and EngineOptions declare different options")


def _check_option(owner: str, name: str, value: Any) -> Any:
    def bad(valid: str) -> ConfigError:
        return ConfigError(f"{owner}.{name} must be {valid}, got {value!r}")

    if name in ("kv_cache_memory_bytes", "max_model_len", "max_input_tokens"):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise bad("None or an integer >= 1")
    elif name in ("block_size", "max_num_batched_tokens"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad("an integer >= 1")
    elif name == "decode_workspace_bytes":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad("an integer >= 0 (0 turns the workspace off)")
    elif name in ("enable_prefix_caching", "fuse_projections", "prepack_weights"):
        if not isinstance(value, bool):
            raise bad("a bool (True or False)")
    elif name == "runner" and value not in RUNNER_CHOICES:
        raise bad(f"one of {RUNNER_CHOICES}")
    return value


def resolve_engine_options(owner: str, config: Any) -> EngineOptions:
    """Read and validate the :class:`EngineOptions` of an engine config.

    Each option comes from the config field of the same name; ``config.metadata`` may also
    carry it (for configs built by generic code). A metadata value is used when the field
    is at its default; a field set to something else and a different metadata value is a
    conflict.

    Raises:
        ConfigError: an invalid value or a conflict (the message names the option).
    """
    metadata = getattr(config, "metadata", None) or {}
    values: dict[str, Any] = {}
    for name, default in ENGINE_OPTION_DEFAULTS.items():
        value = getattr(config, name, default)
        if name in metadata:
            meta = metadata[name]
            if value != default and meta != value:
                raise ConfigError(
                    f"{owner}.{name}={value!r} conflicts with metadata[{name!r}]={meta!r}; "
                    "set it in one place"
                )
            value = meta
        values[name] = _check_option(owner, name, value)
    opts = EngineOptions(**values)
    max_batch = getattr(config, "max_batch_size", None)
    if isinstance(max_batch, int) and opts.max_num_batched_tokens < max_batch:
        raise ConfigError(
            f"{owner}.max_num_batched_tokens={opts.max_num_batched_tokens} must be >= "
            f"max_batch_size={max_batch} (every running request decodes one token per step)"
        )
    return opts


def check_bool(owner: str, name: str, value: Any) -> bool:
    """Return ``value`` when it is a bool, else raise ConfigError naming ``owner.name``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}.{name} is required and must be True or False, got {value!r}")
    return value


def check_positive_int(owner: str, name: str, value: Any) -> int:
    """Return ``value`` when it is an int > 0, else raise ConfigError naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(
            f"{owner}.{name} is required and must be an integer > 0 (e.g. 8), got {value!r}"
        )
    return value


def check_common_fields(owner: str, config: Any) -> None:
    """Validate the :class:`~sagellm_backend.engine.base.EngineConfig` fields of a config.

    ``engine_id`` non-empty; ``model_path`` a non-empty string (None only with
    ``mock_mode``); ``mock_mode`` a bool; ``provider`` None or a backend provider;
    ``metadata`` a dict.

    Raises:
        ConfigError: naming the field, the bad value and what is valid.
    """
    from sagellm_backend.engine._plugin import is_backend_provider

    eid = config.engine_id
    if not isinstance(eid, str) or not eid.strip():
        raise ConfigError(f"{owner}.engine_id must be a non-empty string, got {eid!r}")
    check_bool(owner, "mock_mode", config.mock_mode)
    path = config.model_path
    if path is None and not config.mock_mode:
        raise ConfigError(
            f"{owner}.model_path is required: a Hugging Face model directory or hub id "
            "('org/name'); got None"
        )
    if path is not None and (not isinstance(path, str) or not path.strip()):
        raise ConfigError(
            f"{owner}.model_path must be a model directory or hub id string, got {path!r}"
        )
    if config.provider is not None and not is_backend_provider(config.provider):
        raise ConfigError(
            f"{owner}.provider must be None or a backend provider, "
            f"got {type(config.provider).__name__}"
        )
    if not isinstance(config.metadata, dict):
        raise ConfigError(f"{owner}.metadata must be a dict, got {config.metadata!r}")


def _provider_dtypes(provider: Any) -> list[str] | None:
    """Names of the dtypes ``provider``'s device computes in (None when it does not say)."""
    dtypes = getattr(provider.capability(), "supported_dtypes", None)
    if not dtypes:
        return None
    return [str(getattr(d, "value", d)) for d in dtypes]


def hf_unavailable_reason() -> str | None:
    """Why the HF engines cannot run here (missing packages, with the fix), or None."""
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed: pip install 'isagellm-backend[hf]'"
    return None


def make_mock_engine(config: EngineConfig, engine_name: str, from_core: bool) -> Any:
    """A MockEngine standing in for an HF engine in mock mode (no torch needed).

    It runs on the config's provider, or a fresh MockBackendProvider; its component_trace
    names the HF engine and ``"mock"``; requests default to ``max_new_tokens`` tokens.
    """
    from sagellm_backend.engine._plugin import core_component_trace
    from sagellm_backend.engine.mock import MockEngine, MockEngineConfig
    from sagellm_backend.providers.mock import MockBackendProvider

    provider = config.provider if config.provider is not None else MockBackendProvider()
    max_new = getattr(config, "max_new_tokens", None)
    return MockEngine(
        MockEngineConfig(
            config.engine_id,
            default_max_tokens=max_new or 128,
            component_trace=[*core_component_trace(engine_name, from_core), "mock"],
            model_path=config.model_path,
            device=config.device,
            max_batch_size=config.max_batch_size,
            mock_mode=True,
            provider=provider,
            metadata=dict(config.metadata),
        )
    )


_FaceConfigT = TypeVar("_FaceConfigT", bound=EngineConfig)


def with_provider(config: _FaceConfigT, backend: Any) -> _FaceConfigT:
    """``config`` itself, or (``backend`` given) a copy on that provider, validated again.

    Raises:
        ConfigError: ``backend`` is not a backend provider.
    """
    if backend is None:
        return config
    config = copy.copy(config)
    config.provider = backend
    config.__post_init__()  # type: ignore[attr-defined]  # the face configs validate there
    return config


def face_config_fields(
    settings: PluginEngineSettings,
    config_cls: type[EngineConfig],
    label: str,
    *,
    default_device: str,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Map normalised factory settings to keyword arguments of a face config.

    ``settings.extra`` may hold any field of ``config_cls`` but the ones mapped from the
    sagellm-core names (``engine_id``, ``model_path``, ``device``, ``max_batch_size``) and
    overrides ``defaults``; ``max_output_tokens`` becomes ``max_new_tokens`` (an extra
    ``max_new_tokens`` that is not None must agree); a setting that is None is left to the
    config's default. ``device`` falls back to ``default_device``.

    Raises:
        ConfigError: an unknown extra key (naming ``label``) or disagreeing token limits.
    """
    from sagellm_backend.engine._plugin import reject_unknown_keys

    allowed = {f.name for f in dataclasses.fields(config_cls)}
    allowed -= {"engine_id", "model_path", "device", "max_batch_size"}
    reject_unknown_keys(settings, allowed, f"{label} engine")
    fields: dict[str, Any] = {**(defaults or {}), **settings.extra}
    fields.pop("provider", None)
    fields["engine_id"] = settings.engine_id
    fields["model_path"] = settings.model_path
    fields["device"] = settings.device or default_device
    fields["provider"] = settings.provider
    if settings.max_batch_size is not None:
        fields["max_batch_size"] = settings.max_batch_size
    if settings.max_output_tokens is not None:
        given = settings.extra.get("max_new_tokens")
        if given is not None and given != settings.max_output_tokens:
            raise ConfigError(
                f"{label} engine config: max_output_tokens={settings.max_output_tokens} and "
                f"max_new_tokens={given} disagree; give one"
            )
        fields["max_new_tokens"] = settings.max_output_tokens
    if settings.max_input_tokens is not None:
        fields["max_input_tokens"] = settings.max_input_tokens
    return fields


@dataclass(frozen=True)
class LoadSettings:
    """How an engine face loads its model (mapped from its config).

    Attributes:
        model_path: model directory or hub id.
        device: torch device string the model and KV live on.
        dtype: ``float16`` / ``bfloat16`` / ``float32`` / ``auto``.
        device_map: None, an accelerate strategy, a device string or a dict.
        load_in_8bit / load_in_4bit: bitsandbytes quantisation.
        trust_remote_code: allow checkpoint code.
        low_cpu_mem_usage: transformers 4.x loading option.
        max_new_tokens: cap on tokens per request.
        max_batch_size: most requests per step.
        bnb_4bit_quant_type / bnb_4bit_compute_dtype / bnb_4bit_use_double_quant: 4-bit
            options (see :func:`~sagellm_backend.engine.hf.loader.load_model_and_tokenizer`).
    """

    model_path: str
    device: str
    dtype: str
    device_map: str | dict[str, Any] | None
    load_in_8bit: bool
    load_in_4bit: bool
    trust_remote_code: bool
    low_cpu_mem_usage: bool
    max_new_tokens: int
    max_batch_size: int
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: str | None = None
    bnb_4bit_use_double_quant: bool = True


class _Handle:
    """The consumer side of one request: a queue the worker thread posts events to."""

    __slots__ = ("done", "loop", "on_orphan", "prompt_len", "queue", "request", "seq")

    def __init__(self, loop: asyncio.AbstractEventLoop, request: Request) -> None:
        self.loop = loop
        self.request = request
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.seq: GenSequence | None = None
        self.done = False
        self.prompt_len = 0
        self.on_orphan: Any = None

    def post(self, event: Any) -> None:
        """Called from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the consumer's loop is closed: nobody will ever listen
            if self.on_orphan is not None and self.seq is not None:
                self.on_orphan(self.seq.seq_id)


class HFEngineCore(BaseEngine):
    """Continuous-batching engine over a Hugging Face causal LM (see module docstring).

    Subclasses set :attr:`ENGINE_NAME` and implement :meth:`backend_type`,
    :meth:`_make_provider` and (optionally) :meth:`_thread_init`.

    Args:
        config: the face's config (already validated by it).
        load: how to load the model (ignored in mock mode).
        options: tuning options.
        mock_engine: in mock mode, the MockEngine every call is delegated to.
        from_core: created through sagellm-core (affects ``component_trace``).
    """

    ENGINE_NAME: ClassVar[str] = "HFEngineCore"
    #: Appended to the wrong-provider error of :meth:`_check_provider`.
    PROVIDER_HINT: ClassVar[str] = ""

    def __init__(
        self,
        config: EngineConfig,
        load: LoadSettings | None,
        options: EngineOptions,
        *,
        mock_engine: MockEngine | None = None,
        from_core: bool = False,
    ) -> None:
        super().__init__(config)
        from sagellm_backend.engine._plugin import core_component_trace

        self._load_settings = load
        self._options = options
        self._mock = mock_engine
        self._from_core = from_core
        self._trace_base = core_component_trace(type(self).__name__, from_core)
        self._trace = list(self._trace_base)
        self._provider: Any = config.provider
        self._owns_provider = False
        self._model: Any = None
        self._tokenizer: Any = None
        self._kv: KVCacheManager | None = None
        self._runner: ModelRunner | None = None
        self._scheduler: Scheduler | None = None
        self._zombie: Scheduler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handles: dict[str, _Handle] = {}
        self._errors = ErrorRateCounter()
        self._counter = itertools.count(1)
        self._eos: frozenset[int] = frozenset()
        self._max_context = 0
        self._vocab_size = 0
        self._start_lock: asyncio.Lock | None = None
        self._quantization: str | None = None

    # ------------------------------------------------------------------ face hooks
    def _make_provider(self) -> Any:
        """Create the provider this engine owns (called in a worker thread)."""
        raise NotImplementedError

    def _thread_init(self) -> None:
        """Thread settings for the scheduler thread (default: none)."""

    def _check_provider(self, provider: Any) -> None:
        """Reject a provider whose ``device_type`` is not :meth:`backend_type`.

        A provider whose capability has no ``device_type`` is accepted.

        Raises:
            ConfigError: naming the engine, the provider and its device type.
        """
        expected = self.backend_type()
        device_type = getattr(provider.capability(), "device_type", None)
        if device_type not in (None, expected):
            raise ConfigError(
                f"{self.ENGINE_NAME} needs a {expected} provider, got {type(provider).__name__} "
                f"(device_type {device_type!r}){self.PROVIDER_HINT}"
            )

    # ------------------------------------------------------------------ properties
    @property
    def provider(self) -> Any:
        """The backend provider (None before the first start when not injected)."""
        if self._mock is not None:
            return self._mock.provider
        return self._provider

    @property
    def kv_manager(self) -> KVCacheManager | None:
        """The KV cache manager (None before the first start)."""
        if self._mock is not None:
            return self._mock.kv_manager
        return self._kv

    @property
    def model(self) -> Any:
        """The loaded transformers model (None before start or in mock mode)."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The loaded tokenizer (None before start or in mock mode)."""
        if self._mock is not None:
            return self._mock.tokenizer
        return self._tokenizer

    @property
    def runner_name(self) -> str | None:
        """``"paged"`` or ``"hf-cache"`` once started (None before)."""
        return None if self._runner is None else self._runner.name

    @property
    def max_context(self) -> int:
        """Longest prompt + output once started (0 before)."""
        return self._max_context

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the model (first start), create the KV manager and start the scheduler.

        Raises:
            RuntimeError: already running.
            ConfigError / DependencyMissingError / BackendNotAvailableError: from loading
                (bad path, missing packages, device not available).
        """
        if self._running:
            raise RuntimeError(f"{type(self).__name__} {self.engine_id!r} is already running")
        if self._mock is not None:
            await self._mock.start()
            self._running = True
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._running:
                raise RuntimeError(f"{type(self).__name__} {self.engine_id!r} is already running")
            zombie, self._zombie = self._zombie, None
            if zombie is not None:  # a step outlived the last stop(): wait for it now
                await asyncio.to_thread(zombie.stop, None)
            if self._model is None:
                await asyncio.to_thread(self._load)
            self._start_scheduler()
            self._loop = asyncio.get_running_loop()
            self._running = True

    def _load(self) -> None:
        """Load model + tokenizer, create provider, KV manager and runner (worker thread)."""
        from sagellm_backend.engine.hf.loader import load_model_and_tokenizer, quantization_name
        from sagellm_backend.engine.hf.runner import (
            HFCacheRunner,
            PagedDecoderRunner,
            model_compute_dtype,
            model_context_length,
            model_device,
            paged_unsupported_reason,
        )
        from sagellm_backend.kv.spec import KVSpec

        load = self._load_settings
        assert load is not None
        opts = self._options
        self._thread_init()
        # The provider first: on a machine without the device this fails fast, naming why.
        provider = self._provider
        if provider is None:
            provider = self._make_provider()
            self._owns_provider = True
        self._check_provider(provider)
        model, tokenizer = load_model_and_tokenizer(
            load.model_path,
            device=load.device,
            dtype=load.dtype,
            device_map=load.device_map,
            load_in_8bit=load.load_in_8bit,
            load_in_4bit=load.load_in_4bit,
            trust_remote_code=load.trust_remote_code,
            low_cpu_mem_usage=load.low_cpu_mem_usage,
            bnb_4bit_quant_type=load.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=load.bnb_4bit_compute_dtype,
            bnb_4bit_use_double_quant=load.bnb_4bit_use_double_quant,
            device_dtypes=_provider_dtypes(provider),
        )
        context = model_context_length(model.config)
        if opts.max_model_len is not None:
            context = min(context, opts.max_model_len)
        reason = paged_unsupported_reason(model)
        if opts.runner == "paged" and reason is not None:
            raise ConfigError(f"runner='paged' cannot run model {load.model_path!r}: {reason}")
        paged = opts.runner != "hf" and reason is None
        if not paged and opts.runner == "auto":
            _log.info("using the HF-cache fallback runner for %s: %s", load.model_path, reason)

        dtype = model_compute_dtype(model)
        from sagellm_backend.capability import DType

        kv_dtype = {
            "torch.float32": DType.FP32,
            "torch.float16": DType.FP16,
            "torch.bfloat16": DType.BF16,
        }.get(str(dtype), DType.FP16)
        spec = KVSpec.from_model_config(model.config, block_size=opts.block_size, dtype=kv_dtype)
        kv: KVCacheManager = provider.create_kv_manager(
            spec,
            memory_bytes=opts.kv_cache_memory_bytes,
            enable_prefix_caching=opts.enable_prefix_caching and paged,
        )
        runner: ModelRunner
        if paged:
            storage = kv.storage
            layer_kv = getattr(storage, "layer_kv", None)
            if layer_kv is None:
                raise ConfigError(
                    f"provider {type(provider).__name__} keeps no KV tensors (its storage "
                    f"{type(storage).__name__} has no layer_kv); the paged runner needs a "
                    "torch provider (cpu or cuda)"
                )
            if model_device(model) != layer_kv(0)[0].device:
                raise ConfigError(
                    f"the model is on {model_device(model)} but provider "
                    f"{type(provider).__name__} keeps KV on {layer_kv(0)[0].device}; give "
                    "the engine a provider for the model's device"
                )
            runner = PagedDecoderRunner(
                model,
                layer_kv,
                block_size=opts.block_size,
                max_context=context,
                fuse_projections=opts.fuse_projections,
                prepack_weights=opts.prepack_weights,
                decode_workspace_rows=(
                    load.max_batch_size
                    if model_device(model).type == "cpu" and opts.decode_workspace_bytes
                    else 0
                ),
                decode_workspace_bytes=opts.decode_workspace_bytes,
            )
        else:
            runner = HFCacheRunner(model, max_context=context)
        eos: set[int] = set()
        for source in (getattr(model, "generation_config", None), tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, list | tuple):
                eos.update(int(v) for v in value)
        self._provider = provider
        self._model = model
        self._tokenizer = tokenizer
        self._kv = kv
        self._runner = runner
        self._eos = frozenset(eos)
        self._max_context = context
        self._vocab_size = runner.vocab_size
        quant = quantization_name(load.load_in_8bit, load.load_in_4bit, load.bnb_4bit_quant_type)
        self._quantization = quant
        self._trace = [
            *self._trace_base,
            f"runner:{runner.name}",
            f"provider:{type(provider).__name__}",
            f"weights:{quant}",
        ]

    def _start_scheduler(self) -> None:
        from sagellm_backend.engine.hf.scheduler import Scheduler

        assert self._runner is not None and self._kv is not None and self._load_settings
        self._runner.reset()  # no sequence of an earlier run is alive any more
        sched = Scheduler(
            self._runner,
            self._kv,
            max_batch_size=self._load_settings.max_batch_size,
            max_num_batched_tokens=self._options.max_num_batched_tokens,
            max_context=self._max_context,
            eos_token_ids=self._eos,
            thread_init=self._thread_init,
            name=f"sagellm-{type(self).__name__}-{self.engine_id}",
        )
        sched.start()
        self._scheduler = sched

    async def stop(self) -> None:
        """End every request in flight (terminal error result) and stop the scheduler.

        Returns within about 2 s. The model, provider and KV manager are kept for a later
        ``start()``; the KV manager holds no sequence and no cached page afterwards (when a
        step was still running, that is true once it ends).
        """
        if not self._running:
            return
        self._running = False
        if self._mock is not None:
            await self._mock.stop()
            return
        sched, self._scheduler = self._scheduler, None
        joined = True
        if sched is not None:
            joined = await asyncio.to_thread(sched.stop, _STOP_JOIN_S)
        if not joined:
            self._zombie = sched
            stopped = Error(
                code=ErrorCode.UNAVAILABLE,
                message="the engine stopped before the request finished",
                retryable=True,
            )
            from sagellm_backend.engine.hf.scheduler import FinishEvent

            for handle in list(self._handles.values()):
                seq = handle.seq
                outs = list(seq.output_ids) if seq is not None else []
                handle.queue.put_nowait(FinishEvent("error", outs, stopped, None))
        elif self._kv is not None:
            self._kv.clear_cache()
        # Let the consumers see the terminal events posted by the worker thread.
        await asyncio.sleep(0)

    async def health_check(self) -> bool:
        """True when running and (real mode) the scheduler thread is alive."""
        if self._mock is not None:
            return await self._mock.health_check()
        return self._running and self._scheduler is not None and self._scheduler.is_alive

    def get_info(self) -> dict[str, Any]:
        """Engine description plus model, runner, scheduler and KV figures."""
        if self._mock is not None:
            info = self._mock.get_info()
            info.update(engine_type=type(self).__name__, backend_type=self.backend_type())
            info["mock_mode"] = True
            return info
        info = super().get_info()
        info.update(
            mock_mode=False,
            runner=self.runner_name,
            max_context=self._max_context,
            options=dataclasses.asdict(self._options),
            provider=type(self._provider).__name__ if self._provider is not None else None,
        )
        if self._scheduler is not None:
            info["scheduler"] = dataclasses.asdict(self._scheduler.stats())
        if self._kv is not None:
            info["kv"] = dataclasses.asdict(self._kv.stats())
        if self._model is not None and self._quantization is not None:
            from sagellm_backend.engine.hf.loader import weight_memory

            # Measured now: bitsandbytes may repack its state on the first forward.
            weights = weight_memory(self._model, self._quantization)
            info["weight_memory_bytes"] = weights.total_bytes
            info["weight_memory"] = dataclasses.asdict(weights)
            info["quantization"] = weights.quantization
        return info

    # ------------------------------------------------------------------ requests
    async def execute(self, request: Request) -> Response:
        """Run ``request`` to completion (a bad request -> ``finish_reason="error"``).

        Raises:
            RuntimeError: the engine is not running.
        """
        if self._mock is not None:
            return await self._mock.execute(self._cap_for_mock(request))
        handle, early = self._submit(request, stream=False)
        if early is not None:
            return early
        assert handle is not None
        from sagellm_backend.engine.hf.scheduler import FinishEvent

        try:
            while True:
                event = await handle.queue.get()
                if isinstance(event, FinishEvent):
                    break
        except asyncio.CancelledError:
            self._cancel(handle)
            raise
        self._close(handle)
        text = self._decode(event.output_ids)
        metrics = self._metrics(handle, event)
        rid, tid = request_ids(request)
        return Response(
            request_id=rid,
            trace_id=tid,
            output_text=text,
            output_tokens=list(event.output_ids),
            finish_reason=event.reason,
            metrics=metrics,
            error=event.error,
        )

    def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        """Yield start, deltas and end for ``request`` (see the base invariants).

        Raises:
            RuntimeError: (on first iteration) the engine is not running.
        """
        if self._mock is not None:
            return self._mock.stream(self._cap_for_mock(request))
        return self._stream(request)

    async def _stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        from sagellm_backend.engine.hf.detok import IncrementalDetokenizer
        from sagellm_backend.engine.hf.scheduler import FinishEvent

        eid = self.engine_id
        handle, early = self._submit(request, stream=True)
        if early is not None:
            yield start_event(request, eid, None)
            yield end_event(
                request,
                eid,
                output_text="",
                output_tokens=[],
                finish_reason="error",
                metrics=early.metrics,
                error=early.error,
            )
            return
        assert handle is not None
        try:
            yield start_event(request, eid, handle.prompt_len)
            detok = IncrementalDetokenizer(self._tokenizer)
            texts: list[str] = []
            while True:
                event = await handle.queue.get()
                ids: list[int] = []
                finish: FinishEvent | None = None
                while True:  # coalesce what is queued already into one delta
                    if isinstance(event, FinishEvent):
                        finish = event
                        break
                    ids.extend(event.token_ids)
                    if handle.queue.empty():
                        break
                    event = handle.queue.get_nowait()
                if ids:
                    chunk = detok.add(ids)
                    texts.append(chunk)
                    yield delta_event(request, eid, chunk, ids)
                if finish is None:
                    continue
                self._close(handle)
                tail = detok.flush()
                if tail:
                    texts.append(tail)
                    yield delta_event(request, eid, tail, [])
                yield end_event(
                    request,
                    eid,
                    output_text="".join(texts),
                    output_tokens=list(finish.output_ids),
                    finish_reason=finish.reason,
                    metrics=self._metrics(handle, finish),
                    error=finish.error,
                )
                return
        finally:
            if not handle.done:
                self._cancel(handle)

    # ------------------------------------------------------------------ internals
    def _cap_for_mock(self, request: Request) -> Request:
        """Mock mode: cap max_tokens by max_new_tokens as the real engine does."""
        cap = self._load_settings.max_new_tokens if self._load_settings else None
        mt = getattr(request, "max_tokens", None)
        if cap is not None and isinstance(mt, int) and not isinstance(mt, bool) and mt > cap:
            return request.model_copy(update={"max_tokens": cap})
        return request

    def _error_result(self, request: Any, exc: BaseException) -> Response:
        metrics = build_metrics(
            RequestTimeline(),
            error_rate=self._errors.record(True),
            peak_mem_mb=self._peak_mem_mb(),
            component_trace=self._trace,
        )
        return error_response(request, to_protocol_error(exc), metrics)

    def _prompt_ids(self, request: Request) -> list[int]:
        metadata = request.metadata or {}
        given = metadata.get("prompt_token_ids")
        if given is not None:
            if not isinstance(given, list | tuple) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in given
            ):
                raise ConfigError(
                    f"request.metadata['prompt_token_ids'] must be a list of ints, got {given!r}"
                )
            ids = [int(t) for t in given]
        else:
            try:
                ids = list(self._tokenizer(request.prompt, add_special_tokens=True)["input_ids"])
            except Exception as exc:  # e.g. a lone surrogate: not encodable as UTF-8
                raise ConfigError(
                    f"request.prompt cannot be tokenized ({type(exc).__name__}: {exc}); give "
                    "valid Unicode text"
                ) from exc
        if not ids:
            raise ConfigError("request.prompt tokenizes to no tokens; give a prompt with some text")
        bad = [t for t in ids if not 0 <= t < self._vocab_size]
        if bad:
            raise ConfigError(
                f"request prompt has token id(s) {sorted(set(bad))[:8]} outside the model's "
                f"vocabulary 0..{self._vocab_size - 1}"
            )
        opts = self._options
        if opts.max_input_tokens is not None and len(ids) > opts.max_input_tokens:
            raise ConfigError(
                f"request.prompt has {len(ids)} tokens, more than max_input_tokens="
                f"{opts.max_input_tokens}"
            )
        if len(ids) >= self._max_context:
            raise ConfigError(
                f"request.prompt has {len(ids)} tokens but the context length is "
                f"{self._max_context}; the prompt must be shorter than the context "
                "(at least one token is generated)"
            )
        return ids

    def _submit(self, request: Request, *, stream: bool) -> tuple[_Handle | None, Response | None]:
        """Validate and queue; return (handle, None) or (None, an error Response)."""
        if not self._running or self._scheduler is None:
            raise RuntimeError(
                f"{type(self).__name__} {self.engine_id!r} is not running; call start()"
            )
        from sagellm_backend.engine.hf.scheduler import GenSequence, SamplingParams

        load = self._load_settings
        assert load is not None
        timeline = RequestTimeline()
        try:
            max_tokens = validate_request(request)
            metadata: Mapping[str, Any] = request.metadata or {}
            ignore_eos = metadata.get("ignore_eos", False)
            if not isinstance(ignore_eos, bool):
                raise ConfigError(
                    f"request.metadata['ignore_eos'] must be a bool, got {ignore_eos!r}"
                )
            seed = metadata.get("seed")
            if seed is not None and (
                isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64
            ):
                raise ConfigError(
                    f"request.metadata['seed'] must be an int in [0, 2**64), got {seed!r}"
                )
            stop_ids = metadata.get("stop_token_ids", ())
            if not isinstance(stop_ids, list | tuple | set | frozenset) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in stop_ids
            ):
                raise ConfigError(
                    f"request.metadata['stop_token_ids'] must be a list of ints, got {stop_ids!r}"
                )
            prompt_ids = self._prompt_ids(request)
        except ConfigError as exc:
            return None, self._error_result(request, exc)
        max_tokens = min(max_tokens, load.max_new_tokens, self._max_context - len(prompt_ids))
        temperature = request.temperature
        handle = _Handle(asyncio.get_running_loop(), request)
        handle.prompt_len = len(prompt_ids)
        seq = GenSequence(
            seq_id=f"{request.request_id}#{next(self._counter)}",
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampling=SamplingParams(
                temperature=float(temperature) if temperature else None,
                top_p=float(request.top_p) if request.top_p is not None else None,
                seed=seed,
            ),
            ignore_eos=ignore_eos,
            stream=stream,
            sink=handle.post,
            stop_token_ids=frozenset(int(t) for t in stop_ids),
            timeline=timeline,
        )
        handle.seq = seq
        handle.on_orphan = self._scheduler.cancel
        try:
            self._scheduler.submit(seq)
        except KVCacheExhaustedError as exc:
            return None, self._error_result(request, exc)
        except RuntimeError as exc:  # the scheduler thread died (see the log)
            unavailable = BackendNotAvailableError(
                f"{type(self).__name__} {self.engine_id!r} cannot serve: {exc}"
            )
            return None, self._error_result(request, unavailable)
        self._handles[seq.seq_id] = handle
        return handle, None

    def _cancel(self, handle: _Handle) -> None:
        if handle.done:
            return
        self._close(handle)
        sched = self._scheduler
        if sched is not None and handle.seq is not None:
            sched.cancel(handle.seq.seq_id)

    def _close(self, handle: _Handle) -> None:
        handle.done = True
        if handle.seq is not None:
            self._handles.pop(handle.seq.seq_id, None)

    def _decode(self, ids: list[int]) -> str:
        from sagellm_backend.engine.hf.detok import IncrementalDetokenizer

        if not ids:
            return ""
        detok = IncrementalDetokenizer(self._tokenizer)
        return detok.add(ids) + detok.flush()

    def _peak_mem_mb(self) -> int:
        provider = self._provider
        if provider is None:
            return 0
        try:
            stats = provider.memory_stats()
        except Exception:  # pragma: no cover - a provider bug must not fail the request
            return 0
        peak = stats.get("peak", stats.get("allocated", 0))
        return math.ceil(int(peak) / _MIB) if peak else 0

    def _metrics(self, handle: _Handle, event: FinishEvent) -> Any:
        seq = handle.seq
        assert seq is not None
        failed = event.reason == "error"
        return build_metrics(
            seq.timeline,
            error_rate=self._errors.record(failed),
            peak_mem_mb=self._peak_mem_mb(),
            kv=event.kv if event.kv is not None else KVRequestStats(),
            component_trace=self._trace,
        )
