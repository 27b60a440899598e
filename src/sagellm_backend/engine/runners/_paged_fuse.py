"""Fused sibling projections for the paged runner (``fuse_projections``).

Llama-family attention computes ``q_proj(x)``, ``k_proj(x)`` and ``v_proj(x)`` -- three GEMMs
over the same input -- and its MLP ``gate_proj(x)`` and ``up_proj(x)``. On the small batches
of a decode step each GEMM is mostly fixed cost, so one GEMM over the concatenated weight is
faster. The model's own forward is kept: each sibling module gets an instance ``forward``
(the class is untouched) that, for the first sibling called with an input, runs the fused
GEMM and keeps the other siblings' slices; a sibling called with that same tensor object
takes its slice, and one called with any other input computes the fused GEMM anew. The
siblings' ``weight``/``bias`` parameters become views into the fused tensors, so fusing
costs no weight memory (the oneDNN-prepacked copy of ``prepack_weights`` is, as for every
linear, a second copy). Weights changed after fusing (``load_state_dict``, in-place updates,
replaced ``.data``, casts) are fused again before the next GEMM.

Only plain ``nn.Linear`` siblings with one input width, dtype and device, no accelerate hook
and no ``forward`` of their own are fused (quantized layers keep their own forward), and
only in the model families whose attention and MLP were checked to use the slices as views
(:data:`FUSED_MODEL_TYPES`).

Invariants: the fused output equals the separate outputs up to GEMM summation order; a
sibling never returns a slice computed from another input tensor.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from sagellm_backend.engine.runners._prepack import can_prepack, pack_weight, packed_linear

__all__ = ["FUSED_MODEL_TYPES", "SIBLINGS", "fuse_projections"]

#: Names of the sibling projections that read the same input, per module.
SIBLINGS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
#: ``config.model_type`` values whose layers are fused.
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


class _FusedGroup:
    """One fused GEMM shared by its sibling modules (see the module docstring).

    The siblings' weights (and biases) are views of :attr:`weight` (:attr:`bias`). Before
    each GEMM the group checks the siblings' parameters (version counters and storage): after
    a change -- ``load_state_dict``, an in-place update, replaced ``.data``, a cast -- it fuses
    them again from what they hold now, and prepacks again (fp32 or bf16 on CPU only).
    """

    def __init__(self, mods: list[Any], pack: bool) -> None:
        self._mods = [weakref.ref(m) for m in mods]  # the modules hold this group
        self._want_pack = pack
        self.sizes = [int(m.out_features) for m in mods]
        self.weight = torch.empty(0)
        self.bias: torch.Tensor | None = None
        #: the oneDNN copy of :attr:`weight` (None: not packed); :meth:`_fuse` renews both
        self.packed: torch.Tensor | None = None
        self._stamp: tuple[int, ...] = ()
        self._input: torch.Tensor | None = None
        self._parts: list[torch.Tensor | None] = []
        self._fuse(mods)

    @staticmethod
    def _stamp_of(mods: list[Any]) -> tuple[int, ...]:
        params = [m.weight for m in mods] + [m.bias for m in mods if m.bias is not None]
        return (*(p._version for p in params), *(p.data_ptr() for p in params))

    def _fuse(self, mods: list[Any]) -> None:
        """Concatenate the siblings' weights (biases); make the parameters views of them."""
        with torch.no_grad():
            weight = torch.cat([m.weight.detach() for m in mods], 0)
            has_bias = mods[0].bias is not None
            bias = torch.cat([m.bias.detach() for m in mods]) if has_bias else None
        offset = 0
        for m, n in zip(mods, self.sizes, strict=True):  # the parameters become views
            m.weight.data = weight[offset : offset + n]
            if bias is not None:
                m.bias.data = bias[offset : offset + n]
            offset += n
        self.weight, self.bias = weight, bias
        pack = can_prepack(self._want_pack, weight.device, weight.dtype)
        self.packed = pack_weight(weight, bias) if pack else None
        self._stamp = self._stamp_of(mods)

    def _compute(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        mods = [r() for r in self._mods]
        if self._stamp_of(mods) != self._stamp:
            self._fuse(mods)  # the weights changed since they were fused
        packed = self.packed
        if packed is not None:
            y = packed_linear(x, packed, self.weight, self.bias)
        else:
            y = torch.nn.functional.linear(x, self.weight, self.bias)
        return list(torch.split(y, self.sizes, dim=-1))

    def member(self, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The ``forward`` of sibling ``index``."""

        def forward(x: torch.Tensor) -> torch.Tensor:
            parts = self._parts
            if self._input is not x or parts[index] is None:
                parts = self._parts = self._compute(x)
                self._input = x
            out = parts[index]
            assert out is not None
            parts[index] = None
            if all(p is None for p in parts):  # every sibling took its slice: let go
                self._input = None
            return out

        forward.sagellm_fused = True  # type: ignore[attr-defined]
        forward.sagellm_prepacked = self.packed is not None  # type: ignore[attr-defined]
        return forward


def _fusable(mods: list[Any]) -> bool:
    if not all(type(m) is torch.nn.Linear for m in mods):
        return False
    if any(m.__dict__.get("forward") is not None or getattr(m, "_hf_hook", None) for m in mods):
        return False
    if len({(m.in_features, m.weight.dtype, m.weight.device) for m in mods}) != 1:
        return False
    return len({m.bias is None for m in mods}) == 1


def fuse_projections(model: Any, *, prepack: bool) -> tuple[int, int]:
    """Fuse the sibling projections of ``model`` (see the module docstring).

    Args:
        model: a loaded ``*ForCausalLM``; nothing happens unless its ``config.model_type``
            is in :data:`FUSED_MODEL_TYPES`.
        prepack: also keep a oneDNN-prepacked copy of each fused fp32 or bf16 CPU weight (as
            ``prepack_weights`` does for single linears, see :mod:`._prepack`).

    Returns:
        (fused groups, of which prepacked), counting groups an earlier runner on the same
        model fused (an engine restart finds them fused already).
    """
    if getattr(getattr(model, "config", None), "model_type", None) not in FUSED_MODEL_TYPES:
        return 0, 0
    groups = packed = 0
    for parent in model.modules():
        for names in SIBLINGS:
            found = [getattr(parent, n, None) for n in names]
            mods: list[Any] = [m for m in found if m is not None]
            if len(mods) != len(names):
                continue
            done = [m.__dict__.get("forward") for m in mods]
            if all(getattr(f, "sagellm_fused", False) for f in done):
                groups += 1
                packed += all(getattr(f, "sagellm_prepacked", False) for f in done)
                continue
            if not _fusable(mods):
                continue
            group = _FusedGroup(mods, prepack)
            pack = group.packed is not None
            for i, m in enumerate(mods):
                m.forward = group.member(i)
            groups += 1
            packed += pack
    return groups, packed
