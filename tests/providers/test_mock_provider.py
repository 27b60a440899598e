from __future__ import annotations

import math
import threading
import time
from typing import Any

import pytest
from sagellm_protocol import ErrorCode

from sagellm_backend import BackendProvider, DType, Event, KernelKind, Stream
from sagellm_backend.errors import (
    BackendNotAvailableError,
    CapabilityNotSupportedError,
    ConfigError,
    InvalidKVBlockError,
    InvalidStateError,
    KernelAlreadyRegisteredError,
    KernelNotFoundError,
    KVCacheExhaustedError,
    UnsupportedDeviceError,
    UnsupportedDTypeError,
)
from sagellm_backend.kv.spec import DEFAULT_KV_SPEC, KVSpec
from sagellm_backend.kv.storage import PageRef
from sagellm_backend.providers.mock import (
    InjectedFaultError,
    MockBackendProvider,
    MockEvent,
    create_mock_backend,
)

MIB = 1 << 20
SMALL = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4)  # 256-byte pages


def small(**kw: Any) -> MockBackendProvider:
    kw.setdefault("kv_spec", SMALL)
    kw.setdefault("max_memory_mb", 1)
    return MockBackendProvider(**kw)


# --------------------------------------------------------------------------- seed & capability


def test_seed_example_verbatim() -> None:
    backend = MockBackendProvider(supported_dtypes=[DType.FP16, DType.BF16], has_collective=True)
    cap = backend.capability()
    assert cap.supported_dtypes == [DType.FP16, DType.BF16]
    block = backend.kv_block_alloc(128, DType.FP16)
    assert block.num_tokens == 128 and block.dtype is DType.FP16
    assert len(block.pages) == 128 // DEFAULT_KV_SPEC.block_size
    assert block.num_bytes == 128 * DEFAULT_KV_SPEC.bytes_per_token


def test_positional_0112_constructor_and_defaults() -> None:
    b = MockBackendProvider(None, None, False, True, 2048)
    cap = b.capability()
    assert cap.supported_dtypes == [DType.FP16, DType.BF16]
    assert cap.supported_kernels == [KernelKind.MATMUL, KernelKind.ATTENTION]
    assert (cap.has_collective, cap.has_graph_exec, cap.max_memory_mb) == (False, True, 2048)
    assert cap.has_stream and cap.has_event
    assert cap.device_type == "mock" and cap.device_name == "mock"
    assert cap.total_memory_bytes == 2048 * MIB == cap.available_memory_bytes
    assert isinstance(b, BackendProvider)


def test_imitating_other_hardware() -> None:
    b = MockBackendProvider(
        supported_dtypes=["fp32", DType.INT8],
        supported_kernels=list(KernelKind),
        has_stream=False,
        has_event=False,
        device="cuda:0",
        device_name="NVIDIA H100",
        device_type="cuda",
        compute_capability="9.0",
        max_batch_size=64,
        max_sequence_length=8192,
    )
    cap = b.capability()
    assert cap.supported_dtypes == [DType.FP32, DType.INT8]
    assert cap.supported_kernels == list(KernelKind)
    assert (cap.device_name, cap.device_type, cap.compute_capability) == (
        "NVIDIA H100",
        "cuda",
        "9.0",
    )
    assert (cap.max_batch_size, cap.max_sequence_length) == (64, 8192)
    assert not cap.has_stream and not cap.has_event
    assert b.kv_block_alloc(4, DType.FP32).device == "cuda:0"
    with pytest.raises(CapabilityNotSupportedError):
        b.create_stream()
    with pytest.raises(NotImplementedError):
        b.create_event()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_memory_mb": 0},
        {"max_memory_mb": "16"},
        {"supported_dtypes": ["fp64"]},
        {"supported_kernels": ["conv"]},
        {"has_collective": "yes"},
        {"world_size": 2, "rank": 2},
        {"max_batch_size": 0},
        {"device": ""},
        {"kv_spec": "llama"},
        {"kv_block_size": 0},
        {"offload_device": "mock:0"},
        {"fail_kv_after_pages": -1},
        {"kernel_latency_ms": -1},
        {"failing_kernels": "matmul"},
        {"failing_kernels": {"matmul": "boom"}},
        {"device_ids": [0, -1]},
        {"device_ids": ["a"]},
    ],
)
def test_invalid_config_raises_config_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        MockBackendProvider(**kwargs)


# --------------------------------------------------------------------------- streams / events


def test_events_measure_real_time() -> None:
    b = MockBackendProvider()
    stream = b.create_stream()
    start, end = b.create_event(), b.create_event()
    assert isinstance(stream, Stream) and isinstance(start, Event)
    stream.record_event(start)
    time.sleep(0.02)
    stream.record_event(end)
    end.synchronize()
    stream.synchronize()
    elapsed = end.elapsed_ms(start)
    assert 19.0 <= elapsed < 1000.0
    assert stream.num_events == 2


def test_unrecorded_event_is_an_error() -> None:
    b = MockBackendProvider()
    start, end = b.create_event(), b.create_event()
    end.record()
    with pytest.raises(InvalidStateError, match="start"):
        end.elapsed_ms(start)
    with pytest.raises(TypeError):
        end.elapsed_ms(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        b.create_stream().record_event(object())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- collectives


def test_collectives_single_rank_identity() -> None:
    b = MockBackendProvider()
    data = [1.0, 2.0, 3.0]
    b.all_reduce(data, "sum")
    assert data == [1.0, 2.0, 3.0]
    gathered = b.all_gather(data)
    assert gathered == data and gathered is not data
    assert b.collective_calls == {"all_reduce": 1, "all_gather": 1}


def test_collectives_simulated_world() -> None:
    b = MockBackendProvider(world_size=4, rank=1)
    data = [[1, 2], [3, 4]]
    b.all_reduce(data, "SUM")
    assert data == [[4, 8], [12, 16]]
    prod = [2, 3]
    b.all_reduce(prod, "product")
    assert prod == [16, 81]
    same = [5, 6]
    for op in ("avg", "max", "min"):
        b.all_reduce(same, op)
    assert same == [5, 6]
    assert b.all_gather([1, 2]) == [1, 2] * 4
    assert b.all_gather(7) == [7, 7, 7, 7]
    with pytest.raises(TypeError):
        b.all_reduce((1, 2), "sum")


def test_collectives_on_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    b = MockBackendProvider(world_size=2)
    t = torch.tensor([1.0, 2.0])
    b.all_reduce(t, "sum")
    assert t.tolist() == [2.0, 4.0]
    g = b.all_gather(torch.ones(2, 3))
    assert tuple(g.shape) == (4, 3)


def test_collective_errors() -> None:
    b = MockBackendProvider(has_collective=False)
    with pytest.raises(NotImplementedError, match="has_collective=False"):
        b.all_reduce([1], "sum")
    with pytest.raises(CapabilityNotSupportedError):
        b.all_gather([1])
    with pytest.raises(ValueError, match="valid ops: sum, avg, max, min, product"):
        MockBackendProvider().all_reduce([1], "mean")


# --------------------------------------------------------------------------- kernels


def test_unknown_kernel_names_registered_ones() -> None:
    b = MockBackendProvider()
    with pytest.raises(KeyError, match="registered kernels: attention, matmul") as info:
        b.get_kernel("flash")
    assert isinstance(info.value, KernelNotFoundError)
    assert info.value.code is ErrorCode.NOT_IMPLEMENTED


def test_register_kernel_updates_capability() -> None:
    b = MockBackendProvider()

    def my_softmax(x: list[float]) -> list[float]:
        return x

    b.register_kernel("my_softmax", my_softmax, kind="softmax", dtypes=[DType.FP16])
    assert b.get_kernel("my_softmax") is my_softmax
    assert KernelKind.SOFTMAX in b.capability().supported_kernels
    with pytest.raises(KernelAlreadyRegisteredError):
        b.register_kernel("my_softmax", my_softmax)
    b.register_kernel("my_softmax", len, replace=True)
    assert b.get_kernel("my_softmax") is len
    with pytest.raises(UnsupportedDTypeError):
        b.register_kernel("x", len, dtypes=[DType.FP32])
    with pytest.raises(ConfigError, match="unknown kernel kind"):
        b.register_kernel("y", len, kind="conv")
    b.register_kernel("plain", len)  # 0.1.1.2 two-argument form
    b.unregister_kernel("my_softmax")
    assert KernelKind.SOFTMAX not in b.capability().supported_kernels


def test_builtin_kernels_compute() -> None:
    b = MockBackendProvider(supported_kernels=list(KernelKind))
    assert b.get_kernel("matmul")([[1, 2], [3, 4]], [[5, 6], [7, 8]], [1, 1]) == [
        [20.0, 23.0],
        [44.0, 51.0],
    ]
    assert b.get_kernel("matmul")([1, 2], [[1], [1]]) == [3.0]
    with pytest.raises(ValueError, match="inner dimensions"):
        b.get_kernel("matmul")([[1, 2]], [[1, 2]])
    sm = b.get_kernel("softmax")([[1.0, 2.0, 3.0], [0.0, 0.0, -math.inf]])
    assert math.isclose(sum(sm[0]), 1.0) and sm[1] == [0.5, 0.5, 0.0]
    ln = b.get_kernel("layer_norm")([1.0, 2.0, 3.0, 4.0])
    assert math.isclose(sum(ln), 0.0, abs_tol=1e-9)
    assert math.isclose(sum(v * v for v in ln) / 4, 1.0, rel_tol=1e-4)
    rms = b.get_kernel("rms_norm")([3.0, 4.0], [2.0, 1.0])
    inv = 1 / math.sqrt((9 + 16) / 2 + 1e-6)
    assert rms == pytest.approx([6 * inv, 4 * inv])
    act = b.get_kernel("silu_and_mul")([1.0, 2.0])
    assert act == pytest.approx([1 / (1 + math.exp(-1)) * 2.0])
    # one query, two keys: weights softmax([0, 1]) over values 0 and 1
    out = b.get_kernel("attention")([[1.0]], [[0.0], [1.0]], [[0.0], [1.0]])
    w = math.exp(1) / (1 + math.exp(1))
    assert out[0] == pytest.approx([w])
    causal = b.get_kernel("attention")(
        [[1.0], [1.0]], [[0.0], [1.0]], [[5.0], [7.0]], is_causal=True
    )
    assert causal[0] == pytest.approx([5.0])


def test_builtin_kernels_match_torch() -> None:
    torch = pytest.importorskip("torch")
    b = MockBackendProvider(supported_kernels=list(KernelKind))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    )
    got = b.get_kernel("attention")(q.tolist(), k.tolist(), v.tolist(), is_causal=True)
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), ref, atol=1e-9)
    a, m = torch.randn(2, 3, 4, generator=g), torch.randn(4, 5, generator=g)
    got = torch.tensor(b.get_kernel("matmul")(a.tolist(), m.tolist()))
    assert torch.allclose(got, a @ m, atol=1e-5)
    x = torch.randn(3, 7, generator=g)
    got = torch.tensor(b.get_kernel("layer_norm")(x.tolist()))
    assert torch.allclose(got, torch.nn.functional.layer_norm(x, (7,)), atol=1e-5)


# --------------------------------------------------------------------------- KV and memory


def test_kv_dtype_and_token_checks() -> None:
    b = MockBackendProvider()
    with pytest.raises(ValueError, match="supported dtypes: fp16, bf16"):
        b.kv_block_alloc(16, DType.FP32)
    with pytest.raises(ValueError, match="num_tokens"):
        b.kv_block_alloc(0, DType.FP16)


def test_memory_stats_are_real_accounting() -> None:
    b = small()  # 1 MiB budget, 256-byte pages -> 4096 pages
    s0 = b.memory_stats()
    assert s0["allocated"] == 0 and s0["free"] == s0["total"] == MIB
    assert s0["kv_pool_bytes"] == MIB and s0["num_kv_blocks"] == 0
    blk = b.kv_block_alloc(10, DType.FP16)  # 3 pages
    s1 = b.memory_stats()
    assert s1["allocated"] == s1["kv_used_bytes"] == 3 * 256 == s1["allocated_bytes"]
    assert s1["free"] == MIB - 768 and s1["num_kv_blocks"] == 1
    assert b.capability().available_memory_bytes == MIB - 768
    b.kv_block_free(blk)
    s2 = b.memory_stats()
    assert s2["allocated"] == 0 and s2["peak"] == 768
    for key in (
        "allocated",
        "peak",
        "total",
        "free",
        "reserved",
        "kv_pool_bytes",
        "kv_used_bytes",
        "num_kv_blocks",
        "allocated_mb",
        "reserved_mb",
    ):
        assert isinstance(s2[key], int)


def test_allocation_beyond_max_memory_is_resource_exhausted() -> None:
    b = small()
    blocks = [b.kv_block_alloc(4 * 1024, DType.FP16) for _ in range(4)]  # 4 x 1024 pages
    before = b.memory_stats()
    with pytest.raises(KVCacheExhaustedError) as info:
        b.kv_block_alloc(1, DType.FP16)
    assert info.value.to_protocol().code is ErrorCode.RESOURCE_EXHAUSTED
    assert b.memory_stats() == before
    b.kv_block_free(blocks[0])
    b.kv_block_alloc(1, DType.FP16)


def test_kv_block_misuse() -> None:
    b, other = small(), small()
    blk = b.kv_block_alloc(4, DType.FP16)
    foreign = other.kv_block_alloc(4, DType.FP16)
    b.kv_block_free(blk)
    before = b.memory_stats()
    with pytest.raises(InvalidKVBlockError, match="already freed"):
        b.kv_block_free(blk)
    with pytest.raises(ValueError, match="belongs to provider"):
        b.kv_block_free(foreign)
    with pytest.raises(InvalidKVBlockError):
        b.get_kv_tensor(blk)
    assert b.memory_stats() == before


def test_copy_migrate_and_page_refs() -> None:
    b = small()
    src = b.kv_block_alloc(6, DType.FP16)
    dst = b.kv_block_alloc(8, DType.FP16)
    tags = b.kv.storage_of(src).stamp(list(src.pages))  # type: ignore[attr-defined]
    b.kv_block_copy(src, dst)
    refs = b.get_kv_tensor(dst)
    assert all(isinstance(r, PageRef) for r in refs) and [r.tag for r in refs] == tags
    host = b.kv_block_migrate(src, "cpu")
    assert host.device == "cpu" and [r.tag for r in b.get_kv_tensor(host)] == tags
    assert b.memory_stats()["offload_kv_used_bytes"] == 2 * 256
    assert b.memory_stats()["kv_used_bytes"] == 2 * 256  # only dst is left on the device
    back = b.kv_block_migrate(host, "mock:0")
    assert back.device == "mock:0"
    with pytest.raises(UnsupportedDeviceError, match="valid devices: 'mock:0', 'cpu'"):
        b.kv_block_migrate(back, "npu:0")
    no_offload = small(offload_device=None)
    blk = no_offload.kv_block_alloc(4, DType.FP16)
    with pytest.raises(ValueError, match="valid devices: 'mock:0'"):
        no_offload.kv_block_migrate(blk, "cpu")


def test_kv_manager_is_charged_and_cache_cleared() -> None:
    b = small()
    m = b.create_kv_manager(num_pages=100)
    assert b.memory_stats()["allocated"] == 100 * 256
    m.allocate("a", list(range(9)))
    m.mark_computed("a", 9)
    m.free("a")
    assert m.pool.num_cached == 2
    b.clear_cache()
    assert m.pool.num_cached == 0
    with pytest.raises(KVCacheExhaustedError):
        b.create_kv_manager(memory_bytes=MIB)
    b.release_kv_manager(m)
    assert b.memory_stats()["allocated"] == 0
    big = b.create_kv_manager()  # default: the whole remaining budget
    assert big.pool.num_pages == MIB // 256
    with pytest.raises(KVCacheExhaustedError):
        b.kv_block_alloc(1, DType.FP16)


def test_kv_block_size_option() -> None:
    b = MockBackendProvider(kv_block_size=32)
    assert len(b.kv_block_alloc(64, DType.FP16).pages) == 2


def test_concurrent_kv_use_from_threads() -> None:
    b = small()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for i in range(300):
                blk = b.kv_block_alloc(1 + i % 40, DType.BF16)
                b.kv_block_free(blk)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = b.memory_stats()
    assert s["allocated"] == 0 and s["num_kv_blocks"] == 0 and s["kv_used_bytes"] == 0


# --------------------------------------------------------------------------- fault injection


def test_fail_on_init() -> None:
    with pytest.raises(BackendNotAvailableError, match="injected fault: no device"):
        MockBackendProvider(fail_on_init="no device")
    with pytest.raises(BackendNotAvailableError):
        create_mock_backend({"fail_on_init": True})


def test_fail_kv_after_pages_counts_blocks_and_managers() -> None:
    b = small(fail_kv_after_pages=5)
    b.kv_block_alloc(8, DType.FP16)  # 2 pages
    m = b.create_kv_manager(num_pages=10)
    m.allocate("a", list(range(8)))  # 2 pages -> 4
    before = (b.memory_stats(), m.stats())
    with pytest.raises(KVCacheExhaustedError, match="injected fault"):
        m.allocate("b", list(range(8)))
    with pytest.raises(KVCacheExhaustedError, match="injected fault"):
        b.kv_block_alloc(8, DType.FP16)
    assert (b.memory_stats(), m.stats()) == before
    b.kv_block_alloc(4, DType.FP16)  # exactly the 5th page
    b.set_kv_fault(None)
    b.kv_block_alloc(4, DType.FP16)
    assert b.kv_pages_handed_out == 6


def test_failing_kernels_and_latency() -> None:
    class BoomError(RuntimeError):
        pass

    b = MockBackendProvider(
        failing_kernels={"matmul": BoomError("gpu fell over")},
        kernel_latency_ms={"attention": 30.0},
        collective_latency_ms=20.0,
    )
    with pytest.raises(BoomError, match="fell over"):
        b.get_kernel("matmul")([[1]], [[1]])
    t0 = time.perf_counter()
    assert b.get_kernel("attention")([[1.0]], [[1.0]], [[2.0]]) == [[2.0]]
    assert time.perf_counter() - t0 >= 0.029
    t0 = time.perf_counter()
    b.all_reduce([1], "sum")
    assert time.perf_counter() - t0 >= 0.019
    b.clear_faults()
    assert b.get_kernel("matmul")([[2]], [[3]]) == [[6.0]]
    b.inject_kernel_failure("attention")
    with pytest.raises(InjectedFaultError) as info:
        b.get_kernel("attention")([[1.0]], [[1.0]], [[1.0]])
    assert info.value.retryable and info.value.code is ErrorCode.UNAVAILABLE
    names = MockBackendProvider(failing_kernels=["matmul"])
    with pytest.raises(InjectedFaultError, match="'matmul'"):
        names.get_kernel("matmul")([[1]], [[1]])


# --------------------------------------------------------------------------- factory


def test_create_mock_backend_accepts_none_dict_and_kwargs() -> None:
    assert isinstance(create_mock_backend(), MockBackendProvider)
    b = create_mock_backend({"kind": "mock", "max_memory_mb": 64}, has_collective=False)
    cap = b.capability()
    assert cap.max_memory_mb == 64 and not cap.has_collective


def test_create_mock_backend_rejects_unknown_keys_and_kinds() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown mock backend option.*max_mem_mb.*valid:.*max_memory_mb"
    ):
        create_mock_backend({"max_mem_mb": 1})
    with pytest.raises(ConfigError, match="kind='cuda'"):
        create_mock_backend({"kind": "cuda"})
    with pytest.raises(ConfigError):
        create_mock_backend(42)


def test_create_mock_backend_from_core_backend_config() -> None:
    core = pytest.importorskip("sagellm_core")
    b = create_mock_backend(core.BackendConfig(kind="mock", device_ids=[3, 4]))
    assert b.device == "mock:3" and b.device_ids == (3, 4)
    assert b.kv_block_alloc(16, DType.FP16).device == "mock:3"
    b = create_mock_backend(core.BackendConfig(kind="mock", device="mock:7"))
    assert b.device == "mock:7"
    via_core = core.create_backend(core.BackendConfig(kind="mock"))
    assert isinstance(via_core, MockBackendProvider)
    # a mock standing for the host: its blocks live on "cpu", and it has no offload pool
    host = core.create_backend(core.BackendConfig(kind="mock", device="cpu"))
    assert host.kv_block_alloc(16, DType.FP16).device == "cpu"
    with pytest.raises(UnsupportedDeviceError):
        host.kv_block_migrate(host.kv_block_alloc(16, DType.FP16), "mock:0")


def test_a_user_kernel_takes_over_a_builtin_name() -> None:
    """0.1.1.2's providers registered no kernels, so registering "matmul" just worked; the
    built-in default gives way (keeping its kind), a second user registration does not."""
    from sagellm_backend.errors import KernelAlreadyRegisteredError

    b = MockBackendProvider()
    builtin = b.get_kernel("matmul")

    def mine(a: object, b: object) -> str:
        return "mine"

    b.register_kernel("matmul", mine)
    assert b.get_kernel("matmul") is mine and mine is not builtin
    assert KernelKind.MATMUL in b.capability().supported_kernels
    with pytest.raises(KernelAlreadyRegisteredError, match="replace=True"):
        b.register_kernel("matmul", mine)
    b.register_kernel("matmul", builtin, replace=True)
    assert b.get_kernel("matmul") is builtin


def test_event_type_is_exported() -> None:
    assert isinstance(MockEvent(), Event)
