"""Cancellation: a request given up at any point frees its KV, and nothing is left behind.

Cases, on MockEngine and on CPUEngine (tiny Llama): consumers that stop reading a stream
after k tokens (closing it, or abandoning the generator), consumers that stall without
closing, and ``execute``/``stream`` tasks cancelled while the request is queued, while it
prefills and while it decodes. After each: the request's KV is freed (manager and
provider figures back to zero used), the other requests of the batch complete in full, and
after ``stop()`` no asyncio task or thread started by the engine is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, cast

import pytest

from sagellm_backend.engine.mock import MockEngine, MockEngineConfig
from sagellm_backend.providers.mock import MockBackendProvider

from .conftest import Baseline, make_request, wait_until, words

PHASES = ("queued", "prefill", "decode")
MODES = ("execute", "stream")


def _seq_of(kv: Any, request_id: str) -> str | None:
    for sid in kv.seq_ids():
        if sid.startswith(f"{request_id}#"):
            return str(sid)
    return None


async def _consume(engine: Any, request: Any, mode: str, seen: list[int]) -> Any:
    """Run ``request``; stream deltas are counted into ``seen[0]``."""
    if mode == "execute":
        return await engine.execute(request)
    end = None
    async for ev in engine.stream(request):
        if ev.event == "delta":
            seen[0] += len(ev.chunk_tokens)
        elif ev.event == "end":
            end = ev
    return end


# ---------------------------------------------------------------------------- MockEngine


def _mock(provider: MockBackendProvider, **options: Any) -> MockEngine:
    options.setdefault("simulate_latency_ms", 2.0)
    options.setdefault("simulate_ttft_ms", 2.0)
    return MockEngine(MockEngineConfig("rel-cancel", provider=provider, **options))


def _mock_kv_empty(engine: MockEngine, provider: MockBackendProvider) -> bool:
    kv = engine.kv_manager
    assert kv is not None
    return (
        kv.stats().num_seqs == 0
        and kv.pool.num_used == 0
        and (provider.memory_stats()["kv_used_bytes"] == 0)
    )


async def _read_then_stop(engine: Any, request: Any, k: int, how: str) -> int:
    """Stream ``request``, stop reading after ``k`` tokens; return the tokens read.

    ``how="aclose"`` closes the generator explicitly; otherwise it is abandoned and the
    event loop's async-generator finaliser closes it once it is garbage.
    """
    got = 0
    gen = cast(AsyncGenerator[Any, None], engine.stream(request))
    if how == "aclose":
        async with contextlib.aclosing(gen) as events:
            async for ev in events:
                if ev.event == "delta":
                    got += len(ev.chunk_tokens)
                    if got >= k:
                        break
        return got
    async for ev in gen:
        if ev.event == "delta":
            got += len(ev.chunk_tokens)
            if got >= k:
                break
    del gen, ev
    gc.collect()
    return got


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("phase", PHASES)
async def test_mock_cancel_task(phase: str, mode: str) -> None:
    base = Baseline()
    provider = MockBackendProvider()
    options: dict[str, Any] = {}
    if phase == "queued":
        options["max_batch_size"] = 1
    if phase == "prefill":
        options["simulate_ttft_ms"] = 150.0
    engine = _mock(provider, **options)
    await engine.start()
    kv = engine.kv_manager
    assert kv is not None

    # a companion request that must complete in full whatever happens to the victim
    companion = asyncio.create_task(engine.execute(make_request(words(5, 1), 30)))
    await wait_until(lambda: engine.get_info()["running"] == 1)
    victim_req = make_request(words(12, 2), 40)
    seen = [0]
    victim = asyncio.create_task(_consume(engine, victim_req, mode, seen))
    prompt_len = len(engine.tokenizer.encode(victim_req.prompt))
    if phase == "queued":
        await wait_until(lambda: engine.get_info()["waiting"] == 1)
        assert engine.get_info()["running"] == 1
        assert _seq_of(kv, victim_req.request_id) is None  # never got KV
    elif phase == "prefill":
        await wait_until(lambda: _seq_of(kv, victim_req.request_id) is not None)
        sid = _seq_of(kv, victim_req.request_id)
        assert sid is not None and kv.num_tokens(sid) == prompt_len  # nothing generated yet
    else:
        await wait_until(
            lambda: (
                (sid := _seq_of(kv, victim_req.request_id)) is not None
                and kv.num_tokens(sid) >= prompt_len + 3
            )
        )
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    await wait_until(lambda: _seq_of(kv, victim_req.request_id) is None, timeout=2.0)

    resp = await companion
    assert resp.finish_reason == "length" and len(resp.output_tokens) == 30
    await wait_until(lambda: _mock_kv_empty(engine, provider))
    kv.pool.check_invariants()
    info = engine.get_info()
    assert info["cancelled"] == 1 and info["completed"] == 1 and info["failed"] == 0
    # the engine keeps serving
    again = await engine.execute(make_request(words(3), 4))
    assert again.finish_reason == "length"
    await engine.stop()
    assert provider.memory_stats()["num_kv_managers"] == 0
    await base.assert_clean()


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("how", ["aclose", "abandon"])
async def test_mock_stream_consumer_stops_after_k_tokens(k: int, how: str) -> None:
    base = Baseline()
    provider = MockBackendProvider()
    engine = _mock(provider)
    await engine.start()
    companions = [
        asyncio.create_task(engine.execute(make_request(words(4, i), 25))) for i in range(3)
    ]
    request = make_request(words(8), 50)
    got = await _read_then_stop(engine, request, k, how)
    assert got >= k
    kv = engine.kv_manager
    assert kv is not None
    await wait_until(lambda: _seq_of(kv, request.request_id) is None, timeout=2.0)
    results = await asyncio.gather(*companions)
    assert all(r.finish_reason == "length" and len(r.output_tokens) == 25 for r in results)
    await wait_until(lambda: _mock_kv_empty(engine, provider))
    assert engine.get_info()["cancelled"] == 1
    await engine.stop()
    await base.assert_clean()


async def test_mock_stalled_reader_does_not_block_the_batch() -> None:
    """A consumer that stops reading without closing: the others are not held up."""
    base = Baseline()
    provider = MockBackendProvider()
    engine = _mock(provider)
    await engine.start()
    stalled = engine.stream(make_request(words(6), 20))
    first = await stalled.__anext__()  # start event, then nothing is read
    assert first.event == "start"
    results = await asyncio.gather(
        *(engine.execute(make_request(words(4, i), 15)) for i in range(4))
    )
    assert all(len(r.output_tokens) == 15 for r in results)
    # the stalled request ran to its end too and gave its KV back
    await wait_until(lambda: _mock_kv_empty(engine, provider))
    rest = [ev async for ev in stalled]
    assert rest[-1].event == "end" and rest[-1].finish_reason == "length"
    assert sum(len(ev.chunk_tokens) for ev in rest if ev.event == "delta") == 20
    await engine.stop()
    await base.assert_clean()


async def test_mock_many_cancellations_in_one_batch() -> None:
    """Half of 64 concurrent requests cancelled at random points; KV exactly accounted."""
    import random

    base = Baseline()
    rng = random.Random(5)
    provider = MockBackendProvider()
    engine = _mock(provider, max_batch_size=16, kv_num_pages=64, simulate_latency_ms=1.0)
    await engine.start()
    reqs = [make_request(words(rng.randint(1, 40), i), rng.randint(1, 30)) for i in range(64)]
    tasks = [asyncio.create_task(engine.execute(r)) for r in reqs]
    doomed = rng.sample(range(64), 32)
    for i in doomed:
        await asyncio.sleep(rng.random() * 0.01)
        tasks[i].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, (req, res) in enumerate(zip(reqs, results, strict=True)):
        if isinstance(res, BaseException):
            assert isinstance(res, asyncio.CancelledError) and i in doomed
        else:
            assert res.finish_reason == "length" and len(res.output_tokens) == req.max_tokens
    info = engine.get_info()
    assert info["completed"] + info["cancelled"] == 64 and info["failed"] == 0
    await wait_until(lambda: _mock_kv_empty(engine, provider))
    assert engine.kv_manager is not None
    engine.kv_manager.pool.check_invariants()
    await engine.stop()
    await base.assert_clean()


# ---------------------------------------------------------------------------- CPUEngine


def _slow_runner(engine: Any, seconds: float) -> None:
    """Make every model step take at least ``seconds`` (so phases last long enough)."""
    runner = engine._runner
    real = runner.execute

    def slow(chunks: Any) -> Any:
        time.sleep(seconds)
        return real(chunks)

    runner.execute = slow


def _hf_kv_empty(engine: Any) -> bool:
    kv = engine.kv_manager
    return bool(kv.stats().num_seqs == 0 and kv.pool.num_used == 0)


def _run_clean(body: Callable[[], Any]) -> None:
    """Run ``body()`` on a fresh loop; afterwards no thread started meanwhile is alive."""
    threads = Baseline()
    asyncio.run(body())
    assert threads.threads_left_after() == []


@pytest.mark.hf
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("phase", PHASES)
def test_hf_cancel_task(cpu_engine_factory: Any, phase: str, mode: str) -> None:
    fields: dict[str, Any] = {"max_batch_size": 1 if phase == "queued" else 4}
    if phase == "prefill":
        fields["max_num_batched_tokens"] = 16  # a long prompt prefills over many steps
    engine = cpu_engine_factory(**fields)

    async def body() -> None:
        await engine.start()
        _slow_runner(engine, 0.005)
        kv = engine.kv_manager
        tasks = Baseline()
        companion = asyncio.create_task(
            engine.execute(make_request(words(5, 1), 30, ignore_eos=True))
        )
        await wait_until(lambda: kv.stats().num_seqs == 1)
        victim_req = make_request(words(200 if phase == "prefill" else 10, 2), 50, ignore_eos=True)
        seen = [0]
        victim = asyncio.create_task(_consume(engine, victim_req, mode, seen))
        prompt_len = len(engine.tokenizer(victim_req.prompt)["input_ids"])
        if phase == "queued":
            await wait_until(lambda: engine.get_info()["scheduler"]["waiting"] == 1)
            assert _seq_of(kv, victim_req.request_id) is None
        elif phase == "prefill":
            await wait_until(lambda: _seq_of(kv, victim_req.request_id) is not None)
            sid = _seq_of(kv, victim_req.request_id)
            assert sid is not None
            assert kv.num_computed_tokens(sid) < prompt_len - 1  # still prefilling
        else:
            await wait_until(
                lambda: (
                    (sid := _seq_of(kv, victim_req.request_id)) is not None
                    and kv.num_tokens(sid) >= prompt_len + 3
                )
            )
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        await wait_until(lambda: _seq_of(kv, victim_req.request_id) is None, timeout=2.0)
        resp = await companion
        assert resp.finish_reason == "length" and len(resp.output_tokens) == 30
        await wait_until(lambda: _hf_kv_empty(engine))
        kv.pool.check_invariants()
        again = await engine.execute(make_request(words(3), 4, ignore_eos=True))
        assert again.finish_reason == "length" and len(again.output_tokens) == 4
        assert engine._handles == {}
        await engine.stop()
        await tasks.assert_clean(ignore_prefixes=("asyncio_",))

    _run_clean(body)


@pytest.mark.hf
@pytest.mark.parametrize("how", ["aclose", "abandon"])
def test_hf_stream_consumer_stops_after_k_tokens(cpu_engine_factory: Any, how: str) -> None:
    engine = cpu_engine_factory()

    async def body() -> None:
        await engine.start()
        _slow_runner(engine, 0.003)
        kv = engine.kv_manager
        tasks = Baseline()
        companions = [
            asyncio.create_task(engine.execute(make_request(words(4, i), 20, ignore_eos=True)))
            for i in range(3)
        ]
        for k in (1, 4):
            request = make_request(words(8, k), 50, ignore_eos=True)
            got = await _read_then_stop(engine, request, k, how)
            assert got >= k
            rid: str = request.request_id

            def gone(rid: str = rid) -> bool:
                return _seq_of(kv, rid) is None

            await wait_until(gone, timeout=2.0)
        results = await asyncio.gather(*companions)
        assert all(r.finish_reason == "length" and len(r.output_tokens) == 20 for r in results)
        await wait_until(lambda: _hf_kv_empty(engine))
        await engine.stop()
        await tasks.assert_clean(ignore_prefixes=("asyncio_",))

    _run_clean(body)
