"""Tensor parallelism for the HF engines on torch.distributed (gloo on CPU, NCCL on CUDA).

One engine runs over ``tensor_parallel_size`` processes (ranks). Rank 0 is the engine the
user created: it owns the scheduler and the async API. Every rank holds one shard of the
model (:mod:`sagellm_backend.engine.hf._tp_shard`: attention heads and MLP split column /
row-wise as transformers' ``tp_plan`` splits them) and a KV pool holding only its heads.

Launch, two ways (:class:`TensorParallelGroup`):

* **spawn** (default, one machine): ``start()`` spawns ranks ``1..N-1`` with
  ``torch.multiprocessing`` (spawn context). They load the model while rank 0 does,
  rendezvous with it on a free localhost port and serve until ``stop()``.
* **torchrun** (one or more machines): when ``WORLD_SIZE`` is set in the environment
  (``torchrun`` sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``/
  ``LOCAL_RANK``), every process creates the same engine and calls ``start()``; rank 0
  serves, and on ranks > 0 ``start()`` runs the worker loop and never returns to user code:
  the process exits (``SystemExit(0)``) when rank 0 stops.

Every step, :class:`TensorParallelRunner` (rank 0's runner, wrapping its local runner)
broadcasts the step plan -- per chunk: sequence number, start position, token ids, block
table, need_logits; plus sequences released since the last step -- as two int64 tensors on
a gloo control group; every rank runs the same chunks through its local runner (its
row-parallel layers all-reduce on the data group: gloo on CPU, NCCL on CUDA); rank 0 gets
the logits and its scheduler samples. A one-integer status all-reduce closes each step, so
a step that failed on one rank only is detected.

Faults: every collective has a timeout (``distributed_timeout_s``); a worker that dies
(its process exits, or its connection closes) or hangs (a collective times out) marks the
group broken: the step in flight fails, so the scheduler ends every request in flight with
an UNAVAILABLE error naming the rank; later steps fail at once; ``healthy`` turns False
(the engine's ``health_check()`` reads it). ``shutdown()`` returns within about 3 s and
leaves no worker process behind (spawned workers are terminated, then killed).

Invariants:
    * Every rank issues the same collectives in the same order: control messages only
      under :attr:`TensorParallelRunner._lock`, data all-reduces only inside a step.
    * Idle ranks stay connected: rank 0 sends a keep-alive message when no step ran for
      a quarter of the timeout, so an idle engine never trips the workers' timeout.
    * Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sagellm_backend.engine.runners.base import SeqChunk
from sagellm_backend.errors import BackendNotAvailableError, ConfigError

if TYPE_CHECKING:
    import torch

    from sagellm_backend.engine.hf._tp_shard import CommStats
    from sagellm_backend.engine.hf.core import EngineOptions, LoadSettings
    from sagellm_backend.engine.runners.base import ModelRunner
    from sagellm_backend.kv.manager import KVCacheManager

__all__ = [
    "DISTRIBUTED_BACKENDS",
    "LOCAL_RUNNERS",
    "TPSettings",
    "TensorParallelGroup",
    "TensorParallelRunner",
    "check_tp_fields",
    "model_geometry",
    "resolve_backend",
    "valid_tp_sizes",
]

_log = logging.getLogger(__name__)

#: Values of the ``distributed_backend`` config field.
DISTRIBUTED_BACKENDS = ("auto", "gloo", "nccl")

# Control message kinds (first element of the header).
_STEP, _NOOP, _SHUTDOWN = 1, 2, 3
_HEADER_LEN = 6  # kind, n_chunks, n_tokens, n_table, n_released, reset
_CHUNK_FIELDS = 5  # seq number, start, n_tokens, n_table, need_logits
_SHUTDOWN_WAIT_S = 2.0


# ---------------------------------------------------------------------------- config
def resolve_backend(backend: str, device_type: str) -> str:
    """``"auto"`` -> ``"nccl"`` on cuda, ``"gloo"`` on cpu; others as given (validated).

    Raises:
        ConfigError: an unknown backend, or nccl for a cpu engine.
    """
    if backend not in DISTRIBUTED_BACKENDS:
        raise ConfigError(
            f"distributed_backend must be one of {DISTRIBUTED_BACKENDS}, got {backend!r}"
        )
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise ConfigError(
            f"distributed_backend='nccl' needs CUDA devices; a {device_type} engine uses 'gloo' "
            "(or 'auto')"
        )
    return backend


def valid_tp_sizes(geometry: dict[str, int], max_size: int | None = None) -> list[int]:
    """Sizes that divide the heads, the kv heads and the MLP width (at most ``max_size``)."""
    g = 0
    for value in geometry.values():
        g = math.gcd(g, int(value))
    sizes = [n for n in range(1, max(g, 1) + 1) if g % n == 0] if g else [1]
    return [n for n in sizes if max_size is None or n <= max_size]


def _local_config(model_path: str) -> dict[str, Any] | None:
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    text = data.get("text_config")
    return text if isinstance(text, dict) else data


def model_geometry(config: Any) -> dict[str, int]:
    """Head and MLP counts a tensor-parallel size must divide (HF config object or dict).

    Returns ``{"num_attention_heads", "num_key_value_heads", "intermediate_size"}`` (GPT-2
    names ``n_head`` / ``n_inner`` / ``n_embd`` understood; no kv heads: the heads; no MLP
    width: ``4 * hidden``).
    """

    def get(*names: str) -> Any:
        for key in names:
            val = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
            if val is not None:
                return val
        return None

    heads = int(get("num_attention_heads", "n_head") or 0)
    kv = int(get("num_key_value_heads") or heads)
    hidden = int(get("hidden_size", "n_embd") or 0)
    inter = get("intermediate_size", "n_inner")
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": int(inter) if inter else 4 * hidden,
    }


def _cuda_device_count() -> int:
    """Visible CUDA devices, asked through the cuda provider module (0 without CUDA)."""
    from sagellm_backend.providers.cuda import unavailable_reason

    count = 0
    while count < 1024 and unavailable_reason(count) is None:
        count += 1
    return count


def check_tp_fields(owner: str, config: Any, device_type: str) -> None:
    """Validate ``tensor_parallel_size`` / ``distributed_backend`` / ``distributed_timeout_s``.

    A size that does not divide the model's heads, kv heads and MLP width (read from
    ``config.json`` when ``model_path`` is a local directory; otherwise checked at
    ``start()``), more ranks than visible CUDA devices (spawn launch), a size that
    disagrees with torchrun's ``WORLD_SIZE``, or quantised weights are refused.

    Raises:
        ConfigError: naming the field, the bad value and the valid values.
    """
    size = getattr(config, "tensor_parallel_size", 1)
    backend = getattr(config, "distributed_backend", "auto")
    timeout = getattr(config, "distributed_timeout_s", 60.0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"{owner}.tensor_parallel_size must be an integer >= 1, got {size!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ConfigError(f"{owner}.distributed_timeout_s must be a number > 0, got {timeout!r}")
    try:
        resolve_backend(backend, device_type)
    except ConfigError as exc:
        raise ConfigError(f"{owner}.{exc}") from None
    if size == 1 or getattr(config, "mock_mode", False):
        return
    env_world = os.environ.get("WORLD_SIZE")
    if env_world and env_world.isdigit() and int(env_world) > 1 and int(env_world) != size:
        raise ConfigError(
            f"{owner}.tensor_parallel_size={size} but torchrun set WORLD_SIZE={env_world}; "
            f"valid value here: {env_world}"
        )
    if getattr(config, "load_in_8bit", False) or getattr(config, "load_in_4bit", False):
        raise ConfigError(
            f"{owner}.tensor_parallel_size={size} cannot shard quantised (8/4-bit) weights; "
            "valid: tensor_parallel_size=1 with quantisation, or no quantisation"
        )
    max_size = None
    if device_type == "cuda" and not env_world:
        count = _cuda_device_count()
        device = str(getattr(config, "device", "cuda") or "cuda")
        first = int(device.split(":")[1]) if ":" in device else 0
        max_size = max(count - first, 0)
        if size > max_size:
            raise ConfigError(
                f"{owner}.tensor_parallel_size={size} needs {size} CUDA devices from "
                f"{device}, {max_size} are visible; valid values: "
                f"{[n for n in range(1, max_size + 1)] or 'none (no CUDA device)'}"
            )
    model_path = getattr(config, "model_path", None)
    local = _local_config(model_path) if isinstance(model_path, str) else None
    if local is not None:
        geo = model_geometry(local)
        valid = valid_tp_sizes(geo, max_size)
        if size not in valid:
            raise ConfigError(
                f"{owner}.tensor_parallel_size={size} does not divide the model's "
                f"{geo['num_attention_heads']} attention heads, {geo['num_key_value_heads']} "
                f"kv heads and MLP width {geo['intermediate_size']}; valid values: {valid}"
            )


@dataclass(frozen=True)
class TPSettings:
    """How a tensor-parallel group is launched (picklable; sent to spawned workers).

    Attributes:
        size: ranks in the group.
        backend: ``"gloo"`` or ``"nccl"`` (resolved).
        timeout_s: timeout of every collective and of the rendezvous.
        device_type: ``"cpu"`` or ``"cuda"``.
        first_device: CUDA index of rank 0 (rank ``r`` uses ``first_device + r``).
        threads: torch intra-op threads per rank on CPU (None: cores / size).
        torchrun: the group comes from torchrun's environment (not spawned).
    """

    size: int
    backend: str
    timeout_s: float
    device_type: str
    first_device: int = 0
    threads: int | None = None
    torchrun: bool = False

    def device_of(self, rank: int) -> str:
        """Torch device string of ``rank`` (its LOCAL_RANK under torchrun)."""
        if self.device_type != "cuda":
            return "cpu"
        if self.torchrun:
            return f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        return f"cuda:{self.first_device + rank}"

    def cpu_threads(self) -> int:
        """Threads each rank's torch uses on CPU."""
        if self.threads is not None:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.size)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------- plan wire format
def _encode(
    chunks: Sequence[SeqChunk], seq_num: Callable[[str], int], released: list[int], reset: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    meta: list[int] = []
    tokens: list[int] = []
    tables: list[int] = []
    for c in chunks:
        meta += [
            seq_num(c.seq_id),
            c.start,
            len(c.token_ids),
            len(c.block_table),
            int(c.need_logits),
        ]
        tokens += c.token_ids
        tables += c.block_table
    header = torch.tensor(
        [_STEP, len(chunks), len(tokens), len(tables), len(released), int(reset)], dtype=torch.long
    )
    payload = torch.tensor(meta + tokens + tables + released, dtype=torch.long)
    return header, payload


def _decode(header: list[int], payload: torch.Tensor) -> tuple[list[SeqChunk], list[int]]:
    _, n, n_tok, n_tab, n_rel, _ = header
    values: list[int] = payload.tolist()
    meta = values[: n * _CHUNK_FIELDS]
    tokens = values[n * _CHUNK_FIELDS : n * _CHUNK_FIELDS + n_tok]
    tables = values[n * _CHUNK_FIELDS + n_tok : n * _CHUNK_FIELDS + n_tok + n_tab]
    released = values[len(values) - n_rel :] if n_rel else []
    chunks: list[SeqChunk] = []
    ti = bi = 0
    for i in range(n):
        seq, start, nt, nb, _need = meta[i * _CHUNK_FIELDS : (i + 1) * _CHUNK_FIELDS]
        # Workers never sample: no logits needed (skips the LM head).
        chunks.append(SeqChunk(str(seq), tokens[ti : ti + nt], start, tables[bi : bi + nb], False))
        ti += nt
        bi += nb
    return chunks, released


# ---------------------------------------------------------------------------- local runners
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
def _make_provider(settings: TPSettings, rank: int, kv_bytes: int | None) -> Any:
    if settings.device_type == "cuda":
        from sagellm_backend.providers.cuda import create_cuda_backend

        options: dict[str, Any] = {"device": settings.device_of(rank)}
        if kv_bytes:
            options["kv_memory_bytes"] = kv_bytes
        return create_cuda_backend(options)
    from sagellm_backend.providers.cpu import CPUBackendProvider

    return CPUBackendProvider(kv_memory_bytes=kv_bytes) if kv_bytes else CPUBackendProvider()


def _rank_report(rank: int, provider: Any, kv: Any, shard: Any) -> dict[str, Any]:
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


def _serve(model: Any, provider: Any, settings: TPSettings, rank: int) -> None:
    """Worker loop of rank ``rank`` > 0 (the group is initialised): until SHUTDOWN."""
    import torch
    import torch.distributed as dist

    from sagellm_backend.capability import DType
    from sagellm_backend.engine.hf._tp_shard import CommStats, shard_model, timed_all_reduce
    from sagellm_backend.errors import KVCacheExhaustedError
    from sagellm_backend.kv.spec import KVSpec

    timeout = _timedelta(settings.timeout_s)
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
    try:
        kv = provider.create_kv_manager(
            spec, num_pages=init["num_pages"], enable_prefix_caching=False
        )
    except KVCacheExhaustedError:  # this provider's budget is smaller than rank 0's pool
        kv_provider = _make_provider(settings, rank, init["num_pages"] * spec.page_bytes)
        kv = kv_provider.create_kv_manager(
            spec, num_pages=init["num_pages"], enable_prefix_caching=False
        )
    runner = LOCAL_RUNNERS[init["runner"]](model, kv, init)
    reducing[0] = True
    dist.gather_object(_rank_report(rank, kv_provider, kv, shard), None, dst=0, group=ctrl)
    header = torch.empty(_HEADER_LEN, dtype=torch.long)
    status = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        while True:
            dist.broadcast(header, src=0, group=ctrl)
            head = header.tolist()
            kind = head[0]
            if kind == _SHUTDOWN:
                return
            if kind == _NOOP:
                continue
            size = head[1] * _CHUNK_FIELDS + head[2] + head[3] + head[4]
            payload = torch.empty(size, dtype=torch.long)
            dist.broadcast(payload, src=0, group=ctrl)
            chunks, released = _decode(head, payload)
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


def _timedelta(seconds: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=seconds)


def _spawned_worker(
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
        provider = _make_provider(settings, rank, kv_bytes)
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
        _serve(model, provider, settings, rank)
    finally:
        with contextlib.suppress(Exception):
            provider.shutdown_distributed()
    # Skip the interpreter teardown (about a second of freeing the model and torch state):
    # nothing of this process outlives it, and stop() waits for it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------- rank 0 side
class TensorParallelGroup:
    """Rank 0's handle on the group: launch, shard, wrap the runner, monitor, shut down.

    Lifecycle: :meth:`launch` (spawn workers, or join torchrun's group), :meth:`shard`
    (this rank's model share), :meth:`start` (rendezvous, pools, the wrapping runner),
    :meth:`shutdown`; :meth:`relaunch_workers` spawns fresh workers after a shutdown (spawn
    only) and the next :meth:`start` connects them.

    Args:
        config: the engine face's config (``tensor_parallel_size``, ``distributed_backend``,
            ``distributed_timeout_s``, ``num_threads``, ``device``).
        load: how rank 0 loads the model; :attr:`load` is the copy every rank uses (one
            device per rank, no device_map).
        options: the engine's tuning options (runner settings sent to workers).
        provider: rank 0's backend provider (it initialises the process group).
        device_type: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(
        self,
        config: Any,
        load: LoadSettings,
        options: EngineOptions,
        provider: Any,
        device_type: str,
    ) -> None:
        size = int(getattr(config, "tensor_parallel_size", 1))
        env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        torchrun = env_world > 1
        first = 0
        device = str(getattr(config, "device", "cpu") or "cpu")
        if device_type == "cuda" and ":" in device:
            first = int(device.split(":")[1])
        self.settings = TPSettings(
            size=size,
            backend=resolve_backend(getattr(config, "distributed_backend", "auto"), device_type),
            timeout_s=float(getattr(config, "distributed_timeout_s", 60.0)),
            device_type=device_type,
            first_device=first,
            threads=getattr(config, "num_threads", None),
            torchrun=torchrun,
        )
        self.rank = int(os.environ.get("RANK", "0")) if torchrun else 0
        if torchrun and self.rank == 0 and device_type == "cuda":
            want = self.settings.device_of(0)
            if device not in (want, "cuda" if want == "cuda:0" else want):
                raise ConfigError(
                    f"under torchrun rank 0 runs on its LOCAL_RANK device {want}; set "
                    f"device={want!r} (got {device!r})"
                )
        self.load = replace(load, device=self.settings.device_of(self.rank), device_map=None)
        self.options = options
        self.provider = provider
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._kv_bytes: int | None = options.kv_cache_memory_bytes
        self._init_method = ""
        self._runner: TensorParallelRunner | None = None
        self._init: dict[str, Any] | None = None
        self.comm: CommStats | None = None
        self.ranks: list[dict[str, Any]] = []
        self._broken: str | None = None
        self._closing = False
        self._running = False
        self._threads: list[threading.Thread] = []
        self._stop_event = threading.Event()
        self.ctrl: Any = None
        self.shard_info: Any = None
        self._reducing = False  # row-parallel layers all-reduce (off until connected)

    # ------------------------------------------------------------------ state
    @property
    def healthy(self) -> bool:
        """The group is up and no rank failed."""
        return self._running and self._broken is None

    @property
    def broken(self) -> str | None:
        """Why the group is unusable (None while it is fine)."""
        return self._broken

    def mark_broken(self, reason: str) -> None:
        """Record the first failure (later ones keep the first reason)."""
        if self._broken is None:
            self._broken = reason
            if not self._closing:
                _log.error("tensor-parallel group broken: %s", reason)

    def worker_pids(self) -> list[int]:
        """Process ids of the spawned workers (empty under torchrun)."""
        return [int(p.pid) for p in self._procs if p.pid is not None]

    def _dead_workers(self) -> str:
        dead = [
            f"rank {i + 1} (pid {p.pid}) exited with code {p.exitcode}"
            for i, p in enumerate(self._procs)
            if p.exitcode is not None
        ]
        return "; ".join(dead)

    def describe_failure(self, exc: BaseException | None = None) -> str:
        """A message naming the failed ranks (or the collective error).

        A collective usually fails (connection reset) a moment before the dead worker's
        exit is visible: wait up to 1 s for it, so the message names the rank.
        """
        dead = self._dead_workers()
        deadline = time.monotonic() + 1.0
        while not dead and self._procs and time.monotonic() < deadline:
            time.sleep(0.05)
            dead = self._dead_workers()
        if dead:
            return f"tensor-parallel worker {dead}"
        if exc is not None:
            return (
                f"a tensor-parallel collective failed or timed out after "
                f"{self.settings.timeout_s:g} s (a rank died or hangs): {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            )
        return "a tensor-parallel rank failed"

    # ------------------------------------------------------------------ launch
    def launch(self) -> None:
        """Spawn ranks 1..N-1 (they start loading at once), or join torchrun's group."""
        self._broken = None
        self._closing = False
        if self.settings.torchrun:
            if self.settings.device_type == "cpu":
                _set_threads(self.settings.cpu_threads())
            elif self.rank > 0:  # this rank's own GPU (cuda:LOCAL_RANK) for NCCL and its KV
                self.provider = _make_provider(self.settings, self.rank, self._kv_bytes)
            self.provider.init_distributed(timeout_s=self.settings.timeout_s)
            return
        import torch.multiprocessing as mp

        if self.settings.device_type == "cpu":
            _set_threads(self.settings.cpu_threads())
        ctx = mp.get_context("spawn")
        self._init_method = f"tcp://127.0.0.1:{_free_port()}"
        kv_bytes = None
        if self._init is not None:  # relaunch: the pool size is known
            kv_bytes = int(self._init["num_pages"] * self._init["page_bytes"])
        for rank in range(1, self.settings.size):
            parent, child = ctx.Pipe(duplex=False)
            load = replace(self.load, device=self.settings.device_of(rank))
            proc = ctx.Process(
                target=_spawned_worker,
                args=(
                    rank,
                    self.settings,
                    load,
                    self._init_method,
                    kv_bytes or self._kv_bytes,
                    child,
                ),
                name=f"sagellm-tp-rank{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)

    def shard(self, model: Any) -> Any:
        """Keep this rank's share of ``model``; under torchrun ranks > 0 serve here, then exit.

        Raises:
            SystemExit: (torchrun, rank > 0) when rank 0 shut the group down.
            ConfigError: the model cannot be sharded at this size (valid sizes named).
        """
        from sagellm_backend.engine.hf._tp_shard import CommStats, shard_model, timed_all_reduce

        if self.settings.torchrun and self.rank > 0:
            try:
                _serve(model, self.provider, self.settings, self.rank)
            finally:
                with contextlib.suppress(Exception):
                    self.provider.shutdown_distributed()
            raise SystemExit(0)
        config = model.config
        geo = model_geometry(
            config.get_text_config() if hasattr(config, "get_text_config") else config
        )
        valid = valid_tp_sizes(geo)
        if self.settings.size not in valid:
            self.shutdown()
            raise ConfigError(
                f"tensor_parallel_size={self.settings.size} does not divide the model's heads / "
                f"kv heads / MLP width {geo}; valid values: {valid}"
            )
        self.comm = CommStats()
        try:
            self.shard_info = shard_model(
                model, 0, self.settings.size, timed_all_reduce(self._all_reduce, self.comm)
            )
        except ValueError as exc:
            self.shutdown()
            raise ConfigError(f"tensor_parallel_size={self.settings.size}: {exc}") from exc
        return model

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        if not self._reducing:  # before the first start: the local runner may probe the model
            return
        if self._broken is not None:
            raise BackendNotAvailableError(self._broken)
        try:
            self.provider.all_reduce(tensor, "sum")
        except Exception as exc:
            self.mark_broken(self.describe_failure(exc))
            raise

    def start(self, local: ModelRunner, kv: KVCacheManager, max_batch_size: int) -> ModelRunner:
        """Rendezvous with the workers, give them the pool geometry; return the TP runner.

        Raises:
            BackendNotAvailableError: a worker failed to load or never joined.
        """
        opts = self.options
        spec = kv.spec
        num_pages = int(kv.stats().num_pages)
        self._init = {
            "runner": local.name,
            "num_pages": num_pages,
            "page_bytes": int(spec.page_bytes),
            "block_size": int(spec.block_size),
            "kv_dtype": spec.dtype.value,
            "max_context": int(getattr(local, "max_context", 0) or 0),
            "prepack_weights": opts.prepack_weights,
            "max_batch_size": max_batch_size,
        }
        if local.name not in LOCAL_RUNNERS:
            raise ConfigError(
                f"runner {local.name!r} has no tensor-parallel worker counterpart; "
                f"valid: {sorted(LOCAL_RUNNERS)}"
            )
        # The new runner (and its step lock) replaces the old one before the keep-alive
        # thread starts: two runners broadcasting on one group would interleave messages.
        runner = TensorParallelRunner(local, self)
        self._runner = runner
        self._connect_or_clean_up(kv)
        return runner

    def _connect_or_clean_up(self, kv: Any) -> None:
        """:meth:`_connect`; on failure no worker outlives it and the error names the rank."""
        try:
            self._connect(kv)
        except BackendNotAvailableError:
            self.shutdown()
            raise
        except Exception as exc:
            time.sleep(0.2)  # let a crashed worker's exit code be seen
            reason = self.describe_failure(exc)
            self.shutdown()
            raise BackendNotAvailableError(f"tensor-parallel start failed: {reason}") from exc

    def _connect(self, kv: Any) -> None:
        import torch.distributed as dist

        if not self.settings.torchrun:
            self._wait_loaded()
            self.provider.init_distributed(
                rank=0,
                world_size=self.settings.size,
                init_method=self._init_method,
                timeout_s=self.settings.timeout_s,
            )
        self.ctrl = dist.new_group(backend="gloo", timeout=_timedelta(self.settings.timeout_s))
        dist.broadcast_object_list([self._init], src=0, group=self.ctrl)
        reports: list[Any] = [None] * self.settings.size
        mine = _rank_report(0, self.provider, kv, self.shard_info)
        dist.gather_object(mine, reports, dst=0, group=self.ctrl)
        self.ranks = [r for r in reports if isinstance(r, dict)]
        self._reducing = True
        self._running = True
        self._stop_event.clear()
        self._threads = [
            threading.Thread(target=self._keepalive, name="sagellm-tp-keepalive", daemon=True)
        ]
        if self._procs:
            self._threads.append(
                threading.Thread(target=self._monitor, name="sagellm-tp-monitor", daemon=True)
            )
        for t in self._threads:
            t.start()

    def _wait_loaded(self) -> None:
        from multiprocessing.connection import wait

        deadline = time.monotonic() + max(self.settings.timeout_s, 300.0)
        pending = dict(zip(self._conns, self._procs, strict=True))
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                self.shutdown()
                raise BackendNotAvailableError(
                    "tensor-parallel workers did not load the model in time"
                )
            ready = set(wait([*pending, *(p.sentinel for p in pending.values())], timeout=left))
            for conn, proc in list(pending.items()):
                if conn not in ready and proc.sentinel not in ready:
                    continue
                try:
                    kind, detail = conn.recv()
                except (EOFError, OSError):
                    proc.join(0.5)
                    kind, detail = "error", f"exited with code {proc.exitcode}"
                if kind != "loaded":
                    rank = self._procs.index(proc) + 1
                    self.shutdown()
                    raise BackendNotAvailableError(
                        f"tensor-parallel worker rank {rank} failed to start: {detail}"
                    )
                conn.close()
                del pending[conn]
        self._conns = []

    # ------------------------------------------------------------------ background
    def _monitor(self) -> None:
        from multiprocessing.connection import wait

        sentinels = [p.sentinel for p in self._procs]
        while not self._stop_event.is_set():
            ready = wait(sentinels, timeout=0.2)
            if ready:
                if self._closing:
                    return
                for proc in self._procs:
                    if proc.sentinel in ready:
                        proc.join(0.5)  # reap it: its exit code goes into the message
                if not self._closing:
                    self.mark_broken(self.describe_failure())
                return

    def _keepalive(self) -> None:
        interval = max(0.05, min(self.settings.timeout_s / 4.0, 5.0))
        while not self._stop_event.wait(interval / 2):
            runner = self._runner
            if runner is None or self._broken is not None:
                continue
            if time.monotonic() - runner.last_message < interval:
                continue
            runner.send_control(_NOOP, blocking=False)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Stop every worker and leave the group (within about 3 s; idempotent)."""
        self._closing = True
        runner = self._runner
        sent = False
        if runner is not None and self._running and self._broken is None:
            sent = runner.send_control(_SHUTDOWN, blocking=False, wait_s=0.5)
        self._stop_event.set()
        for t in self._threads:  # the monitor must not reap a worker while we do
            t.join(0.6)
        self._threads = []
        # Workers told to shut down exit by themselves; any other is stopped at once (a
        # step blocked on a hung rank ends when that rank's connection closes).
        deadline = time.monotonic() + (_SHUTDOWN_WAIT_S if sent else 0.0)
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(0.3)
            if proc.is_alive():
                proc.kill()
                proc.join(0.3)
        for conn in self._conns:
            conn.close()
        for proc in self._procs:
            with contextlib.suppress(Exception):
                proc.close()
        self._procs, self._conns = [], []
        lock_free = runner is None or runner.acquire(1.0)
        try:
            if lock_free:
                with contextlib.suppress(Exception):
                    self.provider.shutdown_distributed()
            else:
                _log.warning("a tensor-parallel step is still running; the group is left as is")
        finally:
            if runner is not None and lock_free:
                runner.release_lock()
        self.ctrl = None
        self._running = False
        self._reducing = False  # a new local runner may probe the model before the next start
        if self._broken is None:
            self._broken = "the tensor-parallel group was shut down"

    def relaunch_workers(self) -> None:
        """Spawn fresh workers after :meth:`shutdown`; :meth:`start` then connects them.

        Raises:
            BackendNotAvailableError: under torchrun (its workers exited with the group).
        """
        if self.settings.torchrun:
            raise BackendNotAvailableError(
                "a torchrun tensor-parallel group cannot be restarted after stop(); restart "
                "the torchrun job"
            )
        self.launch()

    def info(self) -> dict[str, Any]:
        """Group figures for ``get_info()``: size, backend, health, per-rank shares, comm."""
        runner = self._runner
        return {
            "size": self.settings.size,
            "backend": self.settings.backend,
            "launch": "torchrun" if self.settings.torchrun else "spawn",
            "timeout_s": self.settings.timeout_s,
            "healthy": self.healthy,
            "error": None if self.healthy else self._broken,
            "worker_pids": self.worker_pids(),
            "init_method": self._init_method or "env://",
            "ranks": list(self.ranks),
            "stats": runner.stats() if runner is not None else {},
        }


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


class TensorParallelRunner:
    """Rank 0's runner: broadcast the step plan, run the local shard, return its logits.

    Implements :class:`~sagellm_backend.engine.runners.base.ModelRunner` over any local
    runner in :data:`LOCAL_RUNNERS` (its ``name``, ``uses_paged_kv``, ``device`` and
    ``vocab_size`` are passed through).

    Raises (from :meth:`execute`):
        BackendNotAvailableError: the group is broken (a rank died, hung or failed a step).
    """

    def __init__(self, local: ModelRunner, group: TensorParallelGroup) -> None:
        self.local = local
        self.group = group
        self.name = local.name
        self.uses_paged_kv = local.uses_paged_kv
        self.device = local.device
        self.vocab_size = local.vocab_size
        self.max_context = getattr(local, "max_context", 0)
        self._lock = threading.Lock()
        self._seq_nums: dict[str, int] = {}
        self._next = 1
        self._released: list[int] = []
        self._reset = False
        self.last_message = time.monotonic()
        self.steps = 0
        self.step_s = 0.0
        self.plan_s = 0.0

    # ------------------------------------------------------------------ helpers
    def acquire(self, timeout: float) -> bool:
        """Take the step lock (used by shutdown)."""
        return self._lock.acquire(timeout=timeout)

    def release_lock(self) -> None:
        """Give the step lock back."""
        self._lock.release()

    def _seq_num(self, seq_id: str) -> int:
        num = self._seq_nums.get(seq_id)
        if num is None:
            num = self._next
            self._next += 1
            self._seq_nums[seq_id] = num
        return num

    def _fail(self, exc: BaseException | None) -> BackendNotAvailableError:
        self.group.mark_broken(self.group.describe_failure(exc))
        return BackendNotAvailableError(str(self.group.broken))

    def send_control(self, kind: int, *, blocking: bool, wait_s: float = 0.0) -> bool:
        """Broadcast a NOOP / SHUTDOWN message if the step lock is free (False if not sent)."""
        import torch
        import torch.distributed as dist

        if not self._lock.acquire(timeout=wait_s if not blocking else -1):
            return False
        try:
            ctrl = self.group.ctrl
            if ctrl is None or self.group.broken is not None:
                return False
            header = torch.zeros(_HEADER_LEN, dtype=torch.long)
            header[0] = kind
            try:
                dist.broadcast(header, src=0, group=ctrl)
            except Exception as exc:
                self._fail(exc)
                return False
            self.last_message = time.monotonic()
            return True
        finally:
            self._lock.release()

    # ------------------------------------------------------------------ ModelRunner
    def execute(self, chunks: Sequence[SeqChunk]) -> Any:
        """Run one step on every rank; return rank 0's logits (see ModelRunner)."""
        import torch
        import torch.distributed as dist

        with self._lock:
            if self.group.broken is not None:
                raise BackendNotAvailableError(self.group.broken)
            ctrl = self.group.ctrl
            t0 = time.perf_counter()
            released, self._released = self._released, []
            reset, self._reset = self._reset, False
            header, payload = _encode(chunks, self._seq_num, released, reset)
            try:
                dist.broadcast(header, src=0, group=ctrl)
                dist.broadcast(payload, src=0, group=ctrl)
            except Exception as exc:
                raise self._fail(exc) from exc
            t1 = time.perf_counter()
            error: BaseException | None = None
            logits = None
            try:
                logits = self.local.execute(chunks)
            except Exception as exc:
                if self.group.broken is not None:
                    raise BackendNotAvailableError(self.group.broken) from exc
                error = exc
            t2 = time.perf_counter()
            status = torch.tensor([1 if error is not None else 0], dtype=torch.long)
            try:
                dist.all_reduce(status, op=dist.ReduceOp.MAX, group=ctrl)
            except Exception as exc:
                raise self._fail(exc) from exc
            t3 = time.perf_counter()
            self.last_message = time.monotonic()
            self.steps += 1
            self.step_s += t3 - t0
            self.plan_s += (t1 - t0) + (t3 - t2)
            if error is not None:
                raise error
            if int(status.item()):
                raise self._fail(RuntimeError("a worker rank failed the step (see its log)"))
            return logits

    def release(self, seq_id: str) -> None:
        """Forget a sequence here and (with the next message) on every rank."""
        self.local.release(seq_id)
        num = self._seq_nums.pop(seq_id, None)
        if num is not None:
            self._released.append(num)

    def reset(self) -> None:
        """Forget every sequence here and (with the next message) on every rank."""
        self.local.reset()
        self._seq_nums.clear()
        self._released.clear()
        self._reset = True

    def stats(self) -> dict[str, Any]:
        """Steps, step time, and the time spent in communication on rank 0."""
        comm = self.group.comm
        ar_s = comm.seconds if comm is not None else 0.0
        return {
            "steps": self.steps,
            "step_s": self.step_s,
            "plan_s": self.plan_s,
            "all_reduce_s": ar_s,
            "all_reduce_calls": comm.calls if comm is not None else 0,
            "all_reduce_bytes": comm.bytes if comm is not None else 0,
            "comm_share": (self.plan_s + ar_s) / self.step_s if self.step_s > 0 else 0.0,
        }

    def reset_stats(self) -> None:
        """Zero the step and communication counters."""
        self.steps, self.step_s, self.plan_s = 0, 0.0, 0.0
        if self.group.comm is not None:
            self.group.comm.reset()
