"""Shared helpers for the ``sagellm.engines`` entry-point factories.

sagellm-core 0.1.x calls an engine factory as ``factory(config, backend)`` where ``config``
is its own pydantic ``EngineConfig`` (fields ``kind``, ``model``, ``model_path``,
``max_batch_size``, ``max_input_tokens``, ``max_output_tokens``, ``device``) and ``backend``
is whatever its ``create_backend`` returned (one of our providers). Plugin packages and
users pass their own config objects too: any object carrying the fields as attributes (a
dataclass, a ``types.SimpleNamespace``, a pydantic model, a plain class) or a mapping, or
``None``. :func:`normalize_engine_config` turns all of these into one validated
:class:`PluginEngineSettings` so every engine factory maps the same fields the same way.

Invariants:
    * Nothing here imports torch, transformers or sagellm-core (a sagellm-core config is
      recognised by duck typing on its module name and ``model_dump``).
    * Every validation failure raises :class:`~sagellm_backend.errors.ConfigError` naming
      the field, the bad value and what a valid value looks like.
    * Unknown *mapping* keys are never dropped silently: they land in
      :attr:`PluginEngineSettings.extra` for the engine factory to map or reject (a typo
      in a dict is an error). Attribute-style configs are someone else's objects: of their
      attributes only the engine-config fields the factory understands are read, and the
      others are ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from sagellm_backend._validate import check_bool, check_int, check_text
from sagellm_backend.errors import ConfigError

__all__ = [
    "CORE_COMPONENT",
    "PluginEngineSettings",
    "core_component_trace",
    "engine_config_fields",
    "is_backend_provider",
    "missing_fields_error",
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


def _field(name: str) -> str:
    return f"engine config '{name}'"


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


@functools.cache
def engine_config_fields() -> frozenset[str]:
    """Names of every field of the built-in engine configs (mock, cpu, cuda; torch-free)."""
    from sagellm_backend.engine.cpu import CPUEngineConfig
    from sagellm_backend.engine.hf_cuda import HFCudaEngineConfig
    from sagellm_backend.engine.mock import MockEngineConfig

    names: set[str] = set()
    for cls in (MockEngineConfig, CPUEngineConfig, HFCudaEngineConfig):
        names.update(f.name for f in dataclasses.fields(cls))
    return frozenset(names)


def _attributes(config: Any, wanted: Collection[str]) -> dict[str, Any]:
    """The ``wanted`` fields an attribute-style object carries (its public attributes)."""
    data: dict[str, Any] = {}
    dump = getattr(config, "model_dump", None)
    if callable(dump):  # pydantic v2 model (sagellm-core EngineConfig or similar)
        dumped = dump()
        if not isinstance(dumped, dict):
            raise ConfigError(
                f"engine config {type(config).__name__}.model_dump() returned "
                f"{type(dumped).__name__}, expected a dict"
            )
        data.update(dumped)
    elif dataclasses.is_dataclass(config):
        data.update({f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    else:
        data.update({k: v for k, v in getattr(config, "__dict__", {}).items() if k[:1] != "_"})
    for name in wanted:  # properties, slots, class attributes
        if name not in data:
            try:
                data[name] = getattr(config, name)
            except AttributeError:
                continue
            except Exception as exc:
                raise ConfigError(
                    f"engine config {type(config).__name__}.{name} could not be read: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
    # Our own engine.base.EngineConfig: metadata holds free-form extras.
    metadata = data.pop("metadata", None)
    if isinstance(metadata, Mapping):
        for key, value in metadata.items():
            data.setdefault(str(key), value)
    return {k: v for k, v in data.items() if (k in wanted and not callable(v)) or k == "provider"}


def _config_to_dict(
    config: Any, fields: Collection[str] | None = None
) -> tuple[dict[str, Any], bool]:
    """Return (fields, from_core) for any accepted config type."""
    if config is None:
        return {}, False
    if isinstance(config, Mapping):
        data = dict(config)
        return data, check_bool(_field("from_core"), data.pop("from_core", False))
    if isinstance(config, (str | bytes | int | float | list | tuple | set, type)):
        raise ConfigError(
            "engine config must be an object carrying the fields as attributes (a dataclass, "
            "a types.SimpleNamespace, a pydantic model), a mapping or None, got "
            f"{type(config).__name__} {config!r}"
        )
    wanted = set(_KNOWN_KEYS) | set(fields if fields is not None else engine_config_fields())
    wanted.add("provider")
    data = _attributes(config, wanted)
    from_core = _is_core_config(config)
    flag = getattr(config, "from_core", None)
    if isinstance(flag, bool):
        from_core = from_core or flag
    return data, from_core


def missing_fields_error(owner: str, missing: Collection[str], example: str) -> ConfigError:
    """A ConfigError naming every missing required field at once.

    Args:
        owner: what was being configured (``"cpu engine"``).
        missing: the names of the required fields that are absent or None.
        example: what a complete config looks like.
    """
    names = ", ".join(sorted(missing))
    return ConfigError(f"{owner} config is missing required field(s): {names}; e.g. {example}")


def _generate_engine_id(kind: str | None, model: str | None) -> str:
    parts = [p for p in (kind, model) if p]
    stem = "-".join(parts) if parts else "engine"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "engine"
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def normalize_engine_config(
    config: Any, backend: Any = None, *, fields: Collection[str] | None = None
) -> PluginEngineSettings:
    """Normalise what an engine factory received into :class:`PluginEngineSettings`.

    Args:
        config: a sagellm-core 0.1.x ``EngineConfig``, a mapping with the same field names
            (plus ``engine_id`` and engine-specific keys, which all go to ``extra``), any
            attribute-style object (dataclass -- our
            :class:`~sagellm_backend.engine.base.EngineConfig`'s ``metadata`` entries become
            extra keys --, ``types.SimpleNamespace``, pydantic model, plain object), or None.
        fields: engine-config field names the calling factory maps (beyond the sagellm-core
            names); an attribute-style config's other attributes are ignored. Default: the
            fields of every built-in engine config.
        backend: the second argument of the factory (sagellm-core passes the provider it
            created). Kept as ``provider`` when it is a backend provider; an object that
            is not a provider (other than None) is rejected.

    Returns:
        The validated settings.

    Raises:
        ConfigError: a field has the wrong type or range, or ``backend`` is not a provider.
    """
    data, from_core = _config_to_dict(config, fields)
    extra = {k: v for k, v in data.items() if k not in _KNOWN_KEYS}
    # Dataclass configs carry fields (mock_mode, provider, ...) that are not errors.
    values: dict[str, Any] = {}
    for name in _STR_FIELDS:
        values[name] = check_text(_field(name), data.get(name), optional=True)
    for name in _INT_FIELDS:
        values[name] = check_int(
            _field(name), data.get(name), optional=True, valid="an integer > 0"
        )

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
