"""The driver: runs scheduler steps off the event loop and hands results to consumers.

This is the only module of the engine layer that knows about threads and asyncio. One
:class:`Driver` per started engine runs the step loop

    plan = scheduler.schedule() -> runner.execute(plan.chunks) -> sampler.sample(...)
    -> scheduler.update(...) -> deliver

either in a worker thread (torch runners: model compute never blocks the event loop) or,
for runners that compute nothing heavy (the mock), as a task on the event loop itself,
waiting ``runner.last_step_seconds`` of simulated time per step. Requests enter through
:meth:`Driver.submit` and leave through :class:`Handle`, the consumer side of one request
on the event loop; cancellations go through :meth:`Driver.cancel`.

Invariants:
    * every submitted sequence's handle is finished exactly once (normal end, error,
      cancellation or stop), on the event loop;
    * an exception in a step fails every sequence in flight with UNAVAILABLE (naming the
      exception) and the loop goes on serving;
    * the driver, its thread and its task hold no reference to the engine that owns them, so
      an engine dropped without ``stop()`` is collected; its finalizer (see
      :meth:`Driver.abandon`) stops the loop, and :attr:`Driver.on_exit` -- called once when
      the loop has ended and no sequence holds KV -- gives the KV pool back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from sagellm_protocol import Error, ErrorCode

from sagellm_backend.engine.metrics import now
from sagellm_backend.engine.sched.sampler import Sampler
from sagellm_backend.engine.sched.scheduler import SchedSeq, Scheduler, StepPlan

__all__ = ["Driver", "Handle", "in_own_thread", "stopped_error"]

_log = logging.getLogger(__name__)


def stopped_error(name: str) -> Error:
    """The error of a request that was in flight when its engine stopped."""
    return Error(
        code=ErrorCode.UNAVAILABLE,
        message=f"{name} stopped before the request finished",
        retryable=True,
    )


class Handle:
    """The consumer side of one request (event-loop only).

    Attributes:
        seq: the sequence (its ``output_ids`` only grow).
        visible: how many of ``seq.output_ids`` were delivered so far.
        done: the terminal result was delivered (or the consumer gave up).
    """

    __slots__ = ("_event", "_future", "done", "finished", "loop", "seq", "visible")

    def __init__(self, seq: SchedSeq, *, streaming: bool) -> None:
        self.seq = seq
        self.loop = asyncio.get_running_loop()
        self.visible = 0
        self.done = False
        self.finished = False
        self._future: asyncio.Future[None] | None = None
        self._event: asyncio.Event | None = asyncio.Event() if streaming else None

    def progress(self, visible: int) -> None:
        """New tokens up to ``visible`` are readable."""
        if visible > self.visible:
            self.visible = visible
            if self._event is not None:
                self._event.set()

    def finish(self) -> None:
        """The sequence ended (first call wins)."""
        if self.finished:
            return
        self.finished = True
        self.visible = len(self.seq.output_ids)
        if self._event is not None:
            self._event.set()
        fut = self._future
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait_finished(self) -> None:
        """Until :meth:`finish`."""
        if not self.finished:
            await self.finished_future()

    def finished_future(self) -> asyncio.Future[None]:
        """The future :meth:`finish` resolves (created on first use, on the running loop).

        Awaiting it directly is :meth:`wait_finished` without a coroutine of its own.
        """
        fut = self._future
        if fut is None:
            fut = self._future = asyncio.get_running_loop().create_future()
        return fut

    async def wait_progress(self) -> None:
        """Until new tokens or the finish (streaming handles only)."""
        event = self._event
        assert event is not None
        await event.wait()
        event.clear()


class Driver:
    """Runs one engine's steps (see the module docstring).

    Args:
        scheduler: the scheduler (its KV manager is the engine's).
        runner: the model runner.
        name: engine name used in thread names, logs and error messages.
        threaded: run steps in a worker thread (else as a task on the event loop).
        thread_init: called first in the worker thread.
        thread_context: a context manager factory wrapped around the worker's loop (e.g.
            ``torch.inference_mode``).
        on_exit: called once when the loop has ended and no sequence holds KV.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        runner: Any,
        *,
        name: str,
        threaded: bool,
        thread_init: Callable[[], None] | None = None,
        thread_context: Callable[[], Any] | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.sampler = Sampler()
        self.name = name
        self.threaded = threaded
        self.on_exit = on_exit
        self._thread_init = thread_init
        self._thread_context = thread_context
        # the condition's own lock, taken directly where nobody is notified (cheaper)
        self._mutex = threading.RLock()
        self._lock = threading.Condition(self._mutex)
        self._inbox: list[SchedSeq] = []
        self._streams_seen = False  # set once (under the lock) by the first streaming submit
        self._cancels: list[SchedSeq] = []
        self._stop = False
        self._exited = False
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # the runner's capabilities, wired into the scheduler here (the only place that
        # holds both): its per-sequence state is dropped when pages are freed, and a runner
        # that can run several decode steps per call gets bursts
        scheduler.on_release = runner.release
        scheduler.decode_steps = max(1, int(getattr(runner, "max_decode_steps", 1)))

    # ------------------------------------------------------------------ control
    @property
    def is_alive(self) -> bool:
        """Whether the step loop runs."""
        if self._thread is not None:
            return self._thread.is_alive()
        return self._task is not None and not self._task.done()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the step loop, delivering to ``loop``."""
        self.loop = loop
        if self.threaded:
            self._thread = threading.Thread(
                target=_thread_main, args=(self,), name=f"sagellm-{self.name}", daemon=True
            )
            self._thread.start()
        else:
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run_inline(), name=f"{self.name}.step_loop")
            # also when the task is cancelled before it ever ran
            self._task.add_done_callback(self._task_done)

    def submit(self, seq: SchedSeq) -> None:
        """Queue a sequence (thread-safe).

        Raises:
            RuntimeError: the loop has stopped.
        """
        with self._mutex:
            if self._stop or not self.is_alive:
                raise RuntimeError(f"{self.name} is not serving (its step loop has ended)")
            self._inbox.append(seq)
            if not self._streams_seen and _streaming(seq):
                self._streams_seen = True
            if self.threaded:  # only the worker thread ever waits on the condition
                self._lock.notify()
        if self._wakeup is not None:
            self._wakeup.set()

    def cancel(self, seq: SchedSeq) -> None:
        """Remove a sequence at the next step boundary (thread-safe, idempotent)."""
        with self._lock:
            self._cancels.append(seq)
            self._lock.notify()
        if self._wakeup is not None:
            self._wakeup.set()

    async def stop(self, timeout: float) -> bool:
        """End every sequence (terminal error) and the loop; True when it ended in time."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._task is not None:
            task = self._task
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            return True
        thread = self._thread
        if thread is None:
            self._exit(stopped_error(self.name))
            return True
        await asyncio.to_thread(thread.join, timeout)
        await asyncio.sleep(0)  # let the consumers see the terminal results just posted
        return not thread.is_alive()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._exit(stopped_error(self.name))

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker thread (after :meth:`stop` timed out)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def abandon(self) -> None:
        """The engine was collected while serving: end the loop from any thread."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        task, loop = self._task, self.loop
        if task is not None and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)

    # ------------------------------------------------------------------ delivery
    def _post(self, emitted: list[tuple[SchedSeq, int]], finished: list[SchedSeq]) -> None:
        """Hand results to the consumers (called from the loop that runs the steps)."""
        if not emitted and not finished:
            return
        if not self.threaded:
            _deliver(emitted, finished)
            return
        # Each consumer hears on its own event loop (usually all share one).
        by_loop: dict[Any, tuple[list[tuple[SchedSeq, int]], list[SchedSeq]]] = {}
        for item in emitted:
            handle = item[0].user
            if handle is not None:
                by_loop.setdefault(handle.loop, ([], []))[0].append(item)
        for seq in finished:
            handle = seq.user
            if handle is not None:
                by_loop.setdefault(handle.loop, ([], []))[1].append(seq)
        for loop, (some, done) in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, some, done)
            except RuntimeError:  # that loop is closed: nobody listens there any more
                with self._lock:
                    self._cancels.extend(s for s, _ in some)

    # ------------------------------------------------------------------ one step
    def _drain(self) -> bool:
        """Move new sequences and cancellations into the scheduler; True when stopping."""
        sched = self.scheduler
        with self._lock:
            new, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, []
            stopping = self._stop
        for seq in new:
            sched.add(seq)
        if cancels:
            gone: list[SchedSeq] = []
            error = Error(code=ErrorCode.UNAVAILABLE, message="request cancelled", retryable=True)
            for seq in cancels:
                if sched.abort(seq, error, cancelled=True):
                    gone.append(seq)
            self._post([], gone)
        return stopping

    def _plan(self) -> StepPlan | None:
        plan, failed = self.scheduler.schedule()
        if failed:
            self._post([], failed)
        return plan

    def _finish_step(self, plan: StepPlan, out: Any, t0: float) -> None:
        tokens = self.sampler.sample(out, plan.sample_seqs, plan.special)
        t1 = now()
        done = self.scheduler.update(plan, tokens, t0, t1)
        # Progress matters to streaming consumers only (execute waits for the finish); a
        # driver that never saw a streaming consumer skips the scan.
        emitted = (
            [
                (s, len(s.output_ids))
                for s in plan.sample_seqs
                if s.user is not None and s.user._event is not None and not s.finished
            ]
            if self._streams_seen
            else []
        )
        self._post(emitted, done)

    def _fail_step(self, exc: BaseException) -> None:
        self.scheduler.failed_steps += 1
        _log.error("%s: step failed; failing every request in flight", self.name, exc_info=exc)
        error = Error(
            code=ErrorCode.UNAVAILABLE,
            message=f"{self.name} step failed: {type(exc).__name__}: {exc}",
            retryable=True,
        )
        self._post([], self.scheduler.fail_all(error))
        with contextlib.suppress(Exception):
            self.runner.reset()

    def _exit(self, error: Error) -> None:
        """Fail what is left, then run ``on_exit`` (once)."""
        if self._exited:
            return
        self._exited = True
        with self._lock:
            self._stop = True
            new, self._inbox = self._inbox, []
            self._cancels = []
        for seq in new:
            self.scheduler.add(seq)
        self._post([], self.scheduler.fail_all(error))
        if self.on_exit is not None:
            try:
                self.on_exit()
            except Exception:
                _log.exception("%s: releasing resources failed", self.name)

    # ------------------------------------------------------------------ inline loop
    async def _run_inline(self) -> None:
        wakeup = self._wakeup
        assert wakeup is not None
        sched = self.scheduler
        runner = self.runner
        try:
            while True:
                if self._drain():
                    return
                if not sched.has_work:
                    wakeup.clear()
                    if self._inbox or self._cancels or self._stop:
                        continue
                    await wakeup.wait()
                    continue
                try:
                    plan = self._plan()
                    if plan is None:
                        await asyncio.sleep(0)
                        continue
                    t0 = now()
                    out = runner.execute(plan.chunks)
                    await asyncio.sleep(runner.last_step_seconds)
                    self._finish_step(plan, out, t0)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._fail_step(exc)
        finally:
            self._exit(stopped_error(self.name))

    # ------------------------------------------------------------------ thread loop
    def _run_thread(self) -> None:
        sched = self.scheduler
        runner = self.runner
        lock = self._lock
        while True:
            with lock:
                while not (self._inbox or self._cancels or self._stop or sched.has_work):
                    lock.wait(0.5)
            if self._drain():
                return
            try:
                plan = self._plan()
                if plan is None:
                    with lock:
                        if not (self._inbox or self._cancels or self._stop):
                            lock.wait(0.01)
                    continue
                t0 = now()
                out = runner.execute(plan.chunks)
                self._finish_step(plan, out, t0)
            except Exception as exc:
                self._fail_step(exc)


def _thread_main(driver: Driver) -> None:
    """Worker thread body (a function: the thread references the driver, never the engine)."""
    error = stopped_error(driver.name)
    try:
        if driver._thread_init is not None:
            driver._thread_init()
        ctx = driver._thread_context() if driver._thread_context else contextlib.nullcontext()
        with ctx:
            try:
                driver._run_thread()
            except BaseException as exc:
                _log.exception("%s: scheduler thread crashed", driver.name)
                from sagellm_backend.errors import to_protocol_error

                error = to_protocol_error(exc)
                raise
            finally:
                driver._exit(error)
    except BaseException:
        driver._exit(error)
        raise


def _streaming(seq: SchedSeq) -> bool:
    """Whether a streaming consumer waits on ``seq``'s progress."""
    handle = seq.user
    return handle is not None and handle._event is not None


def _deliver(emitted: list[tuple[SchedSeq, int]], finished: list[SchedSeq]) -> None:
    """On the event loop: wake the consumers of ``emitted`` and ``finished``."""
    for seq, visible in emitted:
        handle = seq.user
        if handle is not None:
            handle.progress(visible)
    for seq in finished:
        handle = seq.user
        if handle is not None:
            handle.finish()


_T = TypeVar("_T")


def in_own_thread(fn: Callable[[], _T], name: str) -> asyncio.Future[_T]:
    """``fn()`` in a new thread; the future is settled once that thread has ended.

    Not the loop's executor, whose threads live on: on CPU a thread that ran torch keeps its
    OpenMP team until it ends, and with two teams alive libgomp stops spin-waiting between
    parallel regions, which made the driver's small ops about 2x slower. So the model loads
    in a thread that ends with the load, and the driver's is the one torch thread left.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        thread.join()  # it has nothing left to do but return
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def main() -> None:
        try:
            outcome: tuple[bool, Any] = (True, fn())
        except BaseException as exc:  # handed to the awaiting coroutine
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle, *outcome)

    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    return future
