"""Bad-input matrix: every config field and request field with invalid values.

Each case must give a clear error naming the field (the field name is asserted to be in
the message); a bad request never raises out of ``execute``/``stream`` but ends with
``finish_reason="error"`` and INVALID_ARGUMENT (RESOURCE_EXHAUSTED for KV that can never
fit), and the engine serves the next good request. The number of cases is printed by
``test_case_count`` (run with ``-s``) and recorded as a junit property.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sagellm_protocol import ErrorCode

from sagellm_backend.engine.cpu import CPUEngineConfig, create_cpu_engine
from sagellm_backend.engine.factory import EngineFactory
from sagellm_backend.engine.hf_cuda import HFCudaEngineConfig, create_cuda_engine
from sagellm_backend.engine.mock import (
    ENV_MOCK_OPTIONS,
    MockEngine,
    MockEngineConfig,
    create_mock_engine,
)
from sagellm_backend.errors import ConfigError
from sagellm_backend.providers.mock import MockBackendProvider
from sagellm_backend.registry import BackendRegistry
from seed_fields import SEED_CUDA_FIELDS

from .conftest import bad_request, make_request, words

NAN = math.nan
INF = math.inf

Case = tuple[str, dict[str, Any], str]  # (id, fields, the field name the error must name)


def _cases(field: str, values: list[Any], name: str | None = None) -> list[Case]:
    return [(f"{field}={v!r}", {field: v}, name or field) for v in values]


# ---------------------------------------------------------------------------- configs

MOCK_CONFIG_CASES: list[Case] = [
    *_cases("engine_id", ["", "   ", None, 5]),
    *_cases("model_path", [5, ["m"]]),
    *_cases("device", ["", None, 3]),
    *_cases("max_batch_size", [None, 0, -1, "4", True, 2.5]),
    *_cases("mock_mode", ["yes", 1, None]),
    *_cases("provider", ["mock", 42, object()]),
    *_cases("metadata", ["x", ["a"], None]),
    *_cases("simulate_latency_ms", [-1.0, NAN, INF, "10", True, None]),
    *_cases("simulate_ttft_ms", [-0.5, NAN, "0"]),
    *_cases("simulate_failure_rate", [-0.1, 1.5, NAN, "0.1"]),
    *_cases("vocabulary_size", [100, 511, "big", True, 1000.0]),
    *_cases("jitter_ms", [-1.0, INF]),
    *_cases("seed", ["x", 1.5, True]),
    *_cases("default_max_tokens", [0, -3, None, "8"]),
    *_cases("max_input_tokens", [0, -1, "x", 2.0]),
    *_cases("max_output_tokens", [0, "x"]),
    *_cases("eos_probability", [-0.5, 2.0, NAN]),
    *_cases("kv_spec", ["spec", 16]),
    *_cases("kv_memory_bytes", [0, -1, "1MB"]),
    *_cases("kv_num_pages", [0, -4, "x", 1.5]),
    (
        "kv_memory_bytes+kv_num_pages",
        {"kv_memory_bytes": 1 << 20, "kv_num_pages": 8},
        "kv_num_pages",
    ),
    *_cases("enable_prefix_caching", ["yes", 1, None]),
    *_cases("fail_at_start", [1, "no"]),
    *_cases("slow_step_every", [-1, "x", 0.5]),
    *_cases("slow_step_ms", [-1.0, NAN]),
    *_cases("strict_model", ["no", 0]),
    *_cases("component_trace", ["abc", [1, 2], ("a",)]),
    ("unknown field", {"warp_speed": 9}, "warp_speed"),
]

_CPU_BASE: dict[str, Any] = {"engine_id": "cpu-bad", "model_path": "/models/tiny"}

CPU_CONFIG_CASES: list[Case] = [
    *_cases("engine_id", ["", " ", None, 7]),
    *_cases("model_path", [None, "", "  ", 5]),
    *_cases("mock_mode", ["yes", 1, None]),
    *_cases("device", ["cuda:0", "gpu", "", None, 0]),
    *_cases("max_batch_size", [None, 0, -1, "8", True, 2.5]),
    *_cases("max_new_tokens", [None, 0, -5, "64", False]),
    *_cases("torch_dtype", ["fp64", "int8", None, "Float32", 32]),
    *_cases("trust_remote_code", ["no", None, 0]),
    *_cases("low_cpu_mem_usage", [1, "yes"]),
    *_cases("load_in_8bit", ["x", None]),
    *_cases("num_threads", [0, -2, "2", 1.5, True]),
    *_cases("kv_cache_memory_bytes", [0, -1, "1GB", True, 1.5]),
    *_cases("block_size", [0, -16, "16", None, True]),
    *_cases("enable_prefix_caching", ["y", None]),
    *_cases("max_num_batched_tokens", [0, "2048", None]),
    (
        "max_num_batched_tokens<max_batch_size",
        {"max_batch_size": 64, "max_num_batched_tokens": 32},
        "max_num_batched_tokens",
    ),
    *_cases("max_model_len", [0, 1, -1, "2k"]),
    *_cases("max_input_tokens", [0, "x"]),
    *_cases("runner", ["fast", None, ""]),
    *_cases("fuse_projections", ["y", None]),
    *_cases("metadata", ["x", None]),
    ("metadata option invalid", {"metadata": {"block_size": 0}}, "block_size"),
    ("metadata option conflict", {"block_size": 32, "metadata": {"block_size": 64}}, "block_size"),
    *_cases("provider", ["cpu", 3]),
]

_CUDA_BASE: dict[str, Any] = {
    **SEED_CUDA_FIELDS,
    "engine_id": "hf-bad",
    "max_new_tokens": 16,
    "max_batch_size": 4,
}

CUDA_CONFIG_CASES: list[Case] = [
    *_cases("engine_id", ["", None, 1]),
    *_cases("model_path", [None, "", 5]),
    *_cases("device", ["cpu", "gpu:0", "cuda:x", "cuda0", "", None, "CUDA:0", " cuda:0"]),
    *_cases("dtype", [None, "fp16", "int8", "float64", 16]),
    *_cases("device_map", [None, "cpu", "cuda:a", "everywhere", {}, {1: "cuda:0"}, 0]),
    *_cases("load_in_8bit", [None, "yes", 1]),
    *_cases("load_in_4bit", [None, "no", 0]),
    ("both quantisations", {"load_in_8bit": True, "load_in_4bit": True}, "load_in_4bit"),
    # bfloat16 with 8/4-bit is valid; a GPU without bf16 is rejected at start() (issue 16)
    ("fp4 without 4-bit", {"bnb_4bit_quant_type": "fp4"}, "load_in_4bit=True"),
    (
        "unknown 4-bit type",
        {"load_in_4bit": True, "bnb_4bit_quant_type": "int2"},
        "bnb_4bit_quant_type",
    ),
    *_cases("trust_remote_code", [None, "false"]),
    *_cases("max_new_tokens", [None, 0, -1, "16", True]),
    *_cases("max_batch_size", [None, 0, -2, "4", 1.0]),
    *_cases("mock_mode", ["no", None]),
    *_cases("kv_cache_memory_bytes", [0, "lots"]),
    *_cases("block_size", [0, "x"]),
    *_cases("max_num_batched_tokens", [0, 2]),
    *_cases("max_model_len", [0]),
    *_cases("max_input_tokens", [-1]),
    *_cases("runner", ["vllm"]),
    *_cases("enable_prefix_caching", ["on"]),
    *_cases("fuse_projections", [1]),
    *_cases("metadata", [[("a", 1)]]),
    *_cases("provider", ["cuda"]),
]

_PROVIDER_CASES: list[Case] = [
    *_cases("supported_dtypes", [["fp64"], ["nope"]]),
    *_cases("supported_kernels", [["warp"]]),
    *_cases("has_collective", ["yes"]),
    *_cases("has_stream", [1]),
    *_cases("max_memory_mb", [0, -1, "16GB", True]),
    *_cases("max_batch_size", [0, "x"]),
    *_cases("max_sequence_length", [-1]),
    *_cases("world_size", [0, "2"]),
    ("rank out of range", {"world_size": 2, "rank": 2}, "rank"),
    *_cases("rank", [-1, "0"]),
    *_cases("device", ["", "  ", None]),
    *_cases("device_name", [""]),
    *_cases("kv_spec", ["llama"]),
    *_cases("kv_block_size", [0, "16"]),
    *_cases("offload_device", ["mock:0", 5]),
    *_cases("offload_memory_mb", [0]),
    *_cases("fail_kv_after_pages", [0, "3"]),
    *_cases("failing_kernels", ["matmul"]),
    *_cases("kernel_latency_ms", [-1.0, "slow"]),
    *_cases("collective_latency_ms", [-5]),
]

_FACTORY_CASES: list[tuple[str, Any, str]] = [
    # (id, callable raising ConfigError, text the message must contain)
    ("mock dict unknown key", lambda: create_mock_engine({"engine_id": "x", "bogus": 1}), "bogus"),
    ("mock kind mismatch", lambda: create_mock_engine({"kind": "cpu", "engine_id": "x"}), "kind"),
    (
        "mock extra args",
        lambda: create_mock_engine({"engine_id": "x"}, None, 1),
        "create_mock_engine",
    ),
    ("mock bad provider", lambda: create_mock_engine(MockEngineConfig("x"), "prov"), "backend"),
    ("cpu dict unknown key", lambda: create_cpu_engine({"model": "m", "turbo": True}), "turbo"),
    ("cpu kind mismatch", lambda: create_cpu_engine({"kind": "cuda", "model": "m"}), "kind"),
    (
        "cpu max_output_tokens vs max_new_tokens",
        lambda: create_cpu_engine({"model": "m", "max_output_tokens": 8, "max_new_tokens": 9}),
        "max_new_tokens",
    ),
    (
        "cuda missing max_batch_size",
        lambda: create_cuda_engine({"model": "m", "max_new_tokens": 8}),
        "max_batch_size",
    ),
    ("cuda unknown key", lambda: create_cuda_engine({"model": "m", "warp": 1}), "warp"),
    ("cuda kind mismatch", lambda: create_cuda_engine({"kind": "cpu", "model": "m"}), "kind"),
    ("factory unknown kind", lambda: EngineFactory.create("warp-drive", {}), "warp-drive"),
    ("factory bad provider", lambda: EngineFactory.create("mock", {}, provider="p"), "provider"),
    ("registry unknown kind", lambda: BackendRegistry().create("warp-drive"), "warp-drive"),
    ("mock backend unknown option", lambda: BackendRegistry().create("mock", speed=1), "speed"),
    (
        "mock backend kind mismatch",
        lambda: BackendRegistry().create("mock", {"kind": "cpu"}),
        "kind",
    ),
]


def _ids(cases: list[Any]) -> list[str]:
    return [c[0] for c in cases]


#: Known MockEngineConfig bugs (reported to the owner): case id -> reason. Strict xfail: a
#: fix makes them pass, and then the mark must go.
MOCK_CONFIG_BUGS: dict[str, str] = {}


def _params(cases: list[Case], known_bugs: dict[str, str] | None = None) -> list[Any]:
    out = []
    for case in cases:
        reason = (known_bugs or {}).get(case[0])
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(*case, id=case[0], marks=marks))
    return out


@pytest.mark.parametrize(("case", "fields", "name"), _params(MOCK_CONFIG_CASES, MOCK_CONFIG_BUGS))
async def test_mock_engine_config(case: str, fields: dict[str, Any], name: str) -> None:
    fields = dict(fields)
    engine_id = fields.pop("engine_id", "mock-bad")
    with pytest.raises(ConfigError) as info:
        MockEngine(MockEngineConfig(engine_id, **fields))
    assert name in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)  # 0.1.1.x callers catch ValueError
    # the next good config builds an engine that serves
    engine = MockEngine(MockEngineConfig("mock-good", 0.0, 0.0))
    await engine.start()
    resp = await engine.execute(make_request(max_tokens=3))
    assert resp.finish_reason == "length"
    await engine.stop()


@pytest.mark.parametrize(("case", "fields", "name"), _params(CPU_CONFIG_CASES))
def test_cpu_engine_config(case: str, fields: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError) as info:
        CPUEngineConfig(**{**_CPU_BASE, **fields})
    assert name in str(info.value), str(info.value)
    assert CPUEngineConfig(**_CPU_BASE).model_path == _CPU_BASE["model_path"]


@pytest.mark.parametrize(("case", "fields", "name"), _params(CUDA_CONFIG_CASES))
def test_cuda_engine_config(case: str, fields: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError) as info:
        HFCudaEngineConfig(**{**_CUDA_BASE, **fields})
    assert name in str(info.value), str(info.value)
    assert HFCudaEngineConfig(**_CUDA_BASE).device == "cuda:0"


@pytest.mark.parametrize(("case", "fields", "name"), _params(_PROVIDER_CASES))
def test_mock_provider_config(case: str, fields: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError) as info:
        MockBackendProvider(**fields)
    assert name in str(info.value), str(info.value)
    provider = MockBackendProvider()
    provider.kv_block_free(provider.kv_block_alloc(16, "fp16"))


def _foreign_block() -> Any:
    return MockBackendProvider().kv_block_alloc(16, "fp16")


def _freed_block(p: MockBackendProvider) -> Any:
    block = p.kv_block_alloc(16, "fp16")
    p.kv_block_free(block)
    return block


#: (id, call on a fresh MockBackendProvider, exception type, text the message must contain)
PROVIDER_CALL_CASES: list[tuple[str, Any, type[BaseException], str]] = [
    *[
        (
            f"kv_block_alloc num_tokens={v!r}",
            (lambda p, v=v: p.kv_block_alloc(v, "fp16")),
            exc,
            "num_tokens",
        )
        for v, exc in [
            (0, ValueError),
            (-1, ValueError),
            (True, TypeError),
            (1.5, TypeError),
            ("8", TypeError),
            (None, TypeError),
        ]
    ],
    *[
        (
            f"kv_block_alloc dtype={v!r}",
            (lambda p, v=v: p.kv_block_alloc(16, v)),
            ValueError,
            "dtype",
        )
        for v in ["fp64", "int3", None, 3, "FP32"]
    ],
    ("kv_block_free None", lambda p: p.kv_block_free(None), ValueError, "KVBlock"),
    (
        "kv_block_free foreign block",
        lambda p: p.kv_block_free(_foreign_block()),
        ValueError,
        "belongs to provider",
    ),
    (
        "kv_block_free twice",
        lambda p: p.kv_block_free(_freed_block(p)),
        ValueError,
        "already freed",
    ),
    (
        "get_kv_tensor freed",
        lambda p: p.get_kv_tensor(_freed_block(p)),
        ValueError,
        "already freed",
    ),
    (
        "kv_block_copy into a smaller block",
        lambda p: p.kv_block_copy(p.kv_block_alloc(64, "fp16"), p.kv_block_alloc(16, "fp16")),
        ValueError,
        "fewer than",
    ),
    (
        "kv_block_copy across dtypes",
        lambda p: p.kv_block_copy(p.kv_block_alloc(16, "fp16"), p.kv_block_alloc(16, "bf16")),
        ValueError,
        "cannot copy",
    ),
    (
        "kv_block_migrate to tpu",
        lambda p: p.kv_block_migrate(p.kv_block_alloc(16, "fp16"), "tpu:0"),
        ValueError,
        "tpu:0",
    ),
    (
        "kv_block_migrate to None",
        lambda p: p.kv_block_migrate(p.kv_block_alloc(16, "fp16"), None),
        ValueError,
        "None",
    ),
    ("get_kernel unknown", lambda p: p.get_kernel("flash_attn_9"), KeyError, "flash_attn_9"),
    (
        "register_kernel duplicate",  # a user kernel twice (a built-in name gives way once)
        lambda p: [p.register_kernel("my_matmul", print) for _ in range(2)],
        ValueError,
        "my_matmul",
    ),
    (
        "register_kernel bad kind",
        lambda p: p.register_kernel("k", print, kind="warp"),
        ValueError,
        "warp",
    ),
    (
        "register_kernel bad dtype",
        lambda p: p.register_kernel("k", print, dtypes=["fp64"]),
        ValueError,
        "fp64",
    ),
    ("all_reduce bad op", lambda p: p.all_reduce([1.0], "median"), ValueError, "median"),
    ("all_reduce op not str", lambda p: p.all_reduce([1.0], 3), ValueError, "op"),
    (
        "create_kv_manager both sizes",
        lambda p: p.create_kv_manager(None, memory_bytes=1 << 20, num_pages=4),
        ValueError,
        "num_pages",
    ),
    (
        "create_kv_manager num_pages=-1",
        lambda p: p.create_kv_manager(None, num_pages=-1),
        ValueError,
        "num_pages",
    ),
    (
        "create_kv_manager memory_bytes='1MB'",
        lambda p: p.create_kv_manager(None, memory_bytes="1MB"),
        ValueError,
        "memory_bytes",
    ),
    ("create_kv_manager spec='llama'", lambda p: p.create_kv_manager("llama"), ValueError, "spec"),
    (
        "create_kv_manager larger than the budget",
        lambda p: p.create_kv_manager(None, num_pages=10**9),
        MemoryError,
        "budget",
    ),
    (
        "release_kv_manager foreign",
        lambda p: p.release_kv_manager(MockBackendProvider().create_kv_manager(None, num_pages=1)),
        ValueError,
        "not created by this provider",
    ),
    (
        "create_stream without streams",
        lambda p: MockBackendProvider(has_stream=False).create_stream(),
        NotImplementedError,
        "has_stream",
    ),
    (
        "all_reduce without collectives",
        lambda p: MockBackendProvider(has_collective=False).all_reduce([1.0]),
        NotImplementedError,
        "collective",
    ),
]


@pytest.mark.parametrize(
    ("case", "call", "exc", "text"), PROVIDER_CALL_CASES, ids=_ids(PROVIDER_CALL_CASES)
)
def test_mock_provider_calls(case: str, call: Any, exc: type[BaseException], text: str) -> None:
    provider = MockBackendProvider()
    before = provider.memory_stats()["kv_used_bytes"]
    with pytest.raises(exc) as info:
        call(provider)
    assert text in str(info.value), str(info.value)
    # the provider keeps serving, and the failed call took nothing
    block = provider.kv_block_alloc(32, "fp16")
    provider.kv_block_free(block)
    leftover = provider.memory_stats()["kv_used_bytes"]
    live = sum(len(b.pages) for b in provider.kv.live_blocks()) * provider.kv.spec.page_bytes
    assert leftover - live == before


@pytest.mark.parametrize(("case", "call", "text"), _FACTORY_CASES, ids=_ids(_FACTORY_CASES))
def test_factories_name_the_bad_field(case: str, call: Any, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        call()
    assert text in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("raw", "text"),
    [("{not json", ENV_MOCK_OPTIONS), ("[1, 2]", ENV_MOCK_OPTIONS), ('{"turbo": 1}', "turbo")],
    ids=["invalid-json", "not-an-object", "unknown-option"],
)
def test_mock_env_options(monkeypatch: pytest.MonkeyPatch, raw: str, text: str) -> None:
    monkeypatch.setenv(ENV_MOCK_OPTIONS, raw)
    with pytest.raises(ConfigError) as info:
        create_mock_engine({"engine_id": "env"})
    assert text in str(info.value)
    monkeypatch.setenv(ENV_MOCK_OPTIONS, json.dumps({"simulate_ttft_ms": 0}))
    engine = create_mock_engine({"engine_id": "env"})
    assert isinstance(engine.config, MockEngineConfig)
    assert engine.config.simulate_ttft_ms == 0.0


# ---------------------------------------------------------------------------- requests

#: Request fields common to every engine (checked by ``validate_request``).
COMMON_REQUEST_CASES: list[Case] = [
    *_cases("request_id", ["", None, 12]),
    *_cases("trace_id", [None, 7]),
    # "" is valid (served from the BOS token, as 0.1.1.2 accepted it); a lone surrogate is not
    *_cases("prompt", ["\ud800", None, 42, b"bytes", ["a", "b"]]),
    *_cases("max_tokens", [0, -1, "5", True, 2.5]),
    *_cases("temperature", [-0.1, NAN, INF, "hot", True]),
    *_cases("top_p", [0, 0.0, 1.5, -0.2, NAN, "x", False]),
    *_cases("metadata", ["x", ["a"], 3]),
]

MOCK_REQUEST_CASES: list[Case] = [
    *COMMON_REQUEST_CASES,
    ("prompt over max_input_tokens", {"prompt": words(80)}, "prompt"),
    ("model not served (strict_model)", {"model": "other-model"}, "model"),
]

#: CPUEngine (tiny Llama, max_model_len=64, vocab 1024): metadata options and context.
CPU_REQUEST_CASES: list[Case] = [
    *COMMON_REQUEST_CASES,
    ("max_tokens None", {"max_tokens": None}, "max_tokens"),
    ("prompt longer than the context", {"prompt": words(100)}, "prompt"),
    ("prompt exactly the context", {"metadata": {"prompt_token_ids": [5] * 64}}, "prompt"),
    *[
        (f"metadata.{k}={v!r}", {"metadata": {k: v}}, k)
        for k, v in [
            ("ignore_eos", "yes"),
            ("ignore_eos", 1),
            ("seed", "x"),
            ("seed", True),
            ("seed", 1.5),
            ("stop_token_ids", "2"),
            ("stop_token_ids", [1.5]),
            ("stop_token_ids", [True]),
            ("prompt_token_ids", "abc"),
            ("prompt_token_ids", [1, "2"]),
            ("prompt_token_ids", [True, 3]),
        ]
    ],
    ("prompt_token_ids empty", {"metadata": {"prompt_token_ids": []}}, "prompt"),
    ("prompt_token_ids negative", {"metadata": {"prompt_token_ids": [1, -1]}}, "vocabulary"),
    ("prompt_token_ids >= vocab", {"metadata": {"prompt_token_ids": [1, 1024]}}, "vocabulary"),
]


@pytest.fixture
async def mock_engine() -> AsyncIterator[MockEngine]:
    engine = MockEngine(
        MockEngineConfig(
            "mock-req",
            0.0,
            0.0,
            max_input_tokens=64,
            max_output_tokens=32,
            strict_model=True,
            model_path="tiny",
        )
    )
    await engine.start()
    yield engine
    await engine.stop()


async def _check_error(engine: Any, request: Any, name: str) -> None:
    """execute and stream both end with an INVALID_ARGUMENT error naming ``name``."""
    resp = await engine.execute(request)
    assert resp.finish_reason == "error", resp
    assert resp.error is not None
    assert resp.error.code == ErrorCode.INVALID_ARGUMENT, resp.error
    assert name in resp.error.message, resp.error.message
    assert resp.metrics is not None and resp.metrics.error_rate > 0
    events = [ev async for ev in engine.stream(request)]
    assert [ev.event for ev in events] == ["start", "end"]
    assert events[-1].finish_reason == "error"
    assert events[-1].error is not None and name in events[-1].error.message
    # the engine serves the next good request
    good = await engine.execute(make_request(max_tokens=3, ignore_eos=True))
    assert good.finish_reason == "length" and len(good.output_tokens) == 3, good


@pytest.mark.parametrize(("case", "fields", "name"), _params(MOCK_REQUEST_CASES))
async def test_mock_engine_request(
    mock_engine: MockEngine, case: str, fields: dict[str, Any], name: str
) -> None:
    await _check_error(mock_engine, bad_request(**fields), name)
    assert mock_engine.kv_manager is not None
    assert mock_engine.kv_manager.stats().num_seqs == 0


async def test_mock_engine_request_that_is_not_a_request(mock_engine: MockEngine) -> None:
    resp = await mock_engine.execute({"prompt": "hi"})
    assert resp.finish_reason == "error"
    assert resp.error is not None and "request" in resp.error.message
    assert (await mock_engine.execute(make_request(max_tokens=2))).finish_reason == "length"


@pytest.fixture(scope="module")
def cpu_engine(tiny_llama: str) -> Iterator[Any]:
    from sagellm_backend.engine.cpu import CPUEngine

    engine = CPUEngine(
        CPUEngineConfig(
            engine_id="cpu-req",
            model_path=tiny_llama,
            max_batch_size=4,
            max_new_tokens=16,
            max_model_len=64,
            kv_cache_memory_bytes=2 << 20,
        )
    )
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.stop())


@pytest.mark.hf
@pytest.mark.parametrize(("case", "fields", "name"), _params(CPU_REQUEST_CASES))
def test_cpu_engine_request(cpu_engine: Any, case: str, fields: dict[str, Any], name: str) -> None:
    asyncio.run(_check_error(cpu_engine, bad_request(**fields), name))
    assert cpu_engine.kv_manager.stats().num_seqs == 0


@pytest.mark.hf
def test_cpu_engine_request_needing_more_kv_than_the_pool(tiny_llama: str) -> None:
    from sagellm_backend.engine.cpu import CPUEngine

    engine = CPUEngine(
        CPUEngineConfig(
            engine_id="cpu-kv",
            model_path=tiny_llama,
            max_batch_size=2,
            max_new_tokens=64,
            kv_cache_memory_bytes=2 * 8192,  # 2 pages: 32 tokens
        )
    )

    async def body() -> None:
        await engine.start()
        resp = await engine.execute(make_request(words(10), 40, ignore_eos=True))
        assert resp.finish_reason == "error"
        assert resp.error is not None and resp.error.code == ErrorCode.RESOURCE_EXHAUSTED
        assert "max_tokens" in resp.error.message
        good = await engine.execute(make_request("hi", 5, ignore_eos=True))
        assert good.finish_reason == "length"
        await engine.stop()

    asyncio.run(body())


ALL_CASES = {
    "MockEngineConfig": len(MOCK_CONFIG_CASES),
    "CPUEngineConfig": len(CPU_CONFIG_CASES),
    "HFCudaEngineConfig": len(CUDA_CONFIG_CASES),
    "MockBackendProvider": len(_PROVIDER_CASES),
    "MockBackendProvider calls": len(PROVIDER_CALL_CASES),
    "factories/registry": len(_FACTORY_CASES) + 3,
    "MockEngine requests": len(MOCK_REQUEST_CASES) + 1,
    "CPUEngine requests": len(CPU_REQUEST_CASES) + 1,
}


def test_case_count(record_property: Any) -> None:
    total = sum(ALL_CASES.values())
    print(f"\nbad-input matrix: {total} cases: {ALL_CASES}")
    record_property("bad_input_cases", total)
    assert total >= 300, ALL_CASES
