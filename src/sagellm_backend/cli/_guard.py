"""How a CLI command fails: :func:`guarded`, the wrapper every command's ``run`` goes through.

A :class:`UsageError` becomes the subcommand's usage message and exit status 2, any other
exception one line on stderr and exit status 1 (the traceback only with ``--log-level
DEBUG``), Ctrl-C exit 130, a closed stdout pipe exit 141.

Invariant: importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import TextIO

__all__ = ["UsageError", "describe_exception", "guarded", "register_guarded"]

_log = logging.getLogger("sagellm_backend.cli")


class UsageError(Exception):
    """A bad combination of arguments: reported with the usage line, exit status 2."""


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


def register_guarded(
    name: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    body: Callable[[argparse.Namespace, TextIO, TextIO], int],
    *,
    help: str,
    description: str,
) -> None:
    """Register subcommand ``name`` whose run is :func:`guarded` ``body``."""
    from sagellm_backend.cli.command import Command, register_command

    register_command(
        Command(
            name=name,
            help=help,
            add_arguments=add_arguments,
            run=guarded(name, body),
            description=description,
        )
    )


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
