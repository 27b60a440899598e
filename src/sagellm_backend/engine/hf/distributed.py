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

Layout: configuration and launch settings are :mod:`~sagellm_backend.engine.hf._tp_config`,
the step-plan wire format :mod:`~sagellm_backend.engine.hf._tp_wire`, the worker side
:mod:`~sagellm_backend.engine.hf._tp_worker`, rank 0's runner
:mod:`~sagellm_backend.engine.hf._tp_runner`; this module holds the group and re-exports.

Invariants:
    * Every rank issues the same collectives in the same order: control messages only
      under :attr:`TensorParallelRunner._lock`, data all-reduces only inside a step.
    * Idle ranks stay connected: rank 0 sends a keep-alive message when no step ran for
      a quarter of the timeout, so an idle engine never trips the workers' timeout.
    * Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from sagellm_backend.engine.hf._tp_config import (
    DISTRIBUTED_BACKENDS,
    TPSettings,
    check_tp_fields,
    model_geometry,
    resolve_backend,
    valid_tp_sizes,
)
from sagellm_backend.engine.hf._tp_runner import TensorParallelRunner
from sagellm_backend.engine.hf._tp_wire import NOOP, SHUTDOWN
from sagellm_backend.engine.hf._tp_worker import (
    LOCAL_RUNNERS,
    make_provider,
    rank_report,
    serve,
    set_threads,
    spawn_workers,
    timeout_delta,
)
from sagellm_backend.engine.runners.base import SeqChunk as SeqChunk  # was importable here
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

_SHUTDOWN_WAIT_S = 2.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        self.settings = TPSettings.from_config(config, device_type)
        torchrun = self.settings.torchrun
        device = str(getattr(config, "device", "cpu") or "cpu")
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
                set_threads(self.settings.cpu_threads())
            elif self.rank > 0:  # this rank's own GPU (cuda:LOCAL_RANK) for NCCL and its KV
                self.provider = make_provider(self.settings, self.rank, self._kv_bytes)
            self.provider.init_distributed(timeout_s=self.settings.timeout_s)
            return
        if self.settings.device_type == "cpu":
            set_threads(self.settings.cpu_threads())
        self._init_method = f"tcp://127.0.0.1:{_free_port()}"
        kv_bytes = None
        if self._init is not None:  # relaunch: the pool size is known
            kv_bytes = int(self._init["num_pages"] * self._init["page_bytes"])
        for proc, conn in spawn_workers(
            self.settings, self.load, self._init_method, kv_bytes or self._kv_bytes
        ):
            self._procs.append(proc)  # at once: shutdown() stops every started worker
            self._conns.append(conn)

    def shard(self, model: Any) -> Any:
        """Keep this rank's share of ``model``; under torchrun ranks > 0 serve here, then exit.

        Raises:
            SystemExit: (torchrun, rank > 0) when rank 0 shut the group down.
            ConfigError: the model cannot be sharded at this size (valid sizes named).
        """
        from sagellm_backend.engine.hf._tp_shard import CommStats, shard_model, timed_all_reduce

        if self.settings.torchrun and self.rank > 0:
            try:
                serve(model, self.provider, self.settings, self.rank)
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
        self.ctrl = dist.new_group(backend="gloo", timeout=timeout_delta(self.settings.timeout_s))
        dist.broadcast_object_list([self._init], src=0, group=self.ctrl)
        reports: list[Any] = [None] * self.settings.size
        mine = rank_report(0, self.provider, kv, self.shard_info)
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
            runner.send_control(NOOP, blocking=False)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Stop every worker and leave the group (within about 3 s; idempotent)."""
        self._closing = True
        runner = self._runner
        sent = False
        if runner is not None and self._running and self._broken is None:
            sent = runner.send_control(SHUTDOWN, blocking=False, wait_s=0.5)
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
