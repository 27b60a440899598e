"""MockTokenizer: a deterministic, lossless tokenizer of a synthetic vocabulary (no deps).

Used by :class:`~sagellm_backend.engine.mock.MockEngine` and the mock runner; its spaced
word tokens are what the simulated model generates.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from sagellm_backend.errors import ConfigError

__all__ = ["MockTokenizer"]


def _letters(index: int) -> str:
    """Bijective base-26 word for ``index >= 0`` ("a".."z", "aa".."zz", "aaa"..)."""
    n = index + 1
    out: list[str] = []
    while n:
        n, r = divmod(n - 1, 26)
        out.append(chr(97 + r))
    return "".join(reversed(out))


_WORDS_PER_FORM = 26 + 26**2 + 26**3  # words of 1-3 lowercase letters


@functools.lru_cache(maxsize=8)
def _word_table(
    num_words: int,
) -> tuple[tuple[str, ...], dict[str, int], dict[int, str]]:
    """Word pieces by index, their ids, and the text of each word id (shared per size).

    All three are read-only after construction; the last holds word ids only (special and
    byte ids are absent from it).
    """
    pieces = tuple(
        (" " + _letters(i) if i < _WORDS_PER_FORM else _letters(i - _WORDS_PER_FORM))
        for i in range(num_words)
    )
    offset = MockTokenizer.WORD_OFFSET
    return (
        pieces,
        {p: offset + i for i, p in enumerate(pieces)},
        {offset + i: p for i, p in enumerate(pieces)},
    )


# A piece is a word (" ?[a-z]{1,3}", looked up) or a maximal run of characters that cannot
# start a word (neither a letter nor a space before a letter), which is byte-encoded whole:
# the same ids as splitting that run into single characters, with one regex match.
_PIECE_RE = re.compile(r" ?[a-z]{1,3}|(?:[^a-z ]| (?![a-z]))+")
_CHUNK_CACHE_SIZE = 1 << 16


class MockTokenizer:
    """Deterministic, lossless tokenizer of a fixed synthetic vocabulary.

    Layout: ``0`` pad, ``1`` bos, ``2`` eos, ``3..258`` the 256 byte values, then words of
    one to three lowercase ASCII letters with a leading space (``" ab"``), then the same
    words without it, as far as ``vocab_size`` allows. Text is split greedily into such
    words; everything else falls back to UTF-8 bytes.

    Invariants: ``decode(encode(text)) == text`` for every ``str``; the output tokens the
    mock engine generates are spaced words, so ``encode(decode(ids)) == ids`` for them.
    """

    PAD_ID = 0
    BOS_ID = 1
    EOS_ID = 2
    BYTE_OFFSET = 3
    WORD_OFFSET = 3 + 256
    MIN_VOCAB_SIZE = 512

    def __init__(self, vocab_size: int = 32000) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise ConfigError(f"vocabulary_size must be an int, got {vocab_size!r}")
        if vocab_size < self.MIN_VOCAB_SIZE:
            raise ConfigError(
                f"vocabulary_size must be >= {self.MIN_VOCAB_SIZE} (3 special + 256 byte "
                f"tokens + words), got {vocab_size}"
            )
        self.vocab_size = vocab_size
        num_words = min(vocab_size - self.WORD_OFFSET, 2 * _WORDS_PER_FORM)
        #: word id -> its text (the ids from WORD_OFFSET up to ``word_end``; nothing else)
        self._pieces, self._piece_to_id, self._text_by_id = _word_table(num_words)
        self.word_end = self.WORD_OFFSET + len(self._pieces)
        #: first chunk of a text -> its ids; later chunk (without its leading space) -> ids
        self._chunk_cache: dict[str, tuple[int, ...]] = {}
        self._spaced_cache: dict[str, tuple[int, ...]] = {}
        #: number of spaced-word ids, from which output tokens are drawn
        self.num_output_words = min(num_words, _WORDS_PER_FORM)

    def encode(self, text: str) -> list[int]:
        """Tokenize ``text`` (no special tokens added).

        A piece never spans a space other than its first character, so the text is split
        before every space and each chunk is tokenized on its own (and memoised, as word
        caches in real tokenizers do); the result equals tokenizing the whole text. The
        chunks after the first are memoised by their text without the leading space (no
        string is built for a cached chunk).
        """
        parts = text.split(" ")
        head = parts[0]
        if head:
            first = self._chunk_cache.get(head)
            ids = list(self._memo(self._chunk_cache, head, "") if first is None else first)
        else:
            ids = []
        cache = self._spaced_cache
        get = cache.get
        for i in range(1, len(parts)):
            cached = get(parts[i])
            ids += self._memo(cache, parts[i], " ") if cached is None else cached
        return ids

    def _memo(self, cache: dict[str, tuple[int, ...]], part: str, prefix: str) -> tuple[int, ...]:
        """Tokenize ``prefix + part`` and remember it in ``cache`` under ``part``."""
        ids = self._encode_chunk(prefix + part)
        if len(cache) >= _CHUNK_CACHE_SIZE:
            cache.clear()
        cache[part] = ids
        return ids

    def _encode_chunk(self, text: str) -> tuple[int, ...]:
        ids: list[int] = []
        lookup = self._piece_to_id.get
        byte_id = _BYTE_IDS.__getitem__
        for piece in _PIECE_RE.findall(text):
            tid = lookup(piece)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(map(byte_id, piece.encode("utf-8", "surrogatepass")))
        return tuple(ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Detokenize ``ids`` (special tokens are dropped).

        A run of byte tokens that is not valid UTF-8 (a sequence cut in the middle of a
        character, a stray continuation byte) decodes with U+FFFD in place of the bad bytes,
        as Hugging Face byte-fallback tokenizers do; lone surrogates that :meth:`encode` wrote
        come back as they were.

        Raises:
            ValueError: an id is outside ``[0, vocab_size)``.
        """
        parts: list[str] = []
        buf = bytearray()
        for tid in ids:
            if not 0 <= tid < self.vocab_size:
                raise ValueError(f"token id {tid} outside the vocabulary [0, {self.vocab_size})")
            if self.BYTE_OFFSET <= tid < self.WORD_OFFSET:
                buf.append(tid - self.BYTE_OFFSET)
                continue
            if buf:
                parts.append(_bytes_text(buf))
                buf.clear()
            if tid >= self.WORD_OFFSET and tid - self.WORD_OFFSET < len(self._pieces):
                parts.append(self._pieces[tid - self.WORD_OFFSET])
        if buf:
            parts.append(_bytes_text(buf))
        return "".join(parts)

    def token_text(self, token_id: int) -> str:
        """Text of one generated (word) token."""
        return self._pieces[token_id - self.WORD_OFFSET]


def _bytes_text(buf: bytearray) -> str:
    """Text of a run of byte tokens: UTF-8 (surrogates allowed), U+FFFD for invalid bytes."""
    try:
        return buf.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return buf.decode("utf-8", "replace")


#: byte value -> its token id (read by MockTokenizer._encode_chunk)
_BYTE_IDS = tuple(range(MockTokenizer.BYTE_OFFSET, MockTokenizer.BYTE_OFFSET + 256))
