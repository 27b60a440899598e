"""The cpu provider: real capability, enforcement, streams/events, memory, KV, kernels."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
psutil = pytest.importorskip("psutil")

from sagellm_backend.base import BackendProvider, Event, KVBlock, Stream  # noqa: E402
from sagellm_backend.capability import DType, KernelKind  # noqa: E402
from sagellm_backend.errors import (  # noqa: E402
    ConfigError,
    InvalidKVBlockError,
    InvalidStateError,
    KernelAlreadyRegisteredError,
    KernelNotFoundError,
    KVCacheExhaustedError,
    UnsupportedDeviceError,
    UnsupportedDTypeError,
)
from sagellm_backend.kv.spec import KVSpec  # noqa: E402
from sagellm_backend.kv.storage import TorchKVStorage  # noqa: E402
from sagellm_backend.providers._torch import TorchProviderOptions  # noqa: E402
from sagellm_backend.providers.cpu import (  # noqa: E402
    CPUBackendProvider,
    CpuEvent,
    CpuStream,
    create_cpu_backend,
)

SRC = str(Path(__file__).resolve().parents[2] / "src")
# 2 layers x 2 heads x 8 dims x fp32, 4-token pages: 512 bytes per page.
SMALL_SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=DType.FP32)


@pytest.fixture
def cpu() -> CPUBackendProvider:
    p = create_cpu_backend(kv_spec=SMALL_SPEC, kv_memory_bytes=64 * SMALL_SPEC.page_bytes)
    yield p
    p.close()


# ----------------------------------------------------------------------------- loading


def test_cpu_backend_works_without_torch_and_cuda_fails_cleanly() -> None:
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("No module named 'torch' (blocked)")
                return None
        sys.meta_path.insert(0, Block())
        import importlib.util
        importlib.util.find_spec = (lambda f: lambda name, *a: None if name == "torch"
                                    else f(name, *a))(importlib.util.find_spec)
        import sagellm_backend.providers.cpu as cpu
        import sagellm_backend.providers.cuda as cuda
        from sagellm_backend import DType
        from sagellm_backend.kv.spec import KVSpec
        assert "torch" not in sys.modules
        assert cpu.is_available() is True and cuda.is_available() is False
        spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16)
        p = cpu.create_cpu_backend({"kv_memory_bytes": 1 << 20, "kv_spec": spec})
        cap = p.capability()
        print("DTYPES", [d.value for d in cap.supported_dtypes], cap.supported_kernels)
        a = p.kv_block_alloc(32, DType.FP16)  # two whole 16-token pages
        b = p.kv_block_alloc(32, DType.FP16)
        pages = p.get_kv_tensor(a)
        for page in pages:
            raw = page.cast("B")
            raw[:] = bytes(range(256)) * (raw.nbytes // 256)
        p.kv_block_copy(a, b)
        print("COPIED", [x.tobytes() for x in p.get_kv_tensor(b)] ==
              [x.tobytes() for x in pages])
        data = [1.0, 2.0]
        p.all_reduce(data, "sum")
        print("GATHER", data, p.all_gather(data))
        try:
            p.init_distributed(rank=0, world_size=2)
        except ImportError as exc:
            print(type(exc).__name__, exc)
        p.kv_block_free(a)
        p.kv_block_free(b)
        print("USED", p.memory_stats()["kv_used_bytes"])
        assert "torch" not in sys.modules
        try:
            cuda.create_cuda_backend()
        except ImportError as exc:
            print(type(exc).__name__, exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "DTYPES ['fp32', 'fp16', 'int8'] []"
    assert lines[1] == "COPIED True"
    assert lines[2] == "GATHER [1.0, 2.0] [1.0, 2.0]"
    assert lines[3].startswith("DependencyMissingError collectives across 2 ranks")
    assert "isagellm-backend[torch]" in lines[3]
    assert lines[4] == "USED 0"
    assert lines[5].startswith("DependencyMissingError the cuda backend needs torch")
    assert "pip install 'isagellm-backend[torch]'" in lines[5]


def test_entry_point_resolves_to_factory() -> None:
    (ep,) = [
        e for e in importlib.metadata.entry_points(group="sagellm.backends") if e.name == "cpu"
    ]
    assert ep.load() is create_cpu_backend
    assert CPUBackendProvider.is_available() is True


def test_config_forms() -> None:
    core = pytest.importorskip("sagellm_core")
    spec_opts = {"kv_spec": SMALL_SPEC, "kv_memory_bytes": 1 << 16}
    for config in (
        None,
        {"kind": "cpu", "device": "cpu", **spec_opts},
        core.BackendConfig(kind="cpu", device="cpu", device_ids=[0]),
        TorchProviderOptions(device="cpu", kv_memory_fraction=0.01),
        {"kind": "cpu", "device": "cpu:0", **spec_opts},  # torch's name, taken by 0.1.1.2
    ):
        p = create_cpu_backend(config)
        assert isinstance(p, CPUBackendProvider) and isinstance(p, BackendProvider)
        assert p.device == "cpu"
    assert create_cpu_backend({"kv_memory_bytes": 1 << 16}, kv_memory_bytes=1 << 17).options == (
        TorchProviderOptions(kv_memory_bytes=1 << 17)
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"kind": "cuda"}, "config kind 'cuda' given to the 'cpu' backend factory"),
        ({"kv_memori_bytes": 5}, r"unknown cpu backend option\(s\) \['kv_memori_bytes'\]"),
        ({"device": "cuda:0"}, "runs on device 'cpu'"),
        ({"device_ids": [1]}, "has one device"),
        ({"kv_memory_fraction": 1.5}, r"kv_memory_fraction must be in \(0, 1\]"),
        ({"kv_memory_bytes": -1}, "kv_memory_bytes must be a positive integer"),
        ({"kv_memory_bytes": 1, "kv_memory_fraction": 0.5}, "not both"),
        ({"enable_collectives": "yes"}, "enable_collectives must be a bool"),
        ({"kv_spec": {"num_layers": 2}}, "kv_spec must be a KVSpec"),
    ],
)
def test_bad_config_is_rejected(config: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_cpu_backend(config)


# ----------------------------------------------------------------------------- capability


def test_capability_is_read_from_this_machine(cpu: CPUBackendProvider) -> None:
    cap = cpu.capability()
    assert cap.device_type == "cpu"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if model:
        assert cap.device_name == f"{model} ({os.cpu_count()} cores)"
    assert cap.compute_capability == torch.backends.cpu.get_cpu_capability()
    assert cap.total_memory_bytes == psutil.virtual_memory().total
    assert 0 < cap.available_memory_bytes <= cap.total_memory_bytes
    assert cap.supported_dtypes[0] == DType.FP32
    assert DType.BF16 in cap.supported_dtypes  # torch >= 2.1 computes bf16 on any x86 CPU
    assert not {DType.FP8, DType.INT8, DType.INT4} & set(cap.supported_dtypes)
    assert cap.supported_kernels == cpu.kernels.kinds()
    assert set(cap.supported_kernels) == {
        KernelKind.MATMUL,
        KernelKind.ATTENTION,
        KernelKind.LAYERNORM,
        KernelKind.SOFTMAX,
    }
    assert cap.has_stream and cap.has_event and not cap.has_graph_exec
    assert cap.has_collective is torch.distributed.is_gloo_available()


def test_host_capability_without_torch_matches_torch_isa() -> None:
    host = create_cpu_backend(kv_spec=SMALL_SPEC, kv_memory_bytes=1 << 16, use_torch=False)
    cap = host.capability()
    assert cap.compute_capability == torch.backends.cpu.get_cpu_capability()
    assert cap.supported_dtypes == [DType.FP32, DType.FP16, DType.INT8]
    assert cap.supported_kernels == [] and host.kernels.kinds() == []
    assert cap.has_collective  # one rank: identity
    assert cap.total_memory_bytes == psutil.virtual_memory().total
    with pytest.raises(ImportError, match=r"isagellm-backend\[torch\]"):
        host.torch_device  # noqa: B018


@pytest.mark.parametrize("dtype", [DType.FP8, DType.INT8, DType.INT4, "float64"])
def test_unsupported_dtypes_are_refused(cpu: CPUBackendProvider, dtype: DType | str) -> None:
    supported = ", ".join(d.value for d in cpu.capability().supported_dtypes)
    with pytest.raises(UnsupportedDTypeError, match=f"supported.*{supported}"):
        cpu.kv_block_alloc(4, dtype)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        cpu.check_dtype(dtype)
    assert cpu.memory_stats()["kv_used_bytes"] == 0


def test_create_kv_manager_refuses_unsupported_spec_dtype(cpu: CPUBackendProvider) -> None:
    with pytest.raises(UnsupportedDTypeError, match="fp8"):
        cpu.create_kv_manager(SMALL_SPEC.with_dtype(DType.FP8), num_pages=2)


def test_kernel_registry_drives_capability(cpu: CPUBackendProvider) -> None:
    assert KernelKind.FUSION not in cpu.capability().supported_kernels

    def fused(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * 2

    cpu.register_kernel("relu2", fused, kind=KernelKind.FUSION, dtypes=[DType.FP32])
    assert cpu.get_kernel("relu2") is fused
    assert KernelKind.FUSION in cpu.capability().supported_kernels
    with pytest.raises(KernelAlreadyRegisteredError, match="replace=True"):
        cpu.register_kernel("relu2", fused)
    cpu.register_kernel("relu2", torch.relu, kind=KernelKind.FUSION, replace=True)
    assert cpu.get_kernel("relu2") is torch.relu
    with pytest.raises(UnsupportedDTypeError):
        cpu.register_kernel("fp8_thing", fused, dtypes=[DType.FP8])
    with pytest.raises(KernelNotFoundError, match="registered kernels: attention"):
        cpu.get_kernel("nope")
    with pytest.raises(KeyError):
        cpu.get_kernel("nope")
    # the 0.1.1.2 positional form still works
    cpu.register_kernel("plain", fused)
    assert cpu.get_kernel("plain") is fused
    # a kind by its value (as the mock takes it); a user kernel replaces a built-in default
    cpu.register_kernel("softmax", fused, kind="softmax")
    assert cpu.get_kernel("softmax") is fused
    assert KernelKind.SOFTMAX in cpu.capability().supported_kernels
    with pytest.raises(ConfigError, match="unknown kernel kind 'warp'; valid: "):
        cpu.register_kernel("w", fused, kind="warp")


# ----------------------------------------------------------------------------- streams/events


def test_events_measure_real_elapsed_time(cpu: CPUBackendProvider) -> None:
    stream = cpu.create_stream()
    start, end = cpu.create_event(), cpu.create_event()
    assert isinstance(stream, Stream) and isinstance(start, Event)
    assert isinstance(stream, CpuStream) and isinstance(start, CpuEvent)
    stream.record_event(start)
    t0 = time.perf_counter()
    time.sleep(0.03)
    stream.record_event(end)
    wall_ms = (time.perf_counter() - t0) * 1e3
    stream.synchronize()
    end.synchronize()
    elapsed = end.elapsed_ms(start)
    assert 29.0 <= elapsed <= wall_ms + 1.0
    assert start.elapsed_ms(end) == pytest.approx(-elapsed)
    start.record()  # re-recording moves the mark
    assert end.elapsed_ms(start) < 0
    cpu.synchronize()


def test_event_misuse_is_reported(cpu: CPUBackendProvider) -> None:
    a, b = cpu.create_event(), cpu.create_event()
    with pytest.raises(RuntimeError, match="must be recorded"):
        b.elapsed_ms(a)
    a.record()
    with pytest.raises(RuntimeError, match="must be recorded"):
        b.elapsed_ms(a)

    class Other:
        def synchronize(self) -> None: ...

        def elapsed_ms(self, start: object) -> float:
            return 0.0

    with pytest.raises(TypeError, match="CpuEvent"):
        b.elapsed_ms(Other())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="CpuEvent"):
        cpu.create_stream().record_event(Other())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- memory


def test_memory_stats_track_process_memory_and_kv(cpu: CPUBackendProvider) -> None:
    before = cpu.memory_stats()
    for key in ("allocated", "reserved", "peak", "total", "free", "kv_pool_bytes", "kv_used_bytes"):
        assert isinstance(before[key], int), key
    assert before["total"] == psutil.virtual_memory().total
    assert before["allocated"] == before["reserved"] <= before["peak"]
    assert before["kv_pool_bytes"] == before["kv_used_bytes"] == 0  # lazily allocated

    big = torch.ones(48 << 20, dtype=torch.uint8)  # 48 MiB, touched
    grown = cpu.memory_stats()
    assert grown["allocated"] - before["allocated"] >= 40 << 20
    assert grown["peak"] >= grown["allocated"]
    del big

    block = cpu.kv_block_alloc(10, DType.FP32)
    stats = cpu.memory_stats()
    assert stats["kv_pool_bytes"] == 16 * SMALL_SPEC.page_bytes  # a quarter of 64 pages
    assert stats["kv_used_bytes"] == block.num_bytes == 3 * SMALL_SPEC.page_bytes
    assert stats["kv_free_bytes"] == stats["kv_pool_bytes"] - stats["kv_used_bytes"]
    cpu.kv_block_free(block)
    assert cpu.memory_stats()["kv_used_bytes"] == 0


def test_memory_stats_keep_the_0_1_1_2_keys(cpu: CPUBackendProvider) -> None:
    """0.1.1.2's cpu memory_stats was psutil's rss / vms (process) and available / used /
    total (host): the same figures are still there under those names."""
    stats = cpu.memory_stats()
    for key in ("rss", "vms", "available", "used", "total"):
        assert isinstance(stats[key], int) and stats[key] > 0, key
    assert stats["rss"] == stats["process_rss"] <= stats["vms"]
    assert stats["available"] == stats["free"] <= stats["total"]
    assert stats["used"] <= stats["total"]
    big = torch.ones(48 << 20, dtype=torch.uint8)  # 48 MiB, touched
    assert cpu.memory_stats()["rss"] - stats["rss"] >= 40 << 20
    del big


def test_clear_cache_drops_evictable_kv_pages(cpu: CPUBackendProvider) -> None:
    mgr = cpu.create_kv_manager(SMALL_SPEC, num_pages=8)
    tokens = list(range(12))  # 3 full blocks
    mgr.allocate("a", tokens)
    mgr.mark_computed("a", 12)
    mgr.free("a")
    assert mgr.stats().num_evictable_pages >= 2  # full blocks stay cached for prefix reuse
    assert cpu.memory_stats()["kv_evict_count"] == 0
    cpu.clear_cache()
    assert mgr.stats().num_evictable_pages == 0
    assert cpu.memory_stats()["kv_evict_count"] >= 2
    # a new sequence with the same prefix no longer hits the cache
    assert mgr.allocate("b", tokens) == 0


# ----------------------------------------------------------------------------- KV


def test_kv_blocks_hold_real_bytes(cpu: CPUBackendProvider) -> None:
    a = cpu.kv_block_alloc(6, DType.FP32)
    b = cpu.kv_block_alloc(8, DType.FP32)
    assert isinstance(a, KVBlock) and a.device == "cpu" and a.owner == cpu.provider_id
    assert len(a.pages) == 2 and a.num_bytes == 2 * SMALL_SPEC.page_bytes
    pages = cpu.get_kv_tensor(a)
    assert [tuple(p.shape) for p in pages] == [(2, 2, 4, 2, 8)] * 2
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in pages)
    g = torch.Generator().manual_seed(0)
    for p in pages:
        p.copy_(torch.randn(p.shape, generator=g))
    cpu.kv_block_copy(a, b)
    src = torch.stack(cpu.get_kv_tensor(a))
    dst = torch.stack(cpu.get_kv_tensor(b))
    # the 6 tokens of a are copied; tokens 6..7 of b's second page are left as they were
    assert torch.equal(dst[0], src[0])
    assert torch.equal(dst[1, :, :, :2], src[1, :, :, :2])
    # same-device migrate is a no-op; other devices are refused with the valid ones named
    assert cpu.kv_block_migrate(a, "cpu") == a
    with pytest.raises(UnsupportedDeviceError, match="valid devices: 'cpu'"):
        cpu.kv_block_migrate(a, "cuda:0")
    cpu.kv_block_free(a)
    with pytest.raises(InvalidKVBlockError, match="already freed"):
        cpu.kv_block_free(a)
    with pytest.raises(InvalidKVBlockError):
        cpu.get_kv_tensor(a)
    other = create_cpu_backend(kv_spec=SMALL_SPEC, kv_memory_bytes=1 << 16)
    with pytest.raises(InvalidKVBlockError, match="belongs to provider"):
        other.kv_block_free(b)
    cpu.kv_block_free(b)


def test_kv_exhaustion_leaves_pool_unchanged(cpu: CPUBackendProvider) -> None:
    held = cpu.kv_block_alloc(60, DType.FP32)  # 15 of the 16 pool pages
    before = cpu.memory_stats()
    with pytest.raises(KVCacheExhaustedError) as info:
        cpu.kv_block_alloc(8, DType.FP32)
    # what was asked, what the pool holds of the budget, and what to change
    message = str(info.value)
    assert "8 fp32 tokens on cpu need 2 pages" in message
    assert f"holds {16 * SMALL_SPEC.page_bytes} bytes of the {64 * SMALL_SPEC.page_bytes}" in (
        message
    )
    assert "kv_block_pool_bytes / kv_memory_bytes" in message
    assert cpu.memory_stats()["kv_used_bytes"] == before["kv_used_bytes"]
    last = cpu.kv_block_alloc(4, DType.FP32)
    cpu.kv_block_free(last)
    cpu.kv_block_free(held)


def test_kv_budget_options() -> None:
    assert create_cpu_backend(kv_memory_bytes=12345).kv_budget_bytes() == 12345
    avail = psutil.virtual_memory().available
    frac = create_cpu_backend(kv_memory_fraction=0.01).kv_budget_bytes()
    assert abs(frac - avail * 0.01) <= avail * 0.002
    default = create_cpu_backend().kv_budget_bytes()
    assert 0 < default <= 4 << 30  # vLLM's CPU default, at most a quarter of the free RAM
    assert abs(default - min(4 << 30, avail // 4)) <= avail * 0.01


def test_manager_storage_feeds_the_paged_attention_kernel(cpu: CPUBackendProvider) -> None:
    spec = KVSpec(num_layers=1, num_kv_heads=2, head_dim=8, block_size=4, dtype=DType.BF16)
    mgr = cpu.create_kv_manager(spec, num_pages=12, enable_prefix_caching=False)
    assert isinstance(mgr.storage, TorchKVStorage)
    assert mgr.storage.data.dtype == torch.bfloat16 and mgr.storage.device == "cpu"
    k_cache, v_cache = mgr.storage.layer_kv(0)
    write = cpu.get_kernel("write_kv_cache")
    paged = cpu.get_kernel("paged_attention")
    g = torch.Generator().manual_seed(5)
    lens = {"x": 7, "y": 13}
    dense = {}
    for seq, n in lens.items():
        mgr.allocate(seq, list(range(100, 100 + n)))
        k = torch.randn(n, 2, 8, generator=g).to(torch.bfloat16)
        v = torch.randn(n, 2, 8, generator=g).to(torch.bfloat16)
        write(k, v, k_cache, v_cache, torch.tensor(mgr.slot_mapping(seq, 0, n)))
        dense[seq] = (k, v)
    tables = [mgr.block_table(s) for s in lens]
    width = max(map(len, tables))
    bt = torch.tensor([t + [-1] * (width - len(t)) for t in tables])
    q = torch.randn(2, 4, 8, generator=g).to(torch.bfloat16)
    out = paged(q, k_cache, v_cache, bt, torch.tensor(list(lens.values())), spec.block_size)
    for i, seq in enumerate(lens):
        k, v = dense[seq]
        ref = cpu.get_kernel("attention")(
            q[i][None, :, None].float(),
            k.transpose(0, 1)[None].float(),
            v.transpose(0, 1)[None].float(),
        )[0, :, 0]
        assert (out[i].float() - ref).abs().max().item() < 2e-2
    for seq in lens:
        mgr.free(seq)
    cpu.release_kv_manager(mgr)
    assert cpu.memory_stats()["num_kv_managers"] == 0


def test_close_releases_and_is_idempotent() -> None:
    p = create_cpu_backend(kv_spec=SMALL_SPEC, kv_memory_bytes=1 << 16)
    block = p.kv_block_alloc(4, DType.FP32)
    with p:
        pass
    assert p.memory_stats()["kv_pool_bytes"] == 0
    with pytest.raises(InvalidStateError, match="closed"):
        p.kv_block_free(block)
    p.close()


@pytest.mark.parametrize("use_torch", [None, False])
def test_kv_manager_arguments_are_validated(use_torch: bool | None) -> None:
    p = create_cpu_backend(
        kv_spec=SMALL_SPEC, kv_memory_bytes=8 * SMALL_SPEC.page_bytes, use_torch=use_torch
    )
    default = p.create_kv_manager(None, num_pages=2)  # None: the provider's KV spec
    assert default.spec == SMALL_SPEC
    with pytest.raises(ValueError, match="num_pages must be >= 1"):
        p.create_kv_manager(SMALL_SPEC, num_pages=0)
    with pytest.raises(ValueError, match="spec must be a KVSpec"):
        p.create_kv_manager("llama")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="memory_bytes must hold at least one"):
        p.create_kv_manager(SMALL_SPEC, memory_bytes=1)
    p.release_kv_manager(default)
    p.release_kv_manager(default)  # already released: a no-op
    assert p.memory_stats()["num_kv_managers"] == 0


def test_a_kv_pool_the_device_cannot_allocate_is_a_kv_error_and_nothing_is_held() -> None:
    huge = 1 << 50  # within the budget given, far beyond the machine's memory
    cpu = create_cpu_backend(kv_spec=SMALL_SPEC, kv_memory_bytes=huge)
    with pytest.raises(KVCacheExhaustedError, match="cannot allocate a KV pool") as info:
        cpu.create_kv_manager(SMALL_SPEC, memory_bytes=huge)
    assert "fewer pages or bytes" in str(info.value)
    assert cpu.memory_stats()["num_kv_managers"] == 0
    manager = cpu.create_kv_manager(SMALL_SPEC, num_pages=4)  # and it still serves
    cpu.release_kv_manager(manager)
