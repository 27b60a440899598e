"""Configuration of the mock provider: validators, fault-injection settings, factory options.

Invariants: every invalid value raises :class:`~sagellm_backend.errors.ConfigError` naming
the parameter and the valid values; an injected kernel fault is ``None`` (raise
:class:`InjectedFaultError`) or an exception instance or class to raise.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sagellm_protocol import ErrorCode

from sagellm_backend._validate import check_bool, check_int, check_number, check_text
from sagellm_backend.capability import DType, KernelKind, parse_dtype
from sagellm_backend.errors import BackendError, ConfigError

#: An injected kernel fault: None raises :class:`InjectedFaultError`, else the exception.
KernelFault = BaseException | type[BaseException] | None

_DEFAULT_DTYPES = (DType.FP16, DType.BF16)  # the 0.1.1.x defaults
_DEFAULT_KINDS = (KernelKind.MATMUL, KernelKind.ATTENTION)


class InjectedFaultError(BackendError, RuntimeError, code=ErrorCode.UNAVAILABLE, retryable=True):
    """A failure the mock was configured to inject (UNAVAILABLE, retryable)."""


def _positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    valid = "a positive integer"
    if allow_none:
        return check_int(name, value, optional=True, valid=valid)
    return check_int(name, value, valid=valid)


def _non_negative(name: str, value: Any) -> float:
    return check_number(
        name, value, lo=0, finite=False, valid="a number >= 0", in_range="a number >= 0"
    )


def _capability_matrix(
    supported_dtypes: Iterable[DType | str] | None,
    supported_kernels: Iterable[KernelKind | str] | None,
) -> tuple[tuple[DType, ...], list[KernelKind]]:
    """The dtypes (deduplicated, default FP16/BF16) and kernel kinds the mock advertises."""
    try:
        dtypes = tuple(dict.fromkeys(parse_dtype(d) for d in (supported_dtypes or ())))
    except ValueError as exc:
        raise ConfigError(f"supported_dtypes: {exc}") from exc
    kinds: list[KernelKind] = []
    for k in supported_kernels or _DEFAULT_KINDS:
        try:
            kinds.append(KernelKind(k))
        except ValueError as exc:
            valid = ", ".join(x.value for x in KernelKind)
            raise ConfigError(f"supported_kernels: unknown kind {k!r}; valid: {valid}") from exc
    return dtypes or _DEFAULT_DTYPES, kinds


def _check_flags(**flags: object) -> None:
    """Raise ConfigError naming the first keyword whose value is not a bool."""
    for name, flag in flags.items():
        check_bool(name, flag)


def _check_names(**texts: object) -> None:
    """Raise ConfigError naming the first keyword whose value is not a non-empty string."""
    for name, text in texts.items():
        check_text(name, text)


def _kernel_latencies(
    kernel_latency_ms: float | Mapping[str, float],
) -> tuple[dict[str, float], float]:
    """Per-kernel sleeps and the default sleep, in seconds, from ``kernel_latency_ms``."""
    per_kernel: dict[str, float] = {}
    default = 0.0
    if isinstance(kernel_latency_ms, Mapping):
        for name, ms in kernel_latency_ms.items():
            per_kernel[name] = _non_negative(f"kernel_latency_ms[{name!r}]", ms) / 1e3
    else:
        default = _non_negative("kernel_latency_ms", kernel_latency_ms) / 1e3
    return per_kernel, default


def _kernel_faults(
    failing_kernels: Mapping[str, BaseException | type[BaseException]] | Iterable[str] | None,
) -> dict[str, KernelFault]:
    """Kernel name -> injected fault, from the ``failing_kernels`` parameter."""
    faults: dict[str, KernelFault] = {}
    if isinstance(failing_kernels, Mapping):
        for name, err in failing_kernels.items():
            if not (
                err is None
                or isinstance(err, BaseException)
                or (isinstance(err, type) and issubclass(err, BaseException))
            ):
                raise ConfigError(
                    f"failing_kernels[{name!r}] must be an exception instance or class, got {err!r}"
                )
        faults.update(failing_kernels)
    elif failing_kernels is not None:
        if isinstance(failing_kernels, str):
            raise ConfigError("failing_kernels must be an iterable of names, not a string")
        faults.update(dict.fromkeys(failing_kernels))
    return faults


def _faulty_kernel(
    name: str, impl: Callable[..., Any], fault_set: bool, fault: KernelFault, delay: float
) -> Callable[..., Any]:
    """``impl`` wrapped to sleep ``delay`` seconds, then raise (``fault_set``) or call it."""

    @functools.wraps(impl)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if delay:
            time.sleep(delay)
        if fault_set:
            if fault is None:
                raise InjectedFaultError(f"kernel {name!r} failed (injected fault)")
            raise fault
        return impl(*args, **kwargs)

    return wrapper


_CONFIG_KEYS: frozenset[str] = frozenset(
    {
        "supported_dtypes",
        "supported_kernels",
        "has_collective",
        "has_graph_exec",
        "max_memory_mb",
        "has_stream",
        "has_event",
        "device",
        "device_name",
        "device_type",
        "compute_capability",
        "max_batch_size",
        "max_sequence_length",
        "kv_spec",
        "kv_block_size",
        "offload_device",
        "offload_memory_mb",
        "world_size",
        "rank",
        "device_ids",
        "fail_on_init",
        "fail_kv_after_pages",
        "failing_kernels",
        "kernel_latency_ms",
        "collective_latency_ms",
    }
)


def _mock_options(config: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`MockBackendProvider` keyword arguments from ``create_mock_backend``'s input."""
    options: dict[str, Any] = {}
    if config is None:
        pass
    elif isinstance(config, Mapping):
        options.update(config)
    elif hasattr(config, "kind"):
        for attr in ("kind", "device", "device_ids"):
            value = getattr(config, attr, None)
            if value is not None:
                options[attr] = value
    else:
        raise ConfigError(
            "config must be None, a dict, or a BackendConfig-like object with kind/device/"
            f"device_ids; got {type(config).__name__}"
        )
    options.update(kwargs)
    kind = options.pop("kind", None)
    if kind is not None and kind != "mock":
        raise ConfigError(f"create_mock_backend got kind={kind!r}; this factory builds 'mock'")
    unknown = sorted(set(options) - _CONFIG_KEYS)
    if unknown:
        valid = ", ".join(sorted(_CONFIG_KEYS | {"kind"}))
        raise ConfigError(f"unknown mock backend option(s): {', '.join(unknown)}; valid: {valid}")
    if options.get("device") is None:
        options.pop("device", None)
        ids = options.get("device_ids")
        if ids:
            options["device"] = f"mock:{next(iter(ids))}"
    elif options["device"] == "cpu" and "offload_device" not in options:
        # a mock standing for the host has no separate host pool to offload to
        options["offload_device"] = None
    return options
