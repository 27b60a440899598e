"""What holds under every isagellm-protocol the package accepts (``>=0.1.0,<0.2``).

Job 1 runs this folder under the newest 0.1.x protocol. The no-torch job (quickstart.sh)
runs it again with the oldest ones first on ``PYTHONPATH`` (0.1.0 and 0.1.1.0), so the
declared range is tested rather than assumed. Older protocols have fewer Metrics fields:
the engines fill every field the installed protocol has, and the rest does not exist.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import pytest
from sagellm_protocol import Metrics, Request, Response, StreamEventEnd

from sagellm_backend import cli
from sagellm_backend.capability import CapabilityDescriptor, DType, KernelKind
from sagellm_backend.engine.mock import MockEngine, MockEngineConfig
from sagellm_backend.providers.mock import MockBackendProvider

#: Metrics fields added after protocol 0.1.0 that the engines measure: filled when present.
MEASURED_IF_PRESENT = ("itl_list", "timestamps", "component_trace", "prefill_ms", "decode_ms")


def _request(rid: str, *, stream: bool) -> Request:
    return Request(
        request_id=rid,
        trace_id="t",
        model="mock",
        prompt="one two three",
        max_tokens=5,
        stream=stream,
    )


def _check_measured(metrics: Metrics) -> None:
    fields = type(metrics).model_fields
    assert metrics.ttft_ms > 0 and metrics.throughput_tps > 0
    for name in MEASURED_IF_PRESENT:
        if name in fields:
            value = getattr(metrics, name)
            assert value, f"{name} is not filled: {value!r}"


def test_the_protocol_in_use_is_in_the_declared_range() -> None:
    import sagellm_protocol
    from packaging.requirements import Requirement

    spec = next(
        Requirement(r).specifier
        for r in importlib.metadata.requires("isagellm-backend") or []
        if Requirement(r).name == "isagellm-protocol"
    )
    # the version of the protocol actually imported (PYTHONPATH may put an older one first)
    dist = Path(sagellm_protocol.__file__).resolve().parents[1]
    versions = [
        d.name.removeprefix("isagellm_protocol-").removesuffix(".dist-info")
        for d in dist.glob("isagellm_protocol-*.dist-info")
    ]
    assert len(versions) == 1, versions
    assert spec.contains(versions[0]), (versions[0], str(spec))


def test_mock_engine_serves_and_fills_every_metric_the_protocol_has() -> None:
    async def body() -> tuple[Response, StreamEventEnd]:
        engine = MockEngine(MockEngineConfig("range", 1.0, 1.0))
        await engine.start()
        try:
            response = await engine.execute(_request("a", stream=False))
            events = [e async for e in engine.stream(_request("b", stream=True))]
        finally:
            await engine.stop()
        end = events[-1]
        assert isinstance(end, StreamEventEnd)
        return response, end

    response, end = asyncio.run(body())
    assert response.finish_reason == "length" and len(response.output_tokens) == 5
    assert end.finish_reason == "length" and len(end.output_tokens) == 5
    for metrics in (response.metrics, end.metrics):
        _check_measured(metrics)
        assert Metrics.model_validate(metrics.model_dump()) == metrics


def test_capability_types_work_with_the_providers() -> None:
    cap = MockBackendProvider().capability()
    assert isinstance(cap, CapabilityDescriptor)
    assert cap.supported_dtypes and all(isinstance(d, DType) for d in cap.supported_dtypes)
    assert all(isinstance(k, KernelKind) for k in cap.supported_kernels)
    assert DType("bf16") is DType.BF16 and KernelKind("matmul") is KernelKind.MATMUL


def test_bench_cli_on_the_mock_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bench.json"
    argv = ["bench", "--engine", "mock", "--mock-ttft-ms", "1", "--mock-latency-ms", "1"]
    argv += ["--requests", "4", "--concurrency", "2", "--input-len", "8", "--output-len", "4"]
    code = cli.main([*argv, "--no-progress", "--json", str(path)])
    err = capsys.readouterr().err
    assert code == 0, err
    results: dict[str, Any] = json.loads(path.read_text())["results"]
    assert results["completed"] == 4 and results["output_tokens"] == 16
    itl_count = results["latency_ms"]["itl"]["count"]
    assert itl_count == (4 * 3 if "itl_list" in Metrics.model_fields else 0)
