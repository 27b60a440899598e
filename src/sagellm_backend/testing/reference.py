"""Reference outputs for checking an engine: ``model.generate`` on one request alone.

:func:`greedy_reference` is what the test suite and ``scripts/arch_sweep.py`` compare the
engines' tokens with: greedy decoding of one prompt with EOS ignored, from a fresh state.

Invariants: the model's own generation config does not change the result (every option that
matters is passed explicitly; callers build models whose generation config adds no logits
processors); state a model keeps on its modules (RecurrentGemma) is reset first, since
``generate`` does not reset it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["greedy_reference"]


def greedy_reference(model: Any, ids: list[int], n: int) -> list[int]:
    """The ``n`` greedy tokens ``model.generate`` gives after prompt ``ids`` (EOS ignored).

    Raises:
        RuntimeError: ``generate`` returned another number of tokens.
    """
    import torch

    from sagellm_backend.engine.runners.hf_state import _state_reset
    from sagellm_backend.engine.runners.select import module_state_owners

    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        for module in module_state_owners(model):
            _state_reset(module, model, device, model.get_input_embeddings().weight.dtype)()
        out = model.generate(
            torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    tokens: list[int] = out[0, len(ids) :].tolist()
    if len(tokens) != n:
        raise RuntimeError(f"generate gave {len(tokens)} tokens, {n} asked")
    return tokens
