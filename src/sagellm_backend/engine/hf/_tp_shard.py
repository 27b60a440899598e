"""Tensor-parallel sharding of a loaded Hugging Face decoder, in place.

:func:`shard_model` keeps one rank's share of every decoder layer, the way transformers'
``tp_plan`` splits them (Megatron-style):

* attention: the query/key/value projections are split column-wise by head (rank ``r`` of
  ``N`` keeps heads ``r*H/N .. (r+1)*H/N - 1`` of the query heads and the matching range of
  the key/value heads, so grouped-query attention stays aligned), the output projection
  row-wise (it reads only this rank's heads) followed by an all-reduce;
* MLP: the gate/up (GPT-2: ``c_fc``) projections column-wise, the down (GPT-2: ``c_proj``)
  projection row-wise followed by an all-reduce.

Embeddings, norms and the LM head stay whole on every rank. The split comes from the
model's own ``base_model_tp_plan`` (Llama, Mistral, Qwen2, Qwen3, ... declare one: entries
``"colwise"`` / ``"rowwise"``) or, for GPT-2, which declares none, from
:data:`GPT2_PLAN` (its fused ``c_attn`` Conv1D is split per q/k/v section).

Column-parallel layers stay plain ``nn.Linear`` modules (narrower), so a runner that reads
their weights directly (fusing q/k/v) keeps working; row-parallel layers become
:class:`RowParallelLinear` / :class:`RowParallelConv1D`, modules whose forward adds the
all-reduce (a runner that calls a non-plain linear as a module, as the paged runner does,
gets it). The model config is rewritten to the rank's shares (``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``; ``head_dim`` pinned) so that the KV
geometry and the runner read the rank's heads.

Invariants:
    * After sharding, ``sum over ranks`` of a row-parallel layer's partial outputs plus its
      bias equals the unsharded layer's output (up to float summation order).
    * The bias of a row-parallel layer is added once, after the all-reduce.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sagellm_backend.engine.hf._tp_config import model_geometry

__all__ = [
    "GPT2_PLAN",
    "CommStats",
    "RowParallelConv1D",
    "RowParallelLinear",
    "ShardInfo",
    "shard_model",
    "timed_all_reduce",
]

#: Our plan for GPT-2 (transformers declares none): module pattern -> split style.
GPT2_PLAN: dict[str, str] = {
    "h.*.attn.c_attn": "colwise_qkv_conv1d",
    "h.*.attn.c_proj": "rowwise_conv1d",
    "h.*.mlp.c_fc": "colwise_conv1d",
    "h.*.mlp.c_proj": "rowwise_conv1d",
}

_LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@dataclass
class CommStats:
    """Time and volume of the all-reduces this process ran (one per row-parallel layer).

    Attributes:
        calls: all-reduces run.
        seconds: wall time spent in them (waiting for the slowest rank included).
        bytes: bytes reduced (each rank's tensor size).
    """

    calls: int = 0
    seconds: float = 0.0
    bytes: int = 0

    def reset(self) -> None:
        """Zero every counter."""
        self.calls, self.seconds, self.bytes = 0, 0.0, 0


AllReduce = Callable[[torch.Tensor], None]


class RowParallelLinear(nn.Linear):
    """``nn.Linear`` holding a slice of the input features; output summed over ranks.

    ``forward(x) = all_reduce(x @ W_r^T) + b`` where ``W_r`` is this rank's column slice.
    A subclass, not a plain ``nn.Linear``: runners that read plain linears' weights
    directly call this one as a module, so the all-reduce always runs.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, reduce: AllReduce) -> None:
        out_f, in_f = int(weight.shape[0]), int(weight.shape[1])
        super().__init__(in_f, out_f, bias=bias is not None, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)
        self._reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(x, self.weight)
        self._reduce(out)
        return out if self.bias is None else out + self.bias


class RowParallelConv1D(nn.Module):
    """GPT-2 ``Conv1D`` (``y = x @ W + b``, ``W`` of ``[in, out]``) holding a row slice of W."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, reduce: AllReduce) -> None:
        super().__init__()
        self.nf = int(weight.shape[1])
        self.nx = int(weight.shape[0])
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self._reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.nf)
        out = torch.mm(x.reshape(-1, x.shape[-1]), self.weight)
        self._reduce(out)
        return (out + self.bias).view(shape)


@dataclass(frozen=True)
class ShardInfo:
    """What one rank keeps.

    Attributes:
        rank / world_size: this rank and the group size.
        plan: ``"tp_plan"`` (the model's own) or ``"gpt2"`` (ours).
        num_heads / num_kv_heads: attention heads on this rank.
        head_dim: elements per head (unchanged by sharding).
        layers_sharded: modules replaced or narrowed.
        weight_bytes: bytes of this rank's parameters after sharding.
    """

    rank: int
    world_size: int
    plan: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layers_sharded: int
    weight_bytes: int


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _pattern(p: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(p).replace(r"\*", r"\d+") + "$")


def _slice(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    n = t.shape[dim]
    if n % world:
        raise ValueError(f"cannot split dimension {dim} of size {n} over {world} ranks")
    part = n // world
    return t.narrow(dim, rank * part, part).detach().clone().contiguous()


def _colwise_linear(mod: nn.Module, rank: int, world: int) -> nn.Linear:
    if type(mod) is not nn.Linear:
        raise ValueError(
            f"tensor parallelism needs plain nn.Linear layers, got {type(mod).__name__} "
            "(quantised models cannot be sharded)"
        )
    w = _slice(mod.weight, 0, rank, world)
    new = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, device="meta")
    new.weight = nn.Parameter(w, requires_grad=False)
    if mod.bias is not None:
        new.bias = nn.Parameter(_slice(mod.bias, 0, rank, world), requires_grad=False)
    return new


def _rowwise_linear(mod: nn.Module, rank: int, world: int, reduce: AllReduce) -> nn.Module:
    if type(mod) is not nn.Linear:
        raise ValueError(
            f"tensor parallelism needs plain nn.Linear layers, got {type(mod).__name__} "
            "(quantised models cannot be sharded)"
        )
    bias = mod.bias.detach().clone() if mod.bias is not None else None
    return RowParallelLinear(_slice(mod.weight, 1, rank, world), bias, reduce)


def _conv1d_parts(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if type(mod).__name__ != "Conv1D":
        raise ValueError(f"expected a GPT-2 Conv1D, got {type(mod).__name__}")
    w, b = mod.weight, mod.bias
    assert isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor)
    return w, b


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _colwise_conv1d(mod: nn.Module, rank: int, world: int, sections: int) -> nn.Module:
    """Conv1D column split; with ``sections`` > 1 each section (q, k, v) is split alike."""
    w, b = _conv1d_parts(mod)
    ws = torch.chunk(w.detach(), sections, dim=1)
    bs = torch.chunk(b.detach(), sections, dim=0)
    new_w = torch.cat([_slice(x, 1, rank, world) for x in ws], dim=1).contiguous()
    new_b = torch.cat([_slice(x, 0, rank, world) for x in bs], dim=0).contiguous()
    mod.weight = nn.Parameter(new_w, requires_grad=False)
    mod.bias = nn.Parameter(new_b, requires_grad=False)
    setattr(mod, "nf", int(new_w.shape[1]))  # noqa: B010 - Conv1D's width attribute
    return mod


def shard_model(model: Any, rank: int, world_size: int, all_reduce: AllReduce) -> ShardInfo:
    """Keep rank ``rank``'s share of ``model`` (in place; see the module docstring).

    Args:
        model: a loaded ``*ForCausalLM`` of a supported family, on one device.
        rank: this rank (``0 <= rank < world_size``).
        world_size: the number of ranks.
        all_reduce: in-place sum of a tensor over the ranks (run by every row-parallel
            layer's forward).

    Raises:
        ValueError: the architecture has no usable plan, a layer is not a plain linear
            (quantised), or the heads / kv heads / MLP width do not divide by
            ``world_size``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
    config = _text_config(model.config)
    if getattr(config, "tensor_parallel_shard", None) is not None:
        raise ValueError(f"the model is already a shard {config.tensor_parallel_shard}")
    geo = model_geometry(config)
    for key, val in geo.items():
        if val % world_size:
            raise ValueError(f"{key}={val} is not divisible by tensor_parallel_size={world_size}")
    model_type = getattr(config, "model_type", None)
    base = getattr(model, "base_model", None) or getattr(model, model.base_model_prefix)
    count = 0
    heads = geo["num_attention_heads"]
    kv_heads = geo["num_key_value_heads"]
    if model_type == "gpt2":
        head_dim = int(config.n_embd // heads)
        plan = "gpt2"
        styles = GPT2_PLAN
    else:
        first_attn = None
        for mod in base.modules():
            if hasattr(mod, "q_proj") and hasattr(mod, "o_proj"):
                first_attn = mod
                break
        head_dim = int(
            getattr(config, "head_dim", None)
            or getattr(first_attn, "head_dim", None)
            or config.hidden_size // heads
        )
        raw = getattr(config, "base_model_tp_plan", None) or {}
        styles = {k: v for k, v in raw.items() if k.startswith("layers.")}
        if model_type not in _LLAMA_FAMILY and not styles:
            raise ValueError(
                f"model_type {model_type!r} has no tensor-parallel plan (supported: gpt2 and "
                f"models with a base_model_tp_plan such as {sorted(_LLAMA_FAMILY)})"
            )
        unknown = {v for v in styles.values() if v not in ("colwise", "rowwise")}
        if unknown:
            raise ValueError(
                f"model_type {model_type!r}: tp_plan styles {sorted(unknown)} are not "
                "supported (only 'colwise' and 'rowwise')"
            )
        plan = "tp_plan"
    compiled = [(_pattern(p), s) for p, s in styles.items()]
    for name, mod in list(base.named_modules()):
        style = next((s for pat, s in compiled if pat.match(name)), None)
        if style is None:
            continue
        new: nn.Module
        if style == "colwise":
            new = _colwise_linear(mod, rank, world_size)
        elif style == "rowwise":
            new = _rowwise_linear(mod, rank, world_size, all_reduce)
        elif style == "colwise_qkv_conv1d":
            new = _colwise_conv1d(mod, rank, world_size, 3)
        elif style == "colwise_conv1d":
            new = _colwise_conv1d(mod, rank, world_size, 1)
        else:  # rowwise_conv1d
            w, b = _conv1d_parts(mod)
            new = RowParallelConv1D(_slice(w, 0, rank, world_size), b.detach().clone(), all_reduce)
        if new is not mod:
            _replace(base, name, new)
        count += 1
    if count == 0:
        raise ValueError(f"model_type {model_type!r}: the tensor-parallel plan matched no layer")
    local_heads, local_kv = heads // world_size, kv_heads // world_size
    for mod in base.modules():
        if model_type == "gpt2" and type(mod).__name__ == "GPT2Attention":
            mod.num_heads = local_heads
            mod.split_size = local_heads * head_dim
        for attr, val in (("num_heads", local_heads), ("num_key_value_heads", local_kv)):
            if model_type != "gpt2" and isinstance(getattr(mod, attr, None), int):
                setattr(mod, attr, val)
    # The config now describes this rank's share (KV geometry, runners read it).
    config.head_dim = head_dim
    if model_type == "gpt2":
        config.n_head = local_heads
        if getattr(config, "n_inner", None):
            config.n_inner = geo["intermediate_size"] // world_size
    else:
        config.num_attention_heads = local_heads
        config.num_key_value_heads = local_kv
        if getattr(config, "intermediate_size", None):
            config.intermediate_size = geo["intermediate_size"] // world_size
    config.tensor_parallel_shard = (rank, world_size)  # marks a sharded config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return ShardInfo(
        rank=rank,
        world_size=world_size,
        plan=plan,
        num_heads=local_heads,
        num_kv_heads=local_kv,
        head_dim=head_dim,
        layers_sharded=count,
        weight_bytes=int(weight_bytes),
    )


def timed_all_reduce(
    reduce: Callable[[torch.Tensor], None], stats: CommStats
) -> Callable[[torch.Tensor], None]:
    """Wrap ``reduce`` so that each call is counted in ``stats``."""

    def run(t: torch.Tensor) -> None:
        t0 = time.perf_counter()
        reduce(t)
        stats.seconds += time.perf_counter() - t0
        stats.calls += 1
        stats.bytes += t.numel() * t.element_size()

    return run
