"""The tokenizer of the offline tiny models: a byte-level BPE trained on an embedded corpus.

Part of :mod:`sagellm_backend.testing.tiny_models` (which re-exports the public names).
Invariants: training is deterministic (the synthetic words are seeded by the vocabulary
size), reaches exactly the requested vocabulary size or raises, and any text round-trips;
the special tokens have fixed ids (:data:`PAD_ID`, :data:`BOS_ID`, :data:`EOS_ID`,
:data:`UNK_ID`). Importing this module imports neither torch, transformers nor tokenizers.
"""

from __future__ import annotations

import random
from typing import Any

from sagellm_backend.errors import ConfigError, DependencyMissingError

__all__ = [
    "BOS_ID",
    "CORPUS",
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "build_tokenizer",
    "import_deps",
]

_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# A few KB of varied text: the tokenizer learns real merges from it, and the tests and
# the demo use it as sample text.  Written for this module.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still tell a story.
Once upon a time, a tiny language model lived inside a test suite. Every morning it woke
up, read a prompt, and wrote sixty-four new tokens before breakfast. Nobody understood
its words, because its weights were random, but it always finished on time.
Continuous batching lets new requests join a running batch at the next step, so nobody
waits for another request's whole generation. Prefix caching reuses the keys and values
of a shared system prompt instead of computing them again.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 3.14159 2.71828 -17 1e-6 0x1F 2024-05-01.
Punctuation & symbols: ( ) [ ] { } < > = + - * / % ! ? , ; : ' " ` ~ @ # $ ^ | \\ _ .
def fibonacci(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

class KVCache:
    def __init__(self, num_pages: int, block_size: int = 16) -> None:
        self.free = list(range(num_pages))
        self.block_size = block_size

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise MemoryError("out of pages")
        pages, self.free = self.free[:n], self.free[n:]
        return pages

for (int i = 0; i < n; ++i) { sum += x[i] * y[i]; }
SELECT name, count(*) FROM requests WHERE status = 'done' GROUP BY name;
{"model": "tiny-llama", "max_tokens": 64, "temperature": 0.7, "stream": true}
今天天气很好，我们去公园散步吧。大语言模型的推理需要高效的键值缓存管理。
连续批处理让新的请求在下一步加入正在运行的批次。前缀缓存可以复用共享的系统提示。
机器学习、深度学习和自然语言处理是人工智能的重要方向。你好，世界！谢谢你的帮助。
日本語のテキストも少し入れておきます。こんにちは、世界。한국어 문장도 있습니다. 안녕하세요.
Emoji: 😀 😃 🚀 🔥 ✨ 👍 🎉 🤖 🌍 ❤️ 👨‍👩‍👧 🇨🇳
Accented letters: café, naïve, Zürich, São Paulo.
Ελληνικά: γειά σου κόσμε. Русский: привет, мир. العربية: مرحبا بالعالم. हिन्दी: नमस्ते दुनिया.
In the beginning the engine loaded the model, warmed up its kernels, and waited for
requests. When a request arrived, the scheduler admitted it if the cache had room, ran
its prompt through the model in one prefill step, and then produced one token per decode
step until it met the end of sequence or its token budget.
Streaming output must never split a character: a byte-level tokenizer may cut a Chinese
character or an emoji into several tokens, and the detokenizer holds the bytes back until
the character is complete.
"""

# Syllables of the seeded synthetic words that fill the vocabulary (one string, split).
_SYLLABLE_TEXT = (
    "ka ri to men sa lo vi ne dra qu zel pho tri mos un ex al or ing tion ba ce di fo gu "
    "he ji ku la mi no pu ro su te va we xi yo zu ar be co de el fi go hu ir jo ke li ma "
    "nu op pe qui ra se ti ul ve wa xe ya ze str pl gr th sh ch ck ous ly er est"
)


def import_deps() -> tuple[Any, Any, Any]:
    """Import torch, transformers and tokenizers, or raise with the install command."""
    try:
        import tokenizers
        import torch
        import transformers
    except ImportError as exc:
        raise DependencyMissingError(
            f"building tiny models needs torch, transformers and tokenizers ({exc}); "
            "install them with: pip install 'isagellm-backend[hf]'"
        ) from exc
    return torch, transformers, tokenizers


def _training_texts(vocab_size: int) -> list[str]:
    """The embedded corpus plus seeded synthetic words, enough to fill ``vocab_size``."""
    rng = random.Random(vocab_size)
    syllables = _SYLLABLE_TEXT.split()
    texts = [line for line in CORPUS.splitlines() if line.strip()]
    # Byte-level BPE needs about one distinct new pair per merge: grow the synthetic
    # vocabulary with the target so the trainer reaches it exactly.
    num_words = max(200, vocab_size)
    words = [
        "".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(num_words)
    ]
    for start in range(0, len(words), 16):
        line = " ".join(words[start : start + 16])
        texts.append(line.capitalize() + ".")
    return texts


def build_tokenizer(vocab_size: int, *, add_bos: bool) -> Any:
    """Train a byte-level BPE tokenizer with exactly ``vocab_size`` entries.

    Args:
        vocab_size: total entries including the 4 special tokens and 256 byte tokens.
        add_bos: prepend ``<s>`` when encoding (Llama style).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` (not yet saved).

    Raises:
        ConfigError: the trainer could not reach ``vocab_size`` (too large for the corpus).
    """
    _, transformers, tokenizers = import_deps()
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(vocab_size), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ConfigError(
            f"tokenizer training reached {tok.get_vocab_size()} entries, not {vocab_size}"
        )
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=0,  # replaced below with the model's context
    )
