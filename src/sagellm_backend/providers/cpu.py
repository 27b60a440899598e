"""The cpu backend provider: the host CPU, with torch when it is installed.

:class:`CPUBackendProvider` is the shared provider core (:class:`~._torch.TorchProviderBase`)
over :class:`CpuDevice`, the host's device layer. It works on a base install (no torch):

* capability: processor name (``/proc/cpuinfo``, else :mod:`platform`) with its logical
  core count, the CPU ISA level as ``compute_capability`` (what torch dispatches to, e.g.
  ``"AVX512"``; without torch read from the cpuinfo flags the same way), host memory from
  psutil, and the dtypes: with torch those a probe matmul/softmax/SDPA runs in (fp32
  always; bf16 and fp16 where they work); without torch fp32, fp16 and int8 (the 0.1.1.2
  set: pages hold any bytes, no kernels compute).
* KV: a fixed page pool preallocated in host memory -- torch tensors
  (:class:`~sagellm_backend.kv.storage.TorchKVStorage`) with torch, a ``bytearray``
  (:class:`~sagellm_backend.kv.storage.HostKVStorage`, writable ``memoryview`` page views)
  without. Copies and migrations move the bytes. Exhaustion, double free, foreign blocks
  and accounting follow the same rules as every provider (:class:`~sagellm_backend.kv.
  provider_kv.ProviderKV`). ``use_torch=False`` picks host pages even when torch is there.
* streams/events: synchronous semantics (work runs on the calling thread before the call
  returns, so ``synchronize`` has nothing to wait for); events record a monotonic clock
  (``time.perf_counter_ns``) and ``elapsed_ms`` is real wall time.
* memory: ``allocated``/``reserved`` = resident set size of this process, ``peak`` = its
  peak RSS (``getrusage``; cannot be reset), ``total``/``free`` = host RAM total/available
  (psutil, a base dependency); ``clear_cache()`` drops evictable KV pages and returns freed
  heap to the OS (``malloc_trim``).
* kernels: torch's built-in kernels when torch runs; none without it (kernels are
  registered only where they can run; ``register_kernel`` works either way).
* collectives: torch.distributed with gloo. Without torch one rank is all there is:
  ``all_reduce`` leaves a number or (nested) list as it is, ``all_gather`` returns a copy
  (a one-element list for a number), and ``init_distributed`` with more than one rank raises
  :class:`~sagellm_backend.errors.DependencyMissingError` naming the ``[torch]`` extra.

Example:
    >>> from sagellm_backend.providers.cpu import create_cpu_backend
    >>> backend = create_cpu_backend({"kv_memory_bytes": 64 << 20})
    >>> backend.capability().device_type
    'cpu'
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import os
import platform
import resource
import sys
import time
from typing import Any

from sagellm_backend._validate import require_instance
from sagellm_backend.base import BackendProvider as BackendProvider  # 0.1.1.2 export
from sagellm_backend.base import Event, Stream
from sagellm_backend.base import KVBlock as KVBlock  # 0.1.1.2 export
from sagellm_backend.capability import CapabilityDescriptor as CapabilityDescriptor  # 0.1.1.2
from sagellm_backend.capability import DType
from sagellm_backend.capability import KernelKind as KernelKind  # 0.1.1.2 export
from sagellm_backend.errors import ConfigError, DependencyMissingError, InvalidStateError
from sagellm_backend.providers._torch import (
    DeviceMemory,
    TorchProviderBase,
    TorchProviderOptions,
    parse_provider_config,
    torch_installed,
)

__all__ = [
    "CPUBackendProvider",
    "CPUEvent",
    "CPUStream",
    "CpuDevice",
    "CpuEvent",
    "CpuStream",
    "create_cpu_backend",
    "is_available",
    "unavailable_reason",
]

#: dtypes of the cpu backend without torch (the 0.1.1.2 set).
HOST_DTYPES: tuple[DType, ...] = (DType.FP32, DType.FP16, DType.INT8)

#: Default KV budget on cpu: min(this, a quarter of the available RAM).
DEFAULT_CPU_KV_BYTES = 4 << 30


class CpuEvent:
    """A timing event on the host: records ``time.perf_counter_ns()``.

    Invariants: ``elapsed_ms`` needs both events recorded; re-recording moves the mark.
    """

    __slots__ = ("_t_ns", "event_id")

    def __init__(self, event_id: int = 0, timestamp: float = 0.0) -> None:
        self.event_id = event_id
        self._t_ns: int | None = None if not timestamp else int(timestamp * 1e9)

    @property
    def timestamp(self) -> float:
        """Seconds (``time.perf_counter`` clock) when recorded; 0.0 before (0.1.1.2 field)."""
        return 0.0 if self._t_ns is None else self._t_ns / 1e9

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
        start = require_instance(start, CpuEvent, "elapsed_ms needs a CpuEvent start")
        if start._t_ns is None or self._t_ns is None:
            raise InvalidStateError(
                "both events must be recorded (stream.record_event(e) or e.record()) "
                "before elapsed_ms"
            )
        return (self._t_ns - start._t_ns) / 1e6


class CpuStream:
    """A host stream: work is executed synchronously by the calling thread, in order."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int = 0) -> None:
        self.stream_id = stream_id

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
        require_instance(event, CpuEvent, "a CpuStream records CpuEvents").record(self)

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


#: 0.1.1.2 names of the host stream/event classes.
CPUEvent = CpuEvent
CPUStream = CpuStream


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("flags", "features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _isa_level() -> str:
    """The ISA level torch's CPU dispatch would name, read from the cpuinfo flags."""
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "AVX512"
    if "avx2" in flags:
        return "AVX2"
    if "asimd" in flags:
        return "NEON"
    return "DEFAULT"


@functools.cache
def _probe_dtypes() -> tuple[DType, ...]:
    """Dtypes in which torch runs a matmul, softmax and SDPA on this CPU."""
    import torch
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

    def __init__(self, torch: Any = None) -> None:
        self._torch = torch
        try:
            import psutil
        except ImportError as exc:  # pragma: no cover - psutil is a base dependency
            raise DependencyMissingError(
                "the cpu backend needs psutil (a dependency of isagellm-backend), which is "
                "not installed: pip install psutil"
            ) from exc
        self._psutil = psutil
        self._process = psutil.Process()

    def device_name(self) -> str:
        """Processor model name and logical core count."""
        return f"{_processor_name()} ({os.cpu_count() or 1} cores)"

    def compute_capability(self) -> str | None:
        """CPU ISA level (``"AVX512"``, ``"AVX2"``, ``"NEON"``, ``"DEFAULT"``)."""
        if self._torch is not None:
            try:
                return str(self._torch.backends.cpu.get_cpu_capability())
            except (AttributeError, RuntimeError):
                pass
        return _isa_level()

    def supported_dtypes(self) -> list[DType]:
        """With torch: fp32 plus what a probe computes in; without: :data:`HOST_DTYPES`."""
        return list(_probe_dtypes()) if self._torch is not None else list(HOST_DTYPES)

    def memory(self) -> DeviceMemory:
        """Host RAM and this process's RSS.

        Extras: ``process_rss`` and 0.1.1.2's keys ``rss`` / ``vms`` (this process) and
        ``available`` / ``used`` (host RAM, as psutil reports them).
        """
        vm = self._psutil.virtual_memory()
        info = self._process.memory_info()
        rss = int(info.rss)
        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        peak *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
        return DeviceMemory(
            total=int(vm.total),
            free=int(vm.available),
            allocated=rss,
            reserved=rss,
            peak=max(peak, rss),
            extra={
                "process_rss": rss,
                "rss": rss,
                "vms": int(info.vms),
                "available": int(vm.available),
                "used": int(vm.used),
            },
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
        """``"gloo"`` when torch.distributed has it; ``"local"`` (one rank) without torch."""
        if self._torch is None:
            return "local"
        dist = self._torch.distributed
        return "gloo" if dist.is_available() and dist.is_gloo_available() else None

    def prepare_collectives(self) -> None:
        """Nothing to bind on the host."""

    def offload_devices(self) -> tuple[str, ...]:
        """The host is the offload target itself: no extra pools."""
        return ()

    def default_kv_budget(self, free_bytes: int) -> int:
        """min(4 GiB, a quarter of the available RAM) (vLLM's CPU default is 4 GiB)."""
        return min(DEFAULT_CPU_KV_BYTES, free_bytes // 4)


class CPUBackendProvider(TorchProviderBase):
    """Backend provider on the host CPU (0.1.1.2 name); torch is optional.

    Args:
        options: :class:`~._torch.TorchProviderOptions` (``device`` must be ``"cpu"``;
            ``use_torch=False`` keeps host pages even with torch installed).
        **kwargs: option fields, as an alternative to ``options``.

    Raises:
        DependencyMissingError: ``use_torch=True`` and torch is not installed.
        ConfigError: an option is invalid.
    """

    kind = "cpu"

    def __init__(self, options: TorchProviderOptions | None = None, **kwargs: Any) -> None:
        opts, device_ids = parse_provider_config("cpu", options, kwargs)
        if opts.device == "cpu:0":  # torch's name of the same device (0.1.1.2 took it)
            opts = dataclasses.replace(opts, device="cpu")
        if opts.device not in (None, "cpu"):
            raise ConfigError(
                f"the cpu backend runs on device 'cpu' (or 'cpu:0'), got device={opts.device!r}"
            )
        if device_ids not in (None, [], [0]):
            raise ConfigError(f"the cpu backend has one device (0), got device_ids={device_ids}")
        torch: Any = None
        if opts.use_torch is not False and (opts.use_torch or torch_installed()):
            from sagellm_backend.providers._torch import require_torch

            torch = require_torch("the cpu backend with use_torch=True")
        self._host_torch = torch
        super().__init__(CpuDevice(torch), opts)

    def _load_torch(self, options: TorchProviderOptions) -> Any:
        """Return torch when installed (and not declined with ``use_torch=False``), else None."""
        return self._host_torch

    @classmethod
    def is_available(cls) -> bool:
        """Whether this backend can be created here (always: torch is optional)."""
        return is_available()


def is_available() -> bool:
    """Whether the cpu backend can run here (psutil importable; torch is optional)."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    """Why the cpu backend cannot run here (with the fix), or None when it can."""
    import importlib.util

    if importlib.util.find_spec("psutil") is None:
        return "psutil (a dependency of isagellm-backend) is not installed: pip install psutil"
    return None


def create_cpu_backend(config: Any = None, **kwargs: Any) -> CPUBackendProvider:
    """Entry point ``sagellm.backends:cpu``: create a :class:`CPUBackendProvider`.

    Args:
        config: None, a dict of options, or a sagellm-core ``BackendConfig``-like object
            (``kind`` must be ``"cpu"`` if set; ``device`` ``"cpu"``).
        **kwargs: options that override ``config`` (see
            :class:`~._torch.TorchProviderOptions`).

    Raises:
        DependencyMissingError: ``use_torch=True`` and torch is missing (with the pip command).
        ConfigError: an invalid option.
    """
    opts, device_ids = parse_provider_config("cpu", config, kwargs)
    if device_ids not in (None, [], [0]):
        raise ConfigError(f"the cpu backend has one device (0), got device_ids={device_ids}")
    return CPUBackendProvider(opts)
