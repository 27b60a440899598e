"""Conformance kit: a pytest suite any BackendProvider implementation can run.

Example (a plugin package's ``tests/test_conformance.py``)::

    import pytest
    from sagellm_backend.testing import ProviderConformance

    class TestMyProvider(ProviderConformance):
        @pytest.fixture
        def provider_factory(self):
            return lambda: MyProvider(pool_mb=64)

See :mod:`sagellm_backend.testing.conformance` for what is checked and how to tune it.
The names resolve lazily, so importing this package does not import pytest. Under pytest
the suite's modules are registered for assertion rewriting, so a failing check shows the
compared values.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from sagellm_backend._lazy import resolve_lazy

#: The modules of the conformance suite (the public one and the parts it combines).
_SUITE_MODULES = (
    "sagellm_backend.testing.conformance",
    "sagellm_backend.testing._conformance_base",
    "sagellm_backend.testing._conformance_device",
    "sagellm_backend.testing._conformance_kv",
)

if "pytest" in sys.modules:  # running under pytest: detailed assertion messages
    sys.modules["pytest"].register_assert_rewrite(*_SUITE_MODULES)

if TYPE_CHECKING:
    from sagellm_backend.testing.conformance import ProviderConformance, make_conformance_tests

__all__ = ["ProviderConformance", "make_conformance_tests"]

_LAZY = dict.fromkeys(__all__, "sagellm_backend.testing.conformance")


def __getattr__(name: str) -> Any:
    """Resolve the conformance names on first access (PEP 562)."""
    return resolve_lazy(globals(), _LAZY, name)
