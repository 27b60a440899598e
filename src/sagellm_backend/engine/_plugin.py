"""Shared helpers for the ``sagellm.engines`` entry-point factories.

sagellm-core 0.1.x calls an engine factory as ``factory(config, backend)`` where ``config``
is its own pydantic ``EngineConfig`` (fields ``kind``, ``model``, ``model_path``,
``max_batch_size``, ``max_input_tokens``, ``max_output_tokens``, ``device``) and ``backend``
is whatever its ``create_backend`` returned (one of our providers). Users may also call the
factories directly with a plain dict or ``None``. :func:`normalize_engine_config` turns all
of these into one validated :class:`PluginEngineSettings` so every engine factory maps the
same fields the same way.

Invariants:
    * Nothing here imports torch, transformers or sagellm-core (a sagellm-core config is
      recognised by duck typing on its module name and ``model_dump``).
    * Every validation failure raises :class:`~sagellm_backend.errors.ConfigError` naming
      the field, the bad value and what a valid value looks like.
    * Unknown dict keys are never dropped silently: they land in
      :attr:`PluginEngineSettings.extra` for the engine factory to map or reject.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sagellm_backend.errors import ConfigError

__all__ = [
    "CORE_COMPONENT",
    "PluginEngineSettings",
    "core_component_trace",
    "is_backend_provider",
    "normalize_engine_config",
    "reject_unknown_keys",
]

#: The component_trace entry engines created through sagellm-core report first.
CORE_COMPONENT = "sagellm-core"

# Field names of sagellm-core 0.1.x EngineConfig plus ours (engine_id).
_KNOWN_KEYS = frozenset(
    {
        "engine_id",
        "kind",
        "model",
        "model_path",
        "device",
        "max_batch_size",
        "max_input_tokens",
        "max_output_tokens",
    }
)
_INT_FIELDS = ("max_batch_size", "max_input_tokens", "max_output_tokens")
_STR_FIELDS = ("engine_id", "kind", "model", "model_path", "device")


@dataclass(frozen=True)
class PluginEngineSettings:
    """Engine settings normalised from a sagellm-core config, a dict or ``None``.

    Attributes:
        engine_id: the configured id, or one generated from kind + model (always non-empty,
            unique per call when generated).
        kind: the engine kind asked for (``"mock"``, ``"cpu"``, ...), or None if not given.
        model: the model name as given (``model``, falling back to ``model_path``).
        model_path: ``model_path`` when given, else ``model`` (None when neither is given).
        device: device string, or None when not given.
        max_batch_size: most requests per step (``> 0``), or None when not given.
        max_input_tokens: prompt token limit (``> 0``), or None when not given.
        max_output_tokens: output token limit (``> 0``), or None when not given.
        from_core: True when ``config`` was a sagellm-core object (or the caller passed a
            dict carrying ``"from_core": True``).
        provider: the ``backend`` argument when it is a backend provider, else None.
        extra: keys of a dict config that are not engine-config fields above (copy).
    """

    engine_id: str
    kind: str | None = None
    model: str | None = None
    model_path: str | None = None
    device: str | None = None
    max_batch_size: int | None = None
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    from_core: bool = False
    provider: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def is_backend_provider(obj: Any) -> bool:
    """Return True when ``obj`` looks like a backend provider.

    Uses the runtime-checkable :class:`~sagellm_backend.base.BackendProvider` protocol, and
    also accepts objects exposing the core KV/capability methods (third-party providers
    that implement only part of the protocol still get their KV manager used).
    """
    if obj is None:
        return False
    from sagellm_backend.base import BackendProvider

    if isinstance(obj, BackendProvider):
        return True
    return callable(getattr(obj, "capability", None)) and callable(
        getattr(obj, "kv_block_alloc", None)
    )


def _is_core_config(config: Any) -> bool:
    module = type(config).__module__ or ""
    return module == "sagellm_core" or module.startswith("sagellm_core.")


def _config_to_dict(config: Any) -> tuple[dict[str, Any], bool]:
    """Return (fields, from_core) for any accepted config type."""
    if config is None:
        return {}, False
    if isinstance(config, Mapping):
        data = dict(config)
        from_core = data.pop("from_core", False)
        if not isinstance(from_core, bool):
            raise ConfigError(f"engine config 'from_core' must be a bool, got {from_core!r}")
        return data, from_core
    from_core = _is_core_config(config)
    dump = getattr(config, "model_dump", None)
    if callable(dump):  # pydantic v2 model (sagellm-core EngineConfig or similar)
        data = dump()
        if not isinstance(data, dict):
            raise ConfigError(
                f"engine config {type(config).__name__}.model_dump() returned "
                f"{type(data).__name__}, expected a dict"
            )
        return dict(data), from_core
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        data = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        # Our own engine.base.EngineConfig: metadata holds free-form extras.
        metadata = data.pop("metadata", None)
        if isinstance(metadata, Mapping):
            for key, value in metadata.items():
                data.setdefault(str(key), value)
        return data, from_core
    raise ConfigError(
        "engine config must be a sagellm-core EngineConfig, a dict, a dataclass or None, "
        f"got {type(config).__name__}"
    )


def _check_str(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"engine config '{name}' must be a non-empty string, got {value!r}")
    return value


def _check_positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"engine config '{name}' must be an integer > 0, got {value!r}")
    return value


def _generate_engine_id(kind: str | None, model: str | None) -> str:
    parts = [p for p in (kind, model) if p]
    stem = "-".join(parts) if parts else "engine"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "engine"
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def normalize_engine_config(config: Any, backend: Any = None) -> PluginEngineSettings:
    """Normalise what an engine factory received into :class:`PluginEngineSettings`.

    Args:
        config: a sagellm-core 0.1.x ``EngineConfig``, a dict with the same field names
            (plus ``engine_id`` and engine-specific keys, which go to ``extra``), a
            dataclass config (e.g. :class:`~sagellm_backend.engine.base.EngineConfig`,
            whose ``metadata`` entries become extra keys), or None.
        backend: the second argument of the factory (sagellm-core passes the provider it
            created). Kept as ``provider`` when it is a backend provider; an object that
            is not a provider (other than None) is rejected.

    Returns:
        The validated settings.

    Raises:
        ConfigError: a field has the wrong type or range, or ``backend`` is not a provider.
    """
    data, from_core = _config_to_dict(config)
    extra = {k: v for k, v in data.items() if k not in _KNOWN_KEYS}
    # Dataclass configs carry fields (mock_mode, provider, ...) that are not errors.
    values: dict[str, Any] = {}
    for name in _STR_FIELDS:
        values[name] = _check_str(name, data.get(name))
    for name in _INT_FIELDS:
        values[name] = _check_positive_int(name, data.get(name))

    provider: Any = None
    if backend is not None:
        if not is_backend_provider(backend):
            raise ConfigError(
                "engine factory 'backend' must be a backend provider (an object with "
                f"capability() and kv_block_alloc()), got {type(backend).__name__}"
            )
        provider = backend
    elif extra.get("provider") is not None:
        candidate = extra.pop("provider")
        if not is_backend_provider(candidate):
            raise ConfigError(
                "engine config 'provider' must be a backend provider, "
                f"got {type(candidate).__name__}"
            )
        provider = candidate
    else:
        extra.pop("provider", None)

    model = values["model"] or values["model_path"]
    model_path = values["model_path"] or values["model"]
    engine_id = values["engine_id"] or _generate_engine_id(values["kind"], model)
    return PluginEngineSettings(
        engine_id=engine_id,
        kind=values["kind"],
        model=model,
        model_path=model_path,
        device=values["device"],
        max_batch_size=values["max_batch_size"],
        max_input_tokens=values["max_input_tokens"],
        max_output_tokens=values["max_output_tokens"],
        from_core=from_core,
        provider=provider,
        extra=extra,
    )


def reject_unknown_keys(settings: PluginEngineSettings, allowed: set[str], engine: str) -> None:
    """Raise ConfigError when ``settings.extra`` holds keys outside ``allowed``.

    Args:
        settings: normalised settings.
        allowed: extra keys the engine maps itself.
        engine: engine name used in the message.
    """
    unknown = sorted(set(settings.extra) - allowed)
    if unknown:
        valid = sorted(_KNOWN_KEYS | allowed)
        raise ConfigError(f"{engine} config has unknown field(s) {unknown}; valid fields: {valid}")


def core_component_trace(engine_cls_name: str, from_core: bool) -> list[str]:
    """Return the component_trace an engine reports.

    ``["sagellm-core", "sagellm-backend:<Engine>"]`` for engines created through sagellm-core
    (as 0.1.1.2 did) and ``["sagellm-backend:<Engine>"]`` otherwise.
    """
    own = f"sagellm-backend:{engine_cls_name}"
    return [CORE_COMPONENT, own] if from_core else [own]
