"""The cuda backend provider: torch on one NVIDIA GPU.

This is the ONLY module of the library that touches ``torch.cuda`` (a test greps for it).
Everything else a cuda provider does (dtype enforcement, KV pools on real tensors, kernels,
collectives, memory bookkeeping) is the shared :class:`~._torch.TorchProviderBase`, the same
code the cpu provider runs. What lives here:

* :class:`CudaDevice`: device properties (name, compute capability, memory), dtypes by
  compute capability (:func:`dtypes_for_compute_capability`: bf16 from sm80, fp8 from sm89),
  ``torch.cuda.Stream`` / ``torch.cuda.Event(enable_timing=True)`` wrappers, the caching
  allocator's figures (``memory_allocated``/``memory_reserved``/``max_memory_allocated``/
  ``mem_get_info``) and ``empty_cache``, NCCL availability, ``set_device`` before joining a
  process group; a host ``"cpu"`` KV pool for offload (``kv_block_migrate(block, "cpu")``
  and back).
* :class:`CudaBackendProvider` and :func:`create_cuda_backend` (entry point
  ``sagellm.backends:cuda``).

The module imports without torch and without CUDA. Creating the provider raises
:class:`~sagellm_backend.errors.DependencyMissingError` (with the pip command) when torch is
missing and :class:`~sagellm_backend.errors.BackendNotAvailableError` naming what is missing
(a CUDA build of torch, a visible device, the requested index) otherwise.

Memory keys (:meth:`~._torch.TorchProviderBase.memory_stats`): ``allocated`` =
``torch.cuda.memory_allocated``, ``reserved`` = ``memory_reserved``, ``peak`` =
``max_memory_allocated`` (reset by ``reset_peak_memory_stats``), ``peak_reserved`` =
``max_memory_reserved``, ``total``/``free`` = ``torch.cuda.mem_get_info`` (whole device,
all processes).
"""

from __future__ import annotations

from typing import Any

from sagellm_backend._validate import require_instance
from sagellm_backend.base import BackendProvider as BackendProvider  # 0.1.1.2 export
from sagellm_backend.base import Event, Stream
from sagellm_backend.base import KVBlock as KVBlock  # 0.1.1.2 export
from sagellm_backend.capability import CapabilityDescriptor as CapabilityDescriptor  # 0.1.1.2
from sagellm_backend.capability import DType
from sagellm_backend.capability import KernelKind as KernelKind  # 0.1.1.2 export
from sagellm_backend.errors import BackendNotAvailableError, ConfigError, InvalidStateError
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
    "CudaBackendProvider",
    "CudaDevice",
    "CudaEvent",
    "CudaStream",
    "create_cuda_backend",
    "dtypes_for_compute_capability",
    "is_available",
    "parse_cuda_device",
    "unavailable_reason",
]

#: Default KV budget on cuda: this fraction of free device memory at first use.
DEFAULT_CUDA_KV_FRACTION = 0.5


def dtypes_for_compute_capability(major: int, minor: int) -> list[DType]:
    """Dtypes a GPU of compute capability ``major.minor`` supports here, in protocol order.

    fp32 and fp16 on every GPU torch supports; bf16 from sm80 (Ampere); fp8 (e4m3) from sm89
    (Ada/Hopper). int8/int4 are not listed: no built-in kernel computes in them.
    """
    found = [DType.FP32, DType.FP16]
    if (major, minor) >= (8, 0):
        found.append(DType.BF16)
    if (major, minor) >= (8, 9):
        found.append(DType.FP8)
    return [d for d in DType if d in found]


def parse_cuda_device(device: str | None, device_ids: list[int] | None) -> int:
    """Device index from ``device`` (``"cuda"``/``"cuda:N"``) and/or ``device_ids``.

    Raises:
        ConfigError: malformed device, several device_ids, or device and device_ids disagree.
    """
    index: int | None = None
    if device is not None:
        text = device.strip().lower()
        if text == "cuda":
            index = None
        elif text.startswith("cuda:") and text[5:].isdigit():
            index = int(text[5:])
        else:
            raise ConfigError(
                f"the cuda backend needs device 'cuda' or 'cuda:N', got device={device!r}"
            )
    if device_ids:
        if len(device_ids) > 1:
            raise ConfigError(
                f"one cuda provider drives one GPU, got device_ids={device_ids}; start one "
                "process per GPU (device='cuda:N') and join them with init_distributed()"
            )
        if index is not None and index != device_ids[0]:
            raise ConfigError(f"device={device!r} and device_ids={device_ids} disagree")
        index = device_ids[0]
    return 0 if index is None else index


def unavailable_reason(index: int = 0) -> str | None:
    """Why a cuda provider for device ``index`` cannot be created here, or None if it can."""
    if not torch_installed():
        return f"torch is not installed: {TORCH_INSTALL_HINT}"
    import torch

    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return (
                f"this torch ({torch.__version__}) was built without CUDA; install a CUDA "
                "build of torch"
            )
        return (
            "no CUDA device is visible (torch.cuda.is_available() is False: check the "
            "NVIDIA driver and CUDA_VISIBLE_DEVICES)"
        )
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        return f"cuda device {index} does not exist; {count} visible (0..{count - 1})"
    return None


def is_available() -> bool:
    """Whether a cuda provider for device 0 can be created here."""
    return unavailable_reason() is None


class CudaEvent:
    """``torch.cuda.Event(enable_timing=True)``; ``elapsed_ms`` is real device time.

    Attributes:
        raw: the torch event.
        device: the CUDA device string (``"cuda:0"``; the 0.1.1.2 field).
    """

    __slots__ = ("_recorded", "device", "raw")

    def __init__(self, raw: Any = None, device: str = "cuda") -> None:
        if raw is None:
            import torch

            raw = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        self.raw = raw
        self.device = device
        self._recorded = False

    def record(self, stream: Stream | None = None) -> None:
        """Record on ``stream`` (a :class:`CudaStream`) or the current stream."""
        if stream is None:
            self.raw.record()
        elif isinstance(stream, CudaStream):
            self.raw.record(stream.raw)
        else:
            raise TypeError(f"a CudaEvent records on CudaStreams, got {type(stream).__name__}")
        self._recorded = True

    @property
    def is_recorded(self) -> bool:
        """Whether the event has been recorded on a stream."""
        return self._recorded

    def query(self) -> bool:
        """Whether the work recorded before the event has finished."""
        return bool(self.raw.query())

    def synchronize(self) -> None:
        """Block the host until the event has completed."""
        self.raw.synchronize()

    def elapsed_ms(self, start: Event) -> float:
        """Device milliseconds from ``start`` to this event (waits for this event).

        Raises:
            TypeError: ``start`` is not a :class:`CudaEvent`.
            InvalidStateError: either event has not been recorded.
        """
        start = require_instance(start, CudaEvent, "elapsed_ms needs a CudaEvent start")
        if not (start._recorded and self._recorded):
            raise InvalidStateError(
                "both events must be recorded (stream.record_event(e) or e.record()) "
                "before elapsed_ms"
            )
        self.raw.synchronize()
        return float(start.raw.elapsed_time(self.raw))


class CudaStream:
    """A ``torch.cuda.Stream``; use ``with stream:`` to queue work on it.

    Attributes:
        raw: the torch stream.
        device: the CUDA device string (``"cuda:0"``; the 0.1.1.2 field).
    """

    __slots__ = ("_ctx", "device", "raw")

    def __init__(self, raw: Any, device: str = "cuda") -> None:
        self.raw = raw
        self.device = device
        self._ctx: Any = None

    def synchronize(self) -> None:
        """Block the host until all work queued on the stream has finished."""
        self.raw.synchronize()

    def query(self) -> bool:
        """Whether all queued work has finished."""
        return bool(self.raw.query())

    def record_event(self, event: Event) -> None:
        """Record ``event`` (a :class:`CudaEvent`) at the end of this stream."""
        require_instance(event, CudaEvent, "a CudaStream records CudaEvents").record(self)

    def wait_event(self, event: Event) -> None:
        """Make later work on this stream wait for ``event``."""
        event = require_instance(event, CudaEvent, "a CudaStream waits on CudaEvents")
        self.raw.wait_event(event.raw)

    def wait_stream(self, stream: Stream) -> None:
        """Make later work on this stream wait for all work queued on ``stream``."""
        stream = require_instance(stream, CudaStream, "a CudaStream waits on CudaStreams")
        self.raw.wait_stream(stream.raw)

    def __enter__(self) -> CudaStream:
        import torch

        self._ctx = torch.cuda.stream(self.raw)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(*exc)


class CudaDevice:
    """Device layer of one GPU (the only code that calls ``torch.cuda``).

    Args:
        index: device index (``0 <= index < torch.cuda.device_count()``).

    Raises:
        DependencyMissingError: torch is missing.
        BackendNotAvailableError: naming what is missing for CUDA or the device.
    """

    device_type = "cuda"
    has_graph_exec = True

    def __init__(self, index: int = 0) -> None:
        self._torch = require_torch("the cuda backend")
        reason = unavailable_reason(index)
        if reason is not None:
            raise BackendNotAvailableError(f"the cuda backend is not available: {reason}")
        self.index = index
        self.device = f"cuda:{index}"
        props = self._torch.cuda.get_device_properties(index)
        self._name = str(props.name)
        self._major, self._minor = int(props.major), int(props.minor)
        self._total = int(props.total_memory)
        self.has_graph_exec = hasattr(self._torch.cuda, "CUDAGraph")

    def device_name(self) -> str:
        """GPU name from its properties (e.g. ``"NVIDIA H100 80GB HBM3"``)."""
        return self._name

    def compute_capability(self) -> str | None:
        """``"major.minor"``."""
        return f"{self._major}.{self._minor}"

    def supported_dtypes(self) -> list[DType]:
        """:func:`dtypes_for_compute_capability` of this GPU."""
        return dtypes_for_compute_capability(self._major, self._minor)

    def memory(self) -> DeviceMemory:
        """Caching-allocator figures of this process plus device free/total.

        Extras: ``peak_reserved`` and 0.1.1.2's keys ``allocated_bytes`` /
        ``reserved_bytes`` / ``allocated_mb`` / ``reserved_mb`` (MiB, rounded down).
        """
        cuda = self._torch.cuda
        free, total = cuda.mem_get_info(self.index)
        allocated = int(cuda.memory_allocated(self.index))
        reserved = int(cuda.memory_reserved(self.index))
        return DeviceMemory(
            total=int(total),
            free=int(free),
            allocated=allocated,
            reserved=reserved,
            peak=int(cuda.max_memory_allocated(self.index)),
            extra={
                "peak_reserved": int(cuda.max_memory_reserved(self.index)),
                "allocated_bytes": allocated,
                "reserved_bytes": reserved,
                "allocated_mb": allocated >> 20,
                "reserved_mb": reserved >> 20,
            },
        )

    def reset_peak_memory(self) -> None:
        """``torch.cuda.reset_peak_memory_stats`` on this device."""
        self._torch.cuda.reset_peak_memory_stats(self.index)

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()``: release cached blocks no tensor uses."""
        self._torch.cuda.empty_cache()

    def synchronize(self) -> None:
        """``torch.cuda.synchronize`` on this device."""
        self._torch.cuda.synchronize(self.index)

    def create_stream(self) -> Stream:
        """A new :class:`CudaStream` on this device."""
        return CudaStream(self._torch.cuda.Stream(device=self.index), self.device)

    def create_event(self) -> Event:
        """A new timing :class:`CudaEvent`."""
        return CudaEvent(self._torch.cuda.Event(enable_timing=True), self.device)

    def collective_backend(self) -> str | None:
        """``"nccl"`` when torch.distributed has NCCL, else None."""
        dist = self._torch.distributed
        return "nccl" if dist.is_available() and dist.is_nccl_available() else None

    def prepare_collectives(self) -> None:
        """``torch.cuda.set_device(index)`` so NCCL binds to this GPU."""
        self._torch.cuda.set_device(self.index)

    def offload_devices(self) -> tuple[str, ...]:
        """KV offload target: host memory."""
        return ("cpu",)

    def default_kv_budget(self, free_bytes: int) -> int:
        """50% of free device memory (read when KV is first used)."""
        return int(free_bytes * DEFAULT_CUDA_KV_FRACTION)


class CudaBackendProvider(TorchProviderBase):
    """Backend provider on one CUDA GPU with torch (0.1.1.2 name).

    Args:
        options: :class:`~._torch.TorchProviderOptions`; ``device`` ``"cuda"``/``"cuda:N"``.
        device_layer: a ready device layer to use instead of :class:`CudaDevice` (tests
            inject a fake to exercise this class without a GPU).
        storage_factory: KV storage factory ``(spec, num_pages, device)`` (default
            :class:`~sagellm_backend.kv.storage.TorchKVStorage`).
        **kwargs: option fields (and ``device_ids``), as an alternative to ``options``.

    Raises:
        DependencyMissingError: torch is missing.
        BackendNotAvailableError: CUDA or the device is not available (message says which).
        ConfigError: an invalid option.
    """

    kind = "cuda"

    def __init__(
        self,
        options: TorchProviderOptions | None = None,
        *,
        device_layer: Any = None,
        storage_factory: Any = None,
        **kwargs: Any,
    ) -> None:
        opts, device_ids = parse_provider_config("cuda", options, kwargs)
        index = parse_cuda_device(opts.device, device_ids)
        layer = device_layer if device_layer is not None else CudaDevice(index)
        super().__init__(layer, opts, storage_factory=storage_factory)

    @classmethod
    def is_available(cls) -> bool:
        """Whether a cuda provider can be created here, without creating one."""
        return is_available()


def create_cuda_backend(config: Any = None, **kwargs: Any) -> CudaBackendProvider:
    """Entry point ``sagellm.backends:cuda``: create a :class:`CudaBackendProvider`.

    Args:
        config: None, a dict of options, or a sagellm-core ``BackendConfig``-like object
            (``kind`` ``"cuda"`` if set; ``device`` ``"cuda:N"`` and/or ``device_ids=[N]``).
        **kwargs: options that override ``config``.

    Raises:
        DependencyMissingError: torch is missing (the message has the pip command).
        BackendNotAvailableError: CUDA or the device is not available (naming which).
        ConfigError: an invalid option.
    """
    opts, device_ids = parse_provider_config("cuda", config, kwargs)
    index = parse_cuda_device(opts.device, device_ids)
    require_torch("the cuda backend")
    reason = unavailable_reason(index)
    if reason is not None:
        raise BackendNotAvailableError(f"the cuda backend is not available: {reason}")
    return CudaBackendProvider(opts, device_ids=device_ids)
