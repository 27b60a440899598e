"""load_model_and_tokenizer: the tiny models load through it; every failure is clear."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch

from sagellm_backend.engine.hf import loader
from sagellm_backend.engine.hf.loader import load_model_and_tokenizer, resolve_torch_dtype
from sagellm_backend.errors import BackendNotAvailableError, ConfigError, DependencyMissingError
from sagellm_backend.testing.tiny_models import ensure_tiny_model

SRC = Path(__file__).resolve().parents[3] / "src" / "sagellm_backend"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    ensure_tiny_model("tiny-llama", root)
    ensure_tiny_model("tiny-gpt2", root)
    return root


def _path(models: Path, name: str) -> str:
    return str(next(models.glob(f"{name}-v*")))


def _load(path: str, **kw: Any) -> tuple[Any, Any]:
    args: dict[str, Any] = {
        "device": "cpu",
        "dtype": "float32",
        "device_map": None,
        "load_in_8bit": False,
        "load_in_4bit": False,
        "trust_remote_code": False,
    }
    args.update(kw)
    return load_model_and_tokenizer(path, **args)


def test_loads_tiny_llama_in_eval_mode(models: Path) -> None:
    model, tok = _load(_path(models, "tiny-llama"))
    assert not model.training
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    assert tok.pad_token_id == 0 == model.generation_config.pad_token_id
    ids = torch.tensor([tok("hello")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("auto", torch.float32)],
)
def test_dtype_mapping(models: Path, dtype: str, expected: torch.dtype) -> None:
    model, _ = _load(_path(models, "tiny-gpt2"), dtype=dtype)
    assert model.dtype == expected


def test_dtype_aliases_and_bad_names() -> None:
    assert resolve_torch_dtype("bf16") is torch.bfloat16
    assert resolve_torch_dtype("FP16") is torch.float16
    assert resolve_torch_dtype("auto") == "auto"
    with pytest.raises(ConfigError, match=r"dtype 'int3' is not supported; valid values"):
        resolve_torch_dtype("int3")


def test_device_map_is_passed_to_transformers(
    models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("accelerate not installed")
    import transformers

    seen: dict[str, Any] = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = _load(_path(models, "tiny-llama"), device_map="auto")
    assert seen["device_map"] == "auto"
    assert seen["dtype"] is torch.float32
    assert model.device.type == "cpu"


def test_pad_token_falls_back_to_eos(models: Path, tmp_path: Path) -> None:
    src = Path(_path(models, "tiny-gpt2"))
    dst = tmp_path / "no-pad"
    shutil.copytree(src, dst)
    cfg_file = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("pad_token")
    cfg_file.write_text(json.dumps(cfg))
    gen_file = dst / "generation_config.json"
    gen = json.loads(gen_file.read_text())
    gen.pop("pad_token_id")
    gen_file.write_text(json.dumps(gen))
    model, tok = _load(str(dst))
    assert tok.pad_token == "</s>"
    assert tok.pad_token_id == tok.eos_token_id == model.generation_config.pad_token_id


# ---- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "resolved"),
    [
        ("/no/such/model-dir", "/no/such/model-dir"),
        ("./missing-model", "{cwd}/missing-model"),
        ("~/no-such-model-dir-xyz", "{home}/no-such-model-dir-xyz"),
        ("models/tiny/llama", "{cwd}/models/tiny/llama"),
    ],
)
def test_missing_local_path_fails_at_once_naming_the_directory(
    path: str, resolved: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    expected = resolved.format(cwd=tmp_path, home=Path.home())
    with pytest.raises(ConfigError) as err:
        _load(path)
    msg = str(err.value)
    assert "does not exist" in msg and f"no local directory {expected!r}" in msg, msg
    # the working directory is named only where it was used: for relative paths
    relative = not Path(path).expanduser().is_absolute()
    assert (f"working directory {str(tmp_path)!r}" in msg) == relative, msg


def test_hub_id_that_cannot_be_resolved_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19.5: 'models/tiny-llama' could be a hub id: the error says both answers."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        _load("models/tiny-llama")
    msg = str(err.value)
    assert f"no local directory {str(tmp_path / 'models' / 'tiny-llama')!r}" in msg, msg
    assert f"working directory {str(tmp_path)!r}" in msg, msg
    assert "HF_HUB_OFFLINE" in msg and "answered" in msg, msg
    # the hub is off already: the hint does not ask to switch it off
    assert "set HF_HUB_OFFLINE=1" not in msg and "pass a local model directory" in msg, msg


def test_unreachable_hub_fails_fast_with_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19.5: no network -> the local hub cache only, one clear error, in seconds."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.lower(), raising=False)
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        _load("no-such-org/no-such-model")
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "cannot connect to the Hugging Face hub http://127.0.0.1:9" in msg, msg
    assert "no local directory" in msg and "HF_HUB_OFFLINE=1" in msg, msg


def test_file_and_dir_without_config(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a file"):
        _load(str(f))
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        _load(str(tmp_path))


def test_unsupported_architecture_names_model_type(tmp_path: Path) -> None:
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"model_type 'vit'.*no causal-LM class.*llama"):
        _load(str(tmp_path))


def test_unknown_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnicator"}))
    with pytest.raises(ConfigError, match=r"model_type 'frobnicator'.*does not know"):
        _load(str(tmp_path))


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"dtype": "int4"}, "dtype 'int4'"),
        ({"device": "gpu0"}, "device 'gpu0' is not a valid torch device"),
        ({"device_map": "everywhere"}, "device_map 'everywhere'"),
        ({"device_map": 3}, "device_map must be"),
        ({"load_in_8bit": True, "load_in_4bit": True}, "mutually exclusive"),
    ],
)
def test_bad_arguments(models: Path, kw: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        _load(_path(models, "tiny-llama"), **kw)


@pytest.mark.parametrize("flag", ["load_in_8bit", "load_in_4bit"])
def test_quantisation_without_bitsandbytes(
    models: Path, monkeypatch: pytest.MonkeyPatch, flag: str
) -> None:
    real = importlib.util.find_spec

    def no_bnb(name: str, *a: Any) -> Any:
        return None if name == "bitsandbytes" else real(name, *a)

    monkeypatch.setattr(loader.importlib.util, "find_spec", no_bnb)
    with pytest.raises(DependencyMissingError, match=r"pip install 'isagellm-backend\[quant\]'"):
        _load(_path(models, "tiny-llama"), **{flag: True})


def test_transformers_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(DependencyMissingError, match=r"pip install 'isagellm-backend\[hf\]'"):
        _load("/any/model")


def test_device_torch_cannot_use(models: Path) -> None:
    if torch.backends.cuda.is_built():
        pytest.skip("this torch has CUDA: placing on cuda may succeed")
    with pytest.raises(BackendNotAvailableError, match=r"cannot move model .* to device 'cuda:0'"):
        _load(_path(models, "tiny-llama"), device="cuda:0")


def test_no_direct_cuda_calls_in_engine_helpers() -> None:
    for rel in (
        "engine/hf/loader.py",
        "engine/hf/_load_checks.py",
        "engine/hf/_quant.py",
        "engine/hf/detok.py",
        "testing/tiny_models.py",
        "testing/_tiny_build.py",
        "testing/_tiny_tokenizer.py",
    ):
        assert "torch.cuda" not in (SRC / rel).read_text(), rel


# ---- issue 19 through the engine: wrong checkpoints say what is wrong ------------------


def _copy_with_config(models: Path, tmp_path: Path, name: str, **changes: Any) -> str:
    dst = tmp_path / f"{name}-edited"
    shutil.copytree(_path(models, name), dst)
    cfg_file = dst / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))
    return str(dst)


async def test_config_that_does_not_match_the_weights(
    models: Path, tmp_path: Path, engine_factory: Any
) -> None:
    """Issue 19.6: a ConfigError naming the path and the mismatched tensors."""
    path = _copy_with_config(models, tmp_path, "tiny-llama", intermediate_size=96)
    engine = engine_factory(path)
    with pytest.raises(ConfigError) as err:
        await engine.start()
    msg = str(err.value)
    assert path in msg and "do not match its config.json" in msg, msg
    assert "mlp.gate_proj.weight: checkpoint [128, 64] vs config [96, 64]" in msg, msg
    assert "mlp.down_proj.weight: checkpoint [64, 128] vs config [64, 96]" in msg, msg
    assert not engine.is_running and engine.model is None


async def test_zero_context_length_says_which_context_is_used(
    models: Path, tmp_path: Path, engine_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 19.9: max_position_embeddings 0 -> a warning naming the context used and why."""
    path = _copy_with_config(models, tmp_path, "tiny-llama", max_position_embeddings=0)
    engine = engine_factory(path)
    with caplog.at_level(logging.WARNING, logger="sagellm_backend.engine.hf.loader"):
        await engine.start()
    warned = [
        r.getMessage() for r in caplog.records if "max_position_embeddings=0" in r.getMessage()
    ]
    assert len(warned) == 1, caplog.text
    assert f"uses a context of {engine.max_context} tokens" in warned[0]
    assert path in warned[0] and "max_model_len" in warned[0]
    assert engine.max_context == 2048


async def test_mistyped_relative_path_through_the_engine(
    engine_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19.5 as a user meets it: CPUEngine.start() names the missing directory."""
    monkeypatch.chdir(tmp_path)
    for path in ("models/tiny-llama", "./models/tiny-llama"):
        engine = engine_factory(path)
        t0 = time.monotonic()
        with pytest.raises(ConfigError) as err:
            await engine.start()
        assert time.monotonic() - t0 < 10
        msg = str(err.value)
        assert f"no local directory {str(tmp_path / 'models' / 'tiny-llama')!r}" in msg, msg
        assert not engine.is_running and engine.model is None
