"""What the ``generate``, ``bench`` and ``demo`` commands share.

* argparse value types that reject bad numbers with a message naming the valid range
  (argparse turns them into ``error: argument --x: ...`` and exit status 2);
* the engine options (``--engine``, ``--model``, ``--dtype``, ...), their resolution to an
  engine kind and a model path (the built-in offline models are accepted by name), and
  :func:`create_engine`;
* :func:`guarded`, the wrapper every ``run`` goes through: a :class:`UsageError` becomes
  the subcommand's usage message and exit status 2, any other exception one line on stderr
  and exit status 1 (the traceback only with ``--log-level DEBUG``), Ctrl-C exit 130;
* the protocol Metrics as table rows (:func:`metrics_rows`) and :func:`percentile`.

Invariant: importing this module imports neither torch nor transformers; the engine
modules are imported inside :func:`create_engine`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "DTYPE_CHOICES",
    "ENGINE_CHOICES",
    "EngineSettings",
    "UsageError",
    "add_engine_arguments",
    "add_sampling_arguments",
    "create_engine",
    "describe_exception",
    "engine_settings",
    "guarded",
    "make_request",
    "metrics_rows",
    "non_negative_float",
    "non_negative_int",
    "percentile",
    "positive_int",
    "quiet_transformers",
    "request_error_text",
    "resolve_engine_kind",
    "resolve_model",
    "temperature_value",
    "top_p_value",
]

_log = logging.getLogger("sagellm_backend.cli")

#: Values of ``--engine``: ``auto`` follows the backend auto-selection (SAGELLM_BACKEND,
#: else the highest-priority available backend).
ENGINE_CHOICES = ("auto", "cpu", "cuda", "mock")
#: Engine kinds with a built-in engine class.
BUILTIN_KINDS = ("cpu", "cuda", "mock")
#: Values of ``--dtype``.
DTYPE_CHOICES = ("float32", "float16", "bfloat16", "auto")
#: ``--dtype`` when not given, per engine kind.
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "auto"}

_MIB = 1 << 20


class UsageError(Exception):
    """A bad combination of arguments: reported with the usage line, exit status 2."""


# ----------------------------------------------------------------------------- arg types


def _int_at_least(text: str, minimum: int) -> int:
    valid = f"an integer >= {minimum}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """Parse (argparse type) an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """Parse (argparse type) an integer >= 0."""
    return _int_at_least(text, 0)


def _float(text: str, valid: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """Parse (argparse type) a finite number >= 0."""
    value = _float(text, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def temperature_value(text: str) -> float:
    """Parse (argparse type) a sampling temperature in [0, 2] (0 means greedy)."""
    valid = "a number in [0, 2] (0 = greedy)"
    value = _float(text, valid)
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}")
    return value


def top_p_value(text: str) -> float:
    """Parse (argparse type) a nucleus-sampling threshold in (0, 1]."""
    valid = "a number in (0, 1]"
    value = _float(text, valid)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}")
    return value


# ----------------------------------------------------------------------------- request args


def add_sampling_arguments(parser: argparse.ArgumentParser, *, default_max_tokens: int) -> None:
    """Add the options of one request: ``--max-tokens``, ``--temperature``, ``--top-p``, ``--seed``.

    Their destinations: ``max_tokens`` (>= 1, default ``default_max_tokens``),
    ``temperature`` (None or in [0, 2]), ``top_p`` (None or in (0, 1]), ``seed`` (None or an
    int).
    """
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        default=default_max_tokens,
        metavar="N",
        help=f"most tokens to generate (>= 1, default {default_max_tokens})",
    )
    parser.add_argument(
        "--temperature",
        type=temperature_value,
        default=None,
        metavar="T",
        help="sampling temperature in [0, 2]; 0 or unset: greedy",
    )
    parser.add_argument(
        "--top-p",
        type=top_p_value,
        default=None,
        metavar="P",
        help="nucleus sampling threshold in (0, 1] (applies when sampling)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the request's sampler (HF engines)"
    )


# ----------------------------------------------------------------------------- engine args


def add_engine_arguments(parser: argparse.ArgumentParser, *, model_help: str) -> None:
    """Add the options that choose and configure the engine.

    ``--engine`` (auto/cpu/cuda/mock), ``--model``, ``--dtype``, ``--device``,
    ``--threads``, ``--trust-remote-code``, ``--no-prefix-caching``, ``--mock-ttft-ms``,
    ``--mock-latency-ms``. Also remembers ``parser`` so that :func:`guarded` can report a
    :class:`UsageError` with this subcommand's usage line.
    """
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--engine",
        default="auto",
        choices=ENGINE_CHOICES,
        help="engine kind: cpu (HF model on the CPU), cuda (HF model on a GPU), mock "
        "(simulated model, no dependencies) or auto (follow the backend auto-selection: "
        "SAGELLM_BACKEND, else cuda when a GPU is usable, else cpu). Default: auto",
    )
    group.add_argument("--model", metavar="MODEL", default=None, help=model_help)
    group.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="weights dtype (default: float32 on cpu, the checkpoint's own (auto) on cuda)",
    )
    group.add_argument(
        "--device", default=None, metavar="cuda:N", help="GPU for --engine cuda (default cuda:0)"
    )
    group.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="torch intra-op threads for --engine cpu (default: torch's own setting)",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code shipped with the checkpoint (Hugging Face trust_remote_code)",
    )
    group.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="disable the engine's prefix cache (reuse of a repeated prompt prefix's KV)",
    )
    group.add_argument(
        "--mock-ttft-ms",
        type=non_negative_float,
        default=50.0,
        metavar="MS",
        help="--engine mock: simulated duration of a prefill step (default 50)",
    )
    group.add_argument(
        "--mock-latency-ms",
        type=non_negative_float,
        default=10.0,
        metavar="MS",
        help="--engine mock: simulated duration of a decode step (default 10)",
    )
    parser.set_defaults(_command_parser=parser)


def resolve_engine_kind(requested: str) -> tuple[str, str]:
    """Map ``--engine`` to an engine kind and the reason for it.

    ``auto`` follows :func:`sagellm_backend.registry.select_backend` (``SAGELLM_BACKEND``,
    else the highest-priority available backend; the mock is never auto-selected).

    Raises:
        ConfigError: ``SAGELLM_BACKEND`` names an unknown kind, or the selected backend
            kind has no built-in engine.
        BackendNotAvailableError: no backend can run here, or the one named is unavailable.
    """
    if requested != "auto":
        return requested, f"requested with --engine {requested}"
    from sagellm_backend.errors import ConfigError
    from sagellm_backend.registry import select_backend

    selection = select_backend()
    if selection.kind not in BUILTIN_KINDS:
        raise ConfigError(
            f"backend {selection.kind!r} was selected ({selection.reason}) but has no "
            f"built-in engine; pass --engine with one of {', '.join(BUILTIN_KINDS)}"
        )
    return selection.kind, selection.reason


def _tiny_cached(name: str) -> bool:
    from sagellm_backend.engine.tiny_models import BUILDER_VERSION, default_cache_root

    return (default_cache_root() / f"{name}-v{BUILDER_VERSION}" / "config.json").is_file()


def resolve_model(
    kind: str,
    model: str | None,
    *,
    default: str | None = None,
    err: TextIO | None = None,
) -> tuple[str | None, str]:
    """Turn ``--model`` into what the engine loads, and a label for display.

    * ``None``: ``default`` when given; the mock needs no model; else a :class:`UsageError`.
    * A built-in offline model name (``tiny-llama``, ``bench-llama``, ...) that is not a
      local path: built on first use (cached) by
      :func:`~sagellm_backend.engine.tiny_models.ensure_tiny_model`; its directory.
    * An existing path: itself. Something that looks like a local path but does not exist:
      a :class:`UsageError`. Anything else is passed on as a Hugging Face hub id.

    Returns:
        ``(model_path, label)``; ``model_path`` is None only for the mock without a model.
    """
    from sagellm_backend.engine.tiny_models import ensure_tiny_model, list_tiny_models

    tiny = list_tiny_models()
    if model is None:
        if default is None:
            if kind == "mock":
                return None, "mock"
            raise UsageError(
                f"--model is required for the {kind} engine: a Hugging Face model directory, "
                f"a hub id ('org/name'), or a built-in offline model ({', '.join(tiny)})"
            )
        model = default
    if not model.strip():
        raise UsageError("--model must not be empty")
    path = Path(model).expanduser()
    if model in tiny and not path.exists():
        if kind == "mock":
            return model, model
        if err is not None and not _tiny_cached(model):
            err.write(f"building the offline model {model!r} (first use, cached afterwards)\n")
            err.flush()
        return str(ensure_tiny_model(model)), model
    if kind == "mock" or path.exists():
        return (str(path) if path.exists() else model), model
    if model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1:
        raise UsageError(
            f"--model {model!r}: no such directory; give a Hugging Face model directory, a hub "
            f"id ('org/name') or a built-in offline model ({', '.join(tiny)})"
        )
    return model, model


@dataclass(frozen=True)
class EngineSettings:
    """Everything :func:`create_engine` needs (resolved from the command line).

    Attributes:
        kind: ``cpu``, ``cuda`` or ``mock``.
        model_path: what the engine loads (None: the mock without a model).
        model_label: the model as the user named it (display, ``Request.model``).
        engine_id: id of the engine (stream events, logs).
        max_batch_size: most requests per engine step (>= 1).
        max_new_tokens: most tokens one request may produce (>= 1).
        dtype: weights dtype (None: the kind's default).
        device: GPU for the cuda engine (None: ``cuda:0``).
        threads: torch threads for the cpu engine (None: torch's setting).
        prefix_caching: reuse a repeated prompt prefix's KV.
        trust_remote_code: allow checkpoint code.
        mock_ttft_ms / mock_latency_ms: the mock's simulated step durations.
    """

    kind: str
    model_path: str | None
    model_label: str
    engine_id: str
    max_batch_size: int
    max_new_tokens: int
    dtype: str | None = None
    device: str | None = None
    threads: int | None = None
    prefix_caching: bool = True
    trust_remote_code: bool = False
    mock_ttft_ms: float = 50.0
    mock_latency_ms: float = 10.0


def engine_settings(
    args: argparse.Namespace,
    *,
    kind: str,
    model_path: str | None,
    model_label: str,
    engine_id: str,
    max_batch_size: int,
    max_new_tokens: int,
) -> EngineSettings:
    """Build :class:`EngineSettings` from the options of :func:`add_engine_arguments`.

    Raises:
        UsageError: an option that does not apply to ``kind`` (``--device`` off cuda).
    """
    if args.device is not None and kind != "cuda":
        raise UsageError(f"--device applies to --engine cuda only (the engine is {kind})")
    if args.device is not None and not _valid_cuda_device(args.device):
        raise UsageError(f"--device must be 'cuda' or 'cuda:N' (e.g. cuda:0), got {args.device!r}")
    return EngineSettings(
        kind=kind,
        model_path=model_path,
        model_label=model_label,
        engine_id=engine_id,
        max_batch_size=max_batch_size,
        max_new_tokens=max_new_tokens,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        prefix_caching=args.prefix_caching,
        trust_remote_code=args.trust_remote_code,
        mock_ttft_ms=args.mock_ttft_ms,
        mock_latency_ms=args.mock_latency_ms,
    )


def _valid_cuda_device(device: str) -> bool:
    if device == "cuda":
        return True
    head, _, index = device.partition(":")
    return head == "cuda" and index.isdigit()


def create_engine(settings: EngineSettings) -> Any:
    """Create (not start) the engine ``settings`` describe.

    cpu: :class:`~sagellm_backend.engine.cpu.CPUEngine`; cuda:
    :class:`~sagellm_backend.engine.hf_cuda.HFCudaEngine` with ``device_map`` = the device;
    mock: :class:`~sagellm_backend.engine.mock.MockEngine`. ``max_num_batched_tokens`` is
    raised to ``max_batch_size`` when needed (one decode token per running request). After
    creating a cpu or cuda engine (which load transformers anyway) it calls
    :func:`quiet_transformers`.

    Raises:
        ConfigError: an invalid setting (the engine config's own message).
    """
    s = settings
    batched = max(2048, s.max_batch_size)
    if s.kind == "cpu":
        from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig

        assert s.model_path is not None
        engine: Any = CPUEngine(
            CPUEngineConfig(
                engine_id=s.engine_id,
                model_path=s.model_path,
                device="cpu",
                max_batch_size=s.max_batch_size,
                max_new_tokens=s.max_new_tokens,
                torch_dtype=s.dtype or DEFAULT_DTYPE["cpu"],
                trust_remote_code=s.trust_remote_code,
                num_threads=s.threads,
                enable_prefix_caching=s.prefix_caching,
                max_num_batched_tokens=batched,
            )
        )
        quiet_transformers()
        return engine
    if s.kind == "cuda":
        from sagellm_backend.engine.hf_cuda import HFCudaEngine, HFCudaEngineConfig

        device = s.device or "cuda:0"
        engine = HFCudaEngine(
            HFCudaEngineConfig(
                engine_id=s.engine_id,
                model_path=s.model_path,
                device=device,
                max_batch_size=s.max_batch_size,
                dtype=s.dtype or DEFAULT_DTYPE["cuda"],
                device_map=device,
                load_in_8bit=False,
                load_in_4bit=False,
                trust_remote_code=s.trust_remote_code,
                max_new_tokens=s.max_new_tokens,
                enable_prefix_caching=s.prefix_caching,
                max_num_batched_tokens=batched,
            )
        )
        quiet_transformers()
        return engine
    if s.kind == "mock":
        from sagellm_backend.engine.mock import MockEngine, MockEngineConfig

        return MockEngine(
            MockEngineConfig(
                s.engine_id,
                simulate_latency_ms=s.mock_latency_ms,
                simulate_ttft_ms=s.mock_ttft_ms,
                default_max_tokens=s.max_new_tokens,
                enable_prefix_caching=s.prefix_caching,
                model_path=s.model_path,
                device="mock",
                max_batch_size=s.max_batch_size,
            )
        )
    raise UsageError(f"unknown engine kind {s.kind!r}; valid: {', '.join(BUILTIN_KINDS)}")


def quiet_transformers() -> None:
    """Silence transformers' info logs and weight-loading progress bars.

    Skipped when the root logger shows INFO (``--log-level INFO``/``DEBUG``). Imports
    transformers (call it only for engines that load it anyway).
    """
    if logging.getLogger().isEnabledFor(logging.INFO):
        return
    import importlib

    try:
        hf_logging: Any = importlib.import_module("transformers.utils.logging")
    except ImportError:  # the engine reports the missing dependency itself
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def engine_description(engine: Any) -> str:
    """One line: engine class, device, runner and provider (what ``get_info`` knows)."""
    info: Mapping[str, Any] = engine.get_info()
    parts = [str(info.get("engine_type", type(engine).__name__))]
    device = info.get("device")
    if device:
        parts.append(f"on {device}")
    extras = []
    if info.get("runner"):
        extras.append(f"{info['runner']} runner")
    provider = info.get("provider") or type(getattr(engine, "provider", None)).__name__
    if provider and provider != "NoneType":
        extras.append(f"provider {provider}")
    if info.get("mock_mode") or info.get("engine_type") == "MockEngine":
        extras.append("simulated model")
    if extras:
        parts.append(f"({', '.join(extras)})")
    return " ".join(parts)


# ----------------------------------------------------------------------------- requests


def make_request(
    request_id: str,
    *,
    model: str,
    prompt: str,
    max_tokens: int,
    stream: bool,
    temperature: float | None = None,
    top_p: float | None = None,
    metadata: dict[str, Any] | None = None,
    trace_id: str | None = None,
) -> Any:
    """A protocol :class:`~sagellm_protocol.Request` (temperature 0 or None: greedy)."""
    from sagellm_protocol import Request

    return Request(
        request_id=request_id,
        trace_id=trace_id or f"cli-{request_id}",
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        stream=stream,
        temperature=temperature if temperature else None,
        top_p=top_p,
        metadata=metadata or None,
    )


# ----------------------------------------------------------------------------- errors


def request_error_text(error: Any) -> str:
    """``"CODE: message"`` of a failed request's protocol error (``"unknown error"`` if None)."""
    return f"{error.code}: {error.message}" if error is not None else "unknown error"


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` on one line (newlines folded), then its PEP 678 notes if any.

    Notes say where an error passed through unwrapped came from (e.g. ``while creating
    backend 'x' from entry point ...``); they follow as ``(note; note)``.
    """
    message = " ".join(str(exc).split())
    name = type(exc).__name__
    text = f"{name}: {message}" if message else name
    notes = [" ".join(str(n).split()) for n in getattr(exc, "__notes__", None) or ()]
    notes = [n for n in notes if n]
    return f"{text} ({'; '.join(notes)})" if notes else text


def guarded(
    name: str, fn: Callable[[argparse.Namespace, TextIO, TextIO], int]
) -> Callable[[argparse.Namespace], int]:
    """Wrap a command body ``fn(args, out, err)`` into a :class:`~sagellm_backend.cli.Command` run.

    The body writes results to ``out`` (stdout) and diagnostics to ``err`` (stderr), both
    looked up when the command runs. A :class:`UsageError` exits with status 2 and the
    subcommand's usage line (``SystemExit`` from argparse); any other exception prints
    ``sagellm-backend NAME: error: Type: message`` on one line and returns 1 (with the
    traceback in the log at DEBUG); KeyboardInterrupt returns 130; a closed stdout pipe
    (``| head``) returns 141 silently.
    """

    def run(args: argparse.Namespace) -> int:
        out, err = sys.stdout, sys.stderr
        try:
            return fn(args, out, err)
        except UsageError as exc:
            parser: argparse.ArgumentParser | None = getattr(args, "_command_parser", None)
            if parser is not None:
                parser.error(str(exc))  # raises SystemExit(2)
            err.write(f"sagellm-backend {name}: error: {exc}\n")
            return 2
        except KeyboardInterrupt:
            err.write(f"\nsagellm-backend {name}: interrupted\n")
            return 130
        except BrokenPipeError:  # the reader went away (``| head``): stop quietly
            _silence_stdout()
            return 141
        except Exception as exc:
            _log.debug("sagellm-backend %s failed", name, exc_info=True)
            err.write(f"sagellm-backend {name}: error: {describe_exception(exc)}\n")
            return 1

    return run


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    import os

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured in tests)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


# ----------------------------------------------------------------------------- metrics


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


#: Metrics field -> (unit, meaning) for the table; fields not listed use the protocol's text.
METRIC_DOCS: dict[str, tuple[str, str]] = {
    "ttft_ms": ("ms", "queued -> first output token"),
    "tbt_ms": ("ms", "mean gap between output tokens"),
    "tpot_ms": ("ms", "(completed - first token) / (n - 1)"),
    "throughput_tps": ("tok/s", "output tokens / request lifetime"),
    "peak_mem_mb": ("MiB", "peak memory of the engine's provider"),
    "error_rate": ("", "failed / finished requests (engine)"),
    "kv_used_tokens": ("tokens", "KV slots held at completion"),
    "kv_used_bytes": ("bytes", "KV page bytes held at completion"),
    "prefix_hit_rate": ("", "prompt share from the prefix cache"),
    "evict_count": ("", "cached KV pages evicted"),
    "evict_ms": ("ms", "time spent evicting"),
    "spec_accept_rate": ("", "speculative decoding (0: unused)"),
    "prefill_ms": ("ms", "time in prompt (prefill) steps"),
    "decode_ms": ("ms", "time in decode steps"),
    "kv_transfer_count": ("", "KV migrations between devices"),
    "kv_transfer_bytes": ("bytes", "bytes of KV migrated"),
    "kv_transfer_ms": ("ms", "time migrating KV"),
    "comm_overhead_ms": ("ms", "collective communication time"),
    "allreduce_count": ("", "all-reduce calls"),
    "allgather_count": ("", "all-gather calls"),
    "itl_list": ("ms", "gaps between output tokens"),
    "timestamps": ("", "wall-clock instants of the request"),
    "component_trace": ("", "components the request went through"),
}

_TIMESTAMP_DOCS = {
    "queued_at": "entered the engine's queue",
    "scheduled_at": "admitted to a running batch",
    "executed_at": "first output token produced",
    "completed_at": "finished",
}


def _fmt_value(value: Any, unit: str) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        if unit == "bytes":
            from sagellm_backend.commands._table import fmt_bytes

            return f"{value:,} ({fmt_bytes(value)})" if value >= 1024 else f"{value} B"
        return f"{value:,}" + (f" {unit}" if unit else "")
    if isinstance(value, float):
        if unit == "ms":
            from sagellm_backend.commands._table import fmt_ms

            return f"{fmt_ms(value)} ms"
        if unit == "":
            return f"{value:.4g}"
        return f"{value:,.1f} {unit}"
    return str(value)


def _clock(epoch_s: float) -> str:
    return _dt.datetime.fromtimestamp(epoch_s).strftime("%H:%M:%S.%f")[:-3]


def metrics_rows(metrics: Any) -> list[list[str]]:
    """Rows ``[field, value, meaning]`` covering every field of a protocol Metrics.

    ``itl_list`` is summarised (count, min, p50, p90, max), ``timestamps`` expands into
    one row per instant (local clock time and milliseconds after ``queued_at``), and
    ``component_trace`` has one component per line (multi-line cells: see
    :func:`~sagellm_backend.commands._table.render_table`). Fields this table does not know (a newer
    protocol) are shown with their value and the protocol's description.
    """
    rows: list[list[str]] = []
    fields = type(metrics).model_fields
    for name, info in fields.items():
        value = getattr(metrics, name)
        unit, meaning = METRIC_DOCS.get(name, ("", (info.description or "").strip()))
        if name == "itl_list":
            gaps = [float(v) for v in value or []]
            if gaps:
                summary = (
                    f"{len(gaps)} gaps (ms)\nmin {min(gaps):.2f}, p50 {percentile(gaps, 50):.2f}"
                    f"\np90 {percentile(gaps, 90):.2f}, max {max(gaps):.2f}"
                )
            else:
                summary = "0 gaps (< 2 tokens)"
            rows.append([name, summary, meaning])
        elif name == "timestamps":
            if value is None:
                rows.append([name, "-", meaning])
                continue
            base = float(value.queued_at)
            for key, doc in _TIMESTAMP_DOCS.items():
                stamp = getattr(value, key, None)
                if stamp is None:
                    continue
                rel = (float(stamp) - base) * 1000.0
                rows.append([f"timestamps.{key}", f"{_clock(float(stamp))} (+{rel:.2f} ms)", doc])
        elif name == "component_trace":
            rows.append([name, "\n".join(value) if value else "-", meaning])
        else:
            rows.append([name, _fmt_value(value, unit), meaning])
    return rows


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far (``getrusage``), None if unknown."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)
