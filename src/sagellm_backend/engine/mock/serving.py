"""The serving set of a mock-model engine: KV manager, mock runner, scheduler, detokenizer.

:func:`make_mock_serving` is what :class:`~sagellm_backend.engine.mock.MockEngine` and the
HF engines in ``mock_mode`` serve with: the shared
:class:`~sagellm_backend.engine.sched.scheduler.Scheduler` over a
:class:`~sagellm_backend.engine.runners.mock.MockRunner`, with KV accounting through the
provider's :class:`~sagellm_backend.kv.manager.KVCacheManager` (or a pool of our own for a
third-party provider that has none).

Invariants: whatever is taken from the provider is given back if a later part fails, and by
the serving set's ``release``; nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from sagellm_backend.engine._streaming import RequestLimits
from sagellm_backend.engine.mock.tokenizer import MockTokenizer
from sagellm_backend.engine.options import EngineOptions
from sagellm_backend.engine.sched.engine import Detokenizer, Serving
from sagellm_backend.errors import ConfigError

if TYPE_CHECKING:
    from sagellm_backend.kv.manager import KVCacheManager
    from sagellm_backend.kv.spec import KVSpec

__all__ = [
    "DEFAULT_KV_NUM_PAGES",
    "create_mock_kv_manager",
    "make_mock_serving",
    "release_to",
]

#: Most tokens one mock step computes (the mock's steps cost nothing per token).
_MOCK_STEP_TOKENS = 1 << 20
#: KV pool size (pages) of a mock engine given neither a page count nor a memory size.
DEFAULT_KV_NUM_PAGES = 2048


class _MockDetok(Detokenizer):
    """Incremental text of mock tokens (every generated token is a whole word).

    Stateless (every token is a whole word, nothing is held back), so one instance serves
    every request of an engine.

    The texts of word ids are gathered from the tokenizer's word id -> text dict by one
    C-level ``itemgetter``; an id that is not a word (special, byte, negative or past the
    vocabulary) is missing from the dict, and the KeyError sends the ids to the
    tokenizer's full ``decode``. Both give ``tokenizer.decode(ids)``.
    """

    __slots__ = ("_decode", "_words")

    def __init__(self, tokenizer: MockTokenizer) -> None:
        self._decode = tokenizer.decode
        self._words = tokenizer._text_by_id  # shared per vocabulary size; read-only

    def add(self, ids: list[int]) -> str:
        words = self._words
        try:
            if len(ids) > 1:
                return "".join(itemgetter(*ids)(words))
            if ids:
                return words[ids[0]]
            return ""
        except (KeyError, TypeError):  # not a word id (or not hashable as one)
            return self._decode(ids)

    def flush(self) -> str:
        return ""


def create_mock_kv_manager(
    provider: Any,
    spec: KVSpec | None,
    *,
    memory_bytes: int | None,
    num_pages: int | None,
    enable_prefix_caching: bool,
) -> tuple[Any, KVCacheManager]:
    """(provider, KV manager) for a mock-model engine; a MockBackendProvider if none given."""
    from sagellm_backend.kv.spec import KVSpec

    spec = spec or KVSpec(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16)
    if provider is None:
        from sagellm_backend.providers.mock import MockBackendProvider

        provider = MockBackendProvider()
    if num_pages is None and memory_bytes is None:
        num_pages = DEFAULT_KV_NUM_PAGES
    create = getattr(provider, "create_kv_manager", None)
    if callable(create):
        manager: KVCacheManager = create(
            spec,
            memory_bytes=memory_bytes,
            num_pages=num_pages,
            enable_prefix_caching=enable_prefix_caching,
        )
        return provider, manager
    # A third-party provider without a KV manager: account pages ourselves.
    from sagellm_backend.kv.manager import KVCacheManager

    if num_pages is None:
        assert memory_bytes is not None
        num_pages = spec.num_pages_for_bytes(memory_bytes)
        if num_pages < 1:
            raise ConfigError(
                f"MockEngineConfig.kv_memory_bytes={memory_bytes} is smaller than one "
                f"KV page ({spec.page_bytes} bytes)"
            )
    manager = KVCacheManager.counting(spec, num_pages, enable_prefix_caching=enable_prefix_caching)
    return provider, manager


def release_to(provider: Any, kv: Any) -> None:
    """Give ``kv`` back to ``provider`` (when the provider hands out managers)."""
    release = getattr(provider, "release_kv_manager", None)
    if callable(release):
        release(kv)


def make_mock_serving(
    provider: Any,
    *,
    tokenizer: MockTokenizer,
    runner_options: dict[str, Any],
    options: EngineOptions,
    kv_spec: KVSpec | None = None,
    kv_num_pages: int | None = None,
    max_batch_size: int,
    limits: RequestLimits,
) -> tuple[Any, Serving]:
    """The serving set of a mock-model engine: (provider, Serving).

    Used by :class:`~sagellm_backend.engine.mock.MockEngine` and by the HF engines in
    ``mock_mode``. Of ``options`` it uses ``kv_cache_memory_bytes`` (the KV pool size; with
    ``kv_num_pages`` None and no memory size, :data:`DEFAULT_KV_NUM_PAGES` pages) and
    ``enable_prefix_caching``; the request limits are in ``limits`` (an empty prompt starts
    from the mock tokenizer's BOS token, set here for every mock-model engine).
    """
    from sagellm_backend.engine.runners.mock import MockRunner
    from sagellm_backend.engine.sched.scheduler import Scheduler

    provider, kv = create_mock_kv_manager(
        provider,
        kv_spec,
        memory_bytes=options.kv_cache_memory_bytes,
        num_pages=kv_num_pages,
        enable_prefix_caching=options.enable_prefix_caching,
    )
    try:
        runner = MockRunner(tokenizer, **runner_options)
        scheduler = Scheduler(
            kv,
            max_batch_size=max_batch_size,
            max_num_batched_tokens=max(_MOCK_STEP_TOKENS, max_batch_size),
            max_context=limits.max_context,
            eos_token_ids=[MockTokenizer.EOS_ID],
            paged=False,
            reserve_output=True,
            keep_eos=False,
            decode=tokenizer.decode,
        )
    except BaseException:
        release_to(provider, kv)
        raise
    detok = _MockDetok(tokenizer)
    return provider, Serving(
        scheduler=scheduler,
        runner=runner,
        limits=dataclasses.replace(limits, bos_token_id=MockTokenizer.BOS_ID),
        tokenize=tokenizer.encode,
        new_detok=lambda: detok,
        release=lambda: release_to(provider, kv),
        threaded=False,
    )
