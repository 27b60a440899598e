"""``sagellm-backend demo``: the library at work in one command, offline.

Steps, each printed as it happens (stdout):

1. the installed backends (entry points ``sagellm.backends``) with their state, priority
   and package, why unavailable ones are unavailable, and the backend auto-selection with
   its reason; the engine kind follows it (``--engine`` overrides);
2. the model: by default the offline ``tiny-llama`` (built on first use and cached; its
   weights are random, so its text is gibberish), or ``--model`` (any Hugging Face model
   directory or hub id the machine can load);
3. the engine (CPUEngine on the cpu backend, HFCudaEngine on cuda, MockEngine on mock),
   started;
4. one request streamed token by token (each delta printed as it arrives; control
   characters escaped), then the request's protocol Metrics as a table of every field,
   timestamps and component_trace included.

Exit status: 0 on success; 1 when the engine cannot be created or started, the backend
selection fails (e.g. ``SAGELLM_BACKEND`` names an unknown kind) or the request fails; 2
for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import textwrap
import time
from typing import Any, TextIO

from sagellm_backend.cli import _common
from sagellm_backend.cli._common import create_engine
from sagellm_backend.cli._common import engine_settings as engine_settings  # was importable
from sagellm_backend.cli._common import make_request as make_request  # was importable
from sagellm_backend.cli._metrics import metrics_rows
from sagellm_backend.cli._options import add_engine_arguments, add_sampling_arguments
from sagellm_backend.cli._table import render_table, safe_text, terminal_width

__all__ = ["DEFAULT_MODEL", "DEFAULT_PROMPT", "add_arguments", "run"]

#: The model the demo runs when ``--model`` is not given (built offline on first use).
DEFAULT_MODEL = "tiny-llama"
#: The prompt the demo sends when ``--prompt`` is not given.
DEFAULT_PROMPT = "Once upon a time, a tiny language model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``demo``."""
    parser.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help=f"the prompt (default {DEFAULT_PROMPT!r})"
    )
    add_sampling_arguments(parser, default_max_tokens=32)
    add_engine_arguments(
        parser,
        model_help=(
            f"a Hugging Face model directory or hub id to run instead of the offline "
            f"{DEFAULT_MODEL!r} (random weights); also tiny-gpt2 or bench-llama"
        ),
    )


def _wrap(text: str, indent: str, width: int) -> str:
    return textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=indent + "  ")


def _backends_section(out: TextIO, width: int) -> None:
    from sagellm_backend.registry import BACKENDS_GROUP, list_backends

    statuses = list_backends()
    out.write(f"[1/4] Backends found (entry points {BACKENDS_GROUP})\n")
    rows = [[s.name, s.state.value, str(s.priority), s.package] for s in statuses]
    if rows:
        out.write(render_table(["KIND", "STATE", "PRIORITY", "PACKAGE"], rows, indent=2) + "\n")
    else:
        out.write("  (no backend plugins installed)\n")
    for s in statuses:
        if not s.available:
            out.write(_wrap(f"{s.name} is {s.state.value}: {s.reason}", "  ", width) + "\n")


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Execute ``demo`` (see the module docstring)."""
    from sagellm_backend._version import __version__

    width = min(terminal_width(), 100)
    out.write(f"sageLLM backend demo (sagellm-backend {__version__})\n\n")
    _backends_section(out, width)
    if args.engine == "auto":
        kind, reason = _common.resolve_engine_kind("auto")
        out.write(f"  Selected backend: {kind}\n")
        out.write(_wrap(f"because: {reason}", "    ", width) + "\n")
        out.write(f"  Engine kind: {kind} (follows the selected backend)\n\n")
    else:
        kind, reason = _common.resolve_engine_kind(args.engine)
        out.write(f"  Engine kind: {kind} ({reason}; backend auto-selection not used)\n\n")
    out.flush()

    out.write("[2/4] Model\n")
    model_path, label = _common.resolve_model(
        kind, args.model, default=None if kind == "mock" else DEFAULT_MODEL, err=err
    )
    out.write(_wrap(f"{label}{_model_note(label, kind)}", "  ", width) + "\n")
    if model_path is not None and model_path != label:
        out.write(f"  path: {model_path}\n")
    out.write("\n[3/4] Engine\n")
    out.flush()
    engine, request = _common.one_request_engine(
        args, create_engine, "demo", kind, (model_path, label), stream=True
    )
    end = asyncio.run(_stream(engine, request, args, out))
    out.write("\nMetrics of this request (protocol Metrics, every field)\n")
    out.write(render_table(["FIELD", "VALUE", "MEANING"], metrics_rows(end.metrics), indent=2))
    out.write("\n")
    out.flush()
    return _common.request_exit_status("demo", end, err)


def _model_note(label: str, kind: str) -> str:
    if kind == "mock":
        return ": no weights, the mock engine simulates one (deterministic pseudo-words)"
    from sagellm_backend.testing.tiny_models import list_tiny_models, tiny_model_spec

    if label in list_tiny_models():
        spec = tiny_model_spec(label)
        return (
            f": {spec.description}; built offline and cached. Its weights are random, so the "
            "text is gibberish: pass --model for a real model"
        )
    return ""


async def _stream(engine: Any, request: Any, args: argparse.Namespace, out: TextIO) -> Any:
    """Start the engine, stream the request to ``out`` delta by delta, stop; the end event."""
    from sagellm_protocol import StreamEventDelta, StreamEventStart

    t0 = time.perf_counter()
    async with _common.started(engine):
        out.write(
            f"  {_common.engine_description(engine)}, started in {time.perf_counter() - t0:.2f} s\n"
        )
        out.write(f"\n[4/4] Generation, streamed token by token (at most {args.max_tokens})\n")
        out.write(f"  prompt: {safe_text(request.prompt)}\n")
        out.write("  output: ")
        out.flush()
        deltas = 0
        prompt_tokens: int | None = None

        def show(event: Any) -> None:
            nonlocal deltas, prompt_tokens
            if isinstance(event, StreamEventStart):
                prompt_tokens = event.prompt_tokens
            elif isinstance(event, StreamEventDelta):
                deltas += 1
                out.write(safe_text(event.chunk).replace("\n", "\n          "))
                out.flush()

        end = await _common.stream_end(engine, request, show)
        prompt = "?" if prompt_tokens is None else str(prompt_tokens)
        out.write(
            f"\n  ({prompt} prompt tokens; {len(end.output_tokens)} output tokens in {deltas} "
            f"deltas; finish reason {end.finish_reason})\n"
        )
        return end


_common.register_guarded(
    "demo",
    add_arguments,
    run,
    help="show the backends, pick one, stream a generation and its metrics (offline)",
    description=(
        "The one-command tour: list the installed backends and the auto-selected one "
        "(with the reason), load the offline tiny model (or --model), stream a generation "
        "token by token through the engine, and print the request's metrics. Works with "
        "no network."
    ),
)
