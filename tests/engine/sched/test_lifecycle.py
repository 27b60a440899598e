"""Engine life cycle and resource ownership (issue 19): what an engine takes, it gives back.

Each test goes through the public API only (start/stop/execute, the provider's figures,
threads, gc) on the mock provider or the tiny offline Llama.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import warnings
from typing import Any

import pytest
from sagellm_protocol import ErrorCode, Request

from sagellm_backend.engine.mock import MockEngine, MockEngineConfig
from sagellm_backend.errors import BackendNotAvailableError, KVCacheExhaustedError

PAGE = 8192  # tiny-llama: 2 layers x 2 kv heads x 16 dims x fp32 x 16 tokens


def req(prompt: str = "hello world", max_tokens: int = 4, **kw: Any) -> Request:
    fields: dict[str, Any] = {
        "request_id": f"r-{time.perf_counter_ns()}",
        "trace_id": "t",
        "model": "m",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": False,
    }
    fields.update(kw)
    return Request(**fields)


def engine_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("sagellm-")]


@pytest.fixture(scope="module")
def tiny_llama() -> str:
    pytest.importorskip("transformers")
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    return str(ensure_tiny_model("tiny-llama"))


def cpu_engine(path: str, provider: Any, name: str = "life", **kw: Any) -> Any:
    from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig

    return CPUEngine(
        CPUEngineConfig(
            engine_id=name,
            model_path=path,
            max_batch_size=4,
            max_new_tokens=16,
            provider=provider,
            **kw,
        )
    )


def cpu_provider(budget: int) -> Any:
    from sagellm_backend.providers.cpu import CPUBackendProvider

    return CPUBackendProvider(kv_memory_bytes=budget)


# ---------------------------------------------------------------------------- 1. KV ownership
@pytest.mark.hf
def test_stop_gives_the_kv_pool_back_so_a_second_engine_can_start(tiny_llama: str) -> None:
    provider = cpu_provider(64 * PAGE)

    async def body() -> None:
        first = cpu_engine(tiny_llama, provider, "first")  # default: the whole budget
        await first.start()
        assert provider.memory_stats()["kv_pool_bytes"] == 64 * PAGE
        assert (await first.execute(req())).finish_reason == "length"
        await first.stop()
        assert provider.memory_stats()["kv_pool_bytes"] == 0
        second = cpu_engine(tiny_llama, provider, "second")
        await second.start()
        assert (await second.execute(req())).finish_reason == "length"
        await second.stop()
        assert provider.memory_stats()["kv_pool_bytes"] == 0

    asyncio.run(body())


@pytest.mark.hf
def test_default_kv_pool_holds_the_batch_at_full_context(tiny_llama: str) -> None:
    """No kv_cache_memory_bytes: max_batch_size full-context sequences' pages, no more --
    or all the budget leaves when it holds fewer."""

    async def body() -> None:
        roomy = cpu_provider(1 << 30)
        engine = cpu_engine(tiny_llama, roomy)  # max_batch_size=4
        await engine.start()
        info = engine.get_info()
        block = info["kv"]["block_size"]
        assert info["kv"]["num_pages"] == 4 * -(-info["max_context"] // block)
        assert roomy.memory_stats()["kv_pool_bytes"] == info["kv"]["total_bytes"] < 1 << 30
        # a request of the full context fits while three others run
        full = [5] * (info["max_context"] - 8)
        results = await asyncio.gather(
            engine.execute(req(max_tokens=8, metadata={"prompt_token_ids": full})),
            *(engine.execute(req()) for _ in range(3)),
        )
        assert [r.finish_reason for r in results] == ["length"] * 4, [r.error for r in results]
        assert results[0].metrics.kv_used_tokens >= info["max_context"] - 1  # all of it held
        await engine.stop()

        tight = cpu_provider(64 * PAGE)  # fewer pages than the batch at full context
        small = cpu_engine(tiny_llama, tight, "small")
        await small.start()
        assert small.get_info()["kv"]["num_pages"] == 64
        assert (await small.execute(req())).finish_reason == "length"
        await small.stop()

    asyncio.run(body())


@pytest.mark.hf
def test_two_engines_share_a_provider_when_the_budget_allows(tiny_llama: str) -> None:
    provider = cpu_provider(64 * PAGE)

    async def body() -> None:
        a = cpu_engine(tiny_llama, provider, "a", kv_cache_memory_bytes=32 * PAGE)
        b = cpu_engine(tiny_llama, provider, "b", kv_cache_memory_bytes=32 * PAGE)
        c = cpu_engine(tiny_llama, provider, "c", kv_cache_memory_bytes=32 * PAGE)
        await a.start()
        await b.start()
        ra, rb = await asyncio.gather(a.execute(req()), b.execute(req()))
        assert ra.output_tokens == rb.output_tokens and ra.finish_reason == "length"
        with pytest.raises(KVCacheExhaustedError, match="budget"):
            await c.start()  # the budget is spent: the error says so
        assert not c.is_running
        await a.stop()
        await c.start()  # a's share is back
        await b.stop()
        await c.stop()
        assert provider.memory_stats()["kv_pool_bytes"] == 0

    asyncio.run(body())


@pytest.mark.hf
def test_a_failed_start_gives_back_what_it_took(
    tiny_llama: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sagellm_backend.engine.hf import core

    provider = cpu_provider(64 * PAGE)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("runner construction failed")

    async def body() -> None:
        engine = cpu_engine(tiny_llama, provider)
        with monkeypatch.context() as m:
            m.setattr(core, "build_runner", broken)
            for _ in range(3):
                with pytest.raises(RuntimeError, match="runner construction failed"):
                    await engine.start()
                assert provider.memory_stats()["kv_pool_bytes"] == 0
        await engine.start()
        assert (await engine.execute(req())).finish_reason == "length"
        await engine.stop()
        assert provider.memory_stats()["kv_pool_bytes"] == 0

    asyncio.run(body())


# ---------------------------------------------------------------------------- 2/3. start()
def _slow_loads(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[float]:
    from sagellm_backend.engine.hf import loader

    real = loader.load_model_and_tokenizer
    loads: list[float] = []

    def slow(*args: Any, **kwargs: Any) -> Any:
        loads.append(time.perf_counter())
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "load_model_and_tokenizer", slow)
    return loads


@pytest.mark.hf
def test_a_start_cancelled_by_a_timeout_is_undone_and_retry_works(
    tiny_llama: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = _slow_loads(monkeypatch, 0.3)
    provider = cpu_provider(64 * PAGE)
    before = set(engine_threads())

    async def body() -> None:
        engine = cpu_engine(tiny_llama, provider)
        timeouts = 0
        for _ in range(20):
            try:
                await asyncio.wait_for(engine.start(), 0.02)
            except TimeoutError:
                timeouts += 1
                assert not engine.is_running
                continue
            break
        assert timeouts >= 1
        if not engine.is_running:
            await engine.start()
        assert len(loads) == 1  # never a second (concurrent) load
        assert (await engine.execute(req())).finish_reason == "length"
        assert provider.memory_stats()["kv_pool_bytes"] == 64 * PAGE  # exactly one pool
        await engine.stop()
        assert provider.memory_stats()["kv_pool_bytes"] == 0
        # 20 more timed-out starts with the model loaded: each is undone, none leaks
        for _ in range(20):
            try:
                await asyncio.wait_for(engine.start(), 0.0001)
            except TimeoutError:
                pass
            else:
                await engine.stop()
        await engine.start()
        await engine.stop()
        assert provider.memory_stats()["kv_pool_bytes"] == 0

    asyncio.run(body())
    assert set(engine_threads()) <= before


@pytest.mark.hf
def test_stop_during_start_wins(tiny_llama: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _slow_loads(monkeypatch, 0.3)
    provider = cpu_provider(64 * PAGE)

    async def body() -> None:
        engine = cpu_engine(tiny_llama, provider)
        starting = asyncio.create_task(engine.start())
        await asyncio.sleep(0.05)
        await engine.stop()
        with pytest.raises(BackendNotAvailableError, match="stop"):
            await starting
        assert not engine.is_running
        assert not await engine.health_check()
        assert provider.memory_stats()["kv_pool_bytes"] == 0
        with pytest.raises(RuntimeError, match="not running"):
            await engine.execute(req())
        await engine.start()  # and it can start later
        await engine.stop()

    asyncio.run(body())


def test_mock_stop_during_start_and_cancelled_start() -> None:
    async def body() -> None:
        engine = MockEngine(MockEngineConfig("m", 0.0, 0.0))
        for _ in range(20):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(engine.start(), 0)
            assert not engine.is_running
        await engine.start()
        assert (await engine.execute(req())).finish_reason == "length"
        await engine.stop()
        assert engine.provider.memory_stats()["num_kv_managers"] == 0

    asyncio.run(body())


def test_a_start_during_stop_waits_for_it_and_starts_anew() -> None:
    async def body() -> None:
        engine = MockEngine(MockEngineConfig("m", 0.0, 0.0, max_batch_size=8))
        await engine.start()
        stopping = asyncio.create_task(engine.stop())
        await asyncio.sleep(0)  # stop() is tearing down (waiting for its driver)
        await engine.start()  # a supervisor restarting the engine
        await stopping
        assert engine.is_running and await engine.health_check()
        assert (await engine.execute(req())).finish_reason == "length"
        await engine.stop()
        assert engine.provider.memory_stats()["num_kv_managers"] == 0

    asyncio.run(body())


@pytest.mark.hf
def test_a_second_stop_returns_when_the_first_has_finished(tiny_llama: str) -> None:
    provider = cpu_provider(64 * PAGE)

    async def body() -> None:
        engine = cpu_engine(tiny_llama, provider)
        await engine.start()
        long = [
            asyncio.create_task(engine.execute(req(max_tokens=16, metadata={"ignore_eos": True})))
            for _ in range(3)
        ]
        await asyncio.sleep(0)
        first = asyncio.create_task(engine.stop())  # a signal handler
        await asyncio.sleep(0)
        await engine.stop()  # the application's shutdown hook
        assert first.done() and all(t.done() for t in long)
        assert provider.memory_stats()["num_kv_managers"] == 0

    asyncio.run(body())


@pytest.mark.hf
def test_a_long_prompt_overtaken_by_stop_gets_a_terminal_result(tiny_llama: str) -> None:
    """Prompts of 32K+ characters are tokenized off the loop; a stop() meanwhile ends them
    with an error result (not the RuntimeError of a call on a stopped engine)."""
    provider = cpu_provider(64 * PAGE)

    async def body() -> None:
        engine = cpu_engine(tiny_llama, provider)
        await engine.start()
        prompt = "hello world " * 4000
        running = asyncio.create_task(engine.execute(req(prompt)))
        stream = engine.stream(req(prompt, stream=True))
        streaming = asyncio.create_task(anext(stream))
        await asyncio.sleep(0)
        await engine.stop()
        resp = await running
        assert resp.finish_reason == "error" and "stopped" in resp.error.message
        assert (await streaming).event == "start"
        end = await anext(stream)
        assert end.event == "end" and end.finish_reason == "error"
        await engine.start()
        bad = Request.model_construct(**{**req(prompt).model_dump(), "metadata": ["x"]})
        got = await engine.execute(bad)  # not a dict: reported, not an AttributeError
        assert got.finish_reason == "error" and "metadata" in got.error.message
        await engine.stop()

    asyncio.run(body())


# ---------------------------------------------------------------------------- 4. dropped
@pytest.mark.hf
def test_an_engine_dropped_without_stop_is_collected_and_its_thread_ends(
    tiny_llama: str,
) -> None:
    provider = cpu_provider(64 * PAGE)
    before = set(engine_threads())

    async def body() -> None:
        engine = cpu_engine(tiny_llama, provider, "dropped-cpu")
        await engine.start()
        assert (await engine.execute(req())).finish_reason == "length"
        assert any("dropped-cpu" in n for n in engine_threads())
        with pytest.warns(ResourceWarning, match="dropped-cpu"):
            del engine
            gc.collect()
        deadline = time.monotonic() + 5
        while any("dropped-cpu" in n for n in engine_threads()):
            assert time.monotonic() < deadline, engine_threads()
            await asyncio.sleep(0.01)
        assert provider.memory_stats()["kv_pool_bytes"] == 0

    asyncio.run(body())
    assert set(engine_threads()) <= before


def test_a_mock_engine_dropped_without_stop_is_collected() -> None:
    from sagellm_backend.providers.mock import MockBackendProvider

    provider = MockBackendProvider()

    async def body() -> None:
        engine = MockEngine(MockEngineConfig("dropped-mock", 0.0, 0.0, provider=provider))
        await engine.start()
        assert (await engine.execute(req())).finish_reason == "length"
        with pytest.warns(ResourceWarning, match="dropped-mock"):
            del engine
            gc.collect()
        for _ in range(10):
            await asyncio.sleep(0)
        assert not [t for t in asyncio.all_tasks() if "dropped-mock" in t.get_name()]
        stats = provider.memory_stats()
        assert stats["num_kv_managers"] == 0 and stats["kv_reserved_bytes"] == 0

    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        asyncio.run(body())


# ---------------------------------------------------------------------------- 7. validation
@pytest.mark.parametrize(
    ("fields", "word"),
    [
        ({"prompt": " ".join(["ab"] * 70)}, "context"),
        ({"prompt": "a\ud800b"}, "prompt"),
        ({"metadata": {"prompt_token_ids": [1, 999_999]}}, "vocabulary"),
        ({"metadata": {"stop_token_ids": "x"}}, "stop_token_ids"),
        ({"metadata": {"seed": -1}}, "seed"),
        ({"metadata": {"top_k": -2}}, "top_k"),
        ({"metadata": {"repetition_penalty": 0}}, "repetition_penalty"),
    ],
)
async def test_the_mock_validates_like_the_real_engines(fields: dict[str, Any], word: str) -> None:
    engine = MockEngine(MockEngineConfig("v", 0.0, 0.0, max_model_len=64))
    await engine.start()
    try:
        resp = await engine.execute(req(**fields))
        assert resp.finish_reason == "error" and resp.error is not None
        assert resp.error.code == ErrorCode.INVALID_ARGUMENT
        assert word in resp.error.message
    finally:
        await engine.stop()


async def test_the_mock_rejects_max_tokens_none_unless_a_default_is_given() -> None:
    constructed = Request.model_construct(
        request_id="n", trace_id="t", model="m", prompt="hi", max_tokens=None, stream=False
    )
    engine = MockEngine(MockEngineConfig("none", 0.0, 0.0))
    await engine.start()
    resp = await engine.execute(constructed)
    assert resp.finish_reason == "error" and resp.error is not None
    assert "max_tokens" in resp.error.message
    await engine.stop()


async def test_unknown_metadata_keys_are_warned_once_naming_the_valid_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = MockEngine(MockEngineConfig("meta", 0.0, 0.0))
    await engine.start()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            resp = await engine.execute(req(metadata={"block_sise": 32}))
            assert resp.finish_reason == "length"
    await engine.stop()
    hits = [r for r in caplog.records if "block_sise" in r.getMessage()]
    assert len(hits) == 1 and "stop_token_ids" in hits[0].getMessage()


async def test_the_mock_caps_max_tokens_at_its_context() -> None:
    engine = MockEngine(MockEngineConfig("ctx", 0.0, 0.0, max_model_len=16))
    await engine.start()
    resp = await engine.execute(req("hi", 100))
    assert resp.finish_reason == "length"
    assert len(resp.output_tokens) == 16 - len(engine.tokenizer.encode("hi"))
    await engine.stop()


async def test_the_mock_honours_temperature_top_p_and_seed() -> None:
    engine = MockEngine(MockEngineConfig("sample", 0.0, 0.0))
    await engine.start()
    try:
        greedy = [(await engine.execute(req("abc", 12))).output_tokens for _ in range(2)]
        assert greedy[0] == greedy[1]

        async def sampled(seed: int, **kw: Any) -> list[int]:
            r = await engine.execute(req("abc", 12, temperature=1.0, metadata={"seed": seed}, **kw))
            return list(r.output_tokens)

        assert await sampled(1) == await sampled(1)
        assert await sampled(1) != await sampled(2)
        assert await sampled(1) != greedy[0]
        # a tiny nucleus keeps only the most likely token: greedy again
        assert await sampled(5, top_p=1e-9) == greedy[0]
    finally:
        await engine.stop()


async def test_prompt_token_ids_may_be_numpy_integers() -> None:
    np = pytest.importorskip("numpy")
    engine = MockEngine(MockEngineConfig("m", 0.0, 0.0))
    await engine.start()
    try:
        plain = await engine.execute(req(metadata={"prompt_token_ids": [300, 301, 302]}))
        ids = [np.int64(300), np.int32(301), 302]
        numpy_ids = await engine.execute(req(metadata={"prompt_token_ids": ids}))
        assert numpy_ids.finish_reason == "length"
        assert numpy_ids.output_tokens == plain.output_tokens
        bools = await engine.execute(req(metadata={"prompt_token_ids": [True, 300]}))
        assert bools.finish_reason == "error" and "list of ints" in bools.error.message
    finally:
        await engine.stop()
