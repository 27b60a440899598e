"""The ``sagellm-backend`` command line (console script ``sagellm_backend.cli:main``).

Modules, one per job:

* :mod:`~sagellm_backend.cli.main`: argument parsing and dispatch (:func:`main`,
  :func:`build_parser`, :data:`COMMAND_MODULES`);
* :mod:`~sagellm_backend.cli.command`: the :class:`Command` registry each subcommand
  module adds itself to when imported;
* :mod:`~sagellm_backend.cli.info`: backends and engines found, their state, device,
  capabilities and memory, and the backend auto-selection;
* :mod:`~sagellm_backend.cli.demo`: the one-command tour (backends found, the chosen one
  and why, a streamed generation on the offline tiny model, the request's Metrics);
* :mod:`~sagellm_backend.cli.generate`: one request, printed as text, streamed, or as the
  protocol Response in JSON;
* :mod:`~sagellm_backend.cli.bench`: N requests at concurrency C, a table of throughput,
  latency percentiles, memory and KV figures, an optional plain-transformers baseline
  measured in the same run, and a pass/fail table against the sageLLM contract
  (``workload``, ``loadgen``, ``stats``, ``report``);
* shared helpers: ``_common`` (engine choice and creation, requests, errors and exit
  statuses), ``_options`` (argument types and options), ``_metrics`` (Metrics table,
  percentiles), ``_table`` (terminal tables, progress line).

Note: the name ``main`` here is the function (the console script's target), which hides
the submodule of the same name; import the module as ``sagellm_backend.cli.main`` through
:mod:`importlib` if you need it.

Invariant: importing this package, or any of its modules, and building the parser import
neither torch nor transformers; they are imported by the ``run`` functions (through the
engines) only.
"""

from __future__ import annotations

from sagellm_backend.cli.command import Command, commands, register_command
from sagellm_backend.cli.info import collect_info, render_info
from sagellm_backend.cli.main import COMMAND_MODULES, build_parser, main

__all__ = [
    "COMMAND_MODULES",
    "Command",
    "build_parser",
    "collect_info",
    "commands",
    "main",
    "register_command",
    "render_info",
]
