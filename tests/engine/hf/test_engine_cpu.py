"""CPUEngine on real tiny models: batching, streaming, cancellation, errors, prefix reuse."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sagellm_protocol import ErrorCode, Request

from .conftest import PROMPTS, Reference, make_request, wait_until

pytest.importorskip("transformers")
pytestmark = pytest.mark.hf


# ---------------------------------------------------------------------------- correctness
async def test_greedy_matches_generate_llama_paged(llama_engine: Any, llama_ref: Reference) -> None:
    assert llama_engine.runner_name == "paged"
    reqs = [make_request(p, 12) for p in PROMPTS]
    responses = await asyncio.gather(*(llama_engine.execute(r) for r in reqs))
    for req, resp in zip(reqs, responses, strict=True):
        assert resp.finish_reason == "length", resp.error
        assert resp.output_tokens == llama_ref.greedy(req.prompt, 12), req.prompt


async def test_greedy_matches_generate_gpt2_fallback(
    engine_factory: Any, tiny_gpt2: str, gpt2_ref: Reference
) -> None:
    engine = engine_factory(tiny_gpt2, runner="hf")
    await engine.start()
    assert engine.runner_name == "hf-batched"
    reqs = [make_request(p, 10) for p in PROMPTS[:4]]
    responses = await asyncio.gather(*(engine.execute(r) for r in reqs))
    for req, resp in zip(reqs, responses, strict=True):
        assert resp.finish_reason == "length", resp.error
        assert resp.output_tokens == gpt2_ref.greedy(req.prompt, 10)
    assert engine.kv_manager.stats().num_seqs == 0


async def test_interleaved_requests_equal_their_solo_outputs(
    llama_engine: Any, llama_ref: Reference
) -> None:
    """Requests that join and leave a running batch at different steps are unaffected."""
    lengths = [20, 5, 13, 8, 17, 3]

    async def later(i: int) -> Any:
        await asyncio.sleep(0.003 * i)
        return await llama_engine.execute(make_request(PROMPTS[i], lengths[i]))

    responses = await asyncio.gather(*(later(i) for i in range(len(PROMPTS))))
    for i, resp in enumerate(responses):
        assert resp.output_tokens == llama_ref.greedy(PROMPTS[i], lengths[i])
        assert len(resp.metrics.itl_list) == lengths[i] - 1


async def test_chunked_prefill_and_small_steps(
    engine_factory: Any, tiny_llama: str, llama_ref: Reference
) -> None:
    """A step budget smaller than the prompts splits prefill across steps."""
    engine = engine_factory(tiny_llama, max_batch_size=2, max_num_batched_tokens=7)
    await engine.start()
    prompts = [PROMPTS[3], PROMPTS[5], PROMPTS[0]]
    responses = await asyncio.gather(*(engine.execute(make_request(p, 6)) for p in prompts))
    for p, resp in zip(prompts, responses, strict=True):
        assert resp.output_tokens == llama_ref.greedy(p, 6)


async def test_kv_pressure_waits_and_preempts_without_changing_outputs(
    engine_factory: Any, tiny_llama: str, llama_ref: Reference
) -> None:
    # tiny-llama: 2 layers x 2 kv heads x 16 dims x fp32 -> 512 B/token, 8 KiB per page.
    engine = engine_factory(tiny_llama, max_batch_size=4, kv_cache_memory_bytes=8 * 8192)
    await engine.start()
    assert engine.kv_manager.pool.num_pages == 8
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[5]]
    responses = await asyncio.gather(*(engine.execute(make_request(p, 30)) for p in prompts))
    for p, resp in zip(prompts, responses, strict=True):
        assert resp.finish_reason == "length", resp.error
        assert resp.output_tokens == llama_ref.greedy(p, 30)
    stats = engine.get_info()["scheduler"]
    assert stats["preemptions"] > 0
    assert engine.kv_manager.stats().num_seqs == 0


async def test_prefix_cache_reuses_pages(llama_engine: Any, llama_ref: Reference) -> None:
    prompt = " ".join(["shared system prompt words"] * 12) + " question?"
    first = await llama_engine.execute(make_request(prompt, 6))
    computed_before = llama_engine.get_info()["scheduler"]["tokens_computed"]
    second = await llama_engine.execute(make_request(prompt, 6))
    computed = llama_engine.get_info()["scheduler"]["tokens_computed"] - computed_before
    n_prompt = len(llama_ref.ids(prompt))
    assert second.metrics.prefix_hit_rate > 0.5
    assert second.output_tokens == first.output_tokens == llama_ref.greedy(prompt, 6)
    # The cached blocks were not recomputed: only the tail of the prompt and the decodes.
    assert computed < n_prompt // 2 + 6


async def test_requests_sharing_a_prefix_arrive_together(
    engine_factory: Any, tiny_llama: str, llama_ref: Reference
) -> None:
    """The second of two same-prefix requests waits one step and reuses the first's pages."""
    engine = engine_factory(tiny_llama)
    await engine.start()
    system = " ".join(["you are a helpful assistant"] * 10)
    prompts = [system + " first", system + " second one", system + " third"]
    responses = await asyncio.gather(*(engine.execute(make_request(p, 5)) for p in prompts))
    assert responses[0].metrics.prefix_hit_rate == 0.0
    assert all(r.metrics.prefix_hit_rate > 0.5 for r in responses[1:])
    for p, resp in zip(prompts, responses, strict=True):
        assert resp.output_tokens == llama_ref.greedy(p, 5)


# ---------------------------------------------------------------------------- streaming
async def test_stream_deltas_concatenate_to_the_execute_text(llama_engine: Any) -> None:
    for prompt in (PROMPTS[2], PROMPTS[5]):
        req = make_request(prompt, 24)
        events = [ev async for ev in llama_engine.stream(req)]
        assert events[0].event == "start" and events[-1].event == "end"
        assert all(e.event == "delta" for e in events[1:-1])
        deltas = events[1:-1]
        end = events[-1]
        assert "".join(d.chunk for d in deltas) == end.output_text
        assert [t for d in deltas for t in d.chunk_tokens] == end.output_tokens
        resp = await llama_engine.execute(make_request(prompt, 24))
        assert resp.output_text == end.output_text
        assert resp.output_tokens == end.output_tokens
        assert events[0].prompt_tokens == len(llama_engine.tokenizer(prompt)["input_ids"])


async def test_finish_reasons_agree_between_execute_and_stream(
    llama_engine: Any, llama_ref: Reference
) -> None:
    prompt = PROMPTS[0]
    expected = llama_ref.greedy(prompt, 10)
    stop_tok = expected[4]
    cut = expected.index(stop_tok) + 1
    cases = [
        (make_request(prompt, 10, stop_token_ids=[stop_tok]), "stop", expected[:cut]),
        (make_request(prompt, 7), "length", expected[:7]),
    ]
    for req, reason, tokens in cases:
        resp = await llama_engine.execute(req)
        events = [ev async for ev in llama_engine.stream(req)]
        end = events[-1]
        assert resp.finish_reason == end.finish_reason == reason
        assert resp.output_tokens == end.output_tokens == tokens


async def test_eos_stops_unless_ignored(llama_engine: Any, llama_ref: Reference) -> None:
    """The model's EOS ends a request ("stop", EOS kept in the tokens) unless ignore_eos."""
    eos = llama_engine.tokenizer.eos_token_id
    # Feed a prompt whose greedy continuation we know, then make EOS the forced token by
    # giving token ids directly: the engine must stop exactly when EOS is produced.
    sched = llama_engine._scheduler
    assert eos in sched.eos_token_ids
    prompt = PROMPTS[1]
    expected = llama_ref.greedy(prompt, 12)
    original = sched.eos_token_ids
    sched.eos_token_ids = frozenset({expected[3]})  # pretend this token is EOS
    try:
        stopped = await llama_engine.execute(make_request(prompt, 12, ignore_eos=False))
        ignored = await llama_engine.execute(make_request(prompt, 12, ignore_eos=True))
    finally:
        sched.eos_token_ids = original
    assert stopped.finish_reason == "stop"
    assert stopped.output_tokens == expected[: expected.index(expected[3]) + 1]
    assert ignored.finish_reason == "length" and ignored.output_tokens == expected


# ---------------------------------------------------------------------------- cancellation
def _kv_seqs(engine: Any) -> int:
    return int(engine.kv_manager.stats().num_seqs)


async def test_cancelled_execute_frees_kv_and_the_batch_continues(
    engine_factory: Any, tiny_llama: str, llama_ref: Reference
) -> None:
    engine = engine_factory(tiny_llama, max_new_tokens=2000)
    await engine.start()
    long_task = asyncio.create_task(engine.execute(make_request(PROMPTS[0], 1500)))
    other = asyncio.create_task(engine.execute(make_request(PROMPTS[3], 40)))
    await wait_until(lambda: engine.get_info()["scheduler"]["tokens_generated"] > 5)
    long_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long_task
    resp = await other
    assert resp.output_tokens == llama_ref.greedy(PROMPTS[3], 40)
    await wait_until(lambda: _kv_seqs(engine) == 0)
    assert engine.kv_manager.stats().kv_used_tokens == 0


async def test_stream_consumer_that_stops_early_frees_kv(
    engine_factory: Any, tiny_llama: str, llama_ref: Reference
) -> None:
    engine = engine_factory(tiny_llama, max_new_tokens=2000)
    await engine.start()
    other = asyncio.create_task(engine.execute(make_request(PROMPTS[1], 30)))
    stream = engine.stream(make_request(PROMPTS[0], 1500))
    seen = 0
    async for event in stream:
        if event.event == "delta":
            seen += 1
            if seen == 3:
                break
    await stream.aclose()  # type: ignore[attr-defined]
    await wait_until(lambda: _kv_seqs(engine) <= 1)
    resp = await other
    assert resp.output_tokens == llama_ref.greedy(PROMPTS[1], 30)
    await wait_until(lambda: _kv_seqs(engine) == 0)


async def test_abandoned_stream_is_cancelled(engine_factory: Any, tiny_llama: str) -> None:
    """A stream dropped without aclose() is finalised by the loop and frees its request."""
    import gc

    engine = engine_factory(tiny_llama, max_new_tokens=2000)
    await engine.start()

    async def consume_two() -> None:
        stream = engine.stream(make_request(PROMPTS[0], 1500))
        n = 0
        async for _ in stream:
            n += 1
            if n == 2:
                return

    await consume_two()
    gc.collect()
    await wait_until(lambda: _kv_seqs(engine) == 0)


# ---------------------------------------------------------------------------- failures
async def test_model_exception_reaches_every_consumer(
    engine_factory: Any, tiny_llama: str, llama_ref: Reference, monkeypatch: Any
) -> None:
    engine = engine_factory(tiny_llama, max_new_tokens=200)
    await engine.start()
    runner = engine._runner
    real = runner.execute
    calls = {"n": 0}

    def flaky(chunks: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected device failure")
        return real(chunks)

    monkeypatch.setattr(runner, "execute", flaky)
    execs = [asyncio.create_task(engine.execute(make_request(p, 100))) for p in PROMPTS[:3]]

    async def stream_end() -> Any:
        return [ev async for ev in engine.stream(make_request(PROMPTS[3], 100))][-1]

    end = await asyncio.wait_for(stream_end(), 10)
    responses = await asyncio.wait_for(asyncio.gather(*execs), 10)
    for result in [*responses, end]:
        assert result.finish_reason == "error"
        assert result.error is not None and "injected device failure" in result.error.message
        assert result.error.code == ErrorCode.UNAVAILABLE
    assert _kv_seqs(engine) == 0
    # The engine keeps serving.
    monkeypatch.setattr(runner, "execute", real)
    resp = await engine.execute(make_request(PROMPTS[4], 5))
    assert resp.finish_reason == "length"
    assert resp.output_tokens == llama_ref.greedy(PROMPTS[4], 5)
    assert resp.metrics.error_rate > 0


async def test_bad_requests_get_error_responses_and_the_engine_keeps_serving(
    engine_factory: Any, tiny_llama: str, llama_ref: Reference
) -> None:
    engine = engine_factory(tiny_llama, max_model_len=64, kv_cache_memory_bytes=16 * 8192)
    await engine.start()
    assert engine.max_context == 64
    long_prompt = " ".join(["word"] * 200)
    bad: list[tuple[Request, ErrorCode, str]] = [
        (make_request(long_prompt, 4), ErrorCode.INVALID_ARGUMENT, "context"),
        (
            Request.model_construct(**{**make_request().model_dump(), "prompt": "\ud800"}),
            ErrorCode.INVALID_ARGUMENT,
            "prompt",
        ),
        (
            Request.model_construct(**{**make_request().model_dump(), "max_tokens": 0}),
            ErrorCode.INVALID_ARGUMENT,
            "max_tokens",
        ),
        (
            make_request("hi", 4, prompt_token_ids=[1, 5, 99999]),
            ErrorCode.INVALID_ARGUMENT,
            "99999",
        ),
        (make_request("hi", 4, prompt_token_ids=[]), ErrorCode.INVALID_ARGUMENT, "no tokens"),
        (make_request("hi", 4, seed="x"), ErrorCode.INVALID_ARGUMENT, "seed"),
        (make_request("hi", 4, ignore_eos="yes"), ErrorCode.INVALID_ARGUMENT, "ignore_eos"),
        (make_request("hi", 4, stop_token_ids="2"), ErrorCode.INVALID_ARGUMENT, "stop_token_ids"),
        (
            Request.model_construct(**{**make_request().model_dump(), "temperature": -1.0}),
            ErrorCode.INVALID_ARGUMENT,
            "temperature",
        ),
    ]
    for req, code, word in bad:
        resp = await engine.execute(req)
        assert resp.finish_reason == "error", req
        assert resp.error is not None and resp.error.code == code
        assert word in resp.error.message
        events = [ev async for ev in engine.stream(req)]
        assert [e.event for e in events] == ["start", "end"]
        assert events[-1].finish_reason == "error" and events[-1].error.code == code
    good = await engine.execute(make_request(PROMPTS[0], 5))
    assert good.finish_reason == "length"
    assert good.output_tokens == llama_ref.greedy(PROMPTS[0], 5)
    assert 0 < good.metrics.error_rate < 1


async def test_request_larger_than_the_whole_kv_pool_is_refused(
    engine_factory: Any, tiny_llama: str
) -> None:
    engine = engine_factory(tiny_llama, max_new_tokens=500, kv_cache_memory_bytes=4 * 8192)
    await engine.start()
    resp = await engine.execute(make_request(PROMPTS[0], 200))
    assert resp.finish_reason == "error"
    assert resp.error is not None and resp.error.code == ErrorCode.RESOURCE_EXHAUSTED
    ok = await engine.execute(make_request(PROMPTS[0], 20))
    assert ok.finish_reason == "length"


async def test_max_tokens_capped_by_max_new_tokens_and_context(
    engine_factory: Any, tiny_llama: str
) -> None:
    engine = engine_factory(tiny_llama, max_new_tokens=9, max_model_len=40)
    await engine.start()
    resp = await engine.execute(make_request(PROMPTS[0], 500))
    assert resp.finish_reason == "length" and len(resp.output_tokens) == 9
    prompt_len = len(engine.tokenizer(PROMPTS[3])["input_ids"])
    engine2 = engine_factory(tiny_llama, max_new_tokens=500, max_model_len=prompt_len + 3)
    await engine2.start()
    resp2 = await engine2.execute(make_request(PROMPTS[3], 100))
    assert resp2.finish_reason == "length" and len(resp2.output_tokens) == 3


# ---------------------------------------------------------------------------- stop/start
async def test_stop_in_flight_ends_everything_and_restart_works(
    engine_factory: Any, tiny_llama: str, llama_ref: Reference
) -> None:
    engine = engine_factory(tiny_llama, max_new_tokens=5000)
    await engine.start()
    execs = [asyncio.create_task(engine.execute(make_request(p, 4000))) for p in PROMPTS[:3]]

    async def stream_all() -> list[Any]:
        return [ev async for ev in engine.stream(make_request(PROMPTS[3], 4000))]

    streamed = asyncio.create_task(stream_all())
    await wait_until(lambda: engine.get_info()["scheduler"]["tokens_generated"] > 8)
    t0 = time.perf_counter()
    await engine.stop()
    responses = await asyncio.wait_for(asyncio.gather(*execs), 2.0)
    events = await asyncio.wait_for(streamed, 2.0)
    assert time.perf_counter() - t0 < 2.0
    for result in [*responses, events[-1]]:
        assert result.finish_reason == "error"
        assert result.error is not None and result.error.code == ErrorCode.UNAVAILABLE
    assert _kv_seqs(engine) == 0
    assert engine.kv_manager.stats().num_cached_pages == 0
    assert not await engine.health_check()
    with pytest.raises(RuntimeError, match="not running"):
        await engine.execute(make_request(PROMPTS[0], 2))
    await engine.start()
    assert await engine.health_check()
    resp = await engine.execute(make_request(PROMPTS[0], 6))
    assert resp.output_tokens == llama_ref.greedy(PROMPTS[0], 6)


async def test_start_twice_is_a_no_op(llama_engine: Any, llama_ref: Any) -> None:
    """0.1.1.2's rule: start() on a running engine returns; the same model keeps serving."""
    model = llama_engine.model
    await llama_engine.start()
    assert llama_engine.is_running and llama_engine.model is model
    resp = await llama_engine.execute(make_request(PROMPTS[0], 4))
    assert resp.output_tokens == llama_ref.greedy(PROMPTS[0], 4)


async def test_an_empty_prompt_starts_from_bos(llama_engine: Any) -> None:
    """As transformers' generate() without inputs: the BOS token is the whole prompt."""
    bos = llama_engine.tokenizer.bos_token_id
    resp = await llama_engine.execute(make_request("", 4))
    assert resp.finish_reason == "length" and len(resp.output_tokens) == 4
    assert resp.metrics.kv_used_tokens == 1 + 4 - 1
    solo = await llama_engine.execute(make_request("", 4, prompt_token_ids=[bos]))
    assert solo.output_tokens == resp.output_tokens


# ---------------------------------------------------------------------------- sampling, metrics
async def test_seeded_sampling_is_reproducible(llama_engine: Any, llama_ref: Reference) -> None:
    def req(seed: int) -> Request:
        return make_request(PROMPTS[0], 16, temperature=0.9, top_p=0.95, seed=seed)

    a, b, c = await asyncio.gather(*(llama_engine.execute(req(s)) for s in (7, 7, 8)))
    assert a.output_tokens == b.output_tokens
    assert a.output_tokens != c.output_tokens
    assert a.output_tokens != llama_ref.greedy(PROMPTS[0], 16)
    top1 = await llama_engine.execute(make_request(PROMPTS[0], 16, temperature=1.0, top_p=1e-6))
    assert top1.output_tokens == llama_ref.greedy(PROMPTS[0], 16)  # top_p -> only the argmax


async def test_metrics_come_from_measurement(llama_engine: Any) -> None:
    resp = await llama_engine.execute(make_request(PROMPTS[3], 10))
    m = resp.metrics
    assert m.ttft_ms > 0 and m.tpot_ms > 0 and m.tbt_ms > 0 and m.throughput_tps > 0
    assert len(m.itl_list) == 9
    if "prefill_ms" in type(m).model_fields:  # isagellm-protocol >= 0.1.2.4
        assert m.prefill_ms > 0 and m.decode_ms > 0
    ts = m.timestamps
    assert ts is not None
    assert ts.queued_at <= ts.scheduled_at <= ts.executed_at <= ts.completed_at
    n_prompt = len(llama_engine.tokenizer(PROMPTS[3])["input_ids"])
    assert m.kv_used_tokens == n_prompt + 10 - 1  # the last token's K/V is never computed
    assert m.kv_used_bytes >= m.kv_used_tokens * llama_engine.kv_manager.spec.bytes_per_token
    assert m.peak_mem_mb > 0
    assert m.component_trace is not None
    assert m.component_trace[0] == "sagellm-backend:CPUEngine"
    assert "runner:paged" in m.component_trace
    info = llama_engine.get_info()
    assert info["runner"] == "paged" and info["engine_type"] == "CPUEngine"


async def test_a_dead_scheduler_thread_fails_requests_instead_of_hanging(
    engine_factory: Any, tiny_llama: str, monkeypatch: Any
) -> None:
    engine = engine_factory(tiny_llama, max_new_tokens=500)
    await engine.start()
    sched = engine._scheduler
    driver = engine._driver

    def die() -> Any:
        raise SystemExit("scheduler killed by the test")  # not an Exception: ends the thread

    monkeypatch.setattr(sched, "schedule", die)
    monkeypatch.setattr("threading.excepthook", lambda args: None)
    resp = await asyncio.wait_for(engine.execute(make_request(PROMPTS[0], 100)), 5)
    assert resp.finish_reason == "error" and resp.error is not None
    await wait_until(lambda: not driver.is_alive)
    assert not await engine.health_check()
    later = await engine.execute(make_request(PROMPTS[0], 3))
    assert later.finish_reason == "error"
    assert later.error is not None and later.error.code == ErrorCode.UNAVAILABLE
    await engine.stop()
    await engine.start()  # a fresh scheduler thread
    ok = await engine.execute(make_request(PROMPTS[0], 3))
    assert ok.finish_reason == "length"


def test_results_for_a_closed_loop_cancel_the_request() -> None:
    from types import SimpleNamespace

    from sagellm_backend.engine.sched.driver import Driver, Handle
    from sagellm_backend.engine.sched.scheduler import SchedSeq

    loop = asyncio.new_event_loop()
    seq = SchedSeq("s1", [1, 2], 4)
    seq.user = loop.run_until_complete(_make_handle(seq, Handle))
    loop.close()
    runner = SimpleNamespace(release=lambda seq_id: None)
    driver = Driver(SimpleNamespace(), runner, name="t", threaded=True)
    seq.output_ids.append(5)
    driver._post([(seq, 1)], [])
    assert driver._cancels == [seq]


async def _make_handle(seq: Any, cls: Any) -> Any:
    return cls(seq, streaming=True)


async def test_stop_during_a_long_step_still_returns_in_time(
    engine_factory: Any, tiny_llama: str, llama_ref: Reference, monkeypatch: Any
) -> None:
    engine = engine_factory(tiny_llama, max_new_tokens=500)
    await engine.start()
    runner = engine._runner
    real = runner.execute
    slow = {"on": True}

    def sluggish(chunks: Any) -> Any:
        if slow["on"]:
            time.sleep(2.5)  # a step longer than stop() waits for
        return real(chunks)

    monkeypatch.setattr(runner, "execute", sluggish)
    task = asyncio.create_task(engine.execute(make_request(PROMPTS[0], 50)))
    await asyncio.sleep(0.2)
    t0 = time.perf_counter()
    await engine.stop()
    resp = await asyncio.wait_for(task, 1.0)
    assert time.perf_counter() - t0 < 2.0
    assert resp.finish_reason == "error" and resp.error is not None
    slow["on"] = False
    await engine.start()  # waits for the old step to end, then serves again
    assert _kv_seqs(engine) == 0
    ok = await engine.execute(make_request(PROMPTS[0], 4))
    assert ok.output_tokens == llama_ref.greedy(PROMPTS[0], 4)


async def test_extreme_sampling_settings_do_not_break_the_batch(
    llama_engine: Any, llama_ref: Reference
) -> None:
    bystander = asyncio.create_task(llama_engine.execute(make_request(PROMPTS[3], 20)))
    sharp = make_request(PROMPTS[0], 8, temperature=1e-45, seed=1)
    narrow = make_request(PROMPTS[0], 8, temperature=1.0, top_p=1e-300, seed=1)
    for req in (sharp, narrow):  # both collapse to the argmax token
        resp = await llama_engine.execute(req)
        assert resp.finish_reason == "length", resp.error
        assert resp.output_tokens == llama_ref.greedy(PROMPTS[0], 8)
    for bad, word in (
        (make_request(PROMPTS[0], 4, temperature=1.0, seed=2**64), "seed"),
        (make_request("a\ud800b", 4), "prompt"),
    ):
        resp = await llama_engine.execute(bad)
        assert resp.finish_reason == "error" and resp.error is not None
        assert resp.error.code == ErrorCode.INVALID_ARGUMENT and word in resp.error.message
    assert (await bystander).output_tokens == llama_ref.greedy(PROMPTS[3], 20)


async def test_restart_after_stopping_a_decoding_batch_serves_a_full_batch(
    engine_factory: Any, tiny_llama: str, llama_ref: Reference
) -> None:
    engine = engine_factory(tiny_llama, max_batch_size=4, max_new_tokens=500)
    for _ in range(2):
        await engine.start()
        tasks = [asyncio.create_task(engine.execute(make_request(p, 400))) for p in PROMPTS[:3]]
        await wait_until(lambda: engine.get_info()["scheduler"]["tokens_generated"] >= 12)
        await engine.stop()
        assert all(r.finish_reason == "error" for r in await asyncio.gather(*tasks))
    await engine.start()
    results = await asyncio.gather(*(engine.execute(make_request(p, 5)) for p in PROMPTS[:4]))
    for p, r in zip(PROMPTS[:4], results, strict=True):
        assert r.output_tokens == llama_ref.greedy(p, 5), r.error


async def test_an_empty_prompt_on_a_model_whose_tokenizer_adds_no_bos(
    engine_factory: Any, tiny_gpt2: str, gpt2_ref: Reference
) -> None:
    """GPT-2 tokenizes "" to no ids: the engine starts from bos_token_id, as generate() does
    without inputs, and the tokens equal generate() from that one token."""
    engine = engine_factory(tiny_gpt2)
    await engine.start()
    bos = engine.tokenizer.bos_token_id
    assert engine.tokenizer("")["input_ids"] == [] and isinstance(bos, int)
    resp = await engine.execute(make_request("", 5))
    assert resp.finish_reason == "length"
    assert resp.output_tokens == gpt2_ref.greedy([bos], 5)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mamba"])  # pool-backed and counting
async def test_a_kv_budget_below_one_page_names_the_config_field(
    model: str, engine_factory: Any
) -> None:
    from sagellm_backend.errors import ConfigError
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    engine = engine_factory(str(ensure_tiny_model(model)), kv_cache_memory_bytes=1)
    with pytest.raises(
        ConfigError, match=r"CPUEngineConfig\.kv_cache_memory_bytes=1 is smaller than one KV page"
    ):
        await engine.start()
    assert not engine.is_running


async def test_a_long_prompt_is_tokenized_off_the_event_loop(
    engine_factory: Any, tiny_llama: str
) -> None:
    """A multi-MB prompt takes the tokenizer seconds: it runs in a worker thread, so other
    requests keep being served; the result (here: too long for the context, or not
    encodable) is reported as for any prompt."""
    import threading

    engine = engine_factory(tiny_llama)
    await engine.start()
    serving = engine._serving
    real = serving.tokenize
    on_loop: list[bool] = []

    def spy(text: str) -> list[int]:
        on_loop.append(threading.current_thread() is threading.main_thread())
        return list(real(text))

    serving.tokenize = spy
    long = await engine.execute(make_request("word " * 8000, 4))
    assert long.finish_reason == "error" and "context length" in long.error.message
    assert on_loop == [False]  # tokenized once, in a worker thread
    broken = await engine.execute(make_request("word " * 8000 + "\ud800", 4))
    assert broken.finish_reason == "error" and "cannot be tokenized" in broken.error.message
    short = await engine.execute(make_request("word " * 10, 4))
    assert short.finish_reason == "length"
    assert on_loop[-1] is True  # a short prompt is tokenized on the loop (fast)


async def test_a_max_model_len_beyond_the_model_is_capped_with_a_warning(
    engine_factory: Any, tiny_llama: str, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    engine = engine_factory(tiny_llama, max_model_len=100_000)
    with caplog.at_level(logging.WARNING, logger="sagellm_backend.engine.hf.core"):
        await engine.start()
    assert engine.max_context == 2048  # tiny-llama's max_position_embeddings
    assert "max_model_len=100000 is longer than the model's context (2048" in caplog.text
