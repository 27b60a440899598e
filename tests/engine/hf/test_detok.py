"""IncrementalDetokenizer: deltas concatenate to tokenizer.decode, never split a character."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagellm_backend.engine.hf.detok import IncrementalDetokenizer
from sagellm_backend.testing.tiny_models import CORPUS, ensure_tiny_model

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    path = ensure_tiny_model("tiny-llama", tmp_path_factory.mktemp("models"))
    return AutoTokenizer.from_pretrained(path)


def _sentencepiece_style_tokenizer(tmp: Path) -> Any:
    """A Llama-2-like tokenizer: Metaspace "▁" spaces, byte fallback for unseen bytes."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    # Train on the ASCII part only, so Chinese and emoji must go through byte fallback.
    ascii_lines = [line for line in CORPUS.splitlines() if line.isascii() and line.strip()]
    tok.train_from_iterator(ascii_lines, trainer)
    # Byte tokens are ordinary vocabulary entries (as in Llama 2), not added tokens.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _sentencepiece_style_tokenizer(tmp_path_factory.mktemp("sp"))


def _stream(tok: Any, ids: list[int], chunks: list[int], skip: bool) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    parts: list[str] = []
    i = 0
    for n in chunks:
        if i >= len(ids):
            break
        parts.append(detok.add(ids[i : i + n]))
        i += n
    if i < len(ids):
        parts.append(detok.add(ids[i:]))
    parts.append(detok.flush())
    return parts


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("skip", [True, False])
def test_corpus_one_token_at_a_time_matches_decode(byte_tok: Any, skip: bool) -> None:
    ids = list(byte_tok(CORPUS)["input_ids"])  # starts with <s>
    parts = _stream(byte_tok, ids, [1] * len(ids), skip)
    assert "".join(parts) == byte_tok.decode(ids, skip_special_tokens=skip)
    assert not any(REPLACEMENT in p for p in parts), "a split character leaked as U+FFFD"
    if skip:
        assert "".join(parts) == CORPUS


def test_multibyte_character_is_held_until_complete(byte_tok: Any) -> None:
    # Byte-level BPE: an emoji absent from the merges is split into its 4 bytes.
    text = "a🦜"
    ids = _encode(byte_tok, text)
    assert len(ids) >= 3, "the test needs the emoji split across several tokens"
    detok = IncrementalDetokenizer(byte_tok)
    deltas = [detok.add([t]) for t in ids]
    assert deltas[0] == "a"
    assert all(d == "" for d in deltas[1:-1])
    assert deltas[-1] == "🦜"
    assert detok.flush() == ""


def test_flush_emits_an_incomplete_tail_as_decode_does(byte_tok: Any) -> None:
    ids = _encode(byte_tok, "x🦜")[:-1]  # drop the emoji's last byte
    detok = IncrementalDetokenizer(byte_tok)
    held = "".join(detok.add([t]) for t in ids)
    assert held == "x"
    tail = detok.flush()
    assert tail.endswith(REPLACEMENT)
    assert held + tail == byte_tok.decode(ids)


def test_special_tokens_are_skipped_or_kept(byte_tok: Any) -> None:
    eos = byte_tok.eos_token_id
    ids = [*_encode(byte_tok, "hi"), eos, *_encode(byte_tok, " there"), eos, eos]
    assert "".join(_stream(byte_tok, ids, [1] * len(ids), True)) == "hi there"
    kept = "".join(_stream(byte_tok, ids, [1] * len(ids), False))
    assert kept == "hi</s> there</s></s>" == byte_tok.decode(ids)


def test_sentencepiece_leading_spaces_are_kept(sp_tok: Any) -> None:
    text = "Hello world, the engine streams text. 你好 🚀 end"
    ids = _encode(sp_tok, text)
    assert sp_tok.decode(ids) == text
    parts = _stream(sp_tok, ids, [1] * len(ids), True)
    assert "".join(parts) == text
    assert not any(REPLACEMENT in p for p in parts)
    # Naive per-token decoding loses the spaces: the window is what keeps them.
    naive = "".join(sp_tok.decode([t]) for t in ids)
    assert naive != text


def test_byte_fallback_run_is_held_until_it_ends(sp_tok: Any) -> None:
    """<0x00> alone decodes to NUL, but <0x00><0x80> to two U+FFFD: hold the whole run."""
    b00, b80 = sp_tok.convert_tokens_to_ids(["<0x00>", "<0x80>"])
    word = _encode(sp_tok, "the")
    ids = [*word, b00, b80, *word]
    detok = IncrementalDetokenizer(sp_tok)
    deltas = [detok.add([t]) for t in ids]
    assert deltas[len(word)] == "" and deltas[len(word) + 1] == ""
    assert "".join(deltas) + detok.flush() == sp_tok.decode(ids) == "the\ufffd\ufffd the"


def test_window_stays_bounded(byte_tok: Any) -> None:
    """Work per step is O(window): total decoded ids grow linearly with the sequence."""
    decoded = [0]
    backend = byte_tok.backend_tokenizer

    class CountingBackend:
        def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
            decoded[0] += len(ids)
            return str(backend.decode(ids, skip_special_tokens=skip_special_tokens))

    class Wrapped:
        backend_tokenizer = CountingBackend()
        all_special_ids = byte_tok.all_special_ids

    ids = _encode(byte_tok, CORPUS * 3)
    detok = IncrementalDetokenizer(Wrapped())
    text = "".join(detok.add([t]) for t in ids) + detok.flush()
    assert text == CORPUS * 3
    assert decoded[0] <= 12 * len(ids), f"decoded {decoded[0]} ids for {len(ids)} tokens"
    assert len(detok._ids) <= 8


def test_counters_and_empty_input(byte_tok: Any) -> None:
    detok = IncrementalDetokenizer(byte_tok)
    assert detok.add([]) == ""
    assert detok.flush() == ""
    ids = _encode(byte_tok, "abc 中文")
    text = detok.add(ids) + detok.flush()
    assert detok.num_tokens == len(ids)
    assert detok.text_len == len(text) == len("abc 中文")


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True, None])
def test_bad_token_id_is_rejected(byte_tok: Any, bad: Any) -> None:
    detok = IncrementalDetokenizer(byte_tok)
    with pytest.raises(ValueError, match="non-negative ints"):
        detok.add([5, bad])


def test_slow_path_without_backend_matches(byte_tok: Any) -> None:
    class SlowOnly:
        all_special_ids = byte_tok.all_special_ids

        def decode(self, ids: list[int], **kw: Any) -> str:
            return str(byte_tok.decode(ids, **kw))

    ids = list(byte_tok("naïve 😀 code: x += 1")["input_ids"])
    parts = _stream(SlowOnly(), ids, [1] * len(ids), True)
    assert "".join(parts) == byte_tok.decode(ids, skip_special_tokens=True)


_FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_FAST
@given(data=st.data(), skip=st.booleans())
def test_random_ids_concatenate_to_decode(byte_tok: Any, data: st.DataObject, skip: bool) -> None:
    """Arbitrary id sequences (partial UTF-8 bytes, specials) in arbitrary chunks."""
    vocab = len(byte_tok)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=40), label="ids")
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=40), label="chunks")
    parts = _stream(byte_tok, ids, chunks, skip)
    assert "".join(parts) == byte_tok.decode(ids, skip_special_tokens=skip)


@_FAST
@given(data=st.data(), skip=st.booleans())
def test_random_ids_sentencepiece(sp_tok: Any, data: st.DataObject, skip: bool) -> None:
    ids = data.draw(st.lists(st.integers(0, len(sp_tok) - 1), max_size=40), label="ids")
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=40), label="chunks")
    parts = _stream(sp_tok, ids, chunks, skip)
    assert "".join(parts) == sp_tok.decode(ids, skip_special_tokens=skip)


_PIECES = [*"abc xyz.,\n\t", *"你好世界中文模型", "😀", "🚀", "👨\u200d👩\u200d👧", "é", "ß", "한"]
_TEXT = st.lists(st.sampled_from(_PIECES), max_size=30).map("".join) | st.text(max_size=30)


@_FAST
@given(text=_TEXT, seed=st.integers(0, 2**16))
def test_valid_text_streams_exactly_without_replacement(
    byte_tok: Any, sp_tok: Any, text: str, seed: int
) -> None:
    rng = random.Random(seed)
    for tok in (byte_tok, sp_tok):
        ids = _encode(tok, text)
        expected = tok.decode(ids, skip_special_tokens=True)
        chunks = [rng.randint(1, 3) for _ in ids]
        parts = _stream(tok, ids, chunks, True)
        assert "".join(parts) == expected
        if REPLACEMENT not in text:
            assert not any(REPLACEMENT in p for p in parts)
        if tok is byte_tok:
            assert expected == text  # byte-level BPE round-trips any text
