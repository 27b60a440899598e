"""``sagellm-backend info --model PATH`` names the runner a model gets, and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sagellm_backend import cli

pytest.importorskip("transformers")
pytestmark = pytest.mark.hf


@pytest.mark.parametrize(
    ("name", "runner", "why"),
    [
        ("tiny-phi3", "paged", "custom attention"),
        ("tiny-bloom", "hf-batched", "Bloom"),
        ("tiny-deepseek-v3", "hf-batched", "latent attention"),
    ],
)
def test_info_model_json_and_text(
    capsys: pytest.CaptureFixture[str], name: str, runner: str, why: str
) -> None:
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    path = str(ensure_tiny_model(name))
    assert cli.main(["info", "--json", "--no-inspect", "--model", path]) == 0
    got = json.loads(capsys.readouterr().out)["model_runner"]
    assert got["runner"] == runner and why in got["reason"] and got["model"] == path
    cli.main(["info", "--no-inspect", "--model", path])
    text = capsys.readouterr().out
    assert f"runner {runner}" in text and "because:" in text


def test_info_model_on_a_directory_without_config_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main(["info", "--json", "--no-inspect", "--model", str(tmp_path)]) == 1
    got = json.loads(capsys.readouterr().out)["model_runner"]
    assert "config.json" in got["error"]


def test_info_model_takes_a_built_in_name_and_names_a_missing_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main(["info", "--json", "--no-inspect", "--model", "tiny-bloom"]) == 0
    got = json.loads(capsys.readouterr().out)["model_runner"]
    assert got["model"] == "tiny-bloom" and got["runner"] == "hf-batched"
    missing = str(tmp_path / "nope")
    assert cli.main(["info", "--json", "--no-inspect", "--model", missing]) == 1
    got = json.loads(capsys.readouterr().out)["model_runner"]
    assert "no such directory" in got["error"] and "tiny-llama" in got["error"]
