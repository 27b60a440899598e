"""Per-sequence runner for models with recurrent state (SSM, linear-attention and hybrid LMs).

Mamba, Jamba, Qwen3-Next / Qwen3.5, RecurrentGemma, LFM2, Zamba, Nemotron-H, ... keep, besides
(or instead of) attention K/V, a running state per sequence: a convolution window and a
recurrent (SSM / linear-attention) state that depend on every token seen so far, in order.
Padding a batch or packing sequences into one row (what the other runners do) feeds foreign
tokens into that state, so these models are served here the way ``generate`` runs them: each
sequence has the cache object the model itself creates, and every forward holds one sequence.

* The first chunk of a sequence (``start == 0``: a new prompt, or a restart after
  preemption) runs as one forward over a fresh cache made as ``generate`` makes it
  (``DynamicCache(config=...)``, which holds the recurrent layers' state too; a model that
  makes its own gets none); the runner keeps the cache the forward returns, or the one it
  passed.
* A later chunk runs token by token, each a one-token forward over the sequence's cache:
  several models (Mamba's reference path, RecurrentGemma) tell prefill from decode by the
  input length and get a multi-token continuation wrong. The runner declares
  ``chunked_prefill = False``, so the scheduler sends whole prompts and one token per decode
  step: a longer chunk only comes from a caller that splits a prompt itself.
* A decode step of several sequences runs as **one** forward where that is safe: their
  caches are merged into one batch (recurrent states stacked, attention K/V left-padded,
  a 2-D attention mask; :mod:`._state_batch`), which is kept while the same sequences
  decode in the same order and split back into their caches when one of them leaves or
  runs a forward of its own. New prompts of several sequences in one step likewise run as
  left-padded batches (grouped by length so that little padding is computed, at most
  :data:`CPU_PREFILL_GROUP_TOKENS` padded tokens on the CPU; :func:`prefill_groups`), each
  sequence then getting its rows of the batch's cache. The runner checks once, when it is
  built, that merged decode steps and a batched prefill give the logits separate forwards
  give on this model (including the steps after the prefill), and otherwise (or for a
  cache layout it does not know) runs them one by one.
* Models that keep the state on their modules rather than in the cache (RecurrentGemma:
  the modules that define ``_setup_cache``) get it reset (``_setup_cache`` for one
  sequence) before a sequence's first forward, saved after each of its forwards and put
  back before the next one.

Concurrent sequences share steps (continuous batching in the scheduler); where merging is not
possible, prompts and decode tokens run one sequence per forward.

K/V admission still goes through the KV manager (accounting only, without storage):
``uses_paged_kv`` is False.

Invariants:
    * A chunk continues its sequence: ``start`` equals the tokens the runner holds for it,
      or is 0 (a restart drops what was held).
    * After :meth:`HFStatefulRunner.execute` returns, no module of the model holds another
      sequence's state in a way that changes the next forward (it is restored first).
    * ``execute`` is called from the scheduler thread only.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sagellm_backend.engine.runners._prefill_groups import prefill_groups
from sagellm_backend.engine.runners._prepack import can_prepack, prepack_linears
from sagellm_backend.engine.runners._probe import logits_close, probe_rel
from sagellm_backend.engine.runners._state_batch import (
    UnmergeableError,
    drop_tensors,
    has_attention,
    merge,
    mergeable,
    merged_decode_matches,
    merged_prefill_matches,
    split,
)
from sagellm_backend.engine.runners.base import SeqChunk, check_chunks
from sagellm_backend.engine.runners.hf_cache import embedding_facts
from sagellm_backend.engine.runners.select import module_state_owners
from sagellm_backend.engine.runners.select import recurrent_state_reason as recurrent_state_reason

__all__ = ["HFStatefulRunner", "prefill_groups", "recurrent_state_reason"]

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class _SeqState:
    """One sequence: the model's cache object, tokens held, and module-held state.

    While the sequence is a row of the runner's kept decode batch (``batched``), ``cache``
    is stale: the batch holds its state until it is split back (``_dissolve``).
    """

    cache: Any
    length: int
    modules: list[dict[str, torch.Tensor]] = field(default_factory=list)
    batched: bool = False


@dataclass(slots=True)
class _Batch:
    """Merged caches kept between decode steps of the same sequences (in the same order).

    Attributes:
        seq_ids: the rows' sequences.
        cache: the merged cache (the rows' live state).
        pads: left padding of each row's attention K/V (columns before its tokens).
        width: attention columns (the longest row's tokens).
        steps: decode steps run on the batch since it was merged (every row took each).
    """

    seq_ids: tuple[str, ...]
    cache: Any
    pads: list[int]
    width: int
    steps: int = 0


class HFStatefulRunner:
    """The model's own forward and cache, one sequence per forward (see the module docstring).

    Args:
        model: a loaded ``*ForCausalLM`` whose forward takes a transformers cache
            (``cache`` or ``past_key_values``) and returns it.
        max_context: longest sequence served.
        prepack_weights: on CPU with fp32 or bf16 weights, give plain linear layers a
            oneDNN-prepacked copy of their weights (see :mod:`._prepack`).

    Raises:
        ValueError: the model's forward takes no cache argument (its state cannot be kept).
    """

    uses_paged_kv = False
    #: The scheduler sends whole prompts (a multi-token continuation would run token by token)
    chunked_prefill = False

    def __init__(self, model: Any, *, max_context: int, prepack_weights: bool = False) -> None:
        params = inspect.signature(model.forward).parameters
        if "cache" in params:
            self._cache_kw = "cache"
        elif "past_key_values" in params:
            self._cache_kw = "past_key_values"
        else:
            raise ValueError(
                f"{type(model).__name__}.forward takes no cache argument (cache or "
                "past_key_values), so its recurrent state cannot be kept between steps"
            )
        self.name = "hf-sequential"
        self.model = model
        self.device, self.vocab_size, dtype = embedding_facts(model)
        self._probe_rel = probe_rel(dtype)  # the probes' tolerance
        self.max_context = int(max_context)
        self._positions = "position_ids" in params
        self._cache_positions = "cache_position" in params
        self._keep = "logits_to_keep" in params
        self._owners = module_state_owners(model)
        self._resets = [_state_reset(m, model, self.device, dtype) for m in self._owners]
        supports = getattr(model, "_supports_default_dynamic_cache", None)
        self._default_cache = not callable(supports) or bool(supports())
        self._seqs: dict[str, _SeqState] = {}
        self._batch: _Batch | None = None  # the kept decode batch (see _decode_batch)
        self._current: str | None = None  # whose state the modules hold now
        #: linear layers run on oneDNN-prepacked weights
        self.prepacked = can_prepack(prepack_weights, self.device, dtype) and (
            prepack_linears(model) > 0
        )
        self._mask = "attention_mask" in params
        #: decode steps of several sequences run as one merged forward
        self.batched_decode = False
        #: new prompts of several sequences run as one left-padded forward
        self.batched_prefill = False
        #: most padded tokens of one batched prefill (None: no cap; CPU_PREFILL_GROUP_TOKENS)
        self.prefill_group_tokens: int | None = (
            CPU_PREFILL_GROUP_TOKENS if self.device.type == "cpu" else None
        )
        broken = self._continuation_fails()
        if broken is not None:
            raise ValueError(
                f"{type(model).__name__} does not continue a sequence through its cache "
                f"({broken}): a prompt fed in two parts must give the logits of one forward"
            )
        if not self._owners and self._default_cache and self._mask:
            if not mergeable(self._new_cache()):
                _log.info(
                    "%s: one sequence per forward: unknown cache layout", type(model).__name__
                )
            else:
                self.batched_decode = self._probe("decode", self._decode_matches)
                self.batched_prefill = self.batched_decode and self._probe(
                    "prefill", self._prefill_matches
                )

    def _probe(self, what: str, check: Any) -> bool:
        """Run ``check()`` (a comparison of merged and separate steps) and forget its state."""
        try:
            with torch.inference_mode():
                ok = bool(check())
            reason = "merged steps differ"
        except Exception as exc:  # an unexpected layout: stay with separate forwards
            ok = False
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            self.reset()
        if not ok:
            name = type(self.model).__name__
            _log.info("%s: %s runs one sequence per forward: %s", name, what, reason)
        return ok

    def _continuation_fails(self) -> str | None:
        """Why 3 prompt tokens and then a 4th through the cache differ from one forward.

        None when they agree (:func:`logits_close`); the state is forgotten either way.
        """
        gen = torch.Generator().manual_seed(2)
        ids = torch.randint(4, max(5, self.vocab_size), (4,), generator=gen).tolist()
        try:
            with torch.inference_mode():
                whole = self._one("~whole", ids, 0)
                self._one("~parts", ids[:3], 0)
                parts = self._one("~parts", ids[3:], 3)
            if logits_close([whole], [parts], rel=self._probe_rel):
                return None
            return "the logits differ"
        except Exception as exc:  # a cache layout this runner cannot keep
            return f"{type(exc).__name__}: {exc}"
        finally:
            self.reset()

    def _one(self, sid: str, ids: list[int], start: int) -> torch.Tensor:
        return self._run(SeqChunk(sid, ids, start, [], True))

    def _decode_matches(self) -> bool:
        def batch(rows: list[tuple[str, int, int]]) -> list[torch.Tensor]:
            return self._decode_batch(rows, strict=True)

        return merged_decode_matches(self._one, batch, self.vocab_size, rel=self._probe_rel)

    def _prefill_matches(self) -> bool:
        def batch(rows: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
            return self._prefill_batch([SeqChunk(sid, ids, 0, [], True) for sid, ids in rows])

        return merged_prefill_matches(self._one, batch, self.vocab_size, rel=self._probe_rel)

    # ------------------------------------------------------------------ steps
    def execute(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Run every chunk (see the module docstring); logits of those that ask for them."""
        seqs = self._seqs
        check_chunks(chunks, lambda sid: seqs[sid].length if sid in seqs else 0, self.max_context)
        merged = [c for c in chunks if c.start > 0 and len(c.token_ids) == 1]
        if not self.batched_decode or len(merged) < 2:
            merged = []
        groups = (
            prefill_groups([c for c in chunks if c.start == 0], self.prefill_group_tokens)
            if self.batched_prefill
            else []
        )
        in_batch = {c.seq_id for c in merged}
        in_batch.update(c.seq_id for group in groups for c in group)
        logits: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            for group in groups:
                rows = self._prefill_batch(group)
                logits.update(zip((c.seq_id for c in group), rows, strict=True))
            for c in chunks:
                if c.seq_id not in in_batch:
                    logits[c.seq_id] = self._run(c)
            if merged:
                rows = self._decode_batch([(c.seq_id, c.token_ids[0], c.start) for c in merged])
                logits.update(zip((c.seq_id for c in merged), rows, strict=True))
        out = [logits[c.seq_id] for c in chunks if c.need_logits]
        if not out:
            return torch.empty(0, self.vocab_size, device=self.device)
        return torch.stack(out).float()

    def _prefill_batch(self, chunks: Sequence[SeqChunk]) -> list[torch.Tensor]:
        """One left-padded forward for the first chunks (``start == 0``) of new sequences.

        Every sequence gets a fresh cache holding its own rows of the batch's (the padding
        columns of attention K/V dropped); returns the logits after each prompt.
        """
        self._dissolve([c.seq_id for c in chunks])  # restarts of members of the kept batch
        width = max(len(c.token_ids) for c in chunks)
        pads = [width - len(c.token_ids) for c in chunks]
        mask = _padding_mask(pads, width)
        batch_cache = self._new_cache()
        out = self._call(
            [[0] * pad + list(c.token_ids) for c, pad in zip(chunks, pads, strict=True)],
            batch_cache,
            positions=[[0] * pad + list(range(width - pad)) for pad in pads],
            cache_positions=list(range(width)),
            mask=mask,
        )
        states = [_SeqState(cache=self._new_cache(), length=width - pad) for pad in pads]
        split(
            _returned_cache(out) or batch_cache,
            [st.cache for st in states],
            pads,
            [st.length for st in states],
        )
        for c, st in zip(chunks, states, strict=True):
            self._seqs[c.seq_id] = st
            self._save(c.seq_id, st)
        return [out.logits[r, -1] for r in range(len(chunks))]

    def _decode_batch(
        self, rows: list[tuple[str, int, int]], *, strict: bool = False
    ) -> list[torch.Tensor]:
        """One forward for decode rows ``(seq_id, token, position)`` over merged caches.

        The merged batch is kept after the step: when the next decode step has the same
        sequences in the same order (the steady state of continuous batching), it runs on
        the batch as it is, with no merge or split; any other use of a member splits the
        batch back first (:meth:`_dissolve`). Falls back to one forward per row when the
        caches cannot be merged (``strict``: raises :class:`UnmergeableError` instead).
        """
        sids = tuple(sid for sid, _, _ in rows)
        states = [self._seqs[sid] for sid in sids]
        batch = self._batch
        if batch is None or batch.seq_ids != sids:
            self._dissolve()
            lengths = [st.length for st in states]
            batch_cache = self._new_cache()
            try:
                width = merge([st.cache for st in states], lengths, batch_cache)
            except UnmergeableError:
                if strict:
                    raise
                return [self._run(SeqChunk(sid, [tok], pos, [], True)) for sid, tok, pos in rows]
            batch = self._batch = _Batch(sids, batch_cache, [width - n for n in lengths], width)
            drop_tensors([st.cache for st in states])  # the batch holds their state now
            for st in states:
                st.batched = True
        width = batch.width
        mask = None
        if has_attention(batch.cache):  # the padding of the K/V; an SSM step has none
            mask = _padding_mask(batch.pads, width + 1)
        out = self._call(
            [[tok] for _, tok, _ in rows],
            batch.cache,
            positions=[[pos] for _, _, pos in rows],
            cache_positions=[width],
            mask=mask,
        )
        batch.cache = _returned_cache(out) or batch.cache
        batch.width += 1
        batch.steps += 1
        for st in states:
            st.length += 1
        return [out.logits[r, -1] for r in range(len(rows))]

    def _dissolve(self, seq_ids: Sequence[str] = ()) -> None:
        """Split the kept decode batch back into its sequences' caches.

        With ``seq_ids``, only when one of them is a member (else the batch stays).
        """
        batch = self._batch
        if batch is None or (seq_ids and not any(sid in batch.seq_ids for sid in seq_ids)):
            return
        self._batch = None
        members = [self._seqs.get(sid) for sid in batch.seq_ids]
        live = [st if st is not None and st.batched else None for st in members]
        split(
            batch.cache,
            [st.cache if st else None for st in live],
            batch.pads,
            [batch.steps] * len(live),
        )
        for st in live:
            if st is not None:
                st.batched = False

    def _run(self, chunk: SeqChunk) -> torch.Tensor:
        """Feed ``chunk`` to its sequence; return the logits after its last token."""
        sid = chunk.seq_id
        self._dissolve((sid,))
        if chunk.start == 0:  # new or restarted: fresh state
            self._seqs.pop(sid, None)
            for reset in self._resets:
                reset()
            logits, cache = self._forward(chunk.token_ids, 0, self._new_cache())
            state = _SeqState(cache=cache, length=len(chunk.token_ids))
            self._seqs[sid] = state
        else:
            state = self._seqs[sid]
            self._restore(sid, state)
            logits = None
            for i, tok in enumerate(chunk.token_ids):
                logits, state.cache = self._forward([tok], chunk.start + i, state.cache)
            state.length += len(chunk.token_ids)
        self._save(sid, state)
        assert logits is not None
        return logits

    def _new_cache(self) -> Any:
        """An empty cache as ``generate`` makes it (None: the model makes its own)."""
        if not self._default_cache:
            return None
        from transformers import DynamicCache

        config = self.model.config
        getter = getattr(config, "get_text_config", None)
        return DynamicCache(config=getter(decoder=True) if callable(getter) else config)

    def _forward(self, ids: list[int], start: int, cache: Any) -> tuple[torch.Tensor, Any]:
        """One forward of ``ids`` at positions ``start..``; (last logits, the cache after)."""
        span = list(range(start, start + len(ids)))
        out = self._call([ids], cache, positions=[span], cache_positions=span)
        new_cache = _returned_cache(out)
        if new_cache is None:
            if cache is None:
                raise RuntimeError(
                    f"{type(self.model).__name__} returned no cache with use_cache=True; its "
                    "state cannot be kept between steps"
                )
            new_cache = cache  # updated in place
        return out.logits[0, -1], new_cache

    def _call(
        self,
        ids: list[list[int]],
        cache: Any,
        *,
        positions: list[list[int]],
        cache_positions: list[int],
        mask: torch.Tensor | None = None,
    ) -> Any:
        """The model's forward on rows ``ids`` over ``cache``, logits of the last token only.

        ``positions`` and ``cache_positions`` are passed where the model takes them.
        """
        dev = self.device
        kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True}
        if mask is not None:
            kwargs["attention_mask"] = mask.to(dev)
        if self._positions:
            kwargs["position_ids"] = torch.tensor(positions, device=dev)
        if self._cache_positions:
            kwargs["cache_position"] = torch.tensor(cache_positions, device=dev)
        if self._keep:
            kwargs["logits_to_keep"] = 1
        return self.model(input_ids=torch.tensor(ids, dtype=torch.long, device=dev), **kwargs)

    # ------------------------------------------------------------------ module-held state
    def _save(self, sid: str, state: _SeqState) -> None:
        """Keep the state the modules hold for ``sid`` (copies: a module may update in place)."""
        self._current = sid
        if not self._owners:
            return
        state.modules = [_tensor_attrs(m) for m in self._owners]

    def _restore(self, sid: str, state: _SeqState) -> None:
        """Put ``sid``'s module-held state back (nothing to do when it is still there)."""
        if not self._owners or self._current == sid:
            return
        for module, saved in zip(self._owners, state.modules, strict=True):
            for path, value in saved.items():
                owner = module
                *parents, attr = path.split(".")
                for p in parents:
                    owner = getattr(owner, p)
                setattr(owner, attr, value.clone())
        self._current = sid

    # ------------------------------------------------------------------ lifetime
    def release(self, seq_id: str) -> None:
        """Drop the sequence's cache and saved state."""
        self._seqs.pop(seq_id, None)
        self._dissolve((seq_id,))  # a member: the others get their state back, its row is skipped
        if self._current == seq_id:
            self._current = None

    def reset(self) -> None:
        """Drop every sequence's cache and saved state."""
        self._batch = None
        self._seqs.clear()
        self._current = None


#: Most padded tokens of one batched prefill on the CPU. A prefill there is compute-bound
#: already at one sequence, and some models' CPU paths (Mamba's reference scan) slow down on
#: large batches: bench-mamba, 4 x 64 tokens, took 0.25 s batched vs 0.51 s one by one, but
#: 8 x 128 tokens 1.67 s vs 1.39 s. Elsewhere (GPU) only the scheduler's budget bounds it.
CPU_PREFILL_GROUP_TOKENS = 512


def _padding_mask(pads: Sequence[int], width: int) -> torch.Tensor:
    """A 2-D attention mask of ``width`` columns: row ``r`` masks its first ``pads[r]``."""
    mask = torch.ones(len(pads), width, dtype=torch.long)
    for r, pad in enumerate(pads):
        mask[r, :pad] = 0
    return mask


def _state_reset(module: Any, model: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A call of ``module._setup_cache`` for one sequence (its arguments found by name).

    Raises:
        ValueError: ``_setup_cache`` wants an argument this runner cannot supply.
    """
    setup = module._setup_cache
    known = {"config": model.config, "batch": 1, "batch_size": 1, "device": device, "dtype": dtype}
    kwargs: dict[str, Any] = {}
    for name, param in inspect.signature(setup).parameters.items():
        if name in known:
            kwargs[name] = known[name]
        elif param.default is inspect.Parameter.empty and param.kind not in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            raise ValueError(
                f"{type(module).__name__}._setup_cache takes {name!r}, which the per-sequence "
                "runner cannot supply, so its state cannot be reset between sequences"
            )

    def reset() -> None:
        setup(**kwargs)

    return reset


def _returned_cache(out: Any) -> Any:
    """The cache a forward returned (``past_key_values`` or, for SSM outputs, ``cache``)."""
    for name in ("past_key_values", "cache", "cache_params"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return None


def _tensor_attrs(module: Any) -> dict[str, torch.Tensor]:
    """Copies of the plain tensor attributes of ``module`` and its submodules, by dotted path.

    Parameters and buffers are not plain attributes (they live in ``_parameters`` and
    ``_buffers``), so only running state is taken.
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules():
        for name, value in vars(sub).items():
            if isinstance(value, torch.Tensor):
                out[f"{prefix}.{name}" if prefix else name] = value.clone()
    return out
