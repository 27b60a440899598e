"""The README's Python examples run as written (except those that need a GPU or the hub)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
#: Markers of examples that cannot run on a CPU-only, offline machine.
NEEDS_GPU_OR_HUB = ("HFCudaEngine(", "from my_plugin")


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int, tmp_path: Path) -> None:
    code = BLOCKS[index]
    if any(marker in code for marker in NEEDS_GPU_OR_HUB):
        pytest.skip("example needs a GPU, the hub or a third-party package")
    script = tmp_path / f"readme_{index}.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"README block {index} failed:\n{code}\n{proc.stderr[-3000:]}"
