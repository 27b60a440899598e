"""Helpers for the 0.1.1.2 compatibility tests: run a script where torch cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")

#: Prepended to scripts: makes ``import torch`` fail as on a base install without torch.
BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.util, sys
    class _BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("No module named 'torch' (blocked)")
            return None
    sys.meta_path.insert(0, _BlockTorch())
    importlib.util.find_spec = (lambda f: lambda name, *a: None
        if name == "torch" or name.startswith("torch.") else f(name, *a))(
        importlib.util.find_spec)
    """
)


def run_without_torch(script: str) -> list[str]:
    """Run ``script`` in a fresh interpreter where torch cannot be imported; its stdout lines.

    The script must not import torch (asserted at the end).
    """
    code = BLOCK_TORCH + textwrap.dedent(script) + "\nassert 'torch' not in sys.modules\n"
    # SRC first; a PYTHONPATH already set (e.g. an older isagellm-protocol) stays behind it
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.splitlines()


@pytest.fixture
def without_torch() -> object:
    """The :func:`run_without_torch` helper as a fixture."""
    return run_without_torch
