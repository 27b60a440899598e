"""oneDNN-prepacked linear weights for the runners on CPU (``prepack_weights``).

``F.linear`` on CPU calls MKL's ``sgemm``, which reads the weight in its plain layout and
(on AMD CPUs) runs without its AVX-512 kernels. oneDNN picks its kernel by the CPU's
instruction set and, with the weight reordered once into its blocked layout, ran a
decode-sized GEMM (1-64 rows) 2-2.7x faster than ``F.linear`` on the 2-CPU reference
machine (AMD EPYC, AVX-512) and a prompt-sized one (512-2,000 rows) about 13% faster. The
results equal ``F.linear``'s up to summation order. bf16 weights are packed too where oneDNN
has bf16 kernels for the CPU (:func:`packable_dtypes`): there decode-sized GEMMs ran
1.3-3.5x faster than ``F.linear`` (which also uses oneDNN for bf16, without the reorder),
with results equal up to bf16 rounding of the fp32 accumulation.

oneDNN builds (and caches, about 0.5 MB each, up to 1,024 of them) one primitive per input
shape. An engine's steps have any number of rows, so the row count is rounded up to one of
:data:`PACKED_ROW_BUCKETS` sizes (the input padded with zero rows, the output cut back), and
steps of more than :data:`PACK_MAX_ROWS` rows -- where oneDNN gains least -- run ``F.linear``
on the plain weight. Without this, a server's memory grew by hundreds of MB as it met new
step sizes (the HF soak: +55% RSS over 500 requests).

Below 4 rows MKL may take a matrix-vector path that beats the packed GEMM: on an Intel Xeon
(AVX-512) VM, a 1-row step of a 512x512 weight took 12 us with ``F.linear`` and 30 us packed,
of a 4096x4096 weight 1.77 ms and 1.79 ms, of 11008x4096 5.6 ms and 6.3 ms (single-request
decode on bench-llama: 8.6-9.7 ms per token packed, 6.7-7.2 ms with ``F.linear``), while
on the AMD reference machine the packed copy won at every row count. So the first time a
weight shape is packed, :func:`pack_weight` also times both at 1, 2 and 3 rows (best of 5
each) and :func:`packed_linear` sends those row counts to ``F.linear`` where it was faster.

Invariants: the packed copy is a second copy of the weight (memory), taken when the module
is packed and again after the weight changed (in place or replaced); a module's own
parameters are untouched; at most ``len(PACKED_ROW_BUCKETS)``
input shapes reach oneDNN per weight shape. :func:`prepack_linears` gives modules an
instance ``forward`` (marked ``sagellm_prepacked``; the class is untouched) and recognises
modules an earlier runner packed.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "PACKED_ROW_BUCKETS",
    "PACK_MAX_ROWS",
    "PACK_ROWS",
    "PackedCopy",
    "bucket_rows",
    "can_prepack",
    "pack_weight",
    "packable_dtypes",
    "packed_linear",
    "prepack_available",
    "prepack_linears",
]

#: Rows the packed weight layout is tuned for (a typical decode batch); any row count runs.
PACK_ROWS = 16
#: Largest step, in rows, run on the packed weight. Decode steps (one row per sequence) gain
#: most from oneDNN (1.5-3.4x at 8-32 rows); prompt-sized steps only 12-25%.
PACK_MAX_ROWS = 64
#: Steps of more than 8 rows run at a multiple of 8 rows.
_BUCKET_STEP = 8


def bucket_rows(rows: int) -> int:
    """The row count a step of ``rows`` rows runs at on the packed weight.

    Exact up to 8 rows, then rounded up to a multiple of 8 (at most 7 padding rows).
    """
    if rows <= _BUCKET_STEP:
        return rows
    return -(-rows // _BUCKET_STEP) * _BUCKET_STEP


#: Every row count :func:`packed_linear` hands to oneDNN (15 sizes).
PACKED_ROW_BUCKETS = tuple(sorted({bucket_rows(r) for r in range(1, PACK_MAX_ROWS + 1)}))


def prepack_available() -> bool:
    """Whether this torch can prepack fp32 linear weights with oneDNN (x86/Arm CPU builds)."""
    ops = getattr(torch.ops, "mkldnn", None)
    onednn_on: Callable[[], bool] = torch.backends.mkldnn.is_available
    return (
        bool(onednn_on())
        and ops is not None
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


@functools.cache
def packable_dtypes() -> frozenset[torch.dtype]:
    """Weight dtypes packed on this machine: fp32, and bf16 where oneDNN supports it here."""
    if not prepack_available():
        return frozenset()
    dtypes = {torch.float32}
    bf16_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if bf16_check is not None and bool(bf16_check()):
        dtypes.add(torch.bfloat16)
    return frozenset(dtypes)


def can_prepack(enabled: bool, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a runner asked to prepack (``enabled``) can: on CPU, a :func:`packable_dtypes`."""
    return enabled and device.type == "cpu" and dtype in packable_dtypes()


#: (out, in, has bias, dtype) of the weights whose oneDNN primitives :func:`pack_weight` built.
_BUILT: set[tuple[int, int, bool, torch.dtype]] = set()
#: Row counts below 4 that are timed when a weight shape is first packed.
_SMALL_ROWS = (1, 2, 3)
#: (out, in, dtype) -> the row counts (of :data:`_SMALL_ROWS`) at which ``F.linear`` was
#: faster than the packed copy on this machine; filled by :func:`pack_weight`.
_PLAIN_ROWS: dict[tuple[int, int, torch.dtype], frozenset[int]] = {}


def _best_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    """Fastest of ``repeats`` timed calls of ``fn`` (after one untimed call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _plain_faster_rows(
    weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
) -> frozenset[int]:
    """The row counts of :data:`_SMALL_ROWS` at which ``F.linear`` beat the packed copy."""
    linear = torch.nn.functional.linear
    faster = set()
    for rows in _SMALL_ROWS:
        x = torch.zeros(rows, weight.shape[1], dtype=weight.dtype)
        plain = _best_seconds(lambda: linear(x, weight, bias))  # noqa: B023 (called at once)
        onednn = _best_seconds(
            lambda: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")  # noqa: B023
        )
        if plain < onednn:
            faster.add(rows)
    return frozenset(faster)


def pack_weight(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The oneDNN blocked copy of a CPU ``[out, in]`` weight, for :func:`packed_linear`.

    The first time a weight shape (with or without ``bias``) is packed in this process, its
    oneDNN primitives are built for every size in :data:`PACKED_ROW_BUCKETS` (one GEMM of
    each size, ~0.5 MB each): memory is taken at load, not while serving, and no step waits
    for a kernel to be generated. Layers share primitives by shape, so this costs one pass
    per distinct linear shape (a few per model), not per layer. The same first time, the
    small row counts are timed (see the module docstring).
    """
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(
        weight.detach().contiguous(), PACK_ROWS
    )
    key = (int(weight.shape[0]), int(weight.shape[1]), bias is not None, weight.dtype)
    if key not in _BUILT:
        with torch.inference_mode():
            rows = torch.zeros(PACK_MAX_ROWS, key[1], dtype=weight.dtype)
            for size in PACKED_ROW_BUCKETS:
                packed_linear(rows[:size], packed, weight, bias)
            shape = (key[0], key[1], weight.dtype)
            if shape not in _PLAIN_ROWS:
                _PLAIN_ROWS[shape] = _plain_faster_rows(weight.detach(), packed, bias)
        _BUILT.add(key)
    return packed


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on ``packed`` (:func:`pack_weight` of ``weight``).

    Any leading shape. Steps of up to :data:`PACK_MAX_ROWS` rows run on the packed copy at
    :func:`bucket_rows` rows; larger ones run ``F.linear`` on ``weight``, as do the small
    row counts at which ``F.linear`` was timed faster for this weight shape.
    """
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows > PACK_MAX_ROWS or rows == 0 or x.dtype != weight.dtype:
        return torch.nn.functional.linear(x, weight, bias)
    if rows < 4:
        plain = _PLAIN_ROWS.get((weight.shape[0], weight.shape[1], weight.dtype))
        if plain is not None and rows in plain:
            return torch.nn.functional.linear(x, weight, bias)
    padded = bucket_rows(rows)
    if padded != rows:
        flat = torch.nn.functional.pad(flat, (0, 0, 0, padded - rows))
    elif not flat.is_contiguous():
        flat = flat.contiguous()
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    if padded != rows:
        out = out[:rows]
    return out.view(*x.shape[:-1], out.shape[-1])


class PackedCopy:
    """The packed copy of one weight, taken again whenever the weight has changed.

    A weight changed when its tensor was modified in place (``copy_``, ``load_state_dict``:
    torch's version counter moved), its storage was replaced (``param.data = ...``) or it was
    cast (``model.to(dtype)``). :meth:`get` costs a version, pointer, dtype and shape read when
    nothing changed.

    Invariant: while a packed copy is held, so is (a detached view of) the weight it was
    packed from. The source storage therefore stays alive, and no new storage can be
    allocated at its address: a replaced or cast weight always shows a different pointer,
    even when the allocator hands out freed memory and the new tensor's version is 0 again.
    In steady state the view shares the model's own storage (no extra memory); after a
    replacement the old storage is released at the next :meth:`get` or :meth:`clear`.
    """

    __slots__ = ("_packed", "_source", "_stamp")

    def __init__(self) -> None:
        self._packed: torch.Tensor | None = None
        self._source: torch.Tensor | None = None
        self._stamp: tuple[int, int, torch.dtype, torch.Size] | None = None

    def get(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The packed copy of ``weight`` (``[out, in]``, CPU, a packable dtype) as it is now."""
        stamp = (weight._version, weight.data_ptr(), weight.dtype, weight.shape)
        packed = self._packed
        if packed is None or stamp != self._stamp:
            self.clear()  # release the old source first: at most one packed copy at a time
            packed = self._packed = pack_weight(weight, bias)
            self._source = weight.detach()
            self._stamp = stamp
        return packed

    def clear(self) -> None:
        """Drop the packed copy and the source it holds (the weight left the packed path)."""
        self._packed = self._source = self._stamp = None


def prepack_linears(model: Any) -> int:
    """Give plain CPU ``nn.Linear``/``Conv1D`` modules of a packable dtype a prepacked forward.

    The module's ``forward`` (an instance attribute, so the class is untouched) runs
    :func:`packed_linear` on the packed copy for every input; it reads the module's weight
    and bias at each call, packs again when the weight changed (:class:`PackedCopy`), and
    runs the class's own forward once the weight is no longer of a packable dtype on the CPU
    (the model was cast or moved). Returns how many modules have the packed forward,
    counting those an earlier runner on the same model gave it (an engine restart reuses the
    loaded model).
    """
    count = 0
    dtypes = packable_dtypes()
    for module in model.modules():
        kind = type(module).__name__
        own_forward = module.__dict__.get("forward")
        if getattr(own_forward, "sagellm_prepacked", False):
            count += 1  # prepacked by an earlier runner on this model (engine restart)
            continue
        if getattr(module, "_hf_hook", None) is not None or own_forward is not None:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if weight.dtype not in dtypes or weight.device.type != "cpu":
            continue
        if type(module) is torch.nn.Linear:
            transposed = False
        elif kind == "Conv1D" and type(module).__module__.startswith("transformers."):
            transposed = True  # Conv1D keeps [in, out]
        else:
            continue
        module.forward = _packed_forward(module, transposed)
        count += 1
    return count


def _packed_forward(module: Any, transposed: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    ref = weakref.ref(module)  # the module holds this forward: no reference cycle
    copy = PackedCopy()
    plain = type(module).forward
    dtypes = packable_dtypes()

    def packed(mod: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(packed copy, ``[out, in]`` weight, bias) of ``mod`` as it is now."""
        weight, bias = mod.weight, mod.bias
        origin = weight.t() if transposed else weight
        return copy.get(origin, bias), origin, bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        mod = ref()
        assert mod is not None, "a module's forward outlived it"
        weight = mod.weight
        if weight.dtype not in dtypes or weight.device.type != "cpu":
            copy.clear()  # cast or moved: no packed copy (nor its source) kept alive
            out: torch.Tensor = plain(mod, x)
            return out
        return packed_linear(x, *packed(mod))

    forward.sagellm_prepacked = True  # type: ignore[attr-defined]
    packed(module)  # pack now, not at the first step
    return forward
