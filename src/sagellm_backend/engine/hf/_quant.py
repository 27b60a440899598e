"""bitsandbytes quantisation for the HF loader: options, the quantisation config, weight memory.

Part of :mod:`sagellm_backend.engine.hf.loader` (which re-exports the public names).
Invariants: :func:`check_bnb_options` imports nothing and loads nothing;
:func:`quantization_config` checks that bitsandbytes is installed, recent enough and able
to run on the device *before* any weight is loaded; :func:`weight_memory` counts each
storage once.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import itertools
import logging
from dataclasses import dataclass
from typing import Any

from sagellm_backend.engine.hf._load_checks import DTYPE_ALIASES, VALID_DTYPES
from sagellm_backend.errors import ConfigError, DependencyMissingError

__all__ = [
    "BNB_4BIT_QUANT_TYPES",
    "BNB_MIN_CPU_VERSION",
    "WeightMemory",
    "bnb_4bit_fields",
    "check_bnb_options",
    "quantization_config",
    "quantization_name",
    "weight_memory",
]

_QUANT_INSTALL = "pip install 'isagellm-backend[quant]'"
#: 4-bit quantisation formats bitsandbytes offers (``bnb_4bit_quant_type``).
BNB_4BIT_QUANT_TYPES = ("nf4", "fp4")
#: Oldest bitsandbytes that runs 8-bit and 4-bit layers on x86-64 CPUs.
BNB_MIN_CPU_VERSION = (0, 48)
#: Device types bitsandbytes quantised layers run on (cuda: a build with its CUDA library).
_BNB_DEVICE_TYPES = ("cpu", "cuda")


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
        compute = DTYPE_ALIASES.get(given.lower(), given.lower()) if isinstance(given, str) else ""
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


def quantization_config(
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
    activation dtypes.  The loader says it once instead (see :func:`quantization_config`).
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
