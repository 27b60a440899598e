"""The shared part of the conformance suite: tuning attributes, fixtures, hooks, helpers.

:class:`ConformanceBase` is what every group of checks builds on; the public class
:class:`~sagellm_backend.testing.conformance.ProviderConformance` combines the groups and
documents the attributes and hooks a plugin overrides. Nothing here is a test (pytest
collects only the ``test_`` methods of the check groups, through a ``Test*`` subclass).

Invariant: this module imports pytest but never torch; the default hooks import torch
only for a torch provider (or a torch tensor).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

from sagellm_backend.base import BackendProvider, Event, KVBlock, Stream
from sagellm_backend.capability import DType, KernelKind

__all__ = [
    "COLLECTIVE_OPS",
    "ConformanceBase",
    "ProviderFactory",
    "is_count",
    "stream_and_two_events",
]

ProviderFactory = Callable[[], BackendProvider]

#: The reduction ops every collective-capable provider accepts.
COLLECTIVE_OPS = ("sum", "avg", "max", "min", "product")


def is_count(value: Any) -> bool:
    """True for an ``int`` that is not a ``bool`` (a memory figure, a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


class ConformanceBase:
    """Attributes, fixtures, hooks and helpers of the suite (documented on ProviderConformance)."""

    kv_tracking_keys: ClassVar[tuple[str, ...]] = ("kv_used_bytes",)
    required_memory_keys: ClassVar[tuple[str, ...]] = ("allocated", "peak", "total")
    migrate_targets: ClassVar[tuple[str, ...] | None] = None
    unsupported_migrate_target: ClassVar[str] = "no-such-device:99"
    event_sleep_ms: ClassVar[float] = 30.0
    max_fill_allocations: ClassVar[int] = 2048
    fill_chunk_tokens: ClassVar[int] = 16
    kv_tokens: ClassVar[int] = 32

    # ------------------------------------------------------------------ fixtures and hooks

    def make_provider(self) -> BackendProvider:
        """Create a fresh provider: override this (or the ``provider_factory`` fixture)."""
        pytest.fail(
            f"{type(self).__name__} must override make_provider(self) (or the "
            "provider_factory fixture) to return a fresh provider"
        )

    @pytest.fixture
    def provider_factory(self) -> ProviderFactory:
        """A zero-argument callable creating a fresh provider (default: make_provider)."""
        return self.make_provider

    @pytest.fixture
    def provider(self, provider_factory: ProviderFactory) -> Iterator[BackendProvider]:
        """A fresh provider; closed afterwards when it has ``close()``."""
        created = provider_factory()
        yield created
        close = getattr(created, "close", None)
        if callable(close):
            close()

    def make_tensor(self, provider: BackendProvider, values: list[float]) -> Any:
        """A tensor the provider's collectives accept, holding ``values`` (float32).

        Default: a torch tensor on the provider's device when the provider looks like a
        torch provider (has ``torch_device`` and, if it says, ``uses_torch``), else a plain
        list.
        """
        device = None
        if getattr(provider, "uses_torch", True):
            try:
                device = getattr(provider, "torch_device", None)
            except ImportError:  # a provider that runs without torch here
                device = None
        if device is None:
            return list(values)
        import torch

        return torch.tensor(values, dtype=torch.float32, device=device)

    def tensor_values(self, tensor: Any) -> list[float]:
        """The values of a tensor made by :meth:`make_tensor` (or returned by a collective)."""
        if hasattr(tensor, "tolist"):
            return [float(v) for v in tensor.reshape(-1).tolist()]
        return [float(v) for v in tensor]

    def kernel_kinds(self, provider: BackendProvider) -> set[KernelKind] | None:
        """The kinds of the provider's registered kernels, or None if it does not say.

        Default: ``provider.kernels.kinds()`` (a :class:`~sagellm_backend.kernels.
        KernelRegistry`, as the built-in providers expose).
        """
        registry = getattr(provider, "kernels", None)
        kinds = getattr(registry, "kinds", None)
        return set(kinds()) if callable(kinds) else None

    def kv_contents(self, provider: BackendProvider, block: KVBlock) -> list[Any] | None:
        """A snapshot of a block's K/V contents, one comparable item per page.

        Default: from ``provider.get_kv_tensor(block)`` when the provider has it (a list of
        per-page views, or one object): torch tensors become host ``uint8`` copies of their
        bytes, objects with a content ``tag`` (the mock's page descriptors) become the tag.
        None when the provider gives no access to contents (data checks are skipped).
        """
        getter = getattr(provider, "get_kv_tensor", None)
        if not callable(getter):
            return None
        data = getter(block)
        pages = list(data) if isinstance(data, list | tuple) else [data]
        return [_snapshot(page) for page in pages]

    def fill_kv(self, provider: BackendProvider, block: KVBlock, seed: int) -> bool:
        """Write a seed-dependent pattern into ``block``; return False if not possible.

        Default: writes random bytes through the views returned by ``get_kv_tensor`` --
        torch tensors, or writable ``memoryview`` pages (host memory without torch); other
        providers (no writable views) return False and the copy/migrate data checks then
        only compare what is there.
        """
        getter = getattr(provider, "get_kv_tensor", None)
        if not callable(getter):
            return False
        data = getter(block)
        pages = list(data) if isinstance(data, list | tuple) else [data]
        if pages and all(isinstance(p, memoryview) and not p.readonly for p in pages):
            rng = random.Random(seed)
            for page in pages:
                raw = page.cast("B") if page.ndim != 1 or page.format != "B" else page
                raw[:] = rng.randbytes(raw.nbytes)
            return True
        if not pages or not all(hasattr(p, "copy_") and hasattr(p, "view") for p in pages):
            return False
        import torch

        generator = torch.Generator().manual_seed(seed)
        for page in pages:
            raw = page.view(torch.uint8)
            pattern = torch.randint(0, 256, raw.shape, generator=generator, dtype=torch.uint8)
            raw.copy_(pattern.to(raw.device))
        return True

    # ------------------------------------------------------------------ helpers

    def _dtype(self, provider: BackendProvider) -> DType:
        return provider.capability().supported_dtypes[0]

    def _kv_state(self, provider: BackendProvider) -> dict[str, int]:
        stats = provider.memory_stats()
        missing = [k for k in self.kv_tracking_keys if k not in stats]
        assert not missing, (
            f"memory_stats() lacks the KV keys {missing} (has: {sorted(stats)}); "
            "report them or set kv_tracking_keys"
        )
        return {k: int(stats[k]) for k in self.kv_tracking_keys}

    @staticmethod
    def _same(a: Any, b: Any) -> bool:
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(
                ConformanceBase._same(x, y) for x, y in zip(a, b, strict=True)
            )
        if hasattr(a, "shape") and hasattr(b, "shape"):
            import torch

            return bool(a.shape == b.shape and torch.equal(a, b))
        return bool(a == b)

    def _fill_pool(self, provider: BackendProvider, dtype: DType) -> list[KVBlock]:
        """Allocate until the pool is exhausted: doubling, then halving the request size."""
        blocks: list[KVBlock] = []
        chunk = self.fill_chunk_tokens
        growing = True
        for _ in range(self.max_fill_allocations):
            try:
                blocks.append(provider.kv_block_alloc(chunk, dtype))
            except MemoryError:
                growing = False
                if chunk == 1:
                    return blocks
                chunk //= 2
            else:
                if growing:
                    chunk *= 2
        for block in blocks:
            provider.kv_block_free(block)
        pytest.fail(
            f"the KV pool was not exhausted after {self.max_fill_allocations} allocations "
            f"(last size {chunk} tokens); give provider_factory a smaller KV pool"
        )


def stream_and_two_events(provider: BackendProvider) -> tuple[Stream, tuple[Event, Event]]:
    """A new stream and two new events; skips the test unless the provider has both."""
    cap = provider.capability()
    if not (cap.has_stream and cap.has_event):
        pytest.skip("needs has_stream and has_event")
    return provider.create_stream(), (provider.create_event(), provider.create_event())


def _snapshot(page: Any) -> Any:
    """A comparable copy of one page handle (see ProviderConformance.kv_contents)."""
    if isinstance(page, memoryview):
        return page.tobytes()
    if hasattr(page, "detach") and hasattr(page, "view"):
        import torch

        return page.detach().to("cpu").contiguous().view(torch.uint8).clone()
    tag = getattr(page, "tag", None)
    return page if tag is None else tag
