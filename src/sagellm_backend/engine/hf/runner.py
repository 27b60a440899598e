"""Model runners of the HF engine core: one forward pass per scheduler step.

A scheduler step hands the runner a list of :class:`SeqChunk` -- for every running
sequence, the tokens whose K/V are computed in this step (a whole or partial prompt, or the
one token sampled last step) -- and gets back float32 logits for the chunks that asked for
them (``need_logits``), one row per such chunk, in chunk order.

Two runners share that contract:

* :class:`PagedDecoderRunner` runs Llama-family decoder models (Llama, Mistral, Qwen2,
  Qwen3: layers with ``self_attn.{q,k,v,o}_proj``, ``mlp``, ``input_layernorm``,
  ``post_attention_layernorm``, plus ``model.norm``, ``model.rotary_emb`` and
  ``lm_head``) itself, with the model's own modules and weights, and keeps K/V in the
  provider's paged pool (:class:`~sagellm_backend.kv.storage.TorchKVStorage`):

  - every token of a step -- prompt chunks of several requests and the decode tokens of
    all running requests -- is packed into one ``[T, hidden]`` tensor with no padding, so
    each linear layer is a single matrix multiply over real tokens;
  - new K/V are scattered into their slots (``index_copy_``), prompt chunks attend
    causally within themselves (SDPA per segment) and, after a prefix-cache hit or in a
    later chunk, to the cached pages before them (gathered by slot, with an offset causal
    mask); decode tokens attend in one batched SDPA over their pages gathered by block
    table (queries of one KV head grouped, so GQA needs no K/V repetition);
  - per-step metadata (slots, positions, rotary tables, masks, page indices) is built once
    and shared by all layers, and logits are computed only for the last token of the
    chunks that need them.
  - steps over :data:`BUFFER_MIN_ROWS` rows (prefill) write the fused q/k/v and gate/up
    outputs into buffers reused by every layer and step, and run the activation and
    gating in place: a fresh multi-megabyte tensor per layer costs page faults each time.

  Rotary embeddings come from the model's own ``rotary_emb`` (so rope scaling is honoured):
  a cos/sin table over the whole context is computed once at start, or per step for
  position-dependent rope types (``dynamic``, ``longrope``). Plain ``nn.Linear`` q/k/v and
  gate/up projections are fused into one weight each (the model's parameters become views
  of the fused tensor: no extra memory, same values); quantised (bitsandbytes) or hooked
  layers are called as modules and keep working unchanged.

* :class:`HFCacheRunner` is the fallback for every other architecture (GPT-2, ...): the
  model's own forward with one ``DynamicCache`` per sequence. KV admission still goes
  through the KV manager (accounting), but prefix pages are not reused by it.

Invariants:
    * Runners never touch the KV manager; the scheduler passes block tables in chunks and
      reports computed tokens to the manager after :meth:`ModelRunner.execute` returns.
    * ``execute`` is called from the scheduler thread only, under ``torch.inference_mode``.
    * Device work goes through tensors on the runner's device; nothing here calls a
      device-specific API.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from torch import nn

from sagellm_backend.engine.runners.base import ModelRunner, SeqChunk

__all__ = [
    "BUFFER_MIN_ROWS",
    "PACK_MIN_ROWS",
    "PACK_ROWS",
    "PAGED_MODEL_TYPES",
    "HFCacheRunner",
    "ModelRunner",
    "PagedDecoderRunner",
    "SeqChunk",
    "mkl_prepack_available",
    "model_compute_dtype",
    "model_context_length",
    "model_device",
    "paged_unsupported_reason",
]

#: ``config.model_type`` values :class:`PagedDecoderRunner` runs (others use the fallback).
PAGED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

# Rope types whose frequencies depend on the sequence length: no precomputed table.
_DYNAMIC_ROPE_TYPES = frozenset({"dynamic", "longrope"})


# ---------------------------------------------------------------------------- helpers
def model_device(model: Any) -> torch.device:
    """Device of the model's input embeddings (where inputs must go)."""
    emb = model.get_input_embeddings()
    return torch.device(emb.weight.device)


def model_compute_dtype(model: Any) -> torch.dtype:
    """Dtype activations (and K/V) have: the input embeddings' dtype."""
    emb = model.get_input_embeddings()
    dtype: torch.dtype = emb.weight.dtype
    return dtype


def model_context_length(config: Any) -> int:
    """Longest sequence the model handles.

    ``max_position_embeddings`` (GPT-2: ``n_positions``; 2048 when the config has neither).

    A sliding window does not shorten it: every runner honours the window (the paged
    runners in their attention, the batched fallback through the model's own mask).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if not isinstance(n, int) or n <= 0:
        n = 2048
    return int(n)


def _active_sliding_window(config: Any) -> int | None:
    """The sliding window the model applies (None when it applies none)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if isinstance(window, int) and window > 0 and getattr(text, "use_sliding_window", True):
        return window
    return None


def _single_device(model: Any) -> bool:
    devmap = getattr(model, "hf_device_map", None)
    if isinstance(devmap, dict) and len({str(d) for d in devmap.values()}) > 1:
        return False
    devices = {p.device for p in model.parameters()}
    return len(devices) == 1 and torch.device("meta") not in devices


def paged_unsupported_reason(model: Any) -> str | None:
    """Why :class:`PagedDecoderRunner` cannot run ``model`` (None when it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PAGED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {sorted(PAGED_MODEL_TYPES)}"
    inner = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if inner is None or not hasattr(inner, name):
            return f"model.model has no {name!r}"
    if not isinstance(getattr(model, "lm_head", None), nn.Module):
        return "model has no lm_head module"
    assert inner is not None
    for layer in inner.layers:
        attn = getattr(layer, "self_attn", None)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if attn is None or not isinstance(getattr(attn, name, None), nn.Module):
                return f"decoder layer has no self_attn.{name}"
        for name in ("mlp", "input_layernorm", "post_attention_layernorm"):
            if not isinstance(getattr(layer, name, None), nn.Module):
                return f"decoder layer has no {name}"
    window = _active_sliding_window(config)
    if window is not None and window < model_context_length(config):
        return f"sliding window {window} (the hand-written forward attends to the whole context)"
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        return "pretraining_tp > 1 is not supported"
    if not _single_device(model):
        return "the model is spread over several devices (device_map) or offloaded"
    return None


def _plain_linear(module: Any) -> bool:
    """A bare ``nn.Linear`` (not quantised, no accelerate hook)."""
    return type(module) is nn.Linear and getattr(module, "_hf_hook", None) is None


def _fuse_linears(mods: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Concatenate plain linears' weights (and biases) into one; rebind them as views.

    Returns ``(weight, bias)`` of the fused projection, or None when the layers cannot be
    fused (mixed dtypes/devices, some with bias and some without). After fusing, each
    module's ``weight``/``bias`` is a row slice of the fused tensor: identical values, no
    extra memory, and the model's own forward keeps working.
    """
    if not all(_plain_linear(m) for m in mods):
        return None
    weights = [m.weight for m in mods]
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
        return None
    has_bias = [m.bias is not None for m in mods]
    if any(has_bias) and not all(has_bias):
        return None
    with torch.no_grad():
        fused_w = torch.cat([w.detach() for w in weights], 0).contiguous()
        fused_b = (
            torch.cat([m.bias.detach() for m in mods if m.bias is not None], 0).contiguous()
            if all(has_bias)
            else None
        )
        row = 0
        for m in mods:
            n = m.weight.shape[0]
            m.weight = nn.Parameter(fused_w[row : row + n], requires_grad=False)
            if fused_b is not None:
                m.bias = nn.Parameter(fused_b[row : row + n], requires_grad=False)
            row += n
    return fused_w, fused_b


# Rows of the static decode shape used with prepacked weights (see PagedDecoderRunner).
PACK_ROWS = 16
# Steps with fewer real tokens than this run unpadded (a 1-row GEMV beats a 16-row GEMM).
PACK_MIN_ROWS = 4
# Steps with more rows than this write the fused q/k/v and gate/up outputs into reused buffers.
BUFFER_MIN_ROWS = 64
_SILU_CLASSES = frozenset({"SiLU", "SiLUActivation"})
_FUSED_RMSNORM_CLASSES = frozenset(
    {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
)


def mkl_prepack_available() -> bool:
    """Whether this torch can prepack fp32 linear weights with MKL (x86 CPU builds)."""
    ops = getattr(torch.ops, "mkl", None)
    mkl_on: Callable[[], bool] = torch.backends.mkl.is_available
    return (
        bool(mkl_on())
        and ops is not None
        and hasattr(ops, "_mkl_reorder_linear_weight")
        and hasattr(ops, "_mkl_linear")
    )


class _Linear:
    """One projection: a plain weight or the model's own module.

    A plain weight runs through ``F.linear`` (through an MKL-prepacked copy for
    :data:`PACK_ROWS`-row inputs once :meth:`prepack` was called); a quantised or hooked
    layer is called as its module.
    """

    __slots__ = ("bias", "module", "packed", "weight")

    def __init__(
        self,
        *,
        module: nn.Module | None = None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        if module is not None and _plain_linear(module):
            linear: nn.Linear = module  # type: ignore[assignment]
            weight, bias, module = linear.weight, linear.bias, None
        self.module = module
        self.weight = weight
        self.bias = bias
        self.packed: torch.Tensor | None = None

    def prepack(self) -> None:
        """Prepack a CPU fp32 weight for :data:`PACK_ROWS`-row inputs (a second copy)."""
        w = self.weight
        if w is not None and w.device.type == "cpu" and w.dtype == torch.float32:
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), PACK_ROWS)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] == PACK_ROWS:
            out: torch.Tensor = torch.ops.mkl._mkl_linear(
                x, self.packed, self.weight, self.bias, PACK_ROWS
            )
            return out
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        assert self.module is not None
        res: torch.Tensor = self.module(x)
        return res


def _rmsnorm(module: nn.Module, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm as a callable.

    ``F.rms_norm`` for the standard fp32 RMSNorm of the supported models (bitwise equal to
    the module's forward: one fused kernel instead of seven), else the module itself.
    """
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if (
        type(module).__name__ in _FUSED_RMSNORM_CLASSES
        and dtype == torch.float32
        and isinstance(weight, torch.Tensor)
        and weight.dtype == torch.float32
        and isinstance(eps, float)
        and getattr(module, "_hf_hook", None) is None
    ):
        shape = (int(weight.shape[-1]),)
        w = weight.detach()

        def fused(x: torch.Tensor) -> torch.Tensor:
            return F.rms_norm(x, shape, w, eps)

        return fused
    return module


@dataclass(slots=True)
class _Layer:
    """Handles of one decoder layer (norms, projections, K/V views)."""

    input_norm: Callable[[torch.Tensor], torch.Tensor]
    post_norm: Callable[[torch.Tensor], torch.Tensor]
    qkv: _Linear | None  # fused q/k/v, or None: q, k, v below
    q: _Linear
    k: _Linear
    v: _Linear
    o: _Linear
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    gate_up: _Linear | None  # fused gate/up, or None: the model's mlp module
    down: _Linear | None
    act_fn: Callable[[torch.Tensor], torch.Tensor] | None
    mlp: nn.Module
    k_cache: torch.Tensor
    v_cache: torch.Tensor

    def linears(self) -> list[_Linear]:
        found = [self.o] + ([self.qkv] if self.qkv is not None else [self.q, self.k, self.v])
        if self.gate_up is not None and self.down is not None:
            found += [self.gate_up, self.down]
        return found


@dataclass(slots=True)
class _Segment:
    """A prompt chunk inside the packed batch."""

    row: int  # first row in the packed tensor
    length: int
    ctx_slots: torch.Tensor | None  # slots of positions 0..start+length (prefix present)
    mask: torch.Tensor | None  # [1, 1, length, ctx] causal-with-offset mask (prefix present)


@dataclass(slots=True)
class _Step:
    """Metadata of one step, shared by every layer."""

    num_tokens: int  # rows of the packed tensor (padding included)
    num_real: int  # rows that are real tokens (the first ones)
    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor  # [num_real]
    segments: list[_Segment]
    dec_row: int
    dec_count: int
    dec_pages: torch.Tensor | None  # [B * nb] page ids, row-major
    dec_len: int  # nb * block_size
    dec_mask: torch.Tensor | None  # [B, 1, 1, dec_len]
    ws_rows: torch.Tensor | None  # decode via the workspace: its rows (None: gather path)
    ws_dense: bool  # ws_rows == 0..B-1
    ws_pos: torch.Tensor | None  # positions of the decode tokens
    out_rows: torch.Tensor | None  # rows whose logits are returned (chunk order)
    out_prefix: int  # > 0: the logits rows are exactly rows 0..out_prefix-1


class _DecodeWorkspace:
    """Contiguous K/V of the decoding sequences, mirrored from the paged pool (CPU).

    Gathering every decoding sequence's pages for every layer at every step moves the whole
    resident K/V through memory three times (read, write, read again by attention). The
    workspace keeps one row per decoding sequence, ``[rows, kv_heads, capacity, head_dim]``
    per layer: a sequence's row is filled from the pool once, when it first decodes, and
    each step then writes only the new token into it (and into the pool, which stays the
    source of truth for prefix caching and recomputation). Rows are kept dense: a released
    sequence's row is replaced by the last row.

    Invariant: for every sequence with a row, positions ``0..lens[row]-1`` of the row equal
    its K/V in the pool.
    """

    def __init__(self, runner: PagedDecoderRunner, rows: int, max_bytes: int) -> None:
        self.runner = runner
        self.rows = rows
        self.max_bytes = max_bytes
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.row_of: dict[str, int] = {}
        self.seq_of: list[str] = []
        self.lens: list[int] = []

    def _bytes(self, capacity: int) -> int:
        r = self.runner
        elem = torch.empty(0, dtype=r.dtype).element_size()
        per_layer = 2 * self.rows * r.num_kv_heads * capacity * r.head_dim * elem
        return per_layer * len(r._layers)

    def clear(self) -> None:
        """Forget every row (they are refilled from the pool when used again)."""
        self.row_of.clear()
        self.seq_of.clear()
        self.lens.clear()

    def _grow(self, need: int) -> bool:
        r = self.runner
        cap = max(256, self.capacity)
        while cap < need:
            cap *= 2
        cap = min(cap, r.max_context)
        if cap < need or self._bytes(cap) > self.max_bytes:
            return False
        shape = (self.rows, r.num_kv_heads, cap, r.head_dim)
        new_k = [torch.zeros(shape, dtype=r.dtype, device=r.device) for _ in r._layers]
        new_v = [torch.zeros(shape, dtype=r.dtype, device=r.device) for _ in r._layers]
        if self.capacity:
            used = len(self.seq_of)
            for old, new in zip((*self.k, *self.v), (*new_k, *new_v), strict=True):
                new[:used, :, : self.capacity].copy_(old[:used])
        self.k, self.v, self.capacity = new_k, new_v, cap
        return True

    def plan(self, decode: list[SeqChunk]) -> bool:
        """Give every decoding chunk a row (filling new rows); False: use the gather path."""
        if len(decode) > self.rows:
            self.clear()
            return False
        need = max(c.start + 1 for c in decode)
        if need > self.capacity and not self._grow(need):
            self.clear()
            return False
        wanted = {c.seq_id for c in decode}
        joining = sum(1 for c in decode if c.seq_id not in self.row_of)
        for seq_id in [s for s in self.seq_of if s not in wanted]:
            if len(self.seq_of) + joining <= self.rows:
                break
            self.release(seq_id)  # make room: it is refilled if it decodes again
        if len(self.seq_of) + joining > self.rows:  # cannot happen; stay correct anyway
            self.clear()
        bs = self.runner.block_size
        h_kv, cap = self.runner.num_kv_heads, self.capacity
        src: list[int] = []  # pool slots of the positions to refill
        dst: list[int] = []  # (row * kv_heads) * capacity + position, head 0
        for c in decode:
            row = self.row_of.get(c.seq_id)
            if row is None:
                row = len(self.seq_of)
                self.row_of[c.seq_id] = row
                self.seq_of.append(c.seq_id)
                self.lens.append(0)
            if self.lens[row] != c.start:  # new row, or out of step with the pool: refill
                bt = c.block_table
                src.extend(bt[p // bs] * bs + p % bs for p in range(c.start))
                base = row * h_kv * cap
                dst.extend(range(base, base + c.start))
            self.lens[row] = c.start + 1
        if src:
            self._refill(src, dst)
        return True

    def _refill(self, src: list[int], dst: list[int]) -> None:
        """Copy pool slots ``src`` into the rows at flat head-0 offsets ``dst``.

        One gather and one scatter per layer and K/V for all refilled rows together: row
        ``r``, head ``h``, position ``p`` is row ``(r * kv_heads + h) * capacity + p`` of the
        buffer viewed as ``[-1, head_dim]``.
        """
        r = self.runner
        dev = r.device
        src_t = torch.tensor(src, dtype=torch.long, device=dev)
        heads = torch.arange(r.num_kv_heads, dtype=torch.long, device=dev) * self.capacity
        dst_t = (torch.tensor(dst, dtype=torch.long, device=dev).view(-1, 1) + heads).view(-1)
        d = r.head_dim
        for lay, wk, wv in zip(r._layers, self.k, self.v, strict=True):
            wk.view(-1, d).index_copy_(0, dst_t, lay.k_cache.index_select(0, src_t).view(-1, d))
            wv.view(-1, d).index_copy_(0, dst_t, lay.v_cache.index_select(0, src_t).view(-1, d))

    def release(self, seq_id: str) -> None:
        """Drop a sequence's row, moving the last row into it."""
        row = self.row_of.pop(seq_id, None)
        if row is None:
            return
        last = len(self.seq_of) - 1
        if row != last:
            moved = self.seq_of[last]
            n = self.lens[last]
            for buf in (*self.k, *self.v):
                buf[row, :, :n].copy_(buf[last, :, :n])
            self.seq_of[row] = moved
            self.lens[row] = n
            self.row_of[moved] = row
        self.seq_of.pop()
        self.lens.pop()


class PagedDecoderRunner:
    """Runs a Llama-family model with K/V in the paged pool (see the module docstring).

    Args:
        model: a loaded ``*ForCausalLM`` whose :func:`paged_unsupported_reason` is None.
        layer_kv: ``layer_kv(i) -> (k, v)``, each ``[num_pages * block_size, kv_heads,
            head_dim]`` in the model's compute dtype on the model's device (a
            :class:`~sagellm_backend.kv.storage.TorchKVStorage`'s ``layer_kv``).
        block_size: tokens per page.
        max_context: positions covered by the rotary table (longest sequence).
        fuse_projections: fuse plain q/k/v and gate/up linears (see module docstring).
        prepack_weights: on CPU with fp32 weights and an MKL build of torch, keep an
            MKL-prepacked copy of every plain linear weight and run steps of
            :data:`PACK_MIN_ROWS`..:data:`PACK_ROWS` tokens (decode batches) padded to
            :data:`PACK_ROWS` rows with it: small GEMMs then skip repacking the weight on
            every call. Costs a second copy of the linear weights; results are the same as
            the unpacked GEMM's. Ignored where unsupported.
        decode_workspace_rows: > 0 keeps the K/V of up to that many decoding sequences in a
            contiguous workspace (see :class:`_DecodeWorkspace`) instead of gathering their
            pages every step; meant for the CPU, where that gather is memory-bound.
        decode_workspace_bytes: the workspace's size limit; beyond it steps gather pages.

    Raises:
        ValueError: the model is not supported or the KV tensors do not match it.
    """

    uses_paged_kv = True

    def __init__(
        self,
        model: Any,
        layer_kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        *,
        block_size: int,
        max_context: int,
        fuse_projections: bool = True,
        prepack_weights: bool = True,
        decode_workspace_rows: int = 0,
        decode_workspace_bytes: int = 512 << 20,
    ) -> None:
        reason = paged_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"PagedDecoderRunner cannot run this model: {reason}")
        self.name = "paged"
        self.model = model
        inner: Any = model.model
        self._inner = inner
        self.device = model_device(model)
        self.dtype = model_compute_dtype(model)
        self._embed: nn.Module = inner.embed_tokens
        self._norm = _rmsnorm(inner.norm, self.dtype)
        self._lm_head = _Linear(module=model.lm_head)
        self.vocab_size = int(self._embed.weight.shape[0])
        self.block_size = int(block_size)
        self.max_context = int(max_context)
        cfg: Any = model.config
        first = inner.layers[0].self_attn
        self.head_dim = int(
            getattr(first, "head_dim", 0) or cfg.hidden_size // cfg.num_attention_heads
        )
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        self.scaling = float(getattr(first, "scaling", self.head_dim**-0.5))
        self._layers: list[_Layer] = []
        for i, layer in enumerate(inner.layers):
            k_cache, v_cache = layer_kv(i)
            expect = (self.num_kv_heads, self.head_dim)
            if tuple(k_cache.shape[1:]) != expect or k_cache.dtype != self.dtype:
                raise ValueError(
                    f"KV storage of layer {i} is {tuple(k_cache.shape[1:])} {k_cache.dtype}, "
                    f"the model needs (kv_heads, head_dim) = {expect} {self.dtype}"
                )
            if k_cache.device != self.device:
                raise ValueError(
                    f"KV storage is on {k_cache.device} but the model is on {self.device}"
                )
            self._layers.append(self._layer(layer, k_cache, v_cache, fuse_projections))
        self.prepacked = bool(prepack_weights) and self.device.type == "cpu"
        self.prepacked = self.prepacked and self.dtype == torch.float32
        self.prepacked = self.prepacked and mkl_prepack_available()
        if self.prepacked:
            for lay in self._layers:
                for lin in lay.linears():
                    lin.prepack()
            self._lm_head.prepack()
        self._num_slots = int(self._layers[0].k_cache.shape[0])
        # Decode attention reads whole pages and masks the slots past each sequence's end; a
        # masked slot holding NaN (never-written memory) would still poison the weighted sum
        # (0 * NaN), so pages are zeroed before their first use (lazily: memory the pool
        # never hands out is never touched). Stale finite values are harmless.
        self._zeroed_pages = 0
        # Reused outputs of the fused projections for large (prefill) steps: a fresh
        # multi-megabyte tensor per layer costs page faults on every step (see _proj_into).
        self._bufs: dict[str, torch.Tensor] = {}
        self._ws = (
            _DecodeWorkspace(self, decode_workspace_rows, decode_workspace_bytes)
            if decode_workspace_rows > 0
            else None
        )
        self._rotary: nn.Module = inner.rotary_emb
        rope_type = str(getattr(self._rotary, "rope_type", "default"))
        self._dynamic_rope = rope_type in _DYNAMIC_ROPE_TYPES
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        if not self._dynamic_rope:
            self._cos, self._sin = self._rope_tables(
                torch.arange(self.max_context, device=self.device)
            )

    def _layer(
        self, layer: Any, k_cache: torch.Tensor, v_cache: torch.Tensor, fuse: bool
    ) -> _Layer:
        attn = layer.self_attn
        mlp = layer.mlp
        qkv = gate_up = down = None
        act_fn = None
        if fuse:
            fused = _fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            if fused is not None:
                qkv = _Linear(weight=fused[0], bias=fused[1])
            parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
            act = getattr(mlp, "act_fn", None)
            if all(isinstance(p, nn.Module) for p in parts) and callable(act):
                fused = _fuse_linears([parts[0], parts[1]])  # type: ignore[list-item]
                if fused is not None:
                    gate_up = _Linear(weight=fused[0], bias=fused[1])
                    down = _Linear(module=parts[2])
                    act_fn = act
        return _Layer(
            input_norm=_rmsnorm(layer.input_layernorm, self.dtype),
            post_norm=_rmsnorm(layer.post_attention_layernorm, self.dtype),
            qkv=qkv,
            q=_Linear(module=attn.q_proj),
            k=_Linear(module=attn.k_proj),
            v=_Linear(module=attn.v_proj),
            o=_Linear(module=attn.o_proj),
            q_norm=getattr(attn, "q_norm", None),
            k_norm=getattr(attn, "k_norm", None),
            gate_up=gate_up,
            down=down,
            act_fn=act_fn,
            mlp=mlp,
            k_cache=k_cache,
            v_cache=v_cache,
        )

    # ------------------------------------------------------------------ rotary
    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos and sign-folded sin ``[n, 1, head_dim]`` for ``positions`` (1-D)."""
        probe = torch.empty(1, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            cos, sin = self._rotary(probe, positions.view(1, -1))
        cos = cos[0]
        sin = sin[0]
        if cos.shape[-1] != self.head_dim:
            raise ValueError(
                f"rotary embedding covers {cos.shape[-1]} of {self.head_dim} head dims "
                "(partial rotary is not supported by the paged runner)"
            )
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin_lo, sin_hi] exactly (sign flips
        # are exact), which saves the negation and concatenation per call.
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cos.unsqueeze(1).contiguous(), sin.unsqueeze(1).contiguous()

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x * cos + rotate_half(x) * sin`` for ``x`` of ``[T, heads, head_dim]``."""
        return x * cos + torch.roll(x, self.head_dim // 2, dims=-1) * sin

    # ------------------------------------------------------------------ step metadata
    def _prepare(self, chunks: Sequence[SeqChunk]) -> _Step:
        bs = self.block_size
        dev = self.device
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        segments: list[_Segment] = []
        prefill = [c for c in chunks if len(c.token_ids) > 1 or c.start == 0]
        decode = [c for c in chunks if not (len(c.token_ids) > 1 or c.start == 0)]
        self._validate(chunks)
        ws = self._ws
        use_ws = ws is not None and bool(decode) and ws.plan(decode)
        if use_ws:
            assert ws is not None
            decode.sort(key=lambda c: ws.row_of[c.seq_id])
        row_of: dict[int, int] = {}  # id(chunk) -> row of its last token
        for c in (*prefill, *decode):
            end = c.start + len(c.token_ids)
            ids.extend(c.token_ids)
            bt = c.block_table
            for p in range(c.start, end):
                positions.append(p)
                slots.append(bt[p // bs] * bs + p % bs)
            row_of[id(c)] = len(ids) - 1
        num_real = len(ids)
        num_tokens = num_real
        if self.prepacked and PACK_MIN_ROWS <= num_real < PACK_ROWS:
            num_tokens = PACK_ROWS  # static shape for the prepacked GEMMs
            ids.extend([0] * (PACK_ROWS - num_real))
            positions.extend([0] * (PACK_ROWS - num_real))
        row = 0
        for c in prefill:
            n = len(c.token_ids)
            if c.start == 0:
                segments.append(_Segment(row, n, None, None))
            else:
                ctx = c.start + n
                bt = c.block_table
                ctx_slots = torch.tensor(
                    [bt[p // bs] * bs + p % bs for p in range(ctx)], dtype=torch.long, device=dev
                )
                q_pos = torch.arange(c.start, ctx, device=dev).view(-1, 1)
                hidden = torch.arange(ctx, device=dev).view(1, -1) > q_pos
                mask = self._additive_mask(hidden, (1, 1, n, ctx))
                segments.append(_Segment(row, n, ctx_slots, mask))
            row += n
        dec_pages = dec_mask = ws_rows = ws_pos = None
        dec_len = 0
        ws_dense = False
        if use_ws:
            assert ws is not None
            rows = [ws.row_of[c.seq_id] for c in decode]
            ws_dense = rows == list(range(len(rows)))
            ws_rows = torch.tensor(rows, dtype=torch.long, device=dev)
            ws_pos = torch.tensor([c.start for c in decode], dtype=torch.long, device=dev)
            dec_len = max(c.start + 1 for c in decode)
            ctx_lens = torch.tensor([c.start + 1 for c in decode], dtype=torch.long, device=dev)
            hidden = torch.arange(dec_len, device=dev).view(1, -1) >= ctx_lens.view(-1, 1)
            dec_mask = self._additive_mask(hidden, (len(decode), 1, 1, dec_len))
        elif decode:
            nb = max(c.start // bs + 1 for c in decode)
            pages: list[int] = []
            for c in decode:
                bt = c.block_table[:nb]
                pages.extend(bt)
                pages.extend([bt[0]] * (nb - len(bt)))  # padding: any valid page, masked out
            dec_pages = torch.tensor(pages, dtype=torch.long, device=dev)
            dec_len = nb * bs
            ctx_lens = torch.tensor([c.start + 1 for c in decode], dtype=torch.long, device=dev)
            hidden = torch.arange(dec_len, device=dev).view(1, -1) >= ctx_lens.view(-1, 1)
            dec_mask = self._additive_mask(hidden, (len(decode), 1, 1, dec_len))
        wanted = [row_of[id(c)] for c in chunks if c.need_logits]
        out_prefix = len(wanted) if wanted == list(range(len(wanted))) else 0
        return _Step(
            num_tokens=num_tokens,
            num_real=num_real,
            ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slots=torch.tensor(slots, dtype=torch.long, device=dev),
            segments=segments,
            dec_row=row,
            dec_count=len(decode),
            dec_pages=dec_pages,
            dec_len=dec_len,
            dec_mask=dec_mask,
            ws_rows=ws_rows,
            ws_dense=ws_dense,
            ws_pos=ws_pos,
            out_rows=None if out_prefix else torch.tensor(wanted, dtype=torch.long, device=dev),
            out_prefix=out_prefix,
        )

    def _validate(self, chunks: Sequence[SeqChunk]) -> None:
        bs = self.block_size
        for c in chunks:
            n = len(c.token_ids)
            if n == 0:
                raise ValueError(f"sequence {c.seq_id!r}: empty chunk")
            end = c.start + n
            if end > self.max_context:
                raise ValueError(
                    f"sequence {c.seq_id!r} reaches position {end}, beyond the context "
                    f"length {self.max_context}"
                )
            if len(c.block_table) * bs < end:
                raise ValueError(
                    f"sequence {c.seq_id!r}: block table of {len(c.block_table)} pages cannot "
                    f"hold {end} tokens"
                )
        top = max(max(c.block_table) for c in chunks) + 1
        if top > self._zeroed_pages:
            self._zero_pages(self._zeroed_pages, top)

    def _additive_mask(self, hidden: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """``0`` / ``-inf`` mask of ``shape`` in the compute dtype.

        Built once per step: a boolean mask would be converted again by every layer's
        attention call.
        """
        mask = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(hidden, float("-inf"))
        return mask.view(shape)

    def _zero_pages(self, start: int, end: int) -> None:
        """Zero pages ``start..end-1`` of every layer (first use of those pages)."""
        bs = self.block_size
        for lay in self._layers:
            lay.k_cache[start * bs : end * bs].zero_()
            lay.v_cache[start * bs : end * bs].zero_()
        self._zeroed_pages = end

    # ------------------------------------------------------------------ forward
    def execute(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Run one step over ``chunks`` (see :class:`ModelRunner`)."""
        step = self._prepare(chunks)
        if self._dynamic_rope:
            cos, sin = self._rope_tables(step.positions)
        else:
            assert self._cos is not None and self._sin is not None
            cos = self._cos.index_select(0, step.positions)
            sin = self._sin.index_select(0, step.positions)
        t, real = step.num_tokens, step.num_real
        h_q, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q_width, kv_width = h_q * d, h_kv * d
        x: torch.Tensor = self._embed(step.ids)
        for li, layer in enumerate(self._layers):
            h = layer.input_norm(x)
            if layer.qkv is not None:
                qkv = self._proj_into("qkv", layer.qkv, h)
                if layer.q_norm is None and layer.k_norm is None:
                    # q and k are adjacent: one rotary pass over both.
                    qk = self._rope(qkv[:, : q_width + kv_width].view(t, h_q + h_kv, d), cos, sin)
                    q, k = qk[:, :h_q], qk[:, h_q:]
                    v = qkv[:, q_width + kv_width :].view(t, h_kv, d)
                else:
                    q3, k3, v3 = torch.split(qkv, [q_width, kv_width, kv_width], dim=-1)
                    q, k = self._qk_norm_rope(layer, q3, k3, cos, sin)
                    v = v3.view(t, h_kv, d)
            else:
                q2, k2 = layer.q(h), layer.k(h)
                q, k = self._qk_norm_rope(layer, q2, k2, cos, sin)
                v = layer.v(h).view(t, h_kv, d)
            k_cache, v_cache = layer.k_cache, layer.v_cache
            if real == t:
                k_cache.index_copy_(0, step.slots, k)
                v_cache.index_copy_(0, step.slots, v)
            else:
                k_cache.index_copy_(0, step.slots, k[:real])
                v_cache.index_copy_(0, step.slots, v[:real])
            attn = self._attention(step, li, q, k, v, k_cache, v_cache)
            x = x + layer.o(attn.reshape(t, q_width))
            h = layer.post_norm(x)
            if layer.gate_up is not None:
                assert layer.act_fn is not None and layer.down is not None
                gate_up = self._proj_into("gate_up", layer.gate_up, h)
                gate, up = gate_up.chunk(2, dim=-1)
                if gate_up.data_ptr() == self._bufs.get("gate_up", gate_up).data_ptr():
                    # Our buffer: activate and gate in place (same kernels, same values).
                    if type(layer.act_fn).__name__ in _SILU_CLASSES:
                        act = F.silu(gate, inplace=True)
                    else:
                        act = layer.act_fn(gate)
                    x = x + layer.down(act.mul_(up))
                else:
                    x = x + layer.down(layer.act_fn(gate) * up)
            else:
                x = x + layer.mlp(h)
        if step.out_prefix:
            if step.out_prefix < t and (t != PACK_ROWS or not self.prepacked):
                x = x[: step.out_prefix]
            logits = self._lm_head(self._norm(x))[: step.out_prefix]
        else:
            assert step.out_rows is not None
            logits = self._lm_head(self._norm(x.index_select(0, step.out_rows)))
        return logits.float()

    def _proj_into(self, name: str, lin: _Linear, h: torch.Tensor) -> torch.Tensor:
        """``lin(h)``; for steps over :data:`BUFFER_MIN_ROWS` rows, into buffer ``name``.

        The buffer is reused by every layer and step (a result is dead before the next
        layer writes the buffer again), so large steps allocate nothing here. Plain
        weights only: ``torch.mm`` into the buffer is the GEMM ``F.linear`` runs.
        """
        t = h.shape[0]
        w = lin.weight
        if t <= BUFFER_MIN_ROWS or w is None or lin.module is not None or h.dim() != 2:
            return lin(h)
        n = int(w.shape[0])
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < t or buf.shape[1] != n or buf.dtype != h.dtype:
            buf = torch.empty((t, n), dtype=h.dtype, device=h.device)
            self._bufs[name] = buf
        out = buf[:t]
        if lin.bias is None:
            torch.mm(h, w.t(), out=out)
        else:
            torch.addmm(lin.bias, h, w.t(), out=out)
        return out

    def _qk_norm_rope(
        self,
        layer: _Layer,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        if layer.q_norm is not None:
            q = layer.q_norm(q)
        if layer.k_norm is not None:
            k = layer.k_norm(k)
        return self._rope(q, cos, sin), self._rope(k, cos, sin)

    def _attention(
        self,
        step: _Step,
        li: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """Attention output ``[T, heads, head_dim]`` for the packed step (0 on padding)."""
        t = step.num_tokens
        h_q, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        scale = self.scaling
        gqa = h_q != h_kv
        single = (len(step.segments) + (1 if step.dec_count else 0)) == 1
        out = None if single and step.num_real == t else q.new_zeros(t, h_q, d)
        for seg in step.segments:
            r0, n = seg.row, seg.length
            # 4-D [1, heads, n, d] inputs take the fused (flash) CPU kernel, GQA included.
            qs = q[r0 : r0 + n].transpose(0, 1).unsqueeze(0)
            if seg.ctx_slots is None:
                ks = k[r0 : r0 + n].transpose(0, 1).unsqueeze(0)
                vs = v[r0 : r0 + n].transpose(0, 1).unsqueeze(0)
                res = F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa
                )
            else:
                ks = k_cache.index_select(0, seg.ctx_slots).transpose(0, 1).unsqueeze(0)
                vs = v_cache.index_select(0, seg.ctx_slots).transpose(0, 1).unsqueeze(0)
                res = F.scaled_dot_product_attention(
                    qs, ks, vs, attn_mask=seg.mask, scale=scale, enable_gqa=gqa
                )
            res = res[0].transpose(0, 1)
            if out is None:
                return res
            out[r0 : r0 + n] = res
        if step.dec_count and step.ws_rows is not None:
            b = step.dec_count
            ws = self._ws
            assert ws is not None and step.ws_pos is not None
            r0 = step.dec_row
            wk, wv = ws.k[li], ws.v[li]
            wk[step.ws_rows, :, step.ws_pos] = k[r0 : r0 + b]
            wv[step.ws_rows, :, step.ws_pos] = v[r0 : r0 + b]
            length = step.dec_len
            if step.ws_dense:
                keys, values = wk[:b, :, :length], wv[:b, :, :length]
            else:
                keys = wk.index_select(0, step.ws_rows)[:, :, :length]
                values = wv.index_select(0, step.ws_rows)[:, :, :length]
            qd = q[r0 : r0 + b].reshape(b, h_kv, h_q // h_kv, d)
            res = F.scaled_dot_product_attention(
                qd, keys, values, attn_mask=step.dec_mask, scale=scale
            ).reshape(b, h_q, d)
            if out is None:
                return res
            out[r0 : r0 + b] = res
        elif step.dec_count:
            b = step.dec_count
            assert step.dec_pages is not None and step.dec_mask is not None
            length = step.dec_len
            bs = self.block_size
            num_pages = self._num_slots // bs
            keys = (
                k_cache.view(num_pages, bs, h_kv, d)
                .index_select(0, step.dec_pages)
                .view(b, length, h_kv, d)
                .transpose(1, 2)
            )
            values = (
                v_cache.view(num_pages, bs, h_kv, d)
                .index_select(0, step.dec_pages)
                .view(b, length, h_kv, d)
                .transpose(1, 2)
            )
            # Queries of the heads sharing one KV head form the "query length" axis.
            qd = q[step.dec_row : step.dec_row + b].reshape(b, h_kv, h_q // h_kv, d)
            res = F.scaled_dot_product_attention(
                qd, keys, values, attn_mask=step.dec_mask, scale=scale
            ).reshape(b, h_q, d)
            if out is None:
                return res
            out[step.dec_row : step.dec_row + b] = res
        assert out is not None
        return out

    def release(self, seq_id: str) -> None:
        """Drop the sequence's workspace row (its K/V stay in the pool)."""
        if self._ws is not None:
            self._ws.release(seq_id)

    def reset(self) -> None:
        """Drop every workspace row."""
        if self._ws is not None:
            self._ws.clear()


class HFCacheRunner:
    """Fallback runner: the model's own forward with one ``DynamicCache`` per sequence.

    Correct for any causal LM transformers can run with a cache; sequences are computed
    one after another (no cross-request batching). A chunk must continue its sequence's
    cache (``start`` equals the tokens cached so far); a sequence seen first with
    ``start > 0`` is an error because this runner cannot read paged K/V.
    """

    uses_paged_kv = False

    def __init__(self, model: Any, *, max_context: int) -> None:
        self.name = "hf-cache"
        self.model = model
        self.device = model_device(model)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.max_context = int(max_context)
        self._caches: dict[str, tuple[Any, int]] = {}
        import inspect

        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else None

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def execute(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Run each chunk through the model (see :class:`ModelRunner`)."""
        rows: list[torch.Tensor] = []
        for c in chunks:
            entry = self._caches.get(c.seq_id)
            if entry is None:
                if c.start != 0:
                    raise ValueError(
                        f"sequence {c.seq_id!r} starts at {c.start} but the fallback runner "
                        "holds no cache for it"
                    )
                cache, cached = self._new_cache(), 0
            else:
                cache, cached = entry
            if c.start != cached:
                raise ValueError(
                    f"sequence {c.seq_id!r}: chunk starts at {c.start}, cache holds {cached}"
                )
            end = c.start + len(c.token_ids)
            if end > self.max_context:
                raise ValueError(
                    f"sequence {c.seq_id!r} reaches position {end}, beyond the context "
                    f"length {self.max_context}"
                )
            ids = torch.tensor([c.token_ids], dtype=torch.long, device=self.device)
            kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True}
            if self._keep_kw is not None:
                kwargs[self._keep_kw] = 1
            out = self.model(input_ids=ids, **kwargs)
            new_cache = getattr(out, "past_key_values", None)
            if new_cache is None:
                new_cache = getattr(out, "cache", None) or cache
            self._caches[c.seq_id] = (new_cache, end)
            if c.need_logits:
                rows.append(out.logits[0, -1])
        if not rows:
            return torch.empty(0, self.vocab_size, device=self.device)
        return torch.stack(rows).float()

    def release(self, seq_id: str) -> None:
        """Drop the sequence's cache."""
        with contextlib.suppress(KeyError):
            del self._caches[seq_id]

    def reset(self) -> None:
        """Drop every sequence's cache."""
        self._caches.clear()
