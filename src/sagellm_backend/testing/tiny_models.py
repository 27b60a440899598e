"""Offline tiny Hugging Face models for tests, the demo and the benchmarks.

:func:`ensure_tiny_model` builds (once per machine) a directory in the ordinary Hugging
Face format -- ``config.json``, ``generation_config.json``, ``model.safetensors``,
``tokenizer.json`` and ``tokenizer_config.json`` -- that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load with
no network access, through exactly the code path users take with hub models.

Each model has:

* a byte-level BPE tokenizer trained locally with the ``tokenizers`` library on a corpus
  embedded in this module (English prose, code, Chinese, emoji) plus seeded synthetic
  words that fill the vocabulary to its target size.  Any text, including multi-byte
  UTF-8, round-trips: ``decode(encode(text)) == text``.  Special tokens: ``<pad>`` (id 0),
  ``<s>`` (bos, id 1), ``</s>`` (eos, id 2), ``<unk>`` (id 3).  Llama-style models prepend
  ``<s>`` when encoding; the GPT-2 model adds nothing.  No chat template.
* random weights drawn from a fixed seed (same seed -> same weights), saved as safetensors.

Invariants:

* A returned directory is complete: it is built in a temporary sibling directory and
  renamed into place in one ``os.rename``, so concurrent builders (tests in parallel
  processes) never observe a half-written model; the loser of a race discards its copy.
* The directory name carries the builder version (``<name>-v<N>``); changing what a
  builder produces bumps ``N`` so stale caches are never reused.
* Importing this module imports neither torch, transformers nor tokenizers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sagellm_backend.errors import ConfigError, DependencyMissingError

__all__ = [
    "BUILDER_VERSION",
    "TinyModelSpec",
    "build_tokenizer",
    "default_cache_root",
    "ensure_tiny_model",
    "list_tiny_models",
    "tiny_model_spec",
]

#: Bumped whenever a builder's output changes; part of every cache directory name.
BUILDER_VERSION = 1

_MARKER = "sagellm_tiny_model.json"
_BUILD_LOCK = threading.Lock()
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


@dataclass(frozen=True)
class TinyModelSpec:
    """Geometry of one offline model.

    Attributes:
        name: the name :func:`ensure_tiny_model` accepts.
        architecture: ``config.model_type`` (llama, gpt2, mistral, qwen2, phi3, gemma2,
            gpt_neox, opt, starcoder2, bloom).
        vocab_size: tokenizer and embedding size (they are equal).
        hidden_size: model width.
        intermediate_size: MLP width.
        num_layers: decoder layers.
        num_heads: attention heads.
        num_kv_heads: key/value heads (Llama GQA; GPT-2 uses ``num_heads``).
        max_position_embeddings: context length.
        seed: the torch seed the weights are drawn from.
        description: one line for listings.
        extra: further config fields of this architecture as ``(name, value)`` pairs
            (sliding window, soft-capping, ...); recorded in the cache marker only when
            non-empty, so the markers of models without extras are unchanged.
    """

    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    seed: int
    description: str
    extra: tuple[tuple[str, Any], ...] = ()


def _spec_dict(spec: TinyModelSpec) -> dict[str, Any]:
    """The spec as recorded in the cache marker (``extra`` only when non-empty)."""
    out = asdict(spec)
    if not spec.extra:
        del out["extra"]
    else:
        out["extra"] = [list(pair) for pair in spec.extra]
    return out


_TINY_GEOMETRY: dict[str, int] = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "max_position_embeddings": 1024,
}
_BENCH_GEOMETRY: dict[str, int] = {
    "vocab_size": 8000,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_layers": 8,
    "num_heads": 8,
    "num_kv_heads": 4,
    "max_position_embeddings": 4096,
}


def _spec(
    base: dict[str, int], name: str, architecture: str, seed: int, description: str, **kw: Any
) -> TinyModelSpec:
    """A spec with ``base`` geometry, overridden by ``kw`` (``extra`` is a dict, sorted)."""
    extra = tuple(sorted(kw.pop("extra", {}).items()))
    geometry: dict[str, Any] = {**base, **kw}
    return TinyModelSpec(
        name=name,
        architecture=architecture,
        seed=seed,
        description=description,
        extra=extra,
        **geometry,
    )


def _tiny(name: str, architecture: str, seed: int, description: str, **kw: Any) -> TinyModelSpec:
    """A 2-layer, hidden-64 model of ``architecture`` (vocab 1024, 4 heads / 2 KV heads)."""
    return _spec(_TINY_GEOMETRY, name, architecture, seed, description, **kw)


def _bench(name: str, architecture: str, seed: int, description: str, **kw: Any) -> TinyModelSpec:
    """An 8-layer, hidden-512 model of ``architecture`` (vocab 8000, 8 heads / 4 KV heads)."""
    return _spec(_BENCH_GEOMETRY, name, architecture, seed, description, **kw)


_SPECS: dict[str, TinyModelSpec] = {
    "tiny-llama": _tiny(
        "tiny-llama",
        "llama",
        1234,
        "random Llama, 2 layers, hidden 64, GQA 4/2 heads, vocab 1024 (~0.2M params)",
        max_position_embeddings=2048,
    ),
    "tiny-gpt2": _tiny(
        "tiny-gpt2",
        "gpt2",
        4321,
        "random GPT-2, 2 layers, hidden 64, 4 heads, vocab 1024 (~0.2M params)",
        intermediate_size=256,
        num_kv_heads=4,
    ),
    "bench-llama": _bench(
        "bench-llama",
        "llama",
        2024,
        "random Llama, 8 layers, hidden 512, GQA 8/4 heads, vocab 8000, fp32 "
        "(~33M params; the DESIGN.md benchmark model)",
    ),
    "tiny-mistral": _tiny(
        "tiny-mistral",
        "mistral",
        501,
        "random Mistral, 2 layers, hidden 64, GQA 4/2, sliding window 24",
        extra={"sliding_window": 24},
    ),
    "tiny-qwen2": _tiny(
        "tiny-qwen2", "qwen2", 502, "random Qwen2, 2 layers, hidden 64, GQA 4/2, qkv bias"
    ),
    "tiny-phi3": _tiny("tiny-phi3", "phi3", 503, "random Phi-3, 2 layers, hidden 64, GQA 4/2"),
    "tiny-gemma2": _tiny(
        "tiny-gemma2",
        "gemma2",
        504,
        "random Gemma-2, 2 layers (sliding window 16, then global), attention and final "
        "logit soft-capping",
        extra={
            "sliding_window": 16,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
        },
    ),
    "tiny-gpt-neox": _tiny(
        "tiny-gpt-neox",
        "gpt_neox",
        505,
        "random GPT-NeoX (Pythia-style), 2 layers, hidden 64, 4 heads, partial rotary",
        num_kv_heads=4,
        extra={"rotary_pct": 0.5},
    ),
    "tiny-opt": _tiny(
        "tiny-opt", "opt", 506, "random OPT, 2 layers, hidden 64, 4 heads", num_kv_heads=4
    ),
    "tiny-starcoder2": _tiny(
        "tiny-starcoder2",
        "starcoder2",
        507,
        "random StarCoder2, 2 layers, hidden 64, GQA 4/2, sliding window 32",
        extra={"sliding_window": 32},
    ),
    "tiny-bloom": _tiny(
        "tiny-bloom",
        "bloom",
        508,
        "random BLOOM (ALiBi, no attention-backend support), 2 layers, hidden 64, 4 heads",
        num_kv_heads=4,
        intermediate_size=256,
    ),
    "bench-gpt2": _bench(
        "bench-gpt2",
        "gpt2",
        2025,
        "random GPT-2, 8 layers, hidden 512, 8 heads, vocab 8000, fp32 (~33M "
        "params; bench-llama's size)",
        intermediate_size=2048,
        num_kv_heads=8,
        max_position_embeddings=1024,
    ),
    "bench-phi3": _bench(
        "bench-phi3",
        "phi3",
        2026,
        "random Phi-3, 8 layers, hidden 512, GQA 8/4 heads, vocab 8000, fp32 "
        "(~33M params; bench-llama's size)",
    ),
}
# Smallest first: the 2-layer test models, then the benchmark models.
_SPECS = dict(sorted(_SPECS.items(), key=lambda item: item[0].startswith("bench-")))

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


def list_tiny_models() -> list[str]:
    """Return the names :func:`ensure_tiny_model` accepts, smallest first."""
    return list(_SPECS)


def tiny_model_spec(name: str) -> TinyModelSpec:
    """Return the geometry of model ``name``.

    Raises:
        ConfigError: ``name`` is not one of :func:`list_tiny_models`.
    """
    spec = _SPECS.get(name)
    if spec is None:
        raise ConfigError(
            f"unknown tiny model {name!r}; valid names: {', '.join(list_tiny_models())}"
        )
    return spec


def default_cache_root() -> Path:
    """Return where tiny models are cached when no ``cache_dir`` is given.

    ``$SAGELLM_BACKEND_CACHE`` if set, else ``$XDG_CACHE_HOME/sagellm-backend/models``, else
    ``~/.cache/sagellm-backend/models``.
    """
    env = os.environ.get("SAGELLM_BACKEND_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sagellm-backend" / "models"


def ensure_tiny_model(name: str = "tiny-llama", cache_dir: str | Path | None = None) -> Path:
    """Return the directory of offline model ``name``, building it on first use.

    The directory is ``<cache_dir>/<name>-v<BUILDER_VERSION>`` (``cache_dir`` defaults to
    :func:`default_cache_root`).  It is reused when complete; otherwise it is built in a
    temporary directory beside it and renamed into place atomically.  Building takes
    well under a second for the tiny models and a few seconds for ``bench-llama``.

    Args:
        name: one of :func:`list_tiny_models`.
        cache_dir: the cache root; created if missing.

    Returns:
        A directory ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained`` load offline.

    Raises:
        ConfigError: unknown ``name``, or ``cache_dir`` exists and is not a directory.
        DependencyMissingError: torch, transformers, tokenizers or safetensors is missing.
    """
    spec = tiny_model_spec(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"tiny-model cache_dir {str(root)!r} exists and is not a directory")
    final = root / f"{spec.name}-v{BUILDER_VERSION}"
    if _is_complete(final, spec):
        return final
    # Threads of one process share torch's global RNG (the weights' seed): build one at a
    # time here; other processes build in their own temporary directories.
    with _BUILD_LOCK:
        if _is_complete(final, spec):
            return final
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            _build(spec, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable
            _publish(tmp, final, spec)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _is_complete(path: Path, spec: TinyModelSpec) -> bool:
    """Whether ``path`` holds a finished build of ``spec`` by this builder version."""
    marker = path / _MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if meta.get("builder_version") != BUILDER_VERSION or meta.get("spec") != _spec_dict(spec):
        return False
    return all((path / f).is_file() for f in _REQUIRED_FILES)


def _publish(tmp: Path, final: Path, spec: TinyModelSpec) -> None:
    """Rename ``tmp`` to ``final``; a complete ``final`` made by a racing builder wins."""
    try:
        os.rename(tmp, final)
        return
    except OSError:
        if _is_complete(final, spec):
            return  # another process finished first; ours is discarded by the caller
    # ``final`` exists but is incomplete or stale (not made by this builder version):
    # move it aside, then retry once.
    trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=final.parent))
    try:
        os.rename(final, trash / "old")
    except OSError:
        if not _is_complete(final, spec):
            raise
        return
    finally:
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not _is_complete(final, spec):
            raise


def _import_deps() -> tuple[Any, Any, Any]:
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
    _, transformers, tokenizers = _import_deps()
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


# Rotary decoders configured with the Llama field names.
_ROPE_DECODERS = frozenset({"mistral", "qwen2", "phi3", "gemma2", "starcoder2"})
# Architectures whose tokenizer prepends ``<s>`` (as their hub tokenizers do).
_BOS_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "phi3", "gemma2"})


def _model_config(spec: TinyModelSpec, transformers: Any) -> Any:
    common: dict[str, Any] = {
        "vocab_size": spec.vocab_size,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "tie_word_embeddings": False,
    }
    if spec.architecture == "llama":
        return transformers.LlamaConfig(
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            max_position_embeddings=spec.max_position_embeddings,
            rms_norm_eps=1e-6,
            **common,
        )
    extra = dict(spec.extra)
    if spec.architecture == "gpt2":
        return transformers.GPT2Config(
            n_embd=spec.hidden_size,
            n_inner=spec.intermediate_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_positions=spec.max_position_embeddings,
            **common,
            **extra,
        )
    if spec.architecture == "opt":
        fields: dict[str, Any] = {
            "hidden_size": spec.hidden_size,
            "ffn_dim": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "max_position_embeddings": spec.max_position_embeddings,
            "word_embed_proj_dim": spec.hidden_size,
        }
    elif spec.architecture == "bloom":
        fields = {
            "hidden_size": spec.hidden_size,
            "n_layer": spec.num_layers,
            "n_head": spec.num_heads,
        }
    elif spec.architecture == "gpt_neox":
        fields = {
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "max_position_embeddings": spec.max_position_embeddings,
        }
    elif spec.architecture in _ROPE_DECODERS:
        fields = {
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads,
            "max_position_embeddings": spec.max_position_embeddings,
        }
    else:
        raise ConfigError(
            f"tiny model {spec.name!r}: unknown architecture {spec.architecture!r}; valid: "
            f"llama, gpt2, opt, bloom, gpt_neox, {', '.join(sorted(_ROPE_DECODERS))}"
        )
    return transformers.AutoConfig.for_model(spec.architecture, **fields, **common, **extra)


def _build(spec: TinyModelSpec, out: Path) -> None:
    """Write the complete model ``spec`` into the empty directory ``out``."""
    torch, transformers, _ = _import_deps()
    tokenizer = build_tokenizer(spec.vocab_size, add_bos=spec.architecture in _BOS_ARCHITECTURES)
    tokenizer.model_max_length = spec.max_position_embeddings
    config = _model_config(spec, transformers)
    if spec.architecture == "llama":
        model_cls = transformers.LlamaForCausalLM
    elif spec.architecture == "gpt2":
        model_cls = transformers.GPT2LMHeadModel
    else:
        model_cls = transformers.AutoModelForCausalLM.from_config
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.seed)
        model = model_cls(config).to(torch.float32).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    hf_logging = transformers.utils.logging
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    # Name the class every transformers >= 4.56 knows (5.x would write its own alias).
    tok_config_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8"))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True), encoding="utf-8")
    meta = {"builder_version": BUILDER_VERSION, "spec": _spec_dict(spec)}
    (out / _MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
