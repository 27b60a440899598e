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
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os
import socket
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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

#: dtype names the engines accept; ``"auto"`` keeps the checkpoint's own dtype.
VALID_DTYPES = ("float16", "bfloat16", "float32", "auto")
#: device_map strings accelerate understands besides a single device.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

_HF_INSTALL = "pip install 'isagellm-backend[hf]'"
_QUANT_INSTALL = "pip install 'isagellm-backend[quant]'"
_COMMON_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "opt", "falcon")
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32"}
#: 4-bit quantisation formats bitsandbytes offers (``bnb_4bit_quant_type``).
BNB_4BIT_QUANT_TYPES = ("nf4", "fp4")
#: Oldest bitsandbytes that runs 8-bit and 4-bit layers on x86-64 CPUs.
BNB_MIN_CPU_VERSION = (0, 48)
#: Device types bitsandbytes quantised layers run on (cuda: a build with its CUDA library).
_BNB_DEVICE_TYPES = ("cpu", "cuda")
#: Seconds the hub connection probe waits before a hub id is looked up in the cache only.
HUB_PROBE_TIMEOUT_S = 3.0
_OFFLINE_HINT = (
    "to work offline, set HF_HUB_OFFLINE=1 and pass a local model directory (or a hub id "
    "already in the local hub cache)"
)


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


def _only_local(model_path: str) -> bool:
    """Whether ``model_path`` can only name a local directory (never a hub id ``org/name``)."""
    if model_path.startswith(("/", ".", "~")) or os.path.isabs(model_path):
        return True
    if model_path.replace(os.sep, "/").count("/") > 1:
        return True
    try:
        hub_utils = importlib.import_module("huggingface_hub.utils")
        hub_utils.validate_repo_id(model_path)
    except Exception:
        return True
    return False


def _missing_local(model_path: str) -> str:
    """Where ``model_path`` was looked for locally, for error messages."""
    resolved = Path(model_path).expanduser().absolute()
    return (
        f"no local directory {str(resolved)!r} (relative paths are resolved against the "
        f"working directory {os.getcwd()!r})"
    )


def _hub_offline() -> bool:
    try:
        constants = importlib.import_module("huggingface_hub.constants")
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return True
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_unreachable() -> str | None:
    """Why the hub endpoint cannot be reached (a short TCP probe), or None when it can.

    Behind a proxy (``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` set) a direct
    connection says nothing, so no probe is made (None).
    """
    proxies = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
    if any(os.environ.get(v) or os.environ.get(v.lower()) for v in proxies):
        return None
    constants = importlib.import_module("huggingface_hub.constants")
    endpoint = str(getattr(constants, "ENDPOINT", "https://huggingface.co"))
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"cannot connect to the Hugging Face hub {endpoint} ({exc})"


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


def quantization_name(
    load_in_8bit: bool, load_in_4bit: bool, bnb_4bit_quant_type: str = "nf4"
) -> str:
    """The quantisation a load uses: ``"none"``, ``"bnb-int8"``, ``"bnb-nf4"`` or ``"bnb-fp4"``."""
    if load_in_8bit:
        return "bnb-int8"
    if load_in_4bit:
        return f"bnb-{bnb_4bit_quant_type}"
    return "none"


_BNB_4BIT_FIELDS = ("bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant")


def bnb_4bit_fields(config: Any) -> dict[str, Any]:
    """The three 4-bit options of an engine config, as keyword arguments.

    For :func:`check_bnb_options` and :class:`~sagellm_backend.engine.hf.core.LoadSettings`;
    ``config`` has the attributes ``bnb_4bit_quant_type``, ``bnb_4bit_compute_dtype`` and
    ``bnb_4bit_use_double_quant`` (the values are passed unchecked).
    """
    return {name: getattr(config, name) for name in _BNB_4BIT_FIELDS}


def check_bnb_options(
    owner: str,
    *,
    load_in_8bit: Any,
    load_in_4bit: Any,
    bnb_4bit_quant_type: Any = "nf4",
    bnb_4bit_compute_dtype: Any = None,
    bnb_4bit_use_double_quant: Any = True,
) -> None:
    """Validate the quantisation fields of an engine config (no import, nothing loaded).

    ``load_in_8bit`` / ``load_in_4bit`` are bools, at most one True;
    ``bnb_4bit_quant_type`` is one of :data:`BNB_4BIT_QUANT_TYPES`;
    ``bnb_4bit_compute_dtype`` is None or a dtype name other than ``"auto"``;
    ``bnb_4bit_use_double_quant`` is a bool.  The three 4-bit options may differ from their
    defaults (``"nf4"``, None, True) only with ``load_in_4bit=True``.

    Raises:
        ConfigError: naming ``owner.field``, the bad value and the valid ones.
    """
    for name, value in (
        ("load_in_8bit", load_in_8bit),
        ("load_in_4bit", load_in_4bit),
        ("bnb_4bit_use_double_quant", bnb_4bit_use_double_quant),
    ):
        if not isinstance(value, bool):
            raise ConfigError(f"{owner}.{name} must be True or False, got {value!r}")
    if load_in_8bit and load_in_4bit:
        raise ConfigError(
            f"{owner}.load_in_8bit and load_in_4bit are mutually exclusive; set at most one to True"
        )
    if bnb_4bit_quant_type not in BNB_4BIT_QUANT_TYPES:
        raise ConfigError(
            f"{owner}.bnb_4bit_quant_type must be one of {BNB_4BIT_QUANT_TYPES}, got "
            f"{bnb_4bit_quant_type!r}"
        )
    compute_names = tuple(d for d in VALID_DTYPES if d != "auto")
    if bnb_4bit_compute_dtype is not None:
        given = bnb_4bit_compute_dtype
        compute = _DTYPE_ALIASES.get(given.lower(), given.lower()) if isinstance(given, str) else ""
        if compute not in compute_names:
            raise ConfigError(
                f"{owner}.bnb_4bit_compute_dtype must be None (the model dtype) or one of "
                f"{compute_names}, got {bnb_4bit_compute_dtype!r}"
            )
    if not load_in_4bit:
        changed = [
            f"{n}={v!r}"
            for n, v, default in (
                ("bnb_4bit_quant_type", bnb_4bit_quant_type, "nf4"),
                ("bnb_4bit_compute_dtype", bnb_4bit_compute_dtype, None),
                ("bnb_4bit_use_double_quant", bnb_4bit_use_double_quant, True),
            )
            if v != default
        ]
        if changed:
            raise ConfigError(
                f"{owner}.{', '.join(changed)} only apply to 4-bit loading; set "
                "load_in_4bit=True or leave them at their defaults"
            )


def _version_tuple(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _bnb_version() -> str | None:
    """The installed bitsandbytes version (None when it is not installed); no import."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - broken install
        return "0"


def _bnb_native_backend() -> str:
    """The native library bitsandbytes loaded: ``"CPU"``, ``"CUDA"``, ``"ROCm"``, ``"XPU"``."""
    cext = importlib.import_module("bitsandbytes.cextension")
    return str(getattr(cext, "BNB_BACKEND", "CPU"))


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _check_device_dtypes(
    device: str, device_dtypes: Collection[str] | None, wanted: dict[str, Any]
) -> None:
    """Raise ConfigError when a requested dtype has no arithmetic on the device."""
    if device_dtypes is None:
        return
    have = {_DTYPE_ALIASES.get(str(d).lower(), str(d).lower()) for d in device_dtypes}
    for what, dtype in wanted.items():
        if dtype == "auto" or dtype is None:
            continue
        name = _dtype_name(dtype)
        if name not in have:
            valid = sorted(have & set(VALID_DTYPES))
            raise ConfigError(
                f"{what}={name!r} is requested but device {device!r} has no {name} arithmetic "
                f"(its provider reports {valid}); choose one of {valid}"
            )


def _quantization_config(
    transformers: Any,
    *,
    device: str,
    load_in_8bit: bool,
    bnb_4bit_quant_type: str,
    compute_dtype: Any,
    bnb_4bit_use_double_quant: bool,
) -> Any:
    """Check that bitsandbytes can quantise on ``device`` and build its config (no weights)."""
    bits = "load_in_8bit" if load_in_8bit else "load_in_4bit"
    version = _bnb_version()
    if version is None:
        raise DependencyMissingError(
            f"{bits} needs bitsandbytes, which is not installed; install it with: {_QUANT_INSTALL}"
        )
    device_type = device.split(":", 1)[0]
    if device_type not in _BNB_DEVICE_TYPES:
        raise ConfigError(
            f"{bits} cannot run on device {device!r}: bitsandbytes quantised layers run on "
            f"{_BNB_DEVICE_TYPES} here; load without quantisation on {device!r}"
        )
    if device_type == "cpu" and _version_tuple(version) < BNB_MIN_CPU_VERSION:
        need = ".".join(str(v) for v in BNB_MIN_CPU_VERSION)
        raise DependencyMissingError(
            f"{bits} on the CPU needs bitsandbytes >= {need} (installed: {version}); upgrade "
            f"with: pip install -U 'bitsandbytes>={need}'"
        )
    if device_type == "cuda":
        backend = _bnb_native_backend()
        if backend not in ("CUDA", "ROCm"):
            raise ConfigError(
                f"{bits} cannot run on device {device!r}: the installed bitsandbytes "
                f"{version} loaded its {backend} library, not a CUDA one (install a "
                f"bitsandbytes build for this GPU: {_QUANT_INSTALL})"
            )
    _quiet_int8_cast_warning()
    if load_in_8bit:
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
    )


class _DropInt8CastWarning(logging.Filter):
    """Drop bitsandbytes' per-matmul "inputs will be cast ... to float16" warning.

    LLM.int8 always multiplies in float16; bitsandbytes logs that on every call for other
    activation dtypes.  The loader says it once instead (see :func:`_quantization_config`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


_INT8_FILTER = _DropInt8CastWarning()


def _quiet_int8_cast_warning() -> None:
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _INT8_FILTER not in bnb_logger.filters:
        bnb_logger.addFilter(_INT8_FILTER)


@dataclass(frozen=True)
class WeightMemory:
    """Bytes of weights a loaded model holds (each storage counted once).

    Attributes:
        total_bytes: every parameter and buffer, plus bitsandbytes' quantisation state
            (8-bit row scales, 4-bit block scales and codebooks) that lives outside them.
        linear_bytes: the part held by linear layers (``nn.Linear``, GPT-2's ``Conv1D``
            and the bitsandbytes layers: weight, bias and quantisation state).
        quantized_bytes: the part held by bitsandbytes layers.
        quantized_layers: how many bitsandbytes layers the model has.
        quantization: ``"none"``, ``"bnb-int8"``, ``"bnb-nf4"`` or ``"bnb-fp4"``.
    """

    total_bytes: int
    linear_bytes: int
    quantized_bytes: int
    quantized_layers: int
    quantization: str


def _quant_state_tensors(module: Any) -> list[Any]:
    """Tensors of a bitsandbytes layer's quantisation state that are not params/buffers."""
    import torch

    found: list[Any] = []
    weight = getattr(module, "weight", None)
    state = getattr(module, "state", None)
    for holder in (weight, state):
        scb = getattr(holder, "SCB", None)
        if isinstance(scb, torch.Tensor):
            found.append(scb)
    qs = getattr(weight, "quant_state", None)
    while qs is not None:
        for name in ("absmax", "code", "offset"):
            t = getattr(qs, name, None)
            if isinstance(t, torch.Tensor):
                found.append(t)
        qs = getattr(qs, "state2", None)
    return found


def _is_bnb_layer(module: Any) -> bool:
    return type(module).__module__.startswith("bitsandbytes.")


def weight_memory(model: Any, quantization: str = "none") -> WeightMemory:
    """Measure the weight memory ``model`` holds (see :class:`WeightMemory`).

    Storages shared by several tensors (tied embeddings, fused projections whose
    parameters are views of one tensor) are counted once, at their full size.
    """
    import torch

    seen: set[tuple[str, int]] = set()

    def size(t: Any) -> int:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key in seen or t.device.type == "meta":
            return 0
        seen.add(key)
        return int(storage.nbytes())

    linear_types: tuple[Any, ...] = (torch.nn.Linear,)
    pytorch_utils = importlib.import_module("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    if isinstance(conv1d, type):
        linear_types = (*linear_types, conv1d)
    linear = quantized = layers = 0
    module: Any
    for module in model.modules():
        if not isinstance(module, linear_types):
            continue
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        held = 0
        if _is_bnb_layer(module):
            layers += 1
            tensors += _quant_state_tensors(module)
        for t in tensors:
            held += size(t)
        linear += held
        if _is_bnb_layer(module):
            quantized += held
    rest = sum(size(t) for t in (*model.parameters(), *model.buffers()))
    return WeightMemory(
        total_bytes=linear + rest,
        linear_bytes=linear,
        quantized_bytes=quantized,
        quantized_layers=layers,
        quantization=quantization,
    )


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
    transformers = _import_transformers()
    torch_dtype = resolve_torch_dtype(dtype)
    _validate_device(device)
    _validate_device_map(device_map)
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
    _check_device_dtypes(
        device, device_dtypes, {"dtype": torch_dtype, "bnb_4bit_compute_dtype": compute_dtype}
    )
    quant_config = None
    if quantized:
        quant_config = _quantization_config(
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
        model_type = _read_model_type(local / "config.json")
        where = ""
    elif _only_local(model_path):
        raise ConfigError(
            f"model_path {model_path!r} does not exist: {_missing_local(model_path)}; it is "
            "not a Hugging Face hub id ('org/name') either. Pass an existing model directory"
        )
    else:
        source, model_type = model_path, ""
        where = f"{_missing_local(model_path)}, and the hub "
        if not _hub_offline():
            unreachable = _hub_unreachable()
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
            raise ConfigError(
                f"cannot load model {model_path!r}: {where}answered: {exc} ({_OFFLINE_HINT})"
            ) from exc
        raise ConfigError(f"cannot load the config of model {model_path!r}: {exc}") from exc
    _check_causal_lm(config, model_path, trust_remote_code)
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
    if load_in_8bit and _dtype_name(torch_dtype) != "float16":
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
