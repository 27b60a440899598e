"""Generic paged runner: any transformers decoder, K/V in the provider's paged pool.

The runner calls the model's *own* forward -- embeddings, norms, MLPs, rotary or learned
positions, quantised linears, final logit soft-capping all stay the model's -- on every
scheduled token of every sequence packed into one ``[1, T]`` row with per-token
``position_ids`` and no HF cache. Only attention is ours: :func:`paged_attention` is
registered with ``transformers.AttentionInterface`` under :data:`ATTN_NAME`, and the model
is switched to it (``model.set_attn_implementation``). For each layer it

* writes the step's new K/V into the paged pool (a
  :class:`~sagellm_backend.kv.storage.TorchKVStorage` layer view) by slot, and
* attends, per sequence, over that sequence's pages (block table) with its own causal
  structure built from the step's metadata: a prompt chunk at ``start`` sees positions
  ``0..start+i``; a decode token sees ``0..start``. No padding between sequences; the
  attention mask transformers hands the function is ignored (it is ``None`` or wrong for
  packed rows).

Decode tokens are packed after the prompt chunks, ordered by position, and attended in
batched groups (one SDPA call per group and layer); :func:`split_decode` cuts them into
several groups only where that saves at least :data:`DECODE_SPLIT_SAVING` of the attended
(padded) context (one long sequence among short ones), since every extra group costs a
call per layer. The groups read the runner's decode cache
(:class:`~sagellm_backend.engine.runners._paged_decode.DecodeCache`): every decoding
sequence's K/V kept dense from step to step, so a step appends one position per sequence
instead of gathering every page again in every layer. A step whose rows would not fit the
cache's byte budget (``decode_cache_bytes``; 0 turns the cache off) gathers its groups'
pages into reused buffers instead (shorter block tables padded with a masked page).

Module layout: the attention hook and model probe live in ``_paged_hook``, the kernels
(prepacking, dense attention, :func:`split_decode`) in ``_paged_ops``, the decode cache in
``_paged_decode``; their public names are importable from here as before.

Model attention features arrive as keyword arguments (``scaling``, ``sliding_window``,
``softcap``, ``s_aux`` sinks) and are honoured per layer; a layer with an attention
feature this function cannot honour is refused when the runner is built (a probe forward
records what every layer passes), naming the feature.

On CPU with fp32 (or bf16) weights (``prepack_weights``), every plain ``nn.Linear`` (and
GPT-2's ``Conv1D``) also gets a oneDNN-prepacked copy of its weight, which its forward uses
for steps of up to 64 rows: decode-sized GEMMs ran 2-2.7x faster than ``F.linear`` (MKL) on
the reference machine (see :mod:`._prepack`). Quantised, hooked or any other modules are
left as they are.

Invariants:
    * The step metadata lives in a thread-local slot only while :meth:`PagedRunner.execute`
      runs the forward; outside it (for instance ``model.generate`` on the same model)
      :func:`paged_attention` is plain dense attention with the given mask.
    * Pages are zeroed before their first use (never-written memory may hold NaN, and a
      masked NaN still poisons a weighted sum).
    * The runner never touches the KV manager (see :mod:`sagellm_backend.engine.runners.base`).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from sagellm_backend.engine.runners._paged_decode import (
    DECODE_CACHE_BYTES,
    DecodeCache,
    DecodeGroup,
    Prefill,
    Step,
)
from sagellm_backend.engine.runners._paged_fuse import fuse_projections as fuse
from sagellm_backend.engine.runners._paged_hook import (
    ATTN_NAME,
    LayerFeatures,  # noqa: F401 - re-exported (it was defined here)
    _kwarg_features,
    _local,
    _model_device,
    paged_attention,
    prepare_model,
    register_paged_attention,
)
from sagellm_backend.engine.runners._paged_ops import (
    DECODE_SPLIT_SAVING,
    _attend,
    _window_mask,
    dense_attention,
    split_decode,
)
from sagellm_backend.engine.runners._prepack import (
    can_prepack,
    prepack_available,
    prepack_linears,
)
from sagellm_backend.engine.runners.base import SeqChunk

__all__ = [
    "ATTN_NAME",
    "DECODE_CACHE_BYTES",
    "DECODE_SPLIT_SAVING",
    "PagedRunner",
    "dense_attention",
    "paged_attention",
    "prepack_available",
    "register_paged_attention",
    "split_decode",
]


# ---------------------------------------------------------------------------- the runner
class PagedRunner:
    """Any attention-backend-capable transformers decoder over the paged KV pool.

    Args:
        model: a loaded ``*ForCausalLM`` (its attention implementation is switched to
            :data:`ATTN_NAME`).
        layer_kv: ``layer_kv(i) -> (k, v)``, each ``[num_slots, kv_heads, head_dim]`` in the
            model's compute dtype on the model's device.
        block_size: tokens per page.
        max_context: longest sequence (positions beyond it are refused).
        prepack_weights: on CPU with fp32 or bf16 weights, give plain linear layers a
            oneDNN-prepacked copy of their weights (see the module docstring; a second copy
            of those weights' memory). Ignored where unsupported.
        decode_cache_bytes: byte budget of the decode cache (a second copy of the decoding
            sequences' K/V, see the module docstring); 0 gathers pages every step. None:
            :data:`DECODE_CACHE_BYTES` on CPU, 0 elsewhere (an accelerator gathers from
            fast memory, and its memory is budgeted by the provider).
        fuse_projections: compute sibling projections (q/k/v, gate/up) of Llama-family
            models as one GEMM each (see :mod:`._paged_fuse`; no extra weight memory).

    Raises:
        ValueError: the model cannot run on this runner (the message names the feature) or
            the KV tensors do not match the geometry its attention layers use.
    """

    uses_paged_kv = True

    def __init__(
        self,
        model: Any,
        layer_kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        *,
        block_size: int,
        max_context: int,
        prepack_weights: bool = False,
        decode_cache_bytes: int | None = None,
        fuse_projections: bool = False,
    ) -> None:
        self.name = "paged"
        self.model = model
        self.device = _model_device(model)
        self.dtype: torch.dtype = model.get_input_embeddings().weight.dtype
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.block_size = int(block_size)
        self.max_context = int(max_context)
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        previous = getattr(model.config, "_attn_implementation", None)
        self.features = prepare_model(model)
        computed = {f.key_dtype for _, f in self.features if f.key_dtype is not None}
        if len(computed) == 1:  # the K/V dtype, even beside float32 embeddings (Ergo)
            self.dtype = computed.pop()
        try:
            self._bind_pool(layer_kv)
        except BaseException:
            # A refused model goes to another runner: give it back its own attention.
            if previous is not None:
                model.set_attn_implementation(previous)
            raise
        self._num_slots = int(self._k[0].shape[0])
        self._zeroed_pages = 0
        self._gather_bufs: tuple[torch.Tensor, torch.Tensor] | None = None
        if decode_cache_bytes is None:
            decode_cache_bytes = DECODE_CACHE_BYTES if self.device.type == "cpu" else 0
        self._dcache = DecodeCache(
            [(f.num_kv_heads, f.head_dim) for _, f in self.features],
            dtype=self.dtype,
            device=self.device,
            block_size=self.block_size,
            max_context=self.max_context,
            budget_bytes=max(0, int(decode_cache_bytes)),
        )
        #: See :data:`DECODE_SPLIT_SAVING` (1.0 or more: decode is always one group).
        self.decode_split_saving = DECODE_SPLIT_SAVING
        params = inspect.signature(model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        can_pack = can_prepack(prepack_weights, self.device, self.dtype)
        #: sibling projection groups computed as one GEMM (0: none fused)
        self.fused_groups = fuse(model, prepack=can_pack)[0] if fuse_projections else 0
        self.prepacked = can_pack and prepack_linears(model) > 0

    def _bind_pool(self, layer_kv: Any) -> None:
        """Take each attention layer's K/V storage, checking its shape, dtype and device.

        Raises:
            ValueError: a layer's storage does not fit the model.
        """
        self._layer_of: dict[int, int] = {}
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        for i, (module, feats) in enumerate(self.features):
            self._layer_of[id(module)] = i
            k_cache, v_cache = layer_kv(i)
            expect = (feats.num_kv_heads, feats.head_dim)
            k_dtype = feats.key_dtype or self.dtype
            v_dtype = feats.value_dtype or self.dtype
            if (
                tuple(k_cache.shape[1:]) != expect
                or k_cache.dtype != k_dtype
                or v_cache.dtype != v_dtype
            ):
                computed = (
                    str(k_dtype) if k_dtype == v_dtype else f"keys {k_dtype}, values {v_dtype}"
                )
                raise ValueError(
                    f"KV storage of layer {i} is {tuple(k_cache.shape[1:])} {k_cache.dtype}, "
                    f"the model computes (kv_heads, head_dim) = {expect} in {computed}"
                )
            if k_cache.device != self.device:
                raise ValueError(
                    f"KV storage is on {k_cache.device} but the model is on {self.device}"
                )
            self._k.append(k_cache)
            self._v.append(v_cache)

    # ------------------------------------------------------------------ metadata
    def _validate(self, chunks: Sequence[SeqChunk]) -> None:
        bs = self.block_size
        if not chunks:
            raise ValueError("execute() needs at least one chunk")
        for c in chunks:
            n = len(c.token_ids)
            if n == 0:
                raise ValueError(f"sequence {c.seq_id!r}: empty chunk")
            end = c.start + n
            if c.start < 0:
                raise ValueError(f"sequence {c.seq_id!r}: negative start {c.start}")
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
        if top * bs > self._num_slots:
            raise ValueError(f"page {top - 1} is outside the KV pool ({self._num_slots} slots)")
        if top > self._zeroed_pages:
            for k, v in zip(self._k, self._v, strict=True):
                k[self._zeroed_pages * bs : top * bs].zero_()
                v[self._zeroed_pages * bs : top * bs].zero_()
            self._zeroed_pages = top

    def _prepare(
        self, chunks: Sequence[SeqChunk]
    ) -> tuple[Step, torch.Tensor, torch.Tensor, list[int]]:
        """Pack ``chunks`` into one row: prompt chunks in the given order, then decode tokens.

        Decode rows are ordered by ascending position (not by their order in ``chunks``) and
        cut into :class:`DecodeGroup` row ranges by :func:`split_decode`. Returns the step
        metadata, ``input_ids`` and ``position_ids`` (``[1, T]``) and, for every chunk that
        wants logits, in ``chunks`` order, the row of its last token.
        """
        bs, dev = self.block_size, self.device
        self._validate(chunks)
        prefill = [c for c in chunks if len(c.token_ids) > 1 or c.start == 0]
        # Decode rows sorted by length, so that groups of similar length are row ranges.
        decode = self._dcache.order(
            [c for c in chunks if not (len(c.token_ids) > 1 or c.start == 0)]
        )
        plan = self._dcache.plan(decode) if decode and self._dcache.budget_bytes else None
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_row: dict[int, int] = {}
        prefills: list[Prefill] = []
        for c in (*prefill, *decode):
            row = len(ids)
            n = len(c.token_ids)
            end = c.start + n
            ids.extend(c.token_ids)
            bt = c.block_table
            positions.extend(range(c.start, end))
            slots.extend(bt[p // bs] * bs + p % bs for p in range(c.start, end))
            last_row[id(c)] = row + n - 1
            if len(prefills) < len(prefill):
                ctx = None
                if c.start > 0:
                    ctx = torch.tensor(
                        [bt[p // bs] * bs + p % bs for p in range(end)],
                        dtype=torch.long,
                        device=dev,
                    )
                prefills.append(Prefill(row, n, c.start, ctx))
        dec_row = sum(len(c.token_ids) for c in prefill)
        groups: list[DecodeGroup] = []
        counts = [c.start // bs + 1 for c in decode]
        bounds = [0, *split_decode(counts, self.decode_split_saving), len(decode)]
        for g0, g1 in itertools.pairwise(bounds):
            if g0 == g1:
                continue
            nb = counts[g1 - 1]
            page_ids: torch.Tensor | None = None
            length = decode[g1 - 1].start + 1  # the group's longest context
            if plan is None:
                pages: list[int] = []
                for c in decode[g0:g1]:
                    bt = c.block_table[:nb]
                    pages.extend(bt)
                    pages.extend([bt[0]] * (nb - len(bt)))  # padding: a valid page, masked
                page_ids = torch.tensor(pages, dtype=torch.long, device=dev)
                length = nb * bs
            q_pos = torch.tensor([c.start for c in decode[g0:g1]], dtype=torch.long, device=dev)
            q_pos = q_pos.view(-1, 1)
            groups.append(
                DecodeGroup(
                    row=dec_row + g0,
                    count=g1 - g0,
                    pages=page_ids,
                    length=length,
                    q_pos=q_pos,
                    ctx=q_pos + 1,
                )
            )
        step = Step(
            runner=self,
            slots=torch.tensor(slots, dtype=torch.long, device=dev),
            prefills=prefills,
            decode=groups,
            cache_plan=plan,
            decode_row=dec_row,
        )
        wanted = [last_row[id(c)] for c in chunks if c.need_logits]
        return (
            step,
            torch.tensor([ids], dtype=torch.long, device=dev),
            torch.tensor([positions], dtype=torch.long, device=dev),
            wanted,
        )

    # ------------------------------------------------------------------ forward
    def execute(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Run one step over ``chunks`` (see :class:`~.base.ModelRunner`)."""
        step, ids, positions, wanted = self._prepare(chunks)
        rows = torch.tensor(wanted, dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {"use_cache": False}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = rows
        _local.step = step
        try:
            with torch.inference_mode():
                out = self.model(input_ids=ids, position_ids=positions, **kwargs)
        finally:
            _local.step = None
        if step.cache_plan is not None:
            self._dcache.commit(step.cache_plan)  # only now: every layer applied the plan
        logits: torch.Tensor = out.logits[0]
        if not self._logits_to_keep:
            logits = logits.index_select(0, rows)
        return logits.float()

    def _layer_attention(
        self,
        step: Step,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """Paged attention of one layer for the packed step; returns ``[1, T, H, D]``."""
        li = self._layer_of.get(id(module))
        if li is None:
            raise RuntimeError(f"attention module {type(module).__name__} was not probed")
        window, softcap, sinks = _kwarg_features(kwargs)
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        q = query[0].transpose(0, 1)  # [T, H, D]
        k = key[0].transpose(0, 1)  # [T, Hkv, D]
        v = value[0].transpose(0, 1)
        k_cache, v_cache = self._k[li], self._v[li]
        t, h, d = q.shape
        h_kv = k.shape[1]
        k_cache.index_copy_(0, step.slots, k)
        v_cache.index_copy_(0, step.slots, v)
        single = len(step.prefills) + len(step.decode) == 1
        out = None if single else q.new_empty(t, h, d)
        for seg in step.prefills:
            r0, n = seg.row, seg.length
            qs = q[r0 : r0 + n].transpose(0, 1).unsqueeze(0)
            if seg.ctx_slots is None:
                ks = k[r0 : r0 + n].transpose(0, 1).unsqueeze(0)
                vs = v[r0 : r0 + n].transpose(0, 1).unsqueeze(0)
            else:
                ks = k_cache.index_select(0, seg.ctx_slots).transpose(0, 1).unsqueeze(0)
                vs = v_cache.index_select(0, seg.ctx_slots).transpose(0, 1).unsqueeze(0)
            ctx = seg.start + n
            needs_mask = seg.start > 0 or (window is not None and window < ctx)
            mask = None
            if needs_mask:
                mask = seg.masks.get(window)
                if mask is None:
                    mask = _window_mask(
                        torch.arange(seg.start, ctx, device=q.device).view(-1, 1),
                        torch.arange(ctx, device=q.device).view(1, -1),
                        torch.tensor([[ctx]], device=q.device),
                        window,
                        q.dtype,
                    )
                    seg.masks[window] = mask
            res = _attend(qs, ks, vs, mask, scale, softcap, sinks, causal=not needs_mask)
            res = res[0].transpose(0, 1)
            if out is None:
                return res.unsqueeze(0)
            out[r0 : r0 + n] = res
        num_pages = self._num_slots // self.block_size
        k_pages = k_cache.view(num_pages, self.block_size, h_kv, d)
        v_pages = v_cache.view(num_pages, self.block_size, h_kv, d)
        plan = step.cache_plan
        cached: torch.Tensor | None = None
        if plan is not None:
            r0 = step.decode_row
            cached = self._dcache.apply(
                li, plan, k_cache, v_cache, k[r0 : r0 + plan.rows], v[r0 : r0 + plan.rows]
            )
        for grp in step.decode:
            b, length = grp.count, grp.length
            if cached is not None:
                g0 = grp.row - step.decode_row
                keys = cached[0, g0 : g0 + b, :, :length]
                values = cached[1, g0 : g0 + b, :, :length]
            else:
                assert grp.pages is not None
                buf_k, buf_v = self._gather_buffers(int(grp.pages.numel()), k_pages)
                torch.index_select(k_pages, 0, grp.pages, out=buf_k)
                torch.index_select(v_pages, 0, grp.pages, out=buf_v)
                keys = buf_k.view(b, length, h_kv, d).transpose(1, 2)
                values = buf_v.view(b, length, h_kv, d).transpose(1, 2)
            mask = grp.masks.get(window)
            if mask is None:
                mask = _window_mask(
                    grp.q_pos,
                    torch.arange(length, device=q.device).view(1, -1),
                    grp.ctx,
                    window,
                    q.dtype,
                ).view(b, 1, 1, length)
                grp.masks[window] = mask
            qd = q[grp.row : grp.row + b]
            if softcap is None and sinks is None:
                # Queries of the heads sharing one KV head form the "query length" axis.
                res = F.scaled_dot_product_attention(
                    qd.reshape(b, h_kv, h // h_kv, d), keys, values, attn_mask=mask, scale=scale
                ).reshape(b, h, d)
            else:
                # soft-capping or sinks: _attend takes its eager path
                res = _attend(qd.unsqueeze(2), keys, values, mask, scale, softcap, sinks)
                res = res.view(b, h, d)
            if out is None:
                return res.unsqueeze(0)
            out[grp.row : grp.row + b] = res
        assert out is not None
        return out.unsqueeze(0)

    def _gather_buffers(
        self, num_pages: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two ``[num_pages, block_size, kv_heads, head_dim]`` views of reused buffers.

        Decode attention gathers each group's pages into these instead of fresh tensors: a
        multi-megabyte allocation per layer and step is returned to the OS and faulted in
        again every time, which costs more than the copy. The buffers grow to the largest
        group seen; their contents are only valid until the next gather (one group of one
        layer at a time).
        """
        bufs = self._gather_bufs
        if bufs is None or bufs[0].shape[0] < num_pages or bufs[0].dtype != like.dtype:
            shape = (num_pages, *like.shape[1:])
            bufs = (like.new_empty(shape), like.new_empty(shape))
            self._gather_bufs = bufs
        return bufs[0][:num_pages], bufs[1][:num_pages]

    def release(self, seq_id: str) -> None:
        """Drop ``seq_id``'s decode-cache row (its K/V in the pool are the scheduler's)."""
        self._dcache.release(seq_id)

    def reset(self) -> None:
        """Empty the decode cache (K/V live in the pool)."""
        self._dcache.clear()
