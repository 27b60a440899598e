"""The subcommand registry of ``sagellm-backend``.

A subcommand is a :class:`Command` registered by the module that defines it (``info``,
``generate``, ``bench``, ``demo``), so each can live in its own module and
:func:`~sagellm_backend.cli.main.build_parser` needs only the registry. A command module
must keep heavy imports (torch, transformers) inside its ``run`` function: importing it,
and building the parser, never imports torch.

Invariant: names are unique non-empty words; :func:`commands` keeps registration order
(the order of ``sagellm-backend --help``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Command", "commands", "register_command"]


@dataclass(frozen=True)
class Command:
    """One subcommand.

    Attributes:
        name: the subcommand word (``"info"``).
        help: one line shown in ``sagellm-backend --help``.
        add_arguments: adds the subcommand's options to its parser.
        run: executes it; returns the process exit status.
        description: longer text for ``sagellm-backend NAME --help`` (defaults to ``help``).
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


_COMMANDS: dict[str, Command] = {}


def register_command(command: Command, *, replace: bool = False) -> None:
    """Add a subcommand.

    Raises:
        ValueError: the name is empty or already registered (and ``replace`` is False).
    """
    if not command.name or not command.name.replace("-", "").isalnum():
        raise ValueError(f"command name must be a non-empty word, got {command.name!r}")
    if command.name in _COMMANDS and not replace:
        raise ValueError(
            f"command {command.name!r} is already registered; pass replace=True to override it"
        )
    _COMMANDS[command.name] = command


def commands() -> dict[str, Command]:
    """The registered subcommands, by name."""
    return dict(_COMMANDS)
