"""HFCudaEngine: the HF engine core on a CUDA GPU (0.1.1.2 API, continuous batching inside).

Every documented field of :class:`HFCudaEngineConfig` is required (no implicit defaults)
and validated at construction. The engine loads the model with transformers (dtype,
device_map through accelerate, bitsandbytes 8/4-bit, trust_remote_code) and serves it with
the shared core of :mod:`sagellm_backend.engine.hf.core`: continuous batching in a worker
thread, paged KV in the CUDA provider's pool, prefix caching, streaming with cancellation.

Provider: the config's ``provider`` when injected; otherwise a
:class:`~sagellm_backend.providers.cuda.CudaBackendProvider` for ``device`` is created at
``start()`` (a clear :class:`~sagellm_backend.errors.BackendNotAvailableError` when CUDA is
not there). ``mock_mode=True`` serves simulated generations through a
:class:`~sagellm_backend.engine.mock.MockEngine` on a
:class:`~sagellm_backend.providers.mock.MockBackendProvider`; ``device`` still names a
CUDA device (the CUDA semantics are kept in the config) and nothing needs torch,
transformers or the hub. Nothing in this module touches a device API: device work goes through the
provider.

Example (the published configuration)::

    config = HFCudaEngineConfig(
        engine_id="hf-001", model_path="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        device="cuda:0", dtype="float16", device_map="auto", load_in_8bit=False,
        load_in_4bit=False, trust_remote_code=False, max_new_tokens=256, max_batch_size=8)
    engine = HFCudaEngine(config)
    await engine.start()
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# 0.1.1.2 exported these names from this module; kept for code that imports them here.
from sagellm_protocol import KVAllocateParams as KVAllocateParams
from sagellm_protocol import KVDType as KVDType
from sagellm_protocol import KVEvictReason as KVEvictReason
from sagellm_protocol import KVHandle as KVHandle
from sagellm_protocol import KVLayout as KVLayout
from sagellm_protocol import Metrics as Metrics
from sagellm_protocol import Request as Request
from sagellm_protocol import Response as Response
from sagellm_protocol import StreamEventDelta as StreamEventDelta
from sagellm_protocol import StreamEventEnd as StreamEventEnd
from sagellm_protocol import StreamEventStart as StreamEventStart
from sagellm_protocol import Timestamps as Timestamps

from sagellm_backend.base import BackendProvider as BackendProvider  # 0.1.1.2 export
from sagellm_backend.engine.base import BaseEngine as BaseEngine  # 0.1.1.2 export
from sagellm_backend.engine.base import EngineConfig
from sagellm_backend.engine.hf import face
from sagellm_backend.engine.hf._serving_parts import device_type, host_provider
from sagellm_backend.engine.hf.core import HFEngineCore
from sagellm_backend.engine.hf.face import HFFaceFields, LoadSettings, check_bool
from sagellm_backend.engine.hf.loader import bnb_4bit_fields, check_bnb_options
from sagellm_backend.engine.options import resolve_engine_options
from sagellm_backend.errors import ConfigError

if TYPE_CHECKING:
    from sagellm_backend.kv.spec import KVSpec

__all__ = ["HFCudaEngine", "HFCudaEngineConfig", "create_cuda_engine"]

_DTYPES = ("float16", "bfloat16", "float32", "auto")
_DEVICE_RE = re.compile(r"^cuda(:\d+)?$")
_DEVICE_MAP_RE = re.compile(r"^cuda:\d+$")


@dataclass
class HFCudaEngineConfig(HFFaceFields):
    """Configuration of :class:`HFCudaEngine`; the documented fields are all required.

    Required (None is rejected): ``engine_id``, ``model_path``, ``device`` (``"cuda"`` or
    ``"cuda:N"`` in every mode: with ``mock_mode=True`` the CUDA semantics are kept and a
    mock provider serves underneath; the CPU is :class:`~sagellm_backend.engine.cpu.CPUEngine`'s
    job), ``dtype`` (``float16``, ``bfloat16``, ``float32`` or ``auto``), ``device_map``
    (``"auto"``, ``"cuda:N"`` or a dict module -> device), ``load_in_8bit`` and
    ``load_in_4bit`` (bools, at most one True; bitsandbytes,
    ``pip install 'isagellm-backend[quant]'``), ``trust_remote_code`` (bool),
    ``max_new_tokens`` (``> 0``) and ``max_batch_size`` (``> 0``).

    Optional 4-bit options, keyword-only (they may differ from their defaults only with
    ``load_in_4bit=True``): ``bnb_4bit_quant_type`` (``"nf4"``, default, or ``"fp4"``),
    ``bnb_4bit_compute_dtype`` (None, default: ``dtype``, float16 for ``auto``; or
    ``float16`` / ``bfloat16`` / ``float32``), ``bnb_4bit_use_double_quant`` (default True).
    A ``dtype`` or compute dtype the GPU has no arithmetic for (bfloat16 before sm80) is
    rejected at ``start()``, before anything is loaded.

    Optional tuning, keyword-only (see
    :class:`~sagellm_backend.engine.options.EngineOptions`; each may also be a ``metadata``
    key): ``kv_cache_memory_bytes``, ``block_size``,
    ``enable_prefix_caching``, ``max_num_batched_tokens``, ``max_model_len``,
    ``max_input_tokens``, ``runner``, ``fuse_projections``, ``prepack_weights``,
    ``decode_workspace_bytes``; tensor parallelism: ``tensor_parallel_size`` (default 1;
    must divide the heads, kv heads and MLP width, at most the visible GPUs; each rank
    holds its shard on one GPU, ``device_map`` is then ignored), ``distributed_backend``
    (``"auto"`` = nccl, ``"nccl"``, ``"gloo"``), ``distributed_timeout_s``.

    Raises:
        ConfigError: at construction, naming the field, the bad value and a valid example.
    """

    device: str | None = None  # type: ignore[assignment]  # required here
    max_batch_size: int | None = None  # type: ignore[assignment]  # required here
    dtype: str | None = None
    device_map: str | dict[str, Any] | None = None
    load_in_8bit: bool | None = None
    load_in_4bit: bool | None = None
    trust_remote_code: bool | None = None
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (called at construction and by the engine).

        Raises:
            ConfigError: the first invalid field, with what a valid value looks like.
        """
        owner = "HFCudaEngineConfig"
        face.check_common_fields(owner, self)
        if self.model_path is None:
            raise ConfigError(
                f"{owner}.model_path is required (e.g. 'TinyLlama/TinyLlama-1.1B-Chat-v1.0' "
                "or a model directory), got None"
            )
        device = self.device
        if device is None:
            raise ConfigError(
                f"{owner}.device is required: 'cuda' or 'cuda:N' (e.g. 'cuda:0'), also with "
                "mock_mode=True; got None"
            )
        if not isinstance(device, str) or not _DEVICE_RE.match(device):
            raise ConfigError(
                f"{owner}.device must start with 'cuda': 'cuda' or 'cuda:N' (e.g. 'cuda:0'), "
                f"in every mode including mock_mode; got {device!r} (CPUEngine serves the CPU)"
            )
        if self.dtype not in _DTYPES:
            raise ConfigError(f"{owner}.dtype is required, one of {_DTYPES}; got {self.dtype!r}")
        dm = self.device_map
        if isinstance(dm, dict):
            if not dm or not all(isinstance(k, str) for k in dm):
                raise ConfigError(
                    f"{owner}.device_map dict must map module names to devices, e.g. "
                    f"{{'': 'cuda:0'}}; got {dm!r}"
                )
        elif not (isinstance(dm, str) and (dm == "auto" or _DEVICE_MAP_RE.match(dm))):
            raise ConfigError(
                f"{owner}.device_map is required: 'auto', 'cuda:N' (e.g. 'cuda:0') or a dict "
                f"module -> device (e.g. {{'': 'cuda:0'}}); got {dm!r}"
            )
        load_8 = check_bool(owner, "load_in_8bit", self.load_in_8bit)
        load_4 = check_bool(owner, "load_in_4bit", self.load_in_4bit)
        if load_8 and load_4:
            raise ConfigError(
                f"{owner}.load_in_8bit and load_in_4bit are mutually exclusive; set at most "
                "one to True"
            )
        check_bnb_options(
            owner,
            load_in_8bit=load_8,
            load_in_4bit=load_4,
            **bnb_4bit_fields(self),
        )
        check_bool(owner, "trust_remote_code", self.trust_remote_code)
        face.check_positive_int(owner, "max_new_tokens", self.max_new_tokens)
        face.check_positive_int(owner, "max_batch_size", self.max_batch_size)
        resolve_engine_options(owner, self)
        from sagellm_backend.engine.hf.distributed import check_tp_fields

        check_tp_fields(owner, self, "cuda")


class HFCudaEngine(HFEngineCore):
    """The HF engine core on a CUDA GPU (see the module docstring).

    Args:
        config: an :class:`HFCudaEngineConfig` (validated again here).
        from_core: created through sagellm-core (``component_trace`` starts with it).
    """

    ENGINE_NAME = "HFCudaEngine"
    BACKEND_TYPE = "cuda"
    PRIORITY = 100  # the highest built-in engine
    PROVIDER_HINT = "; use mock_mode=True for a simulation"
    INFO_FIELDS = ("dtype", "device_map", "load_in_8bit", "load_in_4bit", "max_new_tokens")

    def __init__(
        self, config: HFCudaEngineConfig | EngineConfig, *, from_core: bool = False
    ) -> None:
        if not isinstance(config, HFCudaEngineConfig):
            if not isinstance(config, EngineConfig):
                raise ConfigError(
                    f"HFCudaEngine needs an HFCudaEngineConfig, got {type(config).__name__}"
                )
            base = {f.name: getattr(config, f.name) for f in dataclasses.fields(EngineConfig)}
            config = HFCudaEngineConfig(**base)  # the required fields are missing: raises
        config.validate()
        options = resolve_engine_options("HFCudaEngineConfig", config)
        assert config.device is not None and config.dtype is not None
        load = LoadSettings.from_config(
            config,
            device=config.device,
            dtype=config.dtype,
            device_map=config.device_map,
            low_cpu_mem_usage=True,
        )
        mock = (
            face.make_mock_engine(config, type(self).__name__, from_core)
            if config.mock_mode
            else None
        )
        super().__init__(config, load, options, mock_engine=mock, from_core=from_core)
        self._cuda_config = config
        self._on_host = False  # no CUDA here: the model runs on the CPU (see _make_provider)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why the engine cannot run here (missing packages or no CUDA device), or None."""
        return face.hf_unavailable_reason() or _no_cuda_reason()

    def _make_provider(self) -> Any:
        """A cuda provider; on a machine without CUDA, a MockBackendProvider (as documented).

        The seed's rule ("mock_mode=True or a non-CUDA device: MockBackendProvider"): with
        no CUDA device the engine takes a mock provider and, through
        :meth:`_make_device_provider`, runs the model on the host CPU, with a WARNING.
        """
        if _no_cuda_reason() is None:
            return self._make_cuda_provider()
        from sagellm_backend.providers.mock import MockBackendProvider

        return MockBackendProvider()

    def _make_cuda_provider(self) -> Any:
        from sagellm_backend.providers.cuda import create_cuda_backend

        options: dict[str, Any] = {"device": self._cuda_config.device}
        if self._options.kv_cache_memory_bytes is not None:
            options["kv_memory_bytes"] = self._options.kv_cache_memory_bytes
        return create_cuda_backend(options)

    def _make_device_provider(self) -> Any:
        """Beside a mock provider: the cuda provider, or without CUDA the host CPU's.

        Without CUDA the model is loaded on the CPU (``device_map`` None), as 0.1.1.2 did;
        a WARNING says so, since every step then runs on the host.
        """
        reason = _no_cuda_reason()
        if reason is None:
            return self._make_cuda_provider()
        self._run_on_host(reason, "a MockBackendProvider")
        return host_provider(self._options)

    def _check_provider(self, provider: Any) -> None:
        """Accept a cuda or mock provider; without CUDA also a cpu one.

        A cpu provider is sagellm-core's ``cpu`` backend, on which 0.1.1.2's engine ran where
        there was no CUDA.

        Raises:
            ConfigError: any other provider, or a cpu one on a machine with CUDA.
        """
        if device_type(provider) == "cpu" and _no_cuda_reason() is not None:
            return
        super()._check_provider(provider)

    def _device_for(self, provider: Any) -> Any:
        """A cpu provider (no CUDA here, see :meth:`_check_provider`) runs the model itself."""
        if device_type(provider) == "cpu":
            self._run_on_host(_no_cuda_reason() or "", f"the {type(provider).__name__}")
            self._device_provider = None
            return provider
        return super()._device_for(provider)

    def _run_on_host(self, reason: str, provider: str) -> None:
        """Load the model on the CPU (no CUDA here), with a WARNING naming why."""
        import logging

        logging.getLogger(__name__).warning(
            "HFCudaEngine %r: no CUDA device (%s); running the model on the CPU with %s, as "
            "documented for non-CUDA devices. Use CPUEngine to run on the CPU on purpose, or "
            "mock_mode=True for a simulation.",
            self.engine_id,
            reason,
            provider,
        )
        load = self._load_settings
        if load is not None and load.device != "cpu":
            self._load_settings = dataclasses.replace(load, device="cpu", device_map=None)
        self._on_host = True

    def _kv_pages_wanted(self, spec: KVSpec, max_batch_size: int) -> int | None:
        """On the host (no CUDA): CPUEngine's rule, the full context of every sequence."""
        if self._on_host:
            return self._full_context_pages(spec, max_batch_size)
        return None


def _no_cuda_reason() -> str | None:
    """Why there is no usable CUDA device here (None: there is one)."""
    from sagellm_backend.providers.cuda import unavailable_reason

    return unavailable_reason()


#: What :func:`create_cuda_engine` uses for documented fields a sagellm-core config lacks.
FACTORY_DEFAULTS: dict[str, Any] = {
    "dtype": "auto",
    "device_map": "auto",
    "load_in_8bit": False,
    "load_in_4bit": False,
    "trust_remote_code": False,
}


def create_cuda_engine(config: Any = None, backend: Any = None) -> HFCudaEngine:
    """``sagellm.engines`` entry points ``cuda`` / ``hf_cuda``: build an :class:`HFCudaEngine`.

    Args:
        config: an :class:`HFCudaEngineConfig` (used as is), a sagellm-core
            ``EngineConfig`` or a dict. ``model``/``model_path``, ``device`` (default
            ``"cuda:0"``), ``max_batch_size`` (required), ``max_output_tokens`` ->
            ``max_new_tokens`` (required, or give ``max_new_tokens``), ``max_input_tokens``
            are mapped; a dict may set any HFCudaEngineConfig field. Fields a sagellm-core
            config cannot carry take :data:`FACTORY_DEFAULTS` (dtype and device_map
            ``"auto"``, no quantisation, no remote code).
        backend: the provider sagellm-core created (a cuda provider).

    Attribute-style configs (dataclass, ``types.SimpleNamespace``, pydantic model) are read
    like a sagellm-core config; their attributes that are not HFCudaEngineConfig fields are
    ignored (a dict's unknown keys are an error).

    Raises:
        ConfigError: an unknown dict key, missing required fields (all named at once), a
            wrong kind, or an invalid value.
    """
    from sagellm_backend.engine._plugin import missing_fields_error, normalize_engine_config

    if isinstance(config, HFCudaEngineConfig):
        return HFCudaEngine(face.with_provider(config, backend))
    names = {f.name for f in dataclasses.fields(HFCudaEngineConfig)}
    settings = normalize_engine_config(config, backend, fields=names)
    if settings.kind is not None and settings.kind.lower().replace("-", "_") not in (
        "cuda",
        "hf_cuda",
        "hfcuda",
        "huggingface_cuda",
        "gpu",
    ):
        raise ConfigError(f"create_cuda_engine got engine kind {settings.kind!r}, expected 'cuda'")
    fields = face.face_config_fields(
        settings, HFCudaEngineConfig, "cuda", default_device="cuda:0", defaults=FACTORY_DEFAULTS
    )
    missing = []
    if settings.model_path is None:
        missing.append("model_path (or model)")
    if settings.max_batch_size is None:
        missing.append("max_batch_size")
    if settings.max_output_tokens is None and settings.extra.get("max_new_tokens") is None:
        missing.append("max_new_tokens (or max_output_tokens)")
    if missing:
        raise missing_fields_error(
            "cuda engine",
            missing,
            "{'model': 'TinyLlama/TinyLlama-1.1B-Chat-v1.0', 'max_batch_size': 8, "
            "'max_output_tokens': 256}",
        )
    return HFCudaEngine(HFCudaEngineConfig(**fields), from_core=settings.from_core)
