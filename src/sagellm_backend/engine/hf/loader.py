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
* a device torch cannot place the model on -> :class:`BackendNotAvailableError`;
* a checkpoint whose weights do not match its ``config.json`` -> :class:`ConfigError` naming
  the path and the mismatched tensors;
* a mistyped local path: a ``model_path`` that can only be a local path (starts with ``.``,
  ``/`` or ``~``, or has more than one separator) and does not exist fails at once, naming
  the directory it resolved to; one that could be a hub id (``org/name``) goes to the hub,
  and when that fails the error says both (no such local directory, relative to which
  working directory, and what the hub answered).  When the hub cannot be reached (a
  connection probe of at most :data:`HUB_PROBE_TIMEOUT_S` s fails) only the local hub cache
  is used, so an offline machine fails in seconds, not after half a minute of retries.

Quantisation (bitsandbytes, through transformers' ``BitsAndBytesConfig``): ``load_in_8bit``
(LLM.int8) or ``load_in_4bit`` (``nf4``/``fp4``, optional double quantisation and compute
dtype), on ``cpu`` (bitsandbytes >= :data:`BNB_MIN_CPU_VERSION`) and ``cuda``.  Everything is
checked before a byte is loaded: both flags set, bitsandbytes missing or too old, a device
bitsandbytes cannot run on, a dtype or compute dtype the device has no arithmetic for (the
caller passes the device's dtypes, from its provider).  Quantised layers stay
bitsandbytes modules: callers run them as modules, never read their ``.weight`` as a dense
matrix (8-bit weights are int8 with a separate row scale, 4-bit ones packed uint8).
:func:`weight_memory` reports the bytes a loaded model holds.

Invariants of a successful return: the model is in ``eval()`` mode on the requested
device(s); ``tokenizer.pad_token_id`` is set whenever the tokenizer has an eos token (pad
falls back to eos), and ``model.generation_config.pad_token_id`` agrees with it.

Device handling stays a device *string*: no CUDA API is called here (device probing is the
providers' job).  Heavy imports happen inside the function.

The checks made before loading (dtype, device, path and hub, model type) live in
:mod:`~sagellm_backend.engine.hf._load_checks`, bitsandbytes quantisation and
:func:`weight_memory` in :mod:`~sagellm_backend.engine.hf._quant`; this module loads, and
re-exports their public names.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

from sagellm_backend.engine.hf._load_checks import (
    DEVICE_MAP_STRATEGIES,
    HF_INSTALL,
    OFFLINE_HINT,
    VALID_DTYPES,
    check_causal_lm,
    check_device_dtypes,
    dtype_name,
    hub_offline,
    hub_unreachable,
    import_transformers,
    missing_local,
    only_local,
    read_model_type,
    resolve_torch_dtype,
    supported_model_types,
    validate_device,
    validate_device_map,
)
from sagellm_backend.engine.hf._load_checks import HUB_PROBE_TIMEOUT_S as HUB_PROBE_TIMEOUT_S
from sagellm_backend.engine.hf._quant import (
    BNB_4BIT_QUANT_TYPES,
    BNB_MIN_CPU_VERSION,
    WeightMemory,
    bnb_4bit_fields,
    check_bnb_options,
    quantization_config,
    quantization_name,
    weight_memory,
)
from sagellm_backend.errors import BackendNotAvailableError, ConfigError, DependencyMissingError

__all__ = [
    "BNB_4BIT_QUANT_TYPES",
    "BNB_MIN_CPU_VERSION",
    "DEVICE_MAP_STRATEGIES",
    "VALID_DTYPES",
    "WeightMemory",
    "bnb_4bit_fields",
    "check_bnb_options",
    "load_model_and_tokenizer",
    "quantization_name",
    "resolve_torch_dtype",
    "supported_model_types",
    "weight_memory",
]

logger = logging.getLogger(__name__)


def _transformers_major(transformers: Any) -> int:
    try:
        return int(str(transformers.__version__).split(".")[0])
    except ValueError:
        return 5


def _mismatched_tensors(transformers: Any, config: Any, source: str) -> list[str]:
    """``name: checkpoint shape vs config shape`` for each tensor that does not fit."""
    import torch

    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - safetensors ships with transformers
        return []
    files = sorted(Path(source).glob("*.safetensors"))
    if not files:
        return []
    try:
        with torch.device("meta"):
            empty = transformers.AutoModelForCausalLM.from_config(config)
        expected = {k: tuple(v.shape) for k, v in empty.state_dict().items()}
        found: list[str] = []
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118  (safe_open is not a mapping)
                    names = [k for k in expected if k == key or k.endswith("." + key)]
                    names += [k for k in expected if key.endswith("." + k)]
                    shape = tuple(fh.get_slice(key).get_shape())
                    for name in names[:1]:
                        if expected[name] != shape:
                            found.append(
                                f"{key}: checkpoint {list(shape)} vs config {list(expected[name])}"
                            )
        return found
    except Exception:  # the report is a courtesy: never hide the real error behind it
        return []


def _warn_context_length(config: Any, model_path: str) -> None:
    """Say which context a model gets when its config declares no usable length."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions"):
        if not hasattr(text, name):
            continue
        value = getattr(text, name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return
        from sagellm_backend.engine.hf.runner import model_context_length

        logger.warning(
            "model %r: its config sets %s=%r, which is not a context length (a positive "
            "integer); the engine uses a context of %d tokens, its default for a model that "
            "declares none (set max_model_len to choose another, or fix config.json)",
            model_path,
            name,
            value,
            model_context_length(config),
        )
        return


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
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_compute_dtype: str | None = None,
    bnb_4bit_use_double_quant: bool = True,
    device_dtypes: Collection[str] | None = None,
) -> tuple[Any, Any]:
    """Load ``model_path`` with transformers and return ``(model, tokenizer)``.

    Args:
        model_path: a local directory in Hugging Face format or a hub id ``org/name``
            (resolved through the local hub cache when offline).
        device: where the model runs: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...  Used when
            ``device_map`` is ``None``.
        dtype: one of :data:`VALID_DTYPES`; ``"auto"`` keeps the checkpoint's dtype.  With
            quantisation it is the dtype of the layers left unquantised (embeddings,
            norms, ``lm_head``) and of the activations.
        device_map: ``None`` (whole model on ``device``), one of
            :data:`DEVICE_MAP_STRATEGIES`, a device string, or a dict module -> device
            (placement by accelerate).
        load_in_8bit: quantise linear layers to int8 (LLM.int8) with bitsandbytes; the int8
            matmuls compute in float16 whatever ``dtype`` is.
        load_in_4bit: quantise linear layers to 4 bits with bitsandbytes.  Mutually
            exclusive with ``load_in_8bit``.
        trust_remote_code: allow model code shipped with the checkpoint.
        low_cpu_mem_usage: load weights without a second in-memory copy (transformers 4.x;
            5.x always does).
        bnb_4bit_quant_type: ``"nf4"`` (default) or ``"fp4"`` (4-bit only).
        bnb_4bit_compute_dtype: dtype the 4-bit layers compute in; None (default) means
            ``dtype``, and for ``dtype="auto"`` float16 on cuda and float32 on cpu.
        bnb_4bit_use_double_quant: also quantise the 4-bit block scales (default True;
            saves about 0.4 bit per weight).
        device_dtypes: dtype names (``fp32``, ``bf16``, ``float16``, ...) the device
            computes in, from its provider's capability; a ``dtype`` or compute dtype
            outside them is rejected before loading.  None skips the check.

    Returns:
        ``(model, tokenizer)``; the model in eval mode, the tokenizer with a pad token.

    Raises:
        ConfigError: bad argument, missing path, unsupported architecture, weights that do
            not match the config, a quantisation or dtype the device cannot run.
        DependencyMissingError: transformers, accelerate or bitsandbytes is missing, or
            bitsandbytes is too old for the CPU.
        BackendNotAvailableError: the model cannot be placed on ``device``.
    """
    if not isinstance(model_path, str) or not model_path.strip():
        raise ConfigError(
            f"model_path must be a local directory or a hub id 'org/name'; got {model_path!r}"
        )
    check_bnb_options(
        "load_model_and_tokenizer",
        load_in_8bit=load_in_8bit,
        load_in_4bit=load_in_4bit,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=bnb_4bit_compute_dtype,
        bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
    )
    transformers = import_transformers()
    torch_dtype = resolve_torch_dtype(dtype)
    validate_device(device)
    validate_device_map(device_map)
    quantized = load_in_8bit or load_in_4bit
    compute_dtype: Any = None
    if load_in_4bit:
        import torch

        if bnb_4bit_compute_dtype is not None:
            compute_dtype = resolve_torch_dtype(bnb_4bit_compute_dtype)
        elif torch_dtype != "auto":
            compute_dtype = torch_dtype
        else:
            compute_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    check_device_dtypes(
        device, device_dtypes, {"dtype": torch_dtype, "bnb_4bit_compute_dtype": compute_dtype}
    )
    quant_config = None
    if quantized:
        quant_config = quantization_config(
            transformers,
            device=device,
            load_in_8bit=load_in_8bit,
            bnb_4bit_quant_type=bnb_4bit_quant_type,
            compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
        )

    hub: dict[str, Any] = {}
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
        model_type = read_model_type(local / "config.json")
        where = ""
    elif only_local(model_path):
        raise ConfigError(
            f"model_path {model_path!r} does not exist: {missing_local(model_path)}; it is "
            "not a Hugging Face hub id ('org/name') either. Pass an existing model directory"
        )
    else:
        source, model_type = model_path, ""
        where = f"{missing_local(model_path)}, and the hub "
        if not hub_offline():
            unreachable = hub_unreachable()
            if unreachable is not None:
                hub["local_files_only"] = True  # the cache only: no half-minute of retries
                where += f"is unreachable ({unreachable}; only the local hub cache was tried) "
                logger.warning(
                    "%s; looking up %r in the local hub cache only", unreachable, model_path
                )
        else:
            where += "is off (HF_HUB_OFFLINE) and its local cache "

    try:
        config = transformers.AutoConfig.from_pretrained(
            source, trust_remote_code=trust_remote_code, **hub
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
        if where:
            hint = (
                "pass a local model directory, or download the model into the local hub cache "
                "on a machine that reaches the hub"
                if hub_offline()
                else OFFLINE_HINT
            )
            raise ConfigError(
                f"cannot load model {model_path!r}: {where}answered: {exc} ({hint})"
            ) from exc
        raise ConfigError(f"cannot load the config of model {model_path!r}: {exc}") from exc
    check_causal_lm(config, model_path, trust_remote_code)
    _warn_context_length(config, model_path)

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **hub}
    if _transformers_major(transformers) >= 5:
        kwargs["dtype"] = torch_dtype
    else:
        kwargs["torch_dtype"] = torch_dtype
        kwargs["low_cpu_mem_usage"] = low_cpu_mem_usage
    if quant_config is not None:
        kwargs["quantization_config"] = quant_config
        if device_map is None:
            device_map = {"": device}  # bitsandbytes quantises while placing the weights
    if device_map is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise DependencyMissingError(
                f"device_map={device_map!r} needs accelerate, which is not installed; "
                f"install it with: {HF_INSTALL}"
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
        if "ignore_mismatched_sizes" in str(exc):
            found = _mismatched_tensors(transformers, config, source)
            listed = "; ".join(found[:12]) + (
                f"; ... {len(found) - 12} more" if len(found) > 12 else ""
            )
            raise ConfigError(
                f"model {model_path!r}: its weights do not match its config.json ("
                f"{listed or 'see the load report above'}); the config describes another "
                "model size than the checkpoint holds: fix config.json or the weights"
            ) from exc
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
            source, trust_remote_code=trust_remote_code, **hub
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of model {model_path!r}: {exc}") from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    quantization = quantization_name(load_in_8bit, load_in_4bit, bnb_4bit_quant_type)
    if load_in_8bit and dtype_name(torch_dtype) != "float16":
        logger.info(
            "%s: the int8 layers multiply in float16 (bitsandbytes casts %s activations)",
            model_path,
            dtype,
        )
    logger.info(
        "loaded %s (%s, dtype=%s, quantization=%s) on %s",
        model_path,
        config.model_type,
        getattr(model, "dtype", "?"),
        quantization,
        device_map if device_map is not None else device,
    )
    return model, tokenizer
