"""Fault injection: every injected fault gives the documented error and serving goes on.

Provider faults (MockBackendProvider): KV exhaustion after N pages, kernels that raise,
kernel/collective latency, failure at construction. Engine faults (MockEngine): error rate
per request, failure at start, slow steps, KV exhaustion through the provider, a step that
raises. HF engine faults (CPUEngine on the tiny Llama): a model step that raises, a KV pool
too small for a request, a provider of the wrong kind.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sagellm_protocol import ErrorCode

from sagellm_backend.capability import DType
from sagellm_backend.engine.mock import MockEngine, MockEngineConfig
from sagellm_backend.errors import (
    BackendNotAvailableError,
    ConfigError,
    KVCacheExhaustedError,
)
from sagellm_backend.kv.spec import KVSpec
from sagellm_backend.providers.mock import (
    InjectedFaultError,
    MockBackendProvider,
    create_mock_backend,
)
from sagellm_backend.registry import BackendRegistry

from .conftest import Baseline, make_request, words

SMALL_SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16)

# ---------------------------------------------------------------------------- provider


def _kv_used(provider: MockBackendProvider) -> int:
    return provider.memory_stats()["kv_used_bytes"]


def test_kv_exhaustion_after_n_pages_block_api() -> None:
    provider = MockBackendProvider(fail_kv_after_pages=5, kv_spec=SMALL_SPEC)
    per_page = SMALL_SPEC.tokens_per_page(DType.FP16)
    blocks = [provider.kv_block_alloc(per_page, DType.FP16) for _ in range(5)]
    before = provider.memory_stats()
    with pytest.raises(KVCacheExhaustedError, match="fail_kv_after_pages=5") as info:
        provider.kv_block_alloc(1, DType.FP16)
    assert info.value.code == ErrorCode.RESOURCE_EXHAUSTED
    assert isinstance(info.value, MemoryError)  # the 0.1.1.x builtin type is kept
    # the failed allocation changed nothing
    assert provider.memory_stats() == before
    assert len(provider.kv.live_blocks()) == 5
    # freeing does not lift an injected fault (the count runs from construction) ...
    provider.kv_block_free(blocks.pop())
    with pytest.raises(KVCacheExhaustedError):
        provider.kv_block_alloc(1, DType.FP16)
    # ... clearing it does, and the provider keeps working
    provider.clear_faults()
    more = provider.kv_block_alloc(3 * per_page, DType.FP16)
    assert len(more.pages) == 3
    for block in [*blocks, more]:
        provider.kv_block_free(block)
    assert _kv_used(provider) == 0
    assert provider.kv.live_blocks() == []


def test_kv_exhaustion_after_n_pages_through_a_manager() -> None:
    provider = MockBackendProvider(kv_spec=SMALL_SPEC)
    manager = provider.create_kv_manager(SMALL_SPEC, num_pages=64)
    provider.set_kv_fault(provider.kv_pages_handed_out + 4)
    manager.allocate("a", list(range(40)))  # 3 pages
    before = manager.stats()
    with pytest.raises(KVCacheExhaustedError, match="injected fault"):
        manager.allocate("b", list(range(100, 140)))  # 3 more pages: over 4
    with pytest.raises(KVCacheExhaustedError, match="injected fault"):
        manager.append("a", list(range(40, 80)))  # needs 2 more pages
    assert manager.stats() == before  # all or nothing
    assert manager.num_tokens("a") == 40
    manager.append("a", list(range(40, 48)))  # fits in the third page: no allocation
    manager.pool.check_invariants()
    provider.set_kv_fault(None)
    manager.allocate("b", list(range(100, 140)))
    manager.free("a")
    manager.free("b")
    assert manager.pool.num_used == 0
    manager.pool.check_invariants()
    provider.release_kv_manager(manager)
    assert provider.memory_stats()["num_kv_managers"] == 0


def test_set_kv_fault_rejects_bad_values() -> None:
    provider = MockBackendProvider()
    for bad in (0, -1, "3", 1.5, True):
        with pytest.raises(ConfigError, match="fail_after_pages"):
            provider.set_kv_fault(bad)  # type: ignore[arg-type]


def test_failing_kernel_raises_and_the_others_keep_working() -> None:
    provider = MockBackendProvider(failing_kernels=["matmul"])
    with pytest.raises(InjectedFaultError, match="matmul") as info:
        provider.get_kernel("matmul")([[1.0]], [[2.0]])
    assert info.value.code == ErrorCode.UNAVAILABLE and info.value.retryable
    attention = provider.get_kernel("attention")
    assert attention([[1.0, 0.0]], [[1.0, 0.0]], [[3.0, 4.0]]) == [[3.0, 4.0]]
    provider.clear_faults()
    assert provider.get_kernel("matmul")([[1.0, 2.0]], [[3.0], [4.0]]) == [[11.0]]


def test_failing_kernel_with_a_custom_exception_and_at_run_time() -> None:
    provider = MockBackendProvider(failing_kernels={"attention": ZeroDivisionError("bad attn")})
    with pytest.raises(ZeroDivisionError, match="bad attn"):
        provider.get_kernel("attention")([[1.0]], [[1.0]], [[1.0]])
    provider.inject_kernel_failure("matmul", TimeoutError)
    with pytest.raises(TimeoutError):
        provider.get_kernel("matmul")([[1.0]], [[1.0]])
    provider.clear_faults()
    assert provider.get_kernel("matmul")([[2.0]], [[3.0]]) == [[6.0]]


def test_kernel_and_collective_latency_are_real() -> None:
    provider = MockBackendProvider(
        kernel_latency_ms={"matmul": 30.0}, collective_latency_ms=20.0, world_size=2
    )
    t0 = time.perf_counter()
    assert provider.get_kernel("matmul")([[1.0]], [[1.0]]) == [[1.0]]
    assert time.perf_counter() - t0 >= 0.029
    # no latency configured for attention: the registered kernel itself, unwrapped
    assert provider.get_kernel("attention") is provider.kernels.get("attention")
    data = [1.0, 2.0]
    t0 = time.perf_counter()
    provider.all_reduce(data)
    assert time.perf_counter() - t0 >= 0.019
    assert data == [2.0, 4.0]


def test_failure_at_construction_and_through_the_registry() -> None:
    with pytest.raises(BackendNotAvailableError, match="injected fault"):
        MockBackendProvider(fail_on_init=True)
    with pytest.raises(BackendNotAvailableError, match="device lost"):
        create_mock_backend({"fail_on_init": "device lost"})
    registry = BackendRegistry()
    with pytest.raises(BackendNotAvailableError, match="injected fault"):
        registry.create("mock", fail_on_init=True)
    # the next creation works: nothing is cached from the failure
    provider = registry.create("mock")
    assert isinstance(provider, MockBackendProvider)
    block = provider.kv_block_alloc(16, DType.FP16)
    provider.kv_block_free(block)


# ---------------------------------------------------------------------------- mock engine


async def _good_request_works(engine: Any, max_tokens: int = 5) -> None:
    resp = await engine.execute(make_request(words(6, salt=99), max_tokens))
    assert resp.finish_reason == "length", resp.error
    assert len(resp.output_tokens) == max_tokens


def _mock(**options: Any) -> MockEngine:
    options.setdefault("simulate_latency_ms", 0.0)
    options.setdefault("simulate_ttft_ms", 0.0)
    return MockEngine(MockEngineConfig(options.pop("engine_id", "rel-mock"), **options))


async def test_error_rate_per_request() -> None:
    base = Baseline()
    engine = _mock(simulate_failure_rate=0.5, seed=3)
    await engine.start()
    results = await asyncio.gather(
        *(engine.execute(make_request(words(5 + i % 20, i), 1 + i % 9)) for i in range(200))
    )
    failed = [r for r in results if r.finish_reason == "error"]
    ok = [r for r in results if r.finish_reason != "error"]
    assert 60 <= len(failed) <= 140
    for r in failed:
        assert r.error is not None and r.error.code == ErrorCode.UNAVAILABLE
        assert r.error.retryable and "simulate_failure_rate" in r.error.message
        assert r.output_tokens == []
    for r in ok:
        assert r.error is None and r.finish_reason == "length"
    assert ok and all(len(r.output_tokens) >= 1 for r in ok)
    # error_rate is over every request the engine finished
    last = await engine.execute(make_request("one more", 2))
    n_failed = len(failed) + (last.finish_reason == "error")
    assert last.metrics.error_rate == pytest.approx(n_failed / 201)
    assert engine.kv_manager is not None and engine.kv_manager.stats().num_seqs == 0
    assert await engine.health_check()
    await engine.stop()
    await base.assert_clean()


async def test_fail_at_start_leaves_nothing_behind_and_the_provider_serves_others() -> None:
    provider = MockBackendProvider()
    before = provider.memory_stats()
    broken = MockEngine(MockEngineConfig("broken", fail_at_start=True, provider=provider))
    for _ in range(2):  # a retry fails the same way
        with pytest.raises(BackendNotAvailableError, match="fail_at_start"):
            await broken.start()
    assert not broken.is_running and broken.kv_manager is None
    with pytest.raises(RuntimeError, match="not running"):
        await broken.execute(make_request())
    assert provider.memory_stats()["num_kv_managers"] == before["num_kv_managers"] == 0
    good = _mock(engine_id="good", provider=provider)
    await good.start()
    await _good_request_works(good)
    await good.stop()
    assert provider.memory_stats()["kv_pool_bytes"] == before["kv_pool_bytes"]


async def test_slow_steps_delay_but_do_not_break_requests() -> None:
    engine = _mock(slow_step_every=2, slow_step_ms=25.0)
    await engine.start()
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(engine.execute(make_request(words(4, i), 6)) for i in range(4))
    )
    elapsed = time.perf_counter() - t0
    assert all(r.finish_reason == "length" and len(r.output_tokens) == 6 for r in results)
    assert elapsed >= 0.05  # 6 steps, every 2nd one 25 ms slower
    itl = results[0].metrics.itl_list
    assert sum(1 for x in itl if x >= 20.0) >= 2
    await _good_request_works(engine)
    await engine.stop()


async def test_kv_exhaustion_injected_in_the_provider_fails_requests_cleanly() -> None:
    provider = MockBackendProvider()
    engine = _mock(provider=provider, kv_num_pages=64, enable_prefix_caching=False)
    await engine.start()
    provider.set_kv_fault(provider.kv_pages_handed_out + 6)
    # 20 prompt tokens + 5 output tokens: 2 pages each, taken at admission; 3 fit in 6 pages
    prompt = " ".join(["ab"] * 20)
    assert len(engine.tokenizer.encode(prompt)) == 20
    results = await asyncio.gather(*(engine.execute(make_request(prompt, 5)) for i in range(8)))
    assert [r.finish_reason for r in results] == ["length"] * 3 + ["error"] * 5
    for r in results[3:]:
        assert r.error is not None and r.error.code == ErrorCode.RESOURCE_EXHAUSTED
        assert "injected fault" in r.error.message
    # a request already running when the fault hits (its pages grow) ends with an error too
    provider.set_kv_fault(provider.kv_pages_handed_out + 2)
    grown = await engine.execute(make_request(prompt, 30))  # needs a 3rd page at token 13
    assert grown.finish_reason == "error" and len(grown.output_tokens) == 13
    assert grown.error is not None and grown.error.code == ErrorCode.RESOURCE_EXHAUSTED
    kv = engine.kv_manager
    assert kv is not None and kv.stats().num_seqs == 0 and kv.pool.num_used == 0
    kv.pool.check_invariants()
    provider.clear_faults()
    await _good_request_works(engine)
    await engine.stop()
    assert provider.memory_stats()["kv_used_bytes"] == 0


async def test_a_step_that_raises_fails_the_batch_and_the_loop_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = _mock(simulate_latency_ms=1.0)
    await engine.start()
    runner = engine._runner
    real_execute = runner.execute
    calls = {"n": 0}

    def flaky_execute(chunks: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kernel crash")
        return real_execute(chunks)

    monkeypatch.setattr(runner, "execute", flaky_execute)
    results = await asyncio.gather(
        *(engine.execute(make_request(words(3, i), 8)) for i in range(3))
    )
    for r in results:
        assert r.finish_reason == "error"
        assert r.error is not None and r.error.code == ErrorCode.UNAVAILABLE
        assert "simulated kernel crash" in r.error.message
        assert len(r.output_tokens) == 2  # two good steps before the crash
    assert engine.kv_manager is not None and engine.kv_manager.stats().num_seqs == 0
    await _good_request_works(engine)
    assert await engine.health_check()
    await engine.stop()


async def test_request_larger_than_the_pool_is_refused_and_others_run() -> None:
    engine = _mock(kv_num_pages=4)  # 64 tokens
    await engine.start()
    big, small = await asyncio.gather(
        engine.execute(make_request(words(60), 30)), engine.execute(make_request(words(5), 5))
    )
    assert big.finish_reason == "error"
    assert big.error is not None and big.error.code == ErrorCode.RESOURCE_EXHAUSTED
    assert "KV pages" in big.error.message
    assert small.finish_reason == "length"
    await _good_request_works(engine)
    await engine.stop()


# ---------------------------------------------------------------------------- HF engine


@pytest.mark.hf
def test_hf_model_step_that_raises_fails_in_flight_requests_then_serves(
    cpu_engine_factory: Any,
) -> None:
    engine = cpu_engine_factory(max_batch_size=4)

    async def body() -> None:
        await engine.start()
        runner = engine._runner
        real = runner.execute
        calls = {"n": 0}

        def flaky(chunks: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 4:
                raise RuntimeError("simulated CUDA error: device-side assert")
            return real(chunks)

        runner.execute = flaky
        try:
            reqs = [make_request(words(6, i), 20, ignore_eos=True) for i in range(3)]
            results = await asyncio.gather(*(engine.execute(r) for r in reqs))
        finally:
            runner.execute = real
        for r in results:
            assert r.finish_reason == "error"
            assert r.error is not None and "device-side assert" in r.error.message
        kv = engine.kv_manager
        assert kv.stats().num_seqs == 0 and kv.pool.num_used == 0
        kv.pool.check_invariants()
        assert engine.get_info()["scheduler"]["failed_steps"] == 1
        ok = await engine.execute(make_request(words(6), 7, ignore_eos=True))
        assert ok.finish_reason == "length" and len(ok.output_tokens) == 7
        assert await engine.health_check()
        await engine.stop()

    asyncio.run(body())


@pytest.mark.hf
def test_hf_kv_pool_too_small_for_a_request_and_contention(cpu_engine_factory: Any) -> None:
    # 8 pages of 16 tokens: 128 tokens of KV in all
    engine = cpu_engine_factory(kv_cache_memory_bytes=8 * 8192, enable_prefix_caching=False)

    async def body() -> None:
        await engine.start()
        assert engine.kv_manager.pool.num_pages == 8
        too_big = await engine.execute(make_request(words(40), 120, ignore_eos=True))
        assert too_big.finish_reason == "error"
        assert too_big.error is not None
        assert too_big.error.code == ErrorCode.RESOURCE_EXHAUSTED
        # each fits alone (48 tokens), together they do not: preemption, all complete
        reqs = [make_request(words(8, i), 40, ignore_eos=True) for i in range(4)]
        results = await asyncio.gather(*(engine.execute(r) for r in reqs))
        assert [r.finish_reason for r in results] == ["length"] * 4
        assert all(len(r.output_tokens) == 40 for r in results)
        assert engine.get_info()["scheduler"]["preemptions"] >= 1
        kv = engine.kv_manager
        assert kv.stats().num_seqs == 0 and kv.pool.num_used == 0
        kv.pool.check_invariants()
        await engine.stop()

    asyncio.run(body())


@pytest.mark.hf
def test_hf_engine_on_a_provider_of_the_wrong_kind(tiny_llama: str) -> None:
    from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig

    engine = CPUEngine(
        CPUEngineConfig(
            engine_id="wrong-provider",
            model_path=tiny_llama,
            provider=MockBackendProvider(device_type="npu"),  # a mock one is taken (0.1.1.2)
        )
    )
    with pytest.raises(ConfigError, match="provider"):
        asyncio.run(engine.start())
    assert not engine.is_running


@pytest.mark.hf
@pytest.mark.parametrize(
    "broken",
    [
        "missing",
        "empty",
        "config.json",
        "tokenizer.json",
        "model.safetensors",
    ],
)
def test_hf_start_with_a_broken_model_fails_cleanly(
    tiny_llama: str, tmp_path: Any, broken: str
) -> None:
    import shutil

    from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig
    from sagellm_backend.errors import BackendError

    path = tmp_path / "model"
    if broken == "empty":
        path.mkdir()
    elif broken != "missing":
        shutil.copytree(tiny_llama, path)
        with open(path / broken, "r+b") as fh:
            fh.truncate(100)  # a download cut short
    threads = Baseline()
    engine = CPUEngine(CPUEngineConfig(engine_id="broken-model", model_path=str(path)))
    for _ in range(2):  # a retry fails the same way: no half-initialised state
        with pytest.raises(BackendError) as info:
            asyncio.run(engine.start())
        assert str(path) in str(info.value), str(info.value)
        assert not engine.is_running
    assert threads.threads_left_after() == []
