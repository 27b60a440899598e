"""Model runners: execute one scheduler step (a plan of per-sequence chunks) on a device.

The runner interface (:class:`~sagellm_backend.engine.runners.base.ModelRunner`) and the
step-plan item (:class:`~sagellm_backend.engine.runners.base.SeqChunk`) live in
:mod:`sagellm_backend.engine.runners.base`, which imports no torch at run time. Concrete
runners live beside it and import torch themselves.
"""

from __future__ import annotations

from sagellm_backend.engine.runners.base import ModelRunner, SeqChunk

__all__ = ["ModelRunner", "SeqChunk"]
