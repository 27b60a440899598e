"""Import hygiene and the 0.1.1.2 public API.

Each check that is about *what gets imported* runs in a fresh interpreter, because the
test process itself has long since imported torch.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "transformers", "accelerate", "sentence_transformers", "bitsandbytes")

SEED_EXAMPLE = """\
from sagellm_backend import MockBackendProvider, DType

# 创建 mock backend
backend = MockBackendProvider(
    supported_dtypes=[DType.FP16, DType.BF16],
    has_collective=True,
)

# 查询能力
cap = backend.capability()
print(cap.supported_dtypes)

# 分配 KV 块
block = backend.kv_block_alloc(128, DType.FP16)
"""

PUBLIC_0_1_1_2 = (
    "MockBackendProvider",
    "DType",
    "CapabilityDescriptor",
    "KernelKind",
    "BackendProvider",
    "Stream",
    "Event",
    "KVBlock",
    "create_mock_backend",
    "CPUBackendProvider",
    "create_cpu_backend",
    "BaseEngine",
    "EngineConfig",
    "EngineFactory",
    "MockEngine",
    "MockEngineConfig",
    "create_mock_engine",
)


# Where each 0.1.1.2 name lived (and still lives).
HOME_MODULES = {
    "sagellm_backend.base": ("BackendProvider", "Event", "KVBlock", "Stream"),
    "sagellm_backend.capability": ("CapabilityDescriptor", "DType", "KernelKind"),
    "sagellm_backend.providers.mock": ("MockBackendProvider", "create_mock_backend"),
    "sagellm_backend.providers.cpu": ("CPUBackendProvider", "create_cpu_backend"),
    "sagellm_backend.engine": (
        "BaseEngine",
        "EngineConfig",
        "EngineFactory",
        "MockEngine",
        "MockEngineConfig",
        "create_mock_engine",
    ),
}


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def heavy_modules_after(code: str) -> list[str]:
    probe = (
        textwrap.dedent(code)
        + "\nimport json, sys\n"
        + f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    result = run_python(probe)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


def test_importing_the_package_imports_no_torch_or_transformers() -> None:
    loaded = heavy_modules_after(
        """
        import sagellm_backend
        import sagellm_backend.engine
        import sagellm_backend.registry
        import sagellm_backend.cli
        import sagellm_backend.testing
        """
    )
    assert loaded == []


def test_the_probe_sees_heavy_modules() -> None:
    """The probe above is not vacuous: a (stand-in) torch module in sys.modules is reported."""
    loaded = heavy_modules_after(
        "import sys, types\nsys.modules['torch.nn'] = types.ModuleType('torch.nn')\n"
    )
    assert loaded == ["torch.nn"]


def test_mock_stack_and_public_names_import_no_torch() -> None:
    names = ", ".join(PUBLIC_0_1_1_2)
    loaded = heavy_modules_after(
        f"""
        from sagellm_backend import {names}
        backend = create_mock_backend()
        backend.kv_block_free(backend.kv_block_alloc(16, DType.FP16))
        """
    )
    assert loaded == []


def test_loading_every_entry_point_imports_no_torch() -> None:
    """sagellm-core loads every entry point of our groups: that alone must stay light.

    (Asking the cuda kind whether it is *available* may import torch -- it has to ask
    torch -- but merely loading the factories must not.)
    """
    loaded = heavy_modules_after(
        """
        import importlib.metadata
        for group in ("sagellm.backends", "sagellm.engines"):
            eps = importlib.metadata.entry_points(group=group)
            assert eps, group
            for ep in eps:
                assert callable(ep.load()), ep
        """
    )
    assert loaded == []


def test_public_names_of_0_1_1_2_are_importable_from_the_same_modules() -> None:
    import sagellm_backend

    for name in PUBLIC_0_1_1_2:
        assert getattr(sagellm_backend, name) is not None, name
    for module_name, names in HOME_MODULES.items():
        module = importlib.import_module(module_name)
        for name in names:
            assert getattr(module, name) is getattr(sagellm_backend, name), (module_name, name)


def test_every_name_in_dunder_all_resolves() -> None:
    import sagellm_backend

    for name in sagellm_backend.__all__:
        assert getattr(sagellm_backend, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        _ = sagellm_backend.NotAThing


def test_capability_types_are_the_protocol_ones() -> None:
    import sagellm_protocol

    import sagellm_backend

    if not hasattr(sagellm_protocol, "CapabilityDescriptor"):
        pytest.skip("isagellm-protocol < 0.1.2 has no capability types (see the next test)")
    assert sagellm_backend.DType is sagellm_protocol.DType
    assert sagellm_backend.KernelKind is sagellm_protocol.KernelKind
    assert sagellm_backend.CapabilityDescriptor is sagellm_protocol.CapabilityDescriptor


def test_the_fallback_capability_types_match_the_protocol_ones() -> None:
    """What an old protocol gets (sagellm_backend._capability_types) is the protocol's shape."""
    import dataclasses

    import sagellm_protocol

    from sagellm_backend import _capability_types as fallback

    if not hasattr(sagellm_protocol, "CapabilityDescriptor"):
        pytest.skip("isagellm-protocol < 0.1.2: nothing to compare the fallback with")

    def fields(cls: type) -> list[tuple[str, object, object]]:
        return [
            (f.name, str(f.type), f.default if f.default_factory is dataclasses.MISSING else [])
            for f in dataclasses.fields(cls)
        ]

    assert fields(fallback.CapabilityDescriptor) == fields(sagellm_protocol.CapabilityDescriptor)
    for name in ("DType", "KernelKind"):
        ours, theirs = getattr(fallback, name), getattr(sagellm_protocol, name)
        assert [(m.name, m.value) for m in ours] == [(m.name, m.value) for m in theirs]
        assert ours.__mro__[1:] == theirs.__mro__[1:]  # (str, Enum, object)
    assert fallback.CapabilityDescriptor() == fallback.CapabilityDescriptor()


def test_mock_provider_is_a_backend_provider() -> None:
    from sagellm_backend import BackendProvider, MockBackendProvider

    assert isinstance(MockBackendProvider(), BackendProvider)
    assert not isinstance(object(), BackendProvider)


def test_seed_example_runs_verbatim() -> None:
    result = run_python(SEED_EXAMPLE)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert "FP16" in printed and "BF16" in printed
    namespace: dict[str, object] = {}
    exec(compile(SEED_EXAMPLE, "<seed>", "exec"), namespace)
    block = namespace["block"]
    from sagellm_backend import DType, KVBlock

    assert isinstance(block, KVBlock)
    assert block.num_tokens == 128 and block.dtype == DType.FP16
    backend = namespace["backend"]
    assert backend.capability().supported_dtypes == [DType.FP16, DType.BF16]
    assert backend.capability().has_collective is True


def test_version_is_in_the_0_1_line() -> None:
    import importlib.metadata

    import sagellm_backend

    assert sagellm_backend.__version__ == importlib.metadata.version("isagellm-backend")
    major, minor = (int(p) for p in sagellm_backend.__version__.split(".")[:2])
    assert (major, minor) == (0, 1)
