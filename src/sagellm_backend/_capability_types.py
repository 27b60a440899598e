"""The capability types for an ``isagellm-protocol`` older than 0.1.2, which has none.

Protocol 0.1.2 moved ``CapabilityDescriptor``, ``DType`` and ``KernelKind`` into the
protocol ("all backend capability definitions belong here"). Against an older protocol
:mod:`sagellm_backend.capability` uses these definitions instead: the same names, fields,
defaults and members as the protocol's (as of 0.1.2.4), so code written against either
behaves the same. Nothing imports this module when the protocol has the types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

__all__ = ["CapabilityDescriptor", "DType", "KernelKind"]


class DType(str, Enum):  # noqa: UP042 -- the protocol's base classes (str() differs on StrEnum)
    """Element data types a backend may support."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"


class KernelKind(str, Enum):  # noqa: UP042 -- as DType
    """Kernel categories a backend may provide optimised implementations of."""

    MATMUL = "matmul"
    ATTENTION = "attention"
    FUSION = "fusion"
    LAYERNORM = "layernorm"
    SOFTMAX = "softmax"


@dataclass
class CapabilityDescriptor:
    """What a backend provider can do (the protocol's fields and defaults)."""

    device_name: str | None = None
    device_type: str = "unknown"
    compute_capability: str | None = None
    total_memory_bytes: int | None = None
    available_memory_bytes: int | None = None
    supported_dtypes: list[DType] = field(default_factory=list)
    supported_kernels: list[KernelKind] = field(default_factory=list)
    has_stream: bool = False
    has_event: bool = False
    has_collective: bool = False
    has_graph_exec: bool = False
    max_memory_mb: int | None = None
    max_batch_size: int | None = None
    max_sequence_length: int | None = None
