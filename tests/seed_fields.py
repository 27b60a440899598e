"""Test data shared across test packages: the published 0.1.1.2 package page's examples.

``tests/`` is on ``sys.path`` under pytest (its root ``conftest.py`` sits there without an
``__init__.py``), so test modules import this as ``from seed_fields import ...``.
"""

from __future__ import annotations

from typing import Any

#: The ``HFCudaEngineConfig(...)`` fields of the 0.1.1.2 package page's usage example.
SEED_CUDA_FIELDS: dict[str, Any] = {
    "engine_id": "hf-001",
    "model_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "device": "cuda:0",
    "dtype": "float16",
    "device_map": "auto",
    "load_in_8bit": False,
    "load_in_4bit": False,
    "trust_remote_code": False,
    "max_new_tokens": 256,
    "max_batch_size": 8,
}
