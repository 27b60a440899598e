"""One sampler for every runner: greedy, temperature, top-k, top-p, repetition penalty, seed.

A runner returns, for every chunk that asked for logits, one row of next-token scores. Two
row formats exist, with one meaning:

* a float **torch tensor** ``[rows, vocab]`` (the HF runners): every token has a logit;
* :class:`SparseLogits` (the mock runner, no torch): every row names its most likely token
  (``top1``) and, on request, a short list of candidate tokens with their logits; every
  token outside the list has logit ``-inf``.

:meth:`Sampler.sample` applies the same steps to either, in this order (the order of
transformers' logits processors): repetition penalty over the sequence's prompt and output
tokens (a positive logit is divided by the penalty, a negative one multiplied), then greedy
(argmax) when ``temperature`` is None or 0; otherwise division by the temperature (after
shifting the largest logit to 0, so a tiny temperature is a sharp but valid distribution),
top-k, top-p (the most likely token always stays) and one draw. The draw uses the
sequence's own generator, created on first use from ``seed`` (``random.Random`` on the sparse
path, ``torch.Generator`` on the tensor path; a seeded request repeats exactly on the same
path). Greedy rows never touch a generator, so a greedy mock row costs one list read.

Invariants:
    * the pure-Python path imports nothing beyond the standard library (the mock stays
      torch-free); torch is imported only when a tensor arrives;
    * a row whose sampling fails yields that exception in its place; the other rows are
      unaffected (the scheduler fails only that request).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Sampler", "SamplingParams", "SamplingSeq", "SparseLogits"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling settings (validated by the engine before they get here).

    Attributes:
        temperature: None or 0 -> greedy; > 0 -> sample from ``softmax(logits / T)``.
        top_p: nucleus mass in (0, 1] (sampling only; None = 1).
        top_k: keep the k most likely tokens (sampling only; None or 0 = all).
        repetition_penalty: > 0; 1 or None = off (applies to greedy rows too).
        seed: seed of the request's generator (None: a fresh random seed).
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy (argmax)."""
        return self.temperature is None or self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        """Whether a repetition penalty applies."""
        rp = self.repetition_penalty
        return rp is not None and rp != 1.0


#: Greedy, no penalty: the parameters of most requests (shared, immutable).
GREEDY = SamplingParams()


class SamplingSeq(Protocol):
    """What the sampler reads from (and keeps on) a sequence."""

    sampling: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: Any


class SparseLogits:
    """Logit rows given as a top token plus, on demand, candidate tokens and their logits.

    Args:
        top1: the most likely token of each row.
        expand: ``expand(row) -> (token_ids, logits)``: the row's candidates (``top1`` among
            them, distinct ids); tokens not listed have logit ``-inf``.
        errors: per-row exceptions (a failed row), by row index.
    """

    __slots__ = ("errors", "expand", "top1")

    def __init__(
        self,
        top1: list[int],
        expand: Callable[[int], tuple[Sequence[int], Sequence[float]]],
        errors: dict[int, BaseException] | None = None,
    ) -> None:
        self.top1 = top1
        self.expand = expand
        self.errors = errors

    def __len__(self) -> int:
        return len(self.top1)


class Sampler:
    """Picks one token per logits row (see the module docstring for the semantics)."""

    def sample(
        self, logits: Any, seqs: Sequence[SamplingSeq], special: Sequence[int] | None = None
    ) -> list[int | BaseException]:
        """One token (or the row's exception) per row of ``logits``, in row order.

        Args:
            logits: :class:`SparseLogits` or a float tensor ``[len(seqs), vocab]``.
            seqs: the sequences the rows belong to, in row order.
            special: the rows whose sampling is not plain greedy, when the caller knows
                them (every other row then takes the argmax without a look at its params).
        """
        if special is None:
            special = [i for i, s in enumerate(seqs) if not _plain_greedy(s.sampling)]
        if isinstance(logits, SparseLogits):
            return self._sample_sparse(logits, seqs, special)
        return self._sample_dense(logits, seqs, special)

    # ------------------------------------------------------------------ sparse (pure Python)
    def _sample_sparse(
        self, logits: SparseLogits, seqs: Sequence[SamplingSeq], special: Sequence[int]
    ) -> list[int | BaseException]:
        out: list[int | BaseException] = list(logits.top1)
        errors = logits.errors
        if not special and errors is None:
            return out
        for i in special:
            seq = seqs[i]
            if _plain_greedy(seq.sampling):
                continue
            try:
                ids, vals = logits.expand(i)
                out[i] = self._pick_sparse(list(ids), list(vals), seq)
            except Exception as exc:
                out[i] = exc
        if errors is not None:
            for i, failure in errors.items():
                out[i] = failure
        return out

    def _pick_sparse(self, ids: list[int], vals: list[float], seq: SamplingSeq) -> int:
        params = seq.sampling
        if params.penalized:
            assert params.repetition_penalty is not None
            vals = _penalize(ids, vals, seq, params.repetition_penalty)
        best = max(range(len(ids)), key=vals.__getitem__)
        if params.greedy:
            return ids[best]
        assert params.temperature is not None
        top = vals[best]
        scaled = [(v - top) / params.temperature for v in vals]
        order = sorted(range(len(ids)), key=scaled.__getitem__, reverse=True)
        if params.top_k:
            order = order[: params.top_k]
        weights = [math.exp(scaled[j]) for j in order]
        total = sum(weights)
        probs = [w / total for w in weights]
        if params.top_p is not None and params.top_p < 1.0:
            kept: list[int] = []
            mass = 0.0
            for j, p in zip(order, probs, strict=True):
                if kept and mass >= params.top_p:
                    break
                kept.append(j)
                mass += p
            order = kept
            probs = probs[: len(kept)]
        gen = seq.generator
        if gen is None:
            gen = seq.generator = random.Random(
                params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)
            )
        choice: int = gen.choices(order, weights=probs, k=1)[0]
        return ids[choice]

    # ------------------------------------------------------------------ dense (torch)
    def _sample_dense(
        self, logits: Any, seqs: Sequence[SamplingSeq], special: Sequence[int]
    ) -> list[int | BaseException]:
        import torch

        tokens: list[int | BaseException] = list(logits.argmax(dim=-1).tolist())
        for i in special:
            if _plain_greedy(seqs[i].sampling):
                continue
            try:
                tokens[i] = self._pick_dense(logits[i], seqs[i], torch)
            except Exception as exc:
                tokens[i] = exc
        return tokens

    def _pick_dense(self, row: Any, seq: SamplingSeq, torch: Any) -> int:
        params = seq.sampling
        if params.penalized:
            assert params.repetition_penalty is not None
            seen = torch.tensor(
                sorted(set(seq.prompt_ids) | set(seq.output_ids)),
                dtype=torch.long,
                device=row.device,
            )
            picked = row.index_select(0, seen)
            rp = params.repetition_penalty
            row = row.clone()
            row[seen] = torch.where(picked > 0, picked / rp, picked * rp)
            # an extreme penalty overflows: the boosted tokens tie at the largest value
            row = torch.nan_to_num(row, posinf=torch.finfo(row.dtype).max, neginf=float("-inf"))
        if params.greedy:
            return int(row.argmax().item())
        assert params.temperature is not None
        # A temperature below the dtype's smallest normal number would round to 0 (0 / 0 at
        # the top logit): it is that number, which still keeps only the top token(s).
        temperature = max(params.temperature, torch.finfo(row.dtype).tiny)
        row = (row - row.max()) / temperature
        if params.top_k and params.top_k < row.numel():
            kth = torch.topk(row, params.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if params.top_p is not None and params.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            cum = torch.cumsum(probs, dim=-1)
            drop = (cum - probs) >= params.top_p
            drop[0] = False
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
        probs = torch.softmax(row, dim=-1)
        gen = seq.generator
        if gen is None:
            gen = seq.generator = torch.Generator(device=row.device)
            gen.manual_seed(
                params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)
            )
        return int(torch.multinomial(probs, 1, generator=gen).item())


def _plain_greedy(params: SamplingParams) -> bool:
    return params is GREEDY or (params.greedy and not params.penalized)


def _penalize(ids: list[int], vals: list[float], seq: SamplingSeq, rp: float) -> list[float]:
    seen = set(seq.prompt_ids)
    seen.update(seq.output_ids)
    return [
        (v / rp if v > 0 else v * rp) if t in seen else v for t, v in zip(ids, vals, strict=True)
    ]
