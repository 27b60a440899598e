"""Shared pytest configuration for the sagellm-backend test suite."""

from __future__ import annotations

import os

# Keep torch predictable on the 2-core CI machines; individual tests may override.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
