"""Point 3: HFCudaEngineConfig follows the seed exactly (device and device_map)."""

from __future__ import annotations

from typing import Any

import pytest

from sagellm_backend.engine.hf_cuda import HFCudaEngineConfig
from sagellm_backend.errors import ConfigError
from seed_fields import SEED_CUDA_FIELDS as FIELDS


@pytest.mark.parametrize("mock_mode", [False, True])
def test_device_is_required_in_every_mode(mock_mode: bool) -> None:
    fields = {k: v for k, v in FIELDS.items() if k != "device"}
    with pytest.raises(ConfigError, match=r"device is required.*'cuda:0'"):
        HFCudaEngineConfig(**fields, mock_mode=mock_mode)


@pytest.mark.parametrize("device", ["cpu", "auto", "npu:0", "gpu:0", "mock", "cuda:x", ""])
@pytest.mark.parametrize("mock_mode", [False, True])
def test_device_must_be_cuda_in_every_mode(device: str, mock_mode: bool) -> None:
    with pytest.raises(ConfigError) as info:
        HFCudaEngineConfig(**{**FIELDS, "device": device}, mock_mode=mock_mode)
    text = str(info.value)
    assert "device" in text and repr(device) in text and "'cuda:N'" in text


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_devices_are_accepted(device: str) -> None:
    assert HFCudaEngineConfig(**{**FIELDS, "device": device}).device == device
    assert HFCudaEngineConfig(**{**FIELDS, "device": device}, mock_mode=True).mock_mode


@pytest.mark.parametrize("device_map", ["balanced", "balanced_low_0", "sequential", "cpu", "cuda"])
def test_device_map_other_strategies_are_refused(device_map: str) -> None:
    with pytest.raises(ConfigError) as info:
        HFCudaEngineConfig(**{**FIELDS, "device_map": device_map})
    text = str(info.value)
    assert "device_map" in text and repr(device_map) in text
    assert "'auto'" in text and "'cuda:N'" in text and "dict" in text


@pytest.mark.parametrize("device_map", ["auto", "cuda:1", {"": "cuda:0"}])
def test_device_map_valid_values(device_map: Any) -> None:
    assert HFCudaEngineConfig(**{**FIELDS, "device_map": device_map}).device_map == device_map


def test_cpu_capabilities_live_on_cpu_engine_config() -> None:
    from sagellm_backend.engine.cpu import CPUEngineConfig

    cfg = CPUEngineConfig(
        engine_id="c",
        model_path="/models/m",
        torch_dtype="bfloat16",
        trust_remote_code=True,
        load_in_8bit=False,
        max_new_tokens=32,
        max_batch_size=4,
        num_threads=2,
    )
    assert cfg.device == "cpu"
    with pytest.raises(ConfigError, match="device"):
        CPUEngineConfig(engine_id="c", model_path="/models/m", device="cuda:0")
