"""Point 1: the cpu backend works on a base install (no torch), as in 0.1.1.2."""

from __future__ import annotations

from collections.abc import Callable

RunScript = Callable[[str], list[str]]


def test_cpu_entry_point_without_torch(without_torch: RunScript) -> None:
    lines = without_torch(
        """
        import importlib.metadata, time
        import psutil
        from sagellm_backend import DType
        from sagellm_backend.kv.spec import KVSpec
        (ep,) = [e for e in importlib.metadata.entry_points(group="sagellm.backends")
                 if e.name == "cpu"]
        spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16)
        p = ep.load()({"kv_memory_bytes": 1 << 20, "kv_spec": spec})
        cap = p.capability()
        print("CAP", cap.device_type, [d.value for d in cap.supported_dtypes],
              cap.supported_kernels, cap.has_stream, cap.has_event, cap.has_collective)
        print("MEM", cap.total_memory_bytes == psutil.virtual_memory().total)
        a = p.kv_block_alloc(32, DType.FP16)
        b = p.kv_block_alloc(32, DType.FP16)
        for page in p.get_kv_tensor(a):
            raw = page.cast("B")
            raw[:] = bytes(i % 251 for i in range(raw.nbytes))
        p.kv_block_copy(a, b)
        same = [x.tobytes() for x in p.get_kv_tensor(a)] == [
            x.tobytes() for x in p.get_kv_tensor(b)]
        moved = p.kv_block_migrate(b, "cpu")
        print("COPY", same, moved == b)
        try:
            p.kv_block_free(a); p.kv_block_free(a)
        except ValueError as exc:
            print("DOUBLE", type(exc).__name__)
        used = p.memory_stats()["kv_used_bytes"]
        p.kv_block_free(moved)
        print("USED", used > 0, p.memory_stats()["kv_used_bytes"])
        blocks = []
        try:
            while True:
                blocks.append(p.kv_block_alloc(16, DType.FP16))
        except MemoryError as exc:
            print("EXHAUSTED", len(blocks), type(exc).__name__)
        for blk in blocks:
            p.kv_block_free(blk)
        s = p.create_stream(); e0 = p.create_event(); e1 = p.create_event()
        s.record_event(e0); time.sleep(0.02); s.record_event(e1)
        print("EVENT", 15 <= e1.elapsed_ms(e0) < 2000)
        t = [[1.0, 2.0], [3.0, 4.0]]
        p.all_reduce(t, "sum")
        print("REDUCE", t, p.all_gather(5.0))
        p.init_distributed(rank=0, world_size=1)
        try:
            p.init_distributed(rank=1, world_size=4)
        except ImportError as exc:
            print("WORLD4", type(exc).__name__, "isagellm-backend[torch]" in str(exc))
        p.clear_cache()
        """
    )
    assert lines == [
        "CAP cpu ['fp32', 'fp16', 'int8'] [] True True True",
        "MEM True",
        "COPY True True",  # migrating to its own device keeps the block
        "DOUBLE InvalidKVBlockError",
        "USED True 0",
        "EXHAUSTED 64 KVCacheExhaustedError",
        "EVENT True",
        "REDUCE [[1.0, 2.0], [3.0, 4.0]] [5.0]",
        "WORLD4 DependencyMissingError True",
    ]
