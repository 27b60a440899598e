"""Which runner serves a model, and why.

* ``"paged"`` -- :class:`~sagellm_backend.engine.runners.paged.PagedRunner`: any causal LM
  whose transformers class declares attention-backend support
  (``_supports_attention_backend``) and that runs on one device; K/V in the paged pool,
  prefix pages reused.
* ``"hf-batched"`` -- :class:`~sagellm_backend.engine.runners.hf_cache.HFBatchedRunner`:
  every other causal LM (bloom, falcon, mpt, ...), or a model spread over several devices;
  concurrent sequences still run in one padded forward per step.
* ``"hf-sequential"`` -- :class:`~sagellm_backend.engine.runners.hf_state.HFStatefulRunner`:
  models with recurrent state (Mamba, Jamba, Qwen3-Next, RecurrentGemma, ...: SSM, linear-
  attention, convolution or hybrid layers), under ``runner="auto"`` and ``runner="hf"``
  alike (``"paged"`` is refused): padding or packing sequences together would mix their
  states, so each sequence keeps the model's own cache and runs in a forward of its own.
  Also models whose cache layers hold more than plain keys and values (indexed or
  compressed attention: DeepSeek-V3.2/V4, GLM-MoE-DSA, ...), and models that left-padded
  batches would change (positions taken from the cache length: the decoders of BART,
  Pegasus, Marian, Whisper, ...; :func:`select_runner` finds those with a start-up probe,
  :func:`~._probe.padded_batches_match`, so :func:`describe_runner` still names
  ``"hf-batched"`` for them).

A model whose forward takes no transformers cache (``cache`` / ``past_key_values``: GPT-1,
Reformer, XLNet, RWKV) and that the paged runner cannot serve either is refused with a
ConfigError that says so.

:func:`describe_runner` decides from the model class and config alone (no weights needed,
so ``sagellm-backend info --model PATH`` can answer from ``config.json``);
:func:`select_runner` builds the runner, falling back to ``"hf-batched"`` under
``runner="auto"`` when the paged runner's probe refuses the model (the reason is logged).

This module imports no torch at import time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sagellm_backend.engine.runners.base import ModelRunner
from sagellm_backend.errors import ConfigError

__all__ = [
    "RUNNER_KINDS",
    "describe_runner",
    "describe_runner_for_path",
    "recurrent_state_reason",
    "select_runner",
]

_log = logging.getLogger(__name__)

#: Runner names :func:`describe_runner` answers.
RUNNER_KINDS = ("paged", "hf-batched", "hf-sequential")
_OPTIONS = ("auto", "paged", "hf")
#: What the config alone cannot tell about an ``hf-batched`` model (see :func:`select_runner`).
_PROBE_NOTE = (
    "; at start a probe sends it to hf-sequential instead if left-padded batches change its logits"
)


def _causal_lm_class(config: Any) -> Any:
    """The ``AutoModelForCausalLM`` class of ``config`` (None when transformers has none)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def _spread_over_devices(model: Any) -> bool:
    devmap = getattr(model, "hf_device_map", None)
    if isinstance(devmap, dict) and len({str(d) for d in devmap.values()}) > 1:
        return True
    devices = {str(p.device) for p in model.parameters()}
    return len(devices) != 1 or "meta" in devices


def _model_and_config(model_or_config: Any) -> tuple[bool, Any]:
    """(whether it is a loaded model, its config) of a loaded model or a config."""
    is_model = hasattr(model_or_config, "config") and hasattr(model_or_config, "forward")
    return is_model, model_or_config.config if is_model else model_or_config


def _paged_reason(model_or_config: Any) -> str | None:
    """Why the paged runner cannot serve it (None: it can, as far as static checks tell)."""
    is_model, config = _model_and_config(model_or_config)
    cls = type(model_or_config) if is_model else _causal_lm_class(config)
    model_type = getattr(config, "model_type", None)
    if cls is None:
        return f"transformers has no causal-LM class for model_type {model_type!r}"
    if not getattr(cls, "_supports_attention_backend", False):
        return (
            f"{cls.__name__} (model_type {model_type!r}) does not support custom attention "
            "functions (no attention-backend support in transformers)"
        )
    mixed = _mixed_head_shapes(config)
    if mixed is not None:
        return mixed
    if getattr(config, "alibi", False):
        return "ALiBi position biases are not supported by the paged attention"
    if getattr(config, "kv_lora_rank", None) and getattr(config, "v_head_dim", None):
        qk = (getattr(config, "qk_nope_head_dim", 0) or 0) + (
            getattr(config, "qk_rope_head_dim", 0) or 0
        )
        return (
            f"multi-head latent attention (kv_lora_rank {config.kv_lora_rank}; keys {qk} and "
            f"values {config.v_head_dim} wide per head): the paged pool holds plain K/V heads "
            "of one head_dim"
        )
    if is_model and _spread_over_devices(model_or_config):
        return "the model is spread over several devices (device_map) or offloaded"
    return None


def _mixed_head_shapes(config: Any) -> str | None:
    """Why the layers' K/V differ in shape (None: one shape, or no per-layer configs)."""
    getter = getattr(config, "get_text_config", None)
    text = getter(decoder=True) if callable(getter) else config
    try:
        layers = list(getattr(text, "per_layer_config", None) or [])
        shapes = sorted(
            {
                (getattr(lay, "num_key_value_heads", None), getattr(lay, "head_dim", None))
                for lay in layers
            },
            key=str,
        )
    except Exception:  # a config whose layers cannot be read: leave it to the runner's probe
        return None
    if len(shapes) < 2:
        return None
    return (
        "its layers keep K/V of different shapes ((kv heads, head_dim): "
        f"{', '.join(str(s) for s in shapes)}); the paged pool holds one shape"
    )


#: Cache layer types (transformers' ``layer_types`` vocabulary) that hold recurrent state.
_STATE_LAYER_TYPES = frozenset({"conv", "linear_attention", "hybrid", "hybrid_sliding"})
#: Cache layer types holding plain keys and values (the window is the mask's business).
_PLAIN_LAYER_TYPES = frozenset(
    {"full_attention", "sliding_attention", "chunked_attention", "dummy", "moe", "mlp"}
)


def _layer_types(config: Any) -> list[str]:
    """The cache layer types transformers derives from ``config`` (empty when it cannot)."""
    getter = getattr(config, "get_text_config", None)
    text = getter(decoder=True) if callable(getter) else config
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, _ = get_layer_types_and_kwargs(text)
    except Exception:  # an older transformers, or a config it cannot read
        types = getattr(text, "layer_types", None) or []
    return [str(t) for t in types]


def module_state_owners(model: Any) -> list[Any]:
    """The innermost modules that keep running state as plain attributes.

    Such a module defines ``_setup_cache`` (RecurrentGemma's recurrent blocks); an outer
    module that only forwards to its children's is left out.
    """
    owners = [m for m in model.modules() if callable(getattr(m, "_setup_cache", None))]
    return [
        m
        for m in owners
        if not any(o is not m and any(o is c for c in m.modules()) for o in owners)
    ]


def recurrent_state_reason(model_or_config: Any) -> str | None:
    """Why ``model_or_config`` needs per-sequence state (None: a plain attention K/V model).

    Decided from the config's cache layer types and, for a loaded model, from modules that
    keep state themselves; imports transformers, not torch.
    """
    is_model, config = _model_and_config(model_or_config)
    stateful = sorted(set(_layer_types(config)) & _STATE_LAYER_TYPES)
    if stateful:
        return (
            f"its layers keep recurrent state ({', '.join(stateful)} layers), which batching "
            "by padding or packing would mix between sequences"
        )
    if is_model and module_state_owners(model_or_config):
        return "its modules keep recurrent state between forwards"
    return None


def own_cache_reason(model_or_config: Any) -> str | None:
    """Why the model needs its own cache layers (None: plain K/V or recurrent state only).

    Layers of other cache types (``indexed_attention``, ``heavily_compressed_attention``,
    ...) keep more than keys and values, which neither the paged pool nor a cache rebuilt
    from K/V holds.
    """
    _, config = _model_and_config(model_or_config)
    special = sorted(set(_layer_types(config)) - _PLAIN_LAYER_TYPES - _STATE_LAYER_TYPES)
    if special:
        return (
            f"its cache layers ({', '.join(special)}) keep more than plain keys and values, so "
            "each sequence keeps the model's own cache"
        )
    return None


def no_cache_reason(model_or_config: Any) -> str | None:
    """Why an HF-cache runner cannot serve the model: its forward takes no transformers cache.

    Decided for transformers' own classes only (remote code may take a cache through
    ``**kwargs``; the runners' start-up probes decide for it). The paged runner needs no
    model cache, so this matters only for models it cannot serve.
    """
    is_model, config = _model_and_config(model_or_config)
    cls = type(model_or_config) if is_model else _causal_lm_class(config)
    if cls is None:
        return None
    import inspect

    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return None
    if "cache" in params or "past_key_values" in params:
        return None
    if not str(getattr(cls, "__module__", "")).startswith("transformers."):
        return None  # remote code may take a cache through **kwargs: the runners' probes tell
    own = [p for p in ("state", "mems", "past_buckets_states") if p in params]
    kept = f" (it keeps its own {own[0]!r} instead)" if own else ""
    return (
        f"{cls.__name__}.forward takes no transformers cache (no 'cache' or "
        f"'past_key_values' argument){kept}; the engine serves causal LMs whose K/V or "
        "recurrent state lives in a transformers Cache"
    )


def describe_runner(model_or_config: Any, runner: str = "auto") -> tuple[str, str]:
    """Return ``(runner_name, reason)`` for a loaded model or a transformers config.

    Args:
        model_or_config: a loaded ``*ForCausalLM`` or its ``PretrainedConfig``.
        runner: the engine's ``runner`` option: ``"auto"``, ``"paged"`` or ``"hf"``.

    Raises:
        ConfigError: ``runner`` is not a valid option, ``"paged"`` was asked for a model
            the paged runner cannot serve, or the model cannot be served at all (its forward
            takes no transformers cache); the message says why.
    """
    if runner not in _OPTIONS:
        raise ConfigError(f"runner must be one of {_OPTIONS}, got {runner!r}")

    def on_its_cache(name: str, why: str) -> tuple[str, str]:
        # the HF-cache runners keep K/V or state in the model's cache: it must take one
        unservable = no_cache_reason(model_or_config)
        if unservable is not None:
            raise ConfigError(f"this model cannot be served: {unservable}")
        return name, why

    state = recurrent_state_reason(model_or_config) or own_cache_reason(model_or_config)
    if state is not None:
        if runner == "paged":
            raise ConfigError(f"runner='paged' cannot serve this model: {state}")
        return on_its_cache("hf-sequential", state)
    if runner == "hf":
        return on_its_cache("hf-batched", "runner='hf' was asked for" + _PROBE_NOTE)
    reason = _paged_reason(model_or_config)
    if reason is None:  # the paged runner needs no HF cache
        return "paged", "its attention layers accept a custom attention function"
    if runner == "paged":
        raise ConfigError(f"runner='paged' cannot serve this model: {reason}")
    return on_its_cache("hf-batched", reason + _PROBE_NOTE)


def describe_runner_for_path(
    path: str | Path, *, trust_remote_code: bool = False
) -> dict[str, str]:
    """``describe_runner`` for a model directory (reads only its config).

    Returns:
        ``{"model_type", "architecture", "runner", "reason"}``.

    Raises:
        ConfigError: the directory holds no readable transformers config.
    """
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{str(path)!r} is not a model directory (it has no config.json)")
    try:
        config = AutoConfig.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read a transformers config from {str(path)!r}: {exc}") from exc
    name, reason = describe_runner(config)
    cls = _causal_lm_class(config)
    return {
        "model_type": str(getattr(config, "model_type", "?")),
        "architecture": cls.__name__ if cls is not None else "?",
        "runner": name,
        "reason": reason,
    }


def select_runner(
    model: Any,
    kv_storage: Any,
    *,
    block_size: int,
    max_context: int,
    runner: str = "auto",
    max_batch_size: int = 64,
    prepack_weights: bool = False,
    decode_cache_bytes: int | None = None,
    fuse_projections: bool = False,
) -> ModelRunner:
    """Build the runner :func:`describe_runner` names for ``model``.

    Args:
        model: the loaded ``*ForCausalLM``.
        kv_storage: the KV manager's storage; the paged runner needs its ``layer_kv``
            (a :class:`~sagellm_backend.kv.storage.TorchKVStorage` on the model's device).
        block_size: tokens per KV page.
        max_context: longest sequence served.
        runner: ``"auto"``, ``"paged"`` or ``"hf"`` (see :func:`describe_runner`).
        max_batch_size: most sequences one step runs (sizes the fallback's batches).
        prepack_weights: the runners' ``prepack_weights`` (CPU fp32 oneDNN fast path).
        decode_cache_bytes: the paged runner's decode-cache budget (None: its device
            default).
        fuse_projections: the paged runner's ``fuse_projections`` (q/k/v and gate/up as
            one GEMM each in Llama-family models).

    Raises:
        ConfigError: ``runner="paged"`` and the model cannot be served by it, or the KV
            storage keeps no tensors on the model's device.
    """
    kind, reason = describe_runner(model, runner)
    if kind == "paged":
        from sagellm_backend.engine.runners.paged import PagedRunner

        layer_kv = getattr(kv_storage, "layer_kv", None)
        if layer_kv is None:
            raise ConfigError(
                f"KV storage {type(kv_storage).__name__} keeps no KV tensors (no layer_kv); "
                "the paged runner needs a torch provider (cpu or cuda)"
            )
        device = model.get_input_embeddings().weight.device
        if layer_kv(0)[0].device != device:
            raise ConfigError(
                f"the model is on {device} but the KV pool is on {layer_kv(0)[0].device}; "
                "give the engine a provider for the model's device"
            )
        try:
            return PagedRunner(
                model,
                layer_kv,
                block_size=block_size,
                max_context=max_context,
                prepack_weights=prepack_weights,
                decode_cache_bytes=decode_cache_bytes,
                fuse_projections=fuse_projections,
            )
        except ValueError as exc:
            if runner == "paged":
                raise ConfigError(f"runner='paged' cannot serve this model: {exc}") from exc
            reason = str(exc)
    if kind == "hf-batched":
        from sagellm_backend.engine.runners._probe import padded_batches_match
        from sagellm_backend.engine.runners.hf_cache import HFBatchedRunner

        matches, why = padded_batches_match(HFBatchedRunner(model, max_context=max_context))
        if not matches:
            kind, reason = "hf-sequential", why
    if kind == "hf-sequential":
        from sagellm_backend.engine.runners.hf_state import HFStatefulRunner

        _log.info("using the per-sequence runner: %s", reason)
        try:
            return HFStatefulRunner(model, max_context=max_context, prepack_weights=prepack_weights)
        except ValueError as exc:
            raise ConfigError(f"this model cannot be served: {exc}") from exc
    from sagellm_backend.engine.runners.hf_cache import HFBatchedRunner

    _log.info("using the batched HF-cache runner: %s", reason)
    return HFBatchedRunner(
        model,
        max_context=max_context,
        max_batch_size=max_batch_size,
        prepack_weights=prepack_weights,
    )
