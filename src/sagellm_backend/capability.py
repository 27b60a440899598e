"""Capability types, re-exported from :mod:`sagellm_protocol`.

There is exactly one definition of these types across the sageLLM stack: the protocol's.
This module re-exports them so that ``from sagellm_backend.capability import DType`` keeps
working for 0.1.1.x callers, and adds small helpers that describe dtypes. A protocol older
than 0.1.2 has no such types; then the same definitions come from
:mod:`sagellm_backend._capability_types`.
"""

from __future__ import annotations

try:
    from sagellm_protocol import CapabilityDescriptor, DType, KernelKind
except ImportError:  # isagellm-protocol < 0.1.2
    from sagellm_backend._capability_types import (
        CapabilityDescriptor,
        DType,
        KernelKind,
    )

__all__ = ["DTYPE_BITS", "CapabilityDescriptor", "DType", "KernelKind", "dtype_bits", "parse_dtype"]

#: Storage width in bits of one element of each protocol dtype.
DTYPE_BITS: dict[DType, int] = {
    DType.FP32: 32,
    DType.FP16: 16,
    DType.BF16: 16,
    DType.FP8: 8,
    DType.INT8: 8,
    DType.INT4: 4,
}

_ALIASES: dict[str, DType] = {
    "float32": DType.FP32,
    "float": DType.FP32,
    "fp32": DType.FP32,
    "float16": DType.FP16,
    "half": DType.FP16,
    "fp16": DType.FP16,
    "bfloat16": DType.BF16,
    "bf16": DType.BF16,
    "fp8": DType.FP8,
    "float8": DType.FP8,
    "float8_e4m3fn": DType.FP8,
    "int8": DType.INT8,
    "int4": DType.INT4,
}


def dtype_bits(dtype: DType) -> int:
    """Return the element width of ``dtype`` in bits.

    Raises:
        ValueError: if ``dtype`` is not a protocol :class:`DType`.
    """
    try:
        return DTYPE_BITS[DType(dtype)]
    except (ValueError, KeyError) as exc:
        valid = ", ".join(d.value for d in DType)
        raise ValueError(f"unknown dtype {dtype!r}; valid dtypes: {valid}") from exc


def parse_dtype(value: str | DType) -> DType:
    """Parse a dtype given as a :class:`DType` or a name such as ``"float16"``/``"fp16"``.

    Raises:
        ValueError: naming the accepted spellings when ``value`` is not recognised.
    """
    if isinstance(value, DType):
        return value
    key = str(value).strip().lower().removeprefix("torch.")
    if key in _ALIASES:
        return _ALIASES[key]
    valid = ", ".join(sorted(_ALIASES))
    raise ValueError(f"unknown dtype {value!r}; valid names: {valid}")
