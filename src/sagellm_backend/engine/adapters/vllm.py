"""vLLM adapter (0.1.1.2 module): :class:`VLLMAdapter`; needs ``pip install vllm`` when used."""

from __future__ import annotations

# 0.1.1.2 exported these names from this module; kept for code that imports them here.
from sagellm_protocol import Metrics as Metrics
from sagellm_protocol import Request as Request
from sagellm_protocol import Response as Response
from sagellm_protocol import StreamEventDelta as StreamEventDelta
from sagellm_protocol import StreamEventEnd as StreamEventEnd
from sagellm_protocol import StreamEventStart as StreamEventStart

from sagellm_backend.engine.adapters._base import ThirdPartyAdapter
from sagellm_backend.engine.base import BaseEngine as BaseEngine
from sagellm_backend.engine.base import EngineConfig as EngineConfig

__all__ = ["VLLMAdapter"]


class VLLMAdapter(ThirdPartyAdapter):
    """BaseEngine face over vLLM (see :mod:`sagellm_backend.engine.adapters._base`)."""

    PACKAGE = "vllm"
    PIP = "pip install vllm"
    KIND = "vllm"
