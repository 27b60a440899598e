"""Offline tiny Hugging Face models for tests, the demo and the benchmarks.

:func:`ensure_tiny_model` builds (once per machine) a directory in the ordinary Hugging
Face format -- ``config.json``, ``generation_config.json``, ``model.safetensors``,
``tokenizer.json`` and ``tokenizer_config.json`` -- that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load with
no network access, through exactly the code path users take with hub models.

Each model has:

* a byte-level BPE tokenizer trained locally with the ``tokenizers`` library on a corpus
  embedded in the package (English prose, code, Chinese, emoji) plus seeded synthetic
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

This module owns the cache (names, completeness, the atomic publish); the catalogue of
specs is :mod:`~sagellm_backend.testing._tiny_specs`, the tokenizer and its corpus
:mod:`~sagellm_backend.testing._tiny_tokenizer`, the model builder
:mod:`~sagellm_backend.testing._tiny_build`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sagellm_backend.errors import ConfigError
from sagellm_backend.errors import DependencyMissingError as DependencyMissingError
from sagellm_backend.testing._tiny_build import build_model
from sagellm_backend.testing._tiny_specs import SPECS, TinyModelSpec
from sagellm_backend.testing._tiny_tokenizer import BOS_ID as BOS_ID
from sagellm_backend.testing._tiny_tokenizer import CORPUS as CORPUS
from sagellm_backend.testing._tiny_tokenizer import EOS_ID as EOS_ID
from sagellm_backend.testing._tiny_tokenizer import PAD_ID as PAD_ID
from sagellm_backend.testing._tiny_tokenizer import UNK_ID as UNK_ID
from sagellm_backend.testing._tiny_tokenizer import build_tokenizer

# The ``X as X`` imports keep names importable from here that were defined here before
# the catalogue, the tokenizer and the builder moved to their own modules.
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


def _spec_dict(spec: TinyModelSpec) -> dict[str, Any]:
    """The spec as recorded in the cache marker (``extra`` only when non-empty)."""
    out = asdict(spec)
    if not spec.extra:
        del out["extra"]
    else:
        out["extra"] = [list(pair) for pair in spec.extra]
    return out


def list_tiny_models() -> list[str]:
    """Return the names :func:`ensure_tiny_model` accepts, smallest first."""
    return list(SPECS)


def tiny_model_spec(name: str) -> TinyModelSpec:
    """Return the geometry of model ``name``.

    Raises:
        ConfigError: ``name`` is not one of :func:`list_tiny_models`.
    """
    spec = SPECS.get(name)
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
            build_model(spec, tmp)
            _write_marker(tmp, spec)
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


def _write_marker(out: Path, spec: TinyModelSpec) -> None:
    """Record in ``out`` that it holds a finished build of ``spec`` (see :func:`_is_complete`)."""
    meta = {"builder_version": BUILDER_VERSION, "spec": _spec_dict(spec)}
    (out / _MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
