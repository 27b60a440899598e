from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from sagellm_backend.base import KVBlock
from sagellm_backend.capability import DType
from sagellm_backend.errors import (
    ConfigError,
    InvalidKVBlockError,
    InvalidStateError,
    KVCacheExhaustedError,
    UnsupportedDeviceError,
    UnsupportedDTypeError,
)
from sagellm_backend.kv.provider_kv import ProviderKV
from sagellm_backend.kv.spec import KVSpec
from sagellm_backend.kv.storage import AccountingStorage

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype=DType.FP16)
PAGE = SPEC.page_bytes


def accounting(pages: int = 8, **kw: Any) -> ProviderKV:
    return ProviderKV(
        owner="p1",
        device="mock:0",
        supported_dtypes=[DType.FP16, DType.FP32],
        storage_factory=AccountingStorage,
        memory_bytes=pages * PAGE,
        spec=SPEC,
        **kw,
    )


def state(kv: ProviderKV) -> tuple[object, ...]:
    return (kv.stats(), sorted(b.handle for b in kv.live_blocks()))


def test_importing_kv_and_mock_does_not_import_torch() -> None:
    code = (
        "import sys, sagellm_backend, sagellm_backend.kv, sagellm_backend.providers.mock;"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_alloc_pages_follow_dtype_width() -> None:
    kv = accounting()
    b16 = kv.alloc(5, DType.FP16)
    assert b16.pages == (0, 1) and b16.num_bytes == 2 * PAGE
    b32 = kv.alloc(5, "fp32")  # 2 fp32 tokens per 4-token fp16 page
    assert len(b32.pages) == 3 and b32.dtype is DType.FP32
    assert b16.owner == "p1" and b16.device == "mock:0"
    assert kv.stats()["kv_used_bytes"] == 5 * PAGE
    assert kv.stats()["num_kv_blocks"] == 2


@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_tokens(bad: int) -> None:
    with pytest.raises(ValueError, match="num_tokens"):
        accounting().alloc(bad, DType.FP16)


def test_non_int_tokens() -> None:
    with pytest.raises(TypeError):
        accounting().alloc(2.5, DType.FP16)  # type: ignore[arg-type]


def test_unsupported_dtype_names_supported() -> None:
    with pytest.raises(UnsupportedDTypeError, match="supported dtypes: fp16, fp32") as info:
        accounting().alloc(4, DType.BF16)
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnsupportedDTypeError):
        accounting().alloc(4, "float64")


def test_budget_exhaustion_is_all_or_nothing() -> None:
    kv = accounting(pages=4)
    kv.alloc(12, DType.FP16)  # 3 pages
    before = state(kv)
    with pytest.raises(KVCacheExhaustedError):
        kv.alloc(5, DType.FP16)
    assert state(kv) == before


def test_double_free_use_after_free_foreign_and_forged_blocks() -> None:
    kv = accounting()
    other = ProviderKV(
        owner="p2",
        device="mock:0",
        supported_dtypes=[DType.FP16],
        storage_factory=AccountingStorage,
        memory_bytes=8 * PAGE,
        spec=SPEC,
    )
    a = kv.alloc(4, DType.FP16)
    b = kv.alloc(4, DType.FP16)
    foreign = other.alloc(4, DType.FP16)
    kv.free(a)
    before = state(kv)
    with pytest.raises(InvalidKVBlockError, match="already freed"):
        kv.free(a)
    with pytest.raises(InvalidKVBlockError, match="already freed"):
        kv.copy(a, b)
    with pytest.raises(InvalidKVBlockError, match="belongs to provider 'p2'"):
        kv.free(foreign)
    forged = KVBlock(b.handle, b.num_tokens, b.dtype, b.device, (7,), b.owner, b.num_bytes)
    with pytest.raises(InvalidKVBlockError, match="does not match"):
        kv.free(forged)
    with pytest.raises(InvalidKVBlockError, match="never allocated"):
        kv.free(KVBlock(999, 4, DType.FP16, "mock:0", (0,), "p1"))
    with pytest.raises(InvalidKVBlockError):
        kv.free("block")  # type: ignore[arg-type]
    assert state(kv) == before


def test_handles_are_never_reused() -> None:
    kv = accounting()
    seen = set()
    for _ in range(20):
        b = kv.alloc(4, DType.FP16)
        assert b.handle not in seen
        seen.add(b.handle)
        kv.free(b)


def test_copy_checks_dtype_and_capacity() -> None:
    kv = accounting()
    a = kv.alloc(8, DType.FP16)
    small = kv.alloc(4, DType.FP16)
    wide = kv.alloc(8, DType.FP32)
    with pytest.raises(InvalidKVBlockError, match="fp16 block into a fp32"):
        kv.copy(a, wide)
    with pytest.raises(InvalidKVBlockError, match="fewer than"):
        kv.copy(a, small)
    kv.copy(a, a)  # no-op


def test_accounting_copy_and_migrate_move_content_tags() -> None:
    kv = accounting(offload={"cpu": 8 * PAGE})
    src = kv.alloc(8, DType.FP16)
    dst = kv.alloc(8, DType.FP16)
    tags = kv.storage_of(src).stamp(list(src.pages))  # type: ignore[attr-defined]
    kv.copy(src, dst)
    assert [r.tag for r in kv.tensor(dst)] == tags
    moved = kv.migrate(src, "cpu")
    assert moved.device == "cpu" and moved.handle != src.handle
    assert [r.tag for r in kv.tensor(moved)] == tags
    assert kv.stats()["offload_kv_used_bytes"] == 2 * PAGE
    back = kv.migrate(moved, "mock")  # alias of mock:0
    assert back.device == "mock:0" and [r.tag for r in kv.tensor(back)] == tags
    with pytest.raises(InvalidKVBlockError):
        kv.free(moved)


def test_migrate_errors() -> None:
    kv = accounting(offload={"cpu": 1 * PAGE})
    b = kv.alloc(8, DType.FP16)
    with pytest.raises(UnsupportedDeviceError, match="valid devices: 'mock:0', 'cpu'"):
        kv.migrate(b, "cuda:1")
    assert kv.migrate(b, "mock:0") is b
    before = state(kv)
    with pytest.raises(KVCacheExhaustedError):
        kv.migrate(b, "cpu")  # 2 pages do not fit the 1-page host budget
    assert state(kv) == before
    kv.free(b)


def test_create_manager_charges_budget() -> None:
    kv = accounting(pages=10)
    m = kv.create_manager(num_pages=6)
    assert m.pool.num_pages == 6 and isinstance(m.storage, AccountingStorage)
    s = kv.stats()
    assert s["kv_allocated_bytes"] == 6 * PAGE and s["num_kv_managers"] == 1
    with pytest.raises(KVCacheExhaustedError):
        kv.create_manager(memory_bytes=5 * PAGE)
    kv.alloc(16, DType.FP16)  # 4 pages: the rest of the budget
    with pytest.raises(KVCacheExhaustedError):
        kv.alloc(1, DType.FP16)
    m.allocate("s", list(range(9)))
    assert kv.stats()["kv_used_bytes"] == (4 + 3) * PAGE
    with pytest.raises(InvalidStateError):
        kv.release_manager(m)
    m.free("s")
    kv.release_manager(m)
    assert kv.stats()["kv_allocated_bytes"] == 4 * PAGE
    assert kv.stats()["kv_peak_bytes"] == 10 * PAGE
    kv.release_manager(m)  # a second release is a no-op
    assert kv.stats()["kv_allocated_bytes"] == 4 * PAGE
    with pytest.raises(InvalidKVBlockError, match="not created by this provider"):
        kv.release_manager(accounting(pages=2).create_manager(num_pages=1))


def test_create_manager_arguments() -> None:
    kv = accounting()
    with pytest.raises(ConfigError):
        kv.create_manager(memory_bytes=PAGE, num_pages=1)
    with pytest.raises(ConfigError):
        kv.create_manager(num_pages=-1)
    with pytest.raises(UnsupportedDTypeError):
        kv.create_manager(SPEC.with_dtype(DType.BF16))
    # invalid sizes are argument errors naming the valid values, not exhaustion (issue 19)
    with pytest.raises(ConfigError, match=r"memory_bytes must hold at least one"):
        kv.create_manager(memory_bytes=PAGE - 1)
    with pytest.raises(ConfigError, match=r"num_pages must be >= 1"):
        kv.create_manager(num_pages=0)
    with pytest.raises(ConfigError, match=r"spec must be a KVSpec"):
        kv.create_manager("llama")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="int or None"):
        kv.create_manager(num_pages=2.0)  # type: ignore[arg-type]
    with pytest.raises(KVCacheExhaustedError):
        kv.create_manager(num_pages=11)
    m = kv.create_manager()  # the whole remaining budget
    assert m.pool.num_pages == 8


def test_clear_cache_reaches_manager_pools() -> None:
    kv = accounting()
    m = kv.create_manager(num_pages=4)
    m.allocate("a", list(range(9)))
    m.mark_computed("a", 9)
    m.free("a")
    assert kv.clear_cache() == 2 and m.pool.num_cached == 0


def test_alloc_guard_applies_to_all_pools() -> None:
    calls: list[int] = []

    def guard(n: int) -> None:
        if sum(calls) + n > 3:
            raise KVCacheExhaustedError("injected")
        calls.append(n)

    kv = accounting(alloc_guard=guard)
    kv.alloc(8, DType.FP16)
    m = kv.create_manager(num_pages=4)
    m.allocate("a", [1])
    with pytest.raises(KVCacheExhaustedError, match="injected"):
        m.allocate("b", list(range(5)))
    with pytest.raises(KVCacheExhaustedError, match="injected"):
        kv.alloc(1, DType.FP16)
    assert calls == [2, 1]


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        accounting(offload={"mock:0": PAGE})
    with pytest.raises(ConfigError):
        ProviderKV(
            owner="",
            device="x",
            supported_dtypes=[DType.FP16],
            storage_factory=AccountingStorage,
            memory_bytes=PAGE,
        )


def test_budget_below_one_page_reports_at_alloc() -> None:
    kv = accounting(pages=0)
    with pytest.raises(KVCacheExhaustedError, match="less than one"):
        kv.alloc(1, DType.FP16)


# --------------------------------------------------------------------------- torch storage


@pytest.fixture
def torch_kv() -> tuple[Any, ProviderKV]:
    torch = pytest.importorskip("torch")
    from sagellm_backend.kv.storage import TorchKVStorage

    class HostAliasStorage(TorchKVStorage):
        """Lets this CPU-only test use two pools ("cpu" and "host") both in host RAM."""

        def __init__(self, spec: KVSpec, num_pages: int, device: str = "cpu") -> None:
            super().__init__(spec, num_pages, "cpu", zero=True)
            self.device = device

    kv = ProviderKV(
        owner="t1",
        device="cpu",
        supported_dtypes=[DType.FP16, DType.FP32],
        storage_factory=HostAliasStorage,
        memory_bytes=16 * PAGE,
        spec=SPEC,
        block_pool_bytes=8 * PAGE,
        offload={"host": 8 * PAGE},
    )
    return torch, kv


def fill(torch: Any, kv: ProviderKV, block: KVBlock, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for view in kv.tensor(block):
        view.copy_(torch.randn(view.shape, generator=gen).to(view.dtype))


def test_torch_block_views_are_pages_of_the_pool(torch_kv: tuple[Any, ProviderKV]) -> None:
    torch, kv = torch_kv
    b = kv.alloc(6, DType.FP16)
    views = kv.tensor(b)
    assert len(views) == 2 and tuple(views[0].shape) == (2, 2, 4, 2, 4)
    views[1][0, 1, 2] = 5.0
    data = kv.storage_of(b).data  # type: ignore[attr-defined]
    assert torch.all(data[0, 1, b.pages[1], 2] == 5.0)
    w = kv.alloc(3, DType.FP32)
    assert tuple(kv.tensor(w)[0].shape) == (2, 2, 2, 2, 4)
    # the preallocated pool is charged in full
    assert kv.stats()["kv_allocated_bytes"] == 8 * PAGE
    assert kv.stats()["kv_reserved_bytes"] == 8 * PAGE


def test_torch_copy_moves_real_bytes_and_keeps_dst_tail(
    torch_kv: tuple[Any, ProviderKV],
) -> None:
    torch, kv = torch_kv
    src = kv.alloc(6, DType.FP16)  # 1.5 pages
    dst = kv.alloc(8, DType.FP16)
    fill(torch, kv, src, 1)
    fill(torch, kv, dst, 2)
    dst_tail_before = kv.tensor(dst)[1][:, :, 2:].clone()
    kv.copy(src, dst)
    s, d = kv.tensor(src), kv.tensor(dst)
    assert torch.equal(d[0], s[0])
    assert torch.equal(d[1][:, :, :2], s[1][:, :, :2])
    assert torch.equal(d[1][:, :, 2:], dst_tail_before)


def test_torch_copy_of_fp32_blocks_on_fp16_pages(torch_kv: tuple[Any, ProviderKV]) -> None:
    torch, kv = torch_kv
    src = kv.alloc(3, DType.FP32)
    dst = kv.alloc(4, DType.FP32)
    fill(torch, kv, src, 3)
    kv.copy(src, dst)
    s, d = kv.tensor(src), kv.tensor(dst)
    assert s[0].dtype == torch.float32
    assert torch.equal(d[0], s[0]) and torch.equal(d[1][:, :, :1], s[1][:, :, :1])


def test_torch_migrate_and_back(torch_kv: tuple[Any, ProviderKV]) -> None:
    torch, kv = torch_kv
    b = kv.alloc(7, DType.FP16)
    fill(torch, kv, b, 4)
    expected = [v.clone() for v in kv.tensor(b)]
    host = kv.migrate(b, "host")
    assert host.device == "host"
    assert all(torch.equal(x, y) for x, y in zip(kv.tensor(host), expected, strict=True))
    assert kv.device_stats("cpu")["kv_used_bytes"] == 0
    with pytest.raises(InvalidKVBlockError):
        kv.tensor(b)
    back = kv.migrate(host, "cpu")
    assert all(torch.equal(x, y) for x, y in zip(kv.tensor(back), expected, strict=True))
    assert kv.device_stats("host")["kv_used_bytes"] == 0


def test_torch_manager_storage_and_budget(torch_kv: tuple[Any, ProviderKV]) -> None:
    torch, kv = torch_kv
    m = kv.create_manager(num_pages=4)
    assert tuple(m.storage.data.shape) == (2, 2, 4, 4, 2, 4)  # type: ignore[union-attr]
    assert kv.stats()["kv_allocated_bytes"] == 4 * PAGE
    m.allocate("a", list(range(6)))
    k, _ = m.storage.layer_kv(0)  # type: ignore[union-attr]
    slots = m.slot_mapping("a", 0, 6)
    k[slots] = torch.arange(6, dtype=torch.float16).view(6, 1, 1).expand(6, 2, 4)
    table = m.block_table("a")
    data = m.storage.data  # type: ignore[union-attr]
    assert data[0, 0, table[1], 1, 0, 0].item() == 5.0
    with pytest.raises(KVCacheExhaustedError):
        kv.create_manager(num_pages=13)  # 4 + 13 > 16
    kv.create_manager(num_pages=9)
    # the block pool is created lazily from what is left: 3 pages, not block_pool_bytes
    kv.alloc(12, DType.FP16)
    with pytest.raises(KVCacheExhaustedError):
        kv.alloc(1, DType.FP16)
    assert kv.stats()["kv_allocated_bytes"] == 16 * PAGE


def test_free_accepts_an_equal_copy_and_refuses_forgeries() -> None:
    """The fast path (identity) and the full validation agree on what may be freed."""
    import copy
    import dataclasses

    kv = accounting(pages=4)
    block = kv.alloc(16, DType.FP16)
    twin = copy.deepcopy(block)
    assert twin == block and twin is not block
    kv.free(twin)  # equal to the live block: validated, then freed
    with pytest.raises(InvalidKVBlockError, match="already freed"):
        kv.free(block)
    other = kv.alloc(16, DType.FP16)
    forged = dataclasses.replace(other, pages=(other.pages[0] + 1,))
    with pytest.raises(InvalidKVBlockError, match="does not match"):
        kv.free(forged)
    kv.free(other)
    assert kv.stats()["kv_used_bytes"] == 0 and kv.live_blocks() == []
