"""``sagellm-backend generate``: run one request through an engine.

Output (stdout):

* default: the generated text (with ``--stream``, printed chunk by chunk as the engine
  produces it), then a one-line summary on stderr (engine, tokens, finish reason, TTFT,
  TPOT, tokens/s); ``--metrics`` adds the table of every Metrics field on stderr;
* ``--json``: the protocol :class:`~sagellm_protocol.Response` as one JSON object
  (``Response.model_dump_json()``); with ``--stream`` one JSON object per protocol stream
  event (JSON Lines: ``start``, ``delta``..., ``end``; the end event carries the Response
  fields).

Exit status: 0 when the request finished (``stop`` or ``length``), 1 when the engine could
not be created/started or the request ended with ``finish_reason="error"`` (its protocol
error on one line on stderr; with ``--json`` the Response/end event is printed first), 2 for
bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any, TextIO

from sagellm_backend.cli import _common
from sagellm_backend.cli._common import UsageError, create_engine
from sagellm_backend.cli._common import engine_settings as engine_settings  # was importable
from sagellm_backend.cli._common import make_request as make_request  # was importable
from sagellm_backend.cli._metrics import metrics_rows
from sagellm_backend.cli._options import add_engine_arguments, add_sampling_arguments
from sagellm_backend.cli._table import fmt_ms, render_table

__all__ = ["add_arguments", "run"]

_MODEL_HELP = (
    "model to load: a Hugging Face model directory, a hub id ('org/name'), or a built-in "
    "offline model (tiny-llama, tiny-gpt2, bench-llama, ...; a bad name lists them). Required "
    "for cpu and cuda; "
    "optional for mock (its name only)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``generate``."""
    parser.add_argument("--prompt", required=True, help="the prompt text")
    add_sampling_arguments(parser, default_max_tokens=64)
    parser.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating after the end-of-sequence token (exactly --max-tokens tokens)",
    )
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the protocol Response as JSON (with --stream: one JSON line per event)",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="also print every Metrics field of the request (stderr)",
    )
    add_engine_arguments(parser, model_help=_MODEL_HELP)


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Execute ``generate`` (see the module docstring for output and exit status)."""
    if args.top_p is not None and not args.temperature:
        raise UsageError("--top-p applies when sampling: give --temperature > 0 as well")
    kind, _reason = _common.resolve_engine_kind(args.engine)
    model_path, label = _common.resolve_model(kind, args.model, err=err)
    metadata: dict[str, Any] = {"ignore_eos": True} if args.ignore_eos else {}
    engine, request = _common.one_request_engine(
        args,
        create_engine,
        "generate",
        kind,
        (model_path, label),
        stream=args.stream,
        metadata=metadata,
    )
    result = asyncio.run(_generate(engine, request, args, out))
    if not args.json:
        if not result.output_text.endswith("\n"):
            out.write("\n")
        out.flush()
        m = result.metrics
        err.write(
            f"[{_common.engine_description(engine)}; {len(result.output_tokens)} tokens, finish "
            f"{result.finish_reason}; TTFT {fmt_ms(m.ttft_ms)} ms, TPOT {fmt_ms(m.tpot_ms)} "
            f"ms, {m.throughput_tps:.1f} tok/s]\n"
        )
    if args.metrics:
        err.write(render_table(["FIELD", "VALUE", "MEANING"], metrics_rows(result.metrics)) + "\n")
    return _common.request_exit_status("generate", result, err)


async def _generate(engine: Any, request: Any, args: argparse.Namespace, out: TextIO) -> Any:
    """Start the engine, run the request (streamed or not), stop; returns the Response."""
    from sagellm_protocol import Response, StreamEventDelta

    def show(event: Any) -> None:
        if args.json:
            out.write(event.model_dump_json() + "\n")
            out.flush()
        elif isinstance(event, StreamEventDelta):
            out.write(event.chunk)
            out.flush()

    async with _common.started(engine):
        if not args.stream:
            response = await engine.execute(request)
            if args.json:
                out.write(response.model_dump_json() + "\n")
            else:
                out.write(response.output_text)
            return response
        end = await _common.stream_end(engine, request, show)
        return Response(
            request_id=end.request_id,
            trace_id=end.trace_id,
            output_text=end.output_text,
            output_tokens=list(end.output_tokens),
            finish_reason=end.finish_reason,
            metrics=end.metrics,
            error=end.error,
        )


_common.register_guarded(
    "generate",
    add_arguments,
    run,
    help="run one request through an engine (text, streamed text or protocol JSON)",
    description=(
        "Run one request through the cpu, cuda or mock engine and print the generated "
        "text (--stream: as it is produced) or the protocol Response as JSON (--json). "
        "Exit status 1 when the engine cannot start or the request fails, 2 for bad "
        "arguments."
    ),
)
