"""MockBackendProvider: a faithful, dependency-free provider for CI and development.

It keeps real accounting and fails the way real providers do, so code tested against it
behaves the same on hardware:

* **Capability matrix**: dtypes, kernels, streams/events/collectives/graphs, memory, device
  name/type, batch/sequence limits are configurable, and what it advertises it enforces:
  an unsupported dtype raises :class:`~sagellm_backend.errors.UnsupportedDTypeError` (a
  ``ValueError``) naming the supported ones; collectives with ``has_collective=False`` and
  streams/events with ``has_stream``/``has_event`` False raise
  :class:`~sagellm_backend.errors.CapabilityNotSupportedError` (``NotImplementedError``);
  an unknown kernel raises :class:`~sagellm_backend.errors.KernelNotFoundError` (``KeyError``)
  naming the registered ones.
* **KV cache**: the shared :class:`~sagellm_backend.kv.provider_kv.ProviderKV` over
  :class:`~sagellm_backend.kv.storage.AccountingStorage` (no bytes, real pages, refcounts,
  budget = ``max_memory_mb``), plus a simulated host pool (``offload_device="cpu"``) as a
  migration target. ``get_kv_tensor(block)`` returns one
  :class:`~sagellm_backend.kv.storage.PageRef` descriptor per page.
* **Kernels**: real pure-Python implementations (on nested lists of numbers) of the kinds it
  advertises: ``matmul`` (MATMUL), ``attention`` (ATTENTION), ``layer_norm``/``rms_norm``
  (LAYERNORM), ``softmax`` (SOFTMAX), ``silu_and_mul`` (FUSION).
  ``capability().supported_kernels`` is derived from the registry.
* **Events** measure real elapsed time (``time.perf_counter``); mock work is synchronous, so
  ``synchronize`` returns at once.
* **Collectives** simulate ``world_size`` ranks that all hold the same data: with one rank
  ``all_reduce`` is an in-place no-op and ``all_gather`` returns a one-element gather; with
  ``N`` ranks ``sum`` multiplies by ``N``, ``product`` raises to the power ``N``, ``avg``/
  ``max``/``min`` keep the value, and ``all_gather`` concatenates ``N`` copies along the
  first axis. Calls are counted in ``collective_calls``.
* **Fault injection** (for sagellm-core's CI): ``fail_on_init``, ``fail_kv_after_pages``,
  ``failing_kernels``, ``kernel_latency_ms``, ``collective_latency_ms``; also settable later
  with :meth:`MockBackendProvider.inject_kernel_failure` / :meth:`MockBackendProvider.clear_faults`.

Memory figures (:meth:`MockBackendProvider.memory_stats`, bytes unless noted): ``total``
(``max_memory_mb``), ``allocated`` (KV charged to the budget: pages of live blocks plus
every KV manager's pool), ``peak`` (highest ``allocated``), ``free`` (``total -
allocated``), ``reserved`` (= ``allocated``: the mock has no caching allocator),
``kv_pool_bytes``, ``kv_used_bytes``, ``num_kv_blocks``, the 0.1.1.x keys
``allocated_bytes``/``reserved_bytes``/``allocated_mb``/``reserved_mb``, and the
``kv_*``/``offload_*`` figures of :meth:`ProviderKV.stats`.
"""

from __future__ import annotations

import copy
import functools
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sagellm_protocol import ErrorCode

from sagellm_backend.base import Event as Event  # 0.1.1.2 export
from sagellm_backend.base import KVBlock
from sagellm_backend.base import Stream as Stream  # 0.1.1.2 export
from sagellm_backend.capability import CapabilityDescriptor, DType, KernelKind, parse_dtype
from sagellm_backend.errors import (
    BackendError,
    BackendNotAvailableError,
    CapabilityNotSupportedError,
    ConfigError,
    InvalidStateError,
    KVCacheExhaustedError,
)
from sagellm_backend.kernels.registry import KernelRegistry
from sagellm_backend.kv.manager import KVCacheManager
from sagellm_backend.kv.provider_kv import ProviderKV
from sagellm_backend.kv.spec import DEFAULT_KV_SPEC, KVSpec
from sagellm_backend.kv.storage import AccountingStorage, PageRef

__all__ = [
    "COLLECTIVE_OPS",
    "InjectedFaultError",
    "MockBackendProvider",
    "MockEvent",
    "MockStream",
    "create_mock_backend",
]

MIB = 1 << 20

#: Reduction ops accepted by ``all_reduce``.
COLLECTIVE_OPS: tuple[str, ...] = ("sum", "avg", "max", "min", "product")

_DEFAULT_DTYPES = (DType.FP16, DType.BF16)  # the 0.1.1.x defaults
_DEFAULT_KINDS = (KernelKind.MATMUL, KernelKind.ATTENTION)


class InjectedFaultError(BackendError, RuntimeError):
    """A failure the mock was configured to inject (UNAVAILABLE, retryable)."""

    code = ErrorCode.UNAVAILABLE
    retryable = True


# --------------------------------------------------------------------------- stream / event


class MockEvent:
    """Timing event; :meth:`record` stamps ``time.perf_counter()``."""

    def __init__(self) -> None:
        self._time: float | None = None

    @property
    def recorded(self) -> bool:
        """Whether the event has been recorded."""
        return self._time is not None

    def record(self, stream: MockStream | None = None) -> None:
        """Record the event now (mock work is synchronous, so "now" is the stream's end)."""
        self._time = time.perf_counter()
        if stream is not None:
            stream.num_events += 1

    def query(self) -> bool:
        """Whether the work before the event has finished (always, once recorded)."""
        return self._time is not None

    def synchronize(self) -> None:
        """Return at once: mock work completes synchronously."""

    def elapsed_ms(self, start: MockEvent) -> float:
        """Milliseconds from ``start`` to this event (real wall time between the records).

        Raises:
            TypeError: ``start`` is not a :class:`MockEvent`.
            InvalidStateError: either event was never recorded.
        """
        if not isinstance(start, MockEvent):
            raise TypeError(f"start must be a MockEvent, got {type(start).__name__}")
        if start._time is None or self._time is None:
            which = "start" if start._time is None else "end"
            raise InvalidStateError(f"elapsed_ms: the {which} event was never recorded")
        return (self._time - start._time) * 1000.0


class MockStream:
    """Ordered queue of mock work (executed synchronously, so it is always drained)."""

    def __init__(self) -> None:
        self.num_events = 0
        self.num_synchronize = 0

    def synchronize(self) -> None:
        """Return at once (all work already ran); counted in ``num_synchronize``."""
        self.num_synchronize += 1

    def record_event(self, event: MockEvent) -> None:
        """Record ``event`` at the current end of this stream."""
        if not isinstance(event, MockEvent):
            raise TypeError(f"record_event expects a MockEvent, got {type(event).__name__}")
        event.record(self)

    def wait_event(self, event: MockEvent) -> None:
        """Make later work wait for ``event`` (nothing to wait for in the mock)."""
        if not isinstance(event, MockEvent):
            raise TypeError(f"wait_event expects a MockEvent, got {type(event).__name__}")


# --------------------------------------------------------------------------- pure-Python kernels


def _depth(x: Any) -> int:
    d = 0
    while isinstance(x, list | tuple):
        d += 1
        if not x:
            break
        x = x[0]
    return d


def _rows(x: Any, name: str) -> list[list[float]]:
    if _depth(x) != 2 or not x:
        raise ValueError(f"{name} must be a non-empty 2-d list of numbers")
    width = len(x[0])
    for row in x:
        if len(row) != width:
            raise ValueError(f"{name} is ragged: rows of {width} and {len(row)} elements")
    return [list(map(float, r)) for r in x]


def _matmul(a: Any, b: Any, bias: Any = None) -> Any:
    """``a @ b`` (+ ``bias`` over the last dim) on nested lists; leading dims are batched."""
    da, db = _depth(a), _depth(b)
    if da > 2 or db > 2:
        if da > 2 and db > 2:
            if len(a) != len(b):
                raise ValueError(f"matmul: batch sizes differ: {len(a)} and {len(b)}")
            return [_matmul(x, y, bias) for x, y in zip(a, b, strict=True)]
        if da > 2:
            return [_matmul(x, b, bias) for x in a]
        return [_matmul(a, y, bias) for y in b]
    if da == 1:
        return _matmul([a], b, bias)[0]
    if db == 1:
        rows = _rows(a, "a")
        if len(rows[0]) != len(b):
            raise ValueError(f"matmul: inner dimensions differ: {len(rows[0])} and {len(b)}")
        return [math.fsum(x * float(y) for x, y in zip(r, b, strict=True)) for r in rows]
    ra, rb = _rows(a, "a"), _rows(b, "b")
    if len(ra[0]) != len(rb):
        raise ValueError(
            f"matmul: inner dimensions differ: a is {len(ra)}x{len(ra[0])}, "
            f"b is {len(rb)}x{len(rb[0])}"
        )
    cols = list(zip(*rb, strict=True))
    out = [[math.fsum(x * y for x, y in zip(r, c, strict=True)) for c in cols] for r in ra]
    if bias is not None:
        if len(bias) != len(cols):
            raise ValueError(f"matmul: bias has {len(bias)} elements, expected {len(cols)}")
        out = [[v + float(bb) for v, bb in zip(r, bias, strict=True)] for r in out]
    return out


def _softmax_row(row: list[float]) -> list[float]:
    finite = [v for v in row if v != -math.inf]
    if not finite:
        return [0.0] * len(row)
    m = max(finite)
    exps = [math.exp(v - m) if v != -math.inf else 0.0 for v in row]
    total = math.fsum(exps)
    return [e / total for e in exps]


def _softmax(x: Any, dim: int = -1) -> Any:
    """Numerically stable softmax over the last dim of nested lists."""
    if dim not in (-1, _depth(x) - 1):
        raise ValueError(f"softmax: the mock kernel works on the last dim only, got dim={dim}")
    if _depth(x) == 1:
        return _softmax_row([float(v) for v in x])
    return [_softmax(r, -1) for r in x]


def _attention_2d(
    q: Any, k: Any, v: Any, mask: Any, is_causal: bool, scale: float | None
) -> list[list[float]]:
    rq, rk, rv = _rows(q, "query"), _rows(k, "key"), _rows(v, "value")
    d = len(rq[0])
    if len(rk[0]) != d or len(rk) != len(rv):
        raise ValueError(
            f"attention: query dim {d}, key {len(rk)}x{len(rk[0])}, value {len(rv)}x{len(rv[0])}"
        )
    s = 1.0 / math.sqrt(d) if scale is None else scale
    out = []
    for i, qi in enumerate(rq):
        scores = [math.fsum(a * b for a, b in zip(qi, kj, strict=True)) * s for kj in rk]
        for j in range(len(rk)):
            if is_causal and j > i:
                scores[j] = -math.inf
            elif mask is not None:
                m = mask[i][j]
                if isinstance(m, bool):
                    if not m:
                        scores[j] = -math.inf
                else:
                    scores[j] += float(m)
        p = _softmax_row(scores)
        out.append(
            [math.fsum(pj * vj[c] for pj, vj in zip(p, rv, strict=True)) for c in range(len(rv[0]))]
        )
    return out


def _attention(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
) -> Any:
    """Scaled dot-product attention on nested lists.

    Shapes: ``[S, D]`` (one head), ``[H, S, D]`` or ``[B, H, S, D]``; key/value may have
    fewer heads than the query (grouped-query: ``Hq % Hkv == 0``). ``attn_mask`` is boolean
    (True = attend) or additive, ``[Sq, Sk]`` or with the same leading dims as the query.
    ``is_causal`` masks key ``j > i`` (top-left aligned). Fully masked rows give zeros.
    """
    dq = _depth(query)
    if dq not in (2, 3, 4) or _depth(key) != dq or _depth(value) != dq:
        raise ValueError("attention: query/key/value must all be [S, D], [H, S, D] or [B, H, S, D]")
    mask_depth = _depth(attn_mask) if attn_mask is not None else 0
    if dq == 2:
        return _attention_2d(query, key, value, attn_mask, is_causal, scale)
    if dq == 4:
        if not len(query) == len(key) == len(value):
            raise ValueError("attention: batch sizes of query/key/value differ")
        return [
            _attention(
                q,
                k,
                v,
                attn_mask[b] if mask_depth == 4 else attn_mask,
                is_causal=is_causal,
                scale=scale,
            )
            for b, (q, k, v) in enumerate(zip(query, key, value, strict=True))
        ]
    hq, hkv = len(query), len(key)
    if hkv == 0 or hq % hkv or len(value) != hkv:
        raise ValueError(
            f"attention: query heads ({hq}) must be a multiple of key/value heads "
            f"(key {hkv}, value {len(value)})"
        )
    group = hq // hkv
    return [
        _attention_2d(
            query[h],
            key[h // group],
            value[h // group],
            attn_mask[h] if mask_depth == 3 else attn_mask,
            is_causal,
            scale,
        )
        for h in range(hq)
    ]


def _norm_rows(x: Any, fn: Callable[[list[float]], list[float]]) -> Any:
    if _depth(x) == 1:
        return fn([float(v) for v in x])
    if _depth(x) == 0:
        raise ValueError("expected a list of numbers")
    return [_norm_rows(r, fn) for r in x]


def _check_param(p: Any, n: int, name: str) -> list[float] | None:
    if p is None:
        return None
    if _depth(p) != 1 or len(p) != n:
        raise ValueError(f"{name} must be a list of {n} numbers (the last dim of x)")
    return [float(v) for v in p]


def _layer_norm(x: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
    """Layer norm over the last dim of nested lists."""

    def row(r: list[float]) -> list[float]:
        n = len(r)
        w, b = _check_param(weight, n, "weight"), _check_param(bias, n, "bias")
        mean = math.fsum(r) / n
        var = math.fsum((v - mean) ** 2 for v in r) / n
        inv = 1.0 / math.sqrt(var + eps)
        out = [(v - mean) * inv for v in r]
        if w is not None:
            out = [o * wi for o, wi in zip(out, w, strict=True)]
        if b is not None:
            out = [o + bi for o, bi in zip(out, b, strict=True)]
        return out

    return _norm_rows(x, row)


def _rms_norm(x: Any, weight: Any = None, eps: float = 1e-6) -> Any:
    """RMS norm over the last dim of nested lists (Llama convention)."""

    def row(r: list[float]) -> list[float]:
        w = _check_param(weight, len(r), "weight")
        inv = 1.0 / math.sqrt(math.fsum(v * v for v in r) / len(r) + eps)
        out = [v * inv for v in r]
        return out if w is None else [o * wi for o, wi in zip(out, w, strict=True)]

    return _norm_rows(x, row)


def _silu_and_mul(x: Any) -> Any:
    """Fused SwiGLU gate: last dim ``[a, b]`` (halves) -> ``silu(a) * b``."""

    def row(r: list[float]) -> list[float]:
        if len(r) % 2:
            raise ValueError(f"silu_and_mul: last dim must be even, got {len(r)}")
        h = len(r) // 2
        return [a / (1.0 + math.exp(-a)) * b for a, b in zip(r[:h], r[h:], strict=True)]

    return _norm_rows(x, row)


_BUILTIN_KERNELS: dict[KernelKind, tuple[tuple[str, Callable[..., Any], str], ...]] = {
    KernelKind.MATMUL: (("matmul", _matmul, "a @ b (+ bias), pure Python"),),
    KernelKind.ATTENTION: (("attention", _attention, "scaled dot-product attention, GQA"),),
    KernelKind.LAYERNORM: (
        ("layer_norm", _layer_norm, "layer norm over the last dim"),
        ("rms_norm", _rms_norm, "RMS norm over the last dim"),
    ),
    KernelKind.SOFTMAX: (("softmax", _softmax, "softmax over the last dim"),),
    KernelKind.FUSION: (("silu_and_mul", _silu_and_mul, "fused SwiGLU gate"),),
}


# --------------------------------------------------------------------------- collectives


def _reduce_in_place(tensor: Any, op: str, world: int) -> None:
    def value(v: Any) -> Any:
        if op == "sum":
            return v * world
        if op == "product":
            return v**world
        return v  # avg, max, min over identical replicas

    if isinstance(tensor, list):
        for i, v in enumerate(tensor):
            if isinstance(v, list):
                _reduce_in_place(v, op, world)
            else:
                tensor[i] = value(v)
        return
    if hasattr(tensor, "mul_") and hasattr(tensor, "pow_"):  # torch-like tensor
        if op == "sum":
            tensor.mul_(world)
        elif op == "product":
            tensor.pow_(world)
        return
    raise TypeError(
        f"all_reduce works in place on a list or a torch-like tensor, got {type(tensor).__name__}"
    )


def _gather(tensor: Any, world: int) -> Any:
    if isinstance(tensor, list | tuple):
        items = copy.deepcopy(list(tensor))
        return [copy.deepcopy(x) for _ in range(world) for x in items]
    if isinstance(tensor, int | float) and not isinstance(tensor, bool):
        return [tensor] * world
    if hasattr(tensor, "clone") and hasattr(tensor, "repeat"):  # torch-like tensor
        t = tensor.reshape(1) if tensor.dim() == 0 else tensor
        return t.repeat(world, *([1] * (t.dim() - 1)))
    raise TypeError(
        f"all_gather takes a list, a number or a torch-like tensor, got {type(tensor).__name__}"
    )


# --------------------------------------------------------------------------- provider


def _positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


class MockBackendProvider:
    """Mock :class:`~sagellm_backend.base.BackendProvider` with real accounting (see module).

    The first five parameters are the 0.1.1.x constructor; the rest are keyword-only.

    Args:
        supported_dtypes: dtypes it accepts (DType or names); None or empty -> FP16, BF16.
        supported_kernels: kernel kinds to register built-in kernels for; None or empty ->
            MATMUL, ATTENTION.
        has_collective: whether all_reduce/all_gather work.
        has_graph_exec: advertised only (the mock has no graphs).
        max_memory_mb: memory budget of the device; the KV cache is charged to it.
        has_stream: whether create_stream works.
        has_event: whether create_event works.
        device: device string of its KV blocks (``"mock:0"``).
        device_name: ``capability().device_name``.
        device_type: ``capability().device_type``.
        compute_capability: ``capability().compute_capability``.
        max_batch_size: advertised limit (engines read it).
        max_sequence_length: advertised limit (engines read it).
        kv_spec: geometry of the ``kv_block_alloc`` pages (default: Llama-7B-like).
        kv_block_size: override the block size of ``kv_spec``.
        offload_device: simulated host pool for ``kv_block_migrate`` (None: no offload).
        offload_memory_mb: budget of that pool (default ``max_memory_mb``).
        world_size: simulated ranks for collectives.
        rank: this provider's rank (``0 <= rank < world_size``).
        device_ids: device ids it stands for (reported by ``info()``).
        fail_on_init: raise :class:`BackendNotAvailableError` from the constructor (a str
            is used as the reason).
        fail_kv_after_pages: after this many KV pages have been handed out in total (block
            API and managers together), every allocation raises
            :class:`KVCacheExhaustedError`.
        failing_kernels: kernel names whose calls raise: an iterable of names
            (:class:`InjectedFaultError`), or a mapping name -> exception instance or class.
        kernel_latency_ms: sleep before each kernel call: one number or per-name mapping.
        collective_latency_ms: sleep in each collective call.

    Raises:
        ConfigError: a parameter is invalid (the message names it).
        BackendNotAvailableError: ``fail_on_init`` is set.
    """

    def __init__(
        self,
        supported_dtypes: Iterable[DType | str] | None = None,
        supported_kernels: Iterable[KernelKind | str] | None = None,
        has_collective: bool = True,
        has_graph_exec: bool = False,
        max_memory_mb: int = 16384,
        *,
        has_stream: bool = True,
        has_event: bool = True,
        device: str = "mock:0",
        device_name: str = "mock",
        device_type: str = "mock",
        compute_capability: str | None = None,
        max_batch_size: int | None = None,
        max_sequence_length: int | None = None,
        kv_spec: KVSpec | None = None,
        kv_block_size: int | None = None,
        offload_device: str | None = "cpu",
        offload_memory_mb: int | None = None,
        world_size: int = 1,
        rank: int = 0,
        device_ids: Iterable[int] | None = None,
        fail_on_init: bool | str = False,
        fail_kv_after_pages: int | None = None,
        failing_kernels: Mapping[str, BaseException | type[BaseException]]
        | Iterable[str]
        | None = None,
        kernel_latency_ms: float | Mapping[str, float] = 0.0,
        collective_latency_ms: float = 0.0,
    ) -> None:
        if fail_on_init:
            reason = fail_on_init if isinstance(fail_on_init, str) else "fail_on_init=True"
            raise BackendNotAvailableError(
                f"mock backend failed to start (injected fault: {reason})"
            )
        try:
            dtypes = tuple(dict.fromkeys(parse_dtype(d) for d in (supported_dtypes or ())))
        except ValueError as exc:
            raise ConfigError(f"supported_dtypes: {exc}") from exc
        self._dtypes = dtypes or _DEFAULT_DTYPES
        kinds: list[KernelKind] = []
        for k in supported_kernels or _DEFAULT_KINDS:
            try:
                kinds.append(KernelKind(k))
            except ValueError as exc:
                valid = ", ".join(x.value for x in KernelKind)
                raise ConfigError(f"supported_kernels: unknown kind {k!r}; valid: {valid}") from exc
        for name, flag in (
            ("has_collective", has_collective),
            ("has_graph_exec", has_graph_exec),
            ("has_stream", has_stream),
            ("has_event", has_event),
        ):
            if not isinstance(flag, bool):
                raise ConfigError(f"{name} must be a bool, got {flag!r}")
        _positive_int("max_memory_mb", max_memory_mb)
        _positive_int("max_batch_size", max_batch_size, allow_none=True)
        _positive_int("max_sequence_length", max_sequence_length, allow_none=True)
        _positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be an int in 0..{world_size - 1}, got {rank!r}")
        for name, text in (
            ("device", device),
            ("device_name", device_name),
            ("device_type", device_type),
        ):
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"{name} must be a non-empty string, got {text!r}")
        if kv_spec is not None and not isinstance(kv_spec, KVSpec):
            raise ConfigError(f"kv_spec must be a KVSpec, got {type(kv_spec).__name__}")
        spec = kv_spec or DEFAULT_KV_SPEC
        if kv_block_size is not None:
            spec = spec.with_block_size(int(_positive_int("kv_block_size", kv_block_size) or 0))
        if offload_device is not None and (
            not isinstance(offload_device, str) or offload_device == device
        ):
            raise ConfigError(
                f"offload_device must be None or a device string other than {device!r}, "
                f"got {offload_device!r}"
            )
        offload_mb = max_memory_mb if offload_memory_mb is None else offload_memory_mb
        _positive_int("offload_memory_mb", offload_mb)
        _positive_int("fail_kv_after_pages", fail_kv_after_pages, allow_none=True)

        self.provider_id = f"mock-{uuid.uuid4().hex[:12]}"
        self.device = device
        ids = tuple(device_ids or ())
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ConfigError(f"device_ids must be non-negative integers, got {list(ids)!r}")
        self.device_ids: tuple[int, ...] = ids
        self.world_size = world_size
        self.rank = rank
        self.has_graph_exec = has_graph_exec
        self._has_collective = has_collective
        self._has_stream = has_stream
        self._has_event = has_event
        self._max_memory_mb = max_memory_mb
        self._device_name = device_name
        self._device_type = device_type
        self._compute_capability = compute_capability
        self._max_batch_size = max_batch_size
        self._max_sequence_length = max_sequence_length
        self._lock = threading.Lock()
        self.collective_calls: dict[str, int] = {"all_reduce": 0, "all_gather": 0}
        self._collective_latency_s = (
            _non_negative("collective_latency_ms", collective_latency_ms) / 1e3
        )
        self._kernel_latency_s: dict[str, float] = {}
        self._default_kernel_latency_s = 0.0
        if isinstance(kernel_latency_ms, Mapping):
            for name, ms in kernel_latency_ms.items():
                self._kernel_latency_s[name] = (
                    _non_negative(f"kernel_latency_ms[{name!r}]", ms) / 1e3
                )
        else:
            self._default_kernel_latency_s = (
                _non_negative("kernel_latency_ms", kernel_latency_ms) / 1e3
            )
        self._kernel_faults: dict[str, BaseException | type[BaseException] | None] = {}
        if isinstance(failing_kernels, Mapping):
            for name, err in failing_kernels.items():
                if not (
                    err is None
                    or isinstance(err, BaseException)
                    or (isinstance(err, type) and issubclass(err, BaseException))
                ):
                    raise ConfigError(
                        f"failing_kernels[{name!r}] must be an exception instance or class, "
                        f"got {err!r}"
                    )
            self._kernel_faults.update(failing_kernels)
        elif failing_kernels is not None:
            if isinstance(failing_kernels, str):
                raise ConfigError("failing_kernels must be an iterable of names, not a string")
            self._kernel_faults.update(dict.fromkeys(failing_kernels))
        self._fail_kv_after = fail_kv_after_pages
        self.kv_pages_handed_out = 0

        self._kernels = KernelRegistry()
        for kind in dict.fromkeys(kinds):
            for name, impl, description in _BUILTIN_KERNELS[kind]:
                self._kernels.register(name, impl, kind=kind, description=description)

        aliases: dict[str, str] = {}
        if ":" in device:
            aliases[device.split(":", 1)[0]] = device
        self.kv = ProviderKV(
            owner=self.provider_id,
            device=device,
            supported_dtypes=self._dtypes,
            storage_factory=AccountingStorage,
            memory_bytes=max_memory_mb * MIB,
            spec=spec,
            offload=None if offload_device is None else {offload_device: offload_mb * MIB},
            aliases=aliases,
            alloc_guard=self._kv_guard,
        )

    # ------------------------------------------------------------------ capability
    def capability(self) -> CapabilityDescriptor:
        """The configured capability matrix; kernels are the kinds registered now."""
        stats = self.kv.stats()
        total = self._max_memory_mb * MIB
        return CapabilityDescriptor(
            device_name=self._device_name,
            device_type=self._device_type,
            compute_capability=self._compute_capability,
            total_memory_bytes=total,
            available_memory_bytes=total - stats["kv_allocated_bytes"],
            supported_dtypes=list(self._dtypes),
            supported_kernels=self._kernels.kinds(),
            has_stream=self._has_stream,
            has_event=self._has_event,
            has_collective=self._has_collective,
            has_graph_exec=self.has_graph_exec,
            max_memory_mb=self._max_memory_mb,
            max_batch_size=self._max_batch_size,
            max_sequence_length=self._max_sequence_length,
        )

    def check_dtype(self, dtype: DType | str) -> DType:
        """Return ``dtype`` if supported, else raise :class:`UnsupportedDTypeError`."""
        return self.kv.check_dtype(dtype)

    # ------------------------------------------------------------------ streams / events
    def create_stream(self) -> MockStream:
        """A new :class:`MockStream` (CapabilityNotSupportedError if ``has_stream`` is False)."""
        if not self._has_stream:
            raise CapabilityNotSupportedError(
                "this mock backend was configured with has_stream=False; streams are unsupported"
            )
        return MockStream()

    def create_event(self) -> MockEvent:
        """A new :class:`MockEvent` (CapabilityNotSupportedError if ``has_event`` is False)."""
        if not self._has_event:
            raise CapabilityNotSupportedError(
                "this mock backend was configured with has_event=False; events are unsupported"
            )
        return MockEvent()

    # ------------------------------------------------------------------ collectives
    def _begin_collective(self, name: str) -> None:
        if not self._has_collective:
            raise CapabilityNotSupportedError(
                f"{name}: collective operations are not supported by this backend "
                "(has_collective=False)"
            )
        with self._lock:
            self.collective_calls[name] += 1
        if self._collective_latency_s:
            time.sleep(self._collective_latency_s)

    def all_reduce(self, tensor: Any, op: str = "sum") -> None:
        """Reduce ``tensor`` in place over the simulated ranks (see module docstring).

        Raises:
            CapabilityNotSupportedError: ``has_collective`` is False.
            ValueError: ``op`` is not one of sum, avg, max, min, product.
            TypeError: ``world_size > 1`` and ``tensor`` is not a list or torch-like tensor.
        """
        if not self._has_collective:
            raise CapabilityNotSupportedError(
                "all_reduce: collective operations are not supported by this backend "
                "(has_collective=False)"
            )
        name = op.lower() if isinstance(op, str) else None
        if name not in COLLECTIVE_OPS:
            raise ConfigError(
                f"unknown collective op {op!r}; valid ops: {', '.join(COLLECTIVE_OPS)}"
            )
        self._begin_collective("all_reduce")
        if self.world_size > 1:
            _reduce_in_place(tensor, name, self.world_size)

    def all_gather(self, tensor: Any) -> Any:
        """Gather ``tensor`` from every simulated rank; returns a new list/tensor.

        Raises:
            CapabilityNotSupportedError: ``has_collective`` is False.
            TypeError: ``tensor`` is not a list, number or torch-like tensor.
        """
        self._begin_collective("all_gather")
        return _gather(tensor, self.world_size)

    # ------------------------------------------------------------------ KV cache
    def _kv_guard(self, n: int) -> None:
        limit = self._fail_kv_after
        if limit is None:
            lock = self._lock
            lock.acquire()  # explicit acquire/release: cheaper than `with` on CPython 3.11
            self.kv_pages_handed_out += n
            lock.release()
            return
        with self._lock:
            if self.kv_pages_handed_out + n > limit:
                raise KVCacheExhaustedError(
                    f"KV cache exhausted (injected fault: fail_kv_after_pages={limit}, "
                    f"{self.kv_pages_handed_out} pages handed out, {n} more requested)"
                )
            self.kv_pages_handed_out += n

    def kv_block_alloc(self, num_tokens: int, dtype: DType) -> KVBlock:
        """Reserve pages for ``num_tokens`` tokens of ``dtype`` on the mock device.

        Raises:
            ValueError: ``num_tokens <= 0``.
            UnsupportedDTypeError: ``dtype`` not supported (names the supported ones).
            KVCacheExhaustedError: beyond ``max_memory_mb`` (or an injected fault); nothing
                changes.
        """
        return self.kv.alloc(num_tokens, dtype)

    def kv_block_free(self, block: KVBlock) -> None:
        """Release ``block`` (InvalidKVBlockError on double free or a foreign block)."""
        self.kv.free(block)

    def kv_block_copy(self, src: KVBlock, dst: KVBlock) -> None:
        """Copy ``src`` into ``dst`` (content tags move; same dtype; ``dst`` large enough)."""
        self.kv.copy(src, dst)

    def kv_block_migrate(self, block: KVBlock, target_device: str) -> KVBlock:
        """Move ``block`` to ``target_device`` (the offload pool or back); source released.

        Raises:
            UnsupportedDeviceError: the target is not this device or the offload device.
        """
        return self.kv.migrate(block, target_device)

    def get_kv_tensor(self, block: KVBlock) -> list[PageRef]:
        """One :class:`~sagellm_backend.kv.storage.PageRef` per page of ``block`` (no tensors)."""
        return self.kv.tensor(block)

    def create_kv_manager(
        self,
        spec: KVSpec | None = None,
        *,
        memory_bytes: int | None = None,
        num_pages: int | None = None,
        enable_prefix_caching: bool = True,
    ) -> KVCacheManager:
        """A :class:`KVCacheManager` whose pool is charged to ``max_memory_mb``.

        ``spec`` defaults to the provider's KV spec; size defaults to the rest of the budget.
        """
        return self.kv.create_manager(
            spec,
            memory_bytes=memory_bytes,
            num_pages=num_pages,
            enable_prefix_caching=enable_prefix_caching,
        )

    def release_kv_manager(self, manager: KVCacheManager) -> None:
        """Give a manager's pool back to the budget (it must hold no sequences).

        A second release of the same manager is a no-op.
        """
        self.kv.release_manager(manager)

    # ------------------------------------------------------------------ memory
    def memory_stats(self) -> dict[str, int]:
        """Memory figures (keys in the module docstring); real accounting, not constants."""
        kv = self.kv.stats()
        total = self._max_memory_mb * MIB
        allocated = kv["kv_allocated_bytes"]
        stats = {
            "allocated": allocated,
            "peak": kv["kv_peak_bytes"],
            "total": total,
            "free": total - allocated,
            "reserved": allocated,
            "kv_pool_bytes": kv["kv_pool_bytes"],
            "kv_used_bytes": kv["kv_used_bytes"],
            "num_kv_blocks": kv["num_kv_blocks"],
            "allocated_bytes": allocated,
            "reserved_bytes": allocated,
            "allocated_mb": allocated // MIB,
            "reserved_mb": allocated // MIB,
        }
        for key, value in kv.items():
            stats.setdefault(key, value)
        return stats

    def clear_cache(self) -> None:
        """Evict every unreferenced prefix-cached KV page (the mock has no allocator cache)."""
        self.kv.clear_cache()

    # ------------------------------------------------------------------ kernels
    @property
    def kernels(self) -> KernelRegistry:
        """The kernel registry (read it; register through :meth:`register_kernel`)."""
        return self._kernels

    def register_kernel(
        self,
        name: str,
        impl: Callable[..., Any],
        *,
        kind: KernelKind | str | None = None,
        dtypes: Iterable[DType | str] = (),
        replace: bool = False,
        description: str = "",
    ) -> None:
        """Register ``impl`` under ``name``.

        Raises:
            KernelAlreadyRegisteredError: ``name`` exists and ``replace`` is False.
            UnsupportedDTypeError: a dtype in ``dtypes`` is not supported by this provider.
            ConfigError: ``kind`` is not a KernelKind.
        """
        k: KernelKind | None = None
        if kind is not None:
            try:
                k = KernelKind(kind)
            except ValueError as exc:
                valid = ", ".join(x.value for x in KernelKind)
                raise ConfigError(f"unknown kernel kind {kind!r}; valid: {valid}") from exc
        checked = [self.check_dtype(d) for d in dtypes]
        self._kernels.register(
            name, impl, kind=k, dtypes=checked, description=description, replace=replace
        )

    def unregister_kernel(self, name: str) -> None:
        """Remove a kernel (KernelNotFoundError if absent)."""
        self._kernels.remove(name)

    def get_kernel(self, name: str) -> Callable[..., Any]:
        """The kernel registered under ``name``.

        With an injected failure or latency for ``name`` a wrapper that sleeps/raises and
        then calls the kernel is returned; otherwise the registered callable itself.

        Raises:
            KernelNotFoundError: no such kernel (the message lists the registered ones).
        """
        impl = self._kernels.get(name)
        fault_set = name in self._kernel_faults
        delay = self._kernel_latency_s.get(name, self._default_kernel_latency_s)
        if not fault_set and not delay:
            return impl
        fault = self._kernel_faults.get(name)

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

    # ------------------------------------------------------------------ fault injection
    def inject_kernel_failure(
        self, name: str, error: BaseException | type[BaseException] | None = None
    ) -> None:
        """Make calls of kernel ``name`` (fetched after this) raise ``error``.

        ``error`` defaults to :class:`InjectedFaultError`.
        """
        self._kernel_faults[name] = error

    def set_kv_fault(self, fail_after_pages: int | None) -> None:
        """Fail KV allocations beyond ``fail_after_pages`` pages handed out in total.

        The count runs from construction (``kv_pages_handed_out``); None turns it off.
        """
        _positive_int("fail_after_pages", fail_after_pages, allow_none=True)
        with self._lock:
            self._fail_kv_after = fail_after_pages

    def clear_faults(self) -> None:
        """Remove every injected kernel/KV fault and latency."""
        with self._lock:
            self._kernel_faults.clear()
            self._kernel_latency_s.clear()
            self._default_kernel_latency_s = 0.0
            self._collective_latency_s = 0.0
            self._fail_kv_after = None

    # ------------------------------------------------------------------ misc
    def info(self) -> dict[str, Any]:
        """Plain-data description for ``sagellm-backend info``."""
        return {
            "kind": "mock",
            "provider_id": self.provider_id,
            "device": self.device,
            "device_ids": list(self.device_ids),
            "kv_devices": self.kv.devices,
            "kv_spec": repr(self.kv.spec),
            "world_size": self.world_size,
            "rank": self.rank,
            "kernels": self._kernels.names(),
        }

    def __repr__(self) -> str:
        dtypes = ",".join(d.value for d in self._dtypes)
        return (
            f"MockBackendProvider(id={self.provider_id!r}, device={self.device!r}, "
            f"dtypes=[{dtypes}], max_memory_mb={self._max_memory_mb})"
        )


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


def create_mock_backend(config: Any = None, **kwargs: Any) -> MockBackendProvider:
    """Entry point of the ``mock`` kind (``sagellm.backends``).

    Args:
        config: None, a dict of :class:`MockBackendProvider` parameters (plus ``kind``), or a
            sagellm-core ``BackendConfig``-like object: its ``kind`` must be ``"mock"``, its
            ``device`` becomes the mock's device string, and ``device_ids`` is recorded (the
            device defaults to ``mock:<first id>``).
        **kwargs: parameters that override ``config``.

    Raises:
        ConfigError: unknown keys (the message lists the valid ones), or a kind other than
            ``"mock"``.
    """
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
    return MockBackendProvider(**options)
