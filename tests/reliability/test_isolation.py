"""One request's odd-but-accepted input must not break the requests running beside it.

Each case is a protocol ``Request`` that passes pydantic validation (extreme but legal
sampling values, huge seeds, text the tokenizer cannot encode). The engine must give it a
terminal result -- a normal generation, or ``finish_reason="error"`` with INVALID_ARGUMENT
(RESOURCE_EXHAUSTED for KV that can never fit) naming the field -- without raising, and
the bystander requests in the same batch must complete normally. Known bugs are strict
xfails (see the reasons).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sagellm_protocol import ErrorCode, Request

from sagellm_backend.engine.mock import MockEngine, MockEngineConfig

from .conftest import words


def _req(i: int, **fields: Any) -> Request:
    base: dict[str, Any] = {
        "request_id": f"iso-{i}-{time.monotonic_ns()}",
        "trace_id": "iso",
        "model": "tiny",
        "prompt": "hello there, general kenobi",
        "max_tokens": 6,
        "stream": False,
        "metadata": {"ignore_eos": True},
    }
    if "metadata" in fields:
        fields["metadata"] = {"ignore_eos": True, **fields["metadata"]}
    base.update(fields)
    return Request(**base)  # validated: every case is a legal protocol request


#: (id, request fields, field named by an INVALID_ARGUMENT error, known-bug reason or None)
CASES: list[tuple[str, dict[str, Any], str, str | None]] = [
    (
        "temperature=1e-45",
        {"temperature": 1e-45},
        "temperature",
        None,
    ),
    (
        "top_p=1e-300",
        {"temperature": 1.0, "top_p": 1e-300},
        "top_p",
        None,
    ),
    (
        "metadata.seed=2**64",
        {"temperature": 1.0, "metadata": {"seed": 2**64}},
        "seed",
        None,
    ),
    ("metadata.seed=-1", {"temperature": 1.0, "metadata": {"seed": -1}}, "seed", None),
    ("temperature=2.0", {"temperature": 2.0, "top_p": 1.0}, "temperature", None),
    ("top_p=1e-3", {"temperature": 1.0, "top_p": 1e-3}, "top_p", None),
    (
        "prompt with a lone surrogate",
        {"prompt": "a\ud800b"},
        "prompt",
        None,
    ),
    ("prompt with NUL and BOM", {"prompt": "\x00\ufeff\x00"}, "prompt", None),
    ("metadata.stop_token_ids huge", {"metadata": {"stop_token_ids": [2**80]}}, "stop", None),
    ("max_tokens=10**9 (capped)", {"max_tokens": 10**9}, "max_tokens", None),
]


def _params(hf: bool) -> list[Any]:
    out = []
    for cid, fields, name, bug in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=bug)] if (bug and hf) else []
        out.append(pytest.param(fields, name, id=cid, marks=marks))
    return out


async def _run_case(engine: Any, fields: dict[str, Any], name: str) -> None:
    bystanders = [
        asyncio.create_task(engine.execute(_req(i, prompt=words(6, i), max_tokens=30)))
        for i in range(3)
    ]
    await asyncio.sleep(0.03)  # the bystanders are decoding now
    odd = _req(99, **fields)
    resp = await engine.execute(odd)
    assert resp.finish_reason in ("length", "stop", "error")
    if resp.finish_reason == "error":
        assert resp.error is not None
        codes = (ErrorCode.INVALID_ARGUMENT, ErrorCode.RESOURCE_EXHAUSTED)
        assert resp.error.code in codes, resp.error
        assert name in resp.error.message, resp.error.message
    events = [ev async for ev in engine.stream(_req(98, **fields))]
    assert events[0].event == "start" and events[-1].event == "end"
    results = await asyncio.gather(*bystanders)
    for r in results:
        assert r.finish_reason == "length" and len(r.output_tokens) == 30, r.error


@pytest.fixture(scope="module")
def hf_engine(tiny_llama: str) -> Iterator[Any]:
    from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig

    engine = CPUEngine(
        CPUEngineConfig(
            engine_id="iso-cpu",
            model_path=tiny_llama,
            max_batch_size=8,
            max_new_tokens=64,
            kv_cache_memory_bytes=4 << 20,
        )
    )
    asyncio.run(engine.start())
    runner: Any = engine._runner
    real = runner.execute

    def slow(chunks: Any) -> Any:  # 3 ms a step: the bystanders stay in flight
        time.sleep(0.003)
        return real(chunks)

    runner.execute = slow
    yield engine
    asyncio.run(engine.stop())


@pytest.mark.hf
@pytest.mark.parametrize(("fields", "name"), _params(hf=True))
def test_hf_odd_request_does_not_break_the_batch(
    hf_engine: Any, fields: dict[str, Any], name: str
) -> None:
    asyncio.run(_run_case(hf_engine, fields, name))
    kv = hf_engine.kv_manager
    assert kv.stats().num_seqs == 0 and kv.pool.num_used == 0


@pytest.mark.parametrize(("fields", "name"), _params(hf=False))
async def test_mock_odd_request_does_not_break_the_batch(fields: dict[str, Any], name: str) -> None:
    engine = MockEngine(MockEngineConfig("iso-mock", 1.0, 1.0, max_output_tokens=None))
    await engine.start()
    try:
        await _run_case(engine, fields, name)
    finally:
        await engine.stop()
