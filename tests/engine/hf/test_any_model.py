"""CPUEngine on every supported architecture: continuous batching equals one-at-a-time generate.

For each tiny offline model (gpt2, llama, mistral, qwen2, phi3, gemma2, gpt_neox, opt,
starcoder2 and the Mixtral MoE through the generic paged runner; bloom and DeepSeek-V3's
latent attention through the batched fallback; Mamba, hybrid Qwen3-Next and RecurrentGemma,
whose layers keep recurrent state, through the per-sequence runner): 8
concurrent requests with mixed prompt lengths (some sharing a cached prefix) join at
different steps, half streamed; chunked prefill is forced by a small token budget. Greedy
tokens must equal ``model.generate`` run on each request alone; afterwards the KV pool
holds no sequence. A stream closed mid-way frees its blocks while the batch continues.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from .conftest import Reference, make_request, wait_until

pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

#: tiny model -> the runner the engine must pick for it.
MODELS = {
    "tiny-gpt2": "paged",
    "tiny-llama": "paged",
    "tiny-mistral": "paged",
    "tiny-qwen2": "paged",
    "tiny-phi3": "paged",
    "tiny-gemma2": "paged",
    "tiny-gpt-neox": "paged",
    "tiny-opt": "paged",
    "tiny-starcoder2": "paged",
    "tiny-mixtral": "paged",
    "tiny-bloom": "hf-batched",
    "tiny-deepseek-v3": "hf-batched",
    "tiny-mamba": "hf-sequential",
    "tiny-qwen3-next": "hf-sequential",
    "tiny-recurrent-gemma": "hf-sequential",
}

_REFS: dict[str, Reference] = {}


def _ref(name: str) -> tuple[str, Reference]:
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    path = str(ensure_tiny_model(name))
    if name not in _REFS:
        _REFS[name] = Reference(path)
    return path, _REFS[name]


def _workload(vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """8 (prompt ids, new tokens): lengths 1-60 (past every tiny sliding window with the
    outputs), two prompts sharing a 32-token prefix (two full pages: a prefix-cache hit)."""
    rng = random.Random(seed)
    shared = [rng.randrange(4, vocab) for _ in range(32)]
    lengths = [1, 7, 60, 23, 40, 3, 52, 17]
    out = []
    for i, n in enumerate(lengths):
        ids = [rng.randrange(4, vocab) for _ in range(n)]
        if i in (4, 6):
            ids = shared + ids[: max(1, n - 32)]
        out.append((ids, rng.randint(6, 14)))
    return out


async def _run_one(engine: Any, ids: list[int], n: int, stream: bool) -> list[int]:
    req = make_request("ids", n, prompt_token_ids=ids)
    if not stream:
        resp = await engine.execute(req)
        assert resp.finish_reason == "length", resp.error
        return list(resp.output_tokens)
    events = [ev async for ev in engine.stream(req)]
    assert events[-1].event == "end" and events[-1].finish_reason == "length"
    tokens = [t for ev in events[1:-1] for t in ev.chunk_tokens]
    assert tokens == list(events[-1].output_tokens)
    return tokens


@pytest.mark.parametrize("name", list(MODELS))
async def test_concurrent_mixed_requests_equal_solo_generate(
    name: str, engine_factory: Any
) -> None:
    path, ref = _ref(name)
    vocab = int(ref.model.get_input_embeddings().weight.shape[0])
    work = _workload(vocab, seed=len(name))
    expected = [ref.greedy(ids, n) for ids, n in work]
    engine = engine_factory(path, max_batch_size=8, max_num_batched_tokens=48)
    await engine.start()
    assert engine.runner_name == MODELS[name]

    # Warm the shared prefix's pages so later requests hit the prefix cache.
    assert await _run_one(engine, work[4][0], 1, False) == expected[4][:1]

    async def join(i: int) -> list[int]:
        # Requests join in three waves while earlier ones are decoding.
        wave = (0, 0, 0, 1, 1, 2, 2, 2)[i]
        if wave:
            target = 4 * wave
            await wait_until(
                lambda: engine.get_info()["scheduler"]["tokens_generated"] >= target, 20
            )
        ids, n = work[i]
        return await _run_one(engine, ids, n, stream=i % 2 == 1)

    got = await asyncio.wait_for(asyncio.gather(*(join(i) for i in range(8))), 120)
    for i, (tokens, want) in enumerate(zip(got, expected, strict=True)):
        assert tokens == want, (name, i, len(work[i][0]))
    if MODELS[name] == "hf-batched":  # decode steps ran on the kept batch, joins included
        assert engine._runner.kept_steps > 0
    await wait_until(lambda: engine.kv_manager.stats().num_seqs == 0)
    assert engine.kv_manager.stats().kv_used_tokens == 0


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gemma2", "tiny-bloom", "tiny-qwen3-next"])
async def test_preemption_under_a_small_pool_keeps_outputs(name: str, engine_factory: Any) -> None:
    path, ref = _ref(name)
    vocab = int(ref.model.get_input_embeddings().weight.shape[0])
    work = [(ids, 24) for ids, _ in _workload(vocab, seed=7)]
    expected = [ref.greedy(ids, n) for ids, n in work]
    from sagellm_backend.kv.spec import KVSpec

    spec = KVSpec.from_model_config(ref.model.config, block_size=16, dtype="fp32")
    engine = engine_factory(
        path, max_batch_size=8, kv_cache_memory_bytes=12 * spec.page_bytes, max_new_tokens=64
    )
    await engine.start()
    got = await asyncio.wait_for(
        asyncio.gather(*(_run_one(engine, ids, n, False) for ids, n in work)), 120
    )
    assert got == expected
    assert engine.get_info()["scheduler"]["preemptions"] > 0
    await wait_until(lambda: engine.kv_manager.stats().num_seqs == 0)


@pytest.mark.parametrize("name", list(MODELS))
async def test_stream_closed_mid_way_frees_its_blocks(name: str, engine_factory: Any) -> None:
    path, ref = _ref(name)
    vocab = int(ref.model.get_input_embeddings().weight.shape[0])
    (long_ids, _), (other_ids, _) = _workload(vocab, seed=3)[2:4]
    engine = engine_factory(path, max_batch_size=4, max_new_tokens=800)
    await engine.start()
    other = asyncio.create_task(_run_one(engine, other_ids, 30, False))
    stream = engine.stream(make_request("ids", 700, prompt_token_ids=long_ids))
    seen = 0
    async for event in stream:
        if event.event == "delta":
            seen += 1
            if seen == 3:
                break
    await stream.aclose()  # type: ignore[attr-defined]
    await wait_until(lambda: engine.kv_manager.stats().num_seqs <= 1)
    assert await other == ref.greedy(other_ids, 30)
    await wait_until(lambda: engine.kv_manager.stats().num_seqs == 0)
    assert engine.kv_manager.stats().kv_used_tokens == 0


async def test_runner_hf_option_uses_the_batched_fallback(engine_factory: Any) -> None:
    path, ref = _ref("tiny-mistral")
    work = _workload(1024, seed=11)[:4]
    engine = engine_factory(path, runner="hf", max_batch_size=4)
    await engine.start()
    assert engine.runner_name == "hf-batched"
    got = await asyncio.gather(*(_run_one(engine, ids, n, False) for ids, n in work))
    assert got == [ref.greedy(ids, n) for ids, n in work]


async def test_runner_paged_refuses_a_model_without_attention_backend(
    engine_factory: Any,
) -> None:
    from sagellm_backend.errors import ConfigError

    path, _ = _ref("tiny-bloom")
    engine = engine_factory(path, runner="paged")
    with pytest.raises(ConfigError, match="attention"):
        await engine.start()


@pytest.mark.parametrize("name", list(MODELS))
def test_info_names_the_runner_the_engine_picks(name: str) -> None:
    """``sagellm-backend info --model`` answers from the config alone what the engine picks."""
    from sagellm_backend.engine.runners.select import describe_runner_for_path
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    assert describe_runner_for_path(ensure_tiny_model(name))["runner"] == MODELS[name]
