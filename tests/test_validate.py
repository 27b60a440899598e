"""The shared config-field validators (:mod:`sagellm_backend._validate`)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from sagellm_backend._validate import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_text,
    invalid,
    is_int,
)
from sagellm_backend.errors import ConfigError


def test_invalid_phrasing() -> None:
    err = invalid("X.y", "a dict", [1])
    assert isinstance(err, ConfigError)
    assert str(err) == "X.y must be a dict, got [1]"
    assert str(invalid("X.y", "True or False", None, verb="is required and must be")) == (
        "X.y is required and must be True or False, got None"
    )


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None])
def test_is_int_rejects_non_ints(value: Any) -> None:
    assert not is_int(value)


def test_check_int() -> None:
    assert check_int("f", 3) == 3
    assert check_int("f", 0, lo=0) == 0
    assert check_int("f", None, optional=True) is None
    with pytest.raises(ConfigError, match=r"^f must be an integer >= 1, got 0$"):
        check_int("f", 0)
    with pytest.raises(ConfigError, match=r"^f must be an integer >= 2 or None, got True$"):
        check_int("f", True, lo=2, optional=True)
    with pytest.raises(ConfigError, match=r"^f must be positive, got None$"):
        check_int("f", None, valid="positive")


def test_check_number() -> None:
    assert check_number("f", 2, lo=0.0) == 2.0
    assert isinstance(check_number("f", 2, lo=0.0), float)
    with pytest.raises(ConfigError, match=r"^f must be a finite number, got nan$"):
        check_number("f", math.nan, lo=0.0)
    with pytest.raises(ConfigError, match=r"^f must be a finite number, got True$"):
        check_number("f", True)
    with pytest.raises(ConfigError, match=r"^f must be >= 0.0, got -1$"):
        check_number("f", -1, lo=0.0)
    with pytest.raises(ConfigError, match=r"^f must be in \[0.0, 1.0\], got 1.5$"):
        check_number("f", 1.5, lo=0.0, hi=1.0)
    # finite=False: infinities pass the type test; NaN passes the range test (as before)
    assert check_number("f", math.inf, lo=0, finite=False) == math.inf
    assert math.isnan(check_number("f", math.nan, lo=0, finite=False))
    with pytest.raises(ConfigError, match=r"^f must be >= 0 ok, got -2$"):
        check_number("f", -2, lo=0, finite=False, in_range=">= 0 ok")


@pytest.mark.parametrize("value", [0, 1, "yes", None])
def test_check_bool_is_strict(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"^f must be a bool, got "):
        check_bool("f", value)


def test_check_bool_returns_value() -> None:
    assert check_bool("f", False) is False


def test_check_text() -> None:
    assert check_text("f", "a") == "a"
    assert check_text("f", None, optional=True) is None
    assert check_text("f", " ", strip=False) == " "
    with pytest.raises(ConfigError, match=r"^f must be a non-empty string, got ' '$"):
        check_text("f", " ")
    with pytest.raises(ConfigError, match=r"^f must be a path, got 3$"):
        check_text("f", 3, valid="a path")


def test_check_choice() -> None:
    assert check_choice("f", "b", ("a", "b")) == "b"
    with pytest.raises(ConfigError, match=r"^f must be one of \('a', 'b'\), got 'c'$"):
        check_choice("f", "c", ("a", "b"))
