"""The BackendProvider conformance suite: what "correct" means for a sageLLM backend.

Any provider -- the built-in mock/cpu/cuda ones or a third-party plugin -- runs the same
pytest suite. It checks the whole :class:`~sagellm_backend.base.BackendProvider` contract:

* **capability matches behaviour**: every advertised dtype allocates KV, every other one
  raises ``ValueError`` naming the supported ones; ``has_collective`` True means
  ``all_reduce``/``all_gather`` work with single-rank (identity) semantics, False means
  they raise ``NotImplementedError``; ``has_stream``/``has_event`` likewise;
  ``supported_kernels`` equals the kinds of the registered kernels;
* **fail-fast errors**: bad ``num_tokens`` or dtype, unknown kernels (``KeyError`` naming the
  registered ones), duplicate kernel names, non-callable kernels, unknown collective ops;
* **KV block invariants**: alloc/free cycles give the memory back, handles of live blocks
  are distinct, double free / use after free / a block of another provider raise
  ``ValueError`` and change nothing, exhaustion raises a ``MemoryError`` subclass and
  changes nothing, copy needs a large-enough block of the same dtype, migrate moves the
  block (the source is released) and refuses unknown devices, concurrent alloc/free is
  safe;
* **streams and events**: ``elapsed_ms`` measures at least a real sleep; an unrecorded
  event cannot be timed;
* **memory stats**: the required keys are non-negative ints, ``peak >= allocated``,
  ``total >= allocated``, and the KV figures rise with allocations and fall after frees.

Usage in a plugin package (pytest collects the subclass; nothing else is needed)::

    # tests/test_conformance.py
    from sagellm_backend.testing import ProviderConformance
    from my_vendor_backend import MyProvider

    class TestMyProvider(ProviderConformance):
        migrate_targets = ("cpu",)          # optional knobs, see ProviderConformance

        def make_provider(self):
            return MyProvider(pool_mb=64)

or in one line, ``TestMyProvider = make_conformance_tests(lambda: MyProvider(pool_mb=64))``.
A ``provider_factory`` pytest fixture may be overridden instead of ``make_provider`` when
the provider needs other fixtures (``tmp_path``, a process group, ...).

The factory is called once per test (twice where a second, foreign provider is needed), so
each test starts from a fresh provider; keep its KV pool small so that the capacity test
fills it quickly. Class attributes tune what the suite expects (see
:class:`ProviderConformance`); hook methods (:meth:`~ProviderConformance.make_tensor`,
:meth:`~ProviderConformance.kv_contents`, ...) adapt it to a provider's tensor type.

This module imports pytest (a test dependency) but never torch: the default tensor hook
imports torch only when the provider is a torch provider.
"""

from __future__ import annotations

import inspect
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

from sagellm_backend.base import BackendProvider, Event, KVBlock, Stream
from sagellm_backend.capability import CapabilityDescriptor, DType, KernelKind

__all__ = ["ProviderConformance", "make_conformance_tests"]

ProviderFactory = Callable[[], BackendProvider]

_COLLECTIVE_OPS = ("sum", "avg", "max", "min", "product")


def _num(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ProviderConformance:
    """Base class of the conformance suite; subclass it and override :meth:`make_provider`.

    Attributes (override in the subclass to match the provider):
        kv_tracking_keys: ``memory_stats()`` keys that must rise with KV allocations and
            return to their value after the blocks are freed (``kv_used_bytes`` is part of
            the sagellm-backend contract; the mock also moves ``allocated``).
        required_memory_keys: keys every ``memory_stats()`` must have (non-negative ints).
        migrate_targets: devices ``kv_block_migrate`` must accept; None means the device of
            the block itself (a same-device move).
        unsupported_migrate_target: a device string that must be refused with ValueError.
        event_sleep_ms: the real sleep the event-timing test measures.
        max_fill_allocations: bound on allocations while filling the KV pool; the capacity
            test fails (asking for a smaller pool) if the pool is not full by then.
        fill_chunk_tokens: first allocation size (tokens) while filling the pool.
        kv_tokens: tokens per block in the ordinary KV tests.
    """

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
                ProviderConformance._same(x, y) for x, y in zip(a, b, strict=True)
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

    # ------------------------------------------------------------------ the contract

    def test_is_a_backend_provider(self, provider: BackendProvider) -> None:
        """The provider structurally satisfies the Protocol."""
        assert isinstance(provider, BackendProvider)

    def test_capability_is_well_formed_and_stable(self, provider: BackendProvider) -> None:
        """capability() is a protocol descriptor with typed fields; the matrix is stable."""
        cap = provider.capability()
        assert isinstance(cap, CapabilityDescriptor)
        assert cap.supported_dtypes, "a provider must support at least one dtype"
        assert all(isinstance(d, DType) for d in cap.supported_dtypes)
        assert len(set(cap.supported_dtypes)) == len(cap.supported_dtypes)
        assert all(isinstance(k, KernelKind) for k in cap.supported_kernels)
        for flag in ("has_stream", "has_event", "has_collective", "has_graph_exec"):
            assert isinstance(getattr(cap, flag), bool), flag
        again = provider.capability()
        assert again.supported_dtypes == cap.supported_dtypes
        assert again.supported_kernels == cap.supported_kernels
        assert (again.has_stream, again.has_event, again.has_collective) == (
            cap.has_stream,
            cap.has_event,
            cap.has_collective,
        )

    # dtypes ---------------------------------------------------------------------------

    def test_every_advertised_dtype_allocates(self, provider: BackendProvider) -> None:
        """kv_block_alloc works for each advertised dtype and returns a well-formed block."""
        before = self._kv_state(provider)
        for dtype in provider.capability().supported_dtypes:
            block = provider.kv_block_alloc(self.kv_tokens, dtype)
            assert isinstance(block, KVBlock)
            assert block.dtype == dtype and block.num_tokens == self.kv_tokens
            assert isinstance(block.device, str) and block.device
            provider.kv_block_free(block)
        assert self._kv_state(provider) == before

    def test_unadvertised_dtypes_are_refused(self, provider: BackendProvider) -> None:
        """A dtype outside supported_dtypes raises ValueError naming the supported ones."""
        supported = provider.capability().supported_dtypes
        others = [d for d in DType if d not in supported]
        if not others:
            pytest.skip("the provider advertises every protocol dtype")
        before = self._kv_state(provider)
        for dtype in others:
            with pytest.raises(ValueError) as info:
                provider.kv_block_alloc(self.kv_tokens, dtype)
            message = str(info.value)
            assert any(d.value in message for d in supported), (
                f"the error for {dtype.value} should name the supported dtypes: {message!r}"
            )
        assert self._kv_state(provider) == before

    @pytest.mark.parametrize("dtype", ["not-a-dtype", None, 16])
    def test_garbage_dtype_is_refused(self, provider: BackendProvider, dtype: Any) -> None:
        """Something that is not a dtype raises ValueError or TypeError, allocating nothing."""
        before = self._kv_state(provider)
        with pytest.raises((ValueError, TypeError)):
            provider.kv_block_alloc(self.kv_tokens, dtype)
        assert self._kv_state(provider) == before

    @pytest.mark.parametrize("num_tokens", [0, -1, -128])
    def test_non_positive_num_tokens_is_refused(
        self, provider: BackendProvider, num_tokens: int
    ) -> None:
        """num_tokens <= 0 raises ValueError and allocates nothing."""
        before = self._kv_state(provider)
        with pytest.raises(ValueError):
            provider.kv_block_alloc(num_tokens, self._dtype(provider))
        assert self._kv_state(provider) == before

    @pytest.mark.parametrize("num_tokens", [1.5, "16", None])
    def test_non_integer_num_tokens_is_refused(
        self, provider: BackendProvider, num_tokens: Any
    ) -> None:
        """A non-int num_tokens raises TypeError or ValueError."""
        with pytest.raises((TypeError, ValueError)):
            provider.kv_block_alloc(num_tokens, self._dtype(provider))

    # collectives ----------------------------------------------------------------------

    def test_collectives_match_capability(self, provider: BackendProvider) -> None:
        """has_collective True: identity semantics on one rank; False: NotImplementedError."""
        values = [1.0, -2.0, 3.5, 4.0]
        if not provider.capability().has_collective:
            with pytest.raises(NotImplementedError):
                provider.all_reduce(self.make_tensor(provider, values), "sum")
            with pytest.raises(NotImplementedError):
                provider.all_gather(self.make_tensor(provider, values))
            return
        for op in _COLLECTIVE_OPS:
            tensor = self.make_tensor(provider, values)
            reduce: Callable[[Any, str], Any] = provider.all_reduce
            assert reduce(tensor, op) is None, "all_reduce works in place and returns None"
            assert self.tensor_values(tensor) == values, f"all_reduce({op}) on one rank"
        tensor = self.make_tensor(provider, values)
        gathered = provider.all_gather(tensor)
        assert gathered is not tensor, "all_gather returns a new tensor"
        assert self.tensor_values(gathered) == values
        assert self.tensor_values(tensor) == values

    def test_unknown_collective_op_is_refused(self, provider: BackendProvider) -> None:
        """all_reduce with an op outside sum/avg/max/min/product raises ValueError."""
        if not provider.capability().has_collective:
            pytest.skip("has_collective is False (checked by test_collectives_match_capability)")
        with pytest.raises(ValueError):
            provider.all_reduce(self.make_tensor(provider, [1.0, 2.0]), "median")

    # streams and events ---------------------------------------------------------------

    def test_streams_and_events_match_capability(self, provider: BackendProvider) -> None:
        """create_stream/create_event work when advertised, else raise NotImplementedError."""
        cap = provider.capability()
        if cap.has_stream:
            stream = provider.create_stream()
            assert isinstance(stream, Stream)
            stream.synchronize()
        else:
            with pytest.raises(NotImplementedError):
                provider.create_stream()
        if cap.has_event:
            assert isinstance(provider.create_event(), Event)
        else:
            with pytest.raises(NotImplementedError):
                provider.create_event()

    def test_event_elapsed_measures_real_time(self, provider: BackendProvider) -> None:
        """elapsed_ms between two recorded events is at least a real sleep between them."""
        stream, (start, end) = _stream_and_two_events(provider)
        stream.record_event(start)
        time.sleep(self.event_sleep_ms / 1000.0)
        stream.record_event(end)
        end.synchronize()
        elapsed = end.elapsed_ms(start)
        assert isinstance(elapsed, float)
        assert elapsed >= self.event_sleep_ms * 0.95, (elapsed, self.event_sleep_ms)
        assert elapsed < self.event_sleep_ms + 5000.0, elapsed

    def test_unrecorded_event_cannot_be_timed(self, provider: BackendProvider) -> None:
        """elapsed_ms involving a never-recorded event raises instead of inventing a number."""
        stream, (recorded, unrecorded) = _stream_and_two_events(provider)
        stream.record_event(recorded)
        with pytest.raises((RuntimeError, ValueError)):
            unrecorded.elapsed_ms(recorded)
        with pytest.raises((RuntimeError, ValueError)):
            recorded.elapsed_ms(unrecorded)

    # KV blocks -------------------------------------------------------------------------

    def test_alloc_free_cycles_return_memory(self, provider: BackendProvider) -> None:
        """KV figures rise with every allocation and return exactly after the frees."""
        dtype = self._dtype(provider)
        baseline = self._kv_state(provider)
        blocks = []
        previous = baseline
        for tokens in (1, 16, 17, 100):
            blocks.append(provider.kv_block_alloc(tokens, dtype))
            now = self._kv_state(provider)
            for key in self.kv_tracking_keys:
                assert now[key] > previous[key], f"{key} did not rise on alloc({tokens})"
            previous = now
        for block in blocks:
            provider.kv_block_free(block)
        assert self._kv_state(provider) == baseline
        for _ in range(50):
            provider.kv_block_free(provider.kv_block_alloc(self.kv_tokens, dtype))
        assert self._kv_state(provider) == baseline

    def test_live_blocks_have_distinct_handles(self, provider: BackendProvider) -> None:
        """No two live blocks share a handle."""
        dtype = self._dtype(provider)
        blocks = [provider.kv_block_alloc(16, dtype) for _ in range(20)]
        assert len({b.handle for b in blocks}) == len(blocks)
        for block in blocks:
            provider.kv_block_free(block)

    def test_double_free_is_refused(self, provider: BackendProvider) -> None:
        """A second free raises ValueError and changes nothing."""
        dtype = self._dtype(provider)
        keep = provider.kv_block_alloc(16, dtype)
        block = provider.kv_block_alloc(self.kv_tokens, dtype)
        provider.kv_block_free(block)
        before = self._kv_state(provider)
        with pytest.raises(ValueError):
            provider.kv_block_free(block)
        assert self._kv_state(provider) == before
        provider.kv_block_free(keep)

    def test_foreign_and_forged_blocks_are_refused(
        self, provider: BackendProvider, provider_factory: ProviderFactory
    ) -> None:
        """Blocks of another provider instance, or made up, raise ValueError."""
        dtype = self._dtype(provider)
        other = provider_factory()
        try:
            theirs = other.kv_block_alloc(self.kv_tokens, dtype)
            mine = provider.kv_block_alloc(self.kv_tokens, dtype)
            before = self._kv_state(provider)
            with pytest.raises(ValueError):
                provider.kv_block_free(theirs)
            forged = KVBlock(
                handle=mine.handle + 10**9,
                num_tokens=self.kv_tokens,
                dtype=dtype,
                device=mine.device,
                pages=mine.pages,
                owner=mine.owner,
                num_bytes=mine.num_bytes,
            )
            with pytest.raises(ValueError):
                provider.kv_block_free(forged)
            assert self._kv_state(provider) == before
            other.kv_block_free(theirs)  # still valid for its owner
            provider.kv_block_free(mine)
        finally:
            close = getattr(other, "close", None)
            if callable(close):
                close()

    def test_use_after_free_is_refused(self, provider: BackendProvider) -> None:
        """Copying from/to or migrating a freed block raises ValueError."""
        dtype = self._dtype(provider)
        live = provider.kv_block_alloc(self.kv_tokens, dtype)
        dead = provider.kv_block_alloc(self.kv_tokens, dtype)
        provider.kv_block_free(dead)
        with pytest.raises(ValueError):
            provider.kv_block_copy(dead, live)
        with pytest.raises(ValueError):
            provider.kv_block_copy(live, dead)
        with pytest.raises(ValueError):
            provider.kv_block_migrate(dead, live.device)
        provider.kv_block_free(live)

    def test_oversized_request_raises_memory_error_and_changes_nothing(
        self, provider: BackendProvider
    ) -> None:
        """A request far beyond capacity raises a MemoryError subclass, all or nothing."""
        dtype = self._dtype(provider)
        keep = provider.kv_block_alloc(16, dtype)
        before = self._kv_state(provider)
        with pytest.raises(MemoryError):
            provider.kv_block_alloc(2**40, dtype)
        assert self._kv_state(provider) == before
        provider.kv_block_free(provider.kv_block_alloc(self.kv_tokens, dtype))
        provider.kv_block_free(keep)

    def test_filling_the_pool_then_exhaustion_is_atomic(self, provider: BackendProvider) -> None:
        """Fill the pool; one more token fails cleanly; freeing makes room again."""
        dtype = self._dtype(provider)
        baseline = self._kv_state(provider)
        blocks = self._fill_pool(provider, dtype)
        assert blocks, "the pool could not hold a single token"
        full = self._kv_state(provider)
        with pytest.raises(MemoryError):
            provider.kv_block_alloc(1, dtype)
        assert self._kv_state(provider) == full
        largest = max(blocks, key=lambda b: b.num_tokens)
        provider.kv_block_free(largest)
        blocks.remove(largest)
        again = provider.kv_block_alloc(largest.num_tokens, dtype)
        assert self._kv_state(provider) == full
        blocks.append(again)
        for block in blocks:
            provider.kv_block_free(block)
        assert self._kv_state(provider) == baseline

    def test_copy_semantics(self, provider: BackendProvider) -> None:
        """Copy into a large-enough block of the same dtype; refuse smaller or other-dtype.

        The data check compares every page but the last (a partial last page is copied
        only up to ``src.num_tokens``, whose position inside the page is layout-specific).
        """
        supported = provider.capability().supported_dtypes
        dtype = supported[0]
        tokens = self.kv_tokens * 4
        src = provider.kv_block_alloc(tokens, dtype)
        dst = provider.kv_block_alloc(tokens, dtype)
        bigger = provider.kv_block_alloc(tokens * 2, dtype)
        small = provider.kv_block_alloc(max(1, tokens // 8), dtype)
        filled = self.fill_kv(provider, src, seed=1) and self.fill_kv(provider, dst, seed=2)
        before_src = self.kv_contents(provider, src)
        if filled and before_src is not None:
            before_dst = self.kv_contents(provider, dst)
            assert not self._same(before_src[:-1], before_dst[:-1] if before_dst else None), (
                "fill_kv() did not change the block's contents (get_kv_tensor returned a copy?)"
            )
        before = self._kv_state(provider)
        provider.kv_block_copy(src, dst)
        provider.kv_block_copy(src, bigger)
        assert self._kv_state(provider) == before, "a copy allocates nothing"
        after_src = self.kv_contents(provider, src)
        after_dst = self.kv_contents(provider, dst)
        after_big = self.kv_contents(provider, bigger)
        if before_src is not None and after_src is not None:
            assert self._same(after_src, before_src), "kv_block_copy changed its source"
            assert after_dst is not None and after_big is not None
            body = len(after_src) - 1
            assert self._same(after_dst[:body], after_src[:body]), "copy did not move the data"
            assert self._same(after_big[:body], after_src[:body]), "copy did not move the data"
        with pytest.raises(ValueError):
            provider.kv_block_copy(src, small)
        if len(supported) > 1:
            other = provider.kv_block_alloc(tokens * 2, supported[1])
            with pytest.raises(ValueError):
                provider.kv_block_copy(src, other)
            provider.kv_block_free(other)
        for block in (src, dst, bigger, small):
            provider.kv_block_free(block)

    def test_migrate_semantics(self, provider: BackendProvider) -> None:
        """Migrate keeps tokens, dtype and data; a real move releases the source block."""
        dtype = self._dtype(provider)
        baseline = self._kv_state(provider)
        probe = provider.kv_block_alloc(self.kv_tokens, dtype)
        targets = self.migrate_targets if self.migrate_targets is not None else (probe.device,)
        provider.kv_block_free(probe)
        for target in targets:
            block = provider.kv_block_alloc(self.kv_tokens * 4, dtype)
            self.fill_kv(provider, block, seed=3)
            data = self.kv_contents(provider, block)
            moved = provider.kv_block_migrate(block, target)
            assert isinstance(moved, KVBlock)
            assert moved.device == target, (moved.device, target)
            assert (moved.num_tokens, moved.dtype) == (block.num_tokens, block.dtype)
            moved_data = self.kv_contents(provider, moved)
            if data is not None and moved_data is not None:
                assert self._same(moved_data, data), f"migrate to {target} changed the data"
            if moved.handle != block.handle:
                with pytest.raises(ValueError):
                    provider.kv_block_free(block)  # the source was released
            provider.kv_block_free(moved)
        assert self._kv_state(provider) == baseline

    def test_migrate_to_an_unknown_device_is_refused(self, provider: BackendProvider) -> None:
        """An unsupported target raises ValueError; the block stays valid."""
        dtype = self._dtype(provider)
        block = provider.kv_block_alloc(self.kv_tokens, dtype)
        before = self._kv_state(provider)
        with pytest.raises(ValueError):
            provider.kv_block_migrate(block, self.unsupported_migrate_target)
        assert self._kv_state(provider) == before
        provider.kv_block_free(block)

    def test_concurrent_alloc_free(self, provider: BackendProvider) -> None:
        """Threads allocating and freeing at once lose nothing and share no handle."""
        dtype = self._dtype(provider)
        baseline = self._kv_state(provider)
        errors: list[BaseException] = []
        handles: list[set[int]] = []

        def work() -> None:
            seen: set[int] = set()
            try:
                for i in range(100):
                    block = provider.kv_block_alloc(1 + (i % 3) * 16, dtype)
                    seen.add(block.handle)
                    provider.kv_block_free(block)
            except BaseException as exc:  # reported below
                errors.append(exc)
            handles.append(seen)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        assert self._kv_state(provider) == baseline

    # kernels --------------------------------------------------------------------------

    def test_kernel_register_and_get(self, provider: BackendProvider) -> None:
        """A registered kernel comes back; a duplicate name without replace is refused."""
        name = f"conformance_kernel_{uuid.uuid4().hex[:8]}"

        def impl(x: Any) -> Any:
            return x

        provider.register_kernel(name, impl)
        assert provider.get_kernel(name) is impl
        with pytest.raises(ValueError):
            provider.register_kernel(name, lambda x: x)
        assert provider.get_kernel(name) is impl

    def test_unknown_kernel_raises_key_error_naming_registered(
        self, provider: BackendProvider
    ) -> None:
        """get_kernel of an unknown name raises KeyError listing what is registered."""
        name = f"conformance_known_{uuid.uuid4().hex[:8]}"
        provider.register_kernel(name, lambda x: x)
        with pytest.raises(KeyError) as info:
            provider.get_kernel("definitely_not_a_kernel")
        assert name in str(info.value)

    def test_non_callable_kernel_is_refused(self, provider: BackendProvider) -> None:
        """register_kernel with a non-callable raises TypeError or ValueError."""
        with pytest.raises((TypeError, ValueError)):
            provider.register_kernel(f"bad_{uuid.uuid4().hex[:8]}", 42)  # type: ignore[arg-type]

    def test_supported_kernels_equal_registered_kinds(self, provider: BackendProvider) -> None:
        """capability().supported_kernels is exactly the kinds of the registered kernels."""
        kinds = self.kernel_kinds(provider)
        if kinds is None:
            pytest.fail(
                "the provider exposes no kernel registry (provider.kernels.kinds()); "
                "override kernel_kinds() to report the kinds of its registered kernels"
            )
        assert set(provider.capability().supported_kernels) == kinds

    def test_registering_a_new_kind_updates_capability(self, provider: BackendProvider) -> None:
        """A kernel registered with ``kind=`` shows up in supported_kernels."""
        try:
            parameters = inspect.signature(provider.register_kernel).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins without signature
            parameters = {}  # type: ignore[assignment]
        if "kind" not in parameters:
            pytest.skip("register_kernel takes no kind= (0.1.1.2 signature)")
        missing = [k for k in KernelKind if k not in provider.capability().supported_kernels]
        if not missing:
            pytest.skip("every KernelKind is already supported")
        provider.register_kernel(  # type: ignore[call-arg]
            f"conformance_{missing[0].value}_{uuid.uuid4().hex[:8]}", lambda x: x, kind=missing[0]
        )
        assert missing[0] in provider.capability().supported_kernels

    # memory ---------------------------------------------------------------------------

    def test_memory_stats_keys_and_consistency(self, provider: BackendProvider) -> None:
        """Required keys are non-negative ints; peak >= allocated; total >= allocated."""
        dtype = self._dtype(provider)
        stats = provider.memory_stats()
        missing = [k for k in self.required_memory_keys if k not in stats]
        assert not missing, f"memory_stats() lacks {missing} (has: {sorted(stats)})"
        for key, value in stats.items():
            assert _num(value) and value >= 0, f"memory_stats()[{key!r}] = {value!r}"
        blocks = [provider.kv_block_alloc(self.kv_tokens * 4, dtype) for _ in range(4)]
        during = provider.memory_stats()
        assert during["peak"] >= during["allocated"]
        assert during["total"] >= during["allocated"]
        assert during["peak"] >= stats["peak"], "peak never decreases"
        for block in blocks:
            provider.kv_block_free(block)
        after = provider.memory_stats()
        assert after["peak"] >= during["peak"], "peak never decreases"

    def test_clear_cache_keeps_live_blocks(self, provider: BackendProvider) -> None:
        """clear_cache releases only unreferenced memory: live blocks stay valid."""
        dtype = self._dtype(provider)
        block = provider.kv_block_alloc(self.kv_tokens, dtype)
        before = self._kv_state(provider)
        provider.clear_cache()
        assert self._kv_state(provider) == before
        provider.kv_block_free(block)


def _stream_and_two_events(provider: BackendProvider) -> tuple[Stream, tuple[Event, Event]]:
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


def make_conformance_tests(
    factory: ProviderFactory, *, name: str = "TestProviderConformance", **attributes: Any
) -> type[ProviderConformance]:
    """Build a pytest-collectable conformance class for ``factory``.

    Args:
        factory: zero-argument callable returning a fresh provider.
        name: the class name (must start with ``Test`` for pytest to collect it).
        **attributes: overrides of :class:`ProviderConformance` attributes, e.g.
            ``migrate_targets=("cpu",)``.

    Example:
        >>> TestMyProvider = make_conformance_tests(lambda: MyProvider())  # doctest: +SKIP
    """
    unknown = [k for k in attributes if not hasattr(ProviderConformance, k)]
    if unknown:
        raise TypeError(f"unknown conformance attributes: {', '.join(sorted(unknown))}")

    @pytest.fixture
    def provider_factory(self: ProviderConformance) -> ProviderFactory:
        return factory

    namespace: dict[str, Any] = {"provider_factory": provider_factory, **attributes}
    return type(name, (ProviderConformance,), namespace)
