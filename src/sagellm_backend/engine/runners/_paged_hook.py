"""The attention hook of the generic paged runner and the model probe (see :mod:`.paged`).

:func:`paged_attention` is what transformers calls in every attention layer once a model
is switched to :data:`ATTN_NAME`: inside a runner step (the step is in the thread-local
``_local.step``) it hands the layer to the runner; outside one it is dense attention with
the mask transformers gives; while :func:`prepare_model` probes a model it also records what
every layer passes (:class:`LayerFeatures`).

Invariants: ``_local.step`` is set only while a runner's forward runs on this thread, and
``_local.probe`` only during :func:`_probe_features`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from sagellm_backend.engine.runners._paged_ops import _attend, _window_mask

__all__ = [
    "ATTN_NAME",
    "LayerFeatures",
    "paged_attention",
    "prepare_model",
    "register_paged_attention",
]

#: The name :func:`paged_attention` is registered under in ``transformers.AttentionInterface``.
ATTN_NAME = "sagellm_paged"

# Keyword arguments transformers' attention modules pass that need no handling here.
_IGNORED_KWARGS = frozenset(
    {
        "dropout",
        "position_ids",
        "use_cache",
        "cache_position",
        "output_attentions",
        "past_key_values",
        "past_key_value",
        "layer_head_mask",
        "head_mask",
        "is_causal",
        "attention_mask",
        "return_dict",
        "output_hidden_states",
        "token_type_ids",
        "cache",
        # MoE models pass their router-output flags down every layer's kwargs; they
        # concern the expert blocks, not attention.
        "output_router_logits",
        "output_router_probs",
    }
)
# Keyword arguments honoured by the paged attention.
_HONOURED_KWARGS = frozenset({"scaling", "sliding_window", "softcap", "s_aux"})

_local = threading.local()


@dataclass(slots=True)
class LayerFeatures:
    """What one attention layer passed during the probe forward.

    Attributes:
        num_heads: query heads.
        num_kv_heads: key/value heads.
        head_dim: width of q, k and v heads.
        scaling: softmax scale (None: ``head_dim ** -0.5``).
        sliding_window: the window, or None.
        softcap: attention logit soft-capping, or None.
        has_sinks: the layer passes attention sinks (``s_aux``).
        key_dtype: dtype of the keys the layer computes (None: not recorded).
        value_dtype: dtype of its values (None: not recorded).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float | None
    sliding_window: int | None
    softcap: float | None
    has_sinks: bool
    key_dtype: torch.dtype | None = None
    value_dtype: torch.dtype | None = None


# ---------------------------------------------------------------------------- the hook
def _kwarg_features(kwargs: dict[str, Any]) -> tuple[int | None, float | None, Any]:
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
    return (
        int(window) if window is not None else None,
        float(softcap) if softcap is not None else None,
        sinks,
    )


def paged_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as :data:`ATTN_NAME` (transformers' signature).

    ``query [1, H, T, D]``, ``key``/``value [1, Hkv, T, D]``; returns ``[1, T, H, D]``.
    Inside :meth:`PagedRunner.execute` it reads and writes the paged pool; elsewhere it is
    dense attention with ``attention_mask`` (and records the layer's features when a probe
    is running).
    """
    del dropout  # inference only
    step: Any = getattr(_local, "step", None)
    if step is not None:
        out = step.runner._layer_attention(step, module, query, key, value, scaling, kwargs)
        return out, None
    probe: list[tuple[Any, LayerFeatures, list[str]]] | None = getattr(_local, "probe", None)
    window, softcap, sinks = _kwarg_features(kwargs)
    if probe is not None:
        unknown = [
            k
            for k, v in kwargs.items()
            if k not in _IGNORED_KWARGS and k not in _HONOURED_KWARGS and v is not None
        ]
        feats = LayerFeatures(
            num_heads=int(query.shape[1]),
            num_kv_heads=int(key.shape[1]),
            head_dim=int(query.shape[-1]),
            scaling=None if scaling is None else float(scaling),
            sliding_window=window,
            softcap=softcap,
            has_sinks=sinks is not None,
            key_dtype=key.dtype,
            value_dtype=value.dtype,
        )
        if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
            unknown.append(f"value/key head_dim {value.shape[-1]} != query {query.shape[-1]}")
        if getattr(module, "is_causal", True) is False:
            unknown.append("non-causal attention (is_causal=False)")
        probe.append((module, feats, unknown))
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    n, length = query.shape[2], key.shape[2]
    mask = None
    if attention_mask is not None:
        mask = attention_mask[..., :length]
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, float("-inf")
            )
    elif window is not None or 1 < n < length:
        # Queries are the last n positions (a cache may hold earlier keys).
        mask = _window_mask(
            torch.arange(length - n, length, device=query.device).view(-1, 1),
            torch.arange(length, device=query.device).view(1, -1),
            torch.tensor([[length]], device=query.device),
            window,
            query.dtype,
        )
    causal = mask is None and n == length and n > 1
    out = _attend(query, key, value, mask, scale, softcap, sinks, causal=causal)
    return out.transpose(1, 2).contiguous(), None


_REGISTER_LOCK = threading.Lock()


def register_paged_attention() -> None:
    """Register :func:`paged_attention` as :data:`ATTN_NAME` (idempotent)."""
    from transformers import AttentionInterface

    with _REGISTER_LOCK:
        AttentionInterface.register(ATTN_NAME, paged_attention)


def _probe_features(model: Any, device: torch.device) -> list[tuple[Any, LayerFeatures, list[str]]]:
    """Run a 2-token forward with the hook in probe mode; return what each layer passed."""
    records: list[tuple[Any, LayerFeatures, list[str]]] = []
    _local.probe = records
    try:
        with torch.inference_mode():
            ids = torch.tensor([[1, 2]], dtype=torch.long, device=device)
            pos = torch.arange(2, device=device).view(1, 2)
            model(input_ids=ids, position_ids=pos, use_cache=False)
    finally:
        _local.probe = None
    return records


def _model_device(model: Any) -> torch.device:
    return torch.device(model.get_input_embeddings().weight.device)


def prepare_model(model: Any) -> list[tuple[Any, LayerFeatures]]:
    """Switch ``model`` to :data:`ATTN_NAME` and probe its attention layers.

    Returns ``(module, features)`` per attention layer in call order (= layer order).

    Raises:
        ValueError: the model does not support attention backends, never calls the hook,
            calls a layer twice, or a layer passes a feature the paged attention cannot
            honour (named in the message).
    """
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not declare attention-backend support "
            "(_supports_attention_backend)"
        )
    register_paged_attention()
    previous = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation(ATTN_NAME)
    try:
        records = _probe_features(model, _model_device(model))
        if not records:
            raise ValueError(
                f"{type(model).__name__} never calls the registered attention function"
            )
        seen: set[int] = set()
        for module, feats, unsupported in records:
            if id(module) in seen:
                raise ValueError(f"attention module {type(module).__name__} ran twice per step")
            seen.add(id(module))
            if unsupported:
                raise ValueError(
                    f"{type(module).__name__} passes attention features the paged runner "
                    f"does not support: {', '.join(unsupported)}"
                )
            if feats.num_heads % feats.num_kv_heads:
                raise ValueError(
                    f"{feats.num_heads} query heads are not a multiple of "
                    f"{feats.num_kv_heads} KV heads"
                )
    except Exception:
        if previous is not None:
            model.set_attn_implementation(previous)
        raise
    return [(m, f) for m, f, _ in records]
