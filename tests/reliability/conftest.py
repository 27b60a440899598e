"""Shared helpers of the reliability suite: requests, leak baselines, tiny-model engines."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sagellm_protocol import Request

_ids = itertools.count()

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "engines",
    "batch",
    "tokens",
]


def make_request(
    prompt: str = "the quick brown fox jumps over the lazy dog",
    max_tokens: int = 8,
    *,
    request_id: str | None = None,
    model: str = "tiny",
    stream: bool = False,
    **metadata: Any,
) -> Request:
    """A valid protocol Request; keyword extras go to ``metadata``."""
    rid = request_id or f"rel-{next(_ids)}"
    return Request(
        request_id=rid,
        trace_id=f"trace-{rid}",
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        stream=stream,
        metadata=metadata or None,
    )


def bad_request(**fields: Any) -> Request:
    """A Request that skips pydantic validation (``model_construct``) with ``fields`` set.

    Engines must re-check every field: callers inside a process can build requests this way.
    """
    rid = f"bad-{next(_ids)}"
    base: dict[str, Any] = {
        "request_id": rid,
        "trace_id": f"trace-{rid}",
        "model": "tiny",
        "prompt": "hello there",
        "max_tokens": 4,
        "stream": False,
        "temperature": None,
        "top_p": None,
        "metadata": None,
    }
    base.update(fields)
    return Request.model_construct(**base)


def words(n: int, salt: int = 0) -> str:
    """``n`` words of text (deterministic in ``salt``)."""
    return " ".join(WORDS[(i * 7 + salt) % len(WORDS)] for i in range(n))


#: Process-wide threads that third-party libraries start once and keep (not engine threads):
#: tqdm's monitor (started by transformers' weight-loading progress bar).
GLOBAL_THREAD_PREFIXES = ("tqdm_monitor",)


class Baseline:
    """Asyncio tasks and Python threads alive when it was taken (leak checks).

    Threads named with :data:`GLOBAL_THREAD_PREFIXES` are ignored: libraries start them
    once per process, and they do not grow with engines or requests.
    """

    def __init__(self) -> None:
        try:
            self.tasks = {t for t in asyncio.all_tasks() if not t.done()}
        except RuntimeError:  # no running loop
            self.tasks = set()
        self.threads = {t.ident for t in threading.enumerate()}

    def leaked_tasks(self) -> list[asyncio.Task[Any]]:
        """Tasks created since the baseline that are still not done."""
        return [t for t in asyncio.all_tasks() if not t.done() and t not in self.tasks]

    def leaked_threads(self, *, ignore_prefixes: tuple[str, ...] = ()) -> list[threading.Thread]:
        """Threads started since the baseline that are still alive."""
        return [
            t
            for t in threading.enumerate()
            if t.ident not in self.threads
            and t.is_alive()
            and not t.name.startswith((*GLOBAL_THREAD_PREFIXES, *ignore_prefixes))
        ]

    def threads_left_after(self, timeout: float = 3.0) -> list[threading.Thread]:
        """Threads started since the baseline still alive after waiting up to ``timeout`` s.

        A thread that is ending (e.g. joined just after its result was delivered) gets the
        time to end; one that stays alive is returned.
        """
        deadline = time.monotonic() + timeout
        while (left := self.leaked_threads()) and time.monotonic() < deadline:
            time.sleep(0.01)
        return left

    async def assert_clean(
        self, *, timeout: float = 2.0, ignore_prefixes: tuple[str, ...] = ()
    ) -> None:
        """Wait up to ``timeout`` s for every new task and thread to end, else fail."""
        deadline = time.monotonic() + timeout
        while True:
            tasks = self.leaked_tasks()
            threads = self.leaked_threads(ignore_prefixes=ignore_prefixes)
            if not tasks and not threads:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"left behind: tasks={tasks} threads={threads}")
            await asyncio.sleep(0.01)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` on the event loop until it holds (AssertionError on timeout)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


def hf_available() -> bool:
    """Whether torch and transformers are importable here."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


@pytest.fixture(scope="session")
def tiny_llama() -> str:
    """Path of the offline tiny Llama (built once per machine)."""
    if not hf_available():
        pytest.skip("torch/transformers not installed")
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    return str(ensure_tiny_model("tiny-llama"))


@pytest.fixture
def cpu_engine_factory(tiny_llama: str) -> Iterator[Callable[..., Any]]:
    """Build (not start) CPUEngines on the tiny Llama; running ones are stopped afterwards."""
    from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig

    made: list[Any] = []

    def make(**fields: Any) -> Any:
        fields.setdefault("max_batch_size", 8)
        fields.setdefault("max_new_tokens", 64)
        fields.setdefault("kv_cache_memory_bytes", 8 << 20)
        engine = CPUEngine(
            CPUEngineConfig(engine_id=f"rel-cpu-{next(_ids)}", model_path=tiny_llama, **fields)
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        if engine.is_running:
            asyncio.run(engine.stop())
