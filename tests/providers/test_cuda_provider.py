"""The cuda provider.

Without a GPU: the module imports, its entry point loads, the factory fails naming what is
missing, and the provider's logic runs against a fake ``torch.cuda`` (device properties,
allocator figures, streams/events) with KV pages held in host memory, so everything but the
real device calls is exercised. With a GPU (``pytest -m cuda``): the same on the real device.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import socket
import time
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from sagellm_backend.base import BackendProvider, Event, Stream  # noqa: E402
from sagellm_backend.capability import DType, KernelKind  # noqa: E402
from sagellm_backend.errors import (  # noqa: E402
    BackendNotAvailableError,
    CapabilityNotSupportedError,
    ConfigError,
    UnsupportedDeviceError,
    UnsupportedDTypeError,
)
from sagellm_backend.kv.spec import KVSpec  # noqa: E402
from sagellm_backend.kv.storage import TorchKVStorage  # noqa: E402
from sagellm_backend.providers import cuda as cuda_mod  # noqa: E402
from sagellm_backend.providers.cuda import (  # noqa: E402
    CudaBackendProvider,
    CudaEvent,
    CudaStream,
    create_cuda_backend,
    dtypes_for_compute_capability,
    parse_cuda_device,
)

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks behaviour on a machine without CUDA")
SMALL_SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=DType.FP16)
GiB = 1 << 30


# ----------------------------------------------------------------------------- no GPU needed


def test_entry_point_loads() -> None:
    (ep,) = [
        e for e in importlib.metadata.entry_points(group="sagellm.backends") if e.name == "cuda"
    ]
    assert ep.load() is create_cuda_backend
    assert CudaBackendProvider.is_available() is HAS_CUDA
    assert cuda_mod.is_available() is HAS_CUDA


@no_cuda
def test_factory_fails_cleanly_without_cuda() -> None:
    reason = cuda_mod.unavailable_reason()
    assert reason is not None
    expected = "built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
    assert expected in reason
    with pytest.raises(
        BackendNotAvailableError, match=f"cuda backend is not available: .*{expected}"
    ):
        create_cuda_backend()
    with pytest.raises(RuntimeError, match=expected):
        CudaBackendProvider()
    with pytest.raises(BackendNotAvailableError):
        create_cuda_backend({"kind": "cuda", "device": "cuda:0"})


def test_unavailable_reasons_name_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "built without CUDA" in (cuda_mod.unavailable_reason() or "")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    assert "CUDA_VISIBLE_DEVICES" in (cuda_mod.unavailable_reason() or "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cuda_mod.unavailable_reason(0) is None
    assert cuda_mod.unavailable_reason(3) == "cuda device 3 does not exist; 2 visible (0..1)"
    with pytest.raises(BackendNotAvailableError, match="cuda device 3 does not exist"):
        create_cuda_backend(device="cuda:3")


@pytest.mark.parametrize(
    ("cc", "expected"),
    [
        ((7, 0), [DType.FP32, DType.FP16]),
        ((7, 5), [DType.FP32, DType.FP16]),
        ((8, 0), [DType.FP32, DType.FP16, DType.BF16]),
        ((8, 6), [DType.FP32, DType.FP16, DType.BF16]),
        ((8, 9), [DType.FP32, DType.FP16, DType.BF16, DType.FP8]),
        ((9, 0), [DType.FP32, DType.FP16, DType.BF16, DType.FP8]),
    ],
)
def test_dtypes_by_compute_capability(cc: tuple[int, int], expected: list[DType]) -> None:
    assert dtypes_for_compute_capability(*cc) == expected


def test_parse_cuda_device() -> None:
    assert parse_cuda_device(None, None) == 0
    assert parse_cuda_device("cuda", None) == 0
    assert parse_cuda_device("cuda:2", None) == 2
    assert parse_cuda_device(None, [3]) == 3
    assert parse_cuda_device("cuda:1", [1]) == 1
    with pytest.raises(ConfigError, match="'cuda' or 'cuda:N'"):
        parse_cuda_device("cpu", None)
    with pytest.raises(ConfigError, match="'cuda' or 'cuda:N'"):
        parse_cuda_device("cuda:x", None)
    with pytest.raises(ConfigError, match="one process per GPU"):
        parse_cuda_device(None, [0, 1])
    with pytest.raises(ConfigError, match="disagree"):
        parse_cuda_device("cuda:0", [1])


def test_config_errors_come_before_device_checks() -> None:
    with pytest.raises(ConfigError, match="config kind 'cpu'"):
        create_cuda_backend({"kind": "cpu"})
    with pytest.raises(ConfigError, match="unknown cuda backend option"):
        create_cuda_backend(gpu_memory_utilization=0.9)
    with pytest.raises(ConfigError, match="'cuda' or 'cuda:N'"):
        create_cuda_backend(device="cpu")
    core = pytest.importorskip("sagellm_core")
    with pytest.raises(ConfigError, match="one process per GPU"):
        create_cuda_backend(core.BackendConfig(kind="cuda", device_ids=[0, 1]))


# ----------------------------------------------------------------------------- fake torch.cuda


class FakeRawEvent:
    clock = itertools.count()

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.t: float | None = None
        self.stream: Any = None
        self.synced = 0

    def record(self, stream: Any = None) -> None:
        self.t, self.stream = time.perf_counter(), stream

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self.synced += 1

    def elapsed_time(self, end: FakeRawEvent) -> float:
        assert self.t is not None and end.t is not None
        return (end.t - self.t) * 1e3


class FakeRawStream:
    def __init__(self, device: int | None = None) -> None:
        self.device = device
        self.calls: list[str] = []

    def synchronize(self) -> None:
        self.calls.append("synchronize")

    def query(self) -> bool:
        return True

    def wait_event(self, event: Any) -> None:
        self.calls.append("wait_event")

    def wait_stream(self, stream: Any) -> None:
        self.calls.append("wait_stream")


class FakeCuda:
    """Records calls; stands in for the torch.cuda functions the device layer uses."""

    def __init__(self, major: int, minor: int) -> None:
        self.props = SimpleNamespace(
            name="Fake GPU", major=major, minor=minor, total_memory=80 * GiB
        )
        self.calls: list[tuple[str, Any]] = []
        self.current: list[Any] = []

    def install(self, mp: pytest.MonkeyPatch) -> None:
        c = torch.cuda
        mp.setattr(c, "is_available", lambda: True)
        mp.setattr(c, "device_count", lambda: 1)
        mp.setattr(c, "get_device_properties", lambda i: self.props)
        mp.setattr(c, "mem_get_info", lambda i: (60 * GiB, 80 * GiB))
        mp.setattr(c, "memory_allocated", lambda i: 3 * GiB)
        mp.setattr(c, "memory_reserved", lambda i: 4 * GiB)
        mp.setattr(c, "max_memory_allocated", lambda i: 5 * GiB)
        mp.setattr(c, "max_memory_reserved", lambda i: 6 * GiB)
        for name in ("reset_peak_memory_stats", "synchronize", "set_device"):
            mp.setattr(c, name, lambda i=None, _n=name: self.calls.append((_n, i)))
        mp.setattr(c, "empty_cache", lambda: self.calls.append(("empty_cache", None)))
        mp.setattr(c, "Stream", FakeRawStream)
        mp.setattr(c, "Event", FakeRawEvent)
        fake = self

        class StreamCtx:
            def __init__(self, raw: Any) -> None:
                self.raw = raw

            def __enter__(self) -> None:
                fake.current.append(self.raw)

            def __exit__(self, *exc: object) -> None:
                fake.current.pop()

        mp.setattr(c, "stream", StreamCtx)


class HostTorchKVStorage(TorchKVStorage):
    """TorchKVStorage whose pages live in host memory whatever device it is asked for."""

    def __init__(self, spec: KVSpec, num_pages: int, device: str = "cpu") -> None:
        super().__init__(spec, num_pages, "cpu")
        self.requested_device = device


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = FakeCuda(9, 0)
    fake.install(monkeypatch)
    return fake


def _fake_provider(**kw: Any) -> CudaBackendProvider:
    kw.setdefault("kv_spec", SMALL_SPEC)
    kw.setdefault("kv_memory_bytes", 64 * SMALL_SPEC.page_bytes)
    return CudaBackendProvider(storage_factory=HostTorchKVStorage, **kw)


def test_fake_gpu_capability_and_dtype_matrix(
    fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = _fake_provider(device="cuda:0")
    assert isinstance(p, BackendProvider) and p.device == "cuda:0"
    cap = p.capability()
    assert cap.device_name == "Fake GPU" and cap.device_type == "cuda"
    assert cap.compute_capability == "9.0"
    assert cap.total_memory_bytes == 80 * GiB and cap.available_memory_bytes == 60 * GiB
    assert cap.supported_dtypes == [DType.FP32, DType.FP16, DType.BF16, DType.FP8]
    assert cap.supported_kernels == p.kernels.kinds()
    assert KernelKind.ATTENTION in cap.supported_kernels
    assert cap.has_stream and cap.has_event and cap.has_graph_exec
    assert cap.has_collective is torch.distributed.is_nccl_available()

    fake_cuda.props.major, fake_cuda.props.minor = 7, 5  # a T4: no bf16, no fp8
    old = _fake_provider()
    assert old.capability().supported_dtypes == [DType.FP32, DType.FP16]
    with pytest.raises(UnsupportedDTypeError, match="supported dtypes: fp32, fp16"):
        old.kv_block_alloc(8, DType.BF16)
    with pytest.raises(UnsupportedDTypeError):
        old.create_kv_manager(SMALL_SPEC.with_dtype(DType.BF16), num_pages=2)
    assert old.kv_block_alloc(8, DType.FP16).device == "cuda:0"


def test_fake_gpu_memory_stats_and_cache(fake_cuda: FakeCuda) -> None:
    p = _fake_provider()
    stats = p.memory_stats()
    assert stats["allocated"] == 3 * GiB
    assert stats["reserved"] == 4 * GiB
    assert stats["peak"] == 5 * GiB
    assert stats["peak_reserved"] == 6 * GiB
    # 0.1.1.2's keys
    assert stats["allocated_bytes"] == 3 * GiB and stats["reserved_bytes"] == 4 * GiB
    assert stats["allocated_mb"] == 3 * 1024 and stats["reserved_mb"] == 4 * 1024
    assert stats["total"] == 80 * GiB and stats["free"] == 60 * GiB
    assert stats["kv_pool_bytes"] == 0
    p.reset_peak_memory_stats()
    p.clear_cache()
    p.synchronize()
    assert ("reset_peak_memory_stats", 0) in fake_cuda.calls
    assert ("empty_cache", None) in fake_cuda.calls
    assert ("synchronize", 0) in fake_cuda.calls


def test_fake_gpu_default_budget_is_half_of_free_memory(fake_cuda: FakeCuda) -> None:
    assert CudaBackendProvider(storage_factory=HostTorchKVStorage).kv_budget_bytes() == 30 * GiB
    frac = CudaBackendProvider(storage_factory=HostTorchKVStorage, kv_memory_fraction=0.25)
    assert frac.kv_budget_bytes() == 15 * GiB


def test_fake_gpu_streams_and_events(fake_cuda: FakeCuda) -> None:
    p = _fake_provider()
    s = p.create_stream()
    e0, e1 = p.create_event(), p.create_event()
    assert isinstance(s, CudaStream) and isinstance(e0, CudaEvent)
    assert isinstance(s, Stream) and isinstance(e0, Event)
    assert s.raw.device == 0
    with s:
        assert fake_cuda.current == [s.raw]
        s.record_event(e0)
        time.sleep(0.02)
        e1.record()  # current stream
    assert fake_cuda.current == []
    assert e0.raw.stream is s.raw and e1.raw.stream is None
    elapsed = e1.elapsed_ms(e0)
    assert elapsed >= 19.0
    assert e1.raw.synced == 1  # elapsed_ms waits for the end event
    s.wait_event(e0)
    s.wait_stream(p.create_stream())
    s.synchronize()
    assert s.raw.calls == ["wait_event", "wait_stream", "synchronize"]
    e0.synchronize()
    assert e0.query() and s.query()
    cpu_event = SimpleNamespace(synchronize=lambda: None, elapsed_ms=lambda start: 0.0)
    with pytest.raises(TypeError, match="CudaEvent"):
        s.record_event(cpu_event)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="CudaEvent"):
        e1.elapsed_ms(cpu_event)  # type: ignore[arg-type]


def test_fake_gpu_kv_migrates_to_host_and_back(fake_cuda: FakeCuda) -> None:
    p = _fake_provider(offload_memory_bytes=32 * SMALL_SPEC.page_bytes)
    block = p.kv_block_alloc(10, DType.FP16)
    assert block.device == "cuda:0" and len(block.pages) == 3
    g = torch.Generator().manual_seed(0)
    for page in p.get_kv_tensor(block):
        page.copy_(torch.randn(page.shape, generator=g).half())
    payload = torch.stack(p.get_kv_tensor(block)).clone()
    host = p.kv_block_migrate(block, "cpu")
    assert host.device == "cpu" and host.handle != block.handle
    assert torch.equal(torch.stack(p.get_kv_tensor(host)), payload)
    stats = p.memory_stats()
    assert stats["kv_used_bytes"] == 0
    assert stats["offload_kv_used_bytes"] == 3 * SMALL_SPEC.page_bytes
    assert stats["offload_kv_budget_bytes"] == 32 * SMALL_SPEC.page_bytes
    back = p.kv_block_migrate(host, "cuda")  # alias of cuda:0
    assert back.device == "cuda:0"
    assert torch.equal(torch.stack(p.get_kv_tensor(back)), payload)
    with pytest.raises(UnsupportedDeviceError, match="'cuda:0', 'cpu'"):
        p.kv_block_migrate(back, "cuda:1")
    p.kv_block_free(back)
    assert p.memory_stats()["offload_kv_used_bytes"] == 0


def test_fake_gpu_collectives(fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    p = _fake_provider()
    assert p.capability().has_collective
    with pytest.raises(ValueError, match="collectives run on cuda:0"):
        p.all_reduce(torch.ones(2), "sum")
    seen: list[dict[str, Any]] = []

    def fake_init(**kwargs: Any) -> None:
        assert ("set_device", 0) in fake_cuda.calls  # bound to the GPU before NCCL starts
        seen.append(kwargs)

    monkeypatch.setattr(dist, "init_process_group", fake_init)
    p.init_distributed(rank=0, world_size=1, init_method="tcp://127.0.0.1:1")
    assert seen[0]["backend"] == "nccl" and seen[0]["world_size"] == 1
    p.close()

    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    q = _fake_provider()
    assert not q.capability().has_collective
    with pytest.raises(CapabilityNotSupportedError, match="no usable backend for cuda"):
        q.all_gather(torch.ones(2))
    r = _fake_provider(enable_collectives=False)
    with pytest.raises(NotImplementedError, match="enable_collectives=False"):
        r.all_reduce(torch.ones(2), "sum")


# ----------------------------------------------------------------------------- real GPU


@pytest.fixture
def gpu() -> CudaBackendProvider:
    p = create_cuda_backend(device="cuda:0", kv_memory_bytes=512 << 20)
    yield p
    p.close()


@pytest.mark.cuda
@needs_cuda
def test_gpu_capability_matches_device(gpu: CudaBackendProvider) -> None:
    cap = gpu.capability()
    major, minor = torch.cuda.get_device_capability(0)
    assert cap.device_name == torch.cuda.get_device_name(0)
    assert cap.compute_capability == f"{major}.{minor}"
    assert cap.total_memory_bytes == torch.cuda.mem_get_info(0)[1]
    assert (DType.BF16 in cap.supported_dtypes) == (major >= 8)
    assert cap.has_collective == torch.distributed.is_nccl_available()
    assert gpu.is_available()


@pytest.mark.cuda
@needs_cuda
def test_gpu_events_time_device_work(gpu: CudaBackendProvider) -> None:
    s, e0, e1 = gpu.create_stream(), gpu.create_event(), gpu.create_event()
    x = torch.randn(2048, 2048, device="cuda:0")
    with s:
        s.record_event(e0)
        for _ in range(10):
            x = torch.tanh(x @ x)
        s.record_event(e1)
    t0 = time.perf_counter()
    s.synchronize()
    ms = e1.elapsed_ms(e0)
    assert 0.0 < ms < 10_000
    assert (time.perf_counter() - t0) * 1e3 <= ms + 1000


@pytest.mark.cuda
@needs_cuda
def test_gpu_kv_on_device_and_offload_roundtrip(gpu: CudaBackendProvider) -> None:
    block = gpu.kv_block_alloc(40, DType.FP16)
    pages = gpu.get_kv_tensor(block)
    assert all(pg.device.type == "cuda" for pg in pages)
    for pg in pages:
        pg.copy_(torch.randn(pg.shape, device=pg.device).half())
    payload = torch.stack(pages).cpu()
    host = gpu.kv_block_migrate(block, "cpu")
    assert all(pg.device.type == "cpu" for pg in gpu.get_kv_tensor(host))
    assert torch.equal(torch.stack(gpu.get_kv_tensor(host)), payload)
    back = gpu.kv_block_migrate(host, "cuda:0")
    assert torch.equal(torch.stack(gpu.get_kv_tensor(back)).cpu(), payload)
    gpu.kv_block_free(back)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_paged_attention_matches_dense(gpu: CudaBackendProvider, dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and DType.BF16 not in gpu.capability().supported_dtypes:
        pytest.skip("no bf16 on this GPU")
    spec = KVSpec(num_layers=1, num_kv_heads=2, head_dim=64, block_size=16, dtype=DType.FP16)
    mgr = gpu.create_kv_manager(
        spec.with_dtype("bf16" if dtype == torch.bfloat16 else "fp16"),
        num_pages=32,
        enable_prefix_caching=False,
    )
    k_cache, v_cache = mgr.storage.layer_kv(0)
    k_cache.normal_()
    v_cache.normal_()
    lens = [3, 50, 97]
    tables = []
    for i, n in enumerate(lens):
        mgr.allocate(str(i), list(range(n)))
        tables.append(mgr.block_table(str(i)))
    width = max(map(len, tables))
    bt = torch.tensor([t + [-1] * (width - len(t)) for t in tables], device="cuda:0")
    q = torch.randn(3, 8, 64, device="cuda:0", dtype=dtype)
    out = gpu.get_kernel("paged_attention")(
        q, k_cache, v_cache, bt, torch.tensor(lens, device="cuda:0"), 16
    )
    for b, n in enumerate(lens):
        slots = torch.tensor([tables[b][i // 16] * 16 + i % 16 for i in range(n)], device="cuda:0")
        k = k_cache[slots].transpose(0, 1)[None].float().repeat_interleave(4, 1)
        v = v_cache[slots].transpose(0, 1)[None].float().repeat_interleave(4, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(q[b][None, :, None].float(), k, v)
        assert (out[b].float() - ref[0, :, 0]).abs().max().item() < 3e-2


@pytest.mark.cuda
@needs_cuda
def test_gpu_memory_stats_and_clear_cache(gpu: CudaBackendProvider) -> None:
    before = gpu.memory_stats()
    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda:0")
    during = gpu.memory_stats()
    assert during["allocated"] - before["allocated"] >= 256 << 20
    assert during["peak"] >= during["allocated"]
    del x
    assert gpu.memory_stats()["reserved"] >= 256 << 20
    gpu.clear_cache()
    assert gpu.memory_stats()["reserved"] <= during["reserved"] - (256 << 20)


@pytest.mark.cuda
@needs_cuda
def test_gpu_single_rank_nccl_group(gpu: CudaBackendProvider) -> None:
    if not torch.distributed.is_nccl_available():
        pytest.skip("no NCCL in this torch")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gpu.init_distributed(rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        for op in ("sum", "avg", "max", "min", "product"):
            t = torch.tensor([1.0, -2.0], device="cuda:0")
            gpu.all_reduce(t, op)
            assert t.tolist() == [1.0, -2.0]
        assert gpu.all_gather(torch.tensor([[1, 2]], device="cuda:0")).tolist() == [[1, 2]]
    finally:
        gpu.shutdown_distributed()
    assert not torch.distributed.is_initialized()


# ----------------------------------------------------------------------------- conformance

from sagellm_backend.testing.conformance import ProviderConformance  # noqa: E402


class TestFakeGpuConformance(ProviderConformance):
    """The provider contract on the cuda provider over the fake device (KV offload included)."""

    migrate_targets = ("cpu", "cuda:0")

    @pytest.fixture
    def provider_factory(self, monkeypatch: pytest.MonkeyPatch) -> Any:
        FakeCuda(9, 0).install(monkeypatch)
        return lambda: _fake_provider(kv_memory_bytes=4096 * SMALL_SPEC.page_bytes)

    def make_tensor(self, provider: Any, values: list[float]) -> Any:
        return torch.tensor(values)  # host tensors: the fake device has no memory


@pytest.mark.cuda
@needs_cuda
class TestGpuConformance(ProviderConformance):
    """The provider contract on the real GPU."""

    migrate_targets = ("cpu", "cuda:0")

    def make_provider(self) -> CudaBackendProvider:
        return create_cuda_backend(kv_spec=SMALL_SPEC, kv_memory_bytes=4096 * SMALL_SPEC.page_bytes)
