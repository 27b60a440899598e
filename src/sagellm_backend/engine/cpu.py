"""CPUEngine: the HF engine core on the host CPU (0.1.1.2 API, continuous batching inside).

``CPUEngine`` loads a Hugging Face causal LM on the CPU and serves concurrent requests with
iteration-level continuous batching, paged KV in the :class:`CPUBackendProvider`'s pool and
prefix caching (see :mod:`sagellm_backend.engine.hf.core`). Importing this module does not
import torch or transformers; ``start()`` does.

Example:
    >>> from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig
    >>> config = CPUEngineConfig(engine_id="cpu-0", model_path="/models/tiny-llama")
    >>> engine = CPUEngine(config)          # doctest: +SKIP
    >>> await engine.start()                # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# 0.1.1.2 exported these names from this module; kept for code that imports them here.
from sagellm_protocol import Metrics as Metrics
from sagellm_protocol import Request as Request
from sagellm_protocol import Response as Response
from sagellm_protocol import StreamEventDelta as StreamEventDelta
from sagellm_protocol import StreamEventEnd as StreamEventEnd
from sagellm_protocol import StreamEventStart as StreamEventStart
from sagellm_protocol import Timestamps as Timestamps

from sagellm_backend.engine.base import BaseEngine as BaseEngine  # 0.1.1.2 export
from sagellm_backend.engine.base import EngineConfig
from sagellm_backend.engine.hf import face
from sagellm_backend.engine.hf.core import HFEngineCore
from sagellm_backend.engine.hf.face import HFFaceFields, LoadSettings, check_bool
from sagellm_backend.engine.hf.loader import bnb_4bit_fields, check_bnb_options
from sagellm_backend.engine.options import resolve_engine_options
from sagellm_backend.errors import ConfigError

if TYPE_CHECKING:
    from sagellm_backend.kv.spec import KVSpec

__all__ = ["CPUEngine", "CPUEngineConfig", "create_cpu_engine"]

_VALID_DTYPES = ("float32", "float16", "bfloat16", "auto")


@dataclass
class CPUEngineConfig(HFFaceFields):
    """Configuration of :class:`CPUEngine` (the 0.1.1.2 fields, plus tuning options).

    Attributes:
        device: ``"cpu"`` (the default).
        max_new_tokens: most tokens one request produces (``> 0``; a request's
            ``max_tokens`` above it is capped).
        torch_dtype: ``float32`` (default), ``bfloat16``, ``float16`` or ``auto`` (the
            checkpoint's dtype). With quantisation: the dtype of the unquantised layers
            (embeddings, norms, ``lm_head``) and of the activations.
        trust_remote_code: allow model code shipped with the checkpoint.
        low_cpu_mem_usage: transformers 4.x loading option (5.x always loads lazily).
        load_in_8bit: bitsandbytes LLM.int8 weights (bitsandbytes >= 0.48, ``pip install
            'isagellm-backend[quant]'``); the int8 matmuls compute in float16.
        num_threads: torch intra-op threads (process-wide); None keeps torch's setting
            (with tensor parallelism: per rank, None = cores / tensor_parallel_size).
        load_in_4bit: bitsandbytes 4-bit weights (keyword-only; default False; not with
            ``load_in_8bit``).
        bnb_4bit_quant_type: ``"nf4"`` (default) or ``"fp4"`` (keyword-only, 4-bit only).
        bnb_4bit_compute_dtype: dtype the 4-bit layers compute in: None (default: the
            ``torch_dtype``, float32 for ``auto``), ``float32``, ``bfloat16`` or
            ``float16`` (keyword-only, 4-bit only).
        bnb_4bit_use_double_quant: quantise the 4-bit block scales too (keyword-only,
            default True, 4-bit only).
        tensor_parallel_size: processes the model is sharded over (keyword-only; ``1``:
            none); it must divide the attention heads, kv heads and MLP width.
        distributed_backend: ``"auto"`` (gloo here) or ``"gloo"`` (keyword-only).
        distributed_timeout_s: timeout of every collective between the ranks (keyword-only).
        kv_cache_memory_bytes, block_size, enable_prefix_caching, max_num_batched_tokens,
            max_model_len, max_input_tokens, runner, fuse_projections, prepack_weights,
            decode_workspace_bytes: see
            :class:`~sagellm_backend.engine.options.EngineOptions` (keyword-only, from
            :class:`~sagellm_backend.engine.options.EngineOptionFields`); each may also be
            given as a ``metadata`` key of the same name.

    Raises:
        ConfigError: at construction, naming the field, the bad value and what is valid.
    """

    device: str = "cpu"
    max_new_tokens: int = 128
    torch_dtype: str = "float32"
    trust_remote_code: bool = False
    low_cpu_mem_usage: bool = True
    load_in_8bit: bool = False
    num_threads: int | None = None
    load_in_4bit: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        owner = "CPUEngineConfig"
        face.check_common_fields(owner, self)
        if not self.mock_mode and self.device != "cpu":
            raise ConfigError(
                f"{owner}.device must be 'cpu' (use HFCudaEngine for GPUs, or mock_mode=True), "
                f"got {self.device!r}"
            )
        face.check_positive_int(owner, "max_batch_size", self.max_batch_size)
        face.check_positive_int(owner, "max_new_tokens", self.max_new_tokens)
        if self.torch_dtype not in _VALID_DTYPES:
            raise ConfigError(
                f"{owner}.torch_dtype must be one of {_VALID_DTYPES}, got {self.torch_dtype!r}"
            )
        for name in ("trust_remote_code", "low_cpu_mem_usage", "load_in_8bit", "load_in_4bit"):
            check_bool(owner, name, getattr(self, name))
        check_bnb_options(
            owner,
            load_in_8bit=self.load_in_8bit,
            load_in_4bit=self.load_in_4bit,
            **bnb_4bit_fields(self),
        )
        if self.num_threads is not None:
            face.check_positive_int(owner, "num_threads", self.num_threads)
        resolve_engine_options(owner, self)
        from sagellm_backend.engine.hf.distributed import check_tp_fields

        check_tp_fields(owner, self, "cpu")


class CPUEngine(HFEngineCore):
    """The HF engine core on the CPU (see :mod:`sagellm_backend.engine.hf.core`).

    Args:
        config: a :class:`CPUEngineConfig` (a plain
            :class:`~sagellm_backend.engine.base.EngineConfig` is converted, with the
            CPUEngineConfig defaults for the other fields).
        from_core: created through sagellm-core (``component_trace`` starts with it).
    """

    ENGINE_NAME = "CPUEngine"
    BACKEND_TYPE = "cpu"
    PRIORITY = 50  # above mock, below CUDA
    INFO_FIELDS = ("torch_dtype", "load_in_8bit", "load_in_4bit", "max_new_tokens", "num_threads")

    def __init__(self, config: CPUEngineConfig | EngineConfig, *, from_core: bool = False) -> None:
        if not isinstance(config, CPUEngineConfig):
            if not isinstance(config, EngineConfig):
                raise ConfigError(f"CPUEngine needs a CPUEngineConfig, got {type(config).__name__}")
            base = {f.name: getattr(config, f.name) for f in dataclasses.fields(EngineConfig)}
            if base["device"] == "mock" and not base["mock_mode"]:
                base["device"] = "cpu"  # the base default means "unspecified" here
            config = CPUEngineConfig(**base)
        options = resolve_engine_options("CPUEngineConfig", config)
        mock = None
        load = None
        if config.mock_mode:
            mock = face.make_mock_engine(config, type(self).__name__, from_core)
        else:
            load = LoadSettings.from_config(
                config,
                device="cpu",
                dtype=config.torch_dtype,
                device_map=None,
                low_cpu_mem_usage=config.low_cpu_mem_usage,
            )
        super().__init__(config, load, options, mock_engine=mock, from_core=from_core)
        self._cpu_config = config

    def _make_provider(self) -> Any:
        from sagellm_backend.engine.hf._serving_parts import host_provider

        return host_provider(self._options)

    def _kv_pages_wanted(self, spec: KVSpec, max_batch_size: int) -> int | None:
        """Enough pages for ``max_batch_size`` sequences of the full context, no more.

        Host memory is shared with everything else on the machine, so the pool is not
        sized to the whole budget (as on a GPU) when the model needs less; a larger model
        gets what the provider's budget leaves.
        """
        return self._full_context_pages(spec, max_batch_size)

    def _thread_init(self) -> None:
        n = self._cpu_config.num_threads
        if n is not None:
            import torch

            torch.set_num_threads(n)


def create_cpu_engine(config: Any = None, backend: Any = None) -> CPUEngine:
    """``sagellm.engines`` entry point ``cpu``: build a :class:`CPUEngine`.

    Args:
        config: a :class:`CPUEngineConfig` (used as is), a sagellm-core ``EngineConfig``
            (``model``/``model_path``, ``max_batch_size``, ``max_output_tokens`` ->
            ``max_new_tokens``, ``max_input_tokens``, ``device``), any attribute-style
            object (dataclass, ``types.SimpleNamespace``, pydantic model) carrying those
            and/or CPUEngineConfig fields (its other attributes are ignored), a dict with
            those keys (an unknown key is an error), or None (then ``model_path`` is
            missing and only ``mock_mode=True`` works).
        backend: the provider sagellm-core created (a cpu provider), used for the KV cache.

    Raises:
        ConfigError: an unknown dict key, a missing required field (``model_path`` unless
            ``mock_mode``), a wrong kind or an invalid value -- each named.
    """
    from sagellm_backend.engine._plugin import missing_fields_error, normalize_engine_config

    if isinstance(config, CPUEngineConfig):
        return CPUEngine(face.with_provider(config, backend))
    names = {f.name for f in dataclasses.fields(CPUEngineConfig)}
    settings = normalize_engine_config(config, backend, fields=names)
    if settings.kind is not None and settings.kind.lower() not in ("cpu", "hf_cpu", "cpu_engine"):
        raise ConfigError(f"create_cpu_engine got engine kind {settings.kind!r}, expected 'cpu'")
    fields = face.face_config_fields(settings, CPUEngineConfig, "cpu", default_device="cpu")
    if settings.model_path is None and not settings.extra.get("mock_mode"):
        raise missing_fields_error(
            "cpu engine",
            ["model_path (or model)"],
            "{'model_path': '/models/tiny-llama', 'max_batch_size': 8} (or mock_mode=True)",
        )
    return CPUEngine(CPUEngineConfig(**fields), from_core=settings.from_core)
