"""Start-up probes: does batching a model's sequences change what it computes?

:func:`padded_batches_match` runs a few tiny sequences through an
:class:`~sagellm_backend.engine.runners.hf_cache.HFBatchedRunner` alone and as left-padded
batches, and compares the logits (:func:`logits_close`). Models that derive positions from
the cache length instead of ``position_ids`` or the attention mask (the decoders of BART,
Pegasus, Marian, Whisper, ... and XLM, CPM-Ant) fail it: in a padded batch, a shorter row
would see the padding as earlier tokens. :func:`~.select.select_runner` then serves them one
sequence per forward (``hf-sequential``).

Invariants: a probe leaves the runner empty (``reset``) whatever happens; any exception in
it counts as "does not match".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from sagellm_backend.engine.runners.base import SeqChunk

if TYPE_CHECKING:
    from sagellm_backend.engine.runners.hf_cache import HFBatchedRunner

__all__ = ["logits_close", "padded_batches_match", "probe_rel"]


def probe_rel(dtype: torch.dtype) -> float:
    """Share of the logits' magnitude a probe allows for a model computing in ``dtype``.

    1% in float32; 10% in 16-bit dtypes, whose rounding depends on batch shapes (a mixed
    state or a wrong position moves logits by about their whole magnitude).
    """
    return 1e-2 if dtype == torch.float32 else 1e-1


def logits_close(
    want: Sequence[torch.Tensor], got: Sequence[torch.Tensor], *, rel: float = 1e-2
) -> bool:
    """Logits rows pairwise within 1e-3 plus ``rel`` (default 1%) of the expected magnitude."""
    for w, g in zip(want, got, strict=True):
        tol = 1e-3 + rel * float(w.abs().max())
        if float((w.float() - g.float()).abs().max()) > tol:
            return False
    return True


def padded_batches_match(runner: HFBatchedRunner) -> tuple[bool, str]:
    """Whether left-padded batches give ``runner``'s model the logits of separate forwards.

    Three prompts of 1, 6 and 3 tokens each run alone (prompt, then three decode tokens one
    forward at a time) and together: one left-padded prompt forward, then the three decode
    steps through :meth:`HFBatchedRunner.execute` (the kept batch). Every logits row must
    agree (:func:`logits_close` within :func:`probe_rel` of the logits' magnitude, for the
    dtype the model computes in).

    Returns:
        (matches, why not: "" when it matches).
    """
    gen = torch.Generator().manual_seed(0)
    high = max(5, runner.vocab_size)
    prompts = {
        f"p{i}": torch.randint(4, high, (n,), generator=gen).tolist()
        for i, n in enumerate((1, 6, 3))
    }
    tokens = [int(t) for t in torch.randint(4, high, (3,), generator=gen)]
    try:
        with torch.inference_mode():
            alone: dict[str, list[torch.Tensor]] = {}
            for sid, ids in prompts.items():
                rows = runner._forward([SeqChunk(f"~{sid}", ids, 0, [], True)], may_keep=False)
                for i, t in enumerate(tokens):
                    step = SeqChunk(f"~{sid}", [t], len(ids) + i, [], True)
                    rows += runner._forward([step], may_keep=False)
                alone[sid] = rows
            chunks = [SeqChunk(f"~~{sid}", ids, 0, [], True) for sid, ids in prompts.items()]
            together = {
                sid: [row]
                for sid, row in zip(prompts, runner._forward(chunks, may_keep=False), strict=True)
            }
            for i, t in enumerate(tokens):
                steps = [
                    SeqChunk(f"~~{sid}", [t], len(ids) + i, [], True)
                    for sid, ids in prompts.items()
                ]
                for sid, row in zip(prompts, runner.execute(steps), strict=True):
                    together[sid].append(row)
        rel = probe_rel(runner.dtype)
        if all(logits_close(alone[sid], together[sid], rel=rel) for sid in prompts):
            return True, ""
        return False, (
            "left-padded batches change its logits (it does not take positions from the "
            "attention mask or position_ids)"
        )
    except Exception as exc:  # an unexpected layout: not safe to batch
        return False, f"a left-padded batch failed ({type(exc).__name__}: {exc})"
    finally:
        runner.reset()
