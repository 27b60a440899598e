"""The scheduler on its own, driven by a fake runner (no engine, no asyncio, no torch)."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from sagellm_protocol import Error, ErrorCode

from sagellm_backend.engine.runners.base import SeqChunk
from sagellm_backend.engine.sched.sampler import Sampler, SamplingParams, SparseLogits
from sagellm_backend.engine.sched.scheduler import SchedSeq, Scheduler
from sagellm_backend.kv.block_pool import BlockPool
from sagellm_backend.kv.manager import KVCacheManager
from sagellm_backend.kv.spec import KVSpec

BLOCK = 4
VOCAB = 50
EOS = 0


class FakeRunner:
    """Checks each plan's shape; the tokens come from :func:`next_token` (whole context)."""

    name = "fake"
    uses_paged_kv = True
    device = None
    vocab_size = VOCAB

    def __init__(self) -> None:
        self.steps: list[list[SeqChunk]] = []

    def execute(self, chunks: Sequence[SeqChunk]) -> SparseLogits:
        self.steps.append(list(chunks))
        assert len({c.seq_id for c in chunks}) == len(chunks)
        for c in chunks:
            assert c.token_ids and c.start >= 0
            assert len(c.block_table) * BLOCK >= c.start + len(c.token_ids)
        top = [-1] * sum(c.need_logits for c in chunks)
        return SparseLogits(top, lambda i: ([top[i]], [0.0]))

    def release(self, seq_id: str) -> None:
        """No per-sequence state."""

    def reset(self) -> None:
        """No per-sequence state."""


def next_token(seq: SchedSeq) -> int:
    return (sum(seq.prompt_ids) + sum(seq.output_ids) + 1) % (VOCAB - 1) + 1  # never EOS


def make(num_pages: int, *, caching: bool = True, **kw: object) -> Scheduler:
    spec = KVSpec(num_layers=1, num_kv_heads=1, head_dim=4, block_size=BLOCK)
    pool = BlockPool(num_pages, page_bytes=spec.page_bytes, enable_caching=caching)
    kv = KVCacheManager(pool, spec, enable_prefix_caching=caching)
    args: dict[str, object] = {
        "max_batch_size": 4,
        "max_num_batched_tokens": 16,
        "max_context": 1000,
        "eos_token_ids": [EOS],
        "paged": True,
    }
    args.update(kw)
    return Scheduler(kv, **args)  # type: ignore[arg-type]


def run(
    sched: Scheduler, runner: FakeRunner, *, max_steps: int = 10_000, must_finish: bool = True
) -> list[SchedSeq]:
    """Step until idle; return finished sequences in finishing order.

    ``must_finish=False``: stop after ``max_steps`` steps without complaint.
    """
    finished: list[SchedSeq] = []
    sampler = Sampler()
    for _ in range(max_steps):
        plan, failed = sched.schedule()
        finished.extend(failed)
        if plan is None:
            if not sched.has_work:
                return finished
            continue
        logits = runner.execute(plan.chunks)
        logits.top1[:] = [next_token(s) for s in plan.sample_seqs]
        tokens = sampler.sample(logits, plan.sample_seqs)
        finished.extend(sched.update(plan, tokens, 0.0, 0.0))
    if not must_finish:
        return finished
    raise AssertionError("scheduler did not become idle")


def seq(i: int, prompt_len: int, max_tokens: int, **kw: object) -> SchedSeq:
    return SchedSeq(f"s{i}", [(i * 7 + j) % 40 + 1 for j in range(prompt_len)], max_tokens, **kw)  # type: ignore[arg-type]


def test_max_tokens_and_batch_size_are_honoured() -> None:
    sched = make(64, max_batch_size=2)
    runner = FakeRunner()
    seqs = [seq(i, 5, 3 + i) for i in range(5)]
    for s in seqs:
        sched.add(s)
    done = run(sched, runner)
    assert sorted(s.seq_id for s in done) == sorted(s.seq_id for s in seqs)
    assert all(len(s.output_ids) == s.max_tokens and s.finish_reason == "length" for s in seqs)
    assert max(len(step) for step in runner.steps) <= 2
    assert len(sched.kv) == 0 and sched.kv.pool.num_used == 0


def test_chunked_prefill_splits_a_long_prompt() -> None:
    sched = make(64, max_num_batched_tokens=4)
    runner = FakeRunner()
    s = seq(0, 10, 2)
    sched.add(s)
    run(sched, runner)
    prefill = [c for step in runner.steps for c in step if len(c.token_ids) > 1]
    assert [len(c.token_ids) for c in prefill] == [4, 4, 2]
    assert [c.need_logits for step in runner.steps for c in step][:3] == [False, False, True]
    assert len(s.output_ids) == 2


def test_without_chunked_prefill_a_prompt_is_one_chunk_and_none_waits_forever() -> None:
    sched = make(64, max_num_batched_tokens=8, chunked_prefill=False, paged=False)
    runner = FakeRunner()
    first, long_a, long_b = seq(0, 3, 12), seq(1, 20, 2), seq(2, 15, 2)
    sched.add(first)
    run(sched, runner, max_steps=2, must_finish=False)  # first decodes as the long ones arrive
    sched.add(long_a)
    sched.add(long_b)
    done = run(sched, runner)
    assert {s.seq_id for s in done} == {"s0", "s1", "s2"}
    prompts = [(c.seq_id, c.start, len(c.token_ids)) for st in runner.steps for c in st]
    assert ("s1", 0, 20) in prompts and ("s2", 0, 15) in prompts  # whole, beyond the budget
    assert all(n == 1 for sid, start, n in prompts if start > 0)  # no continuation chunk
    # one prompt per step while it exceeds the budget: s2 waits for s1's step to pass
    step_of = {c.seq_id: i for i, st in enumerate(runner.steps) for c in st if c.start == 0}
    assert step_of["s2"] > step_of["s1"]
    assert len(sched.kv) == 0 and sched.kv.pool.num_used == 0


def test_stop_conditions() -> None:
    sched = make(64, decode=lambda ids: " ".join(map(str, ids)))
    runner = FakeRunner()
    a = seq(0, 3, 50)
    b = seq(1, 3, 50)
    sched.add(a)
    sched.add(b)
    first = next_token(a)
    a.stop_token_ids = frozenset({first})
    b.stop_strings = ("",)  # matches any text: stops after one token
    run(sched, runner)
    assert a.finish_reason == "stop" and a.output_ids == [first]
    assert b.finish_reason == "stop" and len(b.output_ids) == 1


def test_eos_kept_or_dropped() -> None:
    for keep in (True, False):
        sched = make(64, keep_eos=keep, eos_token_ids=[next_token(seq(0, 3, 5))])
        s = seq(0, 3, 5)
        sched.add(s)
        run(sched, FakeRunner())
        assert s.finish_reason == "stop"
        assert s.output_ids == ([next_token(seq(0, 3, 5))] if keep else [])


def test_prefix_cache_reuse_skips_cached_blocks() -> None:
    sched = make(64)
    runner = FakeRunner()
    a = seq(0, 13, 2)
    sched.add(a)
    run(sched, runner)
    b = SchedSeq("b", list(a.prompt_ids), 2)
    sched.add(b)
    runner.steps.clear()
    run(sched, runner)
    first = runner.steps[0][0]
    assert first.seq_id == "b" and first.start == 12  # three cached blocks of four
    assert b.output_ids == a.output_ids


def test_preemption_when_kv_runs_out_then_everything_completes() -> None:
    sched = make(6, max_batch_size=4)  # 24 tokens of KV in all
    runner = FakeRunner()
    seqs = [seq(i, 4, 8) for i in range(3)]  # 11 tokens each at the end: not all fit
    for s in seqs:
        sched.add(s)
    run(sched, runner)
    assert sched.preemptions > 0
    for s in seqs:
        ref = seq(int(s.seq_id[1:]), 4, 8)
        expect: list[int] = []
        while len(expect) < 8:
            ref.output_ids = list(expect)
            expect.append(next_token(ref))
        assert s.output_ids == expect
    assert sched.kv.pool.num_used == 0


def test_reserve_output_admits_only_what_fits_at_the_end() -> None:
    sched = make(6, max_batch_size=4, reserve_output=True)
    runner = FakeRunner()
    for i in range(3):
        sched.add(seq(i, 4, 8))  # 3 pages each at the end
    run(sched, runner)
    assert sched.preemptions == 0
    assert max(len(step) for step in runner.steps) == 2


def test_a_request_that_cannot_be_served_fails_when_nothing_runs() -> None:
    sched = make(2)
    s = seq(0, 20, 2)
    sched.add(s)
    done = run(sched, FakeRunner())
    assert done == [s] and s.finish_reason == "error"
    assert s.error is not None and s.error.code == ErrorCode.RESOURCE_EXHAUSTED


def test_abort_and_fail_all_free_everything() -> None:
    sched = make(64)
    runner = FakeRunner()
    a, b, c = seq(0, 5, 100), seq(1, 5, 100), seq(2, 5, 100)
    for s in (a, b, c):
        sched.add(s)
    plan, _ = sched.schedule()
    assert plan is not None
    err = Error(code=ErrorCode.UNAVAILABLE, message="x", retryable=True)
    assert sched.abort(a, err, cancelled=True)
    assert not sched.abort(a, err)
    assert {s.seq_id for s in sched.fail_all(err)} == {"s1", "s2"}
    assert all(s.finished and s.finish_reason == "error" for s in (a, b, c))
    assert sched.stats().cancelled == 1 and sched.stats().failed == 2
    assert len(sched.kv) == 0 and sched.kv.pool.num_used == 0
    del runner


def test_a_row_whose_sampling_failed_fails_only_its_request() -> None:
    sched = make(64)
    a, b = seq(0, 3, 3), seq(1, 3, 3)
    sched.add(a)
    sched.add(b)
    plan, _ = sched.schedule()
    assert plan is not None
    done = sched.update(plan, [ValueError("bad row"), 7], 0.0, 0.0)
    assert done == [a] and a.error is not None and "bad row" in a.error.message
    assert b.output_ids == [7]


def test_sparse_sampler_honours_seed_temperature_top_k_top_p() -> None:
    sampler = Sampler()
    ids, vals = [10, 11, 12, 13], [0.0, -0.1, -0.2, -5.0]
    logits = SparseLogits([10], lambda i: (ids, vals))

    def draw(params: SamplingParams) -> list[int]:
        s = SchedSeq("x", [1], 5, sampling=params)
        return [int(sampler.sample(logits, [s])[0]) for _ in range(40)]  # type: ignore[arg-type]

    assert draw(SamplingParams()) == [10] * 40
    assert draw(SamplingParams(temperature=1.0, seed=3)) == draw(
        SamplingParams(temperature=1.0, seed=3)
    )
    assert len(set(draw(SamplingParams(temperature=1.0, seed=3)))) > 1
    assert set(draw(SamplingParams(temperature=5.0, top_k=2, seed=1))) <= {10, 11}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.3, seed=1))) == {10}
    penalized = SamplingParams(repetition_penalty=100.0)
    s = SchedSeq("x", [10], 5, sampling=penalized)
    assert sampler.sample(SparseLogits([10], lambda i: ([10, 11], [1.0, 0.5])), [s]) == [11]


@settings(max_examples=60, deadline=None)
@given(
    num_pages=st.integers(4, 24),
    batch=st.integers(1, 6),
    budget_extra=st.integers(0, 20),
    reserve=st.booleans(),
    caching=st.booleans(),
    reqs=st.lists(
        st.tuples(st.integers(1, 14), st.integers(1, 10), st.integers(0, 2)),
        min_size=1,
        max_size=12,
    ),
    cancel_at=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 11)), max_size=4),
    decode_steps=st.sampled_from([1, 3, 8]),
    chunked=st.booleans(),
)
def test_property_no_leak_each_finishes_once_order_kept(
    num_pages: int,
    batch: int,
    budget_extra: int,
    reserve: bool,
    caching: bool,
    reqs: list[tuple[int, int, int]],
    cancel_at: list[tuple[int, int]],
    decode_steps: int,
    chunked: bool,
) -> None:
    sched = make(
        num_pages,
        caching=caching,
        max_batch_size=batch,
        max_num_batched_tokens=batch + budget_extra,
        reserve_output=reserve,
        decode_steps=decode_steps,
        chunked_prefill=chunked,
    )
    runner = FakeRunner()
    seqs = []
    for i, (plen, mt, family) in enumerate(reqs):
        s = SchedSeq(f"s{i}", [family + 1 + (j % 3) for j in range(plen)], mt)
        seqs.append(s)
        sched.add(s)
    finished: list[SchedSeq] = []
    admitted: list[str] = []
    err = Error(code=ErrorCode.UNAVAILABLE, message="cancelled", retryable=True)
    cancels = dict(cancel_at)
    sampler = Sampler()
    for step in range(5000):
        if step in cancels:
            victim = seqs[cancels[step] % len(seqs)]
            if sched.abort(victim, err, cancelled=True):
                finished.append(victim)
        plan, failed = sched.schedule()
        finished.extend(failed)
        for s in sched.running:
            if s.seq_id not in admitted:
                admitted.append(s.seq_id)
        if plan is None:
            if not sched.has_work:
                break
            continue
        logits = runner.execute(plan.chunks)
        if not chunked:  # every prompt chunk (start 0 or a paged cache hit) runs to its end
            assert all(c.need_logits for c in plan.chunks)
        logits.top1[:] = [next_token(s) for s in plan.sample_seqs]
        tokens = sampler.sample(logits, plan.sample_seqs)
        for row, c in enumerate(c for c in plan.chunks if c.need_logits):
            if c.num_steps > 1:  # a burst: the tokens single steps would give
                assert len(c.block_table) * BLOCK >= c.start + c.num_steps
                s = plan.sample_seqs[row]
                ctx = SchedSeq("tmp", list(s.prompt_ids), 1, output_ids=list(s.output_ids))
                burst: list[int] = []
                for _ in range(c.num_steps):
                    burst.append(next_token(ctx))
                    ctx.output_ids.append(burst[-1])
                tokens[row] = burst  # type: ignore[call-overload]
        finished.extend(sched.update(plan, tokens, 0.0, 0.0))
        sched.kv.pool.check_invariants()
    else:
        raise AssertionError("never idle")
    # every request finishes exactly once
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in seqs)
    assert all(s.finished for s in seqs)
    for s in seqs:
        if s.finish_reason == "length":
            assert len(s.output_ids) == s.max_tokens
    # no KV block leaked
    assert len(sched.kv) == 0 and sched.kv.pool.num_used == 0
    # arrival order kept: first admissions follow submission order (with prefix caching a
    # request may deliberately wait one step to reuse the pages of a prompt being prefilled)
    order = [int(x[1:]) for x in admitted]
    if not caching:
        assert order == sorted(order)


class BurstRunner(FakeRunner):
    """A runner that decodes ``num_steps`` tokens per chunk (tokens from a context function)."""

    max_decode_steps = 8

    def __init__(self, eos_at: int | None = None) -> None:
        super().__init__()
        self.eos_at = eos_at  # the token at this output index is EOS

    def tokens_after(self, ctx: list[int], n_out: int, k: int) -> list[int]:
        out: list[int] = []
        for j in range(k):
            tok = EOS if self.eos_at == n_out + j else (sum(ctx) + 1) % (VOCAB - 1) + 1
            out.append(tok)
            ctx = [*ctx, tok]
        return out


def run_bursts(sched: Scheduler, runner: BurstRunner) -> list[SchedSeq]:
    finished: list[SchedSeq] = []
    for _ in range(10_000):
        plan, failed = sched.schedule()
        finished.extend(failed)
        if plan is None:
            if not sched.has_work:
                return finished
            continue
        runner.execute(plan.chunks)
        tokens: list[int | list[int] | BaseException] = []
        for c, s in zip(plan.chunks, plan.seqs, strict=True):
            if not c.need_logits:
                continue
            ctx = s.token_slice(0, c.start + len(c.token_ids))
            k = c.num_steps
            burst = runner.tokens_after(ctx, len(s.output_ids), k)
            tokens.append(burst if k > 1 else burst[0])
        finished.extend(sched.update(plan, tokens, 0.0, 0.0))
        sched.kv.pool.check_invariants()
    raise AssertionError("scheduler did not become idle")


def test_decode_bursts_give_the_tokens_of_single_steps_and_stay_in_their_pages() -> None:
    single, bursty = make(64), make(64, decode_steps=8)
    a = [seq(i, 3 + i, 5 + 3 * i) for i in range(4)]
    b = [seq(i, 3 + i, 5 + 3 * i) for i in range(4)]
    for s in a:
        single.add(s)
    for s in b:
        bursty.add(s)
    run_bursts(single, BurstRunner())
    runner = BurstRunner()
    run_bursts(bursty, runner)
    assert [s.output_ids for s in a] == [s.output_ids for s in b]
    assert all(s.finish_reason == "length" and len(s.output_ids) == s.max_tokens for s in b)
    bursts = [c.num_steps for step in runner.steps for c in step if c.num_steps > 1]
    assert bursts and max(bursts) <= 8  # bursts happened, at most decode_steps long
    # every burst stayed inside the pages its sequence held (FakeRunner checks the table
    # covers start + len(token_ids); a burst writes num_steps positions)
    for step in runner.steps:
        for c in step:
            assert len(c.block_table) * BLOCK >= c.start + c.num_steps
    assert len(bursty.kv) == 0 and bursty.kv.pool.num_used == 0
    assert bursty.steps < single.steps


def test_a_burst_is_cut_at_eos_and_sampled_sequences_never_burst() -> None:
    sched = make(64, decode_steps=8)
    s = seq(0, 3, 20)
    t = seq(1, 3, 6, sampling=SamplingParams(temperature=0.7, seed=1))
    u = seq(2, 3, 6, stop_strings=("zz",))
    for x in (s, t, u):
        sched.add(x)
    runner = BurstRunner(eos_at=5)
    # sampled rows get the sampler's choice: feed single tokens for them
    run_bursts(sched, runner)
    assert s.finish_reason == "stop" and len(s.output_ids) == 6 and s.output_ids[-1] == EOS
    for c in (c for step in runner.steps for c in step if c.seq_id in ("s1", "s2")):
        assert c.num_steps == 1
    assert len(sched.kv) == 0 and sched.kv.pool.num_used == 0


@given(
    text=st.text(alphabet="ab xy\u00e9\U0001f600", min_size=1, max_size=60),
    stop=st.text(alphabet="ab \u00e9\U0001f600", min_size=1, max_size=4),
)
@settings(max_examples=200, deadline=None)
def test_stop_strings_are_found_at_the_token_a_full_decode_finds_them(text: str, stop: str) -> None:
    """The recorder decodes only the output's tail; checked after every token (as it runs),
    it must stop at the first token where the whole output's text contains the stop string
    (word and byte tokens: a character may take four tokens)."""
    from sagellm_backend.engine.mock.tokenizer import MockTokenizer

    tok = MockTokenizer(1000)
    ids = tok.encode(text)
    sched = make(8, decode=tok.decode)
    s = seq(0, 1, 100, stop_strings=(stop,))
    want = next((i for i in range(len(ids)) if stop in tok.decode(ids[: i + 1])), None)
    got = None
    for i, t in enumerate(ids):
        s.output_ids.append(t)
        if sched._stop_string_hit(s):
            got = i
            break
    assert got == want
