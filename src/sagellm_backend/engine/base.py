"""Engine contract: :class:`BaseEngine` and :class:`EngineConfig` (0.1.1.2 API, kept).

An engine turns protocol :class:`~sagellm_protocol.Request` objects into
:class:`~sagellm_protocol.Response` objects (``execute``) or a stream of
start/delta/end events (``stream``). Invariants every engine keeps:

* ``execute``/``stream`` on a stopped engine raise ``RuntimeError``; a bad *request*
  never raises out of them: it yields a Response/EndEvent with ``finish_reason="error"``
  and a protocol ``Error``, and the engine keeps serving other requests.
* ``stream`` yields exactly one start event, zero or more deltas and exactly one end
  event; the deltas' ``chunk`` strings concatenate to the end event's ``output_text``.
* ``stop()`` ends every request in flight with a terminal result and releases everything
  the engine holds (KV pages, tasks, threads); ``start()`` after ``stop()`` works.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from sagellm_protocol import Request, Response, StreamEventDelta, StreamEventEnd, StreamEventStart

__all__ = ["BaseEngine", "EngineConfig", "StreamEvent"]

StreamEvent: TypeAlias = StreamEventStart | StreamEventDelta | StreamEventEnd


@dataclass
class EngineConfig:
    """Configuration shared by every engine.

    Attributes:
        engine_id: unique, non-empty id reported in every stream event.
        model_path: model to serve (a path or hub id; engines that need none accept None).
        device: device string (``"mock"``, ``"cpu"``, ``"cuda:0"``).
        max_batch_size: most requests that run in one step (``> 0``).
        mock_mode: run without real hardware/models where the engine supports it.
        provider: a :class:`~sagellm_backend.base.BackendProvider` to use (optional).
        metadata: free-form extra settings (e.g. the sagellm-core config it came from).
    """

    engine_id: str
    model_path: str | None = None
    device: str = "mock"
    max_batch_size: int = 32
    mock_mode: bool = False
    provider: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)


class BaseEngine(ABC):
    """Abstract inference engine (see the module docstring for the invariants)."""

    def __init__(self, config: EngineConfig) -> None:
        if not isinstance(config.engine_id, str) or not config.engine_id.strip():
            raise ValueError(
                f"EngineConfig.engine_id must be a non-empty string, got {config.engine_id!r}"
            )
        self._config = config
        self._running = False

    @property
    def config(self) -> EngineConfig:
        """The engine's configuration."""
        return self._config

    @property
    def engine_id(self) -> str:
        """The engine's id (from the config)."""
        return self._config.engine_id

    @property
    def is_running(self) -> bool:
        """True between a successful ``start()`` and ``stop()``."""
        return self._running

    @abstractmethod
    async def start(self) -> None:
        """Load what the engine needs and begin serving."""

    @abstractmethod
    async def stop(self) -> None:
        """Finish every request in flight with a terminal result and release resources."""

    @abstractmethod
    async def execute(self, request: Request) -> Response:
        """Run ``request`` to completion and return its Response."""

    @abstractmethod
    def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        """Run ``request`` and yield start, delta* and end events as tokens are produced."""

    async def health_check(self) -> bool:
        """Return True when the engine is running and able to serve."""
        return self._running

    def get_info(self) -> dict[str, Any]:
        """Describe the engine (id, kind, model, device, running state, mock mode).

        Has every key of 0.1.1.2's ``BaseEngine.get_info`` (``engine_id``, ``model_path``,
        ``device``, ``max_batch_size``, ``is_running``, ``mock_mode``); subclasses add more.
        """
        return {
            "engine_id": self.engine_id,
            "engine_type": type(self).__name__,
            "backend_type": self.backend_type(),
            "model_path": self._config.model_path,
            "device": self._config.device,
            "max_batch_size": self._config.max_batch_size,
            "is_running": self._running,
            "mock_mode": self._config.mock_mode,
        }

    @classmethod
    def is_available(cls) -> bool:
        """Whether this engine can run on this machine (dependencies and hardware)."""
        return True

    @classmethod
    def priority(cls) -> int:
        """Auto-selection priority; higher wins among available engines."""
        return 0

    @classmethod
    @abstractmethod
    def backend_type(cls) -> str:
        """The kind this engine serves (``"mock"``, ``"cpu"``, ``"cuda"``, ...)."""
