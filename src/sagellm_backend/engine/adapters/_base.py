"""Shared base of the third-party engine adapters (see :mod:`sagellm_backend.engine.adapters`).

Invariants:
    * Importing an adapter module imports neither its third-party package nor torch.
    * Constructing an adapter only stores the config; ``start()`` is where the package is
      needed: missing -> :class:`~sagellm_backend.errors.DependencyMissingError` naming the
      pip command; installed -> :class:`~sagellm_backend.errors.CapabilityNotSupportedError`
      (serving through it is not part of this release, as in 0.1.1.2, whose adapters were
      placeholders). ``execute``/``stream`` before a successful ``start()`` raise
      :class:`~sagellm_backend.errors.InvalidStateError`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from typing import ClassVar

from sagellm_protocol import Request, Response

from sagellm_backend.engine.base import BaseEngine, EngineConfig, StreamEvent
from sagellm_backend.errors import (
    CapabilityNotSupportedError,
    DependencyMissingError,
    InvalidStateError,
)

__all__ = ["ThirdPartyAdapter"]


class ThirdPartyAdapter(BaseEngine):
    """A :class:`BaseEngine` face over a third-party engine package.

    Class attributes:
        PACKAGE: import name of the package (``"vllm"``).
        PIP: the command that installs it.
        KIND: the engine kind reported by :meth:`backend_type`.
    """

    PACKAGE: ClassVar[str] = ""
    PIP: ClassVar[str] = ""
    KIND: ClassVar[str] = ""

    def __init__(self, config: EngineConfig) -> None:
        """Store ``config`` (the third-party package is not needed until ``start()``)."""
        super().__init__(config)

    @classmethod
    def backend_type(cls) -> str:
        """Kind of this adapter (``"vllm"`` / ``"lmdeploy"``)."""
        return cls.KIND

    @classmethod
    def is_available(cls) -> bool:
        """Whether the third-party package is importable (checked without importing it)."""
        return importlib.util.find_spec(cls.PACKAGE) is not None

    @classmethod
    def priority(cls) -> int:
        """Never auto-selected."""
        return -1

    def _require_package(self) -> None:
        if not self.is_available():
            raise DependencyMissingError(
                f"{type(self).__name__} needs the '{self.PACKAGE}' package, which is not "
                f"installed: {self.PIP}"
            )

    async def start(self) -> None:
        """Check the package is there; serving through it is not part of this release.

        Raises:
            DependencyMissingError: the package is missing (with the pip command).
            CapabilityNotSupportedError: the package is installed.
        """
        self._require_package()
        raise CapabilityNotSupportedError(
            f"{type(self).__name__}: serving through '{self.PACKAGE}' is not part of "
            "isagellm-backend (0.1.1.2 shipped this adapter as a placeholder); use "
            "CPUEngine, HFCudaEngine or a sagellm.engines plugin"
        )

    async def stop(self) -> None:
        """Nothing runs: a no-op (idempotent)."""
        self._running = False

    async def execute(self, request: Request) -> Response:
        """Not started: raises :class:`InvalidStateError` (after the package check)."""
        self._require_package()
        raise InvalidStateError(f"{type(self).__name__} is not started")

    async def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        """Not started: raises :class:`InvalidStateError` (after the package check)."""
        self._require_package()
        raise InvalidStateError(f"{type(self).__name__} is not started")
        yield  # pragma: no cover - makes this an async generator
