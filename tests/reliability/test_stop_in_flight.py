"""``stop()`` while requests run: each ends with a terminal result within 2 s; restart works.

Requests are in every state when ``stop()`` is called (queued, prefilling, decoding,
streaming to a consumer that is not reading). Each must end with a terminal Response or
end event whose ``finish_reason`` is ``"error"`` (UNAVAILABLE, retryable) or ``"stop"``
within 2 s of the call; the KV pool is empty afterwards, no task or thread started by the
engine is left, and ``start()`` serves again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sagellm_protocol import ErrorCode

from sagellm_backend.engine.mock import MockEngine, MockEngineConfig
from sagellm_backend.providers.mock import MockBackendProvider

from .conftest import Baseline, make_request, wait_until, words

STOP_DEADLINE_S = 2.0


async def _stream_end(engine: Any, request: Any, read_delay: float = 0.0) -> Any:
    """Consume a stream (optionally slowly); return its end event (checks the shape)."""
    events = []
    async for ev in engine.stream(request):
        events.append(ev)
        if read_delay:
            await asyncio.sleep(read_delay)
    assert events[0].event == "start" and events[-1].event == "end"
    assert [ev.event for ev in events].count("end") == 1
    text = "".join(ev.chunk for ev in events if ev.event == "delta")
    assert text == events[-1].output_text
    return events[-1]


def _check_terminal(result: Any) -> None:
    assert result.finish_reason in ("error", "stop"), result
    if result.finish_reason == "error":
        assert result.error is not None
        assert result.error.code == ErrorCode.UNAVAILABLE and result.error.retryable
        assert "stop" in result.error.message


async def _stop_and_collect(engine: Any, tasks: list[asyncio.Task[Any]]) -> float:
    """Call stop(); return seconds until every task has its terminal result."""
    t0 = time.monotonic()
    await engine.stop()
    done, pending = await asyncio.wait(tasks, timeout=STOP_DEADLINE_S)
    elapsed = time.monotonic() - t0
    assert not pending, f"{len(pending)} requests without a terminal result after stop()"
    for task in done:
        _check_terminal(task.result())
    return elapsed


# ---------------------------------------------------------------------------- MockEngine


async def test_mock_stop_ends_requests_in_every_state() -> None:
    base = Baseline()
    provider = MockBackendProvider()
    engine = MockEngine(
        MockEngineConfig(
            "rel-stop",
            simulate_latency_ms=5.0,
            simulate_ttft_ms=5.0,
            max_batch_size=4,
            kv_num_pages=128,
            provider=provider,
        )
    )
    for _round in range(2):  # stop, start again, stop again
        await engine.start()
        tasks = [
            *(
                asyncio.create_task(engine.execute(make_request(words(8, i), 200)))
                for i in range(6)
            ),
            *(
                asyncio.create_task(_stream_end(engine, make_request(words(5, i), 200)))
                for i in range(4)
            ),
            # a consumer reading slowly: tokens pile up unread when stop() comes
            asyncio.create_task(_stream_end(engine, make_request(words(3), 200), read_delay=0.05)),
        ]
        steps0: int = engine.get_info()["steps"]

        def stepped(s0: int = steps0) -> bool:
            return bool(engine.get_info()["steps"] >= s0 + 5)

        await wait_until(stepped)
        info = engine.get_info()
        assert info["running"] == 4 and info["waiting"] == 7  # queued ones exist
        elapsed = await _stop_and_collect(engine, tasks)
        assert elapsed < STOP_DEADLINE_S
        assert not engine.is_running and engine.kv_manager is None
        stats = provider.memory_stats()
        assert stats["kv_used_bytes"] == 0 and stats["num_kv_managers"] == 0
        with pytest.raises(RuntimeError, match="not running"):
            await engine.execute(make_request())
    await engine.start()
    resp = await engine.execute(make_request(words(4), 6))
    assert resp.finish_reason == "length" and len(resp.output_tokens) == 6
    await engine.stop()
    await base.assert_clean()


async def test_mock_stop_during_a_slow_step_and_concurrent_stops() -> None:
    base = Baseline()
    engine = MockEngine(
        MockEngineConfig("rel-stop-slow", 1.0, 1.0, slow_step_every=3, slow_step_ms=5_000.0)
    )
    await engine.start()
    tasks = [asyncio.create_task(engine.execute(make_request(words(4, i), 50))) for i in range(3)]
    await wait_until(lambda: engine.get_info()["steps"] >= 3)  # inside the 5 s step now
    t0 = time.monotonic()
    await asyncio.gather(engine.stop(), engine.stop())
    done, pending = await asyncio.wait(tasks, timeout=STOP_DEADLINE_S)
    assert not pending and time.monotonic() - t0 < STOP_DEADLINE_S
    for task in done:
        _check_terminal(task.result())
        assert len(task.result().output_tokens) == 2
    await base.assert_clean()
    await engine.start()
    assert (await engine.execute(make_request(max_tokens=2))).finish_reason == "length"
    await engine.stop()


# ---------------------------------------------------------------------------- CPUEngine


def _slow_runner(engine: Any, seconds: float, *, once_at: int | None = None) -> None:
    runner = engine._runner
    real = runner.execute
    calls = {"n": 0}

    def slow(chunks: Any) -> Any:
        calls["n"] += 1
        if once_at is None or calls["n"] == once_at:
            time.sleep(seconds)
        return real(chunks)

    runner.execute = slow


def _run_without_leaks(body: Any) -> None:
    threads = Baseline()
    asyncio.run(body())
    assert threads.threads_left_after() == []


@pytest.mark.hf
def test_hf_restart_after_stop_serves_a_full_batch(cpu_engine_factory: Any) -> None:
    """Regression: restart after stop() with requests decoding serves a full batch."""
    engine = cpu_engine_factory(max_batch_size=4, max_new_tokens=500)

    async def body() -> None:
        await engine.start()
        tasks = [
            asyncio.create_task(engine.execute(make_request(words(6, i), 400, ignore_eos=True)))
            for i in range(3)
        ]
        await wait_until(lambda: engine.get_info()["scheduler"]["tokens_generated"] >= 12)
        await _stop_and_collect(engine, tasks)
        await engine.start()
        results = await asyncio.gather(
            *(engine.execute(make_request(words(4, i), 5, ignore_eos=True)) for i in range(4))
        )
        assert [r.finish_reason for r in results] == ["length"] * 4, results[0].error
        await engine.stop()

    asyncio.run(body())


@pytest.mark.hf
def test_hf_stop_ends_requests_in_every_state(cpu_engine_factory: Any) -> None:
    engine = cpu_engine_factory(max_batch_size=4, max_num_batched_tokens=32, max_new_tokens=500)

    async def body() -> None:
        for _round in range(2):
            await engine.start()
            _slow_runner(engine, 0.005)
            tasks = [
                *(
                    asyncio.create_task(
                        engine.execute(make_request(words(6, i), 400, ignore_eos=True))
                    )
                    for i in range(3)
                ),
                asyncio.create_task(
                    _stream_end(engine, make_request(words(4), 400, ignore_eos=True))
                ),
                # a long prompt: still prefilling (32 tokens per step) when stop() comes
                asyncio.create_task(engine.execute(make_request(words(300), 50, ignore_eos=True))),
                # queued behind the 4 running ones
                *(
                    asyncio.create_task(
                        _stream_end(engine, make_request(words(5, i), 50, ignore_eos=True))
                    )
                    for i in range(3)
                ),
            ]
            await wait_until(lambda: engine.get_info()["scheduler"]["tokens_generated"] >= 12)
            sched = engine.get_info()["scheduler"]
            assert sched["running"] == 4 and sched["waiting"] == 4, sched
            elapsed = await _stop_and_collect(engine, tasks)
            assert elapsed < STOP_DEADLINE_S
            kv = engine.kv_manager
            assert kv.stats().num_seqs == 0 and kv.pool.num_used == 0
            assert kv.pool.num_cached == 0  # stop() clears the prefix cache
            kv.pool.check_invariants()
            assert not await engine.health_check()
            with pytest.raises(RuntimeError, match="not running"):
                await engine.execute(make_request())
            del engine._runner.execute  # back to the real step
        await engine.start()
        ok = await engine.execute(make_request(words(4), 5, ignore_eos=True))
        assert ok.finish_reason == "length" and len(ok.output_tokens) == 5
        await engine.stop()

    _run_without_leaks(body)


@pytest.mark.hf
def test_hf_stop_while_a_step_hangs_returns_in_time(cpu_engine_factory: Any) -> None:
    """A step stuck for 3 s: stop() still ends every request within 2 s; start() recovers."""
    engine = cpu_engine_factory(max_batch_size=4)

    async def body() -> None:
        await engine.start()
        _slow_runner(engine, 3.0, once_at=6)
        tasks = [
            asyncio.create_task(engine.execute(make_request(words(4, i), 100, ignore_eos=True)))
            for i in range(3)
        ]
        await wait_until(lambda: engine.get_info()["scheduler"]["steps"] >= 5)
        await asyncio.sleep(0.1)  # now inside the hanging step
        elapsed = await _stop_and_collect(engine, tasks)
        assert elapsed < STOP_DEADLINE_S
        # start() waits for the hung step to end, then serves; the KV is clean by then
        await engine.start()
        kv = engine.kv_manager
        assert kv.stats().num_seqs == 0 and kv.pool.num_used == 0
        ok = await engine.execute(make_request(words(4), 5, ignore_eos=True))
        assert ok.finish_reason == "length" and len(ok.output_tokens) == 5
        await engine.stop()

    _run_without_leaks(body)


def _face(kind: str) -> Any:
    if kind == "cpu":
        from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig

        return CPUEngine(CPUEngineConfig(engine_id="face-cpu", mock_mode=True, max_new_tokens=500))
    from sagellm_backend.engine.hf_cuda import HFCudaEngine, HFCudaEngineConfig

    return HFCudaEngine(
        HFCudaEngineConfig(
            engine_id="face-cuda",
            model_path="tiny",
            device="cuda:0",
            dtype="float16",
            device_map="auto",
            load_in_8bit=False,
            load_in_4bit=False,
            trust_remote_code=False,
            max_new_tokens=500,
            max_batch_size=2,
            mock_mode=True,
        )
    )


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
async def test_hf_faces_in_mock_mode_stop_in_flight(kind: str) -> None:
    """CPUEngine / HFCudaEngine with mock_mode=True (no torch, no GPU) keep the contract."""
    base = Baseline()
    engine = _face(kind)
    await engine.start()
    tasks = [
        *(asyncio.create_task(engine.execute(make_request(words(4, i), 400))) for i in range(3)),
        asyncio.create_task(_stream_end(engine, make_request(words(2), 400))),
    ]
    # zero simulated time: the inline step loop runs one step per event-loop turn, up to a
    # page of tokens per sequence (bursts), so a few turns leave every request in flight
    for _ in range(50):
        if engine.get_info()["steps"] >= 3:
            break
        await asyncio.sleep(0)
    assert engine.get_info()["running"] >= 1
    elapsed = await _stop_and_collect(engine, tasks)
    assert elapsed < STOP_DEADLINE_S
    provider = engine.provider
    assert provider.memory_stats()["kv_used_bytes"] == 0
    await engine.start()
    resp = await engine.execute(make_request(words(3), 5))
    assert resp.finish_reason == "length" and len(resp.output_tokens) == 5
    await engine.stop()
    await base.assert_clean()
