"""Load a Hugging Face causal LM and its tokenizer for the HF engines.

:func:`load_model_and_tokenizer` is the single place where the engines call
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.  It maps the
engine configuration (dtype name, device, device_map, 8/4-bit quantisation,
trust_remote_code) onto transformers' arguments and turns every predictable failure into a
library error that says what was wrong and what is valid:

* transformers / accelerate / bitsandbytes missing -> :class:`DependencyMissingError` with
  the ``pip install`` command;
* a path that does not exist and is not a hub id, a directory without ``config.json``, a
  hub id that cannot be fetched -> :class:`ConfigError` naming the path;
* a model type with no causal-LM class -> :class:`ConfigError` naming the ``model_type``
  and what is supported;
* a device torch cannot place the model on -> :class:`BackendNotAvailableError`.

Invariants of a successful return: the model is in ``eval()`` mode on the requested
device(s); ``tokenizer.pad_token_id`` is set whenever the tokenizer has an eos token (pad
falls back to eos), and ``model.generation_config.pad_token_id`` agrees with it.

Device handling stays a device *string*: no CUDA API is called here (device probing is the
providers' job).  Heavy imports happen inside the function.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from sagellm_backend.errors import BackendNotAvailableError, ConfigError, DependencyMissingError

__all__ = [
    "DEVICE_MAP_STRATEGIES",
    "VALID_DTYPES",
    "load_model_and_tokenizer",
    "resolve_torch_dtype",
    "supported_model_types",
]

logger = logging.getLogger(__name__)

#: dtype names the engines accept; ``"auto"`` keeps the checkpoint's own dtype.
VALID_DTYPES = ("float16", "bfloat16", "float32", "auto")
#: device_map strings accelerate understands besides a single device.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

_HF_INSTALL = "pip install 'isagellm-backend[hf]'"
_QUANT_INSTALL = "pip install 'isagellm-backend[quant]'"
_COMMON_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "opt", "falcon")
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _import_transformers() -> Any:
    try:
        import torch  # noqa: F401  (transformers needs it; report it by name)
        import transformers
    except ImportError as exc:
        raise DependencyMissingError(
            f"the HF engines need torch and transformers ({exc}); install them with: {_HF_INSTALL}"
        ) from exc
    return transformers


def resolve_torch_dtype(dtype: str) -> Any:
    """Map a dtype name to a ``torch.dtype`` (``"auto"`` stays the string ``"auto"``).

    Accepts the names in :data:`VALID_DTYPES` and the aliases fp16/half/bf16/fp32.

    Raises:
        ConfigError: unknown name.
    """
    if not isinstance(dtype, str):
        raise ConfigError(f"dtype must be a string, one of {VALID_DTYPES}; got {dtype!r}")
    name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in VALID_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; valid values: {VALID_DTYPES}")
    if name == "auto":
        return "auto"
    import torch

    return getattr(torch, name)


def supported_model_types() -> list[str]:
    """The ``model_type`` values transformers maps to a causal-LM class, sorted."""
    _import_transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _looks_like_hub_id(model_path: str) -> bool:
    if model_path.startswith(("/", ".", "~")) or os.path.isabs(model_path):
        return False  # a filesystem path, never a hub id
    try:
        hub_utils = importlib.import_module("huggingface_hub.utils")
        hub_utils.validate_repo_id(model_path)
    except Exception:
        return False
    return True


def _validate_device(device: str) -> None:
    if not isinstance(device, str) or not device:
        raise ConfigError(f"device must be a string such as 'cpu' or 'cuda:0'; got {device!r}")
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"device {device!r} is not a valid torch device string (e.g. 'cpu', 'cuda', "
            f"'cuda:1'): {exc}"
        ) from exc


def _validate_device_map(device_map: str | dict[str, Any] | None) -> None:
    if device_map is None or isinstance(device_map, dict):
        return
    if not isinstance(device_map, str):
        raise ConfigError(
            f"device_map must be None, a dict of module -> device, one of "
            f"{DEVICE_MAP_STRATEGIES} or a device string; got {device_map!r}"
        )
    if device_map in DEVICE_MAP_STRATEGIES:
        return
    try:
        _validate_device(device_map)
    except ConfigError as exc:
        raise ConfigError(
            f"device_map {device_map!r} is neither one of {DEVICE_MAP_STRATEGIES} nor a "
            "device string such as 'cuda:0'"
        ) from exc


def _read_model_type(config_file: Path) -> str:
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read model config {str(config_file)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"model config {str(config_file)!r} is not a JSON object")
    return str(data.get("model_type", ""))


def _check_causal_lm(config: Any, model_path: str, trust_remote_code: bool) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        return  # remote code provides its own causal-LM class
    hint = (
        " (its auto_map names AutoModelForCausalLM: pass trust_remote_code=True)"
        if "AutoModelForCausalLM" in auto_map
        else ""
    )
    common = [t for t in _COMMON_TYPES if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    raise ConfigError(
        f"model {model_path!r} has model_type {model_type!r}, which has no causal-LM class"
        f"{hint}; the HF engines run decoder (causal LM) models such as "
        f"{', '.join(common)} ({len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)} model types in all: "
        "see supported_model_types())"
    )


def _quantization_config(
    transformers: Any, load_in_8bit: bool, load_in_4bit: bool, torch_dtype: Any
) -> Any:
    if importlib.util.find_spec("bitsandbytes") is None:
        bits = "8" if load_in_8bit else "4"
        raise DependencyMissingError(
            f"load_in_{bits}bit needs bitsandbytes, which is not installed; install it with: "
            f"{_QUANT_INSTALL}"
        )
    if load_in_8bit:
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    import torch

    compute = torch_dtype if torch_dtype != "auto" else torch.float16
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
    )


def _transformers_major(transformers: Any) -> int:
    try:
        return int(str(transformers.__version__).split(".")[0])
    except ValueError:
        return 5


def load_model_and_tokenizer(
    model_path: str,
    *,
    device: str,
    dtype: str = "auto",
    device_map: str | dict[str, Any] | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
    low_cpu_mem_usage: bool = True,
) -> tuple[Any, Any]:
    """Load ``model_path`` with transformers and return ``(model, tokenizer)``.

    Args:
        model_path: a local directory in Hugging Face format or a hub id ``org/name``
            (resolved through the local hub cache when offline).
        device: where the model runs: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...  Used when
            ``device_map`` is ``None``.
        dtype: one of :data:`VALID_DTYPES`; ``"auto"`` keeps the checkpoint's dtype.
        device_map: ``None`` (whole model on ``device``), one of
            :data:`DEVICE_MAP_STRATEGIES`, a device string, or a dict module -> device
            (placement by accelerate).
        load_in_8bit: quantise linear layers to int8 with bitsandbytes.
        load_in_4bit: quantise to 4-bit NF4 with bitsandbytes (compute in ``dtype``, or
            float16 for ``"auto"``).  Mutually exclusive with ``load_in_8bit``.
        trust_remote_code: allow model code shipped with the checkpoint.
        low_cpu_mem_usage: load weights without a second in-memory copy (transformers 4.x;
            5.x always does).

    Returns:
        ``(model, tokenizer)``; the model in eval mode, the tokenizer with a pad token.

    Raises:
        ConfigError: bad argument, missing path, unsupported architecture.
        DependencyMissingError: transformers, accelerate or bitsandbytes is missing.
        BackendNotAvailableError: the model cannot be placed on ``device``.
    """
    if not isinstance(model_path, str) or not model_path.strip():
        raise ConfigError(
            f"model_path must be a local directory or a hub id 'org/name'; got {model_path!r}"
        )
    if load_in_8bit and load_in_4bit:
        raise ConfigError("load_in_8bit and load_in_4bit are mutually exclusive; set at most one")
    transformers = _import_transformers()
    torch_dtype = resolve_torch_dtype(dtype)
    _validate_device(device)
    _validate_device_map(device_map)

    local = Path(model_path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ConfigError(
                f"model_path {model_path!r} is a file; it must be a model directory "
                "(with config.json) or a hub id 'org/name'"
            )
        if not (local / "config.json").is_file():
            raise ConfigError(
                f"model_path {model_path!r} has no config.json; it is not a Hugging Face "
                "model directory"
            )
        source = str(local)
        model_type = _read_model_type(local / "config.json")
    elif _looks_like_hub_id(model_path):
        source, model_type = model_path, ""
    else:
        raise ConfigError(
            f"model_path {model_path!r} does not exist and is not a Hugging Face hub id "
            "('org/name'); pass an existing model directory or a hub id"
        )

    try:
        config = transformers.AutoConfig.from_pretrained(
            source, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        if model_type:
            auto_config = importlib.import_module("transformers.models.auto.configuration_auto")
            if model_type not in auto_config.CONFIG_MAPPING_NAMES:
                raise ConfigError(
                    f"model {model_path!r} has model_type {model_type!r}, which this "
                    f"transformers {transformers.__version__} does not know; upgrade "
                    "transformers or, for custom code, pass trust_remote_code=True"
                ) from exc
        raise ConfigError(f"cannot load the config of model {model_path!r}: {exc}") from exc
    _check_causal_lm(config, model_path, trust_remote_code)

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if _transformers_major(transformers) >= 5:
        kwargs["dtype"] = torch_dtype
    else:
        kwargs["torch_dtype"] = torch_dtype
        kwargs["low_cpu_mem_usage"] = low_cpu_mem_usage
    quantized = load_in_8bit or load_in_4bit
    if quantized:
        kwargs["quantization_config"] = _quantization_config(
            transformers, load_in_8bit, load_in_4bit, torch_dtype
        )
        if device_map is None:
            device_map = {"": device}  # bitsandbytes quantises while placing the weights
    if device_map is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise DependencyMissingError(
                f"device_map={device_map!r} needs accelerate, which is not installed; "
                f"install it with: {_HF_INSTALL}"
            )
        kwargs["device_map"] = device_map

    unreadable: tuple[type[BaseException], ...] = (OSError,)
    try:  # a truncated or corrupt .safetensors file raises safetensors' own error type
        from safetensors import SafetensorError

        unreadable = (OSError, SafetensorError)
    except ImportError:  # pragma: no cover - safetensors ships with transformers
        pass
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ImportError as exc:
        raise DependencyMissingError(f"loading {model_path!r} failed: {exc}") from exc
    except unreadable as exc:
        raise ConfigError(f"cannot load the weights of model {model_path!r}: {exc}") from exc
    except (RuntimeError, AssertionError) as exc:
        if device_map is not None:
            raise BackendNotAvailableError(
                f"cannot place model {model_path!r} with device_map={device_map!r}: {exc}"
            ) from exc
        raise
    if device_map is None:
        try:
            model = model.to(device)
        except (RuntimeError, AssertionError) as exc:
            raise BackendNotAvailableError(
                f"cannot move model {model_path!r} to device {device!r}: {exc}"
            ) from exc
    model.eval()

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of model {model_path!r}: {exc}") from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    logger.info(
        "loaded %s (%s, dtype=%s) on %s",
        model_path,
        config.model_type,
        getattr(model, "dtype", "?"),
        device_map if device_map is not None else device,
    )
    return model, tokenizer
