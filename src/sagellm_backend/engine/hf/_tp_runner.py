"""Rank 0's tensor-parallel runner: broadcast the step plan, run the local shard.

Part of :mod:`sagellm_backend.engine.hf.distributed` (which re-exports
:class:`TensorParallelRunner`). Invariant: every control message and every step is sent
under the runner's step lock, so the keep-alive, shutdown and the scheduler's steps never
interleave on the control group.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sagellm_backend.engine.hf._tp_wire import HEADER_LEN, encode_plan
from sagellm_backend.engine.runners.base import SeqChunk
from sagellm_backend.errors import BackendNotAvailableError

if TYPE_CHECKING:
    from sagellm_backend.engine.hf.distributed import TensorParallelGroup
    from sagellm_backend.engine.runners.base import ModelRunner

__all__ = ["TensorParallelRunner"]


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
            header = torch.zeros(HEADER_LEN, dtype=torch.long)
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
            header, payload = encode_plan(chunks, self._seq_num, released, reset)
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
