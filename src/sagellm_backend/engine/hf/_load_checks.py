"""What the HF loader checks before it loads a byte: dtype, device, model path, model type.

Part of :mod:`sagellm_backend.engine.hf.loader` (which re-exports the public names). Each
check raises a library error that says what was wrong and what is valid
(:class:`~sagellm_backend.errors.ConfigError`, or
:class:`~sagellm_backend.errors.DependencyMissingError` with the ``pip install`` command).

Invariants: no CUDA API is called (a device stays a string checked by ``torch.device``);
the hub is probed with one short TCP connection at most (:data:`HUB_PROBE_TIMEOUT_S`),
and not at all behind a proxy; torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
from collections.abc import Collection
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sagellm_backend.errors import ConfigError, DependencyMissingError

__all__ = [
    "DEVICE_MAP_STRATEGIES",
    "DTYPE_ALIASES",
    "HF_INSTALL",
    "HUB_PROBE_TIMEOUT_S",
    "OFFLINE_HINT",
    "VALID_DTYPES",
    "check_causal_lm",
    "check_device_dtypes",
    "dtype_name",
    "hub_offline",
    "hub_unreachable",
    "import_transformers",
    "missing_local",
    "only_local",
    "read_model_type",
    "resolve_torch_dtype",
    "supported_model_types",
    "validate_device",
    "validate_device_map",
]

#: dtype names the engines accept; ``"auto"`` keeps the checkpoint's own dtype.
VALID_DTYPES = ("float16", "bfloat16", "float32", "auto")
#: Other spellings of :data:`VALID_DTYPES` names.
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32"}
#: device_map strings accelerate understands besides a single device.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

HF_INSTALL = "pip install 'isagellm-backend[hf]'"
_COMMON_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "opt", "falcon")
#: Seconds the hub connection probe waits before a hub id is looked up in the cache only.
HUB_PROBE_TIMEOUT_S = 3.0
OFFLINE_HINT = (
    "to work offline, set HF_HUB_OFFLINE=1 and pass a local model directory (or a hub id "
    "already in the local hub cache)"
)


def import_transformers() -> Any:
    """Import transformers (and torch), or raise with the install command."""
    try:
        import torch  # noqa: F401  (transformers needs it; report it by name)
        import transformers
    except ImportError as exc:
        raise DependencyMissingError(
            f"the HF engines need torch and transformers ({exc}); install them with: {HF_INSTALL}"
        ) from exc
    return transformers


def resolve_torch_dtype(dtype: str) -> Any:
    """Map a dtype name to a ``torch.dtype`` (``"auto"`` stays the string ``"auto"``).

    Accepts the names in :data:`VALID_DTYPES` and the aliases fp16/half/bf16/fp32.

    Raises:
        ConfigError: unknown name.
    """
    if not isinstance(dtype, str):
        raise ConfigError(f"dtype must be a string, one of {VALID_DTYPES}; got {dtype!r}")
    name = DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in VALID_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; valid values: {VALID_DTYPES}")
    if name == "auto":
        return "auto"
    import torch

    return getattr(torch, name)


def supported_model_types() -> list[str]:
    """The ``model_type`` values transformers maps to a causal-LM class, sorted."""
    import_transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def only_local(model_path: str) -> bool:
    """Whether ``model_path`` can only name a local directory (never a hub id ``org/name``)."""
    if model_path.startswith(("/", ".", "~")) or os.path.isabs(model_path):
        return True
    if model_path.replace(os.sep, "/").count("/") > 1:
        return True
    try:
        hub_utils = importlib.import_module("huggingface_hub.utils")
        hub_utils.validate_repo_id(model_path)
    except Exception:
        return True
    return False


def missing_local(model_path: str) -> str:
    """Where ``model_path`` was looked for locally, for error messages."""
    path = Path(model_path).expanduser()
    if path.is_absolute():
        return f"no local directory {str(path)!r}"
    return (
        f"no local directory {str(path.absolute())!r} (relative paths are resolved against "
        f"the working directory {os.getcwd()!r})"
    )


def hub_offline() -> bool:
    """Whether the hub is switched off (``HF_HUB_OFFLINE``)."""
    try:
        constants = importlib.import_module("huggingface_hub.constants")
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return True
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_unreachable() -> str | None:
    """Why the hub endpoint cannot be reached (a short TCP probe), or None when it can.

    Behind a proxy (``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` set) a direct
    connection says nothing, so no probe is made (None).
    """
    proxies = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
    if any(os.environ.get(v) or os.environ.get(v.lower()) for v in proxies):
        return None
    constants = importlib.import_module("huggingface_hub.constants")
    endpoint = str(getattr(constants, "ENDPOINT", "https://huggingface.co"))
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"cannot connect to the Hugging Face hub {endpoint} ({exc})"


def validate_device(device: str) -> None:
    """Raise ConfigError unless ``device`` is a torch device string."""
    if not isinstance(device, str) or not device:
        raise ConfigError(f"device must be a string such as 'cpu' or 'cuda:0'; got {device!r}")
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"device {device!r} is not a valid torch device string (e.g. 'cpu', 'cuda', "
            f"'cuda:1'): {exc}"
        ) from exc


def validate_device_map(device_map: str | dict[str, Any] | None) -> None:
    """Raise ConfigError unless ``device_map`` is None, a dict, a strategy or a device."""
    if device_map is None or isinstance(device_map, dict):
        return
    if not isinstance(device_map, str):
        raise ConfigError(
            f"device_map must be None, a dict of module -> device, one of "
            f"{DEVICE_MAP_STRATEGIES} or a device string; got {device_map!r}"
        )
    if device_map in DEVICE_MAP_STRATEGIES:
        return
    try:
        validate_device(device_map)
    except ConfigError as exc:
        raise ConfigError(
            f"device_map {device_map!r} is neither one of {DEVICE_MAP_STRATEGIES} nor a "
            "device string such as 'cuda:0'"
        ) from exc


def read_model_type(config_file: Path) -> str:
    """The ``model_type`` of a ``config.json`` (empty when it has none)."""
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read model config {str(config_file)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"model config {str(config_file)!r} is not a JSON object")
    return str(data.get("model_type", ""))


def check_causal_lm(config: Any, model_path: str, trust_remote_code: bool) -> None:
    """Raise ConfigError unless transformers (or remote code) has a causal-LM class for it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        return  # remote code provides its own causal-LM class
    hint = (
        " (its auto_map names AutoModelForCausalLM: pass trust_remote_code=True)"
        if "AutoModelForCausalLM" in auto_map
        else ""
    )
    common = [t for t in _COMMON_TYPES if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    raise ConfigError(
        f"model {model_path!r} has model_type {model_type!r}, which has no causal-LM class"
        f"{hint}; the HF engines run decoder (causal LM) models such as "
        f"{', '.join(common)} ({len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)} model types in all: "
        "see supported_model_types())"
    )


def dtype_name(dtype: Any) -> str:
    """``torch.float16`` -> ``"float16"`` (a name stays a name)."""
    return str(dtype).removeprefix("torch.")


def check_device_dtypes(
    device: str, device_dtypes: Collection[str] | None, wanted: dict[str, Any]
) -> None:
    """Raise ConfigError when a requested dtype has no arithmetic on the device."""
    if device_dtypes is None:
        return
    have = {DTYPE_ALIASES.get(str(d).lower(), str(d).lower()) for d in device_dtypes}
    for what, dtype in wanted.items():
        if dtype == "auto" or dtype is None:
            continue
        name = dtype_name(dtype)
        if name not in have:
            valid = sorted(have & set(VALID_DTYPES))
            raise ConfigError(
                f"{what}={name!r} is requested but device {device!r} has no {name} arithmetic "
                f"(its provider reports {valid}); choose one of {valid}"
            )
