"""Output text that ends before the first stop string (``metadata["stop"]``).

As in the OpenAI API and vLLM, a sequence that a stop string ends returns the text *before*
the stop string: the string and whatever the same token decoded after it are left out of
``output_text`` (``output_tokens`` keep every generated token). The scheduler ends the
sequence at the token that completes a stop string; this module cuts the text.

A stream cannot take text back once sent, so :class:`StopTextStream` holds back the last
``len(longest stop string) - 1`` characters of a sequence with stop strings until the next
text shows they do not start one (or the sequence ends), and never sends text from the first
stop string found on: a longer stop string that starts earlier may still complete.

Invariants: the text released by :meth:`StopTextStream.feed` and :meth:`StopTextStream.end`
concatenates to :func:`cut_at_stop` of the whole text; nothing at or after the first stop
string is ever released. Sequences without stop strings are not touched.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopTextStream", "cut_at_stop"]


def _first_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest stop string in ``text`` at or after ``start``, or -1."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else -1


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) its first stop string; all of it when there is none."""
    if not stops:
        return text
    i = _first_stop(text, stops)
    return text if i < 0 else text[:i]


class StopTextStream:
    """Incremental :func:`cut_at_stop` for a stream (see the module docstring).

    Args:
        stops: the sequence's stop strings (non-empty strings).
    """

    __slots__ = ("_emitted", "_hold", "_stops", "_text")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._hold = max(map(len, self._stops)) - 1 if self._stops else 0
        self._text = ""
        self._emitted = 0

    def feed(self, chunk: str) -> str:
        """Add the text of new tokens; return the part that is now safe to send.

        Safe: before the first stop string found so far, and not among the last
        ``len(longest stop) - 1`` characters, where a longer stop string that starts
        earlier may still be completed by text yet to come.
        """
        self._text += chunk
        safe = len(self._text) - self._hold
        # nothing sent so far begins a stop string (it was complete then, and found)
        i = _first_stop(self._text, self._stops, self._emitted)
        if i >= 0:
            safe = min(safe, i)
        if safe <= self._emitted:
            return ""
        out = self._text[self._emitted : safe]
        self._emitted = safe
        return out

    def end(self, tail: str = "") -> str:
        """The sequence ended (``tail``: its last text); return what is left to send."""
        self._text += tail
        rest = cut_at_stop(self._text, self._stops)[self._emitted :]
        self._emitted += len(rest)
        return rest

    @property
    def text(self) -> str:
        """All text released so far (after :meth:`end`: the whole output text)."""
        return self._text[: self._emitted]
