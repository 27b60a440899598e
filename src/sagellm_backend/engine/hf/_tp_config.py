"""Tensor-parallel configuration: field checks, model geometry, launch settings.

Part of :mod:`sagellm_backend.engine.hf.distributed` (which re-exports the public names).
Invariants: nothing here imports torch; :func:`check_tp_fields` reads at most the local
``config.json`` and asks the cuda provider module how many devices are visible, so an
impossible size is refused before any process is spawned or weight loaded.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sagellm_backend.errors import ConfigError
from sagellm_backend.kv.spec import model_config_field

__all__ = [
    "DISTRIBUTED_BACKENDS",
    "TPSettings",
    "check_tp_fields",
    "model_geometry",
    "resolve_backend",
    "valid_tp_sizes",
]

#: Values of the ``distributed_backend`` config field.
DISTRIBUTED_BACKENDS = ("auto", "gloo", "nccl")


def resolve_backend(backend: str, device_type: str) -> str:
    """``"auto"`` -> ``"nccl"`` on cuda, ``"gloo"`` on cpu; others as given (validated).

    Raises:
        ConfigError: an unknown backend, or nccl for a cpu engine.
    """
    if backend not in DISTRIBUTED_BACKENDS:
        raise ConfigError(
            f"distributed_backend must be one of {DISTRIBUTED_BACKENDS}, got {backend!r}"
        )
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise ConfigError(
            f"distributed_backend='nccl' needs CUDA devices; a {device_type} engine uses 'gloo' "
            "(or 'auto')"
        )
    return backend


def valid_tp_sizes(geometry: dict[str, int], max_size: int | None = None) -> list[int]:
    """Sizes that divide the heads, the kv heads and the MLP width (at most ``max_size``)."""
    g = 0
    for value in geometry.values():
        g = math.gcd(g, int(value))
    sizes = [n for n in range(1, max(g, 1) + 1) if g % n == 0] if g else [1]
    return [n for n in sizes if max_size is None or n <= max_size]


def _local_config(model_path: str) -> dict[str, Any] | None:
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    text = data.get("text_config")
    return text if isinstance(text, dict) else data


def model_geometry(config: Any) -> dict[str, int]:
    """Head and MLP counts a tensor-parallel size must divide (HF config object or dict).

    Returns ``{"num_attention_heads", "num_key_value_heads", "intermediate_size"}`` (GPT-2
    names ``n_head`` / ``n_inner`` / ``n_embd`` understood; no kv heads: the heads; no MLP
    width: ``4 * hidden``).
    """
    get = partial(model_config_field, config)
    heads = int(get("num_attention_heads", "n_head") or 0)
    kv = int(get("num_key_value_heads") or heads)
    hidden = int(get("hidden_size", "n_embd") or 0)
    inter = get("intermediate_size", "n_inner")
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": int(inter) if inter else 4 * hidden,
    }


def _cuda_device_count() -> int:
    """Visible CUDA devices, asked through the cuda provider module (0 without CUDA)."""
    from sagellm_backend.providers.cuda import unavailable_reason

    count = 0
    while count < 1024 and unavailable_reason(count) is None:
        count += 1
    return count


def check_tp_fields(owner: str, config: Any, device_type: str) -> None:
    """Validate ``tensor_parallel_size`` / ``distributed_backend`` / ``distributed_timeout_s``.

    A size that does not divide the model's heads, kv heads and MLP width (read from
    ``config.json`` when ``model_path`` is a local directory; otherwise checked at
    ``start()``), more ranks than visible CUDA devices (spawn launch), a size that
    disagrees with torchrun's ``WORLD_SIZE``, or quantised weights are refused.

    Raises:
        ConfigError: naming the field, the bad value and the valid values.
    """
    size = getattr(config, "tensor_parallel_size", 1)
    backend = getattr(config, "distributed_backend", "auto")
    timeout = getattr(config, "distributed_timeout_s", 60.0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"{owner}.tensor_parallel_size must be an integer >= 1, got {size!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ConfigError(f"{owner}.distributed_timeout_s must be a number > 0, got {timeout!r}")
    try:
        resolve_backend(backend, device_type)
    except ConfigError as exc:
        raise ConfigError(f"{owner}.{exc}") from None
    if size == 1 or getattr(config, "mock_mode", False):
        return
    env_world = os.environ.get("WORLD_SIZE")
    if env_world and env_world.isdigit() and int(env_world) > 1 and int(env_world) != size:
        raise ConfigError(
            f"{owner}.tensor_parallel_size={size} but torchrun set WORLD_SIZE={env_world}; "
            f"valid value here: {env_world}"
        )
    if getattr(config, "load_in_8bit", False) or getattr(config, "load_in_4bit", False):
        raise ConfigError(
            f"{owner}.tensor_parallel_size={size} cannot shard quantised (8/4-bit) weights; "
            "valid: tensor_parallel_size=1 with quantisation, or no quantisation"
        )
    max_size = None
    if device_type == "cuda" and not env_world:
        count = _cuda_device_count()
        device = str(getattr(config, "device", "cuda") or "cuda")
        first = int(device.split(":")[1]) if ":" in device else 0
        max_size = max(count - first, 0)
        if size > max_size:
            raise ConfigError(
                f"{owner}.tensor_parallel_size={size} needs {size} CUDA devices from "
                f"{device}, {max_size} are visible; valid values: "
                f"{[n for n in range(1, max_size + 1)] or 'none (no CUDA device)'}"
            )
    model_path = getattr(config, "model_path", None)
    local = _local_config(model_path) if isinstance(model_path, str) else None
    if local is not None:
        geo = model_geometry(local)
        valid = valid_tp_sizes(geo, max_size)
        if size not in valid:
            raise ConfigError(
                f"{owner}.tensor_parallel_size={size} does not divide the model's "
                f"{geo['num_attention_heads']} attention heads, {geo['num_key_value_heads']} "
                f"kv heads and MLP width {geo['intermediate_size']}; valid values: {valid}"
            )


@dataclass(frozen=True)
class TPSettings:
    """How a tensor-parallel group is launched (picklable; sent to spawned workers).

    Attributes:
        size: ranks in the group.
        backend: ``"gloo"`` or ``"nccl"`` (resolved).
        timeout_s: timeout of every collective and of the rendezvous.
        device_type: ``"cpu"`` or ``"cuda"``.
        first_device: CUDA index of rank 0 (rank ``r`` uses ``first_device + r``).
        threads: torch intra-op threads per rank on CPU (None: cores / size).
        torchrun: the group comes from torchrun's environment (not spawned).
    """

    size: int
    backend: str
    timeout_s: float
    device_type: str
    first_device: int = 0
    threads: int | None = None
    torchrun: bool = False

    @classmethod
    def from_config(cls, config: Any, device_type: str) -> TPSettings:
        """The settings of an engine config's tensor-parallel fields on ``device_type``.

        Under torchrun (``WORLD_SIZE`` > 1 in the environment) the group is torchrun's.

        Raises:
            ConfigError: an unknown ``distributed_backend`` (see :func:`resolve_backend`).
        """
        size = int(getattr(config, "tensor_parallel_size", 1))
        env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        first = 0
        device = str(getattr(config, "device", "cpu") or "cpu")
        if device_type == "cuda" and ":" in device:
            first = int(device.split(":")[1])
        return cls(
            size=size,
            backend=resolve_backend(getattr(config, "distributed_backend", "auto"), device_type),
            timeout_s=float(getattr(config, "distributed_timeout_s", 60.0)),
            device_type=device_type,
            first_device=first,
            threads=getattr(config, "num_threads", None),
            torchrun=env_world > 1,
        )

    def device_of(self, rank: int) -> str:
        """Torch device string of ``rank`` (its LOCAL_RANK under torchrun)."""
        if self.device_type != "cuda":
            return "cpu"
        if self.torchrun:
            return f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        return f"cuda:{self.first_device + rank}"

    def cpu_threads(self) -> int:
        """Threads each rank's torch uses on CPU."""
        if self.threads is not None:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.size)
