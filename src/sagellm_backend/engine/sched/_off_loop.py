"""Long prompts are tokenized in a worker thread, off the event loop.

A real tokenizer takes about a second per MB of text; on the event loop that would stall
every other request's streaming. Engines whose serving set is
threaded (a real tokenizer) hand such prompts to :func:`tokenize_off_loop` first and pass
the returned function to request preparation, which then finds the ids ready.

Invariant: the returned function gives exactly what the tokenizer gives (its exception
included, re-raised where preparation calls it), so a request is validated the same way
whichever thread tokenized it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

__all__ = ["OFF_LOOP_PROMPT_CHARS", "long_prompt", "tokenize_off_loop"]

#: Prompts of at least this many characters are tokenized in a worker thread.
OFF_LOOP_PROMPT_CHARS = 1 << 15


def long_prompt(request: Any, *, threaded: bool) -> bool:
    """Whether to tokenize ``request``'s prompt off the loop.

    Only for threaded engines and prompts of at least :data:`OFF_LOOP_PROMPT_CHARS`
    characters that will be tokenized (no ``prompt_token_ids``); anything malformed is left
    to request preparation, which reports it.
    """
    if not threaded:
        return False
    prompt = getattr(request, "prompt", None)
    if not isinstance(prompt, str) or len(prompt) < OFF_LOOP_PROMPT_CHARS:
        return False
    metadata = getattr(request, "metadata", None) or {}
    if not isinstance(metadata, dict):
        return False
    return metadata.get("prompt_token_ids") is None


async def tokenize_off_loop(
    tokenize: Callable[[str], list[int]], prompt: str
) -> Callable[[str], list[int]]:
    """``prompt``'s tokens, computed in a worker thread, as a tokenize function.

    The function returns the precomputed ids for ``prompt`` (re-raising what tokenizing
    raised) and tokenizes any other text itself.
    """

    def run() -> list[int] | Exception:
        try:
            return tokenize(prompt)
        except Exception as exc:  # re-raised by given() where preparation calls it
            return exc

    result = await asyncio.to_thread(run)

    def given(text: str) -> list[int]:
        if text is not prompt:
            return tokenize(text)
        if isinstance(result, Exception):
            raise result
        return result

    return given
