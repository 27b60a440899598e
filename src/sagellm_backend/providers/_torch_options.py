"""Options of the torch providers and the parser of their backend configs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from sagellm_backend.errors import ConfigError

if TYPE_CHECKING:
    from sagellm_backend.kv.spec import KVSpec


@dataclass(frozen=True)
class TorchProviderOptions:
    """Options of the torch providers (config dict keys or factory keyword arguments).

    Attributes:
        device: ``"cpu"``; ``"cuda"`` / ``"cuda:N"`` for the cuda provider.
        kv_memory_bytes: byte budget of the default KV pool (the one ``kv_block_alloc``
            uses); exclusive with ``kv_memory_fraction``.
        kv_memory_fraction: budget as a fraction (0, 1] of the device's free memory when
            KV is first used. Neither given: the device layer's default (cpu: min(4 GiB,
            a quarter of the available RAM); cuda: 50% of free device memory). The budget caps the
            ``kv_block_alloc`` pool plus every ``create_kv_manager`` pool; nothing is
            allocated until a pool is created.
        kv_block_pool_bytes: size of the pool behind ``kv_block_alloc`` (default: a
            quarter of the budget), created on the first ``kv_block_alloc``.
        offload_memory_bytes: byte budget of each offload (host) pool; default: the device
            budget, capped at 25% of available host RAM.
        kv_spec: geometry of the default pool (default
            :data:`~sagellm_backend.kv.spec.DEFAULT_KV_SPEC`).
        enable_collectives: False disables collectives (capability ``has_collective``
            False; calls raise).
        provider_id: id stamped on KV blocks (default: a fresh unique id).
        use_torch: cpu only: None (default) uses torch when it is importable; False keeps
            KV pages in host memory without torch even when it is installed (no torch
            kernels, single-rank collectives). The cuda backend always needs torch.
    """

    device: str | None = None
    kv_memory_bytes: int | None = None
    kv_memory_fraction: float | None = None
    kv_block_pool_bytes: int | None = None
    offload_memory_bytes: int | None = None
    kv_spec: KVSpec | None = None
    enable_collectives: bool = True
    provider_id: str | None = None
    use_torch: bool | None = None

    def __post_init__(self) -> None:
        for name in ("kv_memory_bytes", "kv_block_pool_bytes", "offload_memory_bytes"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise ConfigError(f"{name} must be a positive integer of bytes, got {value!r}")
        frac = self.kv_memory_fraction
        if frac is not None:
            if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 < frac <= 1:
                raise ConfigError(f"kv_memory_fraction must be in (0, 1], got {frac!r}")
            if self.kv_memory_bytes is not None:
                raise ConfigError("give kv_memory_bytes or kv_memory_fraction, not both")
        if self.use_torch is not None and not isinstance(self.use_torch, bool):
            raise ConfigError(f"use_torch must be None, True or False, got {self.use_torch!r}")
        if not isinstance(self.enable_collectives, bool):
            raise ConfigError(f"enable_collectives must be a bool, got {self.enable_collectives!r}")
        if self.device is not None and not isinstance(self.device, str):
            raise ConfigError(
                f"device must be a string such as 'cpu' or 'cuda:0', got {self.device!r}"
            )
        if self.kv_spec is not None:
            from sagellm_backend.kv.spec import KVSpec

            if not isinstance(self.kv_spec, KVSpec):
                raise ConfigError(f"kv_spec must be a KVSpec, got {self.kv_spec!r}")


_OPTION_NAMES = tuple(f.name for f in fields(TorchProviderOptions))


def parse_provider_config(
    kind: str, config: Any = None, overrides: Mapping[str, Any] | None = None
) -> tuple[TorchProviderOptions, list[int] | None]:
    """Normalise a backend config into :class:`TorchProviderOptions`.

    Accepts ``None``, a mapping (option names, plus ``kind`` and ``device_ids``), a
    :class:`TorchProviderOptions`, or a sagellm-core ``BackendConfig``-like object (attributes
    ``kind``, ``device``, ``device_ids``; any option names it has as attributes are read too).
    ``overrides`` (factory keyword arguments) win over ``config``.

    Returns:
        The options and the ``device_ids`` given (None when absent).

    Raises:
        ConfigError: unknown keys, a ``kind`` other than ``kind``, or invalid values.
    """
    values: dict[str, Any] = {}
    if config is None:
        pass
    elif isinstance(config, TorchProviderOptions):
        values = {n: getattr(config, n) for n in _OPTION_NAMES}
    elif isinstance(config, Mapping):
        values = dict(config)
    else:
        for name in ("kind", "device", "device_ids", *_OPTION_NAMES):
            if hasattr(config, name):
                values[name] = getattr(config, name)
    values.update(overrides or {})
    given_kind = values.pop("kind", None)
    if given_kind is not None and str(given_kind) != kind:
        raise ConfigError(f"config kind {given_kind!r} given to the {kind!r} backend factory")
    device_ids = values.pop("device_ids", None)
    unknown = sorted(set(values) - set(_OPTION_NAMES))
    if unknown:
        valid = ", ".join(("kind", "device_ids", *_OPTION_NAMES))
        raise ConfigError(f"unknown {kind} backend option(s) {unknown}; valid options: {valid}")
    if device_ids is not None:
        if isinstance(device_ids, int) and not isinstance(device_ids, bool):
            device_ids = [device_ids]
        if not isinstance(device_ids, list | tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in device_ids
        ):
            raise ConfigError(
                f"device_ids must be a list of device indices >= 0, got {device_ids!r}"
            )
        device_ids = list(device_ids)
    try:
        return TorchProviderOptions(**values), device_ids
    except TypeError as exc:  # pragma: no cover - unknown keys are caught above
        raise ConfigError(str(exc)) from exc
