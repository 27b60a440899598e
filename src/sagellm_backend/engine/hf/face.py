"""What the HF engine faces (CPUEngine, HFCudaEngine) share besides the engine core.

* :class:`HFFaceFields` -- the keyword-only config fields both faces add to
  :class:`~sagellm_backend.engine.options.EngineOptionFields` (4-bit options, tensor
  parallelism);
* the field checks of the face configs (:func:`check_common_fields`, :func:`check_bool`,
  :func:`check_positive_int`; all through :mod:`sagellm_backend._validate`);
* :class:`LoadSettings` -- how a face loads its model, mapped from its config;
* the factory helpers :func:`face_config_fields` and :func:`with_provider`;
* :class:`MockModeServing` / :func:`make_mock_engine` -- the ``mock_mode`` choice.

Importing this module imports neither torch nor transformers.

Invariants: every check raises :class:`~sagellm_backend.errors.ConfigError` naming
``<owner>.<field>``, the bad value and what is valid.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sagellm_backend._validate import check_bool as _check_bool
from sagellm_backend._validate import check_int, check_text, invalid
from sagellm_backend.engine._streaming import RequestLimits
from sagellm_backend.engine.base import EngineConfig
from sagellm_backend.engine.options import EngineOptionFields, EngineOptions
from sagellm_backend.errors import ConfigError

if TYPE_CHECKING:
    from sagellm_backend.engine._plugin import PluginEngineSettings
    from sagellm_backend.engine.sched.engine import Serving

__all__ = [
    "HFFaceFields",
    "LoadSettings",
    "MockModeServing",
    "check_bool",
    "check_common_fields",
    "check_positive_int",
    "face_config_fields",
    "hf_unavailable_reason",
    "make_mock_engine",
    "with_provider",
]


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


def check_bool(owner: str, name: str, value: Any) -> bool:
    """Return ``value`` when it is a bool, else raise ConfigError naming ``owner.name``."""
    return _check_bool(
        f"{owner}.{name}", value, valid="True or False", verb="is required and must be"
    )


def check_positive_int(owner: str, name: str, value: Any) -> int:
    """Return ``value`` when it is an int > 0, else raise ConfigError naming ``owner.name``."""
    return check_int(
        f"{owner}.{name}",
        value,
        valid="an integer > 0 (e.g. 8)",
        verb="is required and must be",
    )


def check_common_fields(owner: str, config: Any) -> None:
    """Validate the :class:`~sagellm_backend.engine.base.EngineConfig` fields of a config.

    ``engine_id`` non-empty; ``model_path`` a non-empty string (None only with
    ``mock_mode``); ``mock_mode`` a bool; ``provider`` None or a backend provider;
    ``metadata`` a dict.

    Raises:
        ConfigError: naming the field, the bad value and what is valid.
    """
    from sagellm_backend.engine._plugin import is_backend_provider

    check_text(f"{owner}.engine_id", config.engine_id)
    check_bool(owner, "mock_mode", config.mock_mode)
    path = config.model_path
    if path is None and not config.mock_mode:
        raise ConfigError(
            f"{owner}.model_path is required: a Hugging Face model directory or hub id "
            "('org/name'); got None"
        )
    check_text(
        f"{owner}.model_path", path, optional=True, valid="a model directory or hub id string"
    )
    if config.provider is not None and not is_backend_provider(config.provider):
        raise ConfigError(
            f"{owner}.provider must be None or a backend provider, "
            f"got {type(config.provider).__name__}"
        )
    if not isinstance(config.metadata, dict):
        raise invalid(f"{owner}.metadata", "a dict", config.metadata)


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
        from sagellm_backend.engine.mock.config import DEFAULT_MOCK_CONTEXT
        from sagellm_backend.engine.mock.serving import make_mock_serving

        if provider is None:
            from sagellm_backend.providers.mock import MockBackendProvider

            provider = MockBackendProvider()
        context = options.max_model_len or DEFAULT_MOCK_CONTEXT
        return make_mock_serving(
            provider,
            tokenizer=self.tokenizer,
            runner_options={},
            options=dataclasses.replace(options, kv_cache_memory_bytes=None),
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
    """How an engine face loads its model (mapped from its config by :meth:`from_config`).

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

    @classmethod
    def from_config(
        cls,
        config: HFFaceFields,
        *,
        device: str,
        dtype: str,
        device_map: str | dict[str, Any] | None,
        low_cpu_mem_usage: bool,
    ) -> LoadSettings:
        """The settings of a validated face config; the face gives what it names its own way.

        ``model_path``, ``max_new_tokens``, ``max_batch_size``, the quantisation flags,
        ``trust_remote_code`` and the 4-bit options are read from ``config``.
        """
        from sagellm_backend.engine.hf.loader import bnb_4bit_fields

        model_path = config.model_path
        max_new_tokens = getattr(config, "max_new_tokens", None)
        assert model_path is not None and max_new_tokens is not None
        return cls(
            model_path=model_path,
            device=device,
            dtype=dtype,
            device_map=device_map,
            load_in_8bit=bool(getattr(config, "load_in_8bit", False)),
            load_in_4bit=bool(getattr(config, "load_in_4bit", False)),
            trust_remote_code=bool(getattr(config, "trust_remote_code", False)),
            low_cpu_mem_usage=low_cpu_mem_usage,
            max_new_tokens=max_new_tokens,
            max_batch_size=config.max_batch_size,
            **bnb_4bit_fields(config),
        )

    def loader_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``load_model_and_tokenizer`` (all but the model path)."""
        skip = ("model_path", "max_new_tokens", "max_batch_size")
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }
