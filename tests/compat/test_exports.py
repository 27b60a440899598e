"""Point 4: every module of 0.1.1.2 exports the same names (recorded from the wheel).

torch-backed names resolve lazily: importing the package (or ``providers``) never imports
torch. ``scripts/check_compat.py`` diffs the full surface (signatures, fields, enums).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

import pytest

from sagellm_backend.engine.base import EngineConfig
from sagellm_backend.errors import DependencyMissingError

RunScript = Callable[[str], list[str]]

# Public names of each 0.1.1.2 module (from the published wheel), less the three
# internals docs/compat.md lists as removed (GenerationRequest, KVStats, KVTracker).
PUBLISHED_NAMES: dict[str, list[str]] = {
    "sagellm_backend": [
        "BackendProvider",
        "BaseEngine",
        "CPUBackendProvider",
        "CapabilityDescriptor",
        "DType",
        "EmbeddingEngine",
        "EmbeddingEngineConfig",
        "EngineConfig",
        "EngineFactory",
        "Event",
        "KVBlock",
        "KernelKind",
        "MockBackendProvider",
        "MockEngine",
        "MockEngineConfig",
        "Stream",
        "__version__",
        "create_cpu_backend",
        "create_mock_backend",
        "create_mock_engine",
    ],
    "sagellm_backend.base": [
        "BackendProvider",
        "CapabilityDescriptor",
        "DType",
        "Event",
        "KVBlock",
        "Stream",
    ],
    "sagellm_backend.capability": ["CapabilityDescriptor", "DType", "KernelKind"],
    "sagellm_backend.engine": [
        "BaseEngine",
        "CPUEngine",
        "CPUEngineConfig",
        "EmbeddingEngine",
        "EmbeddingEngineConfig",
        "EngineFactory",
        "HFCudaEngine",
        "HFCudaEngineConfig",
        "MockEngine",
        "create_cpu_engine",
        "create_cuda_engine",
        "create_mock_engine",
    ],
    "sagellm_backend.engine.adapters": [],
    "sagellm_backend.engine.adapters.lmdeploy": [
        "BaseEngine",
        "EngineConfig",
        "LMDeployAdapter",
        "Metrics",
        "Request",
        "Response",
        "StreamEventDelta",
        "StreamEventEnd",
        "StreamEventStart",
    ],
    "sagellm_backend.engine.adapters.vllm": [
        "BaseEngine",
        "EngineConfig",
        "Metrics",
        "Request",
        "Response",
        "StreamEventDelta",
        "StreamEventEnd",
        "StreamEventStart",
        "VLLMAdapter",
    ],
    "sagellm_backend.engine.base": ["BaseEngine", "EngineConfig", "Request", "Response"],
    "sagellm_backend.engine.cpu": [
        "BaseEngine",
        "CPUEngine",
        "CPUEngineConfig",
        "EngineConfig",
        "Metrics",
        "Request",
        "Response",
        "StreamEventDelta",
        "StreamEventEnd",
        "StreamEventStart",
        "Timestamps",
        "create_cpu_engine",
    ],
    "sagellm_backend.engine.embedding": ["EmbeddingEngine", "EmbeddingEngineConfig"],
    "sagellm_backend.engine.factory": [
        "BackendProvider",
        "BaseEngine",
        "EngineConfig",
        "EngineFactory",
        "MockEngine",
        "create_mock_engine",
    ],
    "sagellm_backend.engine.hf_cuda": [
        "BackendProvider",
        "BaseEngine",
        "EngineConfig",
        "HFCudaEngine",
        "HFCudaEngineConfig",
        "KVAllocateParams",
        "KVDType",
        "KVEvictReason",
        "KVHandle",
        "KVLayout",
        "Metrics",
        "Request",
        "Response",
        "StreamEventDelta",
        "StreamEventEnd",
        "StreamEventStart",
        "Timestamps",
    ],
    "sagellm_backend.engine.mock": [
        "BaseEngine",
        "EngineConfig",
        "Metrics",
        "MockEngine",
        "MockEngineConfig",
        "Request",
        "Response",
        "StreamEventDelta",
        "StreamEventEnd",
        "StreamEventStart",
        "create_mock_engine",
    ],
    "sagellm_backend.providers": [
        "CudaBackendProvider",
        "MockBackendProvider",
        "create_mock_backend",
    ],
    "sagellm_backend.providers.cpu": [
        "BackendProvider",
        "CPUBackendProvider",
        "CPUEvent",
        "CPUStream",
        "CapabilityDescriptor",
        "DType",
        "Event",
        "KVBlock",
        "KernelKind",
        "Stream",
        "create_cpu_backend",
    ],
    "sagellm_backend.providers.cuda": [
        "BackendProvider",
        "CapabilityDescriptor",
        "CudaBackendProvider",
        "CudaEvent",
        "CudaStream",
        "DType",
        "Event",
        "KVBlock",
        "KernelKind",
        "Stream",
    ],
    "sagellm_backend.providers.mock": [
        "CapabilityDescriptor",
        "DType",
        "Event",
        "KVBlock",
        "KernelKind",
        "MockBackendProvider",
        "MockEvent",
        "MockStream",
        "Stream",
        "create_mock_backend",
    ],
}


@pytest.mark.parametrize("module", sorted(PUBLISHED_NAMES))
def test_module_exports_the_published_names(module: str) -> None:
    mod = importlib.import_module(module)
    missing = [n for n in PUBLISHED_NAMES[module] if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}"


def test_providers_package_names_are_lazy(without_torch: RunScript) -> None:
    lines = without_torch(
        """
        import sagellm_backend.providers as providers
        from sagellm_backend.providers import MockBackendProvider, create_mock_backend
        from sagellm_backend.providers import CudaBackendProvider
        print(sorted(providers.__all__))
        print(MockBackendProvider.__name__, CudaBackendProvider.__name__,
              create_mock_backend().capability().device_type)
        """
    )
    assert lines[0] == str(
        sorted(
            [
                "CPUBackendProvider",
                "CudaBackendProvider",
                "MockBackendProvider",
                "create_cpu_backend",
                "create_cuda_backend",
                "create_mock_backend",
            ]
        )
    )
    assert lines[1].startswith("MockBackendProvider CudaBackendProvider")


@pytest.mark.parametrize(
    ("module", "cls", "package"),
    [
        ("sagellm_backend.engine.adapters.vllm", "VLLMAdapter", "vllm"),
        ("sagellm_backend.engine.adapters.lmdeploy", "LMDeployAdapter", "lmdeploy"),
    ],
)
async def test_adapters_import_and_fail_when_used(module: str, cls: str, package: str) -> None:
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    adapter_cls = getattr(importlib.import_module(module), cls)
    adapter = adapter_cls(EngineConfig(engine_id="a", model_path="m"))
    assert adapter_cls.is_available() is False
    with pytest.raises(DependencyMissingError, match=f"pip install {package}"):
        await adapter.start()
    assert not adapter.is_running
