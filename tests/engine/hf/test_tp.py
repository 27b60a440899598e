"""Tensor parallelism on CPU: 2 gloo ranks spawned by the engine, tiny Llama and GPT-2.

Each test that starts a tensor-parallel engine spawns one worker process (about 10 s on a
busy 2-core machine: importing torch and transformers, loading the model).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sagellm_protocol import ErrorCode

from .conftest import make_request, run

pytest.importorskip("transformers")
psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.hf

# 8 mixed-length prompts (3..52 words) and output lengths (6..20 tokens).
PROMPTS = [" ".join(f"word{j} fox" for j in range(2 + 7 * i)) for i in range(8)]
MAX_TOKENS = [6 + 2 * i for i in range(8)]


def _config(model_path: str, tp: int, **fields: Any) -> Any:
    from sagellm_backend.engine.cpu import CPUEngineConfig

    fields.setdefault("max_batch_size", 8)
    fields.setdefault("max_new_tokens", 64)
    fields.setdefault("num_threads", 1)
    fields.setdefault("kv_cache_memory_bytes", 8 << 20)
    return CPUEngineConfig(
        engine_id=f"tp{tp}-{Path(model_path).name}",
        model_path=model_path,
        tensor_parallel_size=tp,
        **fields,
    )


async def _generate(engine: Any) -> list[list[int]]:
    outs = await asyncio.gather(
        *[engine.execute(make_request(p, n)) for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)]
    )
    for out in outs:
        assert out.finish_reason == "length", out.error
    return [list(o.output_tokens) for o in outs]


def _single(model_path: str) -> tuple[list[list[int]], dict[str, Any], Any]:
    from sagellm_backend.engine.cpu import CPUEngine

    engine = CPUEngine(_config(model_path, 1))

    async def go() -> tuple[list[list[int]], dict[str, Any]]:
        await engine.start()
        try:
            return await _generate(engine), engine.get_info()
        finally:
            await engine.stop()

    tokens, info = run(go())
    return tokens, info, engine.model


@pytest.fixture(scope="module")
def llama_single(tiny_llama: str) -> tuple[list[list[int]], dict[str, Any], Any]:
    return _single(tiny_llama)


@pytest.fixture(scope="module")
def gpt2_single(tiny_gpt2: str) -> tuple[list[list[int]], dict[str, Any], Any]:
    return _single(tiny_gpt2)


@pytest.fixture
def tp_engine() -> Iterator[Any]:
    """Build tensor-parallel CPUEngines; each is stopped at teardown (workers reaped)."""
    from sagellm_backend.engine.cpu import CPUEngine

    made: list[Any] = []

    def make(model_path: str, **fields: Any) -> Any:
        engine = CPUEngine(_config(model_path, 2, **fields))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        if engine.is_running:
            run(engine.stop())


def _children() -> set[int]:
    """Live child processes, less multiprocessing's resource tracker (one per process, kept
    by Python for the life of the parent; it is not ours to stop)."""
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and p.pid != tracker
    }


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _shm() -> set[str]:
    root = Path("/dev/shm")
    return set(os.listdir(root)) if root.is_dir() else set()


# ---------------------------------------------------------------------------- config
def test_bad_sizes_and_backends_are_refused_at_construction(tiny_llama: str) -> None:
    from sagellm_backend.engine.hf_cuda import HFCudaEngineConfig
    from sagellm_backend.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tensor_parallel_size=3 .* valid values: \[1, 2\]"):
        _config(tiny_llama, 3)  # tiny-llama: 4 heads, 2 kv heads
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=4 .*2 kv heads"):
        _config(tiny_llama, 4)
    with pytest.raises(ConfigError, match="tensor_parallel_size must be an integer >= 1"):
        _config(tiny_llama, 0)
    with pytest.raises(ConfigError, match="'nccl' needs CUDA devices"):
        _config(tiny_llama, 2, distributed_backend="nccl")
    with pytest.raises(ConfigError, match=r"distributed_backend must be one of \('auto'"):
        _config(tiny_llama, 2, distributed_backend="mpi")
    with pytest.raises(ConfigError, match="distributed_timeout_s must be a number > 0"):
        _config(tiny_llama, 2, distributed_timeout_s=0)
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    want = max(2, visible + 1)
    with pytest.raises(ConfigError, match=rf"needs {want} CUDA devices .* valid values"):
        HFCudaEngineConfig(
            engine_id="c",
            model_path=tiny_llama,
            device="cuda:0",
            dtype="float32",
            device_map="cuda:0",
            load_in_8bit=False,
            load_in_4bit=False,
            trust_remote_code=False,
            max_new_tokens=8,
            max_batch_size=2,
            tensor_parallel_size=want,
        )


# ---------------------------------------------------------------------------- correctness
def _sharded_param_bytes(model: Any, patterns: tuple[str, ...]) -> tuple[int, int]:
    """(bytes of all parameters, bytes of the weights a 2-way split halves)."""
    total = split = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        total += size
        if name.endswith(".weight") and any(s in name for s in patterns):
            split += size
    return total, split


def _two_ranks_match(engine: Any, tokens_1: Any, info_1: dict[str, Any]) -> tuple[Any, Any]:
    """Start the 2-rank ``engine``, check its tokens and runner against the single-process
    run; return (engine, its info)."""

    async def go() -> tuple[list[list[int]], dict[str, Any]]:
        await engine.start()
        return await _generate(engine), engine.get_info()

    tokens_2, info = run(go())
    assert tokens_2 == tokens_1
    assert info["runner"] == info_1["runner"]
    return engine, info


def test_llama_two_ranks_match_the_single_process_engine(
    tiny_llama: str, llama_single: Any, tp_engine: Any
) -> None:
    tokens_1, info_1, model_1 = llama_single
    engine, info = _two_ranks_match(tp_engine(tiny_llama), tokens_1, info_1)
    tp = info["tensor_parallel"]
    assert tp["size"] == 2 and tp["backend"] == "gloo" and tp["healthy"]
    ranks = tp["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len({r["pid"] for r in ranks}) == 2
    assert {r["plan"] for r in ranks} == {"tp_plan"}  # the model's own base_model_tp_plan
    # Each rank's pool holds half the heads: half the bytes per page, so the same KV
    # memory holds twice the pages.
    cfg = model_1.config
    for r in ranks:
        assert r["num_heads"] == cfg.num_attention_heads // 2
        assert r["num_kv_heads"] == cfg.num_key_value_heads // 2
        assert 2 * r["kv_page_bytes"] == info_1["kv"]["page_bytes"]
        assert r["kv_pool_bytes"] == 8 << 20
    assert info["kv"]["num_pages"] == 2 * info_1["kv"]["num_pages"]
    total, split = _sharded_param_bytes(
        model_1, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
    for r in ranks:
        assert r["weight_bytes"] == total - split // 2
    stats = tp["stats"]
    assert stats["all_reduce_calls"] > 0 and 0 < stats["comm_share"] < 1
    assert run(engine.health_check())


def test_gpt2_two_ranks_match_the_single_process_engine(
    tiny_gpt2: str, gpt2_single: Any, tp_engine: Any
) -> None:
    tokens_1, info_1, model_1 = gpt2_single
    _, info = _two_ranks_match(tp_engine(tiny_gpt2), tokens_1, info_1)
    ranks = info["tensor_parallel"]["ranks"]
    assert len(ranks) == 2
    assert {r["plan"] for r in ranks} == {"gpt2"}  # ours: GPT-2 declares no tp_plan
    total, split = _sharded_param_bytes(model_1, ("attn.c_attn", "attn.c_proj", "mlp.c_"))
    for r in ranks:
        assert r["num_heads"] == r["num_kv_heads"] == model_1.config.n_head // 2
        assert 2 * r["kv_page_bytes"] == info_1["kv"]["page_bytes"]
        # c_attn/c_fc biases are split too, c_proj biases are kept whole: between the two.
        assert total - split // 2 - split // 8 < r["weight_bytes"] < total - split // 2 + split // 8


def test_the_batched_fallback_runner_shards_too(
    tiny_gpt2: str, gpt2_single: Any, tp_engine: Any
) -> None:
    """runner='hf' (the batched HF-cache runner: the model's own forward) at 2 ranks."""
    engine = tp_engine(tiny_gpt2, runner="hf")

    async def go() -> tuple[list[list[int]], dict[str, Any]]:
        await engine.start()
        return await _generate(engine), engine.get_info()

    tokens, info = run(go())
    assert info["runner"] == "hf-batched"
    assert tokens == gpt2_single[0]
    # K/V live in each rank's HF caches: no rank takes a KV pool from its provider
    ranks = info["tensor_parallel"]["ranks"]
    assert len(ranks) == 2 and all(r["kv_pool_bytes"] == 0 for r in ranks)


def test_gpt_neox_fused_qkv_follows_its_own_tp_plan(tp_engine: Any) -> None:
    """GPT-NeoX's fused query_key_value is laid out per head: a plain column split works."""
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    path = str(ensure_tiny_model("tiny-gpt-neox"))
    single, _, _ = _single(path)
    engine = tp_engine(path)

    async def go() -> list[list[int]]:
        await engine.start()
        return await _generate(engine)

    assert run(go()) == single


def test_a_model_whose_plan_we_cannot_apply_is_refused_at_start(tp_engine: Any) -> None:
    from sagellm_backend.errors import ConfigError
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    before = _children()
    engine = tp_engine(str(ensure_tiny_model("tiny-phi3")))  # fused gate_up / qkv styles
    with pytest.raises(ConfigError, match=r"tp_plan styles .* not supported"):
        run(engine.start())
    assert not engine.is_running
    assert _children() <= before


# ---------------------------------------------------------------------------- faults
def test_a_killed_worker_fails_every_request_and_stop_cleans_up(
    tiny_llama: str, tp_engine: Any
) -> None:
    before = _children()
    engine = tp_engine(tiny_llama)

    async def go() -> tuple[list[Any], float]:
        await engine.start()
        pid = engine.get_info()["tensor_parallel"]["worker_pids"][0]
        got_token = asyncio.Event()

        async def consume(i: int) -> Any:
            end = None
            async for event in engine.stream(make_request(PROMPTS[i], 60)):
                if getattr(event, "chunk_tokens", None):
                    got_token.set()
                end = event
            return end

        tasks = [asyncio.create_task(consume(i)) for i in range(8)]
        await asyncio.wait_for(got_token.wait(), 30)
        os.kill(pid, signal.SIGKILL)
        ends = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert not await engine.health_check()
        info = engine.get_info()["tensor_parallel"]
        assert not info["healthy"] and "rank 1" in info["error"]
        # A request after the failure fails at once with the same error.
        late = await asyncio.wait_for(engine.execute(make_request("hello", 4)), 10)
        assert late.finish_reason == "error" and "rank 1" in late.error.message
        t0 = time.monotonic()
        await engine.stop()
        return ends, time.monotonic() - t0

    ends, stop_s = run(go())
    for end in ends:
        assert end.finish_reason == "error"
        assert end.error.code == ErrorCode.UNAVAILABLE
        assert "tensor-parallel" in end.error.message and "rank 1" in end.error.message
    assert stop_s < 5.0
    assert _children() <= before


def test_a_hung_worker_times_out_and_stop_kills_it(tiny_llama: str, tp_engine: Any) -> None:
    before = _children()
    engine = tp_engine(tiny_llama, distributed_timeout_s=3.0)

    async def go() -> tuple[Any, float, int]:
        await engine.start()
        pid = engine.get_info()["tensor_parallel"]["worker_pids"][0]
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        out = await asyncio.wait_for(engine.execute(make_request(PROMPTS[3], 8)), 30)
        waited = time.monotonic() - t0
        assert not await engine.health_check()
        t1 = time.monotonic()
        await engine.stop()
        return out, waited, pid, time.monotonic() - t1

    out, waited, pid, stop_s = run(go())
    assert out.finish_reason == "error" and "timed out" in out.error.message
    assert waited < 20
    assert stop_s < 5.0
    assert not _alive(pid)
    assert _children() <= before


def test_stop_while_a_step_waits_on_a_hung_worker_returns_in_time(
    tiny_llama: str, tp_engine: Any
) -> None:
    before = _children()
    engine = tp_engine(tiny_llama, distributed_timeout_s=120.0)

    async def go() -> tuple[list[Any], float, int]:
        await engine.start()
        pid = engine.get_info()["tensor_parallel"]["worker_pids"][0]
        first = await engine.execute(make_request(PROMPTS[0], 2))
        assert first.finish_reason == "length"
        os.kill(pid, signal.SIGSTOP)  # the next step blocks in a collective (120 s timeout)
        tasks = [
            asyncio.create_task(engine.execute(make_request(PROMPTS[i], 30))) for i in range(4)
        ]
        await asyncio.sleep(1.0)
        assert not any(t.done() for t in tasks)
        t0 = time.monotonic()
        await engine.stop()
        stop_s = time.monotonic() - t0
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return outs, stop_s, pid

    outs, stop_s, pid = run(go())
    assert stop_s < 5.0
    assert all(o.finish_reason == "error" for o in outs)
    assert not _alive(pid)
    assert _children() <= before


# ---------------------------------------------------------------------------- lifecycle
def test_start_stop_restart_leave_no_process_port_or_shared_memory(
    tiny_llama: str, llama_single: Any, tp_engine: Any
) -> None:
    before_children, before_shm = _children(), _shm()
    engine = tp_engine(tiny_llama)

    async def cycle() -> tuple[list[list[int]], int, str]:
        await engine.start()
        info = engine.get_info()["tensor_parallel"]
        tokens = await _generate(engine)
        t0 = time.monotonic()
        await engine.stop()
        assert time.monotonic() - t0 < 5.0
        return tokens, info["worker_pids"][0], info["init_method"]

    for _ in range(2):  # the second start spawns fresh workers
        tokens, pid, init_method = run(cycle())
        assert tokens == llama_single[0]
        assert not _alive(pid)
        assert _children() <= before_children
        port = int(init_method.rsplit(":", 1)[1])
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # the rendezvous port is free again
    assert _shm() <= before_shm
    assert not run(engine.health_check())


_TORCHRUN_SCRIPT = """
import asyncio, json, os, sys
from sagellm_protocol import Request
from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig


async def main():
    engine = CPUEngine(CPUEngineConfig(
        engine_id="torchrun", model_path=sys.argv[1], max_batch_size=8, max_new_tokens=64,
        kv_cache_memory_bytes=8 << 20, tensor_parallel_size=2))
    await engine.start()  # ranks > 0 serve inside and exit when rank 0 stops
    assert os.environ["RANK"] == "0"
    request = Request(request_id="r", trace_id="t", model="m", prompt=sys.argv[2],
                      max_tokens=int(sys.argv[3]), stream=False, metadata={"ignore_eos": True})
    out = await engine.execute(request)
    info = engine.get_info()["tensor_parallel"]
    await engine.stop()
    print("RESULT " + json.dumps({"tokens": out.output_tokens, "launch": info["launch"],
                                  "ranks": [r["rank"] for r in info["ranks"]]}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
"""


def test_a_torchrun_group_serves_from_rank_0(
    tiny_llama: str, llama_single: Any, tmp_path: Path
) -> None:
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(_TORCHRUN_SCRIPT))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            str(script),
            tiny_llama,
            PROMPTS[2],
            str(MAX_TOKENS[2]),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1  # only rank 0 returns to the script
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["launch"] == "torchrun" and result["ranks"] == [0, 1]
    assert result["tokens"] == llama_single[0][2]
