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
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear_for_every_row_count(bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 24, generator=gen)
    b = torch.randn(40, generator=gen) if bias else None
    packed = pack_weight(weight, b)
    for rows in [*range(1, 20), 31, 33, 64, 65, 130]:
        x = torch.randn(rows, 24, generator=gen)
        got = packed_linear(x, packed, weight, b)
        assert got.shape == (rows, 40)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, b))
    x3 = torch.randn(2, 5, 24, generator=gen)  # leading dims; 10 rows run padded to 16
    got3 = packed_linear(x3, packed, weight, b)
    torch.testing.assert_close(got3, torch.nn.functional.linear(x3, weight, b))


@needs_onednn
def test_only_bucket_sizes_reach_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN caches a primitive per input shape: serving must not create new ones."""
    seen: list[int] = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(x: Any, *args: Any) -> Any:
        seen.append(int(x.shape[0]))
        return real(x, *args)

    weight = torch.randn(16, 8)
    packed = pack_weight(weight)  # its primitives were built here, before the spy
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    for rows in range(1, 200):
        packed_linear(torch.randn(rows, 8), packed, weight, None)
    assert set(seen) == set(PACKED_ROW_BUCKETS)  # rows > PACK_MAX_ROWS went to F.linear
    assert len(seen) == PACK_MAX_ROWS


@needs_onednn
def test_pack_weight_builds_each_shape_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(x: Any, *args: Any) -> Any:
        calls.append(int(x.shape[0]))
        return real(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    monkeypatch.setattr(_prepack, "_BUILT", set())
    pack_weight(torch.randn(12, 6))
    assert calls == list(PACKED_ROW_BUCKETS)
    pack_weight(torch.randn(12, 6))  # same shape, another layer: nothing to build
    pack_weight(torch.randn(12, 6), torch.zeros(12))  # with a bias: its own primitives
    assert calls == list(PACKED_ROW_BUCKETS) * 2
