"""What the ``generate``, ``bench`` and ``demo`` commands share: the engine and failing.

* the resolution of ``--engine`` to an engine kind (:func:`resolve_engine_kind`; ``auto``
  follows the backend auto-selection) and of ``--model`` to what the engine loads
  (:func:`resolve_model`; the built-in offline models are accepted by name);
  :func:`engine_settings` gathers the engine options into :class:`EngineSettings`, which
  :func:`create_engine` turns into an engine; :func:`make_request` builds a protocol
  Request (:func:`one_request_engine`: both, for the one-request commands);
* running a request: :func:`started` (the engine started for a block, stopped after) and
  :func:`stream_end` (a streamed request's events handed over one by one, its end event
  returned);
* :func:`guarded` and :class:`UsageError`, re-exported from :mod:`._guard` (how a command
  fails).

Invariant: importing this module imports neither torch nor transformers; the engine
modules are imported inside :func:`create_engine`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, TextIO

from sagellm_backend.cli._guard import (
    UsageError,
    describe_exception,
    guarded,
    register_guarded,
)
from sagellm_backend.cli._options import DEFAULT_MOCK_LATENCY_MS, DEFAULT_MOCK_TTFT_MS

__all__ = [
    "BUILTIN_KINDS",
    "DEFAULT_DTYPE",
    "EngineSettings",
    "UsageError",
    "create_engine",
    "describe_exception",
    "engine_description",
    "engine_settings",
    "guarded",
    "make_request",
    "one_request_engine",
    "quiet_transformers",
    "register_guarded",
    "request_error_text",
    "request_exit_status",
    "resolve_engine_kind",
    "resolve_model",
    "started",
    "stream_end",
]

_log = logging.getLogger("sagellm_backend.cli")

#: Engine kinds with a built-in engine class.
BUILTIN_KINDS = ("cpu", "cuda", "mock")
#: ``--dtype`` when not given, per engine kind.
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "auto"}


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
    from sagellm_backend.testing.tiny_models import BUILDER_VERSION, default_cache_root

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
      :func:`~sagellm_backend.testing.tiny_models.ensure_tiny_model`; its directory.
    * An existing path: itself. Something that looks like a local path but does not exist:
      a :class:`UsageError`. Anything else is passed on as a Hugging Face hub id.

    Returns:
        ``(model_path, label)``; ``model_path`` is None only for the mock without a model.
    """
    from sagellm_backend.testing.tiny_models import ensure_tiny_model, list_tiny_models

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

    The fields with a default are the engine options of the command line, under the names
    :func:`~sagellm_backend.cli._options.add_engine_arguments` parses them to.
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
    mock_ttft_ms: float = DEFAULT_MOCK_TTFT_MS
    mock_latency_ms: float = DEFAULT_MOCK_LATENCY_MS


#: The :class:`EngineSettings` fields :func:`engine_settings` copies from the parsed options
#: as they are (those with a default).
_OPTION_FIELDS = tuple(f.name for f in fields(EngineSettings) if f.default is not MISSING)


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
    ignored = ignored_options(args, kind)
    if ignored:
        one = len(ignored) == 1
        sys.stderr.write(
            f"warning: {' and '.join(ignored)} {'is' if one else 'are'} ignored: "
            f"{'it does' if one else 'they do'} not apply to the {kind} engine\n"
        )
    options = {name: getattr(args, name) for name in _OPTION_FIELDS}
    return EngineSettings(  # the required fields, in their order, then the options
        kind, model_path, model_label, engine_id, max_batch_size, max_new_tokens, **options
    )


def ignored_options(args: argparse.Namespace, kind: str) -> list[str]:
    """The engine options given on the command line that ``kind`` does not use.

    (``--device`` off cuda is a usage error instead: it names hardware.)
    """
    ignored: list[str] = []
    if args.threads is not None and kind != "cpu":
        ignored.append("--threads")
    if kind == "mock":
        if args.dtype is not None:
            ignored.append("--dtype")
        if args.trust_remote_code:
            ignored.append("--trust-remote-code")
    else:
        if args.mock_ttft_ms != DEFAULT_MOCK_TTFT_MS:
            ignored.append("--mock-ttft-ms")
        if args.mock_latency_ms != DEFAULT_MOCK_LATENCY_MS:
            ignored.append("--mock-latency-ms")
    return ignored


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
        BackendNotAvailableError: cuda on a machine without CUDA (the CLI never falls back).
    """
    s = settings
    # The fields the cpu and cuda engine configs share.
    hf_fields: dict[str, Any] = {
        "engine_id": s.engine_id,
        "model_path": s.model_path,
        "max_batch_size": s.max_batch_size,
        "max_new_tokens": s.max_new_tokens,
        "trust_remote_code": s.trust_remote_code,
        "enable_prefix_caching": s.prefix_caching,
        "max_num_batched_tokens": max(2048, s.max_batch_size),
    }
    if s.kind == "cpu":
        from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig

        assert s.model_path is not None
        engine: Any = CPUEngine(
            CPUEngineConfig(
                device="cpu",
                torch_dtype=s.dtype or DEFAULT_DTYPE["cpu"],
                num_threads=s.threads,
                **hf_fields,
            )
        )
        quiet_transformers()
        return engine
    if s.kind == "cuda":
        from sagellm_backend.engine.hf_cuda import HFCudaEngine, HFCudaEngineConfig
        from sagellm_backend.errors import BackendNotAvailableError

        # The library runs HFCudaEngine on the CPU where there is no CUDA (0.1.1.2's
        # documented fallback); asked for on the command line, a GPU is meant: fail instead.
        reason = HFCudaEngine.unavailable_reason()
        if reason is not None:
            raise BackendNotAvailableError(
                f"--engine cuda needs a CUDA device: {reason}; use --engine cpu on this machine"
            )
        device = s.device or "cuda:0"
        engine = HFCudaEngine(
            HFCudaEngineConfig(
                device=device,
                dtype=s.dtype or DEFAULT_DTYPE["cuda"],
                device_map="cuda:0" if device == "cuda" else device,  # device_map: cuda:N
                load_in_8bit=False,
                load_in_4bit=False,
                **hf_fields,
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


def one_request_engine(
    args: argparse.Namespace,
    create: Callable[[EngineSettings], Any],
    command: str,
    kind: str,
    model: tuple[str | None, str],
    *,
    stream: bool,
    metadata: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """The engine and the request of a one-request command (``generate``, ``demo``).

    ``model`` is :func:`resolve_model`'s ``(path, label)``.

    The engine (made by ``create``, not started; id ``cli-<command>-<kind>``) runs one
    request at a time with ``--max-tokens`` as its output budget; the request (id
    ``<command>-1``) sends ``--prompt`` with ``--max-tokens``, ``--temperature``,
    ``--top-p`` and ``metadata`` followed by ``"seed"`` when ``--seed`` is given.
    ``create`` is the command module's :func:`create_engine` (looked up there, so tests
    can replace it).

    Returns:
        ``(engine, request)``.

    Raises:
        UsageError: an engine option that does not apply to ``kind``.
        ConfigError: an invalid engine setting (the engine config's own message).
    """
    model_path, model_label = model
    settings = engine_settings(
        args,
        kind=kind,
        model_path=model_path,
        model_label=model_label,
        engine_id=f"cli-{command}-{kind}",
        max_batch_size=1,
        max_new_tokens=args.max_tokens,
    )
    engine = create(settings)
    metadata = dict(metadata or {})
    if args.seed is not None:
        metadata["seed"] = args.seed
    request = make_request(
        f"{command}-1",
        model=model_label,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        stream=stream,
        temperature=args.temperature,
        top_p=args.top_p,
        metadata=metadata,
    )
    return engine, request


@contextlib.asynccontextmanager
async def started(engine: Any) -> AsyncIterator[Any]:
    """Start ``engine`` for the ``async with`` block; stop it when the block ends, however.

    A failed ``start()`` raises out of the ``async with`` (nothing to stop then).

    Args:
        engine: the engine (not started).

    Yields:
        ``engine``, started.
    """
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def stream_end(engine: Any, request: Any, on_event: Callable[[Any], None]) -> Any:
    """Stream ``request`` through the started ``engine``; the end event.

    Args:
        engine: a started engine.
        request: the protocol Request.
        on_event: called with every event (start, deltas, end) as it arrives.

    Returns:
        The stream's end event.

    Raises:
        RuntimeError: the stream ended without an end event (the engine contract forbids it).
    """
    from sagellm_protocol import StreamEventEnd

    end: Any = None
    async for event in engine.stream(request):
        on_event(event)
        if isinstance(event, StreamEventEnd):
            end = event
    if end is None:  # pragma: no cover - the engine contract guarantees an end event
        raise RuntimeError("the engine's stream ended without an end event")
    return end


def request_error_text(error: Any) -> str:
    """``"CODE: message"`` of a failed request's protocol error (``"unknown error"`` if None)."""
    return f"{error.code}: {error.message}" if error is not None else "unknown error"


def request_exit_status(command: str, response: Any, err: TextIO) -> int:
    """Exit status of a one-request command: 1 (the error named on ``err``) if it failed.

    ``response`` is the protocol Response or end event of the request.
    """
    if response.finish_reason == "error":
        what = request_error_text(response.error)
        err.write(f"sagellm-backend {command}: error: the request failed: {what}\n")
        return 1
    return 0
