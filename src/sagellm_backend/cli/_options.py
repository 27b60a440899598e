"""The options the ``generate``, ``bench`` and ``demo`` commands share.

* argparse value types that reject bad numbers with a message naming the valid range
  (argparse turns them into ``error: argument --x: ...`` and exit status 2);
* the options of one request (:func:`add_sampling_arguments`) and those choosing and
  configuring the engine (:func:`add_engine_arguments`).

Invariant: importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import math

__all__ = [
    "DEFAULT_MOCK_LATENCY_MS",
    "DEFAULT_MOCK_TTFT_MS",
    "DTYPE_CHOICES",
    "ENGINE_CHOICES",
    "add_engine_arguments",
    "add_sampling_arguments",
    "non_negative_float",
    "non_negative_int",
    "positive_int",
    "temperature_value",
    "top_p_value",
]

#: else the highest-priority available backend).
ENGINE_CHOICES = ("auto", "cpu", "cuda", "mock")
#: Values of ``--dtype``.
DTYPE_CHOICES = ("float32", "float16", "bfloat16", "auto")
#: ``--mock-ttft-ms`` / ``--mock-latency-ms`` when not given (MockEngineConfig's defaults).
DEFAULT_MOCK_TTFT_MS = 50.0
DEFAULT_MOCK_LATENCY_MS = 10.0


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
        "--seed",
        type=int,
        default=None,
        help="seed of the request's sampler (every engine, the mock included)",
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
        default=DEFAULT_MOCK_TTFT_MS,
        metavar="MS",
        help="--engine mock: simulated duration of a prefill step (default %(default)g)",
    )
    group.add_argument(
        "--mock-latency-ms",
        type=non_negative_float,
        default=DEFAULT_MOCK_LATENCY_MS,
        metavar="MS",
        help="--engine mock: simulated duration of a decode step (default %(default)g)",
    )
    parser.set_defaults(_command_parser=parser)
