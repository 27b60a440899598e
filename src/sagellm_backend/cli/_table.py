"""Plain-text terminal output: aligned tables, number formatting and a progress line.

No third-party dependency. Every function here is pure except :class:`Progress`, which
writes to the stream it was given (stderr by the commands).

Invariants:
    * :func:`render_table` pads every cell of a column to the same width; a column whose
      cells (other than ``"-"``) all look numeric is right-aligned, others left-aligned; no
      line has trailing spaces.
    * :class:`Progress` on a TTY keeps to one line (carriage return, at most
      ``width - 1`` characters, refreshed at most every ``min_interval_s``); elsewhere it
      writes a whole line only when the fraction done crosses the next ``step`` or
      ``every_s`` seconds have passed, and always once at :meth:`Progress.close`.
"""

from __future__ import annotations

import math
import re
import shutil
import time
import unicodedata
from collections.abc import Sequence
from typing import TextIO

__all__ = [
    "Progress",
    "fmt_bytes",
    "fmt_count",
    "fmt_float",
    "fmt_ms",
    "fmt_pct",
    "render_table",
    "safe_text",
    "terminal_width",
]

_NUMERIC = re.compile(r"^[-+]?[\d,]*\.?\d+(e[-+]?\d+)?(\s?[%x]|\s?[KMGT]?i?B|\s?ms|\s?s)?$")


def terminal_width(default: int = 100) -> int:
    """Columns of the terminal (``COLUMNS`` / the tty), ``default`` when unknown."""
    return max(40, shutil.get_terminal_size((default, 24)).columns)


def _is_number(cell: str) -> bool:
    return bool(_NUMERIC.match(cell.strip()))


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, indent: int = 0) -> str:
    """Format ``rows`` under ``headers`` as an aligned plain-text table.

    A cell holding newlines spans several physical lines (the other cells of its row are
    blank on the extra lines).

    Args:
        headers: column titles.
        rows: the cells, already formatted as strings; each row has ``len(headers)`` cells.
        indent: spaces before every line.

    Raises:
        ValueError: a row with a different number of cells than ``headers``.
    """
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)!r} has {len(row)} cells, expected {len(headers)}")
    # Expand multi-line cells into physical lines.
    lines_of_rows: list[list[str]] = []
    for row in rows:
        parts = [cell.split("\n") for cell in row]
        height = max(len(p) for p in parts)
        for k in range(height):
            lines_of_rows.append([p[k] if k < len(p) else "" for p in parts])
    widths = [len(h) for h in headers]
    for line_cells in lines_of_rows:
        widths = [max(w, len(c)) for w, c in zip(widths, line_cells, strict=True)]
    right = [
        bool(lines_of_rows)
        and all(_is_number(r[i]) or r[i].strip() in ("-", "") for r in lines_of_rows)
        and any(_is_number(r[i]) for r in lines_of_rows)
        for i in range(len(headers))
    ]
    pad = " " * indent

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        ]
        return (pad + "  ".join(parts)).rstrip()

    out = [line(headers), pad + "  ".join("-" * w for w in widths)]
    out.extend(line(cells) for cells in lines_of_rows)
    return "\n".join(out)


def fmt_float(value: float | None, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals, ``"-"`` for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def fmt_ms(value: float | None) -> str:
    """Milliseconds: 2 decimals below 10 ms, 1 below 1000, none above; ``"-"`` if None."""
    if value is None or math.isnan(value):
        return "-"
    if abs(value) < 10:
        return f"{value:.2f}"
    if abs(value) < 1000:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def fmt_pct(value: float | None, digits: int = 1) -> str:
    """A ratio in [0, 1] as a percentage (``0.25`` -> ``"25.0%"``); ``"-"`` if None."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value * 100:.{digits}f}%"


def fmt_count(value: int | None) -> str:
    """An integer with thousands separators; ``"-"`` if None."""
    return "-" if value is None else f"{value:,}"


def fmt_bytes(value: int | float | None) -> str:
    """Bytes in B/KiB/MiB/GiB/TiB; ``"-"`` if None."""
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def safe_text(text: str) -> str:
    """``text`` with control characters (other than newline and tab) shown as escapes.

    Generated text can contain anything a model emits; escaping keeps it from moving the
    cursor or changing the terminal's state when printed for a human.
    """
    if all(ch in "\n\t" or unicodedata.category(ch) != "Cc" for ch in text):
        return text
    return "".join(
        ch if ch in "\n\t" or unicodedata.category(ch) != "Cc" else f"\\x{ord(ch):02x}"
        for ch in text
    )


class Progress:
    """A progress indicator: one updating line on a TTY, periodic lines otherwise.

    Args:
        total: units of work (> 0), e.g. output tokens expected.
        label: what is running (start of the line).
        stream: where to write (the commands pass stderr).
        enabled: False turns every call into a no-op.
        tty: force TTY (True) or line (False) mode; None asks ``stream.isatty()``.
        min_interval_s: TTY mode: least time between redraws.
        step: line mode: write whenever the fraction done passes another multiple of it.
        every_s: line mode: also write when this long has passed since the last line.
    """

    def __init__(
        self,
        total: int,
        label: str,
        *,
        stream: TextIO,
        enabled: bool = True,
        tty: bool | None = None,
        min_interval_s: float = 0.1,
        step: float = 0.25,
        every_s: float = 10.0,
    ) -> None:
        if total <= 0:
            raise ValueError(f"Progress total must be > 0, got {total}")
        self.total = total
        self.label = label
        self.stream = stream
        self.enabled = enabled
        if tty is None:
            isatty = getattr(stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty = tty
        self.min_interval_s = min_interval_s
        self.step = step
        self.every_s = every_s
        self.done = 0
        self._t0 = time.perf_counter()
        self._last_draw = -math.inf
        self._last_line_t = self._t0
        self._next_fraction = step
        self._closed = False
        self._drawn_width = 0

    def text(self, done: int, extra: str = "") -> str:
        """The progress line for ``done`` units (without newline or carriage return)."""
        frac = min(max(done / self.total, 0.0), 1.0)
        elapsed = time.perf_counter() - self._t0
        tail = f" {done}/{self.total} {frac * 100:3.0f}% {elapsed:5.1f}s"
        if extra:
            tail += f"  {extra}"
        if not self.tty:
            return f"{self.label}:{tail}"
        width = terminal_width() - 1
        bar_width = max(10, min(40, width - len(self.label) - len(tail) - 4))
        filled = round(frac * bar_width)
        bar = "#" * filled + "." * (bar_width - filled)
        return f"{self.label} [{bar}]{tail}"[:width]

    def update(self, done: int, extra: str = "") -> None:
        """Record progress and redraw (TTY) or print a line (when a step is crossed)."""
        if not self.enabled or self._closed:
            return
        self.done = done
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw < self.min_interval_s:
                return
            self._draw(self.text(done, extra))
            self._last_draw = now
            return
        frac = done / self.total
        if frac >= self._next_fraction or now - self._last_line_t >= self.every_s:
            while self._next_fraction <= frac:
                self._next_fraction += self.step
            self.stream.write(self.text(done, extra) + "\n")
            self.stream.flush()
            self._last_line_t = now

    def _draw(self, line: str) -> None:
        clear = " " * max(0, self._drawn_width - len(line))
        self.stream.write("\r" + line + clear)
        self.stream.flush()
        self._drawn_width = len(line)

    def close(self, extra: str = "") -> None:
        """Write the final state (and end the TTY line); later calls do nothing."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        line = self.text(self.done, extra)
        if self.tty:
            self._draw(line)
            self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
