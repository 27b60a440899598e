"""Collectives of the torch providers on ``torch.distributed`` (:class:`TorchCollectives`).

``init_distributed()`` joins (or adopts) a ``torch.distributed`` process group: gloo for
cpu, NCCL for cuda. ``all_reduce(tensor, op)`` reduces in place with ``op`` in
``sum, avg, max, min, product`` (``avg`` on gloo is a sum divided by the world size);
``all_gather(tensor)`` returns a new tensor holding every rank's tensor concatenated
along dim 0 in rank order (a 0-d tensor gathers to shape ``[world_size]``). Without a
process group both have single-rank semantics: ``all_reduce`` leaves the tensor as it is
and ``all_gather`` returns a copy (shape ``[1]`` for a 0-d tensor). With collectives
disabled (``enable_collectives=False`` or no usable backend) both raise
:class:`~sagellm_backend.errors.CapabilityNotSupportedError`.

Host values -- a number or a (nested) list/tuple of numbers, which 0.1.1.2's cpu provider
took -- are accepted as well, with or without torch: ``all_reduce`` reduces a list in place
(a number or a tuple cannot be changed in place: on several ranks it raises TypeError) and
``all_gather`` returns a list (the ranks' values concatenated, as for tensors). Across
ranks they travel as a torch tensor (int64 when every element is an int, else float64;
float64 for ``avg``).
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sagellm_backend._validate import require_instance
from sagellm_backend.errors import CapabilityNotSupportedError, ConfigError, DependencyMissingError
from sagellm_backend.providers._torch_device import TORCH_INSTALL_HINT, DeviceLayer
from sagellm_backend.providers._torch_options import TorchProviderOptions

if TYPE_CHECKING:
    import torch

#: Valid ``op`` values of :meth:`TorchCollectives.all_reduce`.
COLLECTIVE_OPS: tuple[str, ...] = ("sum", "avg", "max", "min", "product")


class TorchCollectives:
    """The collective half of :class:`~._torch.TorchProviderBase` (a mixin).

    Invariants: the host class sets ``_torch`` (None without torch), ``_layer``,
    ``_options``, ``_lock``, ``_collective_backend`` (None: collectives disabled) and
    ``_owns_group`` (True only for a process group this provider created).
    """

    kind: str
    _torch: Any
    _layer: DeviceLayer
    _options: TorchProviderOptions
    _lock: threading.RLock
    _collective_backend: str | None
    _owns_group: bool

    if TYPE_CHECKING:

        @property
        def device(self) -> str: ...

        @property
        def device_type(self) -> str: ...

        @property
        def torch_device(self) -> torch.device: ...

    @property
    def is_distributed(self) -> bool:
        """Whether a torch.distributed process group is initialised in this process."""
        dist = self._dist()
        return dist is not None and bool(dist.is_initialized())

    @property
    def rank(self) -> int:
        """This process's rank (0 without a process group)."""
        return int(self._dist().get_rank()) if self.is_distributed else 0

    @property
    def world_size(self) -> int:
        """Ranks in the process group (1 without one)."""
        return int(self._dist().get_world_size()) if self.is_distributed else 1

    def init_distributed(
        self,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        init_method: str | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        """Join a torch.distributed process group (gloo on cpu, NCCL on cuda).

        ``rank``/``world_size`` default to the ``RANK``/``WORLD_SIZE`` environment
        variables; ``init_method`` defaults to ``env://`` (``MASTER_ADDR``/``MASTER_PORT``).
        If a process group is already initialised in this process it is adopted (and not
        destroyed by :meth:`close`), provided it uses this device's backend.

        Raises:
            CapabilityNotSupportedError: collectives are disabled or unusable here.
            ConfigError: rank/world size/rendezvous settings are missing or invalid.
        """
        backend = self._require_collectives()
        dist = self._dist()
        if dist is None:  # no torch: one rank is all there can be
            rank = _env_int("RANK", rank) if rank is not None or "RANK" in os.environ else 0
            world_size = (
                _env_int("WORLD_SIZE", world_size)
                if world_size is not None or "WORLD_SIZE" in os.environ
                else 1
            )
            if world_size != 1 or rank != 0:
                raise DependencyMissingError(
                    f"collectives across {world_size} ranks need torch.distributed, and this "
                    f"{self.kind} provider runs without torch (not installed, or "
                    f"use_torch=False): {TORCH_INSTALL_HINT}; without torch it runs a single "
                    "rank (world_size=1, rank=0)"
                )
            return
        with self._lock:
            if dist.is_initialized():
                current = str(dist.get_backend())
                if backend not in current:  # "gloo" or e.g. "cpu:gloo,cuda:nccl"
                    raise ConfigError(
                        f"a {current!r} process group is already initialised; the "
                        f"{self.kind} backend needs {backend!r}"
                    )
                return
            rank = _env_int("RANK", rank)
            world_size = _env_int("WORLD_SIZE", world_size)
            if world_size < 1 or not 0 <= rank < world_size:
                raise ConfigError(
                    f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
                )
            if init_method is None:
                missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
                if missing:
                    raise ConfigError(
                        f"init_distributed: set {' and '.join(missing)} or pass init_method "
                        "(e.g. 'tcp://127.0.0.1:29500')"
                    )
                init_method = "env://"
            if timeout_s <= 0:
                raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
            self._layer.prepare_collectives()
            dist.init_process_group(
                backend=backend,
                init_method=init_method,
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
            )
            self._owns_group = True

    def shutdown_distributed(self) -> None:
        """Destroy the process group if this provider created it (idempotent)."""
        with self._lock:
            dist = self._dist()
            if self._owns_group and dist is not None and dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False

    def all_reduce(self, tensor: Any, op: str = "sum") -> None:
        """Reduce ``tensor`` in place across ranks.

        Args:
            tensor: a torch tensor on this provider's device (cpu tensors for gloo), or a
                host value (see the module docstring).
            op: one of ``sum, avg, max, min, product``.

        Raises:
            ConfigError: unknown ``op`` (a ValueError listing the valid ones).
            ValueError: ``avg`` of an integer tensor, or a tensor on another device.
            TypeError: neither a tensor nor a host value; a number or tuple on several ranks.
            CapabilityNotSupportedError: collectives are disabled here.
        """
        op_name = _check_op(op)
        self._require_collectives()
        if self._torch is None or not isinstance(tensor, self._torch.Tensor):
            self._all_reduce_host(tensor, op_name)
            return
        self._check_collective_tensor(tensor, "all_reduce")
        if op_name == "avg" and not (tensor.is_floating_point() or tensor.is_complex()):
            raise ValueError(f"all_reduce op 'avg' needs a floating tensor, got {tensor.dtype}")
        if not self.is_distributed:
            return  # single rank: the reduction of one tensor is itself
        dist = self._dist()
        assert dist is not None
        reduce_op = dist.ReduceOp
        if op_name == "avg":
            if str(dist.get_backend()) == "nccl":
                dist.all_reduce(tensor, op=reduce_op.AVG)
            else:  # gloo has no AVG
                dist.all_reduce(tensor, op=reduce_op.SUM)
                tensor.div_(dist.get_world_size())
            return
        ops = {
            "sum": reduce_op.SUM,
            "max": reduce_op.MAX,
            "min": reduce_op.MIN,
            "product": reduce_op.PRODUCT,
        }
        dist.all_reduce(tensor, op=ops[op_name])

    def all_gather(self, tensor: Any) -> Any:
        """Gather ``tensor`` from every rank; returns a new tensor.

        Every rank must pass a tensor of the same shape and dtype. The result is the
        ranks' tensors concatenated along dim 0 in rank order (``[world_size * n, ...]``
        for an input of ``[n, ...]``; ``[world_size]`` for a 0-d input). A host value gives
        a list of the same layout.

        Raises:
            CapabilityNotSupportedError: collectives are disabled here.
            ValueError: a tensor on another device.
            TypeError: neither a tensor nor a host value.
        """
        self._require_collectives()
        if self._torch is None or not isinstance(tensor, self._torch.Tensor):
            _check_host_value(tensor, "all_gather")
            if not self.is_distributed:
                return [tensor] if _is_number(tensor) else copy.deepcopy(list(tensor))
            return self.all_gather(_host_tensor(self._torch, tensor, self.torch_device)).tolist()
        self._check_collective_tensor(tensor, "all_gather")
        src = tensor.reshape(1) if tensor.dim() == 0 else tensor
        if not self.is_distributed:
            return src.clone()
        dist = self._dist()
        assert dist is not None
        src = src.contiguous()
        parts = [self._torch.empty_like(src) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, src)
        return self._torch.cat(parts, dim=0)

    def _dist(self) -> Any:
        if self._torch is None:
            return None
        dist = self._torch.distributed
        return dist if dist.is_available() else None

    def _require_collectives(self) -> str:
        backend = self._collective_backend
        if backend is None:
            why = (
                "collectives are disabled (enable_collectives=False)"
                if not self._options.enable_collectives
                else f"torch.distributed has no usable backend for {self.device_type} here"
            )
            raise CapabilityNotSupportedError(
                f"{self.kind} backend: {why}; capability().has_collective is False"
            )
        return backend

    def _all_reduce_host(self, value: Any, op_name: str) -> None:
        """``all_reduce`` of a host value: in place into a list, identity on one rank."""
        _check_host_value(value, "all_reduce")
        if not self.is_distributed:
            return  # single rank: the reduction of one value is itself
        if not isinstance(value, list):
            raise TypeError(
                f"all_reduce across {self.world_size} ranks works in place: pass a torch.Tensor "
                f"or a list, got {type(value).__name__}"
            )
        reduced = _host_tensor(self._torch, value, self.torch_device, floating=op_name == "avg")
        self.all_reduce(reduced, op_name)
        _assign_in_place(value, reduced.tolist())

    def _check_collective_tensor(self, tensor: Any, what: str) -> None:
        require_instance(tensor, self._torch.Tensor, f"{what} needs a torch.Tensor")
        if tensor.device.type != self.torch_device.type:
            raise ValueError(
                f"{what}: tensor is on {tensor.device}, the {self.kind} backend's "
                f"collectives run on {self.device}"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_host_value(value: Any, what: str) -> None:
    """A host value is a number or a (nested) list/tuple of numbers."""

    def ok(v: Any) -> bool:
        return _is_number(v) or (isinstance(v, list | tuple) and all(ok(x) for x in v))

    if not ok(value):
        raise TypeError(
            f"{what} takes a torch.Tensor, a number or a (nested) list of numbers, got "
            f"{type(value).__name__} (tensors need torch: {TORCH_INSTALL_HINT})"
        )


def _flat(value: Any) -> Iterator[Any]:
    if isinstance(value, list | tuple):
        for v in value:
            yield from _flat(v)
    else:
        yield value


def _host_tensor(torch_mod: Any, value: Any, device: Any, *, floating: bool = False) -> Any:
    """``value`` as a tensor on ``device``: int64 when all are ints and not ``floating``."""
    whole = not floating and all(isinstance(v, int) for v in _flat(value))
    dtype = torch_mod.int64 if whole else torch_mod.float64
    try:
        return torch_mod.tensor(value, dtype=dtype, device=device)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            "a list sent across ranks must be rectangular (every nested list of one level the "
            f"same length, numbers only at the innermost level): {exc}"
        ) from exc


def _assign_in_place(dst: list[Any], src: list[Any]) -> None:
    """Write ``src`` into the nested list ``dst`` element by element (same layout)."""
    for i, v in enumerate(src):
        if isinstance(dst[i], list):
            _assign_in_place(dst[i], v)
        else:
            dst[i] = v


def _check_op(op: str) -> str:
    name = str(op).lower() if isinstance(op, str) else None
    if name not in COLLECTIVE_OPS:
        raise ConfigError(f"unknown collective op {op!r}; valid ops: {', '.join(COLLECTIVE_OPS)}")
    return name


def _env_int(var: str, value: int | None) -> int:
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{var.lower()} must be an int, got {value!r}")
        return value
    raw = os.environ.get(var)
    if raw is None:
        raise ConfigError(
            f"init_distributed: pass {var.lower()}= or set the {var} environment variable"
        )
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable {var}={raw!r} is not an integer") from exc
