"""Workload material shared by the benchmark scripts.

The scripts import it from their own folder (``benchmarks/`` is on ``sys.path`` when they
run as scripts; :mod:`soak` adds it when a test loads it by file path).
"""

from __future__ import annotations

#: Prompt vocabulary. ``soak.py`` draws from all of it; ``bench_mock_engine.py`` from the
#: first :data:`MOCK_BENCH_WORDS` (its prompts, and so its figures, stay comparable).
WORDS: tuple[str, ...] = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "engines",
    "batch",
    "tokens",
    "in",
    "paged",
    "caches",
    "and",
    "schedulers",
    "admit",
    "requests",
    "step",
    "by",
    "step",
    "under",
    "load",
    "with",
    "prefix",
    "reuse",
)

#: How many leading :data:`WORDS` ``bench_mock_engine.py`` uses.
MOCK_BENCH_WORDS = 23
