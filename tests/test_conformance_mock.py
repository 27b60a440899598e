"""The mock provider through the conformance kit, and the kit against faulty providers.

The second half proves the kit can fail: each deliberately broken provider (a mock with one
contract violation) must make the matching conformance test fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from sagellm_backend import DType, KernelKind, KVBlock, MockBackendProvider
from sagellm_backend.errors import InvalidKVBlockError, KVCacheExhaustedError
from sagellm_backend.kv.spec import KVSpec
from sagellm_backend.registry import create_backend
from sagellm_backend.testing import ProviderConformance, make_conformance_tests

# 4 KiB pages: small pools fill in a few dozen allocations.
SMALL_SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16)


class MockConformance(ProviderConformance):
    """Knobs shared by every mock configuration."""

    # The mock charges live KV pages to its budget, so ``allocated`` moves with KV too.
    kv_tracking_keys = ("kv_used_bytes", "allocated")

    def fill_kv(self, provider: Any, block: KVBlock, seed: int) -> bool:
        """The mock's pages carry content tags: stamping one simulates writing it."""
        provider.kv.storage_of(block).stamp(block.pages)
        return True


class TestMockDefaults(MockConformance):
    """``MockBackendProvider()`` as 0.1.1.x users create it (16 GiB budget, 8 MiB pages)."""

    migrate_targets = ("cpu", "mock:0")

    def make_provider(self) -> Any:
        return MockBackendProvider()


class TestMockSeedConfiguration(MockConformance):
    """The README/seed configuration, with a small budget."""

    migrate_targets = ("cpu",)

    def make_provider(self) -> Any:
        return MockBackendProvider(
            supported_dtypes=[DType.FP16, DType.BF16],
            has_collective=True,
            max_memory_mb=4,
            kv_spec=SMALL_SPEC,
        )


class TestMockMinimalDevice(MockConformance):
    """A device with nothing optional: no streams, events, collectives or offload."""

    def make_provider(self) -> Any:
        return MockBackendProvider(
            supported_dtypes=[DType.FP32],
            supported_kernels=[KernelKind.MATMUL],
            has_collective=False,
            has_stream=False,
            has_event=False,
            max_memory_mb=2,
            kv_spec=SMALL_SPEC,
            offload_device=None,
        )


class TestMockAllDtypesAndKernels(MockConformance):
    """Every protocol dtype (int4/fp8 pages too) and every kernel kind."""

    def make_provider(self) -> Any:
        return MockBackendProvider(
            supported_dtypes=list(DType),
            supported_kernels=list(KernelKind),
            max_memory_mb=8,
            kv_spec=SMALL_SPEC,
        )


# Through discovery: what sagellm-core and `create_backend("mock")` hand out.
TestMockFromEntryPoint = make_conformance_tests(
    lambda: create_backend("mock", {"max_memory_mb": 4, "kv_spec": SMALL_SPEC}),
    name="TestMockFromEntryPoint",
    kv_tracking_keys=("kv_used_bytes", "allocated"),
)


def test_make_conformance_tests_rejects_unknown_knobs() -> None:
    with pytest.raises(TypeError, match="unknown conformance attributes: migrate_target"):
        make_conformance_tests(MockBackendProvider, migrate_target=("cpu",))


def test_a_suite_without_a_provider_says_what_to_override() -> None:
    with pytest.raises(pytest.fail.Exception, match="must override make_provider"):
        ProviderConformance().make_provider()


# --------------------------------------------------------------------------- faulty providers


def small_mock(**kwargs: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"max_memory_mb": 2, "kv_spec": SMALL_SPEC}
    options.update(kwargs)
    return options


class LaxDtypes(MockBackendProvider):
    """Allocates dtypes it does not advertise (the 0.1.1.x cpu provider's bug)."""

    def kv_block_alloc(self, num_tokens: int, dtype: DType) -> KVBlock:
        block = super().kv_block_alloc(num_tokens, self.capability().supported_dtypes[0])
        return dataclasses.replace(block, dtype=dtype)


class SilentDoubleFree(MockBackendProvider):
    """Ignores invalid frees instead of raising."""

    def kv_block_free(self, block: KVBlock) -> None:
        with contextlib.suppress(InvalidKVBlockError):
            super().kv_block_free(block)


class ClaimsCollectives(MockBackendProvider):
    """Advertises collectives it cannot run (the 0.1.1.x cpu provider ran them regardless)."""

    def capability(self) -> Any:
        return dataclasses.replace(super().capability(), has_collective=True)


class FrozenClock(MockBackendProvider):
    """Events that report a constant instead of measuring."""

    def create_event(self) -> Any:
        event = super().create_event()
        event.elapsed_ms = lambda start: 0.0  # type: ignore[method-assign]
        return event


class ConstantMemory(MockBackendProvider):
    """memory_stats() that returns constants (the 0.1.1.x mock returned zeros)."""

    def memory_stats(self) -> dict[str, int]:
        return dict.fromkeys(super().memory_stats(), 0)


class WrongExhaustionError(MockBackendProvider):
    """Out of KV pages raises a RuntimeError instead of a MemoryError subclass."""

    def kv_block_alloc(self, num_tokens: int, dtype: DType) -> KVBlock:
        try:
            return super().kv_block_alloc(num_tokens, dtype)
        except KVCacheExhaustedError as exc:
            raise RuntimeError(str(exc)) from None


class LeakyExhaustion(MockBackendProvider):
    """A failed allocation keeps a page (not all-or-nothing)."""

    def kv_block_alloc(self, num_tokens: int, dtype: DType) -> KVBlock:
        try:
            return super().kv_block_alloc(num_tokens, dtype)
        except KVCacheExhaustedError:
            if num_tokens > 1:
                with contextlib.suppress(KVCacheExhaustedError):
                    super().kv_block_alloc(1, dtype)  # leaked
            raise


class ExtraKernelKind(MockBackendProvider):
    """supported_kernels claims a kind with no registered kernel."""

    def capability(self) -> Any:
        cap = super().capability()
        kinds = [*cap.supported_kernels, KernelKind.FUSION]
        return dataclasses.replace(cap, supported_kernels=list(dict.fromkeys(kinds)))


class OverwritingKernels(MockBackendProvider):
    """A duplicate kernel name silently replaces the first."""

    def register_kernel(self, name: str, impl: Callable[..., Any], **kwargs: Any) -> None:
        super().register_kernel(name, impl, replace=True, **kwargs)


class MigrateKeepsSource(MockBackendProvider):
    """migrate copies but does not release the source block."""

    def kv_block_migrate(self, block: KVBlock, target_device: str) -> KVBlock:
        new = self.kv.alloc(block.num_tokens, block.dtype, device=target_device)
        self.kv_block_copy(block, new)
        return new


class CopyDoesNothing(MockBackendProvider):
    """copy validates its arguments but moves no data."""

    def kv_block_copy(self, src: KVBlock, dst: KVBlock) -> None:
        if src.dtype != dst.dtype or dst.num_tokens < src.num_tokens:
            raise ValueError("bad copy")
        self.get_kv_tensor(src)
        self.get_kv_tensor(dst)


class AcceptsZeroTokens(MockBackendProvider):
    """num_tokens <= 0 is rounded up instead of refused."""

    def kv_block_alloc(self, num_tokens: int, dtype: DType) -> KVBlock:
        return super().kv_block_alloc(max(1, num_tokens), dtype)


class KernelKeyErrorWithoutNames(MockBackendProvider):
    """Unknown kernel raises a bare KeyError that does not help the caller."""

    def get_kernel(self, name: str) -> Callable[..., Any]:
        if name not in self.kernels:
            raise KeyError(name)
        return super().get_kernel(name)


FAULTS: list[tuple[type[MockBackendProvider], dict[str, Any], str]] = [
    (LaxDtypes, {}, "test_unadvertised_dtypes_are_refused"),
    (SilentDoubleFree, {}, "test_double_free_is_refused"),
    (ClaimsCollectives, {"has_collective": False}, "test_collectives_match_capability"),
    (FrozenClock, {}, "test_event_elapsed_measures_real_time"),
    (ConstantMemory, {}, "test_alloc_free_cycles_return_memory"),
    (WrongExhaustionError, {}, "test_oversized_request_raises_memory_error_and_changes_nothing"),
    (WrongExhaustionError, {}, "test_filling_the_pool_then_exhaustion_is_atomic"),
    (LeakyExhaustion, {}, "test_filling_the_pool_then_exhaustion_is_atomic"),
    (ExtraKernelKind, {}, "test_supported_kernels_equal_registered_kinds"),
    (OverwritingKernels, {}, "test_kernel_register_and_get"),
    (MigrateKeepsSource, {}, "test_migrate_semantics"),
    (CopyDoesNothing, {}, "test_copy_semantics"),
    (AcceptsZeroTokens, {}, "test_non_positive_num_tokens_is_refused"),
    (KernelKeyErrorWithoutNames, {}, "test_unknown_kernel_raises_key_error_naming_registered"),
]


def run_conformance_test(suite: ProviderConformance, test_name: str, factory: Any) -> None:
    """Call one conformance test the way pytest would, with the fixtures it asks for."""
    method = getattr(suite, test_name)
    provider = factory()
    kwargs: dict[str, Any] = {}
    params = method.__code__.co_varnames[1 : method.__code__.co_argcount]
    if "provider_factory" in params:
        kwargs["provider_factory"] = factory
    if "num_tokens" in params:
        kwargs["num_tokens"] = 0
    method(provider, **kwargs)


@pytest.mark.parametrize(
    ("broken", "options", "test_name"),
    FAULTS,
    ids=[f"{cls.__name__}-{name.removeprefix('test_')}" for cls, _, name in FAULTS],
)
def test_the_kit_catches_a_broken_provider(
    broken: type[MockBackendProvider], options: dict[str, Any], test_name: str
) -> None:
    suite = MockConformance()
    if broken is MigrateKeepsSource:
        suite.migrate_targets = ("cpu",)  # type: ignore[misc]

    def healthy() -> MockBackendProvider:
        return MockBackendProvider(**small_mock(**options))

    def faulty() -> MockBackendProvider:
        return broken(**small_mock(**options))

    run_conformance_test(suite, test_name, healthy)  # control: the real mock passes
    # A failed assertion, pytest.fail / "DID NOT RAISE", or an unexpected exception: each
    # is a failing test under pytest.
    with pytest.raises((Exception, pytest.fail.Exception)):
        run_conformance_test(suite, test_name, faulty)
