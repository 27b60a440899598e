"""Engine options: the one type for the batching, KV and limit options of every engine.

:class:`EngineOptions` declares each option once (name, type, default). The HF engine
configs (:class:`~sagellm_backend.engine.cpu.CPUEngineConfig`,
:class:`~sagellm_backend.engine.hf_cuda.HFCudaEngineConfig`) inherit these fields through
:class:`EngineOptionFields`; :func:`resolve_engine_options` reads and validates them into a
plain :class:`EngineOptions` that the engine keeps. The mock engine's config maps its own
published fields onto the same type
(:meth:`~sagellm_backend.engine.mock.MockEngineConfig.engine_options`), so every engine
builds its serving set (scheduler, KV manager, limits) from an :class:`EngineOptions`.

Invariants:
    * :data:`ENGINE_OPTION_DEFAULTS` is derived from :class:`EngineOptions` (one source).
    * An :class:`EngineOptions` returned by :func:`resolve_engine_options` holds validated
      values; engines treat it as read-only.
    * Nothing here imports torch, transformers or a higher layer than ``engine.base``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sagellm_backend._validate import check_bool, check_choice, check_int
from sagellm_backend.engine.base import EngineConfig
from sagellm_backend.errors import ConfigError

__all__ = [
    "ENGINE_OPTION_DEFAULTS",
    "RUNNER_CHOICES",
    "EngineOptionFields",
    "EngineOptions",
    "decode_cache_budget",
    "resolve_engine_options",
]

#: Values of the ``runner`` option.
RUNNER_CHOICES = ("auto", "paged", "hf")


@dataclass(kw_only=True)
class EngineOptions:
    """Tuning options shared by the engines (config fields of the same names).

    Attributes:
        kv_cache_memory_bytes: bytes of the KV pool the engine asks its provider for; None
            takes what the provider's KV budget has left -- on CPUEngine at most the pages of
            ``max_batch_size`` sequences of the full context (a provider the engine creates
            itself gets this as its budget).
        block_size: tokens per KV page.
        enable_prefix_caching: reuse the K/V of cached full blocks of a repeated prompt
            prefix (paged runner only; the fallback runner always recomputes).
        max_num_batched_tokens: most tokens one step computes (prompt chunks are split to
            fit, except on the per-sequence runner, whose prompts run whole); bounds step
            latency and so ``stop()`` latency.
        max_model_len: cap on prompt + output length (None: the model's context length).
        max_input_tokens: cap on prompt length (None: only the context bounds it).
        runner: ``"auto"`` (paged where the model supports custom attention functions, else
            the batched fallback), ``"paged"`` (error if the model is not supported) or
            ``"hf"`` (always the fallback). Models with recurrent state (Mamba, Jamba,
            Qwen3-Next, RecurrentGemma, ...) get the per-sequence runner under ``"auto"`` and
            ``"hf"``; ``"paged"`` is an error for them.
        fuse_projections: in Llama-family models (llama, mistral, qwen2, qwen3) the paged
            runner computes q/k/v and gate/up as one GEMM each over views of one fused
            weight (no extra weight memory).
        prepack_weights: on CPU with fp32 or bf16 weights (oneDNN builds of torch), keep a
            oneDNN-prepacked copy of the plain linear weights that the paged runner's
            GEMMs use for steps of up to 64 rows (1-3 row steps where ``F.linear`` was
            timed faster at load run ``F.linear``; 2-2.7x faster decode GEMMs on the
            reference machine; a second copy of the linear weights' memory, so turn it off
            for models that barely fit in RAM, plus ~8 MB of oneDNN kernels per distinct
            linear shape, built at load).
        decode_workspace_bytes: byte budget of the paged runner's decode cache (a dense
            copy of the decoding sequences' K/V kept between steps, on top of the KV pool;
            0 turns it off). At the default the runner's device default applies: this
            budget on CPU, off on accelerators (which gather pages from fast memory).
    """

    kv_cache_memory_bytes: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_input_tokens: int | None = None
    runner: str = "auto"
    fuse_projections: bool = True
    prepack_weights: bool = True
    decode_workspace_bytes: int = 512 << 20


#: Option name -> default (the config dataclasses inherit fields with these defaults).
ENGINE_OPTION_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(EngineOptions)
}


@dataclass(kw_only=True)
class EngineOptionFields(EngineOptions, EngineConfig):
    """Base of the HF face configs: :class:`EngineConfig` plus the :class:`EngineOptions` fields.

    The option fields are keyword-only, so they follow every positional field a face
    declares (its published positional order is kept); :func:`dataclasses.fields` lists the
    :class:`EngineConfig` fields first. The values are validated by
    :func:`resolve_engine_options`.
    """


def decode_cache_budget(options: EngineOptions) -> int | None:
    """The decode-cache budget to pass to the runner (None: its device default)."""
    value = options.decode_workspace_bytes
    return None if value == ENGINE_OPTION_DEFAULTS["decode_workspace_bytes"] else value


def _check_option(owner: str, name: str, value: Any) -> Any:
    field = f"{owner}.{name}"
    if name == "max_model_len":  # one prompt token and one output token at least
        return check_int(field, value, lo=2, optional=True, valid="None or an integer >= 2")
    if name in ("kv_cache_memory_bytes", "max_input_tokens"):
        return check_int(field, value, optional=True, valid="None or an integer >= 1")
    if name in ("block_size", "max_num_batched_tokens"):
        return check_int(field, value, valid="an integer >= 1")
    if name == "decode_workspace_bytes":
        return check_int(field, value, lo=0, valid="an integer >= 0 (0 turns the workspace off)")
    if name == "runner":
        return check_choice(field, value, RUNNER_CHOICES)
    return check_bool(field, value, valid="a bool (True or False)")


def resolve_engine_options(owner: str, config: Any) -> EngineOptions:
    """Read and validate the :class:`EngineOptions` of an engine config.

    Each option comes from the config field of the same name; ``config.metadata`` may also
    carry it (for configs built by generic code). A metadata value is used when the field
    is at its default; a field set to something else and a different metadata value is a
    conflict.

    Raises:
        ConfigError: an invalid value or a conflict (the message names the option).
    """
    metadata = getattr(config, "metadata", None) or {}
    values: dict[str, Any] = {}
    for name, default in ENGINE_OPTION_DEFAULTS.items():
        value = getattr(config, name, default)
        if name in metadata:
            meta = metadata[name]
            if value != default and meta != value:
                raise ConfigError(
                    f"{owner}.{name}={value!r} conflicts with metadata[{name!r}]={meta!r}; "
                    "set it in one place"
                )
            value = meta
        values[name] = _check_option(owner, name, value)
    opts = EngineOptions(**values)
    max_batch = getattr(config, "max_batch_size", None)
    if isinstance(max_batch, int) and opts.max_num_batched_tokens < max_batch:
        raise ConfigError(
            f"{owner}.max_num_batched_tokens={opts.max_num_batched_tokens} must be >= "
            f"max_batch_size={max_batch} (every running request decodes one token per step)"
        )
    return opts
