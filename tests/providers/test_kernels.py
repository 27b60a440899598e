"""Correctness of the built-in torch kernels against reference torch ops (fp32 and bf16)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from sagellm_backend.capability import DType, KernelKind  # noqa: E402
from sagellm_backend.errors import (  # noqa: E402
    KernelAlreadyRegisteredError,
    UnsupportedDTypeError,
)
from sagellm_backend.kernels import KernelRegistry  # noqa: E402
from sagellm_backend.kernels import torch_kernels as tk  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
# Absolute tolerance against an fp64 reference computed from the same (rounded) inputs.
ATOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert out.shape == ref.shape
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= ATOL[dtype], f"max abs error {err} > {ATOL[dtype]} for {dtype}"


def _ref_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal_tail: bool, scale: float
) -> torch.Tensor:
    """q [Hq, Sq, D], k/v [Hkv, Sk, D] in fp64; queries are the last Sq of Sk positions."""
    group = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(group, dim=0)
    v = v.repeat_interleave(group, dim=0)
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal_tail:
        sq, sk = q.shape[1], k.shape[1]
        q_pos = torch.arange(sk - sq, sk)[:, None]
        allowed = torch.arange(sk)[None, :] <= q_pos
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_matches_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 16, generator=g).to(dtype)
    b = torch.randn(16, 7, generator=g).to(dtype)
    bias = torch.randn(7, generator=g).to(dtype)
    out = tk.matmul(a, b, bias)
    ref = a.double() @ b.double() + bias.double()
    # bf16 output rounding of values of magnitude ~4 is ~0.016.
    err = (out.double() - ref).abs().max().item()
    assert out.dtype == dtype
    assert err <= (1e-4 if dtype == torch.float32 else 0.1)


def test_matmul_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="inner dimensions"):
        tk.matmul(torch.ones(2, 3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="dtypes differ"):
        tk.matmul(torch.ones(2, 3), torch.ones(3, 2, dtype=torch.bfloat16))
    with pytest.raises(UnsupportedDTypeError, match="bf16, fp16, fp32"):
        tk.matmul(torch.ones(2, 3, dtype=torch.int64), torch.ones(3, 2, dtype=torch.int64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_reference(dtype: torch.dtype, hq: int, hkv: int, causal: bool) -> None:
    g = torch.Generator().manual_seed(1)
    b, s, d = 2, 9, 16
    q = torch.randn(b, hq, s, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    out = tk.attention(q, k, v, is_causal=causal)
    ref = torch.stack(
        [
            _ref_attention(
                q[i].double(), k[i].double(), v[i].double(), causal_tail=causal, scale=d**-0.5
            )
            for i in range(b)
        ]
    )
    _close(out, ref, dtype)


def test_attention_rejects_bad_heads() -> None:
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        tk.attention(torch.ones(1, 3, 2, 4), torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4))
    with pytest.raises(ValueError, match="4-d"):
        tk.attention(torch.ones(3, 2, 4), torch.ones(3, 2, 4), torch.ones(3, 2, 4))


def _paged_case(
    seed: int,
    dtype: torch.dtype,
    *,
    hq: int,
    hkv: int,
    lens: list[int],
    block_size: int,
    head_dim: int = 16,
    pad_value: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """Random flat-slot caches, random (shuffled) block tables padded with ``pad_value``."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in lens]
    num_pages = sum(blocks_per_seq) + 3  # a few pages nobody owns
    k_cache = torch.randn(num_pages * block_size, hkv, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_pages * block_size, hkv, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_pages, generator=g).tolist()
    tables: list[list[int]] = []
    for nb in blocks_per_seq:
        tables.append(perm[:nb])
        perm = perm[nb:]
    max_blocks = max(blocks_per_seq) + 1  # always some padding
    bt = torch.full((len(lens), max_blocks), pad_value, dtype=torch.int32)
    for i, row in enumerate(tables):
        bt[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32)
    return k_cache, v_cache, bt, ctx, tables


def _dense_kv(cache: torch.Tensor, table: list[int], n: int, block_size: int) -> torch.Tensor:
    slots = [table[i // block_size] * block_size + i % block_size for i in range(n)]
    return cache[torch.tensor(slots)]  # [n, Hkv, D]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_attention_decode_matches_dense_sdpa(
    dtype: torch.dtype, hq: int, hkv: int, block_size: int
) -> None:
    lens = [1, 7, 33, 16, 50]
    k_cache, v_cache, bt, ctx, tables = _paged_case(
        hq + 10 * hkv + block_size, dtype, hq=hq, hkv=hkv, lens=lens, block_size=block_size
    )
    g = torch.Generator().manual_seed(7)
    q = torch.randn(len(lens), hq, 16, generator=g).to(dtype)
    out = tk.paged_attention(q, k_cache, v_cache, bt, ctx, block_size)
    assert out.shape == q.shape
    for b, n in enumerate(lens):
        k = _dense_kv(k_cache, tables[b], n, block_size).transpose(0, 1)  # [Hkv, n, D]
        v = _dense_kv(v_cache, tables[b], n, block_size).transpose(0, 1)
        # Dense SDPA on the gathered data is the reference the paged kernel must match.
        dense = torch.nn.functional.scaled_dot_product_attention(
            q[b][None, :, None, :].double(),
            k[None].double().repeat_interleave(hq // hkv, dim=1),
            v[None].double().repeat_interleave(hq // hkv, dim=1),
        )[0, :, 0]
        _close(out[b], dense, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_paged_attention_ignores_garbage_in_unwritten_slots(
    dtype: torch.dtype, poison: float
) -> None:
    """Pool memory is uninitialised: slots a sequence does not own may hold NaN/inf."""
    block_size, lens = 4, [3, 6, 9]
    k_cache, v_cache, bt, ctx, tables = _paged_case(
        9, dtype, hq=4, hkv=2, lens=lens, block_size=block_size, pad_value=0
    )
    q = torch.randn(len(lens), 4, 16, generator=torch.Generator().manual_seed(9)).to(dtype)
    clean = tk.paged_attention(q, k_cache, v_cache, bt, ctx, block_size)
    owned = torch.zeros(k_cache.shape[0], dtype=torch.bool)
    for table, n in zip(tables, lens, strict=True):
        for i in range(n):
            owned[table[i // block_size] * block_size + i % block_size] = True
    assert not owned.all()
    k_cache[~owned] = poison
    v_cache[~owned] = poison
    dirty = tk.paged_attention(q, k_cache, v_cache, bt, ctx, block_size)
    assert torch.isfinite(dirty).all()
    assert torch.equal(dirty, clean)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_multi_query_is_causal_over_tail(dtype: torch.dtype) -> None:
    block_size, hq, hkv, d, nq = 8, 4, 2, 16, 3
    lens = [3, 11, 24]
    k_cache, v_cache, bt, ctx, tables = _paged_case(
        3, dtype, hq=hq, hkv=hkv, lens=lens, block_size=block_size, pad_value=0
    )
    g = torch.Generator().manual_seed(11)
    q = torch.randn(len(lens), nq, hq, d, generator=g).to(dtype)
    # 4-d cache layout [pages, block, Hkv, D] and an explicit max_context_len.
    k4 = k_cache.view(-1, block_size, hkv, d)
    v4 = v_cache.view(-1, block_size, hkv, d)
    out = tk.paged_attention(
        q, k4, v4, bt.long(), ctx.long(), block_size, scale=0.3, max_context_len=max(lens)
    )
    assert out.shape == q.shape
    for b, n in enumerate(lens):
        k = _dense_kv(k_cache, tables[b], n, block_size).transpose(0, 1).double()
        v = _dense_kv(v_cache, tables[b], n, block_size).transpose(0, 1).double()
        ref = _ref_attention(q[b].transpose(0, 1).double(), k, v, causal_tail=True, scale=0.3)
        _close(out[b].transpose(0, 1), ref, dtype)


def test_paged_attention_fp8_cache_is_upcast() -> None:
    block_size = 4
    lens = [5, 9]
    k_cache, v_cache, bt, ctx, _ = _paged_case(
        5, torch.float32, hq=2, hkv=2, lens=lens, block_size=block_size
    )
    k8, v8 = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
    q = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(2))
    out = tk.paged_attention(q, k8, v8, bt, ctx, block_size)
    ref = tk.paged_attention(q, k8.float(), v8.float(), bt, ctx, block_size)
    torch.testing.assert_close(out, ref)


def test_write_kv_cache_then_paged_attention_roundtrip() -> None:
    block_size, hkv, d = 4, 2, 8
    num_pages = 6
    k_cache = torch.zeros(num_pages * block_size, hkv, d)
    v_cache = torch.zeros_like(k_cache)
    table = [5, 2, 0]
    n = 10
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(n, hkv, d, generator=g)
    values = torch.randn(n, hkv, d, generator=g)
    slots = torch.tensor([table[i // block_size] * block_size + i % block_size for i in range(n)])
    tk.write_kv_cache(keys, values, k_cache, v_cache, slots)
    assert torch.equal(k_cache[slots], keys)
    assert torch.equal(v_cache[slots], values)
    untouched = torch.ones(num_pages * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert k_cache[untouched].abs().sum() == 0
    q = torch.randn(1, hkv, d, generator=g)
    out = tk.paged_attention(
        q, k_cache, v_cache, torch.tensor([table]), torch.tensor([n]), block_size
    )
    ref = tk.attention(q[:, :, None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None])
    torch.testing.assert_close(out, ref[:, :, 0])
    with pytest.raises(ValueError, match="slot_mapping"):
        tk.write_kv_cache(keys, values, k_cache, v_cache, slots[:-1])


def test_paged_attention_rejects_bad_input() -> None:
    k = torch.zeros(8, 2, 4)
    bt = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match=r"context_lens must lie in \[1, 8\]"):
        tk.paged_attention(torch.ones(1, 2, 4), k, k, bt, torch.tensor([9]), 4)
    with pytest.raises(ValueError, match=r"context_lens must lie in \[1, 8\]"):
        tk.paged_attention(torch.ones(1, 2, 4), k, k, bt, torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="not a multiple of block_size"):
        tk.paged_attention(torch.ones(1, 2, 4), k, k, bt, torch.tensor([3]), 3)
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        tk.paged_attention(torch.ones(1, 3, 4), k, k, bt, torch.tensor([3]), 4)
    with pytest.raises(ValueError, match="block_tables must be"):
        tk.paged_attention(torch.ones(2, 2, 4), k, k, bt, torch.tensor([3, 3]), 4)
    with pytest.raises(ValueError, match="integer"):
        tk.paged_attention(torch.ones(1, 2, 4), k, k, bt.float(), torch.tensor([3]), 4)
    with pytest.raises(UnsupportedDTypeError):
        tk.paged_attention(torch.ones(1, 2, 4, dtype=torch.int32), k, k, bt, torch.tensor([3]), 4)
    k8 = k.to(torch.int8)
    with pytest.raises(UnsupportedDTypeError, match=r"unsupported cache dtype torch\.int8"):
        tk.paged_attention(torch.ones(1, 2, 4), k8, k8, bt, torch.tensor([3]), 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_and_softmax_match_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 6, 32, generator=g) * 3).to(dtype)
    w = torch.randn(32, generator=g).to(dtype)
    bias = torch.randn(32, generator=g).to(dtype)
    xd = x.double()

    rms_ref = (xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)) * w.double()
    rms = tk.rms_norm(x, w, eps=1e-6)
    assert rms.dtype == dtype
    # bf16 output of values up to ~10 rounds to ~0.06.
    assert (rms.double() - rms_ref).abs().max().item() <= (1e-5 if dtype == torch.float32 else 0.1)

    mean = xd.mean(-1, keepdim=True)
    var = xd.var(-1, unbiased=False, keepdim=True)
    ln_ref = (xd - mean) / torch.sqrt(var + 1e-5) * w.double() + bias.double()
    ln = tk.layer_norm(x, w, bias)
    assert (ln.double() - ln_ref).abs().max().item() <= (1e-5 if dtype == torch.float32 else 0.1)

    sm_ref = torch.exp(xd - xd.amax(-1, keepdim=True))
    sm_ref = sm_ref / sm_ref.sum(-1, keepdim=True)
    _close(tk.softmax(x, dim=-1), sm_ref, dtype)
    _close(tk.softmax(x, dim=1), torch.softmax(xd, dim=1), dtype)


def test_norm_shape_errors() -> None:
    with pytest.raises(ValueError, match="rms_norm: weight"):
        tk.rms_norm(torch.ones(2, 4), torch.ones(3))
    with pytest.raises(ValueError, match="layer_norm: bias"):
        tk.layer_norm(torch.ones(2, 4), torch.ones(4), torch.ones(5))


def test_register_builtin_kernels_tags_kinds_and_refuses_duplicates() -> None:
    registry = KernelRegistry()
    names = tk.register_builtin_kernels(registry)
    assert set(names) == {
        "matmul",
        "attention",
        "paged_attention",
        "write_kv_cache",
        "rms_norm",
        "layer_norm",
        "softmax",
    }
    assert registry.spec("paged_attention").kind == KernelKind.ATTENTION
    assert registry.spec("rms_norm").kind == KernelKind.LAYERNORM
    assert registry.spec("matmul").dtypes == {DType.FP32, DType.FP16, DType.BF16}
    assert registry.get("softmax") is tk.softmax
    assert registry.kinds() == [
        KernelKind.MATMUL,
        KernelKind.ATTENTION,
        KernelKind.LAYERNORM,
        KernelKind.SOFTMAX,
    ]
    with pytest.raises(KernelAlreadyRegisteredError, match="replace=True"):
        tk.register_builtin_kernels(registry)
    assert tk.register_builtin_kernels(registry, replace=True) == names
    restricted = KernelRegistry()
    tk.register_builtin_kernels(restricted, dtypes=frozenset({DType.FP32}))
    assert restricted.spec("attention").dtypes == {DType.FP32}


def test_to_torch_dtype() -> None:
    assert tk.to_torch_dtype(DType.BF16) is torch.bfloat16
    assert tk.to_torch_dtype(DType.FP8) is torch.float8_e4m3fn
    with pytest.raises(UnsupportedDTypeError, match="int4"):
        tk.to_torch_dtype(DType.INT4)
