from __future__ import annotations

import pytest

from sagellm_backend.capability import DType
from sagellm_backend.errors import InvalidKVBlockError
from sagellm_backend.kv.spec import KVSpec
from sagellm_backend.kv.storage import AccountingPages, AccountingStorage

torch = pytest.importorskip("torch")
from sagellm_backend.kv.storage import TorchKVStorage  # noqa: E402

SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=4, block_size=4, dtype=DType.FP16)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype", "last"),
    [
        (DType.FP16, "float16", 4),
        (DType.BF16, "bfloat16", 4),
        (DType.FP32, "float32", 4),
        (DType.FP8, "float8_e4m3fn", 4),
        (DType.INT8, "int8", 4),
        (DType.INT4, "uint8", 2),
    ],
)
def test_shape_dtype_and_nbytes(dtype: DType, torch_dtype: str, last: int) -> None:
    spec = SPEC.with_dtype(dtype)
    st = TorchKVStorage(spec, 5)
    assert tuple(st.data.shape) == (3, 2, 5, 4, 2, last)
    assert st.data.dtype == getattr(torch, torch_dtype)
    assert st.nbytes == 5 * spec.page_bytes
    assert st.device == "cpu" and st.preallocated


def test_layer_kv_views_are_contiguous_slots_of_the_pool() -> None:
    st = TorchKVStorage(SPEC, 6, zero=True)
    k, v = st.layer_kv(1)
    assert k.shape == (24, 2, 4) and k.is_contiguous() and v.is_contiguous()
    table = [4, 2]  # a sequence on pages 4 then 2: token 5 -> page 2, offset 1
    slot = table[5 // 4] * 4 + 5 % 4
    k[slot] = 7.0
    v[slot] = -3.0
    assert torch.all(st.data[1, 0, 2, 1] == 7.0)
    assert torch.all(st.data[1, 1, 2, 1] == -3.0)
    assert st.data.count_nonzero() == 2 * 2 * 4
    with pytest.raises(IndexError):
        st.layer_kv(3)


def test_copy_read_write_pages_move_real_bytes() -> None:
    st = TorchKVStorage(SPEC, 6)
    st.data.copy_(torch.randn(st.data.shape).to(torch.float16))
    before = st.read_pages([0, 1])
    st.copy_pages([0, 1], [4, 5])
    assert torch.equal(st.read_pages([4, 5]), before)
    other = TorchKVStorage(SPEC, 3, zero=True)
    other.write_pages([2, 0], st.read_pages([1, 0]))
    assert torch.equal(other.data[:, :, 2], st.data[:, :, 1])
    assert torch.equal(other.data[:, :, 0], st.data[:, :, 0])
    assert other.data[:, :, 1].count_nonzero() == 0


def test_partial_last_page_copy_keeps_the_rest() -> None:
    st = TorchKVStorage(SPEC, 4, zero=True)
    st.data[:, :, 0] = 1.0
    st.data[:, :, 1] = 2.0
    st.data[:, :, 3] = 9.0
    st.copy_pages([0, 1], [2, 3], tail_tokens=3)
    assert torch.all(st.data[:, :, 2] == 1.0)
    assert torch.all(st.data[:, :, 3, :3] == 2.0)
    assert torch.all(st.data[:, :, 3, 3] == 9.0)  # the 4th token of the last page kept
    with pytest.raises(InvalidKVBlockError):
        st.copy_pages([0], [1], tail_tokens=5)


def test_dtype_views_share_memory() -> None:
    st = TorchKVStorage(SPEC, 2, zero=True)
    v32 = st.dtype_view(DType.FP32)
    assert tuple(v32.shape) == (3, 2, 2, SPEC.tokens_per_page(DType.FP32), 2, 4)
    v32[0, 0, 1, 0, 0, 0] = 1.5
    raw = st.data[0, 0, 1].reshape(-1)[:2].view(torch.float32)
    assert raw.item() == 1.5
    v8 = st.dtype_view(DType.INT8)
    assert v8.shape[3] == 8 and v8.data_ptr() == st.data.data_ptr()
    pages = st.page_views([1], DType.FP32)
    assert pages[0][0, 0, 0, 0, 0].item() == 1.5


def test_bad_arguments() -> None:
    st = TorchKVStorage(SPEC, 2)
    with pytest.raises(InvalidKVBlockError):
        st.copy_pages([0], [2])
    with pytest.raises(InvalidKVBlockError):
        st.copy_pages([0, 1], [1])
    with pytest.raises(InvalidKVBlockError):
        st.copy_pages([0, 1], [1, 1])
    with pytest.raises(InvalidKVBlockError, match="expected"):
        st.write_pages([0], torch.zeros(3, 2, 1, 4, 2, 4))  # fp32, not fp16
    with pytest.raises(TypeError):
        st.write_pages([0], [1, 2])
    with pytest.raises(ValueError):
        TorchKVStorage(SPEC, 0)


def test_accounting_storage_tags_follow_copies() -> None:
    st = AccountingStorage(SPEC, 4)
    assert not st.preallocated and st.nbytes == 4 * SPEC.page_bytes
    tags = st.stamp([0, 1])
    st.copy_pages([0, 1], [2, 3])
    assert st.tags([2, 3]) == tags
    snap = st.read_pages([3])
    assert isinstance(snap, AccountingPages)
    other = AccountingStorage(SPEC, 2, "cpu")
    other.write_pages([1], snap)
    assert other.tags([1]) == [tags[1]]
    refs = other.page_views([1], DType.FP32)
    assert refs[0].page == 1 and refs[0].num_tokens == 2 and refs[0].tag == tags[1]
    with pytest.raises(InvalidKVBlockError):
        st.copy_pages([0], [4])
    with pytest.raises(InvalidKVBlockError):
        other.write_pages([0, 1], snap)
