"""Offline tiny models: HF format, loadable offline, cached once, built atomically."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sagellm_backend.errors import ConfigError
from sagellm_backend.testing import tiny_models
from sagellm_backend.testing.tiny_models import (
    BUILDER_VERSION,
    CORPUS,
    ensure_tiny_model,
    list_tiny_models,
    tiny_model_spec,
)

pytest.importorskip("transformers")


def test_list_and_specs() -> None:
    names = list_tiny_models()
    assert names[:2] == ["tiny-llama", "tiny-gpt2"] and names[-6:] == [
        "bench-llama",
        "bench-gpt2",
        "bench-phi3",
        "bench-bloom",
        "bench-mamba",
        "bench-qwen3-next",
    ]
    assert {"tiny-mistral", "tiny-gemma2", "tiny-bloom", "tiny-mamba"} <= set(names)
    # Specs without extras keep the cache marker they had (no rebuild of existing caches).
    assert "extra" not in tiny_models._spec_dict(tiny_model_spec("tiny-llama"))
    assert dict(tiny_model_spec("tiny-gemma2").extra)["attn_logit_softcapping"] == 50.0
    bench = tiny_model_spec("bench-llama")
    assert (bench.hidden_size, bench.intermediate_size, bench.num_layers) == (512, 1536, 8)
    assert (bench.num_heads, bench.num_kv_heads, bench.vocab_size) == (8, 4, 8000)


def test_unknown_name_names_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown tiny model 'nope'.*tiny-llama, tiny-gpt2"):
        ensure_tiny_model("nope", tmp_path)


def test_cache_dir_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        ensure_tiny_model("tiny-llama", f)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_builds_a_model_transformers_loads_offline(tmp_path: Path, name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_tiny_model(name, tmp_path)
    assert path == tmp_path / f"{name}-v{BUILDER_VERSION}"
    spec = tiny_model_spec(name)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert model.config.model_type == spec.architecture
    assert model.config.vocab_size == len(tok) == spec.vocab_size
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    # Byte-level BPE: any text round-trips, multi-byte characters included.
    for text in (CORPUS, "你好，世界 🚀🤖 naïve ~ \x00\x7f"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    ids = tok("hello")["input_ids"]
    assert (ids[0] == 1) == (spec.architecture == "llama"), "Llama prepends <s>, GPT-2 not"
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id
    )
    assert out.shape[1] <= len(ids) + 4


def test_reused_when_present_and_weights_are_seeded(tmp_path: Path) -> None:
    a = ensure_tiny_model("tiny-llama", tmp_path / "a")
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model("tiny-llama", tmp_path / "a") == a
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp, "rebuilt instead of reused"
    b = ensure_tiny_model("tiny-llama", tmp_path / "b")
    from safetensors.numpy import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa), "same seed must give the same weights"
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_concurrent_builders_publish_one_complete_dir(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(ensure_tiny_model("tiny-gpt2", tmp_path))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    # Threads share one lock; a second *process* races through the atomic rename.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from sagellm_backend.testing.tiny_models import ensure_tiny_model;"
            "print(ensure_tiny_model('tiny-gpt2', sys.argv[1]))",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert not errors
    assert len(set(results)) == 1
    assert Path(out.strip()) == results[0]
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny-gpt2-v{BUILDER_VERSION}"], (
        "temporary build directories were left behind"
    )


def test_incomplete_or_stale_cache_is_rebuilt(tmp_path: Path) -> None:
    final = tmp_path / f"tiny-llama-v{BUILDER_VERSION}"
    final.mkdir()
    (final / "config.json").write_text("{}")  # half-written by something else, no marker
    path = ensure_tiny_model("tiny-llama", tmp_path)
    assert path == final
    assert json.loads((final / "config.json").read_text())["model_type"] == "llama"
    marker = json.loads((final / "sagellm_tiny_model.json").read_text())
    assert marker["builder_version"] == BUILDER_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


def test_default_cache_root_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_BACKEND_CACHE", str(tmp_path / "env"))
    assert tiny_models.default_cache_root() == tmp_path / "env"
    monkeypatch.delenv("SAGELLM_BACKEND_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tiny_models.default_cache_root() == tmp_path / "xdg" / "sagellm-backend" / "models"
    monkeypatch.setenv("SAGELLM_BACKEND_CACHE", str(tmp_path / "env"))
    assert ensure_tiny_model("tiny-gpt2").parent == tmp_path / "env"


def test_import_is_light() -> None:
    code = (
        "import sys, sagellm_backend.testing.tiny_models\n"
        "bad = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_bench_llama_geometry(tmp_path: Path) -> None:
    from transformers import AutoConfig

    path = ensure_tiny_model("bench-llama", tmp_path)
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (512, 8, 4)
    from safetensors.numpy import load_file

    params = sum(t.size for t in load_file(path / "model.safetensors").values())
    assert 32_000_000 < params < 35_000_000
