"""Built-in torch kernels and the function that registers them into a :class:`KernelRegistry`.

This module imports torch at import time; it is only imported on demand (by the cpu/cuda
providers or by callers that want the kernels directly), never by ``import sagellm_backend``.

Kernels (name -> :class:`~sagellm_backend.capability.KernelKind`):

* ``matmul`` (MATMUL): ``a @ b`` (+ ``bias``), torch broadcasting rules.
* ``attention`` (ATTENTION): scaled dot-product attention on ``[B, H, S, D]`` tensors with
  grouped-query attention (``Hq`` a multiple of ``Hkv``).
* ``paged_attention`` (ATTENTION): attention of new query tokens over K/V held in a paged
  cache (the flat-slot layer cache of :class:`~sagellm_backend.kv.storage.TorchKVStorage`),
  addressed by block tables and context lengths; batched over sequences of ragged length.
* ``rms_norm`` and ``layer_norm`` (LAYERNORM), ``softmax`` (SOFTMAX).
* ``write_kv_cache`` (no standard kind): scatter new K/V rows into a flat-slot cache by
  slot mapping; the companion of ``paged_attention``.

Invariants:
    * Every kernel accepts the dtypes listed in :data:`KERNEL_DTYPES` for its floating
      inputs and raises :class:`~sagellm_backend.errors.UnsupportedDTypeError` naming them
      otherwise; bad shapes raise ``ValueError`` naming the offending shapes.
    * Reductions of low-precision inputs (softmax, norms) accumulate in fp32 and return the
      input dtype, so bf16/fp16 results match an fp32 reference within rounding.
    * Kernels never synchronise with the device except ``paged_attention`` when
      ``max_context_len`` is not given (it then reads the longest context length).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from sagellm_backend.capability import DType, KernelKind
from sagellm_backend.errors import UnsupportedDTypeError
from sagellm_backend.kernels.registry import KernelRegistry, KernelSpec

__all__ = [
    "KERNEL_DTYPES",
    "TORCH_DTYPES",
    "attention",
    "builtin_kernel_specs",
    "layer_norm",
    "matmul",
    "paged_attention",
    "register_builtin_kernels",
    "rms_norm",
    "softmax",
    "to_torch_dtype",
    "write_kv_cache",
]

#: Protocol dtype -> torch dtype, for the dtypes that torch has.
TORCH_DTYPES: dict[DType, torch.dtype] = {
    DType.FP32: torch.float32,
    DType.FP16: torch.float16,
    DType.BF16: torch.bfloat16,
    DType.FP8: torch.float8_e4m3fn,
    DType.INT8: torch.int8,
}

#: Floating dtypes every built-in kernel computes in.
KERNEL_DTYPES: frozenset[DType] = frozenset({DType.FP32, DType.FP16, DType.BF16})

_COMPUTE_TORCH: dict[torch.dtype, DType] = {TORCH_DTYPES[d]: d for d in KERNEL_DTYPES}
_CACHE_TORCH: dict[torch.dtype, DType] = {
    **_COMPUTE_TORCH,
    torch.float8_e4m3fn: DType.FP8,
}


def to_torch_dtype(dtype: DType) -> torch.dtype:
    """Return the torch dtype of a protocol :class:`DType`.

    Raises:
        UnsupportedDTypeError: ``dtype`` has no torch equivalent (INT4), naming those that do.
    """
    try:
        return TORCH_DTYPES[DType(dtype)]
    except (KeyError, ValueError) as exc:
        valid = ", ".join(d.value for d in TORCH_DTYPES)
        raise UnsupportedDTypeError(
            f"dtype {dtype!r} has no torch equivalent; valid: {valid}"
        ) from exc


def _check_compute(kernel: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in _COMPUTE_TORCH:
            valid = ", ".join(sorted(d.value for d in KERNEL_DTYPES))
            raise UnsupportedDTypeError(
                f"{kernel}: unsupported dtype {t.dtype}; supported dtypes: {valid}"
            )


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Matrix product ``a @ b`` (+ ``bias`` broadcast over the last dim).

    Args:
        a: ``[..., M, K]`` (or ``[K]``).
        b: ``[..., K, N]`` (or ``[K]``); same dtype as ``a``.
        bias: optional ``[N]``.

    Raises:
        ValueError: inner dimensions or dtypes differ.
    """
    _check_compute("matmul", a, b)
    k_b = b.shape[-2] if b.dim() >= 2 else b.shape[0]
    if a.shape[-1] != k_b:
        raise ValueError(
            f"matmul: inner dimensions differ: a {tuple(a.shape)} @ b {tuple(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise ValueError(f"matmul: dtypes differ: a {a.dtype}, b {b.dtype}")
    out = torch.matmul(a, b)
    if bias is not None:
        out = out + bias
    return out


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query support.

    Args:
        query: ``[B, Hq, Sq, D]``.
        key: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0``.
        value: ``[B, Hkv, Sk, Dv]``.
        attn_mask: optional boolean (True = attend) or additive mask broadcastable to
            ``[B, Hq, Sq, Sk]``.
        is_causal: apply a causal mask aligned to the top-left (as torch SDPA does).
        scale: softmax scale; default ``1 / sqrt(D)``.

    Returns:
        ``[B, Hq, Sq, Dv]`` in the query dtype.
    """
    _check_compute("attention", query, key, value)
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "attention: expected 4-d [B, H, S, D] tensors, got query "
            f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    hq, hkv = query.shape[1], key.shape[1]
    if hkv == 0 or hq % hkv != 0 or value.shape[1] != hkv:
        raise ValueError(
            f"attention: query heads ({hq}) must be a multiple of key/value heads "
            f"(key {hkv}, value {value.shape[1]})"
        )
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attn_mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=hq != hkv,
    )


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    *,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """Attention of new tokens over K/V stored in a paged cache, batched over sequences.

    The cache is one layer of a :class:`~sagellm_backend.kv.storage.TorchKVStorage`: slot
    ``s`` holds the K (V) row of one token, and token ``i`` of sequence ``b`` lives in slot
    ``block_tables[b, i // block_size] * block_size + i % block_size``. The K/V of the query
    tokens themselves must already be written (see :func:`write_kv_cache`).

    Args:
        query: ``[B, Hq, D]`` (one new token per sequence: decode) or ``[B, Q, Hq, D]``
            (the last ``Q`` tokens of each sequence, causal among themselves).
        k_cache: ``[num_slots, Hkv, D]`` or ``[num_pages, block_size, Hkv, D]``.
        v_cache: same shape as ``k_cache``. fp8 caches are upcast to the query dtype.
        block_tables: ``[B, max_blocks]`` integer page ids; entries past a sequence's
            ``ceil(context_len / block_size)`` blocks are ignored (any value, e.g. -1).
        context_lens: ``[B]`` integer tokens of each sequence, query tokens included;
            ``Q <= context_lens[b] <= max_blocks * block_size``.
        block_size: tokens per page.
        scale: softmax scale; default ``1 / sqrt(D)``.
        max_context_len: ``max(context_lens)`` if the caller knows it (avoids reading it
            from the device, which synchronises; values are then not re-validated).

    Returns:
        A tensor shaped like ``query`` in the query dtype.

    Raises:
        ValueError: shapes, heads or context lengths are inconsistent.
        UnsupportedDTypeError: the query dtype is not fp32/fp16/bf16.
    """
    _check_compute("paged_attention", query)
    squeeze = query.dim() == 3
    q4 = query.unsqueeze(1) if squeeze else query
    if q4.dim() != 4:
        raise ValueError(
            f"paged_attention: query must be [B, Hq, D] or [B, Q, Hq, D], got {tuple(query.shape)}"
        )
    batch, num_q, hq, head_dim = q4.shape
    if block_size <= 0:
        raise ValueError(f"paged_attention: block_size must be > 0, got {block_size}")
    k_pages = _as_pages(k_cache, block_size, "k_cache")
    v_pages = _as_pages(v_cache, block_size, "v_cache")
    if k_pages.shape != v_pages.shape:
        raise ValueError(
            f"paged_attention: k_cache {tuple(k_cache.shape)} and v_cache "
            f"{tuple(v_cache.shape)} differ"
        )
    if k_pages.dtype not in _CACHE_TORCH:
        names = ", ".join(sorted(d.value for d in _CACHE_TORCH.values()))
        raise UnsupportedDTypeError(
            f"paged_attention: unsupported cache dtype {k_pages.dtype}; supported: {names}"
        )
    num_pages, _, hkv, cache_dim = k_pages.shape
    if cache_dim != head_dim or hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"paged_attention: query [.., Hq={hq}, D={head_dim}] does not fit cache "
            f"[.., Hkv={hkv}, D={cache_dim}] (need equal D and Hq a multiple of Hkv)"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(
            f"paged_attention: block_tables must be [B={batch}, max_blocks], "
            f"got {tuple(block_tables.shape)}"
        )
    if context_lens.dim() != 1 or context_lens.shape[0] != batch:
        raise ValueError(
            f"paged_attention: context_lens must be [B={batch}], got {tuple(context_lens.shape)}"
        )
    if block_tables.is_floating_point() or context_lens.is_floating_point():
        raise ValueError("paged_attention: block_tables and context_lens must be integer tensors")
    max_blocks = block_tables.shape[1]
    if max_context_len is None:
        lo, hi = (int(x) for x in torch.aminmax(context_lens))
        if lo < num_q or hi > max_blocks * block_size:
            raise ValueError(
                f"paged_attention: context_lens must lie in [{num_q}, "
                f"{max_blocks * block_size}] (Q={num_q}, max_blocks={max_blocks}, "
                f"block_size={block_size}), got min {lo}, max {hi}"
            )
        max_context_len = hi
    if batch == 0:
        return query.clone()
    if num_pages == 0:
        raise ValueError("paged_attention: the cache has no pages")

    device = q4.device
    num_blocks = -(-max_context_len // block_size)
    lens = context_lens.to(device=device, dtype=torch.long)
    tables = block_tables[:, :num_blocks].to(device=device, dtype=torch.long)
    # Pages past a sequence's own blocks may hold any value: point them at page 0.
    block_ids = torch.arange(num_blocks, device=device)
    used = block_ids[None, :] < (lens[:, None] + block_size - 1) // block_size
    tables = torch.where(used, tables, torch.zeros((), dtype=torch.long, device=device))
    flat = tables.reshape(-1)
    padded = num_blocks * block_size
    keys = k_pages.index_select(0, flat)  # [B * num_blocks, block_size, Hkv, D], own buffer
    values = v_pages.index_select(0, flat)
    if keys.dtype != q4.dtype:  # fp8 cache: compute in the query dtype
        keys = keys.to(q4.dtype)
        values = values.to(q4.dtype)
    # Slots past a sequence's length were never written for it: pool memory is
    # uninitialised or stale and may hold NaN/inf, which the attention mask alone does not
    # stop (NaN * 0 is NaN). Zero those rows of the gathered copies.
    valid_padded = torch.arange(padded, device=device)[None, :] < lens[:, None]  # [B, padded]
    rows_k = keys.view(batch * padded, hkv * head_dim)
    rows_v = values.view(batch * padded, hkv * head_dim)
    if device.type == "cpu":  # a row index fill is ~4x faster than a broadcast mask here
        bad = (~valid_padded).view(-1).nonzero().view(-1)
        rows_k.index_fill_(0, bad, 0)
        rows_v.index_fill_(0, bad, 0)
    else:  # no host sync on accelerators
        bad_rows = ~valid_padded.view(-1, 1)
        rows_k.masked_fill_(bad_rows, 0)
        rows_v.masked_fill_(bad_rows, 0)
    keys = keys.view(batch, padded, hkv, head_dim)[:, :max_context_len]
    values = values.view(batch, padded, hkv, head_dim)[:, :max_context_len]

    positions = torch.arange(max_context_len, device=device)
    valid = valid_padded[:, :max_context_len]  # [B, L]
    if num_q == 1:
        mask = valid[:, None, None, :]
    else:
        # Query j of sequence b sits at position lens[b] - Q + j and sees keys <= it.
        q_pos = lens[:, None] - num_q + torch.arange(num_q, device=device)[None, :]
        mask = (positions[None, None, :] <= q_pos[:, :, None])[:, None, :, :]
    out = F.scaled_dot_product_attention(
        q4.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=hq != hkv,
    )
    out = out.transpose(1, 2)
    return out.squeeze(1) if squeeze else out


def _as_pages(cache: torch.Tensor, block_size: int, name: str) -> torch.Tensor:
    if cache.dim() == 4:
        if cache.shape[1] != block_size:
            raise ValueError(
                f"paged_attention: {name} {tuple(cache.shape)} has block size "
                f"{cache.shape[1]}, expected {block_size}"
            )
        return cache
    if cache.dim() == 3:
        if cache.shape[0] % block_size != 0:
            raise ValueError(
                f"paged_attention: {name} has {cache.shape[0]} slots, not a multiple of "
                f"block_size {block_size}"
            )
        return cache.view(cache.shape[0] // block_size, block_size, *cache.shape[1:])
    raise ValueError(
        f"paged_attention: {name} must be [num_slots, Hkv, D] or "
        f"[num_pages, block_size, Hkv, D], got {tuple(cache.shape)}"
    )


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write K/V rows of new tokens into a flat-slot cache in place.

    Args:
        key: ``[N, Hkv, D]`` rows of N tokens.
        value: ``[N, Hkv, D]``.
        k_cache: ``[num_slots, Hkv, D]`` (or ``[num_pages, block_size, Hkv, D]``, contiguous).
        v_cache: same shape as ``k_cache``.
        slot_mapping: ``[N]`` integer slot of each token (see the module's slot arithmetic).

    Raises:
        ValueError: shapes differ.
    """
    k_flat = k_cache.view(-1, *k_cache.shape[-2:])
    v_flat = v_cache.view(-1, *v_cache.shape[-2:])
    if key.shape != value.shape or key.shape[1:] != k_flat.shape[1:]:
        raise ValueError(
            f"write_kv_cache: key {tuple(key.shape)} / value {tuple(value.shape)} do not fit "
            f"cache rows {tuple(k_flat.shape[1:])}"
        )
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(
            f"write_kv_cache: slot_mapping must be [N={key.shape[0]}], "
            f"got {tuple(slot_mapping.shape)}"
        )
    index = slot_mapping.to(device=k_flat.device, dtype=torch.long)
    k_flat.index_copy_(0, index, key.to(k_flat.dtype))
    v_flat.index_copy_(0, index, value.to(v_flat.dtype))


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """Root-mean-square norm over the last dim, computed in fp32 (Llama convention).

    ``y = (x / sqrt(mean(x**2) + eps)).to(x.dtype) * weight``.
    """
    _check_compute("rms_norm", x)
    if weight is not None and weight.shape != x.shape[-1:]:
        raise ValueError(
            f"rms_norm: weight {tuple(weight.shape)} must be [{x.shape[-1]}] (last dim of x)"
        )
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight if weight is not None else y


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Layer norm over the last dim (``torch.nn.functional.layer_norm``)."""
    _check_compute("layer_norm", x)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != x.shape[-1:]:
            raise ValueError(f"layer_norm: {name} {tuple(t.shape)} must be [{x.shape[-1]}]")
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax along ``dim``, accumulated in fp32, returned in the input dtype."""
    _check_compute("softmax", x)
    return torch.softmax(x, dim=dim, dtype=torch.float32).to(x.dtype)


_BUILTINS: tuple[tuple[str, Callable[..., Any], KernelKind | None, str], ...] = (
    ("matmul", matmul, KernelKind.MATMUL, "a @ b (+ bias)"),
    ("attention", attention, KernelKind.ATTENTION, "scaled dot-product attention, GQA"),
    (
        "paged_attention",
        paged_attention,
        KernelKind.ATTENTION,
        "batched attention over a paged KV cache by block table",
    ),
    ("write_kv_cache", write_kv_cache, None, "scatter K/V rows into a paged cache by slot"),
    ("rms_norm", rms_norm, KernelKind.LAYERNORM, "RMS norm (fp32 accumulation)"),
    ("layer_norm", layer_norm, KernelKind.LAYERNORM, "layer norm"),
    ("softmax", softmax, KernelKind.SOFTMAX, "softmax (fp32 accumulation)"),
)


def builtin_kernel_specs(dtypes: frozenset[DType] | None = None) -> list[KernelSpec]:
    """The built-in kernels as :class:`KernelSpec` s.

    Args:
        dtypes: restrict each kernel's dtypes to these (the provider's supported dtypes);
            None keeps :data:`KERNEL_DTYPES`.
    """
    allowed = KERNEL_DTYPES if dtypes is None else KERNEL_DTYPES & dtypes
    return [
        KernelSpec(name, impl, kind, frozenset(allowed), description, builtin=True)
        for name, impl, kind, description in _BUILTINS
    ]


def register_builtin_kernels(
    registry: KernelRegistry,
    *,
    dtypes: frozenset[DType] | None = None,
    replace: bool = False,
) -> list[str]:
    """Register the built-in torch kernels into ``registry``; returns their names.

    Raises:
        KernelAlreadyRegisteredError: a built-in name exists and ``replace`` is False.
    """
    specs = builtin_kernel_specs(dtypes)
    for spec in specs:
        registry.add(spec, replace=replace)
    return [spec.name for spec in specs]
