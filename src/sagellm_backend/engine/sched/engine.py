"""ScheduledEngine: an engine = scheduler + driver + runner, with one life cycle.

Every engine of this package (MockEngine, CPUEngine, HFCudaEngine) is a
:class:`ScheduledEngine`: a subclass says how to build what it serves with
(:meth:`ScheduledEngine._build_serving` returns a :class:`Serving`: KV manager, scheduler,
runner, tokenizer, limits) and everything else -- start/stop, validation, ``execute``,
``stream``, metrics, error results -- is here, once.

Life cycle (what an engine takes, it gives back):
    * ``start()`` builds the serving set (in a worker thread when ``load_in_thread``) and
      starts the :class:`~sagellm_backend.engine.sched.driver.Driver`. If it fails after the
      KV manager was created, the builder releases it (the provider's budget is whole again).
    * a ``start()`` that is cancelled (``asyncio.wait_for`` timing out) returns at once; the
      build still running in its thread is undone when it ends (its KV manager released) and
      the next ``start()`` waits for that first, so there is never a second concurrent load.
    * ``stop()`` during ``start()`` wins: the start ends with ``BackendNotAvailableError``
      and the engine is stopped, holding nothing.
    * ``stop()`` ends every request in flight with a terminal error result, ends the
      driver's loop and gives the KV manager back to the provider (``release_kv_manager``),
      so another engine on the same provider can take that budget.
    * an engine dropped while running is collected (nothing it started references it); a
      ``ResourceWarning`` names it and its driver stops and releases its KV.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import warnings
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from sagellm_protocol import Error, Request, Response

from sagellm_backend.engine._streaming import delta_event, end_event, prepare_request, start_event
from sagellm_backend.engine.base import BaseEngine, EngineConfig, StreamEvent
from sagellm_backend.engine.sched._off_loop import long_prompt, tokenize_off_loop
from sagellm_backend.engine.sched._results import RequestResults
from sagellm_backend.engine.sched._stop_text import StopTextStream, cut_at_stop
from sagellm_backend.engine.sched.driver import Driver, Handle, in_own_thread, stopped_error
from sagellm_backend.engine.sched.scheduler import SchedSeq, Scheduler
from sagellm_backend.engine.sched.serving import Detokenizer, Serving, undo_serving
from sagellm_backend.errors import BackendNotAvailableError, ConfigError, KVCacheExhaustedError

__all__ = ["Detokenizer", "ScheduledEngine", "Serving"]

_log = logging.getLogger(__name__)
_STOP_JOIN_S = 1.5

# Response's own pydantic-core validator (the one ``Response(**kw)`` runs), called directly.
_validate_response = Response.__pydantic_validator__.validate_python


def _engine_lost(driver: Driver, name: str) -> None:
    """Finalizer of a running engine that was collected without ``stop()``."""
    warnings.warn(
        f"{name} was never stopped; its scheduler is stopped and its KV released now",
        ResourceWarning,
        stacklevel=2,
    )
    driver.abandon()


class ScheduledEngine(BaseEngine):
    """Base of every engine here (see the module docstring).

    Subclasses implement :meth:`backend_type` and :meth:`_build_serving`; they may set
    :attr:`load_in_thread` and override :meth:`_describe`.
    """

    #: Build the serving set in a worker thread (model loading).
    load_in_thread = False
    #: After ``stop()``, :attr:`kv_manager` still shows the last (released, empty) manager.
    kv_visible_after_stop = False

    def __init__(self, config: EngineConfig, *, component_trace: list[str]) -> None:
        super().__init__(config)
        self._provider: Any = config.provider
        self._serving: Serving | None = None
        self._driver: Driver | None = None
        self._zombie: Driver | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._handles: dict[str, Handle] = {}
        #: metrics and early error results; its ``trace`` is the component trace reported
        self._results = RequestResults(component_trace)
        #: requests received by execute/stream while running, rejected ones included; never
        #: reset (0.1.1.2's MockEngine ``request_count``)
        self._received = 0
        self._counter = itertools.count(1)
        self._warned: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_lock: asyncio.Lock | None = None
        self._pending_build: asyncio.Future[Serving] | None = None
        #: stop() calls so far: a start() during which one came (while it waited for another
        #: start() or while it built) does not start
        self._stop_calls = 0
        self._starting = False
        self._start_done: asyncio.Event | None = None
        #: set while a stop() tears the engine down (other stop() and start() calls wait)
        self._stop_done: asyncio.Event | None = None
        self._last_kv: Any = None
        self._last_runner: Any = None

    # ------------------------------------------------------------------ hooks
    def _build_serving(self) -> Serving:
        """Create KV manager, runner and scheduler (release what was taken if it fails)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ properties
    @property
    def provider(self) -> Any:
        """The backend provider (None before the first start when not injected)."""
        return self._provider

    @property
    def kv_manager(self) -> Any:
        """The KV cache manager while running (None before start).

        After ``stop()``: the last (released, empty) manager when
        :attr:`kv_visible_after_stop`, else None.
        """
        if self._serving is not None:
            return self._serving.scheduler.kv
        return self._last_kv if self.kv_visible_after_stop else None

    @property
    def _runner(self) -> Any:
        """The runner while running, else the last one (tests patch its ``execute``)."""
        return self._serving.runner if self._serving is not None else self._last_runner

    @property
    def _scheduler(self) -> Scheduler | None:
        return None if self._serving is None else self._serving.scheduler

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Build the serving set and start the driver (see the module docstring).

        Idempotent, as in 0.1.1.2: on a running engine it returns at once; a call made while
        another ``start()`` is in progress waits for it, then returns (or, when that one
        failed, starts the engine itself).

        Raises:
            BackendNotAvailableError: ``stop()`` was called while starting (also while this
                call waited for another ``start()``: the stop wins, nothing is started).
            ConfigError / DependencyMissingError / KVCacheExhaustedError: from building.
        """
        if self._running:
            return
        stops = self._stop_calls
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._running:
                return
            if self._stop_calls != stops:
                raise BackendNotAvailableError(
                    f"{type(self).__name__} {self.engine_id!r}: stop() was called while this "
                    "start() waited for another; the engine is stopped"
                )
            stopping = self._stop_done
            if stopping is not None:  # a stop() called before this start() is tearing down
                await asyncio.shield(stopping.wait())
            await self._settle()
            self._starting = True
            self._start_done = asyncio.Event()
            try:
                serving = await self._build()
                if self._stop_calls != stops:
                    undo_serving(serving)
                    raise BackendNotAvailableError(
                        f"{type(self).__name__} {self.engine_id!r}: stop() was called during "
                        "start(); the engine is stopped"
                    )
                self._launch(serving)
            finally:
                self._starting = False
                self._start_done.set()

    async def _settle(self) -> None:
        """Wait for what an earlier start/stop left running (never twice at once)."""
        zombie, self._zombie = self._zombie, None
        if zombie is not None:  # a step outlived the last stop(): wait for it now
            await asyncio.shield(asyncio.to_thread(zombie.join))
        pending = self._pending_build
        if pending is not None:
            await asyncio.shield(asyncio.wait([pending]))
            self._pending_build = None

    async def _build(self) -> Serving:
        if not self.load_in_thread:
            return self._build_serving()
        build = in_own_thread(self._build_serving, f"sagellm-load-{self.engine_id}")
        try:
            return await asyncio.shield(build)
        except asyncio.CancelledError:
            # The load goes on in its thread: undo it when it ends; the next start waits.
            self._pending_build = build

            def undo_when_done(fut: asyncio.Future[Serving]) -> None:
                if not fut.cancelled() and fut.exception() is None:
                    undo_serving(fut.result())

            build.add_done_callback(undo_when_done)
            raise

    def _launch(self, serving: Serving) -> None:
        loop = asyncio.get_running_loop()
        name = f"{type(self).__name__}[{self.engine_id}]"
        driver = Driver(
            serving.scheduler,
            serving.runner,
            name=name,
            threaded=serving.threaded,
            thread_init=serving.thread_init,
            thread_context=serving.thread_context,
            on_exit=serving.release,
        )
        driver.start(loop)
        self._serving = serving
        self._driver = driver
        self._loop = loop
        self._finalizer = weakref.finalize(self, _engine_lost, driver, name)
        self._running = True

    async def stop(self) -> None:
        """End every request in flight (terminal error result), stop, give KV back.

        Returns within about 2 s; when a step is still running then, the KV manager is
        released as soon as it ends (and the next ``start()`` waits for it). A ``stop()``
        called while another tears the engine down returns when that one has finished; a
        ``start()`` called meanwhile waits for it too, then starts the engine anew.
        """
        self._stop_calls += 1
        if self._starting:
            done = self._start_done
            if done is not None:
                await asyncio.shield(done.wait())
        stopping = self._stop_done
        if stopping is not None:
            await asyncio.shield(stopping.wait())
            return
        if not self._running:
            return
        self._stop_done = asyncio.Event()
        try:
            await self._tear_down()
        finally:
            done, self._stop_done = self._stop_done, None
            done.set()

    async def _tear_down(self) -> None:
        """The work of :meth:`stop` (one at a time)."""
        self._running = False
        driver, self._driver = self._driver, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        serving = self._serving
        if driver is not None:
            joined = await driver.stop(_STOP_JOIN_S)
            if not joined:
                self._zombie = driver
                error = stopped_error(f"{type(self).__name__} {self.engine_id!r}")
                for handle in list(self._handles.values()):
                    seq = handle.seq
                    if not seq.finished:
                        seq.finish_reason, seq.error = "error", error
                    handle.finish()
                if serving is not None and serving.interrupt is not None:
                    await asyncio.to_thread(serving.interrupt)
        if serving is not None:
            self._results.note_kv_peak(serving.scheduler.kv)
            self._last_kv = serving.scheduler.kv
            self._last_runner = serving.runner
        self._serving = None
        del serving
        await asyncio.sleep(0)

    async def health_check(self) -> bool:
        """True when running and the step loop is alive."""
        return self._running and self._driver is not None and self._driver.is_alive

    # ------------------------------------------------------------------ info
    def get_info(self) -> dict[str, Any]:
        """Engine description plus scheduler counters and KV figures.

        ``request_count``: requests received by ``execute`` / ``stream`` while running
        (rejected ones included) since the engine was created, as in 0.1.1.2's MockEngine.
        """
        info = super().get_info()
        info["request_count"] = self._received
        sched = self._scheduler
        if sched is not None:
            stats = sched.stats()
            info["scheduler"] = dataclasses.asdict(stats)
            info.update(
                steps=stats.steps,
                waiting=stats.waiting,
                running=stats.running,
                completed=stats.completed,
                failed=stats.failed + self._results.early_failed,
                cancelled=stats.cancelled,
            )
            kv = sched.kv.stats()
            is_dc = dataclasses.is_dataclass(kv) and not isinstance(kv, type)
            info["kv"] = dataclasses.asdict(kv) if is_dc else kv
        return info

    # ------------------------------------------------------------------ requests
    async def execute(self, request: Request) -> Response:
        """Run ``request`` to completion (a bad request -> ``finish_reason="error"``).

        Raises:
            RuntimeError: the engine is not running (or called from another event loop).
        """
        tokenize, overtaken = await self._tokenize_first(request)
        if overtaken:  # stop() came while the prompt was tokenized
            return self._stopped_result(request)
        handle, early = self._submit(request, streaming=False, tokenize=tokenize)
        if handle is None:
            assert early is not None
            return early
        try:
            if not handle.finished:
                await handle.finished_future()
        except asyncio.CancelledError:
            self._cancel(handle)
            raise
        seq = handle.seq
        seq.user = None  # no cycle left between the sequence and its handle
        self._handles.pop(seq.seq_id, None)
        serving = self._serving
        ids = seq.output_ids
        text = ""
        if ids and serving is not None:
            detok = serving.new_detok()
            text = detok.add(ids) + detok.flush()
            if seq.stop_strings:
                text = cut_at_stop(text, seq.stop_strings)
        response: Response = _validate_response(
            {
                "request_id": request.request_id,
                "trace_id": request.trace_id,
                "output_text": text,
                "output_tokens": ids,
                "finish_reason": seq.finish_reason,
                "metrics": self._results.metrics(seq, self._memory_provider()),
                "error": seq.error,
            }
        )
        return response

    def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        """Yield start, deltas and end for ``request`` (see :mod:`engine.base` invariants).

        Raises:
            RuntimeError: (on first iteration) the engine is not running.
        """
        return self._stream(request)

    async def _stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        eid = self.engine_id
        tokenize, overtaken = await self._tokenize_first(request)
        handle: Handle | None = None
        early: Response | None = None
        if overtaken:  # stop() came while the prompt was tokenized
            early = self._stopped_result(request)
        else:
            handle, early = self._submit(request, streaming=True, tokenize=tokenize)
        if handle is None:
            assert early is not None
            yield start_event(request, eid, None)
            yield end_event(
                request,
                eid,
                output_text="",
                output_tokens=[],
                finish_reason="error",
                metrics=early.metrics,
                error=early.error,
            )
            return
        seq = handle.seq
        serving = self._serving
        assert serving is not None
        detok = serving.new_detok()
        # with stop strings, text that may begin one is held back (the output ends before it)
        stop_text = StopTextStream(seq.stop_strings) if seq.stop_strings else None
        try:
            yield start_event(request, eid, len(seq.prompt_ids))
            texts: list[str] = []
            sent = 0
            while True:
                visible = handle.visible
                if visible > sent:
                    ids = seq.output_ids[sent:visible]
                    sent = visible
                    chunk = detok.add(ids)
                    if stop_text is not None:
                        chunk = stop_text.feed(chunk)
                    texts.append(chunk)
                    yield delta_event(request, eid, chunk, ids)
                    continue
                if handle.finished:
                    seq.user = None  # no cycle left between the sequence and its handle
                    self._handles.pop(seq.seq_id, None)
                    tail = detok.flush()
                    if stop_text is not None:
                        tail = stop_text.end(tail)
                    if tail:
                        texts.append(tail)
                        yield delta_event(request, eid, tail, [])
                    yield end_event(
                        request,
                        eid,
                        output_text="".join(texts),
                        output_tokens=list(seq.output_ids[:sent]),
                        finish_reason=seq.finish_reason or "error",
                        metrics=self._results.metrics(seq, self._memory_provider()),
                        error=seq.error,
                    )
                    return
                await handle.wait_progress()
        finally:
            if not handle.finished:
                self._cancel(handle)

    # ------------------------------------------------------------------ internals
    async def _tokenize_first(
        self, request: Request
    ) -> tuple[Callable[[str], list[int]] | None, bool]:
        """(the tokenize function for :meth:`_submit`, whether ``stop()`` came meanwhile).

        A long prompt on a threaded engine is tokenized in a worker thread first
        (:mod:`._off_loop`); any other gets ``(None, False)`` at once.
        """
        serving = self._serving
        if not self._running or serving is None:
            return None, False  # (not running: _submit says so)
        if not long_prompt(request, threaded=serving.threaded):
            return None, False
        tokenize = await tokenize_off_loop(serving.tokenize, request.prompt)
        return tokenize, not self._running

    def _submit(
        self,
        request: Request,
        *,
        streaming: bool,
        tokenize: Callable[[str], list[int]] | None = None,
    ) -> tuple[Handle | None, Response | None]:
        """Validate and queue; return (handle, None) or (None, an error Response).

        ``tokenize`` replaces the serving set's tokenizer for this request (see
        :meth:`_tokenize_first`).
        """
        driver, serving = self._driver, self._serving
        if not self._running or driver is None or serving is None:
            raise RuntimeError(
                f"{type(self).__name__} {self.engine_id!r} is not running; call start()"
            )
        if not serving.threaded and asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(
                f"{type(self).__name__} {self.engine_id!r} serves the event loop it was "
                "started on; it was called from another loop"
            )
        self._received += 1
        sched = serving.scheduler
        try:
            prep = prepare_request(
                request, serving.limits, tokenize or serving.tokenize, warned=self._warned
            )
            sched.check_fits(len(prep.prompt_ids), prep.max_tokens)
        except (ConfigError, KVCacheExhaustedError) as exc:
            return None, self._error_result(request, exc)
        seq = SchedSeq(
            f"{request.request_id}#{next(self._counter)}",
            prep.prompt_ids,
            prep.max_tokens,
            prep.sampling,
            prep.ignore_eos,
            prep.stop_token_ids,
            prep.stop_strings,
            per_token=streaming,
        )
        handle = Handle(seq, streaming=streaming)
        seq.user = handle
        try:
            driver.submit(seq)
        except RuntimeError as exc:  # the step loop died (see the log)
            unavailable = BackendNotAvailableError(
                f"{type(self).__name__} {self.engine_id!r} cannot serve: {exc}"
            )
            return None, self._error_result(request, unavailable)
        self._handles[seq.seq_id] = handle
        return handle, None

    def _cancel(self, handle: Handle) -> None:
        """The consumer gave up: the driver frees the request at its next step."""
        handle.done = True
        seq = handle.seq
        seq.user = None  # nobody listens any more (and no cycle is left)
        self._handles.pop(seq.seq_id, None)
        driver = self._driver
        if driver is not None and not handle.finished:
            driver.cancel(seq)

    def _stopped_result(self, request: Any) -> Response:
        """The terminal result of a request that ``stop()`` overtook before it was queued."""
        return self._error_result(
            request, stopped_error(f"{type(self).__name__}[{self.engine_id}]")
        )

    def _error_result(self, request: Any, exc: BaseException | Error) -> Response:
        return self._results.error_result(request, exc, self._memory_provider())

    def _memory_provider(self) -> Any:
        """The provider whose ``memory_stats`` the metrics report (default: the engine's)."""
        return self._provider
