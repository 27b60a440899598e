"""The ``generate``, ``bench`` and ``demo`` subcommands of ``sagellm-backend``.

Each module registers one :class:`~sagellm_backend.cli.Command` when imported (they are
listed in :data:`sagellm_backend.cli.COMMAND_MODULES`):

* :mod:`~sagellm_backend.commands.demo`: the one-command tour (backends found, the chosen
  one and why, a streamed generation on the offline tiny model, the request's Metrics);
* :mod:`~sagellm_backend.commands.generate`: one request, printed as text, streamed, or as
  the protocol Response in JSON;
* :mod:`~sagellm_backend.commands.bench`: N requests at concurrency C, a table of
  throughput, latency percentiles, memory and KV figures, an optional plain-transformers
  baseline measured in the same run, and a pass/fail table against the sageLLM contract.

Invariant: importing any module of this package imports neither torch nor transformers;
they are imported by the ``run`` functions (through the engines) only.
"""

from __future__ import annotations

__all__: list[str] = []
