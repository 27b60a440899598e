"""Pure-Python kernels and simulated collectives of the mock provider (nested lists).

The kernels work on nested lists of numbers (leading dims batched); the collectives
simulate ``world`` ranks that all hold the same data.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

from sagellm_backend.capability import KernelKind

# --------------------------------------------------------------------------- pure-Python kernels


def _depth(x: Any) -> int:
    d = 0
    while isinstance(x, list | tuple):
        d += 1
        if not x:
            break
        x = x[0]
    return d


def _rows(x: Any, name: str) -> list[list[float]]:
    if _depth(x) != 2 or not x:
        raise ValueError(f"{name} must be a non-empty 2-d list of numbers")
    width = len(x[0])
    for row in x:
        if len(row) != width:
            raise ValueError(f"{name} is ragged: rows of {width} and {len(row)} elements")
    return [list(map(float, r)) for r in x]


def _matmul(a: Any, b: Any, bias: Any = None) -> Any:
    """``a @ b`` (+ ``bias`` over the last dim) on nested lists; leading dims are batched."""
    da, db = _depth(a), _depth(b)
    if da > 2 or db > 2:
        if da > 2 and db > 2:
            if len(a) != len(b):
                raise ValueError(f"matmul: batch sizes differ: {len(a)} and {len(b)}")
            return [_matmul(x, y, bias) for x, y in zip(a, b, strict=True)]
        if da > 2:
            return [_matmul(x, b, bias) for x in a]
        return [_matmul(a, y, bias) for y in b]
    if da == 1:
        return _matmul([a], b, bias)[0]
    if db == 1:
        rows = _rows(a, "a")
        if len(rows[0]) != len(b):
            raise ValueError(f"matmul: inner dimensions differ: {len(rows[0])} and {len(b)}")
        return [math.fsum(x * float(y) for x, y in zip(r, b, strict=True)) for r in rows]
    ra, rb = _rows(a, "a"), _rows(b, "b")
    if len(ra[0]) != len(rb):
        raise ValueError(
            f"matmul: inner dimensions differ: a is {len(ra)}x{len(ra[0])}, "
            f"b is {len(rb)}x{len(rb[0])}"
        )
    cols = list(zip(*rb, strict=True))
    out = [[math.fsum(x * y for x, y in zip(r, c, strict=True)) for c in cols] for r in ra]
    if bias is not None:
        if len(bias) != len(cols):
            raise ValueError(f"matmul: bias has {len(bias)} elements, expected {len(cols)}")
        out = [[v + float(bb) for v, bb in zip(r, bias, strict=True)] for r in out]
    return out


def _softmax_row(row: list[float]) -> list[float]:
    finite = [v for v in row if v != -math.inf]
    if not finite:
        return [0.0] * len(row)
    m = max(finite)
    exps = [math.exp(v - m) if v != -math.inf else 0.0 for v in row]
    total = math.fsum(exps)
    return [e / total for e in exps]


def _softmax(x: Any, dim: int = -1) -> Any:
    """Numerically stable softmax over the last dim of nested lists."""
    if dim not in (-1, _depth(x) - 1):
        raise ValueError(f"softmax: the mock kernel works on the last dim only, got dim={dim}")
    if _depth(x) == 1:
        return _softmax_row([float(v) for v in x])
    return [_softmax(r, -1) for r in x]


def _attention_2d(
    q: Any, k: Any, v: Any, mask: Any, is_causal: bool, scale: float | None
) -> list[list[float]]:
    rq, rk, rv = _rows(q, "query"), _rows(k, "key"), _rows(v, "value")
    d = len(rq[0])
    if len(rk[0]) != d or len(rk) != len(rv):
        raise ValueError(
            f"attention: query dim {d}, key {len(rk)}x{len(rk[0])}, value {len(rv)}x{len(rv[0])}"
        )
    s = 1.0 / math.sqrt(d) if scale is None else scale
    out = []
    for i, qi in enumerate(rq):
        scores = [math.fsum(a * b for a, b in zip(qi, kj, strict=True)) * s for kj in rk]
        for j in range(len(rk)):
            if is_causal and j > i:
                scores[j] = -math.inf
            elif mask is not None:
                m = mask[i][j]
                if isinstance(m, bool):
                    if not m:
                        scores[j] = -math.inf
                else:
                    scores[j] += float(m)
        p = _softmax_row(scores)
        out.append(
            [math.fsum(pj * vj[c] for pj, vj in zip(p, rv, strict=True)) for c in range(len(rv[0]))]
        )
    return out


def _attention(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
) -> Any:
    """Scaled dot-product attention on nested lists.

    Shapes: ``[S, D]`` (one head), ``[H, S, D]`` or ``[B, H, S, D]``; key/value may have
    fewer heads than the query (grouped-query: ``Hq % Hkv == 0``). ``attn_mask`` is boolean
    (True = attend) or additive, ``[Sq, Sk]`` or with the same leading dims as the query.
    ``is_causal`` masks key ``j > i`` (top-left aligned). Fully masked rows give zeros.
    """
    dq = _depth(query)
    if dq not in (2, 3, 4) or _depth(key) != dq or _depth(value) != dq:
        raise ValueError("attention: query/key/value must all be [S, D], [H, S, D] or [B, H, S, D]")
    mask_depth = _depth(attn_mask) if attn_mask is not None else 0
    if dq == 2:
        return _attention_2d(query, key, value, attn_mask, is_causal, scale)
    if dq == 4:
        if not len(query) == len(key) == len(value):
            raise ValueError("attention: batch sizes of query/key/value differ")
        return [
            _attention(
                q,
                k,
                v,
                attn_mask[b] if mask_depth == 4 else attn_mask,
                is_causal=is_causal,
                scale=scale,
            )
            for b, (q, k, v) in enumerate(zip(query, key, value, strict=True))
        ]
    hq, hkv = len(query), len(key)
    if hkv == 0 or hq % hkv or len(value) != hkv:
        raise ValueError(
            f"attention: query heads ({hq}) must be a multiple of key/value heads "
            f"(key {hkv}, value {len(value)})"
        )
    group = hq // hkv
    return [
        _attention_2d(
            query[h],
            key[h // group],
            value[h // group],
            attn_mask[h] if mask_depth == 3 else attn_mask,
            is_causal,
            scale,
        )
        for h in range(hq)
    ]


def _norm_rows(x: Any, fn: Callable[[list[float]], list[float]]) -> Any:
    if _depth(x) == 1:
        return fn([float(v) for v in x])
    if _depth(x) == 0:
        raise ValueError("expected a list of numbers")
    return [_norm_rows(r, fn) for r in x]


def _check_param(p: Any, n: int, name: str) -> list[float] | None:
    if p is None:
        return None
    if _depth(p) != 1 or len(p) != n:
        raise ValueError(f"{name} must be a list of {n} numbers (the last dim of x)")
    return [float(v) for v in p]


def _layer_norm(x: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
    """Layer norm over the last dim of nested lists."""

    def row(r: list[float]) -> list[float]:
        n = len(r)
        w, b = _check_param(weight, n, "weight"), _check_param(bias, n, "bias")
        mean = math.fsum(r) / n
        var = math.fsum((v - mean) ** 2 for v in r) / n
        inv = 1.0 / math.sqrt(var + eps)
        out = [(v - mean) * inv for v in r]
        if w is not None:
            out = [o * wi for o, wi in zip(out, w, strict=True)]
        if b is not None:
            out = [o + bi for o, bi in zip(out, b, strict=True)]
        return out

    return _norm_rows(x, row)


def _rms_norm(x: Any, weight: Any = None, eps: float = 1e-6) -> Any:
    """RMS norm over the last dim of nested lists (Llama convention)."""

    def row(r: list[float]) -> list[float]:
        w = _check_param(weight, len(r), "weight")
        inv = 1.0 / math.sqrt(math.fsum(v * v for v in r) / len(r) + eps)
        out = [v * inv for v in r]
        return out if w is None else [o * wi for o, wi in zip(out, w, strict=True)]

    return _norm_rows(x, row)


def _silu_and_mul(x: Any) -> Any:
    """Fused SwiGLU gate: last dim ``[a, b]`` (halves) -> ``silu(a) * b``."""

    def row(r: list[float]) -> list[float]:
        if len(r) % 2:
            raise ValueError(f"silu_and_mul: last dim must be even, got {len(r)}")
        h = len(r) // 2
        return [a / (1.0 + math.exp(-a)) * b for a, b in zip(r[:h], r[h:], strict=True)]

    return _norm_rows(x, row)


_BUILTIN_KERNELS: dict[KernelKind, tuple[tuple[str, Callable[..., Any], str], ...]] = {
    KernelKind.MATMUL: (("matmul", _matmul, "a @ b (+ bias), pure Python"),),
    KernelKind.ATTENTION: (("attention", _attention, "scaled dot-product attention, GQA"),),
    KernelKind.LAYERNORM: (
        ("layer_norm", _layer_norm, "layer norm over the last dim"),
        ("rms_norm", _rms_norm, "RMS norm over the last dim"),
    ),
    KernelKind.SOFTMAX: (("softmax", _softmax, "softmax over the last dim"),),
    KernelKind.FUSION: (("silu_and_mul", _silu_and_mul, "fused SwiGLU gate"),),
}


# --------------------------------------------------------------------------- collectives


def _reduce_in_place(tensor: Any, op: str, world: int) -> None:
    def value(v: Any) -> Any:
        if op == "sum":
            return v * world
        if op == "product":
            return v**world
        return v  # avg, max, min over identical replicas

    if isinstance(tensor, list):
        for i, v in enumerate(tensor):
            if isinstance(v, list):
                _reduce_in_place(v, op, world)
            else:
                tensor[i] = value(v)
        return
    if hasattr(tensor, "mul_") and hasattr(tensor, "pow_"):  # torch-like tensor
        if op == "sum":
            tensor.mul_(world)
        elif op == "product":
            tensor.pow_(world)
        return
    raise TypeError(
        f"all_reduce works in place on a list or a torch-like tensor, got {type(tensor).__name__}"
    )


def _gather(tensor: Any, world: int) -> Any:
    if isinstance(tensor, list | tuple):
        items = copy.deepcopy(list(tensor))
        return [copy.deepcopy(x) for _ in range(world) for x in items]
    if isinstance(tensor, int | float) and not isinstance(tensor, bool):
        return [tensor] * world
    if hasattr(tensor, "clone") and hasattr(tensor, "repeat"):  # torch-like tensor
        t = tensor.reshape(1) if tensor.dim() == 0 else tensor
        return t.repeat(world, *([1] * (t.dim() - 1)))
    raise TypeError(
        f"all_gather takes a list, a number or a torch-like tensor, got {type(tensor).__name__}"
    )
