"""Conformance checks of what a provider advertises and the non-KV half of its contract.

Capability matches behaviour: the descriptor is well formed and stable, advertised dtypes
allocate and others are refused, bad ``num_tokens`` is refused, collectives and
streams/events work exactly when advertised, and the kernel registry agrees with
``supported_kernels``. Part of :class:`~sagellm_backend.testing.conformance.ProviderConformance`.
"""

from __future__ import annotations

import inspect
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from sagellm_backend.base import BackendProvider, Event, KVBlock, Stream
from sagellm_backend.capability import CapabilityDescriptor, DType, KernelKind
from sagellm_backend.testing._conformance_base import (
    COLLECTIVE_OPS,
    ConformanceBase,
    stream_and_two_events,
)

__all__ = ["DeviceChecks"]


class DeviceChecks(ConformanceBase):
    """Capability, dtype, collective, stream/event and kernel checks."""

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
        for op in COLLECTIVE_OPS:
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
        stream, (start, end) = stream_and_two_events(provider)
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
        stream, (recorded, unrecorded) = stream_and_two_events(provider)
        stream.record_event(recorded)
        with pytest.raises((RuntimeError, ValueError)):
            unrecorded.elapsed_ms(recorded)
        with pytest.raises((RuntimeError, ValueError)):
            recorded.elapsed_ms(unrecorded)

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
