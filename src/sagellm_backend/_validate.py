"""The one validator family for configuration fields (engine configs, factories, providers).

Each ``check_*`` function tests one value and returns it (normalised where it says so), or
raises :class:`~sagellm_backend.errors.ConfigError` built by :func:`invalid`::

    "<field> <verb> <valid>, got <value!r>"

``field`` is the caller's label of the value (``"MockEngineConfig.seed"``,
``"engine config 'device'"``, ``"max_memory_mb"``); ``verb`` defaults to ``"must be"``;
``valid`` says what a valid value looks like. Call sites keep their published wording by
passing ``valid``/``verb``; the logic (what counts as an int, a bool, a finite number, a
non-empty string) lives here once.

:func:`require_instance` is the one spelling of an *argument* type check (a stream given
the wrong event class, a storage given another storage's pages): it raises ``TypeError``
``"<what>, got <type name>"``, each caller keeping its own ``what``.

Invariants:
    * A bool is never an int or a number here (``True`` is not ``1``), and only ``True`` and
      ``False`` are bools (``1``, ``"yes"`` and ``None`` are not).
    * Every ``check_*`` failure is a :class:`~sagellm_backend.errors.ConfigError`; nothing
      else is raised (only :func:`require_instance` raises ``TypeError``).
    * This module imports nothing from ``engine/``, ``providers/`` or torch (any layer may use
      it).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, Literal, TypeGuard, TypeVar, overload

from sagellm_backend.errors import ConfigError

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "check_text",
    "invalid",
    "is_int",
    "require_instance",
]

_T = TypeVar("_T")


def is_int(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def invalid(field: str, valid: str, value: object, *, verb: str = "must be") -> ConfigError:
    """The error for ``value`` at ``field``: ``"<field> <verb> <valid>, got <value!r>"``."""
    return ConfigError(f"{field} {verb} {valid}, got {value!r}")


@overload
def check_int(
    field: str,
    value: object,
    *,
    lo: int = ...,
    optional: Literal[False] = ...,
    valid: str | None = ...,
    verb: str = ...,
) -> int: ...
@overload
def check_int(
    field: str,
    value: object,
    *,
    lo: int = ...,
    optional: Literal[True],
    valid: str | None = ...,
    verb: str = ...,
) -> int | None: ...
def check_int(
    field: str,
    value: object,
    *,
    lo: int = 1,
    optional: bool = False,
    valid: str | None = None,
    verb: str = "must be",
) -> int | None:
    """An int ``>= lo`` (None too when ``optional``).

    Args:
        field: label of the value in the message.
        value: what to check.
        lo: smallest valid value.
        optional: None is valid (and returned).
        valid: the message's description (default ``"an integer >= <lo>"``, with
            ``" or None"`` when ``optional``).
        verb: the message's verb.

    Raises:
        ConfigError: not an int (a bool is not), or below ``lo``.
    """
    if value is None and optional:
        return None
    if not is_int(value) or value < lo:
        text = valid if valid is not None else f"an integer >= {lo}" + (" or None" * optional)
        raise invalid(field, text, value, verb=verb)
    return value


def check_number(
    field: str,
    value: object,
    *,
    lo: float = -math.inf,
    hi: float = math.inf,
    finite: bool = True,
    valid: str = "a finite number",
    in_range: str | None = None,
) -> float:
    """A real number (int or float, not bool) in ``[lo, hi]``, returned as a float.

    Args:
        field: label of the value in the message.
        value: what to check.
        lo: smallest valid value.
        hi: largest valid value.
        finite: NaN and infinities are invalid (otherwise a NaN passes the range test).
        valid: the message's description when ``value`` is not a (finite) number.
        in_range: the message's description when it is out of range (default
            ``">= <lo>"``, or ``"in [<lo>, <hi>]"`` when ``hi`` is finite).

    Raises:
        ConfigError: not a number, not finite (``finite``), or out of range.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (finite and not math.isfinite(value))
    ):
        raise invalid(field, valid, value)
    if value < lo or value > hi:
        if in_range is None:
            in_range = f">= {lo}" if hi == math.inf else f"in [{lo}, {hi}]"
        raise invalid(field, in_range, value)
    return float(value)


def check_bool(field: str, value: object, *, valid: str = "a bool", verb: str = "must be") -> bool:
    """``True`` or ``False`` (strict: ``1``, ``"yes"`` and None are not flags).

    Raises:
        ConfigError: ``value`` is not a bool.
    """
    if not isinstance(value, bool):
        raise invalid(field, valid, value, verb=verb)
    return value


@overload
def check_text(
    field: str,
    value: object,
    *,
    optional: Literal[False] = ...,
    strip: bool = ...,
    valid: str = ...,
) -> str: ...
@overload
def check_text(
    field: str,
    value: object,
    *,
    optional: Literal[True],
    strip: bool = ...,
    valid: str = ...,
) -> str | None: ...
def check_text(
    field: str,
    value: object,
    *,
    optional: bool = False,
    strip: bool = True,
    valid: str = "a non-empty string",
) -> str | None:
    """A non-empty string (None too when ``optional``).

    Args:
        field: label of the value in the message.
        value: what to check.
        optional: None is valid (and returned).
        strip: a string of only whitespace is empty (otherwise only ``""`` is).
        valid: the message's description.

    Raises:
        ConfigError: not a string, or empty.
    """
    if value is None and optional:
        return None
    if not isinstance(value, str) or not (value.strip() if strip else value):
        raise invalid(field, valid, value)
    return value


def check_choice(
    field: str, value: Any, choices: Collection[_T], *, valid: str | None = None
) -> _T:
    """One of ``choices``.

    Raises:
        ConfigError: ``value`` is not among ``choices`` (message: ``"one of <choices>"`` unless
            ``valid`` is given).
    """
    if value not in choices:
        raise invalid(field, valid if valid is not None else f"one of {choices}", value)
    chosen: _T = value
    return chosen


def require_instance(value: object, cls: type[_T], what: str) -> _T:
    """Return ``value`` when it is an instance of ``cls``.

    Args:
        value: the argument to check.
        cls: the class it must be an instance of.
        what: the start of the message, e.g. ``"a CudaStream records CudaEvents"``.

    Returns:
        ``value``, typed as ``cls``.

    Raises:
        TypeError: ``value`` is not a ``cls`` (message ``"<what>, got <type name>"``).
    """
    if not isinstance(value, cls):
        raise TypeError(f"{what}, got {type(value).__name__}")
    return value
