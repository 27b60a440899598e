"""Parts of the HF serving set that :class:`~.core.HFEngineCore` assembles.

The runner choice (:func:`build_runner`), the tokenizer adapters (tokenize, incremental
detokenization, the BOS fallback), and the release and worker-thread hooks. Nothing here
imports torch at module level; each helper imports what it needs when called.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from sagellm_backend.engine.mock.serving import release_to
from sagellm_backend.engine.options import EngineOptions, decode_cache_budget
from sagellm_backend.engine.sched.engine import Detokenizer

if TYPE_CHECKING:
    from sagellm_backend.engine.hf.core import HFEngineCore
    from sagellm_backend.engine.runners.base import ModelRunner
    from sagellm_backend.kv.manager import KVCacheManager

__all__ = [
    "HFDetok",
    "bos_token_id",
    "build_runner",
    "hf_tokenize",
    "inference_mode",
    "provider_dtypes",
    "release_serving",
    "uses_paged_kv",
    "weak_thread_init",
]

_log = logging.getLogger("sagellm_backend.engine.hf.core")


def provider_dtypes(provider: Any) -> list[str] | None:
    """Names of the dtypes ``provider``'s device computes in (None when it does not say)."""
    dtypes = getattr(provider.capability(), "supported_dtypes", None)
    if not dtypes:
        return None
    return [str(getattr(d, "value", d)) for d in dtypes]


def device_type(provider: Any) -> str | None:
    """``provider.capability().device_type`` (None when the capability does not say)."""
    return getattr(provider.capability(), "device_type", None)


def host_provider(options: EngineOptions) -> Any:
    """A cpu provider for an engine whose model runs on the host.

    Its KV budget is ``kv_cache_memory_bytes`` when set, else the cpu provider's default.
    """
    from sagellm_backend.providers.cpu import CPUBackendProvider

    if options.kv_cache_memory_bytes is not None:
        return CPUBackendProvider(kv_memory_bytes=options.kv_cache_memory_bytes)
    return CPUBackendProvider()


def build_runner(
    model: Any,
    kv: KVCacheManager,
    provider: Any,
    *,
    model_path: str,
    options: EngineOptions,
    max_batch_size: int,
    context: int,
) -> ModelRunner:
    """The model runner for ``model`` over ``kv`` (the one place the engine gets a runner).

    Delegates to :func:`~sagellm_backend.engine.runners.select.select_runner`
    (``options.runner``: ``"paged"``, ``"hf"`` or ``"auto"``).

    Raises:
        ConfigError: the requested runner cannot serve this model or provider.
    """
    from sagellm_backend.engine.runners.select import select_runner

    runner: ModelRunner = select_runner(
        model,
        kv.storage,
        block_size=options.block_size,
        max_context=context,
        runner=options.runner,
        max_batch_size=max_batch_size,
        prepack_weights=options.prepack_weights,
        decode_cache_bytes=decode_cache_budget(options),
        fuse_projections=options.fuse_projections,
    )
    return runner


def uses_paged_kv(options: EngineOptions, model: Any, model_path: str) -> bool:
    """Whether the runner for ``model`` keeps K/V in pages (ConfigError for a refused 'paged')."""
    from sagellm_backend.engine.runners.select import describe_runner

    kind, reason = describe_runner(model, options.runner)
    _log.info("runner %s for %s: %s", kind, model_path, reason)
    return kind == "paged"


class HFDetok(Detokenizer):
    """Incremental detokenization through the model's tokenizer."""

    __slots__ = ("_inner",)

    def __init__(self, tokenizer: Any) -> None:
        from sagellm_backend.engine.hf.detok import IncrementalDetokenizer

        self._inner = IncrementalDetokenizer(tokenizer)

    def add(self, ids: list[int]) -> str:
        return str(self._inner.add(ids))

    def flush(self) -> str:
        return str(self._inner.flush())


def hf_tokenize(tokenizer: Any) -> Any:
    def tokenize(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])

    return tokenize


def bos_token_id(tokenizer: Any, vocab_size: int) -> int | None:
    """The tokenizer's BOS id when it is a valid id of the model (else None: no start token)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if isinstance(bos, int) and 0 <= bos < vocab_size else None


def release_serving(provider: Any, kv: Any, tp: Any) -> None:
    """Stop the tensor-parallel workers (if any), then give the KV pool back."""
    try:
        if tp is not None:
            tp.shutdown()
    finally:
        release_to(provider, kv)


def weak_thread_init(engine: HFEngineCore) -> Any:
    """``engine._thread_init`` without a strong reference to the engine."""
    ref = weakref.ref(engine)

    def init() -> None:
        target = ref()
        if target is not None:
            target._thread_init()

    return init


def inference_mode() -> Any:
    import torch

    return torch.inference_mode()
