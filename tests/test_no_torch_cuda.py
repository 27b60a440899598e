"""Lint: no ``torch.cuda`` in src/ outside providers/cuda.py (like DeepSpeed's check-torchcuda).

Hardware calls stay in the providers: engines and the shared torch core reach the GPU only
through the provider API. Only code is checked (comments and strings may mention the name).
"""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sagellm_backend"
ALLOWED = {SRC / "providers" / "cuda.py"}


def torch_cuda_uses(source: str) -> list[int]:
    """Line numbers where code (not comments/strings) refers to ``torch.cuda``.

    Catches ``torch.cuda...``, ``import torch.cuda``, ``from torch import cuda``,
    ``from torch.cuda import ...`` and ``getattr(torch, "cuda")``.
    """
    toks = [
        t
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
    ]
    lines: set[int] = set()
    for i, tok in enumerate(toks):
        nxt = toks[i + 1 : i + 4]
        if (
            tok.type == tokenize.NAME
            and tok.string == "torch"
            and len(nxt) >= 2
            and nxt[0].string == "."
            and nxt[1].string == "cuda"
        ):
            lines.add(tok.start[0])
        if tok.string == "getattr" and len(nxt) >= 3 and nxt[1].string == "torch":
            arg = toks[i + 4] if i + 4 < len(toks) else None
            if (
                arg is not None
                and arg.type == tokenize.STRING
                and arg.string.strip("'\"") == "cuda"
            ):
                lines.add(tok.start[0])
        if tok.string == "from" and len(nxt) >= 2 and nxt[0].string == "torch":
            # from torch import ..., cuda, ...
            j = i + 2
            if toks[j].string == "import":
                while j < len(toks) and toks[j].type not in (tokenize.NEWLINE, tokenize.ENDMARKER):
                    if toks[j].string == "cuda":
                        lines.add(tok.start[0])
                    j += 1
    return sorted(lines)


def test_scanner_finds_every_form() -> None:
    bad = (
        "import torch\n"
        "x = torch.cuda.is_available()\n"
        "import torch.cuda\n"
        "from torch import nn, cuda\n"
        "from torch.cuda import Stream\n"
        "y = getattr(torch, 'cuda')\n"
        "# torch.cuda in a comment is fine\n"
        "s = 'torch.cuda in a string is fine'\n"
        "z = torch.device('cuda')\n"
    )
    assert torch_cuda_uses(bad) == [2, 3, 4, 5, 6]


def test_no_torch_cuda_outside_cuda_provider() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert (SRC / "providers" / "cuda.py") in files
    offenders = [
        f"{path.relative_to(SRC.parent)}:{line}"
        for path in files
        if path not in ALLOWED
        for line in torch_cuda_uses(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, (
        "torch.cuda used outside providers/cuda.py (go through the provider API): "
        + ", ".join(offenders)
    )
    # The allowed file really is where the CUDA calls are.
    assert torch_cuda_uses((SRC / "providers" / "cuda.py").read_text(encoding="utf-8"))
