"""MockEngine: outputs, metrics, batching, KV accounting, streaming, bad input."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sagellm_protocol import ErrorCode, Request

from sagellm_backend.engine.base import BaseEngine, EngineConfig
from sagellm_backend.engine.mock import MockEngine, MockEngineConfig, MockTokenizer
from sagellm_backend.errors import BackendNotAvailableError, ConfigError

from ..conftest import make_request

# ---------------------------------------------------------------------------- tokenizer


_TOK = MockTokenizer(32000)


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_tokenizer_round_trips_any_text(text: str) -> None:
    tok = _TOK
    ids = tok.encode(text)
    assert all(0 <= i < 32000 for i in ids)
    assert tok.decode(ids) == text


@given(st.lists(st.integers(0, 32000 - 1), max_size=40))
@settings(max_examples=300, deadline=None)
def test_tokenizer_decodes_any_ids_in_the_vocabulary(ids: list[int]) -> None:
    text = _TOK.decode(ids)  # never raises, even for byte runs that are not UTF-8
    assert isinstance(text, str)


def test_tokenizer_decodes_invalid_utf8_bytes_as_replacement_characters() -> None:
    tok = _TOK
    cut = list(tok.encode("\u4f60"))[:2]  # two of the three UTF-8 bytes of one character
    assert tok.decode(cut) == "\ufffd"
    assert tok.decode([*tok.encode(" ab"), tok.BYTE_OFFSET + 0x80]) == " ab\ufffd"
    assert tok.decode(tok.encode("x\ud800y")) == "x\ud800y"  # a lone surrogate round-trips


@given(st.text(alphabet=st.sampled_from("ab z\u00e9 \n.Q"), max_size=60))
@settings(max_examples=200, deadline=None)
def test_tokenizer_chunking_equals_whole_text_tokenization(text: str) -> None:
    tok = _TOK
    assert tok.encode(text) == list(tok._encode_chunk(text))
    assert tok.encode(text) == tok.encode(text)  # memoised path gives the same ids


def test_tokenizer_counts_words_not_characters() -> None:
    tok = MockTokenizer()
    assert tok.encode(" the cat") == [tok.encode(" the")[0], tok.encode(" cat")[0]]
    assert len(tok.encode("hello")) == 2  # "hel" + "lo"
    assert len(tok.encode("é")) == 2  # two UTF-8 byte tokens


def test_tokenizer_small_vocab_falls_back_to_bytes() -> None:
    tok = MockTokenizer(512)
    text = " zzz mixed Text"
    assert tok.decode(tok.encode(text)) == text
    assert all(i < 512 for i in tok.encode(text))
    with pytest.raises(ConfigError, match="vocabulary_size"):
        MockTokenizer(100)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([512])


# ---------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 9, 10, 17, 64])
async def test_max_tokens_is_honoured_exactly(engine: MockEngine, max_tokens: int) -> None:
    resp = await engine.execute(make_request(max_tokens=max_tokens))
    assert resp.error is None
    assert resp.finish_reason == "length"
    assert len(resp.output_tokens) == max_tokens
    assert resp.output_text == engine.tokenizer.decode(resp.output_tokens)
    assert engine.tokenizer.encode(resp.output_text) == resp.output_tokens


async def test_outputs_are_deterministic_per_prompt(engine_factory: Any) -> None:
    a = await engine_factory()
    b = await engine_factory(seed=123)
    r1 = await a.execute(make_request("alpha beta", 12))
    r2 = await b.execute(make_request("alpha beta", 12))
    r3 = await a.execute(make_request("alpha gamma", 12))
    assert r1.output_tokens == r2.output_tokens
    assert r1.output_text == r2.output_text
    assert r1.output_tokens != r3.output_tokens
    # A longer request extends the shorter one's output (token i depends only on prompt, i).
    r4 = await a.execute(make_request("alpha beta", 20))
    assert r4.output_tokens[:12] == r1.output_tokens


async def test_eos_probability_stops_early_with_stop(engine_factory: Any) -> None:
    eng = await engine_factory(eos_probability=0.3)
    results = [await eng.execute(make_request(f"prompt {i}", 50)) for i in range(20)]
    stopped = [r for r in results if r.finish_reason == "stop"]
    assert stopped, "with p=0.3 over 50 tokens nearly every request must hit EOS"
    for r in results:
        assert MockTokenizer.EOS_ID not in r.output_tokens
        assert len(r.output_tokens) <= 50
        assert r.output_text == eng.tokenizer.decode(r.output_tokens)
    always = await engine_factory(eos_probability=1.0)
    r = await always.execute(make_request("x", 5))
    assert r.finish_reason == "stop" and r.output_tokens == [] and r.output_text == ""


# ---------------------------------------------------------------------------- metrics


async def test_metrics_come_from_what_happened(engine_factory: Any) -> None:
    eng = await engine_factory(simulate_ttft_ms=20.0, simulate_latency_ms=5.0)
    prompt = "one two three four five six seven"
    resp = await eng.execute(make_request(prompt, 6))
    m = resp.metrics
    n_prompt = len(eng.tokenizer.encode(prompt))
    assert m.ttft_ms >= 19.0
    assert len(m.itl_list) == 5
    assert all(x >= 4.0 for x in m.itl_list)
    assert m.tbt_ms == pytest.approx(sum(m.itl_list) / 5)
    assert m.tpot_ms >= 4.0
    if "prefill_ms" in type(m).model_fields:  # isagellm-protocol >= 0.1.2.4
        assert m.prefill_ms >= 19.0
        assert m.decode_ms >= 5 * 4.0
    assert m.throughput_tps > 0
    assert m.error_rate == 0.0
    assert m.kv_used_tokens == n_prompt + 6 - 1
    spec = eng.kv_manager.spec  # type: ignore[union-attr]
    pages = -(-(n_prompt + 5) // spec.block_size)
    assert m.kv_used_bytes == pages * spec.page_bytes
    assert m.component_trace == ["sagellm-backend:MockEngine"]
    ts = m.timestamps
    assert ts is not None
    assert ts.queued_at <= ts.scheduled_at <= ts.executed_at <= ts.completed_at
    assert (ts.executed_at - ts.queued_at) * 1000 == pytest.approx(m.ttft_ms, abs=0.01)


async def test_zero_latency_is_possible(engine: MockEngine) -> None:
    resp = await engine.execute(make_request(max_tokens=4))
    assert resp.metrics.ttft_ms < 20.0
    if "prefill_ms" in type(resp.metrics).model_fields:  # isagellm-protocol >= 0.1.2.4
        assert resp.metrics.prefill_ms < 20.0


async def test_queueing_shows_up_in_ttft(engine_factory: Any) -> None:
    eng = await engine_factory(simulate_ttft_ms=30.0, max_batch_size=2)
    resps = await asyncio.gather(*(eng.execute(make_request(f"p{i}", 1)) for i in range(6)))
    ttfts = sorted(r.metrics.ttft_ms for r in resps)
    # Three steps of two: ~30, ~60, ~90 ms.
    assert ttfts[0] >= 29.0 and ttfts[1] < 55.0
    assert ttfts[-1] >= 85.0
    assert eng.get_info()["steps"] == 3


@pytest.mark.parametrize(("latency_ms", "steps_per_wave"), [(0.5, 5), (0.0, 2)])
async def test_requests_are_batched_up_to_max_batch_size(
    engine_factory: Any, latency_ms: float, steps_per_wave: int
) -> None:
    eng = await engine_factory(max_batch_size=8, simulate_latency_ms=latency_ms)
    resps = await asyncio.gather(*(eng.execute(make_request(f"p{i}", 5)) for i in range(16)))
    assert all(r.finish_reason == "length" and len(r.output_tokens) == 5 for r in resps)
    # 16 requests of 5 tokens with 8 per step: 2 waves. With simulated time a wave is 5
    # steps (one per token); at zero simulated time the runner decodes in bursts, so a wave
    # is the prefill step (first token) plus one burst of the other 4 tokens.
    assert eng.get_info()["steps"] == 2 * steps_per_wave
    assert eng.get_info()["kv"]["num_seqs"] == 0


# ---------------------------------------------------------------------------- KV


async def test_repeated_prompt_hits_the_prefix_cache(engine: MockEngine) -> None:
    prompt = " ".join(f"w{i}" for i in range(80))
    first = await engine.execute(make_request(prompt, 4))
    second = await engine.execute(make_request(prompt, 4))
    assert first.metrics.prefix_hit_rate == 0.0
    assert second.metrics.prefix_hit_rate > 0.8
    assert second.output_tokens == first.output_tokens


async def test_long_generation_kv_and_multi_turn_prefix_hits(engine: MockEngine) -> None:
    prompt = " ".join(f"w{i}" for i in range(20))
    first = await engine.execute(make_request(prompt, 40))
    n_prompt = len(engine.tokenizer.encode(prompt))
    spec = engine.kv_manager.spec  # type: ignore[union-attr]
    assert first.metrics.kv_used_tokens == n_prompt + 39
    assert first.metrics.kv_used_bytes == -(-(n_prompt + 39) // spec.block_size) * spec.page_bytes
    # Next turn: the previous prompt + answer is a cached prefix (output blocks included).
    second = await engine.execute(make_request(prompt + first.output_text + " next", 2))
    full_blocks = (n_prompt + 39) // spec.block_size
    n_second = len(engine.tokenizer.encode(prompt + first.output_text + " next"))
    assert second.metrics.prefix_hit_rate == pytest.approx(full_blocks * spec.block_size / n_second)
    assert engine.kv_manager.stats().num_seqs == 0  # type: ignore[union-attr]


async def test_prefix_caching_can_be_disabled(engine_factory: Any) -> None:
    eng = await engine_factory(enable_prefix_caching=False)
    prompt = " ".join(f"w{i}" for i in range(80))
    await eng.execute(make_request(prompt, 4))
    second = await eng.execute(make_request(prompt, 4))
    assert second.metrics.prefix_hit_rate == 0.0


async def test_eviction_is_counted(engine_factory: Any) -> None:
    eng = await engine_factory(kv_num_pages=8)
    evicted = 0
    for i in range(12):
        prompt = " ".join(f"p{i}x{j}" for j in range(20))  # distinct, several full blocks
        resp = await eng.execute(make_request(prompt, 2))
        assert resp.finish_reason == "length"
        evicted += resp.metrics.evict_count
    stats = eng.kv_manager.stats()  # type: ignore[union-attr]
    assert stats.evict_count > 0
    assert evicted > 0


async def test_admission_waits_for_kv_instead_of_failing(engine_factory: Any) -> None:
    # 4 pages of 16 tokens; each request needs 2 pages at its end -> at most 2 at a time.
    eng = await engine_factory(kv_num_pages=4, max_batch_size=16, simulate_latency_ms=1.0)
    prompt = "a b c d e f g h"  # 8 tokens
    resps = await asyncio.gather(
        *(eng.execute(make_request(prompt + f" {i}", 12)) for i in range(6))
    )
    assert [r.finish_reason for r in resps] == ["length"] * 6
    spans = sorted(
        (r.metrics.timestamps.scheduled_at, r.metrics.timestamps.completed_at)  # type: ignore[union-attr]
        for r in resps
    )
    # Never more than two scheduled-and-unfinished at once.
    for start, _ in spans:
        live = sum(1 for s, e in spans if s <= start < e)
        assert live <= 2
    assert eng.kv_manager.stats().num_seqs == 0  # type: ignore[union-attr]


async def test_request_that_can_never_fit_gets_an_error(engine_factory: Any) -> None:
    eng = await engine_factory(kv_num_pages=2)
    resp = await eng.execute(make_request("x", 100))
    assert resp.finish_reason == "error"
    assert resp.error is not None and resp.error.code == ErrorCode.RESOURCE_EXHAUSTED
    assert "KV pages" in resp.error.message
    assert resp.error.retryable is False  # the same request can never fit this pool
    ok = await eng.execute(make_request("x", 3))
    assert ok.finish_reason == "length"


# ---------------------------------------------------------------------------- streaming


async def test_stream_yields_start_deltas_end(engine: MockEngine) -> None:
    request = make_request("stream me please", 9, stream=True)
    events = [ev async for ev in engine.stream(request)]
    kinds = [ev.event for ev in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("start") == 1 and kinds.count("end") == 1
    assert set(kinds[1:-1]) == {"delta"}
    deltas = [ev for ev in events if ev.event == "delta"]
    end = events[-1]
    assert "".join(d.chunk for d in deltas) == end.output_text
    assert [t for d in deltas for t in d.chunk_tokens] == end.output_tokens
    assert len(end.output_tokens) == 9
    assert events[0].prompt_tokens == len(engine.tokenizer.encode("stream me please"))
    assert all(ev.engine_id == engine.engine_id for ev in events)
    assert all(ev.request_id == request.request_id for ev in events)


async def test_stream_and_execute_agree(engine: MockEngine) -> None:
    resp = await engine.execute(make_request("same prompt", 7))
    events = [ev async for ev in engine.stream(make_request("same prompt", 7))]
    assert events[-1].output_tokens == resp.output_tokens
    assert events[-1].output_text == resp.output_text


async def test_many_concurrent_streams_lose_nothing(engine_factory: Any) -> None:
    eng = await engine_factory(max_batch_size=64)

    async def consume(i: int) -> tuple[int, int, str, str]:
        starts = ends = 0
        text = ""
        final = ""
        async for ev in eng.stream(make_request(f"stream {i}", 1 + i % 13)):
            if ev.event == "start":
                starts += 1
            elif ev.event == "delta":
                text += ev.chunk
            else:
                ends += 1
                final = ev.output_text
        return starts, ends, text, final

    results = await asyncio.gather(*(consume(i) for i in range(300)))
    for starts, ends, text, final in results:
        assert (starts, ends) == (1, 1)
        assert text == final


# ---------------------------------------------------------------------------- bad input


def _constructed(**fields: Any) -> Request:
    base: dict[str, Any] = {
        "request_id": "bad-1",
        "trace_id": "t",
        "model": "m",
        "prompt": "hello",
        "max_tokens": 4,
        "stream": False,
    }
    base.update(fields)
    return Request.model_construct(**base)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"prompt": "\ud800"}, "request.prompt"),
        ({"prompt": None}, "request.prompt"),
        ({"max_tokens": 0}, "request.max_tokens"),
        ({"max_tokens": -3}, "request.max_tokens"),
        ({"max_tokens": 2.5}, "request.max_tokens"),
        ({"max_tokens": True}, "request.max_tokens"),
        ({"request_id": ""}, "request.request_id"),
        ({"temperature": -1.0}, "request.temperature"),
        ({"temperature": float("nan")}, "request.temperature"),
        ({"top_p": 0.0}, "request.top_p"),
        ({"top_p": 1.5}, "request.top_p"),
        ({"metadata": "x"}, "request.metadata"),
    ],
)
async def test_bad_request_gets_error_response_and_engine_keeps_serving(
    engine: MockEngine, fields: dict[str, Any], needle: str
) -> None:
    resp = await engine.execute(_constructed(**fields))
    assert resp.finish_reason == "error"
    assert resp.error is not None
    assert resp.error.code == ErrorCode.INVALID_ARGUMENT
    assert needle in resp.error.message
    assert resp.metrics.error_rate > 0
    good = await engine.execute(make_request(max_tokens=3))
    assert good.finish_reason == "length" and len(good.output_tokens) == 3


async def test_not_a_request_gets_error_response(engine: MockEngine) -> None:
    resp = await engine.execute("hello")  # type: ignore[arg-type]
    assert resp.finish_reason == "error"
    assert resp.error is not None and "sagellm_protocol.Request" in resp.error.message


async def test_missing_max_tokens_uses_default(engine_factory: Any) -> None:
    eng = await engine_factory(default_max_tokens=5)
    resp = await eng.execute(_constructed(max_tokens=None))
    assert resp.finish_reason == "length" and len(resp.output_tokens) == 5


async def test_bad_request_in_stream_gives_start_and_error_end(engine: MockEngine) -> None:
    events = [ev async for ev in engine.stream(_constructed(prompt="\ud800"))]
    assert [ev.event for ev in events] == ["start", "end"]
    assert events[-1].finish_reason == "error"
    assert events[-1].error is not None


async def test_input_and_output_limits(engine_factory: Any) -> None:
    eng = await engine_factory(max_input_tokens=4, max_output_tokens=8)
    long_prompt = await eng.execute(make_request("one two three four five six", 2))
    assert long_prompt.finish_reason == "error"
    assert long_prompt.error is not None and "max_input_tokens=4" in long_prompt.error.message
    capped = await eng.execute(make_request("hi", 9))  # a cap, as the HF engines' (0.1.1.2
    assert capped.finish_reason == "length" and len(capped.output_tokens) == 8  # ignored it)
    ok = await eng.execute(make_request("hi", 8))
    assert ok.finish_reason == "length" and len(ok.output_tokens) == 8


async def test_strict_model(engine_factory: Any) -> None:
    eng = await engine_factory(model_path="served-model", strict_model=True)
    wrong = await eng.execute(make_request(model="other-model"))
    assert wrong.error is not None and "request.model" in wrong.error.message
    right = await eng.execute(make_request(model="served-model", max_tokens=2))
    assert right.finish_reason == "length"


async def test_error_rate_counts_failed_over_finished(engine: MockEngine) -> None:
    await engine.execute(make_request(max_tokens=2))
    bad = await engine.execute(_constructed(prompt="\ud800"))
    assert bad.metrics.error_rate == pytest.approx(0.5)
    good = await engine.execute(make_request(max_tokens=2))
    assert good.metrics.error_rate == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------- lifecycle / config


async def test_execute_before_start_raises(req: Any) -> None:
    eng = MockEngine(MockEngineConfig("idle"))
    with pytest.raises(RuntimeError, match="not running"):
        await eng.execute(req())
    with pytest.raises(RuntimeError, match="not running"):
        async for _ in eng.stream(req()):
            pass


async def test_start_twice_is_a_no_op(engine: MockEngine) -> None:
    """0.1.1.2's rule: start() on a running engine returns; nothing is rebuilt or lost."""
    kv = engine.kv_manager
    first = await engine.execute(make_request(max_tokens=3))
    await asyncio.gather(engine.start(), engine.start())
    assert engine.is_running and engine.kv_manager is kv
    again = await engine.execute(make_request(max_tokens=3))
    assert again.output_tokens == first.output_tokens


async def test_an_empty_prompt_starts_from_bos(engine: MockEngine) -> None:
    resp = await engine.execute(_constructed(prompt="", max_tokens=4))
    assert resp.finish_reason == "length" and len(resp.output_tokens) == 4
    assert resp.metrics.kv_used_tokens == 1 + 4 - 1  # BOS + the tokens fed back
    bos = await engine.execute(
        _constructed(prompt="", max_tokens=4, metadata={"prompt_token_ids": [MockTokenizer.BOS_ID]})
    )
    assert bos.output_tokens == resp.output_tokens
    empty_ids = await engine.execute(
        _constructed(prompt="x", max_tokens=4, metadata={"prompt_token_ids": []})
    )
    assert empty_ids.finish_reason == "error" and empty_ids.error is not None
    assert "prompt_token_ids" in empty_ids.error.message


def test_class_info() -> None:
    assert issubclass(MockEngine, BaseEngine)
    assert MockEngine.backend_type() == "mock"
    assert MockEngine.is_available() is True
    assert isinstance(MockEngine.priority(), int)


def test_config_keeps_the_0112_constructor() -> None:
    cfg = MockEngineConfig("e1", 5.0, 20.0, 0.1, 1000, model_path="m", max_batch_size=4)
    assert (cfg.simulate_latency_ms, cfg.simulate_ttft_ms) == (5.0, 20.0)
    assert (cfg.simulate_failure_rate, cfg.vocabulary_size) == (0.1, 1000)
    assert (cfg.model_path, cfg.max_batch_size, cfg.device, cfg.mock_mode) == ("m", 4, "mock", True)
    default = MockEngineConfig("e2")
    assert (default.simulate_latency_ms, default.simulate_ttft_ms) == (10.0, 50.0)
    assert default.simulate_failure_rate == 0.0 and default.vocabulary_size == 32000


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"simulate_latency_ms": -1.0}, "simulate_latency_ms"),
        ({"simulate_ttft_ms": float("inf")}, "simulate_ttft_ms"),
        ({"simulate_failure_rate": 1.5}, "simulate_failure_rate"),
        ({"vocabulary_size": 10}, "vocabulary_size"),
        ({"jitter_ms": -2}, "jitter_ms"),
        ({"seed": "x"}, "seed"),
        ({"default_max_tokens": 0}, "default_max_tokens"),
        ({"max_input_tokens": 0}, "max_input_tokens"),
        ({"eos_probability": 2.0}, "eos_probability"),
        ({"kv_num_pages": 0}, "kv_num_pages"),
        ({"kv_num_pages": 4, "kv_memory_bytes": 1 << 20}, "not both"),
        ({"enable_prefix_caching": "yes"}, "enable_prefix_caching"),
        ({"slow_step_every": -1}, "slow_step_every"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"device": ""}, "device"),
        ({"provider": object()}, "provider"),
        ({"component_trace": "x"}, "component_trace"),
        ({"no_such_option": 1}, "no_such_option"),
        ({"kv_spec": 3}, "kv_spec"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        MockEngineConfig("e", **kwargs)


BOOL_FIELDS = ("mock_mode", "enable_prefix_caching", "fail_at_start", "strict_model")


def test_every_bool_field_is_covered() -> None:
    annotated = {f.name for f in dataclasses.fields(MockEngineConfig) if f.type in ("bool", bool)}
    assert annotated == set(BOOL_FIELDS)


@pytest.mark.parametrize("name", BOOL_FIELDS)
@pytest.mark.parametrize("value", ["yes", "False", 1, 0, None, 1.0])
def test_bool_fields_are_type_checked(name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        MockEngineConfig("e", **{name: value})
    message = str(info.value)
    assert f"MockEngineConfig.{name} must be a bool (True/False)" in message, message
    assert repr(value) in message
    for flag in (True, False):
        assert getattr(MockEngineConfig("e", **{name: flag}), name) is flag


def test_engine_id_must_be_non_empty() -> None:
    with pytest.raises(ValueError, match="engine_id"):
        MockEngineConfig("")


async def test_kv_memory_bytes_sizes_the_pool(engine_factory: Any) -> None:
    from sagellm_backend.kv.spec import KVSpec

    spec = KVSpec(num_layers=2, num_kv_heads=1, head_dim=8, block_size=4)
    eng = await engine_factory(kv_spec=spec, kv_memory_bytes=spec.page_bytes * 10)
    assert eng.kv_manager.pool.num_pages == 10  # type: ignore[union-attr]
    resp = await eng.execute(make_request("a b c d e f", 3))
    assert resp.metrics.kv_used_bytes % spec.page_bytes == 0


async def test_get_info_reports_counters(engine: MockEngine) -> None:
    await engine.execute(make_request(max_tokens=2))
    info = engine.get_info()
    assert info["completed"] == 1 and info["failed"] == 0
    assert info["kv"]["num_seqs"] == 0
    assert info["backend_type"] == "mock" and info["is_running"] is True
    assert info["mock_mode"] is True  # a MockEngine always simulates (0.1.1.2 reported True)
    assert MockEngine(EngineConfig(engine_id="plain")).get_info()["mock_mode"] is True


async def test_stop_during_two_starts_wins_over_both() -> None:
    """start(); start() (waiting on the first); stop(): both starts fail, nothing runs."""
    eng = MockEngine(MockEngineConfig("two-starts", 0.0, 0.0))
    real_build = eng._build

    async def slow_build() -> Any:
        await asyncio.sleep(0.01)
        return await real_build()

    eng._build = slow_build  # type: ignore[method-assign]
    first = asyncio.create_task(eng.start())
    second = asyncio.create_task(eng.start())
    await asyncio.sleep(0)
    await eng.stop()
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert all(isinstance(r, BackendNotAvailableError) for r in results), results
    assert "waited for another" in str(results[1])
    assert not eng.is_running
    await eng.start()  # a later start() is not affected
    assert eng.is_running
    await eng.stop()


async def test_stop_while_start_settles_wins() -> None:
    """A stop() that comes while start() waits for what an earlier stop() left running."""
    eng = MockEngine(MockEngineConfig("settling", 0.0, 0.0))
    real_settle = eng._settle

    async def slow_settle() -> None:
        await asyncio.sleep(0.01)
        await real_settle()

    eng._settle = slow_settle  # type: ignore[method-assign]
    starting = asyncio.create_task(eng.start())
    await asyncio.sleep(0)
    await eng.stop()
    with pytest.raises(BackendNotAvailableError, match="stop\\(\\) was called"):
        await starting
    assert not eng.is_running


async def test_a_start_waiting_on_a_failed_start_starts_the_engine_itself() -> None:
    eng = MockEngine(MockEngineConfig("flaky-start", 0.0, 0.0))
    real_build = eng._build
    calls = 0

    async def build_once_failing() -> Any:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls == 1:
            raise ConfigError("first build fails")
        return await real_build()

    eng._build = build_once_failing  # type: ignore[method-assign]
    first, second = await asyncio.gather(eng.start(), eng.start(), return_exceptions=True)
    assert isinstance(first, ConfigError) and second is None
    assert calls == 2 and eng.is_running
    resp = await eng.execute(make_request(max_tokens=2))
    assert resp.finish_reason == "length"
    await eng.stop()
