"""The paged runner's decode cache against the same runner gathering pages every step.

Two runners over identical weights and identical pools run the same schedule: one with the
decode cache, one with ``decode_cache_bytes=0`` (pages gathered every step). Sequences join
at different steps, leave, are released and recomputed (preemption), change a page of
their block table (copy-on-write), skip a step, and abandon a planned step; every step's
logits must agree and the cache must hold only the rows it can vouch for.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("transformers")

import torch

from sagellm_backend.engine.runners import paged as P  # noqa: N812 - short module alias
from sagellm_backend.engine.runners.base import SeqChunk

from .conftest import make_request, run

pytestmark = pytest.mark.hf

BS = 4
H, HKV, D = 4, 2, 8


def _model(seed: int = 0) -> Any:
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=H * D,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=H,
        num_key_value_heads=HKV,
        vocab_size=64,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _runner(cache_bytes: int) -> P.PagedRunner:
    pool = torch.full((2, 2, 96 * BS, HKV, D), float("nan"))
    return P.PagedRunner(
        _model(),
        lambda i: (pool[i, 0], pool[i, 1]),
        block_size=BS,
        max_context=256,
        decode_cache_bytes=cache_bytes,
    )


class _Seq:
    def __init__(self, sid: str, prompt: list[int], pages: list[int]) -> None:
        self.sid, self.tokens, self.pages, self.done = sid, list(prompt), pages, 0

    def chunk(self) -> SeqChunk:
        return SeqChunk(self.sid, self.tokens[self.done :], self.done, self.pages, True)


def _step(runners: list[P.PagedRunner], seqs: list[_Seq]) -> None:
    chunks = [s.chunk() for s in seqs]
    outs = [r.execute(chunks) for r in runners]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for s, row in zip(seqs, outs[1], strict=True):
        s.done = len(s.tokens)
        s.tokens.append(int(row.argmax()))


def test_decode_cache_matches_gathering_pages_through_joins_leaves_and_preemption() -> None:
    cached, plain = runners = [_runner(1 << 20), _runner(0)]
    gen = torch.Generator().manual_seed(1)

    def prompt(n: int) -> list[int]:
        return torch.randint(0, 64, (n,), generator=gen).tolist()

    a = _Seq("a", prompt(9), list(range(0, 20)))
    b = _Seq("b", prompt(3), list(range(20, 40))[::-1])
    c = _Seq("c", prompt(14), list(range(40, 60)))
    d = _Seq("d", prompt(5), list(range(60, 80)))
    _step(runners, [a, b])
    for _ in range(3):
        _step(runners, [a, b])
    assert [r.seq_id for r in cached._dcache._rows] == ["b", "a"]  # ascending position
    _step(runners, [a, c, b])  # c joins with its prompt, a and b decode from the cache
    _step(runners, [c, a, b])  # c starts decoding: its row is filled from the pool
    assert [r.seq_id for r in cached._dcache._rows] == ["b", "a", "c"]
    _step(runners, [a, c])  # b skips a step: it loses its row, refilled next time
    _step(runners, [b, a, c, d])
    _step(runners, [b, a, c, d])
    for r in runners:
        r.release("a")  # a finishes
    _step(runners, [b, c, d])
    # Preemption: c's pages are freed and its tokens recomputed on other pages.
    for r in runners:
        r.release("c")
    c.pages, c.done = list(range(80, 96)), 0
    _step(runners, [b, c, d])
    _step(runners, [b, c, d])
    # d's first page is replaced by another page (copy-on-write, here with other K/V):
    # the row no longer matches d's block table and is rebuilt from the pool.
    fresh = torch.randn(2, 2, BS, HKV, D, generator=torch.Generator().manual_seed(2))
    for r in runners:
        for i, (k, v) in enumerate(zip(r._k, r._v, strict=True)):
            k[19 * BS : 20 * BS] = fresh[i, 0]
            v[19 * BS : 20 * BS] = fresh[i, 1]
    d.pages = [19, *d.pages[1:]]
    _step(runners, [b, c, d])
    assert sorted(r.seq_id for r in cached._dcache._rows) == ["b", "c", "d"]
    # An abandoned plan (prepared, never run) leaves nothing trusted.
    cached._prepare([s.chunk() for s in (b, c, d)])
    assert cached._dcache._rows == []
    _step(runners, [b, c, d])
    cached.reset()
    assert cached._dcache._rows == []
    _step(runners, [b, c, d])
    assert len(plain._dcache.layers) == 0  # a zero budget never allocates


def test_decode_cache_over_budget_gathers_pages_and_frees_the_cache() -> None:
    per_position = 2 * 2 * HKV * D * 4  # layers * (K, V) * heads * head_dim * fp32
    runners = [_runner(12 * per_position), _runner(0)]  # 12 cached positions in all
    seqs = [
        _Seq(str(i), [1 + i, 2, 3, 4][: 2 + i], list(range(20 * i, 20 * i + 20))) for i in range(3)
    ]
    _step(runners, seqs)
    _step(runners, seqs[:2])  # two rows of 4 positions fit the budget
    assert runners[0]._dcache.layers and len(runners[0]._dcache._rows) == 2
    _step(runners, seqs)  # three rows of 5 do not: pages are gathered, the cache is freed
    assert runners[0]._dcache.layers == [] and runners[0]._dcache._rows == []
    _step(runners, seqs[:2])  # two rows of 6 fit again
    assert len(runners[0]._dcache._rows) == 2


def test_decode_workspace_bytes_sets_the_decode_cache_budget(
    tiny_llama: str, engine_factory: Any
) -> None:
    """The engine option reaches the runner: default -> device default, 0 -> off, N -> N."""
    from sagellm_backend.engine.runners.paged import DECODE_CACHE_BYTES

    budgets = {}
    tokens = {}
    for value in (None, 0, 3 << 20):
        extra = {} if value is None else {"decode_workspace_bytes": value}
        engine = engine_factory(tiny_llama, **extra)

        async def cycle(engine: Any = engine) -> tuple[int, list[int]]:
            await engine.start()
            budget = engine._runner._dcache.budget_bytes
            out = await engine.execute(make_request("the budget of the decode cache", 6))
            await engine.stop()
            return budget, list(out.output_tokens)

        budgets[value], tokens[value] = run(cycle())
    assert budgets == {None: DECODE_CACHE_BYTES, 0: 0, 3 << 20: 3 << 20}
    assert tokens[None] == tokens[0] == tokens[3 << 20]  # the cache never changes tokens
