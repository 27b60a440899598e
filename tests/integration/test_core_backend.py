"""sagellm-core 0.1.x resolves our ``sagellm.backends`` entry points, unchanged.

sagellm-core's ``create_backend(BackendConfig(kind=...))`` loads *every* entry point of the
group before picking one (``list_entry_points``), so one of ours failing to import would
break every kind; these tests go through that real code path.
"""

from __future__ import annotations

import importlib.metadata

import pytest

sagellm_core = pytest.importorskip("sagellm_core", reason="isagellm-core is a dev dependency")

from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

from sagellm_backend import BackendProvider, DType  # noqa: E402
from sagellm_backend.errors import BackendError  # noqa: E402
from sagellm_backend.registry import BackendRegistry  # noqa: E402


def test_installed_core_accepts_this_version() -> None:
    core_version = Version(importlib.metadata.version("isagellm-core"))
    assert (core_version.major, core_version.minor) == (0, 1)
    ours = Version(importlib.metadata.version("isagellm-backend"))
    requirements = [Requirement(r) for r in importlib.metadata.requires("isagellm-core") or []]
    backend_req = next(r for r in requirements if r.name == "isagellm-backend")
    assert ours in backend_req.specifier, (str(ours), str(backend_req))


def test_core_loads_every_backend_and_engine_entry_point() -> None:
    backends = sagellm_core.list_entry_points("sagellm.backends")
    assert {"mock", "cpu", "cuda"} <= set(backends)
    assert all(callable(factory) for factory in backends.values())
    engines = sagellm_core.list_entry_points("sagellm.engines")
    assert {"mock", "cpu", "cuda", "hf_cuda"} <= set(engines)


def test_core_creates_our_mock_provider() -> None:
    from sagellm_backend import MockBackendProvider

    backend = sagellm_core.create_backend(sagellm_core.BackendConfig(kind="mock"))
    assert type(backend) is MockBackendProvider
    assert isinstance(backend, BackendProvider)
    block = backend.kv_block_alloc(128, DType.FP16)
    assert block.num_tokens == 128
    assert backend.memory_stats()["allocated"] > 0
    backend.kv_block_free(block)


def test_core_creates_our_cpu_provider() -> None:
    pytest.importorskip("torch")
    from sagellm_backend import CPUBackendProvider

    backend = sagellm_core.create_backend(sagellm_core.BackendConfig(kind="cpu"))
    try:
        assert type(backend) is CPUBackendProvider
        assert isinstance(backend, BackendProvider)
        assert backend.capability().device_type == "cpu"
    finally:
        backend.close()


def test_core_cuda_kind_is_clean_either_way() -> None:
    """On a GPU machine core gets a provider; elsewhere a clear error of ours, not a crash."""
    status = BackendRegistry().status("cuda")
    config = sagellm_core.BackendConfig(kind="cuda")
    if status.available:
        backend = sagellm_core.create_backend(config)
        assert backend.capability().device_type == "cuda"
        return
    with pytest.raises(BackendError) as info:
        sagellm_core.create_backend(config)
    assert "cuda" in str(info.value).lower()


def test_core_unknown_kind_is_its_resolution_error() -> None:
    with pytest.raises(sagellm_core.PluginResolutionError):
        sagellm_core.create_backend(sagellm_core.BackendConfig(kind="no_such_backend"))
