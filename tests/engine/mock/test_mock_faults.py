"""MockEngine fault injection, cancellation and stop-in-flight."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from typing import Any

import pytest
from sagellm_protocol import ErrorCode

from sagellm_backend.engine.mock import MockEngine, MockEngineConfig
from sagellm_backend.errors import BackendNotAvailableError

from ..conftest import make_request


def _kv_seqs(engine: MockEngine) -> int:
    assert engine.kv_manager is not None
    return engine.kv_manager.stats().num_seqs


async def _until(cond: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


# ---------------------------------------------------------------------------- faults


async def test_failure_rate_one_fails_every_request(engine_factory: Any) -> None:
    eng = await engine_factory(simulate_failure_rate=1.0)
    resp = await eng.execute(make_request(max_tokens=4))
    assert resp.finish_reason == "error"
    assert resp.error is not None and resp.error.code == ErrorCode.UNAVAILABLE
    assert resp.error.retryable is True
    assert "injected failure" in resp.error.message
    assert resp.metrics.error_rate == 1.0
    assert _kv_seqs(eng) == 0
    events = [ev async for ev in eng.stream(make_request(max_tokens=4))]
    assert [ev.event for ev in events] == ["start", "end"]
    assert events[-1].finish_reason == "error"


async def test_failure_rate_is_seeded_and_roughly_right(engine_factory: Any) -> None:
    async def run(seed: int) -> list[str]:
        eng = await engine_factory(simulate_failure_rate=0.3, seed=seed)
        out = []
        for i in range(200):
            out.append((await eng.execute(make_request(f"p{i}", 2))).finish_reason)
        return out

    a, b, c = await run(7), await run(7), await run(8)
    assert a == b
    assert a != c
    failed = a.count("error")
    assert 30 <= failed <= 90  # 200 * 0.3 = 60 expected
    assert set(a) == {"error", "length"}


async def test_fail_at_start(req: Any) -> None:
    eng = MockEngine(MockEngineConfig("broken", fail_at_start=True))
    with pytest.raises(BackendNotAvailableError, match="fail_at_start"):
        await eng.start()
    assert not eng.is_running


async def test_slow_steps_show_in_itl(engine_factory: Any) -> None:
    eng = await engine_factory(slow_step_every=3, slow_step_ms=40.0)
    resp = await eng.execute(make_request(max_tokens=7))
    slow = [x for x in resp.metrics.itl_list if x >= 35.0]
    assert 1 <= len(slow) <= 3
    assert len(resp.metrics.itl_list) == 6


async def test_jitter_stays_in_range(engine_factory: Any) -> None:
    eng = await engine_factory(simulate_latency_ms=2.0, jitter_ms=10.0, seed=1)
    resp = await eng.execute(make_request(max_tokens=20))
    itl = resp.metrics.itl_list
    assert all(x >= 1.9 for x in itl)
    assert max(itl) - min(itl) > 1.0  # jitter really varies the steps


async def test_kv_exhaustion_from_a_tiny_pool_is_survived(engine_factory: Any) -> None:
    eng = await engine_factory(kv_num_pages=3, max_batch_size=32, simulate_latency_ms=0.5)
    resps = await asyncio.gather(
        *(eng.execute(make_request(f"q{i} a b c d", 20)) for i in range(10))
    )
    assert all(r.finish_reason == "length" for r in resps)
    assert _kv_seqs(eng) == 0
    assert eng.kv_manager is not None and eng.kv_manager.pool.num_used == 0


async def test_kv_fault_injected_in_the_provider(engine_factory: Any) -> None:
    """fail_kv_after_pages on the provider: requests fail with RESOURCE_EXHAUSTED, none hang."""
    from sagellm_backend.providers.mock import MockBackendProvider

    provider = MockBackendProvider(fail_kv_after_pages=6)
    eng = await engine_factory(provider=provider, simulate_latency_ms=0.5, max_batch_size=8)
    resps = await asyncio.gather(
        *(eng.execute(make_request(" ".join(f"w{i}x{j}" for j in range(20)), 40)) for i in range(8))
    )
    reasons = [r.finish_reason for r in resps]
    assert "error" in reasons
    for r in resps:
        if r.finish_reason == "error":
            assert r.error is not None and r.error.code == ErrorCode.RESOURCE_EXHAUSTED
            assert "injected fault" in r.error.message
        else:
            assert len(r.output_tokens) == 40
    assert _kv_seqs(eng) == 0
    provider.clear_faults()
    ok = await eng.execute(make_request("after the fault", 3))
    assert ok.finish_reason == "length"


# ---------------------------------------------------------------------------- cancellation


async def test_cancelled_execute_frees_kv_within_a_step(engine_factory: Any) -> None:
    eng = await engine_factory(simulate_latency_ms=5.0, max_batch_size=4)
    task = asyncio.create_task(eng.execute(make_request(max_tokens=10_000)))
    other = asyncio.create_task(eng.execute(make_request(max_tokens=20)))
    await _until(lambda: _kv_seqs(eng) == 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _until(lambda: _kv_seqs(eng) == 1, timeout=0.05)  # one step is 5 ms
    resp = await other
    assert resp.finish_reason == "length" and len(resp.output_tokens) == 20
    assert eng.get_info()["cancelled"] == 1
    await _until(lambda: _kv_seqs(eng) == 0)


async def test_cancel_while_queued(engine_factory: Any) -> None:
    eng = await engine_factory(simulate_latency_ms=2.0, max_batch_size=1)
    first = asyncio.create_task(eng.execute(make_request(max_tokens=10)))
    queued = asyncio.create_task(eng.execute(make_request(max_tokens=10)))
    await asyncio.sleep(0.005)
    assert eng.get_info()["waiting"] == 1
    queued.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await queued
    assert (await first).finish_reason == "length"
    await _until(lambda: eng.get_info()["waiting"] == 0)
    assert eng.get_info()["cancelled"] == 1
    assert _kv_seqs(eng) == 0


async def test_consumer_that_stops_reading_frees_kv(engine_factory: Any) -> None:
    eng = await engine_factory(simulate_latency_ms=2.0)
    got = 0
    async for ev in eng.stream(make_request(max_tokens=10_000)):
        if ev.event == "delta":
            got += len(ev.chunk_tokens)
            if got >= 3:
                break
    gc.collect()
    await _until(lambda: _kv_seqs(eng) == 0, timeout=0.5)
    resp = await eng.execute(make_request(max_tokens=3))
    assert resp.finish_reason == "length"


async def test_closed_stream_frees_kv(engine_factory: Any) -> None:
    eng = await engine_factory(simulate_latency_ms=2.0)
    gen = eng.stream(make_request(max_tokens=10_000))
    assert (await gen.__anext__()).event == "start"
    assert (await gen.__anext__()).event == "delta"
    await gen.aclose()  # type: ignore[attr-defined]
    await _until(lambda: _kv_seqs(eng) == 0, timeout=0.1)


async def test_cancelled_stream_task_frees_kv(engine_factory: Any) -> None:
    eng = await engine_factory(simulate_latency_ms=2.0)

    async def consume() -> None:
        async for _ in eng.stream(make_request(max_tokens=10_000)):
            pass

    task = asyncio.create_task(consume())
    await _until(lambda: _kv_seqs(eng) == 1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await _until(lambda: _kv_seqs(eng) == 0, timeout=0.1)


# ---------------------------------------------------------------------------- stop in flight


async def test_stop_ends_every_request_in_flight(engine_factory: Any) -> None:
    eng = await engine_factory(simulate_latency_ms=5.0, max_batch_size=4)
    executes = [asyncio.create_task(eng.execute(make_request(max_tokens=1_000))) for _ in range(6)]

    async def consume() -> list[str]:
        return [ev.event async for ev in eng.stream(make_request(max_tokens=1_000))]

    streams = [asyncio.create_task(consume()) for _ in range(3)]
    await asyncio.sleep(0.03)
    kv = eng.kv_manager
    assert kv is not None and kv.stats().num_seqs == 4  # a full batch; 5 wait
    t0 = time.monotonic()
    await eng.stop()
    _done, pending = await asyncio.wait([*executes, *streams], timeout=2.0)
    assert not pending
    assert time.monotonic() - t0 < 2.0
    for task in executes:
        resp = task.result()
        assert resp.finish_reason == "error"
        assert resp.error is not None and resp.error.code == ErrorCode.UNAVAILABLE
        assert "stopped" in resp.error.message
    for task in streams:
        events = task.result()
        assert events[0] == "start" and events[-1] == "end"
        assert events.count("end") == 1
    assert kv.stats().num_seqs == 0
    assert kv.pool.num_used == 0
    assert eng.kv_manager is None  # released to the provider
    assert eng.provider.memory_stats()["kv_used_bytes"] == 0
    # start() again works.
    await eng.start()
    resp = await eng.execute(make_request(max_tokens=3))
    assert resp.finish_reason == "length"


async def test_stop_leaves_no_task_behind(engine_factory: Any) -> None:
    before = {t for t in asyncio.all_tasks() if not t.done()}
    eng = await engine_factory(simulate_latency_ms=1.0)
    await asyncio.gather(*(eng.execute(make_request(max_tokens=3)) for _ in range(5)))
    await eng.stop()
    await asyncio.sleep(0)
    after = {t for t in asyncio.all_tasks() if not t.done()}
    assert after <= before
    assert not eng.is_running
    assert await eng.health_check() is False


async def test_stop_is_idempotent(engine: MockEngine) -> None:
    await engine.stop()
    await engine.stop()
    assert not engine.is_running


# ---------------------------------------------------------------------------- soak


async def _soak(n: int, seed: int = 11, latency_ms: float = 0.0, min_cancel: float = 0.05) -> None:
    import random

    from sagellm_backend.engine.mock import MockEngine as Engine
    from sagellm_backend.engine.mock import MockEngineConfig as Config

    rng = random.Random(seed)
    before = {t for t in asyncio.all_tasks() if not t.done()}
    engine = Engine(
        Config(
            "soak",
            latency_ms,
            0.0,
            0.05,
            max_batch_size=32,
            kv_num_pages=256,
            seed=seed,
        )
    )
    await engine.start()
    kv = engine.kv_manager
    assert kv is not None
    outcomes: dict[str, list[str]] = {}

    async def run_execute(i: int, max_tokens: int) -> None:
        resp = await engine.execute(make_request(f"soak {i} " * rng.randint(1, 30), max_tokens))
        outcomes.setdefault(resp.request_id, []).append(resp.finish_reason)
        assert resp.finish_reason == "error" or len(resp.output_tokens) == max_tokens

    async def run_stream(i: int, max_tokens: int, stop_after: int | None) -> None:
        request = make_request(f"stream {i} " * rng.randint(1, 30), max_tokens)
        got = 0
        ends = 0
        async for ev in engine.stream(request):
            if ev.event == "delta":
                got += len(ev.chunk_tokens)
                if stop_after is not None and got >= stop_after:
                    break
            elif ev.event == "end":
                ends += 1
                outcomes.setdefault(request.request_id, []).append(ev.finish_reason)
        assert ends <= 1

    tasks = []
    for i in range(n):
        max_tokens = rng.randint(1, 40)
        if i % 2:
            tasks.append(asyncio.create_task(run_execute(i, max_tokens)))
        else:
            stop_after = rng.randint(1, max_tokens) if rng.random() < 0.1 else None
            tasks.append(asyncio.create_task(run_stream(i, max_tokens, stop_after)))
    cancelled = rng.sample(range(n), n // 20)  # plus the streams that stop reading: ~10%

    async def cancel_later(task: asyncio.Task[None]) -> None:
        for _ in range(rng.randint(0, 60)):
            await asyncio.sleep(0)
        task.cancel()

    cancellers = [asyncio.create_task(cancel_later(tasks[i])) for i in cancelled]
    results = await asyncio.gather(*tasks, *cancellers, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, asyncio.CancelledError) for r in errors), errors[:3]
    await asyncio.sleep(0.01)  # one more step for the last cancellations
    assert all(len(v) == 1 for v in outcomes.values())  # exactly one terminal result each
    info = engine.get_info()
    assert info["completed"] + info["failed"] + info["cancelled"] == n, info
    assert 0 < info["failed"] < n * 0.12
    assert info["cancelled"] > n * min_cancel
    assert kv.stats().num_seqs == 0
    assert kv.pool.num_used == 0
    kv.pool.check_invariants()
    await engine.stop()
    await asyncio.sleep(0)
    after = {t for t in asyncio.all_tasks() if not t.done()}
    assert after <= before


@pytest.mark.parametrize(
    ("latency_ms", "min_cancel"),
    # at zero simulated time requests decode in bursts and often finish before a cancel lands
    [(0.0, 0.02), (0.01, 0.05)],
)
async def test_soak_small(latency_ms: float, min_cancel: float) -> None:
    await _soak(2_000, latency_ms=latency_ms, min_cancel=min_cancel)


@pytest.mark.slow
async def test_soak_full() -> None:
    await _soak(10_000, latency_ms=0.01)
