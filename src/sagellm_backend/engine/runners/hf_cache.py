"""Batched fallback runner: the model's own forward and HF cache, all sequences together.

For models whose attention cannot be replaced (bloom, falcon, mpt, ...: no
attention-backend support) the runner keeps every sequence's K/V itself (one
``[kv_heads, length, head_dim]`` tensor pair per layer, in its own growing buffer) and
runs each step as **one** forward over all scheduled sequences:

* row ``b`` of the batch holds sequence ``b``'s cached K/V left-padded to the longest
  cached length ``C`` (a fresh ``DynamicCache`` filled with ``update``), then its new tokens
  right-padded to the longest chunk ``N``; the 2-D ``attention_mask`` marks the real
  positions and ``position_ids`` (where the model takes them) give each token its own
  position. Left padding in the cached part and right padding in the new part leave no
  query row fully masked (a pad query sees its row's real tokens), so no NaN appears;
  models with ALiBi (bloom, falcon) derive positions from the mask's cumulative sum,
  which the padding does not shift relative to the real tokens.
* after the forward, the new K/V of each row (columns ``C..C+n_b-1``) are appended to the
  sequence's buffers, and logits are taken at each row's last real token.

K/V admission still goes through the KV manager (accounting only: the engine gives these
runners a manager without storage): ``uses_paged_kv`` is False, so the scheduler never
expects prefix pages to be reused.

Invariants:
    * A chunk continues its sequence: ``start`` equals the tokens the runner holds for it,
      or is 0 (a restart after preemption drops what was held).
    * ``execute`` is called from the scheduler thread only.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sagellm_backend.engine.runners._prepack import can_prepack, prepack_linears
from sagellm_backend.engine.runners.base import SeqChunk, check_chunks

__all__ = ["HFBatchedRunner", "embedding_facts"]


def embedding_facts(model: Any) -> tuple[torch.device, int, torch.dtype]:
    """(device, vocabulary size, dtype) of ``model``'s input embeddings."""
    weight = model.get_input_embeddings().weight
    return torch.device(weight.device), int(weight.shape[0]), weight.dtype


@dataclass(slots=True)
class _SeqKV:
    """One sequence's K/V: per layer ``[kv_heads, capacity, head_dim]``; ``length`` used."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: int) -> None:
        n = k.shape[1]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if at + n > buf_k.shape[1]:
            cap = max(2 * buf_k.shape[1], at + n, 64)
            new_k = buf_k.new_empty(buf_k.shape[0], cap, buf_k.shape[2])
            new_v = buf_v.new_empty(buf_v.shape[0], cap, buf_v.shape[2])
            new_k[:, :at] = buf_k[:, :at]
            new_v[:, :at] = buf_v[:, :at]
            self.keys[layer], self.values[layer] = new_k, new_v
            buf_k, buf_v = new_k, new_v
        buf_k[:, at : at + n] = k
        buf_v[:, at : at + n] = v


class HFBatchedRunner:
    """The model's own forward with a batched HF cache (see the module docstring).

    Args:
        model: a loaded ``*ForCausalLM`` whose cache is a transformers ``Cache`` with
            per-layer ``keys``/``values`` of ``[batch, kv_heads, length, head_dim]``.
        max_context: longest sequence served.
        max_batch_size: most sequences one forward holds (larger steps are split).
        pad_token_id: token id put in padding positions (its values never reach a real
            token).
        prepack_weights: on CPU with fp32 or bf16 weights, give plain linear layers a
            oneDNN-prepacked copy of their weights (see :mod:`._prepack`; a second copy of
            those weights' memory). Ignored where unsupported.

    Raises:
        ValueError: on bad arguments.
    """

    uses_paged_kv = False

    def __init__(
        self,
        model: Any,
        *,
        max_context: int,
        max_batch_size: int = 64,
        pad_token_id: int = 0,
        prepack_weights: bool = False,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.name = "hf-batched"
        self.model = model
        self.device, self.vocab_size, dtype = embedding_facts(model)
        self.max_context = int(max_context)
        self.max_batch_size = int(max_batch_size)
        self.pad_token_id = int(pad_token_id)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._positions = "position_ids" in params
        self._keep = "logits_to_keep" in params
        self._seqs: dict[str, _SeqKV] = {}
        #: linear layers run on oneDNN-prepacked weights
        self.prepacked = can_prepack(prepack_weights, self.device, dtype) and (
            prepack_linears(model) > 0
        )

    # ------------------------------------------------------------------ steps
    def execute(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Run all chunks in batched forwards (see the module docstring)."""
        self._validate(chunks)
        rows: list[torch.Tensor] = []
        for i in range(0, len(chunks), self.max_batch_size):
            rows.extend(self._forward(chunks[i : i + self.max_batch_size]))
        if not rows:
            return torch.empty(0, self.vocab_size, device=self.device)
        return torch.stack(rows).float()

    def _validate(self, chunks: Sequence[SeqChunk]) -> None:
        seqs = self._seqs
        check_chunks(chunks, lambda sid: seqs[sid].length if sid in seqs else 0, self.max_context)
        for c in chunks:
            if c.start == 0:
                seqs.pop(c.seq_id, None)  # a (re)start: forget what was held

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache()

    def _forward(self, chunks: Sequence[SeqChunk]) -> list[torch.Tensor]:
        dev = self.device
        b = len(chunks)
        held = [self._seqs.get(c.seq_id) for c in chunks]
        cached = [0 if h is None else h.length for h in held]
        news = [len(c.token_ids) for c in chunks]
        big_c, big_n = max(cached), max(news)
        ids = torch.full((b, big_n), self.pad_token_id, dtype=torch.long)
        pos = torch.zeros((b, big_n), dtype=torch.long)
        mask = torch.zeros((b, big_c + big_n), dtype=torch.long)
        for r, c in enumerate(chunks):
            n, cb = news[r], cached[r]
            ids[r, :n] = torch.tensor(c.token_ids, dtype=torch.long)
            pos[r] = torch.arange(cb, cb + big_n).clamp_(max=cb + n - 1)
            mask[r, big_c - cb : big_c] = 1
            mask[r, big_c : big_c + n] = 1
        cache = self._new_cache()
        if big_c:
            first = next(h for h in held if h is not None)
            for layer in range(len(first.keys)):
                # keys and values may differ in heads or width (MLA: DeepSeek-V2/V3)
                k0, v0 = first.keys[layer], first.values[layer]
                ks = k0.new_zeros(b, k0.shape[0], big_c, k0.shape[2])
                vs = v0.new_zeros(b, v0.shape[0], big_c, v0.shape[2])
                for r, h in enumerate(held):
                    if h is not None and h.length:
                        ks[r, :, big_c - h.length :] = h.keys[layer][:, : h.length]
                        vs[r, :, big_c - h.length :] = h.values[layer][:, : h.length]
                cache.update(ks, vs, layer)
        kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True}
        if self._positions:
            kwargs["position_ids"] = pos.to(dev)
        keep_cols = sorted({n - 1 for r, n in enumerate(news) if chunks[r].need_logits})
        if self._keep:
            kwargs["logits_to_keep"] = torch.tensor(keep_cols or [0], dtype=torch.long, device=dev)
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kwargs)
        new_cache = getattr(out, "past_key_values", None)
        if new_cache is None:
            new_cache = cache
        layers = getattr(new_cache, "layers", None)
        if layers is None:
            raise RuntimeError(
                f"{type(new_cache).__name__} has no per-layer keys/values; the batched "
                "fallback needs a transformers Cache"
            )
        for r, c in enumerate(chunks):
            n = news[r]
            h = held[r]
            if h is None:
                h = _SeqKV(
                    keys=[
                        lay.keys.new_empty(lay.keys.shape[1], 0, lay.keys.shape[3])
                        for lay in layers
                    ],
                    values=[
                        lay.values.new_empty(lay.values.shape[1], 0, lay.values.shape[3])
                        for lay in layers
                    ],
                    length=0,
                )
                self._seqs[c.seq_id] = h
            for li, lay in enumerate(layers):
                h.append(
                    li,
                    lay.keys[r, :, big_c : big_c + n],
                    lay.values[r, :, big_c : big_c + n],
                    h.length,
                )
            h.length += n
        logits = out.logits
        result: list[torch.Tensor] = []
        for r, c in enumerate(chunks):
            if not c.need_logits:
                continue
            col = news[r] - 1
            idx = keep_cols.index(col) if self._keep else col
            result.append(logits[r, idx])
        return result

    def release(self, seq_id: str) -> None:
        """Drop the sequence's K/V."""
        self._seqs.pop(seq_id, None)

    def reset(self) -> None:
        """Drop every sequence's K/V."""
        self._seqs.clear()
