"""The tensor-parallel worker side: a rank > 0 builds its runner and serves steps.

Part of :mod:`sagellm_backend.engine.hf.distributed`. A spawned rank enters through
:func:`spawned_worker` (load, report, rendezvous, :func:`serve`, exit); a torchrun rank
calls :func:`serve` from ``TensorParallelGroup.shard``. Invariants: a worker issues the
same collectives in the same order as rank 0 (one header broadcast per message, a payload
broadcast and a status all-reduce per STEP); a step that fails here is logged and reported
through the status all-reduce, never raised past the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from sagellm_backend.engine.hf._tp_config import TPSettings
from sagellm_backend.engine.hf._tp_wire import (
    CHUNK_FIELDS,
    HEADER_LEN,
    NOOP,
    SHUTDOWN,
    decode_plan,
)

if TYPE_CHECKING:
    import torch

    from sagellm_backend.engine.hf.core import LoadSettings
    from sagellm_backend.engine.runners.base import ModelRunner
    from sagellm_backend.kv.manager import KVCacheManager

__all__ = [
    "LOCAL_RUNNERS",
    "make_provider",
    "rank_report",
    "serve",
    "set_threads",
    "spawn_workers",
    "spawned_worker",
    "timeout_delta",
]

# The records logged here are the tensor-parallel group's: keep the logger users configure.
_log = logging.getLogger("sagellm_backend.engine.hf.distributed")


def _selected_runner(model: Any, kv: KVCacheManager, init: dict[str, Any]) -> ModelRunner:
    """The runner ``select_runner`` builds, forced to the kind rank 0 got.

    Every rank thus runs the same runner class as rank 0 (the engine core builds rank 0's
    through :func:`~sagellm_backend.engine.runners.select.select_runner` too).
    """
    from sagellm_backend.engine.runners.select import select_runner

    return select_runner(
        model,
        kv.storage,
        block_size=init["block_size"],
        max_context=init["max_context"],
        runner="paged" if init["runner"] == "paged" else "hf",
        max_batch_size=init["max_batch_size"],
        prepack_weights=init["prepack_weights"],
    )


#: Runner name (rank 0's local runner ``name``) -> how a worker builds the same runner over
#: its shard and pool. A new local runner is one more entry here.
LOCAL_RUNNERS: dict[str, Callable[[Any, Any, dict[str, Any]], ModelRunner]] = {
    "paged": _selected_runner,
    "hf-batched": _selected_runner,
}


# ---------------------------------------------------------------------------- worker side
def make_provider(settings: TPSettings, rank: int, kv_bytes: int | None) -> Any:
    """The backend provider of ``rank`` (its device; a KV budget of ``kv_bytes`` if given)."""
    if settings.device_type == "cuda":
        from sagellm_backend.providers.cuda import create_cuda_backend

        options: dict[str, Any] = {"device": settings.device_of(rank)}
        if kv_bytes:
            options["kv_memory_bytes"] = kv_bytes
        return create_cuda_backend(options)
    from sagellm_backend.providers.cpu import CPUBackendProvider

    return CPUBackendProvider(kv_memory_bytes=kv_bytes) if kv_bytes else CPUBackendProvider()


def rank_report(rank: int, provider: Any, kv: Any, shard: Any) -> dict[str, Any]:
    """What a rank holds (shard plan, heads, KV pool and weight bytes), for ``info()``."""
    stats = provider.memory_stats()
    spec = kv.spec
    return {
        "rank": rank,
        "pid": os.getpid(),
        "plan": shard.plan,
        "num_heads": shard.num_heads,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "kv_pool_bytes": int(stats.get("kv_pool_bytes", 0)),
        "kv_page_bytes": int(spec.page_bytes),
        "weight_bytes": shard.weight_bytes,
    }


def serve(model: Any, provider: Any, settings: TPSettings, rank: int) -> None:
    """Worker loop of rank ``rank`` > 0 (the group is initialised): until SHUTDOWN."""
    import torch
    import torch.distributed as dist

    from sagellm_backend.capability import DType
    from sagellm_backend.engine.hf._tp_shard import CommStats, shard_model, timed_all_reduce
    from sagellm_backend.errors import KVCacheExhaustedError
    from sagellm_backend.kv.spec import KVSpec

    timeout = timeout_delta(settings.timeout_s)
    ctrl = dist.new_group(backend="gloo", timeout=timeout)
    comm = CommStats()
    reducing = [False]  # off while the runner is built: a runner may probe the model then

    def reduce(t: torch.Tensor) -> None:
        if reducing[0]:
            provider.all_reduce(t, "sum")

    shard = shard_model(model, rank, settings.size, timed_all_reduce(reduce, comm))
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=ctrl)
    init: dict[str, Any] = box[0]
    spec = KVSpec.from_model_config(
        model.config, block_size=init["block_size"], dtype=DType(init["kv_dtype"])
    )
    kv_provider = provider
    if init["runner"] != "paged":  # the runner keeps K/V in the model's caches: count only
        from sagellm_backend.kv.manager import KVCacheManager

        kv = KVCacheManager.counting(spec, init["num_pages"])
    else:
        try:
            kv = provider.create_kv_manager(
                spec, num_pages=init["num_pages"], enable_prefix_caching=False
            )
        except KVCacheExhaustedError:  # this provider's budget is smaller than rank 0's pool
            kv_provider = make_provider(settings, rank, init["num_pages"] * spec.page_bytes)
            kv = kv_provider.create_kv_manager(
                spec, num_pages=init["num_pages"], enable_prefix_caching=False
            )
    runner = LOCAL_RUNNERS[init["runner"]](model, kv, init)
    reducing[0] = True
    dist.gather_object(rank_report(rank, kv_provider, kv, shard), None, dst=0, group=ctrl)
    header = torch.empty(HEADER_LEN, dtype=torch.long)
    status = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        while True:
            dist.broadcast(header, src=0, group=ctrl)
            head = header.tolist()
            kind = head[0]
            if kind == SHUTDOWN:
                return
            if kind == NOOP:
                continue
            size = head[1] * CHUNK_FIELDS + head[2] + head[3] + head[4]
            payload = torch.empty(size, dtype=torch.long)
            dist.broadcast(payload, src=0, group=ctrl)
            chunks, released = decode_plan(head, payload)
            if head[5]:
                runner.reset()
            for seq in released:
                runner.release(str(seq))
            failed = 0
            if chunks:
                try:
                    runner.execute(chunks)
                except Exception:  # rank 0 learns it from the status all-reduce
                    _log.exception("tensor-parallel rank %d: step failed", rank)
                    failed = 1
            status.fill_(failed)
            dist.all_reduce(status, op=dist.ReduceOp.MAX, group=ctrl)


def timeout_delta(seconds: float) -> Any:
    """``seconds`` as the ``datetime.timedelta`` torch.distributed takes."""
    from datetime import timedelta

    return timedelta(seconds=seconds)


def spawned_worker(
    rank: int,
    settings: TPSettings,
    load: LoadSettings,
    init_method: str,
    kv_bytes: int | None,
    conn: Any,
) -> None:
    """Entry point of a spawned rank: load, rendezvous, serve, exit."""
    import torch

    if settings.device_type == "cpu":
        torch.set_num_threads(settings.cpu_threads())
    provider = None
    try:
        from transformers.utils import logging as hf_logging

        from sagellm_backend.engine.hf.loader import load_model_and_tokenizer

        # No progress bars here: tqdm's lock is a named semaphore, and rank 0 shows them.
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        provider = make_provider(settings, rank, kv_bytes)
        model, _ = load_model_and_tokenizer(
            load.model_path,
            device=load.device,
            dtype=load.dtype,
            device_map=None,
            load_in_8bit=False,
            load_in_4bit=False,
            trust_remote_code=load.trust_remote_code,
            low_cpu_mem_usage=load.low_cpu_mem_usage,
        )
    except BaseException as exc:  # report, then exit: rank 0 names the cause
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    conn.send(("loaded", os.getpid()))
    conn.close()
    provider.init_distributed(
        rank=rank, world_size=settings.size, init_method=init_method, timeout_s=settings.timeout_s
    )
    try:
        serve(model, provider, settings, rank)
    finally:
        with contextlib.suppress(Exception):
            provider.shutdown_distributed()
    # Skip the interpreter teardown (about a second of freeing the model and torch state):
    # nothing of this process outlives it, and stop() waits for it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_workers(
    settings: TPSettings, load: LoadSettings, init_method: str, kv_bytes: int | None
) -> Iterator[tuple[Any, Any]]:
    """Spawn ranks ``1..size-1`` (spawn context); they start loading at once.

    Each rank loads with ``load`` on its own device, then reports on its pipe and
    rendezvouses at ``init_method``.

    Yields:
        ``(process, pipe end rank 0 reads)`` of each rank in order, as soon as it started.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    for rank in range(1, settings.size):
        parent, child = ctx.Pipe(duplex=False)
        rank_load = replace(load, device=settings.device_of(rank))
        proc = ctx.Process(
            target=spawned_worker,
            args=(rank, settings, rank_load, init_method, kv_bytes, child),
            name=f"sagellm-tp-rank{rank}",
            daemon=True,
        )
        proc.start()
        child.close()
        yield proc, parent


def set_threads(n: int) -> None:
    """Set torch's intra-op thread count of this process."""
    import torch

    torch.set_num_threads(n)
