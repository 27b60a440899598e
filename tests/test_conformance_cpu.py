"""The cpu provider through the conformance kit: with torch, and on host pages (no torch).

The host-page classes run everywhere (``use_torch=False`` picks host memory even where
torch is installed, and a base install has no torch at all); the torch classes need torch.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from sagellm_backend.kv.spec import KVSpec
from sagellm_backend.testing import ProviderConformance

# 4 KiB pages (2 layers x 2 kv heads x 16 dims x K/V x fp16 x 16 tokens): a 4 MiB budget
# gives the kv_block_alloc pool (a quarter of it) 256 pages, quick to fill.
SMALL_SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16)
needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch is not installed"
)


@needs_torch
class TestCPUProviderConformance(ProviderConformance):
    """Default options except a small KV budget, so the capacity test fills it quickly."""

    migrate_targets = ("cpu",)

    def make_provider(self) -> Any:
        from sagellm_backend.providers.cpu import create_cpu_backend

        return create_cpu_backend({"kv_memory_bytes": 4 << 20, "kv_spec": SMALL_SPEC})


@needs_torch
class TestCPUProviderWithoutCollectives(ProviderConformance):
    """``enable_collectives=False`` must turn the matrix and the behaviour off together."""

    def make_provider(self) -> Any:
        from sagellm_backend.providers.cpu import create_cpu_backend

        return create_cpu_backend(
            kv_memory_bytes=4 << 20, kv_spec=SMALL_SPEC, enable_collectives=False
        )

    def test_capability_says_no_collectives(self, provider: Any) -> None:
        assert provider.capability().has_collective is False


class TestCPUHostProviderConformance(ProviderConformance):
    """The cpu provider on host pages (bytearray), as on a base install without torch."""

    migrate_targets = ("cpu",)

    def make_provider(self) -> Any:
        from sagellm_backend.providers.cpu import create_cpu_backend

        return create_cpu_backend(
            {"kv_memory_bytes": 4 << 20, "kv_spec": SMALL_SPEC, "use_torch": False}
        )

    def test_runs_without_torch(self, provider: Any) -> None:
        assert provider.uses_torch is False
        assert provider.capability().supported_kernels == []


class TestCPUHostProviderWithoutCollectives(ProviderConformance):
    """Host pages with ``enable_collectives=False``."""

    def make_provider(self) -> Any:
        from sagellm_backend.providers.cpu import create_cpu_backend

        return create_cpu_backend(
            kv_memory_bytes=4 << 20, kv_spec=SMALL_SPEC, enable_collectives=False, use_torch=False
        )
