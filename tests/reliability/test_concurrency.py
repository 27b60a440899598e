"""Concurrency safety: the KV manager and the providers used from several threads at once.

Each stress runs ``THREADS`` threads doing random operations with the interpreter's switch
interval lowered (so threads interleave inside methods as much as CPython allows). At
barriers every few hundred operations the main thread checks the invariants while the
workers wait:

* KV manager: ``pool.check_invariants()``; each page's refcount equals the number of live
  block tables holding it (no page used twice without a reference, none lost); pages
  shared between sequences are cached full blocks; each table has
  ``ceil(tokens / block_size)`` pages; figures agree with the pool.
* providers (mock, cpu): the pages of live blocks are disjoint per device and add up to the
  pool's pages in use; the data written into a block is still there (no page handed to two
  owners); budget accounting of managers created and released concurrently.

At the end everything is freed and the pools are back to empty.
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sagellm_backend.capability import DType
from sagellm_backend.errors import InvalidKVBlockError, KVCacheExhaustedError
from sagellm_backend.kv.block_pool import BlockPool
from sagellm_backend.kv.manager import KVCacheManager
from sagellm_backend.kv.spec import KVSpec
from sagellm_backend.providers.mock import MockBackendProvider

THREADS = 4
ROUNDS = 8
OPS_PER_ROUND = 250

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype=DType.FP32)
SPEC16 = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16)  # mock: fp16/bf16


@pytest.fixture(autouse=True)
def _tight_switching() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _run_rounds(
    worker: Callable[[int, random.Random, threading.Barrier], None],
    check: Callable[[], None],
    *,
    threads: int = THREADS,
    rounds: int = ROUNDS,
) -> None:
    """Run ``worker(tid, rng, barrier)`` in threads; ``check()`` at each round's barrier.

    A worker calls ``barrier.wait()`` twice per round (pause, resume); an exception in a
    worker aborts the barrier and is re-raised here.
    """
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def run(tid: int) -> None:
        try:
            worker(tid, random.Random(1000 + tid), barrier)
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    pool = [threading.Thread(target=run, args=(t,), name=f"stress-{t}") for t in range(threads)]
    for t in pool:
        t.start()
    try:
        for _ in range(rounds):
            barrier.wait(timeout=60)
            check()
            barrier.wait(timeout=60)
    except threading.BrokenBarrierError:
        pass
    except BaseException:
        barrier.abort()
        raise
    finally:
        for t in pool:
            t.join(timeout=60)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in pool)


# ---------------------------------------------------------------------------- KV manager

PREFIXES = [[p * 1000 + i for i in range(48)] for p in range(4)]  # 3 full blocks each


def _check_manager(manager: KVCacheManager, live: list[dict[str, int]]) -> None:
    pool = manager.pool
    pool.check_invariants()
    block = manager.spec.block_size
    refs: Counter[int] = Counter()
    shared_ok: dict[int, bool] = {}
    expected = {sid for per_thread in live for sid in per_thread}
    assert set(manager.seq_ids()) == expected
    for sid in expected:
        table = manager.block_table(sid)
        n = manager.num_tokens(sid)
        assert len(table) == -(-n // block), (sid, n, table)
        assert len(set(table)) == len(table), f"{sid} holds a page twice: {table}"
        for idx, page in enumerate(table):
            refs[page] += 1
            full = idx < n // block
            shared_ok[page] = shared_ok.get(page, True) and full
    for page in range(pool.num_pages):
        assert pool.ref_count(page) == refs.get(page, 0), (page, pool.ref_count(page), refs[page])
    for page, count in refs.items():
        if count > 1:  # shared: a cached full block in every table holding it
            assert pool.page_hash(page) is not None and shared_ok[page], page
    stats = manager.stats()
    assert stats.num_seqs == len(expected)
    assert stats.kv_used_bytes == pool.num_used * manager.spec.page_bytes
    assert pool.num_used == len(refs)


@pytest.mark.parametrize("shared_pool", [False, True], ids=["one-manager", "two-managers"])
def test_kv_manager_from_threads(shared_pool: bool) -> None:
    pool = BlockPool(160, page_bytes=SPEC.page_bytes)
    managers = [KVCacheManager(pool, SPEC)]
    if shared_pool:  # two managers on one pool (same geometry) also keep the pool right
        managers.append(KVCacheManager(pool, SPEC))
    live: list[dict[str, int]] = [{} for _ in range(THREADS)]  # seq id -> manager index
    counts = Counter[str]()
    lock = threading.Lock()

    def worker(tid: int, rng: random.Random, barrier: threading.Barrier) -> None:
        mine = live[tid]
        serial = 0
        for _ in range(ROUNDS):
            for _ in range(OPS_PER_ROUND):
                op = rng.random()
                if op < 0.35 or not mine:
                    serial += 1
                    sid = f"t{tid}-{serial}"
                    prompt = rng.choice(PREFIXES)[: rng.randint(1, 48)] + [
                        tid * 100_000 + serial * 10 + k for k in range(rng.randint(0, 30))
                    ]
                    m = rng.randrange(len(managers))
                    try:
                        cached = managers[m].allocate(sid, prompt)
                    except KVCacheExhaustedError:
                        with lock:
                            counts["exhausted"] += 1
                        continue
                    assert 0 <= cached < len(prompt)
                    mine[sid] = m
                    if rng.random() < 0.7:
                        managers[m].mark_computed(sid, len(prompt))
                    with lock:
                        counts["allocated"] += 1
                        counts["hit_tokens"] += cached
                else:
                    sid = rng.choice(list(mine))
                    m = mine[sid]
                    manager = managers[m]
                    if op < 0.6:
                        with contextlib.suppress(KVCacheExhaustedError):
                            manager.append(sid, [7] * rng.randint(1, 20))
                        manager.mark_computed(sid, manager.num_tokens(sid))
                    elif op < 0.7:
                        n = manager.num_tokens(sid)
                        slots = manager.slot_mapping(sid, 0, n)
                        assert len(set(slots)) == n
                        assert manager.match_prefix(manager.token_ids(sid)) <= n
                    else:
                        manager.free(sid, discard=rng.random() < 0.2)
                        del mine[sid]
                        with pytest.raises(InvalidKVBlockError):
                            manager.free(sid)  # a second free is refused, nothing changes
            barrier.wait(timeout=60)
            barrier.wait(timeout=60)
        for sid, m in list(mine.items()):
            managers[m].free(sid)
            del mine[sid]

    def check() -> None:
        for m, manager in enumerate(managers):
            _check_manager_subset(manager, [{s for s, i in d.items() if i == m} for d in live])
        pool.check_invariants()
        refs = sum(len(mg.block_table(s)) for mg in managers for s in mg.seq_ids())
        assert refs >= pool.num_used

    _run_rounds(worker, check)
    assert counts["allocated"] > 500 and counts["hit_tokens"] > 0, counts
    assert pool.num_used == 0
    pool.check_invariants()
    for manager in managers:
        stats = manager.stats()
        assert stats.num_seqs == 0 and stats.kv_used_bytes == 0
    for manager in managers:
        assert manager.stats().kv_used_tokens == 0


def test_kv_used_tokens_of_managers_sharing_a_pool() -> None:
    spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16)
    pool = BlockPool(16, page_bytes=spec.page_bytes)
    a, b = KVCacheManager(pool, spec), KVCacheManager(pool, spec)
    prompt = list(range(40))
    a.allocate("x", prompt)
    a.mark_computed("x", 40)
    assert b.allocate("y", prompt) == 32  # shares the two full blocks a holds
    a.free("x")
    b.free("y")
    assert pool.num_used == 0
    assert (a.stats().kv_used_tokens, b.stats().kv_used_tokens) == (0, 0)


def _check_manager_subset(manager: KVCacheManager, live: list[set[str]]) -> None:
    """Like :func:`_check_manager` for one of several managers sharing a pool."""
    block = manager.spec.block_size
    expected = set().union(*live)
    assert set(manager.seq_ids()) == expected
    for sid in expected:
        table = manager.block_table(sid)
        assert len(table) == -(-manager.num_tokens(sid) // block)
        assert len(set(table)) == len(table)
        for page in table:
            assert manager.pool.ref_count(page) >= 1


def test_kv_manager_refcounts_exactly_from_threads() -> None:
    """One manager: at every barrier refcounts equal the block tables, page by page."""
    pool = BlockPool(128, page_bytes=SPEC.page_bytes)
    manager = KVCacheManager(pool, SPEC)
    live: list[dict[str, int]] = [{} for _ in range(THREADS)]

    def worker(tid: int, rng: random.Random, barrier: threading.Barrier) -> None:
        mine = live[tid]
        for r in range(ROUNDS):
            for k in range(OPS_PER_ROUND):
                if rng.random() < 0.5 or not mine:
                    sid = f"{tid}-{r}-{k}"
                    prompt = [*PREFIXES[rng.randrange(2)][: rng.randint(17, 48)], tid, r, k]
                    try:
                        manager.allocate(sid, prompt)
                    except KVCacheExhaustedError:
                        continue
                    manager.mark_computed(sid, len(prompt))
                    mine[sid] = 0
                else:
                    sid = rng.choice(list(mine))
                    manager.free(sid)
                    del mine[sid]
            barrier.wait(timeout=60)
            barrier.wait(timeout=60)
        for sid in list(mine):
            manager.free(sid)
            del mine[sid]

    _run_rounds(worker, lambda: _check_manager(manager, live))
    assert pool.num_used == 0 and manager.stats().num_seqs == 0
    assert manager.stats().prefix_hit_tokens > 0  # prefixes really were shared
    pool.check_invariants()


# ---------------------------------------------------------------------------- providers


def _check_blocks(provider: Any, live: list[dict[int, Any]]) -> None:
    blocks = [b for per_thread in live for b in per_thread.values()]
    assert {b.handle for b in provider.kv.live_blocks()} == {b.handle for b in blocks}
    by_device: dict[str, list[int]] = {}
    for b in blocks:
        by_device.setdefault(b.device, []).extend(b.pages)
    for device, pages in by_device.items():
        assert len(pages) == len(set(pages)), f"a page of {device} is held by two blocks"
    stats = provider.kv.device_stats()
    own = by_device.get(provider.kv.device, [])
    assert stats["kv_used_bytes"] >= len(own) * provider.kv.spec.page_bytes
    assert stats["num_kv_blocks"] == sum(1 for b in blocks if b.device == provider.kv.device)


def _provider_worker(
    provider: Any,
    live: list[dict[int, Any]],
    dtype: DType,
    write: Callable[[Any, Any, float], None] | None,
    verify: Callable[[Any, Any, float], None] | None,
    offload: str | None,
) -> Callable[[int, random.Random, threading.Barrier], None]:
    values: dict[int, float] = {}

    def worker(tid: int, rng: random.Random, barrier: threading.Barrier) -> None:
        mine = live[tid]
        for _ in range(ROUNDS):
            for _ in range(OPS_PER_ROUND // 3):
                op = rng.random()
                if op < 0.4 or not mine:
                    try:
                        block = provider.kv_block_alloc(rng.choice((1, 16, 40, 100)), dtype)
                    except KVCacheExhaustedError:
                        continue
                    mine[block.handle] = block
                    value = float(tid * 1_000_000 + block.handle)
                    values[block.handle] = value
                    if write is not None:
                        write(provider, block, value)
                    continue
                handle = rng.choice(list(mine))
                block = mine[handle]
                if verify is not None:
                    verify(provider, block, values[handle])
                if op < 0.55 and len(mine) > 1:
                    # copy onto a block of the same size (of this thread); sizes come in few
                    # values so that matches happen
                    other = mine[rng.choice([h for h in mine if h != handle])]
                    if other.num_tokens == block.num_tokens and other.dtype == block.dtype:
                        provider.kv_block_copy(block, other)
                        values[other.handle] = values[handle]
                elif op < 0.65 and offload is not None:
                    target = offload if block.device == provider.kv.device else provider.kv.device
                    try:
                        moved = provider.kv_block_migrate(block, target)
                    except KVCacheExhaustedError:
                        continue
                    del mine[handle]
                    mine[moved.handle] = moved
                    values[moved.handle] = values.pop(handle)
                    with pytest.raises(InvalidKVBlockError):
                        provider.kv_block_free(block)  # the source is dead after a move
                elif op < 0.75:
                    assert len(provider.get_kv_tensor(block)) == len(block.pages)
                else:
                    provider.kv_block_free(block)
                    del mine[handle]
                    with pytest.raises(InvalidKVBlockError):
                        provider.kv_block_free(block)  # double free is refused
            barrier.wait(timeout=60)
            barrier.wait(timeout=60)
        for handle, block in list(mine.items()):
            if verify is not None:
                verify(provider, block, values[handle])
            provider.kv_block_free(block)
            del mine[handle]

    return worker


def test_mock_provider_from_threads() -> None:
    provider = MockBackendProvider(kv_spec=SPEC16, max_memory_mb=2, offload_memory_mb=1)
    live: list[dict[int, Any]] = [{} for _ in range(THREADS)]
    worker = _provider_worker(provider, live, DType.FP16, None, None, "cpu")
    _run_rounds(worker, lambda: _check_blocks(provider, live))
    stats = provider.memory_stats()
    assert stats["kv_used_bytes"] == 0 and stats["offload_kv_used_bytes"] == 0
    assert stats["num_kv_blocks"] == 0 and provider.kv.live_blocks() == []


def test_mock_provider_managers_created_and_released_from_threads() -> None:
    provider = MockBackendProvider(kv_spec=SPEC16, max_memory_mb=1)
    budget = provider.memory_stats()["total"]
    created = Counter[str]()
    lock = threading.Lock()

    def worker(tid: int, rng: random.Random, barrier: threading.Barrier) -> None:
        for _ in range(ROUNDS):
            held = []
            for _ in range(20):
                try:
                    m = provider.create_kv_manager(SPEC16, num_pages=rng.randint(1, 16))
                except KVCacheExhaustedError:
                    with lock:
                        created["refused"] += 1
                    continue
                m.allocate(f"{tid}", list(range(rng.randint(1, 16 * m.pool.num_pages))))
                held.append(m)
                with lock:
                    created["ok"] += 1
                if rng.random() < 0.5:
                    victim = held.pop(rng.randrange(len(held)))
                    victim.free(f"{tid}")
                    provider.release_kv_manager(victim)
            barrier.wait(timeout=60)
            barrier.wait(timeout=60)
            for m in held:
                m.free(f"{tid}")
                provider.release_kv_manager(m)

    def check() -> None:
        stats = provider.memory_stats()
        assert stats["allocated"] <= budget
        managers = provider.kv.managers()
        assert stats["allocated"] == sum(m.pool.num_pages for m in managers) * SPEC16.page_bytes

    _run_rounds(worker, check)
    assert created["ok"] > 50 and created["refused"] > 0, created
    stats = provider.memory_stats()
    assert stats["allocated"] == 0 and stats["num_kv_managers"] == 0


@pytest.mark.hf
def test_cpu_provider_from_threads_keeps_data_intact() -> None:
    pytest.importorskip("torch")
    from sagellm_backend.providers.cpu import CPUBackendProvider

    provider = CPUBackendProvider(
        kv_spec=SPEC, kv_memory_bytes=4 << 20, kv_block_pool_bytes=1 << 20
    )
    live: list[dict[int, Any]] = [{} for _ in range(THREADS)]

    def write(p: Any, block: Any, value: float) -> None:
        for view in p.get_kv_tensor(block):
            view.fill_(value)

    def verify(p: Any, block: Any, value: float) -> None:
        left = block.num_tokens
        for view in p.get_kv_tensor(block):  # [layers, 2, tokens_per_page, heads, dim]
            used = view[:, :, : min(left, view.shape[2])]
            left -= used.shape[2]
            got = float(used.min()), float(used.max())
            assert got == (value, value), f"block {block.handle}: {got} != {value}"

    offload = provider.kv.devices[1] if len(provider.kv.devices) > 1 else None
    worker = _provider_worker(provider, live, DType.FP32, write, verify, offload)
    _run_rounds(worker, lambda: _check_blocks(provider, live))
    stats = provider.memory_stats()
    assert stats["kv_used_bytes"] == 0 and stats["num_kv_blocks"] == 0
    assert provider.kv.live_blocks() == []
    provider.close()


def test_engines_on_several_threads_share_one_mock_provider() -> None:
    """Three MockEngines, each on its own thread and event loop, over one provider."""
    import asyncio

    from sagellm_backend.engine.mock import MockEngine, MockEngineConfig

    from .conftest import make_request, words

    provider = MockBackendProvider(max_memory_mb=512)
    results: dict[int, list[str]] = {}

    def serve(tid: int) -> None:
        async def body() -> list[str]:
            reasons = []
            for _ in range(3):  # start/stop cycles create and release KV managers
                engine = MockEngine(
                    MockEngineConfig(f"eng-{tid}", 0.0, 0.0, kv_num_pages=256, provider=provider)
                )
                await engine.start()
                out = await asyncio.gather(
                    *(
                        engine.execute(make_request(words(1 + i % 30, i), 1 + i % 20))
                        for i in range(60)
                    )
                )
                reasons += [r.finish_reason for r in out]
                await engine.stop()
            return reasons

        results[tid] = asyncio.run(body())

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(not t.is_alive() for t in threads)
    assert [len(results[t]) for t in range(3)] == [180, 180, 180]
    assert {r for rs in results.values() for r in rs} == {"length"}
    stats = provider.memory_stats()
    assert stats["num_kv_managers"] == 0 and stats["allocated"] == 0
    assert stats["kv_used_bytes"] == 0


def test_mock_engine_refuses_calls_from_another_event_loop() -> None:
    """An engine serves the loop it started on; another thread's loop gets a clear error."""
    import asyncio

    from sagellm_backend.engine.mock import MockEngine, MockEngineConfig

    from .conftest import make_request

    engine = MockEngine(MockEngineConfig("one-loop", 0.0, 0.0))
    started = threading.Event()
    done = threading.Event()
    errors: list[BaseException] = []

    def owner() -> None:
        async def body() -> None:
            await engine.start()
            started.set()
            while not done.is_set():
                await asyncio.sleep(0.005)
            assert (await engine.execute(make_request(max_tokens=2))).finish_reason == "length"
            await engine.stop()

        try:
            asyncio.run(body())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=owner)
    thread.start()
    assert started.wait(10)
    try:
        with pytest.raises(RuntimeError, match="another loop"):
            asyncio.run(engine.execute(make_request(max_tokens=2)))
    finally:
        done.set()
        thread.join(10)
    assert not errors and not thread.is_alive()


def test_factories_from_threads() -> None:
    """EngineFactory / BackendRegistry listing and creation from 4 threads at once."""
    from sagellm_backend.engine.factory import EngineFactory
    from sagellm_backend.engine.mock import MockEngine
    from sagellm_backend.registry import BackendRegistry

    EngineFactory.refresh()
    registry = BackendRegistry(environ={})
    made = Counter[str]()
    lock = threading.Lock()

    def worker(tid: int, rng: random.Random, barrier: threading.Barrier) -> None:
        for _ in range(2):
            for i in range(15):
                op = rng.random()
                if op < 0.4:
                    engine = EngineFactory.create("mock", {"engine_id": f"{tid}-{i}"})
                    assert isinstance(engine, MockEngine)
                elif op < 0.6:
                    assert {"mock", "cpu", "cuda"} <= {
                        e["kind"] for e in EngineFactory.get_engine_info()
                    }
                elif op < 0.8:
                    assert isinstance(registry.create("mock"), MockBackendProvider)
                else:
                    assert "mock" in {s.name for s in registry.statuses()}
                with lock:
                    made["ops"] += 1
            barrier.wait(timeout=60)
            barrier.wait(timeout=60)

    _run_rounds(worker, lambda: None, rounds=2)
    assert made["ops"] == THREADS * 30
