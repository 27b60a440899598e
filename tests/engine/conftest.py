"""Fixtures of the engine-layer tests."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sagellm_protocol import Request

from sagellm_backend.engine.mock import MockEngine, MockEngineConfig

_ids = itertools.count()


def make_request(
    prompt: str = "the quick brown fox jumps over the lazy dog",
    max_tokens: int = 8,
    *,
    stream: bool = False,
    request_id: str | None = None,
    model: str = "mock-model",
    metadata: dict[str, Any] | None = None,
) -> Request:
    rid = request_id or f"req-{next(_ids)}"
    return Request(
        request_id=rid,
        trace_id=f"trace-{rid}",
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        stream=stream,
        metadata=metadata,
    )


@pytest.fixture
def req() -> Callable[..., Request]:
    return make_request


@pytest.fixture
async def engine_factory() -> AsyncIterator[Any]:
    """Start MockEngines with zero latency by default; stop them all at teardown."""
    started: list[MockEngine] = []

    async def make(**options: Any) -> MockEngine:
        options.setdefault("simulate_latency_ms", 0.0)
        options.setdefault("simulate_ttft_ms", 0.0)
        engine_id = options.pop("engine_id", f"mock-{next(_ids)}")
        engine = MockEngine(MockEngineConfig(engine_id, **options))
        await engine.start()
        started.append(engine)
        return engine

    yield make
    for eng in started:
        await eng.stop()


@pytest.fixture
async def engine(engine_factory: Any) -> AsyncIterator[MockEngine]:
    eng = await engine_factory()
    yield eng
