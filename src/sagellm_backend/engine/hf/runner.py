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
from typing import Any, Protocol

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from torch import nn

__all__ = [
    "PAGED_MODEL_TYPES",
    "HFCacheRunner",
    "ModelRunner",
    "PagedDecoderRunner",
    "SeqChunk",
    "model_compute_dtype",
    "model_context_length",
    "model_device",
    "paged_unsupported_reason",
]

#: ``config.model_type`` values :class:`PagedDecoderRunner` runs (others use the fallback).
PAGED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

# Rope types whose frequencies depend on the sequence length: no precomputed table.
_DYNAMIC_ROPE_TYPES = frozenset({"dynamic", "longrope"})


@dataclass(slots=True)
class SeqChunk:
    """One sequence's share of a step.

    Attributes:
        seq_id: the sequence (KV manager id).
        token_ids: tokens whose K/V are computed now (``>= 1``).
        start: position of ``token_ids[0]``; tokens ``0..start-1`` are already in the cache.
        block_table: the sequence's pages, covering at least ``start + len(token_ids)``
            tokens (paged runner only).
        need_logits: return logits for the last token of this chunk.
    """

    seq_id: str
    token_ids: list[int]
    start: int
    block_table: list[int]
    need_logits: bool


class ModelRunner(Protocol):
    """What the scheduler needs from a runner (see the module docstring)."""

    name: str
    uses_paged_kv: bool
    device: torch.device
    vocab_size: int

    def execute(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Compute the chunks; return float32 logits ``[n_need_logits, vocab]``."""
        ...

    def release(self, seq_id: str) -> None:
        """Forget any per-sequence state (no-op when there is none)."""
        ...


# ---------------------------------------------------------------------------- helpers
def model_device(model: nn.Module) -> torch.device:
    """Device of the model's input embeddings (where inputs must go)."""
    emb = model.get_input_embeddings()
    return torch.device(emb.weight.device)


def model_compute_dtype(model: nn.Module) -> torch.dtype:
    """Dtype activations (and K/V) have: the input embeddings' dtype."""
    emb = model.get_input_embeddings()
    dtype: torch.dtype = emb.weight.dtype
    return dtype


def model_context_length(config: Any) -> int:
    """Longest sequence the model handles exactly (positions, sliding window).

    ``max_position_embeddings`` (GPT-2: ``n_positions``), capped by ``sliding_window`` when
    the model applies one: beyond the window our attention would differ from the model's.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if not isinstance(n, int) or n <= 0:
        n = 2048
    window = getattr(text, "sliding_window", None)
    if isinstance(window, int) and window > 0 and getattr(text, "use_sliding_window", True):
        n = min(n, window)
    return int(n)


def _single_device(model: nn.Module) -> bool:
    devmap = getattr(model, "hf_device_map", None)
    if isinstance(devmap, dict) and len({str(d) for d in devmap.values()}) > 1:
        return False
    devices = {p.device for p in model.parameters()}
    return len(devices) == 1 and torch.device("meta") not in devices


def paged_unsupported_reason(model: nn.Module) -> str | None:
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
            torch.cat([m.bias.detach() for m in mods], 0).contiguous()  # type: ignore[union-attr]
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


@dataclass(slots=True)
class _Layer:
    """Handles of one decoder layer (modules and fused weights)."""

    input_norm: nn.Module
    post_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    mlp: nn.Module
    qkv: tuple[torch.Tensor, torch.Tensor | None] | None
    gate_up: tuple[torch.Tensor, torch.Tensor | None] | None
    down_proj: nn.Module | None
    act_fn: Callable[[torch.Tensor], torch.Tensor] | None
    k_cache: torch.Tensor
    v_cache: torch.Tensor


@dataclass(slots=True)
class _Segment:
    """A prompt chunk inside the packed batch."""

    row: int  # first row in the packed tensor
    length: int
    ctx_slots: torch.Tensor | None  # slots of positions 0..start+length (prefix present)
    mask: torch.Tensor | None  # [1, length, ctx] causal-with-offset mask (prefix present)


@dataclass(slots=True)
class _Step:
    """Metadata of one step, shared by every layer."""

    num_tokens: int
    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    segments: list[_Segment]
    dec_row: int
    dec_count: int
    dec_pages: torch.Tensor | None  # [B * nb] page ids, row-major
    dec_len: int  # nb * block_size
    dec_mask: torch.Tensor | None  # [B, 1, 1, dec_len]
    out_rows: torch.Tensor | None  # packed rows whose logits are returned (chunk order)
    out_identity: bool  # out_rows == every packed row in order


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

    Raises:
        ValueError: the model is not supported or the KV tensors do not match it.
    """

    uses_paged_kv = True

    def __init__(
        self,
        model: nn.Module,
        layer_kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        *,
        block_size: int,
        max_context: int,
        fuse_projections: bool = True,
    ) -> None:
        reason = paged_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"PagedDecoderRunner cannot run this model: {reason}")
        self.name = "paged"
        self.model = model
        inner: Any = model.model
        self._inner = inner
        self._lm_head: nn.Module = model.lm_head  # type: ignore[assignment]
        self._norm: nn.Module = inner.norm
        self._embed: nn.Module = inner.embed_tokens
        self.device = model_device(model)
        self.dtype = model_compute_dtype(model)
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
            attn = layer.self_attn
            mlp = layer.mlp
            qkv = gate_up = None
            down = act = None
            if fuse_projections:
                qkv = _fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
                parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
                act_fn = getattr(mlp, "act_fn", None)
                if all(isinstance(p, nn.Module) for p in parts) and callable(act_fn):
                    gate_up = _fuse_linears([parts[0], parts[1]])  # type: ignore[list-item]
                    if gate_up is not None:
                        down, act = parts[2], act_fn
            self._layers.append(
                _Layer(
                    input_norm=layer.input_layernorm,
                    post_norm=layer.post_attention_layernorm,
                    q_proj=attn.q_proj,
                    k_proj=attn.k_proj,
                    v_proj=attn.v_proj,
                    o_proj=attn.o_proj,
                    q_norm=getattr(attn, "q_norm", None),
                    k_norm=getattr(attn, "k_norm", None),
                    mlp=mlp,
                    qkv=qkv,
                    gate_up=gate_up,
                    down_proj=down,
                    act_fn=act,
                    k_cache=k_cache,
                    v_cache=v_cache,
                )
            )
        self._num_slots = int(self._layers[0].k_cache.shape[0])
        self._rotary: nn.Module = inner.rotary_emb
        rope_type = str(getattr(self._rotary, "rope_type", "default"))
        self._dynamic_rope = rope_type in _DYNAMIC_ROPE_TYPES
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        if not self._dynamic_rope:
            self._cos, self._sin = self._rope_tables(
                torch.arange(self.max_context, device=self.device)
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
        row_of: dict[int, int] = {}  # id(chunk) -> row of its last token
        for c in (*prefill, *decode):
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
            ids.extend(c.token_ids)
            bt = c.block_table
            for p in range(c.start, end):
                positions.append(p)
                slots.append(bt[p // bs] * bs + p % bs)
            row_of[id(c)] = len(ids) - 1
        num_tokens = len(ids)
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
                mask = (torch.arange(ctx, device=dev).view(1, -1) <= q_pos).unsqueeze(0)
                segments.append(_Segment(row, n, ctx_slots, mask))
            row += n
        dec_pages = dec_mask = None
        dec_len = 0
        if decode:
            nb = max(c.start // bs + 1 for c in decode)
            pages: list[int] = []
            for c in decode:
                bt = c.block_table[:nb]
                pages.extend(bt)
                pages.extend([bt[0]] * (nb - len(bt)))  # padding: any valid page, masked out
            dec_pages = torch.tensor(pages, dtype=torch.long, device=dev)
            dec_len = nb * bs
            ctx_lens = torch.tensor([c.start + 1 for c in decode], dtype=torch.long, device=dev)
            dec_mask = (torch.arange(dec_len, device=dev).view(1, -1) < ctx_lens.view(-1, 1)).view(
                len(decode), 1, 1, dec_len
            )
        wanted = [row_of[id(c)] for c in chunks if c.need_logits]
        identity = wanted == list(range(num_tokens))
        return _Step(
            num_tokens=num_tokens,
            ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slots=torch.tensor(slots, dtype=torch.long, device=dev),
            segments=segments,
            dec_row=row,
            dec_count=len(decode),
            dec_pages=dec_pages,
            dec_len=dec_len,
            dec_mask=dec_mask,
            out_rows=None if identity else torch.tensor(wanted, dtype=torch.long, device=dev),
            out_identity=identity,
        )

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
        t = step.num_tokens
        h_q, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q_width, kv_width = h_q * d, h_kv * d
        bs = self.block_size
        num_pages = self._num_slots // bs
        scale = self.scaling
        x: torch.Tensor = self._embed(step.ids)
        for layer in self._layers:
            h = layer.input_norm(x)
            if layer.qkv is not None:
                qkv = F.linear(h, layer.qkv[0], layer.qkv[1])
                q, k, v = qkv.split((q_width, kv_width, kv_width), dim=-1)
            else:
                q, k, v = layer.q_proj(h), layer.k_proj(h), layer.v_proj(h)
            q = q.view(t, h_q, d)
            k = k.view(t, h_kv, d)
            v = v.view(t, h_kv, d)
            if layer.q_norm is not None:
                q = layer.q_norm(q)
            if layer.k_norm is not None:
                k = layer.k_norm(k)
            q = self._rope(q, cos, sin)
            k = self._rope(k, cos, sin)
            k_cache, v_cache = layer.k_cache, layer.v_cache
            k_cache.index_copy_(0, step.slots, k)
            v_cache.index_copy_(0, step.slots, v)
            attn = self._attention(step, q, k, v, k_cache, v_cache, num_pages, bs, scale)
            x = x + layer.o_proj(attn.reshape(t, q_width))
            h = layer.post_norm(x)
            if layer.gate_up is not None:
                assert layer.act_fn is not None and layer.down_proj is not None
                gate, up = F.linear(h, layer.gate_up[0], layer.gate_up[1]).chunk(2, dim=-1)
                x = x + layer.down_proj(layer.act_fn(gate) * up)
            else:
                x = x + layer.mlp(h)
        if not step.out_identity:
            assert step.out_rows is not None
            x = x.index_select(0, step.out_rows)
        logits: torch.Tensor = self._lm_head(self._norm(x))
        return logits.float()

    def _attention(
        self,
        step: _Step,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        num_pages: int,
        bs: int,
        scale: float,
    ) -> torch.Tensor:
        """Attention output ``[T, heads, head_dim]`` for the packed step."""
        t = step.num_tokens
        h_q, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        only_decode = not step.segments
        only_one_segment = len(step.segments) == 1 and step.dec_count == 0
        out = None if (only_decode or only_one_segment) else q.new_empty(t, h_q, d)
        for seg in step.segments:
            r0, n = seg.row, seg.length
            qs = q[r0 : r0 + n].transpose(0, 1)
            if seg.ctx_slots is None:
                ks = k[r0 : r0 + n].transpose(0, 1)
                vs = v[r0 : r0 + n].transpose(0, 1)
                res = F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, scale=scale, enable_gqa=h_q != h_kv
                )
            else:
                ks = k_cache.index_select(0, seg.ctx_slots).transpose(0, 1)
                vs = v_cache.index_select(0, seg.ctx_slots).transpose(0, 1)
                res = F.scaled_dot_product_attention(
                    qs, ks, vs, attn_mask=seg.mask, scale=scale, enable_gqa=h_q != h_kv
                )
            if out is None:
                return res.transpose(0, 1)
            out[r0 : r0 + n] = res.transpose(0, 1)
        if step.dec_count:
            b = step.dec_count
            assert step.dec_pages is not None and step.dec_mask is not None
            length = step.dec_len
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
            qd = q[step.dec_row :].reshape(b, h_kv, h_q // h_kv, d)
            res = F.scaled_dot_product_attention(
                qd, keys, values, attn_mask=step.dec_mask, scale=scale
            ).reshape(b, h_q, d)
            if out is None:
                return res
            out[step.dec_row :] = res
        assert out is not None
        return out

    def release(self, seq_id: str) -> None:
        """No per-sequence state: K/V live in the pool."""
        del seq_id


class HFCacheRunner:
    """Fallback runner: the model's own forward with one ``DynamicCache`` per sequence.

    Correct for any causal LM transformers can run with a cache; sequences are computed
    one after another (no cross-request batching). A chunk must continue its sequence's
    cache (``start`` equals the tokens cached so far); a sequence seen first with
    ``start > 0`` is an error because this runner cannot read paged K/V.
    """

    uses_paged_kv = False

    def __init__(self, model: nn.Module, *, max_context: int) -> None:
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
