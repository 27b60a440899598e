"""Exception types of sagellm-backend, each tied to a protocol :class:`ErrorCode`.

Every exception raised on purpose by this library derives from :class:`BackendError` and
carries a protocol ``code`` so that engines can turn it into a protocol
:class:`~sagellm_protocol.Error` without guessing. Each also subclasses the builtin type
that 0.1.1.2 raised in the same situation (``ValueError``, ``NotImplementedError``,
``KeyError``, ``RuntimeError``), so ``except ValueError`` in old callers still works.
"""

from __future__ import annotations

from typing import Any

from sagellm_protocol import Error, ErrorCode

__all__ = [
    "BackendError",
    "BackendNotAvailableError",
    "CapabilityNotSupportedError",
    "ConfigError",
    "DependencyMissingError",
    "InvalidKVBlockError",
    "InvalidStateError",
    "KVCacheExhaustedError",
    "KernelAlreadyRegisteredError",
    "KernelNotFoundError",
    "PluginConflictError",
    "PluginLoadError",
    "UnsupportedDTypeError",
    "UnsupportedDeviceError",
    "to_protocol_error",
]


class BackendError(Exception):
    """Base class of every error this library raises on purpose.

    Attributes:
        code: the protocol error code callers should report.
        retryable: whether retrying the same call later may succeed.
    """

    code: ErrorCode = ErrorCode.UNAVAILABLE
    retryable: bool = False

    def __init_subclass__(
        cls, *, code: ErrorCode | None = None, retryable: bool | None = None, **kwargs: Any
    ) -> None:
        """Set a subclass's ``code`` / ``retryable`` from its class keywords, where given.

        ``class ConfigError(BackendError, ValueError, code=ErrorCode.INVALID_ARGUMENT)`` is
        the same as assigning ``code`` in the class body; an omitted keyword leaves the
        attribute inherited (or as the body assigns it).

        Args:
            code: the subclass's protocol error code (None: unchanged).
            retryable: whether retrying may succeed (None: unchanged).
            **kwargs: passed on to the next ``__init_subclass__``.
        """
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
        if retryable is not None:
            cls.retryable = retryable

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()

    def to_protocol(self) -> Error:
        """Return this error as a protocol :class:`~sagellm_protocol.Error`."""
        return Error(code=self.code, message=str(self), retryable=self.retryable)


class ConfigError(BackendError, ValueError, code=ErrorCode.INVALID_ARGUMENT):
    """A configuration value is invalid (INVALID_ARGUMENT); the message names the field."""


class UnsupportedDTypeError(BackendError, ValueError, code=ErrorCode.INVALID_ARGUMENT):
    """A dtype the provider does not advertise was requested (INVALID_ARGUMENT)."""


class CapabilityNotSupportedError(
    BackendError, NotImplementedError, code=ErrorCode.NOT_IMPLEMENTED
):
    """An operation the capability matrix says is unsupported was called (NOT_IMPLEMENTED)."""


class KernelNotFoundError(BackendError, KeyError, code=ErrorCode.NOT_IMPLEMENTED):
    """No kernel is registered under the requested name (NOT_IMPLEMENTED)."""


class KernelAlreadyRegisteredError(BackendError, ValueError, code=ErrorCode.INVALID_ARGUMENT):
    """A kernel name is registered twice without ``replace=True`` (INVALID_ARGUMENT)."""


class KVCacheExhaustedError(
    BackendError, MemoryError, code=ErrorCode.RESOURCE_EXHAUSTED, retryable=True
):
    """Not enough free KV pages even after evicting every evictable page.

    The pool state is unchanged when this is raised (RESOURCE_EXHAUSTED, retryable).
    """


class InvalidKVBlockError(BackendError, ValueError, code=ErrorCode.INVALID_ARGUMENT):
    """Double free, use after free, or a block from another provider (INVALID_ARGUMENT)."""


class UnsupportedDeviceError(BackendError, ValueError, code=ErrorCode.INVALID_ARGUMENT):
    """A device string the provider cannot use, e.g. a KV migrate target (INVALID_ARGUMENT).

    The message lists the valid devices.
    """


class InvalidStateError(BackendError, RuntimeError, code=ErrorCode.INVALID_ARGUMENT):
    """The object is not in a state that allows the call (INVALID_ARGUMENT).

    For example resetting a KV pool while pages are in use, or timing an event that was
    never recorded.
    """


class BackendNotAvailableError(BackendError, RuntimeError, code=ErrorCode.UNAVAILABLE):
    """The requested backend cannot run on this machine (UNAVAILABLE)."""


class DependencyMissingError(BackendError, ImportError, code=ErrorCode.UNAVAILABLE):
    """An optional dependency is missing; the message holds the pip command (UNAVAILABLE)."""


class PluginLoadError(BackendError, RuntimeError, code=ErrorCode.UNAVAILABLE):
    """An entry point failed to import or its factory raised (UNAVAILABLE).

    Attributes:
        group: the entry-point group.
        name: the entry-point name (the backend or engine kind).
    """

    def __init__(self, message: str, *, group: str = "", name: str = "") -> None:
        super().__init__(message)
        self.group = group
        self.name = name


class PluginConflictError(BackendError, RuntimeError, code=ErrorCode.UNAVAILABLE):
    """Two distributions register the same kind in one entry-point group (UNAVAILABLE)."""


def to_protocol_error(exc: BaseException) -> Error:
    """Map any exception to a protocol :class:`~sagellm_protocol.Error`.

    :class:`BackendError` keeps its own code; builtin ``ValueError``/``TypeError``/
    ``KeyError`` map to INVALID_ARGUMENT, ``MemoryError`` to RESOURCE_EXHAUSTED,
    ``NotImplementedError`` to NOT_IMPLEMENTED, ``TimeoutError`` to DEADLINE_EXCEEDED and
    anything else to UNAVAILABLE.
    """
    if isinstance(exc, BackendError):
        return exc.to_protocol()
    message = str(exc) or type(exc).__name__
    if isinstance(exc, NotImplementedError):
        code = ErrorCode.NOT_IMPLEMENTED
    elif isinstance(exc, ValueError | TypeError | KeyError):
        code = ErrorCode.INVALID_ARGUMENT
    elif isinstance(exc, MemoryError):
        code = ErrorCode.RESOURCE_EXHAUSTED
    elif isinstance(exc, TimeoutError):
        code = ErrorCode.DEADLINE_EXCEEDED
    else:
        code = ErrorCode.UNAVAILABLE
    return Error(code=code, message=f"{type(exc).__name__}: {message}", retryable=None)
