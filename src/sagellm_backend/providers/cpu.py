"""The cpu backend provider: torch on the host CPU.

:class:`CPUBackendProvider` is the shared torch core (:class:`~._torch.TorchProviderBase`)
over :class:`CpuDevice`, the host's device layer:

* capability: processor name (``/proc/cpuinfo``, else :mod:`platform`), the CPU ISA level
  torch dispatches to (``torch.backends.cpu.get_cpu_capability()``, e.g. ``"AVX512"``) as
  ``compute_capability``, host memory from psutil, and the dtypes that torch computes on
  this CPU (fp32 always; bf16 and fp16 when a probe matmul/softmax runs in them).
* streams/events: synchronous semantics (work runs on the calling thread before the call
  returns, so ``synchronize`` has nothing to wait for); events record a monotonic clock
  (``time.perf_counter_ns``) and ``elapsed_ms`` is real wall time.
* memory: ``allocated``/``reserved`` = resident set size of this process, ``peak`` = its
  peak RSS (``getrusage``; cannot be reset), ``total``/``free`` = host RAM total/available;
  ``clear_cache()`` drops evictable KV pages and returns freed heap to the OS
  (``malloc_trim``).
* collectives: torch.distributed with gloo.

This module imports without torch; :func:`create_cpu_backend` (the ``sagellm.backends``
entry point ``cpu``) raises :class:`~sagellm_backend.errors.DependencyMissingError` with the
pip command when torch is missing.

Example:
    >>> from sagellm_backend.providers.cpu import create_cpu_backend
    >>> backend = create_cpu_backend({"kv_memory_bytes": 64 << 20})  # doctest: +SKIP
    >>> backend.capability().device_type  # doctest: +SKIP
    'cpu'
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import resource
import sys
import time
from typing import Any

from sagellm_backend.base import Event, Stream
from sagellm_backend.capability import DType
from sagellm_backend.errors import ConfigError, InvalidStateError
from sagellm_backend.providers._torch import (
    TORCH_INSTALL_HINT,
    DeviceMemory,
    TorchProviderBase,
    TorchProviderOptions,
    parse_provider_config,
    require_torch,
    torch_installed,
)

__all__ = [
    "CPUBackendProvider",
    "CpuDevice",
    "CpuEvent",
    "CpuStream",
    "create_cpu_backend",
    "is_available",
    "unavailable_reason",
]

#: Default KV budget on cpu: min(this, 10% of available RAM).
DEFAULT_CPU_KV_BYTES = 512 << 20


class CpuEvent:
    """A timing event on the host: records ``time.perf_counter_ns()``.

    Invariants: ``elapsed_ms`` needs both events recorded; re-recording moves the mark.
    """

    __slots__ = ("_t_ns",)

    def __init__(self) -> None:
        self._t_ns: int | None = None

    def record(self, stream: Stream | None = None) -> None:
        """Mark the current time (``stream`` is accepted for API symmetry with cuda)."""
        del stream
        self._t_ns = time.perf_counter_ns()

    @property
    def is_recorded(self) -> bool:
        """Whether :meth:`record` has been called."""
        return self._t_ns is not None

    def query(self) -> bool:
        """Whether the work before the event has finished (always, on the host)."""
        return True

    def synchronize(self) -> None:
        """Nothing to wait for: host work is done when the call that queued it returns."""

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds from ``start`` to this event.

        Raises:
            TypeError: ``start`` is not a :class:`CpuEvent`.
            InvalidStateError: (a RuntimeError) either event has not been recorded.
        """
        if not isinstance(start, CpuEvent):
            raise TypeError(f"elapsed_ms needs a CpuEvent start, got {type(start).__name__}")
        if start._t_ns is None or self._t_ns is None:
            raise InvalidStateError(
                "both events must be recorded (stream.record_event(e) or e.record()) "
                "before elapsed_ms"
            )
        return (self._t_ns - start._t_ns) / 1e6


class CpuStream:
    """A host stream: work is executed synchronously by the calling thread, in order."""

    __slots__ = ()

    def synchronize(self) -> None:
        """Nothing to wait for (synchronous semantics)."""

    def query(self) -> bool:
        """Whether all queued work has finished (always)."""
        return True

    def record_event(self, event: Event) -> None:
        """Record ``event`` now.

        Raises:
            TypeError: ``event`` is not a :class:`CpuEvent`.
        """
        if not isinstance(event, CpuEvent):
            raise TypeError(f"a CpuStream records CpuEvents, got {type(event).__name__}")
        event.record(self)

    def wait_event(self, event: Event) -> None:
        """Make later work wait for ``event`` (already satisfied on the host)."""
        event.synchronize()

    def wait_stream(self, stream: Stream) -> None:
        """Make later work wait for ``stream`` (already satisfied on the host)."""
        stream.synchronize()


@functools.cache
def _processor_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.cache
def _probe_dtypes() -> tuple[DType, ...]:
    """Dtypes in which torch runs a matmul, softmax and SDPA on this CPU."""
    torch = require_torch("the cpu backend")
    import torch.nn.functional as F  # noqa: N812

    found = [DType.FP32]
    for proto, tdtype in ((DType.FP16, torch.float16), (DType.BF16, torch.bfloat16)):
        try:
            x = torch.ones(2, 2, 4, 8, dtype=tdtype)
            y = torch.softmax(x @ x.transpose(-1, -2), dim=-1)
            F.scaled_dot_product_attention(x, x, x)
            if not bool(torch.isfinite(y).all()):
                continue
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        found.append(proto)
    return tuple(d for d in DType if d in found)


@functools.cache
def _libc() -> Any:
    if sys.platform != "linux":
        return None
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") else None


class CpuDevice:
    """Device layer of the host CPU (see the module docstring for each figure's source)."""

    device_type = "cpu"
    device = "cpu"
    has_graph_exec = False

    def __init__(self) -> None:
        self._torch = require_torch("the cpu backend")
        try:
            import psutil
        except ImportError as exc:
            from sagellm_backend.errors import DependencyMissingError

            raise DependencyMissingError(
                f"the cpu backend needs psutil, which is not installed: {TORCH_INSTALL_HINT}"
            ) from exc
        self._psutil = psutil
        self._process = psutil.Process()

    def device_name(self) -> str:
        """Processor model name."""
        return _processor_name()

    def compute_capability(self) -> str | None:
        """CPU ISA level torch dispatches to (``"AVX512"``, ``"AVX2"``, ``"DEFAULT"``)."""
        try:
            return str(self._torch.backends.cpu.get_cpu_capability())
        except (AttributeError, RuntimeError):
            return None

    def supported_dtypes(self) -> list[DType]:
        """fp32 plus the low-precision dtypes a probe could compute in here."""
        return list(_probe_dtypes())

    def memory(self) -> DeviceMemory:
        """Host RAM and this process's RSS."""
        vm = self._psutil.virtual_memory()
        rss = int(self._process.memory_info().rss)
        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        peak *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
        return DeviceMemory(
            total=int(vm.total),
            free=int(vm.available),
            allocated=rss,
            reserved=rss,
            peak=max(peak, rss),
            extra={"process_rss": rss},
        )

    def reset_peak_memory(self) -> None:
        """Peak RSS is a process high-water mark the OS does not let us reset."""

    def empty_cache(self) -> None:
        """Return freed heap memory to the OS where glibc allows (``malloc_trim(0)``)."""
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)

    def synchronize(self) -> None:
        """Host work is synchronous: nothing to wait for."""

    def create_stream(self) -> Stream:
        """A :class:`CpuStream`."""
        return CpuStream()

    def create_event(self) -> Event:
        """A :class:`CpuEvent`."""
        return CpuEvent()

    def collective_backend(self) -> str | None:
        """``"gloo"`` when torch.distributed has it, else None."""
        dist = self._torch.distributed
        return "gloo" if dist.is_available() and dist.is_gloo_available() else None

    def prepare_collectives(self) -> None:
        """Nothing to bind on the host."""

    def offload_devices(self) -> tuple[str, ...]:
        """The host is the offload target itself: no extra pools."""
        return ()

    def default_kv_budget(self, free_bytes: int) -> int:
        """min(512 MiB, 10% of available RAM)."""
        return min(DEFAULT_CPU_KV_BYTES, free_bytes // 10)


class CPUBackendProvider(TorchProviderBase):
    """Backend provider on the host CPU with torch (0.1.1.2 name).

    Args:
        options: :class:`~._torch.TorchProviderOptions` (``device`` must be ``"cpu"``).
        **kwargs: option fields, as an alternative to ``options``.

    Raises:
        DependencyMissingError: torch or psutil is not installed.
        ConfigError: an option is invalid.
    """

    kind = "cpu"

    def __init__(self, options: TorchProviderOptions | None = None, **kwargs: Any) -> None:
        opts, device_ids = parse_provider_config("cpu", options, kwargs)
        if opts.device not in (None, "cpu"):
            raise ConfigError(f"the cpu backend runs on device 'cpu', got device={opts.device!r}")
        if device_ids not in (None, [], [0]):
            raise ConfigError(f"the cpu backend has one device (0), got device_ids={device_ids}")
        super().__init__(CpuDevice(), opts)

    @classmethod
    def is_available(cls) -> bool:
        """Whether this backend can be created here (torch importable), without creating it."""
        return is_available()


def is_available() -> bool:
    """Whether the cpu backend can run here (torch and psutil installed); imports neither."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    """Why the cpu backend cannot run here (with the fix), or None when it can."""
    import importlib.util

    missing = [m for m in ("torch", "psutil") if importlib.util.find_spec(m) is None]
    if not torch_installed() or missing:
        return f"{' and '.join(missing)} not installed: {TORCH_INSTALL_HINT}"
    return None


def create_cpu_backend(config: Any = None, **kwargs: Any) -> CPUBackendProvider:
    """Entry point ``sagellm.backends:cpu``: create a :class:`CPUBackendProvider`.

    Args:
        config: None, a dict of options, or a sagellm-core ``BackendConfig``-like object
            (``kind`` must be ``"cpu"`` if set; ``device`` ``"cpu"``).
        **kwargs: options that override ``config`` (see
            :class:`~._torch.TorchProviderOptions`).

    Raises:
        DependencyMissingError: torch is missing (the message has the pip command).
        ConfigError: an invalid option.
    """
    opts, device_ids = parse_provider_config("cpu", config, kwargs)
    require_torch("the cpu backend")
    if device_ids not in (None, [], [0]):
        raise ConfigError(f"the cpu backend has one device (0), got device_ids={device_ids}")
    return CPUBackendProvider(opts)
