"""The prompts of a ``bench`` run, and the request for each.

Prompts are either synthetic -- ``--input-len`` seeded random token ids of the model's
vocabulary (special tokens excluded; the tokenizer's own leading tokens such as BOS
first) -- or the lines of ``--prompts-file`` (used in turn). With ``--shared-prefix L``
every prompt starts with the same L tokens. The HF engines get the exact token ids
(``Request.metadata["prompt_token_ids"]``); the mock engine gets text that its tokenizer
splits into exactly those lengths.

Invariant: the same arguments and seed give the same prompts; importing this module
imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagellm_backend.cli._common import UsageError, make_request

__all__ = [
    "DEFAULT_INPUT_LEN",
    "DEFAULT_OUTPUT_LEN",
    "DEFAULT_REQUESTS",
    "Workload",
    "build_workload",
    "read_prompts_file",
    "request_for",
]

DEFAULT_REQUESTS = 16
DEFAULT_INPUT_LEN = 128
DEFAULT_OUTPUT_LEN = 64


@dataclass
class Workload:
    """The requests' prompts.

    Invariant: ``len(texts) == len(lengths)`` (== ``len(ids)`` when ids are given);
    ``lengths[i]`` is the prompt's token count as the engine sees it.
    """

    texts: list[str]
    ids: list[list[int]] | None
    lengths: list[int]
    output_len: int
    shared_prefix: int
    prefix_text: str
    prefix_ids: list[int] | None
    source: str


def read_prompts_file(path: Path) -> list[str]:
    """Prompts of a ``--prompts-file`` (see ``--help``).

    Raises:
        UsageError: missing/unreadable file, a bad JSON line, or no prompt in it.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--prompts-file {str(path)!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--prompts-file {str(path)!r}: cannot read it ({exc})") from None
    prompts: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line[0] in '{"':
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(
                    f"--prompts-file {str(path)!r} line {number}: not valid JSON ({exc.msg})"
                ) from None
            if isinstance(value, dict):
                value = value.get("prompt", value.get("text"))
            if not isinstance(value, str) or not value:
                raise UsageError(
                    f"--prompts-file {str(path)!r} line {number}: a JSON line must be a "
                    "non-empty string or an object with a 'prompt' string"
                )
            line = value
        prompts.append(line)
    if not prompts:
        raise UsageError(f"--prompts-file {str(path)!r} holds no prompt")
    return prompts


def _hf_workload(
    tokenizer: Any, args: argparse.Namespace, n: int, file_prompts: list[str] | None
) -> Workload:
    rng = random.Random(args.seed)
    specials = {int(t) for t in getattr(tokenizer, "all_special_ids", []) or []}
    pool = [i for i in range(len(tokenizer)) if i not in specials]
    if not pool:
        raise UsageError("the model's tokenizer has no ordinary tokens to build prompts from")
    lead = [int(t) for t in tokenizer("", add_special_tokens=True)["input_ids"]]

    def draw(k: int) -> list[int]:
        return [rng.choice(pool) for _ in range(max(0, k))]

    prefix: list[int] | None = None
    if args.shared_prefix:
        prefix = (lead + draw(args.shared_prefix))[: args.shared_prefix]
    ids: list[list[int]] = []
    if file_prompts is None:
        input_len = args.input_len or DEFAULT_INPUT_LEN
        for _ in range(n):
            if prefix is not None:
                ids.append(prefix + draw(input_len))
            else:
                ids.append((lead + draw(input_len))[:input_len])
    else:
        encoded = [
            [int(t) for t in tokenizer(p, add_special_tokens=prefix is None)["input_ids"]]
            for p in file_prompts
        ]
        for i in range(n):
            body = encoded[i % len(encoded)]
            ids.append((prefix or []) + body)
    texts = [tokenizer.decode(x, skip_special_tokens=False) or "<prompt>" for x in ids]
    return Workload(
        texts=texts,
        ids=ids,
        lengths=[len(x) for x in ids],
        output_len=args.output_len,
        shared_prefix=args.shared_prefix,
        prefix_text="" if prefix is None else tokenizer.decode(prefix),
        prefix_ids=prefix,
        source="synthetic" if file_prompts is None else f"file:{args.prompts_file}",
    )


def _mock_workload(
    tokenizer: Any, args: argparse.Namespace, n: int, file_prompts: list[str] | None
) -> Workload:
    rng = random.Random(args.seed)
    first = tokenizer.WORD_OFFSET
    words = tokenizer.num_output_words

    def draw(k: int) -> list[int]:
        return [first + rng.randrange(words) for _ in range(k)]

    prefix_ids = draw(args.shared_prefix) if args.shared_prefix else []
    prefix_text = tokenizer.decode(prefix_ids)
    texts: list[str] = []
    if file_prompts is None:
        input_len = args.input_len or DEFAULT_INPUT_LEN
        texts = [tokenizer.decode(prefix_ids + draw(input_len)) for _ in range(n)]
    else:
        texts = [prefix_text + file_prompts[i % len(file_prompts)] for i in range(n)]
    return Workload(
        texts=texts,
        ids=None,
        lengths=[len(tokenizer.encode(t)) for t in texts],
        output_len=args.output_len,
        shared_prefix=args.shared_prefix,
        prefix_text=prefix_text,
        prefix_ids=None,
        source="synthetic" if file_prompts is None else f"file:{args.prompts_file}",
    )


def build_workload(
    engine: Any, kind: str, args: argparse.Namespace, n: int, file_prompts: list[str] | None
) -> Workload:
    """The prompts of the run, from the started engine's tokenizer (see module docstring)."""
    tokenizer = engine.tokenizer
    if kind == "mock":
        return _mock_workload(tokenizer, args, n, file_prompts)
    return _hf_workload(tokenizer, args, n, file_prompts)


def request_for(wl: Workload, i: int, label: str, stream: bool, tag: str) -> Any:
    """The protocol Request of prompt ``i`` (greedy, end of sequence ignored, ``tag-i``)."""
    metadata: dict[str, Any] = {"ignore_eos": True}
    if wl.ids is not None:
        metadata["prompt_token_ids"] = list(wl.ids[i])
    return make_request(
        f"{tag}-{i}",
        model=label,
        prompt=wl.texts[i],
        max_tokens=wl.output_len,
        stream=stream,
        metadata=metadata,
        trace_id=f"bench-{tag}",
    )
