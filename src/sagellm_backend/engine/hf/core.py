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

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, ClassVar

from sagellm_backend.engine._streaming import RequestLimits
from sagellm_backend.engine.base import EngineConfig
from sagellm_backend.engine.hf._serving_parts import (
    HFDetok,
    bos_token_id,
    device_type,
    hf_tokenize,
    inference_mode,
    provider_dtypes,
    release_serving,
    uses_paged_kv,
    weak_thread_init,
)
from sagellm_backend.engine.hf._serving_parts import build_runner as build_runner
from sagellm_backend.engine.hf.face import HFFaceFields as HFFaceFields
from sagellm_backend.engine.hf.face import LoadSettings as LoadSettings
from sagellm_backend.engine.hf.face import MockModeServing as MockModeServing
from sagellm_backend.engine.hf.face import check_bool as check_bool
from sagellm_backend.engine.hf.face import check_common_fields as check_common_fields
from sagellm_backend.engine.hf.face import check_positive_int as check_positive_int
from sagellm_backend.engine.hf.face import face_config_fields as face_config_fields
from sagellm_backend.engine.hf.face import hf_unavailable_reason as hf_unavailable_reason
from sagellm_backend.engine.hf.face import make_mock_engine as make_mock_engine
from sagellm_backend.engine.hf.face import with_provider as with_provider
from sagellm_backend.engine.options import ENGINE_OPTION_DEFAULTS as ENGINE_OPTION_DEFAULTS
from sagellm_backend.engine.options import RUNNER_CHOICES as RUNNER_CHOICES
from sagellm_backend.engine.options import EngineOptionFields as EngineOptionFields
from sagellm_backend.engine.options import EngineOptions as EngineOptions
from sagellm_backend.engine.options import resolve_engine_options as resolve_engine_options
from sagellm_backend.engine.sched.engine import ScheduledEngine, Serving
from sagellm_backend.engine.sched.scheduler import Scheduler
from sagellm_backend.errors import ConfigError, KVCacheExhaustedError

if TYPE_CHECKING:
    from sagellm_backend.kv.manager import KVCacheManager
    from sagellm_backend.kv.spec import KVSpec

# The names imported "as" themselves from engine.hf.face and engine.options were defined
# here before; they are re-exported.
__all__ = ["HFEngineCore", "build_runner"]

_log = logging.getLogger(__name__)


class HFEngineCore(ScheduledEngine):
    """Continuous-batching engine over a Hugging Face causal LM (see module docstring).

    Subclasses set :attr:`ENGINE_NAME`, :attr:`BACKEND_TYPE`, :attr:`PRIORITY` and
    :attr:`INFO_FIELDS`, implement :meth:`_make_provider` and (optionally)
    :meth:`_thread_init`, and may extend :meth:`unavailable_reason`.

    Args:
        config: the face's config (already validated by it).
        load: how to load the model (ignored in mock mode).
        options: tuning options.
        mock_engine: in mock mode, what :func:`make_mock_engine` returned (a mock runner
            instead of the model).
        from_core: created through sagellm-core (affects ``component_trace``).
    """

    ENGINE_NAME: ClassVar[str] = "HFEngineCore"
    #: What :meth:`backend_type` returns (the kind a face serves, e.g. ``"cpu"``).
    BACKEND_TYPE: ClassVar[str] = ""
    #: What :meth:`priority` returns (auto-selection: higher wins among available engines).
    PRIORITY: ClassVar[int] = 0
    kv_visible_after_stop = True
    #: Appended to the wrong-provider error of :meth:`_check_provider`.
    PROVIDER_HINT: ClassVar[str] = ""
    #: Config fields :meth:`get_info` reports as they are (set by each face).
    INFO_FIELDS: ClassVar[tuple[str, ...]] = ()

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
        #: the provider the model's K/V and collectives use, when not ``_provider`` (a mock)
        self._device_provider: Any = None
        self._model: Any = None
        self._tokenizer: Any = mock_engine.tokenizer if mock_engine is not None else None
        self._eos: frozenset[int] = frozenset()
        self._max_context = 0
        self._vocab_size = 0
        self._runner_name: str | None = None
        self._quantization: str | None = None
        self._tp: Any = None  # distributed.TensorParallelGroup when tensor_parallel_size > 1
        self.load_in_thread = mock_engine is None

    # ------------------------------------------------------------------ kind, availability
    @classmethod
    def backend_type(cls) -> str:
        """The kind this face serves: :attr:`BACKEND_TYPE`."""
        return cls.BACKEND_TYPE

    @classmethod
    def priority(cls) -> int:
        """Auto-selection priority: :attr:`PRIORITY`."""
        return cls.PRIORITY

    @classmethod
    def is_available(cls) -> bool:
        """Whether the engine can run here: :meth:`unavailable_reason` is None.

        Imports neither torch nor transformers.
        """
        return cls.unavailable_reason() is None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why the engine cannot run here (missing packages, with the fix), or None.

        Faces that need more (a device) extend it.
        """
        return hf_unavailable_reason()

    # ------------------------------------------------------------------ face hooks
    def _make_provider(self) -> Any:
        """Create the provider this engine owns (called in a worker thread)."""
        raise NotImplementedError

    def _thread_init(self) -> None:
        """Thread settings for the scheduler thread (default: none)."""

    def _kv_pages_wanted(self, spec: KVSpec, max_batch_size: int) -> int | None:
        """Pages of the KV pool when ``kv_cache_memory_bytes`` is not set.

        None (the default): all the provider's budget leaves. A face may ask for fewer.
        """
        return None

    def _check_provider(self, provider: Any) -> None:
        """Reject a provider whose ``device_type`` is neither :meth:`backend_type` nor "mock".

        A provider whose capability has no ``device_type`` is accepted; so is a mock
        provider (sagellm-core's ``mock`` backend), whose engine computes on a provider of
        its own (see :meth:`_device_for`).

        Raises:
            ConfigError: naming the engine, the provider and its device type.
        """
        expected = self.backend_type()
        kind = device_type(provider)
        if kind not in (None, expected, "mock"):
            raise ConfigError(
                f"{self.ENGINE_NAME} needs a {expected} (or mock) provider, got "
                f"{type(provider).__name__} (device_type {kind!r}){self.PROVIDER_HINT}"
            )

    def _device_for(self, provider: Any) -> Any:
        """The provider that holds the model's K/V and runs its collectives.

        ``provider`` itself, unless it is a mock (``capability().device_type == "mock"``,
        e.g. sagellm-core's ``mock`` backend, as 0.1.1.2's engines took it): then one of this
        engine's own, made once by :meth:`_make_device_provider`. The mock stays the
        engine's ``provider``; the model computes on the real device, and the memory figures
        come from the provider that holds its K/V.
        """
        if device_type(provider) != "mock":
            self._device_provider = None
            return provider
        if self._device_provider is None:
            self._device_provider = self._make_device_provider()
        return self._device_provider

    def _make_device_provider(self) -> Any:
        """The provider :meth:`_device_for` computes on beside a mock (default: a new one)."""
        return self._make_provider()

    def _memory_provider(self) -> Any:
        """Where the engine's memory figures come from: the provider holding the K/V."""
        return self._device_provider if self._device_provider is not None else self._provider

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
        """The runner's name once started (see ``runners.select.RUNNER_KINDS``; "mock").

        None before the first start.
        """
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

    def _create_kv(
        self, provider: Any, spec: KVSpec, max_batch_size: int, *, caching: bool
    ) -> KVCacheManager:
        """The engine's KV manager, sized in this order of preference.

        ``kv_cache_memory_bytes`` when set; else :meth:`_kv_pages_wanted` pages; else (no
        wish, or the budget holds fewer pages) all the provider's budget leaves.
        """
        memory = self._options.kv_cache_memory_bytes
        if memory is not None:
            self._pages_in(spec, memory)  # at least one page, or a ConfigError naming the field
        wanted = None if memory is not None else self._kv_pages_wanted(spec, max_batch_size)
        manager: KVCacheManager
        if wanted is not None:
            try:
                manager = provider.create_kv_manager(
                    spec, num_pages=wanted, enable_prefix_caching=caching
                )
                return manager
            except KVCacheExhaustedError:
                pass  # the budget holds less: take what it leaves
        try:
            manager = provider.create_kv_manager(
                spec, memory_bytes=memory, enable_prefix_caching=caching
            )
        except KVCacheExhaustedError as exc:
            if memory is None:
                raise
            raise KVCacheExhaustedError(f"kv_cache_memory_bytes={memory}: {exc}") from exc
        return manager

    def _accounting_kv(self, spec: KVSpec, max_batch_size: int) -> KVCacheManager:
        """A KV manager without storage, for runners that keep K/V in the model's caches.

        It admits and preempts as a pool of ``kv_cache_memory_bytes`` (or ``max_batch_size``
        full-context sequences) would, without taking that memory from the provider: on a
        GPU, a pool the runner never reads would leave the model's own caches half the
        memory.

        Raises:
            ConfigError: ``kv_cache_memory_bytes`` is smaller than one page.
        """
        from sagellm_backend.kv.manager import KVCacheManager

        memory = self._options.kv_cache_memory_bytes
        if memory is not None:
            pages = self._pages_in(spec, memory)
        else:
            pages = self._full_context_pages(spec, max_batch_size)
        return KVCacheManager.counting(spec, pages)

    def _pages_in(self, spec: KVSpec, memory: int) -> int:
        """KV pages of ``spec`` in ``memory`` bytes (``kv_cache_memory_bytes``).

        Raises:
            ConfigError: not even one page fits, naming the config field and the page size.
        """
        pages = spec.num_pages_for_bytes(memory)
        if pages < 1:
            raise ConfigError(
                f"{type(self.config).__name__}.kv_cache_memory_bytes={memory} is smaller than "
                f"one KV page of this model ({spec.page_bytes} bytes: block_size "
                f"{spec.block_size} x {spec.bytes_per_token} bytes per token)"
            )
        return pages

    def _full_context_pages(self, spec: KVSpec, max_batch_size: int) -> int:
        """Pages that hold ``max_batch_size`` sequences of the whole context (at least 1)."""
        return max(1, max_batch_size * -(-self._max_context // spec.block_size))

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
        wanted = self._options.max_model_len
        if wanted is not None:
            if wanted > context:
                _log.warning(
                    "%s %r: max_model_len=%d is longer than the model's context (%d "
                    "positions); serving %d",
                    self.ENGINE_NAME,
                    self.engine_id,
                    wanted,
                    context,
                    context,
                )
            context = min(context, wanted)
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
            load.model_path, **load.loader_kwargs(), device_dtypes=provider_dtypes(provider)
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
        provider = self._device_for(provider)
        if self._model is None:
            self._load_model(provider)
        elif self._tp is not None:  # tensor parallelism: fresh workers after a stop()
            self._tp.relaunch_workers()
        model = self._model
        tp = self._tp
        paged = uses_paged_kv(opts, model, load.model_path)
        kv_dtype = {
            "torch.float32": DType.FP32,
            "torch.float16": DType.FP16,
            "torch.bfloat16": DType.BF16,
        }.get(str(model_compute_dtype(model)), DType.FP16)
        try:
            spec = KVSpec.from_model_config(
                model.config, block_size=opts.block_size, dtype=kv_dtype
            )
        except ValueError:
            if paged:
                raise
            # An attention-free model (Mamba): the pool only accounts for tokens.
            spec = KVSpec(1, 1, 1, opts.block_size, kv_dtype)
        if paged:
            kv = self._create_kv(
                provider, spec, load.max_batch_size, caching=opts.enable_prefix_caching
            )
        else:  # the runner keeps K/V in the model's own caches: count tokens, hold no memory
            kv = self._accounting_kv(spec, load.max_batch_size)
        owner = provider if paged else None  # who the KV manager goes back to
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
                chunked_prefill=getattr(runner, "chunked_prefill", True),
                decode=lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True)),
            )
        except BaseException:
            release_serving(owner, kv, tp)
            raise
        self._vocab_size = runner.vocab_size
        self._runner_name = runner.name
        self._results.trace = [
            *self._trace_base,
            f"runner:{runner.name}",
            f"provider:{type(self._provider).__name__}",
            *([f"device:{type(provider).__name__}"] if provider is not self._provider else []),
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
                bos_token_id=bos_token_id(tokenizer, runner.vocab_size),
            ),
            tokenize=hf_tokenize(tokenizer),
            new_detok=lambda: HFDetok(tokenizer),
            release=lambda: release_serving(owner, kv, tp),
            # a step blocked on a hung rank ends when the group is torn down
            interrupt=tp.shutdown if tp is not None else None,
            threaded=True,
            thread_init=weak_thread_init(self),
            thread_context=inference_mode,
        )

    async def health_check(self) -> bool:
        """True when running, the step loop is alive and (TP) every rank is reachable."""
        if self._tp is not None and not self._tp.healthy:
            return False
        return await super().health_check()

    # ------------------------------------------------------------------ info
    def get_info(self) -> dict[str, Any]:
        """Engine description plus model, runner, scheduler and KV figures.

        Ends with the face's :attr:`INFO_FIELDS` (config values, e.g. ``max_new_tokens``).
        """
        info = super().get_info()
        info.update(
            runner=self.runner_name,
            max_context=self._max_context,
            options=dataclasses.asdict(self._options),
            provider=type(self._provider).__name__ if self._provider is not None else None,
        )
        if self._device_provider is not None:
            info["device_provider"] = type(self._device_provider).__name__
        if self._tp is not None:
            info["tensor_parallel"] = self._tp.info()
        if self._model is not None and self._quantization is not None:
            from sagellm_backend.engine.hf.loader import weight_memory

            # Measured now: bitsandbytes may repack its state on the first forward.
            weights = weight_memory(self._model, self._quantization)
            info["weight_memory_bytes"] = weights.total_bytes
            info["weight_memory"] = dataclasses.asdict(weights)
            info["quantization"] = weights.quantization
        info.update({name: getattr(self.config, name) for name in self.INFO_FIELDS})
        return info
