"""Incremental detokenisation for streaming: text deltas that never split a character.

A byte-level BPE tokenizer (GPT-2, Llama 3, Qwen) can cut one character -- a Chinese
character, an emoji -- into several tokens, and a SentencePiece tokenizer encodes a word's
leading space inside the token (``"▁word"``) and drops it at the start of a decoded
string.  Decoding each new token on its own therefore produces U+FFFD fragments and lost
spaces.  :class:`IncrementalDetokenizer` decodes a short *window* of recent tokens instead:

* ``prefix`` = tokens ``[prefix_offset, read_offset)``: already emitted, kept only as
  context so that leading-space and byte-merging rules see the same neighbours they see
  when the whole sequence is decoded;
* ``pending`` = tokens ``[read_offset, len)``: not yet emitted.

On every :meth:`IncrementalDetokenizer.add` the window is decoded; if its text extends the
prefix text and does not end in U+FFFD (an incomplete UTF-8 sequence at the end decodes to
exactly one U+FFFD), the extension is emitted and the window slides forward (the old
pending tokens become the new prefix).  Otherwise the tokens are held back.  The same idea
drives transformers' ``TextStreamer`` and vLLM's detokenizer; this implementation is
written for this library.

Invariants (for tokenizers whose decoding is a left-to-right concatenation -- byte-level
BPE, SentencePiece/Metaspace, WordPiece without clean-up -- which is every tokenizer the
engines load):

* ``"".join(deltas) + flush() == tokenizer.decode(all_ids,
  skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)``;
* no delta ends with a U+FFFD that belongs to a character still being completed: a
  character split across tokens is held back until its last byte arrives (a U+FFFD for
  bytes that can never form a character is emitted once later tokens prove it final, or by
  :meth:`~IncrementalDetokenizer.flush`);
* work per call is O(window): the window is the tokens since the previous emission plus
  the ones emitted by it (kept as context), never the whole sequence, and ids before the
  window are dropped.  The pending part grows only while the text ends in an incomplete
  character -- at most three tokens for valid UTF-8 (a character has at most four
  bytes); a model producing long runs of stray continuation bytes extends it until a
  complete character or :meth:`~IncrementalDetokenizer.flush` arrives.

SentencePiece byte fallback (Llama 2, Mistral) decodes a run of ``<0xXX>`` byte tokens as
a unit (an invalid run turns *every* byte of it into U+FFFD), so with such a decoder text
is also held while the last token is a byte token; the run is emitted when a normal token
ends it.

Clean-up of tokenization spaces (``" ." -> "."``) looks ahead across token boundaries and
cannot be streamed exactly, so decoding here always passes
``clean_up_tokenization_spaces=False`` (transformers 5 already ignores it for BPE).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"


def _byte_fallback_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of ``<0xXX>`` byte tokens when the decoder uses ``ByteFallback``, else empty.

    ByteFallback decodes a *run* of byte tokens as one unit: valid UTF-8 becomes text, an
    invalid run becomes one U+FFFD per byte -- including bytes that alone were valid
    (``<0x00>`` alone is a NUL character, ``<0x00><0x80>`` is two U+FFFD).  Text ending in
    a byte token is therefore not final until a non-byte token ends the run.
    """
    backend: Any = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return frozenset()
    try:
        spec = json.loads(decoder.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return frozenset()
    parts = spec.get("decoders", [spec]) if isinstance(spec, dict) else []
    if not any(isinstance(d, dict) and d.get("type") == "ByteFallback" for d in parts):
        return frozenset()
    ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


class IncrementalDetokenizer:
    """Turn a growing sequence of token ids into text deltas, one call per step.

    Args:
        tokenizer: a Hugging Face tokenizer (fast or slow).  The Rust ``tokenizers``
            backend is used directly when present, which avoids Python overhead per step.
        skip_special_tokens: drop special tokens (bos, eos, pad, ...) from the text, as
            ``tokenizer.decode(..., skip_special_tokens=True)`` does.

    Example:
        >>> detok = IncrementalDetokenizer(tokenizer)          # doctest: +SKIP
        >>> parts = [detok.add([t]) for t in token_ids] + [detok.flush()]  # doctest: +SKIP
        >>> "".join(parts) == tokenizer.decode(token_ids, skip_special_tokens=True)
        True
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode = self._make_decoder(tokenizer, skip_special_tokens)
        # With skip_special_tokens the backend filters special ids before joining the
        # remaining tokens, so dropping them here yields identical text and keeps
        # runs of special tokens (eos padding) out of the window.
        special = getattr(tokenizer, "all_special_ids", None) or []
        self._skip_ids: frozenset[int] = (
            frozenset(int(i) for i in special) if skip_special_tokens else frozenset()
        )
        self._hold_ids = _byte_fallback_ids(tokenizer)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_len = 0  # len(decode(ids[prefix_offset:read_offset]))
        self._num_tokens = 0
        self._text_len = 0

    @staticmethod
    def _make_decoder(tokenizer: Any, skip: bool) -> Callable[[list[int]], str]:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "decode"):

            def fast(ids: list[int]) -> str:
                return str(backend.decode(ids, skip_special_tokens=skip))

            return fast

        def slow(ids: list[int]) -> str:
            return str(
                tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            )

        return slow

    @property
    def num_tokens(self) -> int:
        """Token ids received so far (special tokens included)."""
        return self._num_tokens

    @property
    def text_len(self) -> int:
        """Characters emitted so far by :meth:`add` and :meth:`flush`."""
        return self._text_len

    def add(self, token_ids: Sequence[int]) -> str:
        """Append ``token_ids`` and return the text that became final (possibly ``""``).

        Raises:
            ValueError: an id is negative or not an integer.
        """
        if not token_ids:
            return ""
        new: list[int] = []
        for tid in token_ids:
            if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                raise ValueError(f"token ids must be non-negative ints, got {tid!r}")
            if tid not in self._skip_ids:
                new.append(tid)
        self._num_tokens += len(token_ids)
        if not new:
            return ""
        self._ids.extend(new)
        return self._step(final=False)

    def flush(self) -> str:
        """Return everything held back (the sequence has ended); the window is emptied.

        A trailing incomplete character is emitted as U+FFFD, exactly as
        ``tokenizer.decode`` renders it.  Further :meth:`add` calls continue the sequence.
        """
        if self._read_offset >= len(self._ids):
            return ""
        return self._step(final=True)

    def _step(self, *, final: bool) -> str:
        text = self._decode(self._ids[self._prefix_offset :])
        if not final and (
            len(text) <= self._prefix_len
            or text.endswith(_REPLACEMENT)
            or self._ids[-1] in self._hold_ids
        ):
            return ""  # nothing new yet, the last character is incomplete, or a byte run
        delta = text[self._prefix_len :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_len = len(self._decode(self._ids[self._prefix_offset : self._read_offset]))
        self._compact()
        self._text_len += len(delta)
        return delta

    def _compact(self) -> None:
        """Drop ids before the window so memory stays O(window)."""
        if self._prefix_offset > 0:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
