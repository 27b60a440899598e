"""The mock engine: a faithful, dependency-free engine over a simulated model.

``MockEngine`` = the shared scheduler + driver + the mock runner
(:mod:`sagellm_backend.engine.runners.mock`); the tokenizer lives in
:mod:`sagellm_backend.engine.mock.tokenizer`. This package keeps every name the 0.1.x
``sagellm_backend.engine.mock`` module exported.
"""

from __future__ import annotations

from sagellm_protocol import Metrics as Metrics  # 0.1.1.2 export
from sagellm_protocol import Request as Request  # 0.1.1.2 export
from sagellm_protocol import Response as Response  # 0.1.1.2 export
from sagellm_protocol import StreamEventDelta as StreamEventDelta  # 0.1.1.2 export
from sagellm_protocol import StreamEventEnd as StreamEventEnd  # 0.1.1.2 export
from sagellm_protocol import StreamEventStart as StreamEventStart  # 0.1.1.2 export

from sagellm_backend.engine.base import BaseEngine as BaseEngine  # 0.1.1.2 export
from sagellm_backend.engine.base import EngineConfig as EngineConfig  # 0.1.1.2 export
from sagellm_backend.engine.mock.engine import (
    DEFAULT_KV_NUM_PAGES,
    ENV_MOCK_OPTIONS,
    MockEngine,
    MockEngineConfig,
    create_mock_engine,
)
from sagellm_backend.engine.mock.tokenizer import MockTokenizer

__all__ = [
    "DEFAULT_KV_NUM_PAGES",
    "ENV_MOCK_OPTIONS",
    "MockEngine",
    "MockEngineConfig",
    "MockTokenizer",
    "create_mock_engine",
]
