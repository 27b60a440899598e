"""The HF engine core shared by CPUEngine and HFCudaEngine.

:mod:`sagellm_backend.engine.cpu` and :mod:`sagellm_backend.engine.hf_cuda` are thin faces
over this module. :class:`HFEngineCore` is a
:class:`~sagellm_backend.engine.sched.engine.ScheduledEngine` -- the shared scheduler +
driver -- over a Hugging Face causal LM:

* ``start()`` (in a worker thread) creates or adopts the backend provider, loads the model
  and tokenizer through :func:`~sagellm_backend.engine.hf.loader.load_model_and_tokenizer`
  the first time (they are kept across ``stop()``/``start()``), asks the provider for a
  :class:`~sagellm_backend.kv.manager.KVCacheManager` sized for the model's KV geometry,
  builds the runner (:func:`build_runner`: the generic paged runner where the model supports
  custom attention, else the batched fallback) and the
  :class:`~sagellm_backend.engine.sched.scheduler.Scheduler`; the driver runs the steps in a
  worker thread under ``torch.inference_mode``.
* ``stop()`` gives the KV manager back to the provider; a failed or cancelled start gives
  back whatever it took (see :mod:`sagellm_backend.engine.sched.engine`).
* With ``mock_mode`` a face passes what :func:`make_mock_engine` returns -- the one place
  the flag is read -- and the engine serves a mock runner and tokenizer instead of the
  model (no torch), with its own validation and limits.

Per-request options (``Request.metadata``): see
:func:`~sagellm_backend.engine._streaming.prepare_request`. ``max_tokens`` is capped by the
engine's ``max_new_tokens`` and by the context left after the prompt.

Invariants (besides :mod:`sagellm_backend.engine.base`'s):
    * A bad request (prompt longer than the context or ``max_input_tokens``, empty after
      tokenization, token ids outside the vocabulary, invalid max_tokens/temperature/top_p
      or metadata, more KV than the whole pool) gets ``finish_reason="error"`` with
      INVALID_ARGUMENT (RESOURCE_EXHAUSTED for KV) and never reaches the scheduler.
    * ``stop()`` returns within about 2 s with every request in flight ended by a terminal
      result; a step still running then ends on its own, and the next ``start()`` waits
      for it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from sagellm_backend.engine._streaming import RequestLimits
from sagellm_backend.engine.base import EngineConfig
from sagellm_backend.engine.sched.engine import Detokenizer, ScheduledEngine, Serving
from sagellm_backend.engine.sched.scheduler import Scheduler
from sagellm_backend.errors import ConfigError

if TYPE_CHECKING:
    from sagellm_backend.engine._plugin import PluginEngineSettings
    from sagellm_backend.engine.runners.base import ModelRunner
    from sagellm_backend.kv.manager import KVCacheManager

__all__ = [
    "ENGINE_OPTION_DEFAULTS",
    "RUNNER_CHOICES",
    "EngineOptionFields",
    "EngineOptions",
    "HFEngineCore",
    "HFFaceFields",
    "LoadSettings",
    "MockModeServing",
    "build_runner",
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
        runner: ``"auto"`` (paged where the model supports custom attention functions, else
            the batched fallback), ``"paged"`` (error if the model is not supported) or
            ``"hf"`` (always the fallback).
        fuse_projections: accepted and validated, no effect (it tuned the hand-written
            Llama runner, removed since: the generic paged runner was as fast).
        prepack_weights: on CPU with fp32 weights (MKL builds of torch), keep an
            MKL-prepacked copy of the plain linear weights for steps of 4..16 tokens, which
            run padded to 16 rows (paged runner; a second copy of the linear weights'
            memory, so turn it off for models that barely fit in RAM).
        decode_workspace_bytes: accepted and validated, no effect (as ``fuse_projections``).
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


@dataclass(kw_only=True)
class HFFaceFields(EngineOptionFields):
    """The keyword-only fields both HF faces add to :class:`EngineOptionFields`.

    4-bit options (validated by :func:`~sagellm_backend.engine.hf.loader.bnb_4bit_fields`;
    they may differ from their defaults only with ``load_in_4bit=True``) and tensor
    parallelism (validated by :func:`~sagellm_backend.engine.hf.distributed.check_tp_fields`).
    """

    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: str | None = None
    bnb_4bit_use_double_quant: bool = True
    tensor_parallel_size: int = 1
    distributed_backend: str = "auto"
    distributed_timeout_s: float = 60.0


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


class MockModeServing:
    """The ``mock_mode`` choice of an HF engine face: a mock-model serving set (no torch).

    The engine keeps its own validation, limits (``max_new_tokens`` caps ``max_tokens``,
    ``max_input_tokens``) and life cycle; only the runner (the
    :class:`~sagellm_backend.engine.runners.mock.MockRunner`), tokenizer and KV geometry
    are the mock's. It runs on the config's provider, or a fresh MockBackendProvider; its
    component_trace ends with ``"mock"``.
    """

    def __init__(self, config: EngineConfig, engine_name: str, from_core: bool) -> None:
        from sagellm_backend.engine._plugin import core_component_trace
        from sagellm_backend.engine.mock.tokenizer import MockTokenizer

        self.trace = [*core_component_trace(engine_name, from_core), "mock"]
        self.tokenizer = MockTokenizer()
        self.max_batch_size = config.max_batch_size
        self.max_new_tokens: int | None = getattr(config, "max_new_tokens", None)

    def build(self, provider: Any, options: EngineOptions) -> tuple[Any, Serving]:
        """(provider, serving set); a MockBackendProvider when ``provider`` is None."""
        from sagellm_backend.engine.mock.engine import DEFAULT_MOCK_CONTEXT, make_mock_serving

        if provider is None:
            from sagellm_backend.providers.mock import MockBackendProvider

            provider = MockBackendProvider()
        context = options.max_model_len or DEFAULT_MOCK_CONTEXT
        return make_mock_serving(
            provider,
            tokenizer=self.tokenizer,
            runner_options={},
            enable_prefix_caching=options.enable_prefix_caching,
            max_batch_size=self.max_batch_size,
            limits=RequestLimits(
                vocab_size=self.tokenizer.vocab_size,
                max_context=context,
                max_input_tokens=options.max_input_tokens,
                max_new_tokens=self.max_new_tokens,
            ),
        )


def make_mock_engine(config: EngineConfig, engine_name: str, from_core: bool) -> MockModeServing:
    """The one place ``mock_mode`` is looked at: what an HF face serves with in mock mode."""
    return MockModeServing(config, engine_name, from_core)


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


def build_runner(
    model: Any,
    kv: KVCacheManager,
    provider: Any,
    *,
    model_path: str,
    options: EngineOptions,
    max_batch_size: int,
    context: int,
) -> ModelRunner:
    """The model runner for ``model`` over ``kv`` (the one place the engine gets a runner).

    Delegates to :func:`~sagellm_backend.engine.runners.select.select_runner`
    (``options.runner``: ``"paged"``, ``"hf"`` or ``"auto"``).

    Raises:
        ConfigError: the requested runner cannot serve this model or provider.
    """
    from sagellm_backend.engine.runners.select import select_runner

    runner: ModelRunner = select_runner(
        model,
        kv.storage,
        block_size=options.block_size,
        max_context=context,
        runner=options.runner,
        max_batch_size=max_batch_size,
        prepack_weights=options.prepack_weights,
    )
    return runner


def _uses_paged_kv(options: EngineOptions, model: Any, model_path: str) -> bool:
    """Whether the runner for ``model`` keeps K/V in pages (ConfigError for a refused 'paged')."""
    from sagellm_backend.engine.runners.select import describe_runner

    kind, reason = describe_runner(model, options.runner)
    _log.info("runner %s for %s: %s", kind, model_path, reason)
    return kind == "paged"


class _HFDetok(Detokenizer):
    """Incremental detokenization through the model's tokenizer."""

    __slots__ = ("_inner",)

    def __init__(self, tokenizer: Any) -> None:
        from sagellm_backend.engine.hf.detok import IncrementalDetokenizer

        self._inner = IncrementalDetokenizer(tokenizer)

    def add(self, ids: list[int]) -> str:
        return str(self._inner.add(ids))

    def flush(self) -> str:
        return str(self._inner.flush())


def _hf_tokenize(tokenizer: Any) -> Any:
    def tokenize(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])

    return tokenize


def _release_kv(provider: Any, kv: Any) -> None:
    release = getattr(provider, "release_kv_manager", None)
    if callable(release):
        release(kv)


def _release_serving(provider: Any, kv: Any, tp: Any) -> None:
    """Stop the tensor-parallel workers (if any), then give the KV pool back."""
    try:
        if tp is not None:
            tp.shutdown()
    finally:
        _release_kv(provider, kv)


def _weak_thread_init(engine: HFEngineCore) -> Any:
    """``engine._thread_init`` without a strong reference to the engine."""
    ref = weakref.ref(engine)

    def init() -> None:
        target = ref()
        if target is not None:
            target._thread_init()

    return init


def _inference_mode() -> Any:
    import torch

    return torch.inference_mode()


class HFEngineCore(ScheduledEngine):
    """Continuous-batching engine over a Hugging Face causal LM (see module docstring).

    Subclasses set :attr:`ENGINE_NAME` and implement :meth:`backend_type`,
    :meth:`_make_provider` and (optionally) :meth:`_thread_init`.

    Args:
        config: the face's config (already validated by it).
        load: how to load the model (ignored in mock mode).
        options: tuning options.
        mock_engine: in mock mode, what :func:`make_mock_engine` returned (a mock runner
            instead of the model).
        from_core: created through sagellm-core (affects ``component_trace``).
    """

    ENGINE_NAME: ClassVar[str] = "HFEngineCore"
    kv_visible_after_stop = True
    #: Appended to the wrong-provider error of :meth:`_check_provider`.
    PROVIDER_HINT: ClassVar[str] = ""

    def __init__(
        self,
        config: EngineConfig,
        load: LoadSettings | None,
        options: EngineOptions,
        *,
        mock_engine: MockModeServing | None = None,
        from_core: bool = False,
    ) -> None:
        from sagellm_backend.engine._plugin import core_component_trace

        trace_base = core_component_trace(type(self).__name__, from_core)
        super().__init__(
            config, component_trace=list(mock_engine.trace if mock_engine else trace_base)
        )
        self._load_settings = load
        self._options = options
        self._mock = mock_engine
        self._from_core = from_core
        self._trace_base = trace_base
        self._owns_provider = False
        self._model: Any = None
        self._tokenizer: Any = mock_engine.tokenizer if mock_engine is not None else None
        self._eos: frozenset[int] = frozenset()
        self._max_context = 0
        self._vocab_size = 0
        self._runner_name: str | None = None
        self._quantization: str | None = None
        self._tp: Any = None  # distributed.TensorParallelGroup when tensor_parallel_size > 1
        self.load_in_thread = mock_engine is None

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
    def model(self) -> Any:
        """The loaded transformers model (None before start or in mock mode)."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (the mock's in mock mode; None before the first start otherwise)."""
        return self._tokenizer

    @property
    def runner_name(self) -> str | None:
        """``"paged"``, ``"hf-batched"`` or ``"mock"`` once started (None before)."""
        return self._runner_name

    @property
    def max_context(self) -> int:
        """Longest prompt + output once started (0 before)."""
        return self._max_context

    # ------------------------------------------------------------------ serving set
    def _build_serving(self) -> Serving:
        if self._mock is not None:
            provider, serving = self._mock.build(self._provider, self._options)
            self._provider = provider
            self._max_context = serving.limits.max_context
            self._vocab_size = serving.limits.vocab_size
            self._runner_name = serving.runner.name
            return serving
        return self._build_hf_serving()

    def _load_model(self, provider: Any) -> None:
        """Load model and tokenizer once (kept across stop/start)."""
        from sagellm_backend.engine.hf.loader import quantization_name
        from sagellm_backend.engine.hf.runner import model_context_length

        load = self._load_settings
        assert load is not None
        tp = None
        if getattr(self.config, "tensor_parallel_size", 1) > 1:
            from sagellm_backend.engine.hf.distributed import TensorParallelGroup

            tp = TensorParallelGroup(
                self.config, load, self._options, provider, self.backend_type()
            )
            load = tp.load  # one device per rank
            tp.launch()  # spawned workers load the model while this rank does
        try:
            model, tokenizer = self._load_files(load, provider)
            if tp is not None:  # this rank's shard (under torchrun, ranks > 0 serve here, exit)
                model = tp.shard(model)
        except BaseException:
            if tp is not None:
                tp.shutdown()
            raise
        self._tp = tp
        self._quantization = quantization_name(
            load.load_in_8bit, load.load_in_4bit, load.bnb_4bit_quant_type
        )
        context = model_context_length(model.config)
        if self._options.max_model_len is not None:
            context = min(context, self._options.max_model_len)
        eos: set[int] = set()
        for source in (getattr(model, "generation_config", None), tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, list | tuple):
                eos.update(int(v) for v in value)
        self._model = model
        self._tokenizer = tokenizer
        self._eos = frozenset(eos)
        self._max_context = context

    @staticmethod
    def _load_files(load: LoadSettings, provider: Any) -> tuple[Any, Any]:
        """Model and tokenizer from ``load`` (transformers, bitsandbytes)."""
        from sagellm_backend.engine.hf.loader import load_model_and_tokenizer

        return load_model_and_tokenizer(
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

    def _build_hf_serving(self) -> Serving:
        """Provider, model (first time), KV manager, runner and scheduler (worker thread).

        Whatever is taken from the provider is given back if a later part fails.
        """
        from sagellm_backend.capability import DType
        from sagellm_backend.engine.hf.runner import model_compute_dtype
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
            self._provider = provider
        self._check_provider(provider)
        if self._model is None:
            self._load_model(provider)
        elif self._tp is not None:  # tensor parallelism: fresh workers after a stop()
            self._tp.relaunch_workers()
        model = self._model
        tp = self._tp
        paged = _uses_paged_kv(opts, model, load.model_path)
        kv_dtype = {
            "torch.float32": DType.FP32,
            "torch.float16": DType.FP16,
            "torch.bfloat16": DType.BF16,
        }.get(str(model_compute_dtype(model)), DType.FP16)
        spec = KVSpec.from_model_config(model.config, block_size=opts.block_size, dtype=kv_dtype)
        kv: KVCacheManager = provider.create_kv_manager(
            spec,
            memory_bytes=opts.kv_cache_memory_bytes,
            enable_prefix_caching=opts.enable_prefix_caching and paged,
        )
        try:
            runner = build_runner(
                model,
                kv,
                provider,
                model_path=load.model_path,
                options=opts,
                max_batch_size=load.max_batch_size,
                context=self._max_context,
            )
            if tp is not None:
                runner = tp.start(runner, kv, load.max_batch_size)
            tokenizer = self._tokenizer
            scheduler = Scheduler(
                kv,
                max_batch_size=load.max_batch_size,
                max_num_batched_tokens=opts.max_num_batched_tokens,
                max_context=self._max_context,
                eos_token_ids=self._eos,
                paged=runner.uses_paged_kv,
                decode=lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True)),
            )
        except BaseException:
            if tp is not None:
                tp.shutdown()
            _release_kv(provider, kv)
            raise
        self._vocab_size = runner.vocab_size
        self._runner_name = runner.name
        self._trace = [
            *self._trace_base,
            f"runner:{runner.name}",
            f"provider:{type(provider).__name__}",
            f"weights:{self._quantization}",
        ]
        return Serving(
            scheduler=scheduler,
            runner=runner,
            limits=RequestLimits(
                vocab_size=runner.vocab_size,
                max_context=self._max_context,
                max_input_tokens=opts.max_input_tokens,
                max_new_tokens=load.max_new_tokens,
            ),
            tokenize=_hf_tokenize(tokenizer),
            new_detok=lambda: _HFDetok(tokenizer),
            release=lambda: _release_serving(provider, kv, tp),
            # a step blocked on a hung rank ends when the group is torn down
            interrupt=tp.shutdown if tp is not None else None,
            threaded=True,
            thread_init=_weak_thread_init(self),
            thread_context=_inference_mode,
        )

    async def health_check(self) -> bool:
        """True when running, the step loop is alive and (TP) every rank is reachable."""
        if self._tp is not None and not self._tp.healthy:
            return False
        return await super().health_check()

    # ------------------------------------------------------------------ info
    def get_info(self) -> dict[str, Any]:
        """Engine description plus model, runner, scheduler and KV figures."""
        info = super().get_info()
        info.update(
            mock_mode=self._mock is not None,
            runner=self.runner_name,
            max_context=self._max_context,
            options=dataclasses.asdict(self._options),
            provider=type(self._provider).__name__ if self._provider is not None else None,
        )
        if self._tp is not None:
            info["tensor_parallel"] = self._tp.info()
        if self._model is not None and self._quantization is not None:
            from sagellm_backend.engine.hf.loader import weight_memory

            # Measured now: bitsandbytes may repack its state on the first forward.
            weights = weight_memory(self._model, self._quantization)
            info["weight_memory_bytes"] = weights.total_bytes
            info["weight_memory"] = dataclasses.asdict(weights)
            info["quantization"] = weights.quantization
        return info
