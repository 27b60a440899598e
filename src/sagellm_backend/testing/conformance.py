"""The BackendProvider conformance suite: what "correct" means for a sageLLM backend.

Any provider -- the built-in mock/cpu/cuda ones or a third-party plugin -- runs the same
pytest suite. It checks the whole :class:`~sagellm_backend.base.BackendProvider` contract:

* **capability matches behaviour**: every advertised dtype allocates KV, every other one
  raises ``ValueError`` naming the supported ones; ``has_collective`` True means
  ``all_reduce``/``all_gather`` work with single-rank (identity) semantics, False means
  they raise ``NotImplementedError``; ``has_stream``/``has_event`` likewise;
  ``supported_kernels`` equals the kinds of the registered kernels;
* **fail-fast errors**: bad ``num_tokens`` or dtype, unknown kernels (``KeyError`` naming the
  registered ones), duplicate kernel names, non-callable kernels, unknown collective ops;
* **KV block invariants**: alloc/free cycles give the memory back, handles of live blocks
  are distinct, double free / use after free / a block of another provider raise
  ``ValueError`` and change nothing, exhaustion raises a ``MemoryError`` subclass and
  changes nothing, copy needs a large-enough block of the same dtype, migrate moves the
  block (the source is released) and refuses unknown devices, concurrent alloc/free is
  safe;
* **streams and events**: ``elapsed_ms`` measures at least a real sleep; an unrecorded
  event cannot be timed;
* **memory stats**: the required keys are non-negative ints, ``peak >= allocated``,
  ``total >= allocated``, and the KV figures rise with allocations and fall after frees.

Usage in a plugin package (pytest collects the subclass; nothing else is needed)::

    # tests/test_conformance.py
    from sagellm_backend.testing import ProviderConformance
    from my_vendor_backend import MyProvider

    class TestMyProvider(ProviderConformance):
        migrate_targets = ("cpu",)          # optional knobs, see ProviderConformance

        def make_provider(self):
            return MyProvider(pool_mb=64)

or in one line, ``TestMyProvider = make_conformance_tests(lambda: MyProvider(pool_mb=64))``.
A ``provider_factory`` pytest fixture may be overridden instead of ``make_provider`` when
the provider needs other fixtures (``tmp_path``, a process group, ...).

The factory is called once per test (twice where a second, foreign provider is needed), so
each test starts from a fresh provider; keep its KV pool small so that the capacity test
fills it quickly. Class attributes tune what the suite expects (see
:class:`ProviderConformance`); hook methods (:meth:`~ProviderConformance.make_tensor`,
:meth:`~ProviderConformance.kv_contents`, ...) adapt it to a provider's tensor type.

This module imports pytest (a test dependency) but never torch: the default tensor hook
imports torch only when the provider is a torch provider. The checks come in two groups,
:mod:`~sagellm_backend.testing._conformance_device` (capability, dtypes, collectives,
streams/events, kernels) and :mod:`~sagellm_backend.testing._conformance_kv` (KV blocks,
memory figures), on the shared fixtures and hooks of
:mod:`~sagellm_backend.testing._conformance_base`.
"""

from __future__ import annotations

from typing import Any

import pytest

from sagellm_backend.base import BackendProvider as BackendProvider
from sagellm_backend.base import Event as Event
from sagellm_backend.base import KVBlock as KVBlock
from sagellm_backend.base import Stream as Stream
from sagellm_backend.capability import CapabilityDescriptor as CapabilityDescriptor
from sagellm_backend.capability import DType as DType
from sagellm_backend.capability import KernelKind as KernelKind
from sagellm_backend.testing._conformance_base import ProviderFactory
from sagellm_backend.testing._conformance_device import DeviceChecks
from sagellm_backend.testing._conformance_kv import KVChecks

# The ``X as X`` imports keep the protocol names importable from here, as they were when
# the suite was one module.
__all__ = ["ProviderConformance", "make_conformance_tests"]


class ProviderConformance(DeviceChecks, KVChecks):
    """Base class of the conformance suite; subclass it and override :meth:`make_provider`.

    Attributes (override in the subclass to match the provider):
        kv_tracking_keys: ``memory_stats()`` keys that must rise with KV allocations and
            return to their value after the blocks are freed (``kv_used_bytes`` is part of
            the sagellm-backend contract; the mock also moves ``allocated``).
        required_memory_keys: keys every ``memory_stats()`` must have (non-negative ints).
        migrate_targets: devices ``kv_block_migrate`` must accept; None means the device of
            the block itself (a same-device move).
        unsupported_migrate_target: a device string that must be refused with ValueError.
        event_sleep_ms: the real sleep the event-timing test measures.
        max_fill_allocations: bound on allocations while filling the KV pool; the capacity
            test fails (asking for a smaller pool) if the pool is not full by then.
        fill_chunk_tokens: first allocation size (tokens) while filling the pool.
        kv_tokens: tokens per block in the ordinary KV tests.
    """


def make_conformance_tests(
    factory: ProviderFactory, *, name: str = "TestProviderConformance", **attributes: Any
) -> type[ProviderConformance]:
    """Build a pytest-collectable conformance class for ``factory``.

    Args:
        factory: zero-argument callable returning a fresh provider.
        name: the class name (must start with ``Test`` for pytest to collect it).
        **attributes: overrides of :class:`ProviderConformance` attributes, e.g.
            ``migrate_targets=("cpu",)``.

    Example:
        >>> TestMyProvider = make_conformance_tests(lambda: MyProvider())  # doctest: +SKIP
    """
    unknown = [k for k in attributes if not hasattr(ProviderConformance, k)]
    if unknown:
        raise TypeError(f"unknown conformance attributes: {', '.join(sorted(unknown))}")

    @pytest.fixture
    def provider_factory(self: ProviderConformance) -> ProviderFactory:
        return factory

    namespace: dict[str, Any] = {"provider_factory": provider_factory, **attributes}
    return type(name, (ProviderConformance,), namespace)
