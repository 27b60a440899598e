"""Argument parsing and dispatch of the ``sagellm-backend`` command line.

:func:`build_parser` imports :data:`COMMAND_MODULES` (each registers its
:class:`~sagellm_backend.cli.command.Command` when imported; ``info`` is always registered)
and gives every registered command a subparser; :func:`main` parses, sets up logging and
runs the chosen command.

Invariant: importing this module, and building the parser, never imports torch or
transformers (the commands import them inside their ``run``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Callable, Sequence

import sagellm_backend.cli.info  # noqa: F401  (registers ``info``, the first command)
from sagellm_backend._version import __version__
from sagellm_backend.cli.command import commands

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

#: Modules imported by :func:`build_parser` that register further subcommands on import.
COMMAND_MODULES: tuple[str, ...] = (
    "sagellm_backend.cli.generate",
    "sagellm_backend.cli.bench",
    "sagellm_backend.cli.demo",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(
        prog="sagellm-backend",
        description="sageLLM backend: hardware providers, KV cache and inference engines.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default WARNING; INFO shows the backend selection)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in commands().values():
        sub_parser = sub.add_parser(
            command.name, help=command.help, description=command.description or command.help
        )
        command.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(message)s")
    run: Callable[[argparse.Namespace], int] = args._run
    return run(args)
