"""oneDNN-prepacked linears (``engine/runners/_prepack.py``): results and bounded shapes."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from sagellm_backend.engine.runners import _prepack  # noqa: E402
from sagellm_backend.engine.runners._prepack import (  # noqa: E402
    PACK_MAX_ROWS,
    PACKED_ROW_BUCKETS,
    bucket_rows,
    pack_weight,
    packable_dtypes,
    packed_linear,
    prepack_available,
)

needs_onednn = pytest.mark.skipif(not prepack_available(), reason="torch without oneDNN")


def test_buckets_cover_every_packed_row_count_with_little_padding() -> None:
    assert list(PACKED_ROW_BUCKETS) == sorted(set(PACKED_ROW_BUCKETS))
    assert PACKED_ROW_BUCKETS[-1] == PACK_MAX_ROWS
    for rows in range(1, PACK_MAX_ROWS + 1):
        padded = bucket_rows(rows)
        assert padded in PACKED_ROW_BUCKETS
        assert rows <= padded <= rows + 7
    assert [bucket_rows(r) for r in (1, 8, 9, 16, 17, 63, 64)] == [1, 8, 16, 16, 24, 64, 64]


@needs_onednn
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear_for_every_row_count(bias: bool, dtype: str) -> None:
    dt = getattr(torch, dtype)
    if dt not in packable_dtypes():
        pytest.skip(f"oneDNN has no {dtype} kernels for this CPU")
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 24, generator=gen).to(dt)
    b = torch.randn(40, generator=gen).to(dt) if bias else None
    packed = pack_weight(weight, b)
    for rows in [*range(1, 20), 31, 33, 64, 65, 130]:
        x = torch.randn(rows, 24, generator=gen).to(dt)
        got = packed_linear(x, packed, weight, b)
        assert got.shape == (rows, 40) and got.dtype == dt
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, b))
    x3 = torch.randn(2, 5, 24, generator=gen).to(dt)  # leading dims; 10 rows padded to 16
    got3 = packed_linear(x3, packed, weight, b)
    torch.testing.assert_close(got3, torch.nn.functional.linear(x3, weight, b))


def _spy_onednn(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, record the row count of every input oneDNN's linear op gets."""
    rows: list[int] = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(x: Any, *args: Any) -> Any:
        rows.append(int(x.shape[0]))
        return real(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    return rows


@needs_onednn
def test_only_bucket_sizes_reach_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN caches a primitive per input shape: serving must not create new ones."""
    weight = torch.randn(16, 8)
    packed = pack_weight(weight)  # its primitives were built here, before the spy
    seen = _spy_onednn(monkeypatch)
    plain = _prepack._PLAIN_ROWS[(16, 8, torch.float32)]  # timed faster with F.linear here
    assert plain <= {1, 2, 3}
    for rows in range(1, 200):
        packed_linear(torch.randn(rows, 8), packed, weight, None)
    # rows > PACK_MAX_ROWS, and the small row counts F.linear won, went to F.linear
    assert set(seen) == set(PACKED_ROW_BUCKETS) - plain
    assert len(seen) == PACK_MAX_ROWS - len(plain)


@needs_onednn
def test_pack_weight_builds_each_shape_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy_onednn(monkeypatch)
    monkeypatch.setattr(_prepack, "_BUILT", set())
    monkeypatch.setattr(_prepack, "_PLAIN_ROWS", {})
    pack_weight(torch.randn(12, 6))
    timed = [rows for rows in (1, 2, 3) for _ in range(6)]  # 1 untimed + best of 5, each
    assert calls == [*PACKED_ROW_BUCKETS, *timed]
    assert set(_prepack._PLAIN_ROWS) == {(12, 6, torch.float32)}
    plain = _prepack._PLAIN_ROWS[(12, 6, torch.float32)]
    pack_weight(torch.randn(12, 6))  # same shape, another layer: nothing to build
    pack_weight(torch.randn(12, 6), torch.zeros(12))  # with a bias: its own primitives
    # timed once per shape; row counts F.linear serves get no primitive
    with_bias = [rows for rows in PACKED_ROW_BUCKETS if rows not in plain]
    assert calls == [*PACKED_ROW_BUCKETS, *timed, *with_bias]


@needs_onednn
def test_small_row_counts_timed_faster_with_f_linear_skip_onednn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MKL's matrix-vector path can beat the packed GEMM below 4 rows (Intel CPUs)."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(24, 16, generator=gen)
    bias = torch.randn(24, generator=gen)
    packed = pack_weight(weight, bias)
    monkeypatch.setitem(_prepack._PLAIN_ROWS, (24, 16, torch.float32), frozenset({1, 2}))
    seen = _spy_onednn(monkeypatch)
    for rows in (1, 2, 3, 4):
        x = torch.randn(rows, 16, generator=gen)
        torch.testing.assert_close(
            packed_linear(x, packed, weight, bias), torch.nn.functional.linear(x, weight, bias)
        )
    assert seen == [3, 4]
    timed = _prepack._plain_faster_rows(weight, packed, bias)
    assert timed <= {1, 2, 3}


def _check_follows(module: Any, plain: Any, x: Any) -> None:
    """``module`` (prepacked) computes what ``plain`` (a twin without packing) computes."""
    torch.testing.assert_close(module(x), plain(x))


@needs_onednn
@pytest.mark.parametrize("rows", [3, 100])  # the packed path, and F.linear above 64 rows
def test_packed_forward_follows_weight_changes(rows: int) -> None:
    """load_state_dict, in-place updates, replaced storage and casts are all seen."""
    gen = torch.Generator().manual_seed(1)
    module = torch.nn.Linear(24, 40)
    plain = torch.nn.Linear(24, 40)
    plain.load_state_dict(module.state_dict())
    assert _prepack.prepack_linears(torch.nn.Sequential(module)) == 1
    x = torch.randn(rows, 24, generator=gen)
    _check_follows(module, plain, x)
    new_state = {k: torch.randn(v.shape, generator=gen) for k, v in module.state_dict().items()}
    module.load_state_dict(new_state)  # copy_ in place
    plain.load_state_dict(new_state)
    _check_follows(module, plain, x)
    with torch.no_grad():  # an in-place update (e.g. an RL weight sync)
        module.weight.mul_(0.5)
        plain.weight.mul_(0.5)
    _check_follows(module, plain, x)
    replaced = torch.randn(40, 24, generator=gen)
    module.weight.data = replaced.clone()  # new storage
    plain.weight.data = replaced.clone()
    _check_follows(module, plain, x)
    module.to(torch.float64)  # not a packable dtype: the class's own forward runs
    plain.to(torch.float64)
    _check_follows(module, plain, x.to(torch.float64))
    if torch.bfloat16 in packable_dtypes():  # cast to bf16: packed again, in bf16
        module.to(torch.bfloat16)
        plain.to(torch.bfloat16)
        _check_follows(module, plain, x.to(torch.bfloat16))


@needs_onednn
def test_packed_copy_is_taken_again_for_a_new_dtype_at_the_same_address() -> None:
    """A weight cast in place of a freed one can sit at the same address with version 0.

    Regression: the stamp was (version, pointer) only, so a bf16 weight allocated where the
    fp32 one had been reused the stale fp32 packed copy (oneDNN then failed to build a
    primitive, or computed with the old weights). Here the two weights share one address.
    """
    if torch.bfloat16 not in packable_dtypes():
        pytest.skip("no bf16 packing on this CPU")
    gen = torch.Generator().manual_seed(3)
    storage = torch.randn(40 * 24, generator=gen)
    fp32 = storage.view(40, 24)
    bf16 = storage.view(torch.bfloat16)[: 40 * 24].view(40, 24)
    assert fp32.data_ptr() == bf16.data_ptr() and fp32._version == bf16._version
    copy = _prepack.PackedCopy()
    x = torch.randn(3, 24, generator=gen)
    torch.testing.assert_close(packed_linear(x, copy.get(fp32, None), fp32, None), x @ fp32.t())
    version = bf16._version
    bf16.data.copy_(torch.randn(40, 24, generator=gen))  # new values, the version untouched
    assert bf16._version == version
    xb = x.to(torch.bfloat16)
    out = packed_linear(xb, copy.get(bf16, None), bf16, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, torch.nn.functional.linear(xb, bf16))


@needs_onednn
def test_packed_copy_keeps_its_source_alive_until_cleared() -> None:
    """The packed source is held, so a replaced weight never gets the old address back."""
    copy = _prepack.PackedCopy()
    weight = torch.randn(40, 24)
    ptr = weight.data_ptr()
    copy.get(weight, None)
    del weight
    fresh = [torch.empty(40, 24) for _ in range(8)]  # the allocator's likeliest reuse
    assert all(t.data_ptr() != ptr for t in fresh)
    copy.clear()
    assert copy._source is None and copy._packed is None


@needs_onednn
def test_cast_sequence_never_reuses_a_stale_packed_copy() -> None:
    """fp32 -> float64 -> bf16 casts, repeated: each forward matches an unpacked twin."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        module = torch.nn.Linear(24, 40)
        plain = torch.nn.Linear(24, 40)
        plain.load_state_dict(module.state_dict())
        _prepack.prepack_linears(torch.nn.Sequential(module))
        x = torch.randn(3, 24, generator=gen)
        _check_follows(module, plain, x)
        module.to(torch.float64)
        plain.to(torch.float64)
        _check_follows(module, plain, x.to(torch.float64))
        if torch.bfloat16 in packable_dtypes():
            module.to(torch.bfloat16)
            plain.to(torch.bfloat16)
            _check_follows(module, plain, x.to(torch.bfloat16))


@needs_onednn
def test_fused_packed_group_follows_in_place_weight_changes(tiny_llama: str) -> None:
    from transformers import AutoModelForCausalLM

    from sagellm_backend.engine.runners._paged_fuse import fuse_projections

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    assert fuse_projections(model, prepack=True)[1] > 0
    ids = torch.tensor([[5, 9, 2, 7, 1]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
        gen = torch.Generator().manual_seed(2)
        state = {
            k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in reference.state_dict().items()
        }
        model.load_state_dict(state)  # the siblings' weights are views of the fused weight
        reference.load_state_dict(state)
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
