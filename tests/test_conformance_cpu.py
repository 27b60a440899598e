"""The cpu provider through the conformance kit (needs torch)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")

from sagellm_backend.kv.spec import KVSpec
from sagellm_backend.testing import ProviderConformance

# 4 KiB pages (2 layers x 2 kv heads x 16 dims x K/V x fp16 x 16 tokens): a 4 MiB budget
# gives the kv_block_alloc pool (a quarter of it) 256 pages, quick to fill.
SMALL_SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16)


class TestCPUProviderConformance(ProviderConformance):
    """Default options except a small KV budget, so the capacity test fills it quickly."""

    migrate_targets = ("cpu",)

    def make_provider(self) -> Any:
        from sagellm_backend.providers.cpu import create_cpu_backend

        return create_cpu_backend({"kv_memory_bytes": 4 << 20, "kv_spec": SMALL_SPEC})


class TestCPUProviderWithoutCollectives(ProviderConformance):
    """``enable_collectives=False`` must turn the matrix and the behaviour off together."""

    def make_provider(self) -> Any:
        from sagellm_backend.providers.cpu import create_cpu_backend

        return create_cpu_backend(
            kv_memory_bytes=4 << 20, kv_spec=SMALL_SPEC, enable_collectives=False
        )

    def test_capability_says_no_collectives(self, provider: Any) -> None:
        assert provider.capability().has_collective is False
