"""Fixtures of the HF engine tests: tiny offline models, reference generations, engines."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sagellm_protocol import Request

_ids = itertools.count()


def make_request(
    prompt: str = "The quick brown fox jumps over the lazy dog",
    max_tokens: int = 8,
    *,
    request_id: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    **metadata: Any,
) -> Request:
    """A protocol Request; keyword extras go to ``metadata`` (ignore_eos defaults to True)."""
    rid = request_id or f"req-{next(_ids)}"
    metadata.setdefault("ignore_eos", True)
    return Request(
        request_id=rid,
        trace_id=f"trace-{rid}",
        model="tiny",
        prompt=prompt,
        max_tokens=max_tokens,
        stream=False,
        temperature=temperature,
        top_p=top_p,
        metadata=metadata,
    )


PROMPTS = [
    "Hello world, this is a test of the engine",
    "def fibonacci(n):\n    return n",
    "你好，世界！今天天气很好。",
    "The quick brown fox jumps over the lazy dog again and again and again",
    "a",
    "Streaming text must survive emoji 🙂 and accents: café, naïve.",
]


@pytest.fixture(scope="session")
def tiny_llama() -> str:
    pytest.importorskip("transformers")
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    return str(ensure_tiny_model("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2() -> str:
    pytest.importorskip("transformers")
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    return str(ensure_tiny_model("tiny-gpt2"))


class Reference:
    """An independent copy of a model for ``model.generate`` reference outputs."""

    def __init__(self, path: str) -> None:
        from sagellm_backend.engine.hf.loader import load_model_and_tokenizer

        self.model, self.tokenizer = load_model_and_tokenizer(path, device="cpu", dtype="float32")
        self._cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def greedy(self, prompt: str | list[int], n: int) -> list[int]:
        """``n`` greedy tokens after ``prompt`` with EOS ignored (generation continues)."""
        from sagellm_backend.testing.reference import greedy_reference

        ids = self.ids(prompt) if isinstance(prompt, str) else list(prompt)
        key = (tuple(ids), n)
        if key not in self._cache:
            self._cache[key] = greedy_reference(self.model, ids, n)
        return self._cache[key]


@pytest.fixture(scope="session")
def llama_ref(tiny_llama: str) -> Reference:
    return Reference(tiny_llama)


@pytest.fixture(scope="session")
def gpt2_ref(tiny_gpt2: str) -> Reference:
    return Reference(tiny_gpt2)


def run(coro: Any) -> Any:
    """Run a coroutine on a fresh event loop (module-scoped engines outlive test loops)."""
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def llama_engine(tiny_llama: str) -> Iterator[Any]:
    """A started CPUEngine on tiny-llama shared by a module's tests."""
    from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig

    engine = CPUEngine(
        CPUEngineConfig(
            engine_id="hf-test-llama",
            model_path=tiny_llama,
            max_batch_size=8,
            max_new_tokens=64,
        )
    )
    run(engine.start())
    yield engine
    run(engine.stop())


@pytest.fixture
def engine_factory() -> Iterator[Callable[..., Any]]:
    """Build (not start) CPUEngines; every one started is stopped at teardown."""
    from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig

    made: list[Any] = []

    def make(model_path: str, **fields: Any) -> Any:
        fields.setdefault("max_batch_size", 4)
        fields.setdefault("max_new_tokens", 64)
        engine = CPUEngine(
            CPUEngineConfig(engine_id=f"hf-test-{next(_ids)}", model_path=model_path, **fields)
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        if engine.is_running:
            run(engine.stop())


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` on the event loop until it holds (AssertionError on timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
