"""The paged attention function against a naive reference; runner selection; the fallback.

The attention tests drive :func:`paged_attention` directly inside a prepared step of a
:class:`PagedRunner` (a one-layer GQA Llama built from a config): prompt chunks from 0, a
chunk after a cached prefix, and decode tokens of several lengths in one packed row, with
sliding windows, logit soft-capping and attention sinks passed as the model would pass
them. The reference computes every query's softmax explicitly over the full K/V.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch

from sagellm_backend.engine.runners import paged as P  # noqa: N812 - short module alias
from sagellm_backend.engine.runners.base import SeqChunk
from sagellm_backend.engine.runners.hf_cache import HFBatchedRunner
from sagellm_backend.engine.runners.select import describe_runner, describe_runner_for_path
from sagellm_backend.errors import ConfigError

pytestmark = pytest.mark.hf

BS = 4
H, HKV, D = 4, 2, 8


def _tiny_llama() -> Any:
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=H * D,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=H,
        num_key_value_heads=HKV,
        vocab_size=64,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


class _Pool:
    def __init__(self, pages: int = 32) -> None:
        self.data = torch.full((1, 2, pages * BS, HKV, D), float("nan"))

    def layer_kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, 0], self.data[i, 1]


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: range,
    scale: float,
    window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """q ``[n, H, D]`` at ``positions``; k/v ``[L, HKV, D]`` of one sequence; out ``[n, H, D]``."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = H // HKV
    for r, i in enumerate(positions):
        for h in range(H):
            kv_h = h // group
            logits = []
            for j in range(i + 1):
                if window is not None and i - j >= window:
                    continue
                s = float(q[r, h].double() @ k[j, kv_h].double()) * scale
                if softcap is not None:
                    s = math.tanh(s / softcap) * softcap
                logits.append((j, s))
            top = max(s for _, s in logits)
            weights = [(j, math.exp(s - top)) for j, s in logits]
            total = sum(w for _, w in weights)
            if sinks is not None:
                total += math.exp(float(sinks[h]) - top)
            for j, w in weights:
                out[r, h] += (w / total) * v[j, kv_h].double()
    return out.float()


def _call(
    runner: P.PagedRunner, chunks: list[SeqChunk], qkv: tuple[torch.Tensor, ...], **kw: Any
) -> torch.Tensor:
    step, _, _, _ = runner._prepare(chunks)
    module = runner.features[0][0]
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in qkv)  # [1, heads, T, D]
    P._local.step = step
    try:
        out, weights = P.paged_attention(module, q, k, v, None, scaling=kw.pop("scale"), **kw)
    finally:
        P._local.step = None
    assert weights is None
    return out[0]


@pytest.mark.parametrize("window", [None, 3, 6])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_paged_attention_matches_reference(
    window: int | None, softcap: float | None, with_sinks: bool
) -> None:
    torch.manual_seed(1)
    pool = _Pool()
    runner = P.PagedRunner(_tiny_llama(), pool.layer_kv, block_size=BS, max_context=256)
    # Sequence -> (length of its K/V, pages: deliberately scattered and not ascending).
    seqs = {"a": (9, [7, 2, 11]), "b": (11, [3, 9, 1]), "c": (11, [5, 0, 8]), "d": (4, [4])}
    full = {s: (torch.randn(n, H, D), torch.randn(n, HKV, D), torch.randn(n, HKV, D))
            for s, (n, _) in seqs.items()}  # fmt: skip
    sinks = torch.randn(H) if with_sinks else None
    kw: dict[str, Any] = {"scale": 0.3, "sliding_window": window, "softcap": softcap}
    if sinks is not None:
        kw["s_aux"] = sinks
    # History: b's first 6 tokens (a cached prefix), c's first 10, d's first 3.
    history = {"b": 6, "c": 10, "d": 3}
    chunks = [SeqChunk(s, [5] * n, 0, seqs[s][1], True) for s, n in history.items()]
    rows = [tuple(full[s][x][:n] for x in range(3)) for s, n in history.items()]
    _call(runner, chunks, tuple(torch.cat([r[x] for r in rows]) for x in range(3)), **dict(kw))
    # The step under test: a's whole prompt, b after its prefix, then d and c decoding (the
    # runner packs decode rows by ascending position, so this order is also the row order).
    spans = {"a": (0, 9), "b": (6, 11), "d": (3, 4), "c": (10, 11)}
    chunks = [SeqChunk(s, [5] * (e - b), b, seqs[s][1], True) for s, (b, e) in spans.items()]
    qkv = tuple(torch.cat([full[s][x][b:e] for s, (b, e) in spans.items()]) for x in range(3))
    out = _call(runner, chunks, qkv, **dict(kw))
    row = 0
    for s, (b, e) in spans.items():
        q, k, v = full[s]
        want = _reference(q[b:e], k, v, range(b, e), 0.3, window, softcap, sinks)
        torch.testing.assert_close(out[row : row + e - b], want, rtol=1e-4, atol=1e-5)
        row += e - b
    # The pool holds every written K at its slot.
    k_pool = pool.layer_kv(0)[0]
    for s, (_, e) in spans.items():
        pages = seqs[s][1]
        for p in range(e):
            torch.testing.assert_close(k_pool[pages[p // BS] * BS + p % BS], full[s][1][p])


def test_outside_a_step_the_hook_is_dense_attention() -> None:
    torch.manual_seed(2)
    q, k, v = torch.randn(1, H, 5, D), torch.randn(1, HKV, 5, D), torch.randn(1, HKV, 5, D)
    out, _ = P.paged_attention(torch.nn.Module(), q, k, v, None, scaling=0.5, sliding_window=2)
    for i in range(5):
        want = _reference(q[0, :, i : i + 1].transpose(0, 1), k[0].transpose(0, 1),
                          v[0].transpose(0, 1), range(i, i + 1), 0.5, 2, None, None)  # fmt: skip
        torch.testing.assert_close(out[0, i : i + 1], want, rtol=1e-4, atol=1e-5)
    # Queries of the last 2 positions over 5 cached keys (a decode with an HF cache).
    out, _ = P.paged_attention(torch.nn.Module(), q[:, :, 3:], k, v, None, scaling=0.5)
    want = _reference(q[0, :, 3:].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                      range(3, 5), 0.5, None, None, None)  # fmt: skip
    torch.testing.assert_close(out[0], want, rtol=1e-4, atol=1e-5)


def test_runner_refuses_bad_chunks_and_kv_geometry() -> None:
    pool = _Pool()
    runner = P.PagedRunner(_tiny_llama(), pool.layer_kv, block_size=BS, max_context=16)
    with pytest.raises(ValueError, match="beyond the context"):
        runner.execute([SeqChunk("x", [1] * 17, 0, list(range(5)), True)])
    with pytest.raises(ValueError, match="cannot hold"):
        runner.execute([SeqChunk("x", [1] * 9, 0, [0, 1], True)])
    bad = torch.zeros(32, HKV + 1, D)
    with pytest.raises(ValueError, match="kv_heads, head_dim"):
        P.PagedRunner(_tiny_llama(), lambda i: (bad, bad), block_size=BS, max_context=16)


def test_prepare_model_refuses_a_model_without_attention_backend() -> None:
    import transformers

    model = transformers.BloomForCausalLM(
        transformers.BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=64)
    )
    with pytest.raises(ValueError, match="attention-backend"):
        P.prepare_model(model)


def test_describe_runner_from_configs() -> None:
    import transformers

    gpt2 = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4)
    bloom = transformers.BloomConfig(hidden_size=32, n_layer=1, n_head=4)
    falcon = transformers.FalconConfig(alibi=True)
    assert describe_runner(gpt2)[0] == "paged"
    assert describe_runner(gpt2, "hf")[0] == "hf-batched"
    name, reason = describe_runner(bloom)
    assert name == "hf-batched" and "BloomForCausalLM" in reason
    assert describe_runner(falcon)[0] == "hf-batched"
    with pytest.raises(ConfigError, match=r"runner='paged'.*attention"):
        describe_runner(bloom, "paged")
    with pytest.raises(ConfigError, match="auto"):
        describe_runner(gpt2, "fast")


def test_describe_runner_for_path(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=r"config\.json"):
        describe_runner_for_path(tmp_path)
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    got = describe_runner_for_path(ensure_tiny_model("tiny-bloom"))
    assert got["runner"] == "hf-batched" and got["model_type"] == "bloom"
    assert describe_runner_for_path(ensure_tiny_model("tiny-phi3"))["runner"] == "paged"


def test_batched_fallback_matches_generate_and_checks_continuity() -> None:
    from sagellm_backend.engine.hf.loader import load_model_and_tokenizer
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    path = str(ensure_tiny_model("tiny-bloom"))
    model, _ = load_model_and_tokenizer(path, device="cpu", dtype="float32")
    runner = HFBatchedRunner(model, max_context=256, max_batch_size=2)
    prompts = {"a": [5, 9, 13, 40, 7, 8, 100], "b": [17], "c": [200, 300, 400, 500]}
    want = {}
    for s, p in prompts.items():
        out = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)  # fmt: skip
        want[s] = out[0, len(p) :].tolist()
    got: dict[str, list[int]] = {s: [] for s in prompts}
    # Step 1: a's prompt in two chunks (first only), b whole; c joins later.
    logits = runner.execute(
        [SeqChunk("a", prompts["a"][:3], 0, [], False), SeqChunk("b", prompts["b"], 0, [], True)]
    )
    assert logits.shape == (1, runner.vocab_size)
    got["b"].append(int(logits[0].argmax()))
    toks = {"a": list(prompts["a"]), "b": prompts["b"] + got["b"], "c": list(prompts["c"])}
    done = {"a": 3, "b": len(prompts["b"]), "c": 0}
    while any(len(got[s]) < 6 for s in prompts):
        chunks = [
            SeqChunk(s, toks[s][done[s] :], done[s], [], True) for s in prompts if len(got[s]) < 6
        ]
        logits = runner.execute(chunks)  # 3 sequences, max_batch_size 2: split forwards
        for i, c in enumerate(chunks):
            done[c.seq_id] += len(c.token_ids)
            tok = int(logits[i].argmax())
            got[c.seq_id].append(tok)
            toks[c.seq_id].append(tok)
    assert got == want
    with pytest.raises(ValueError, match="holds"):
        runner.execute([SeqChunk("a", [1], 3, [], True)])
    runner.release("a")
    with pytest.raises(ValueError, match="holds 0"):
        runner.execute([SeqChunk("a", [1], 5, [], True)])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_prepacked_weights_match_the_plain_runner(name: str) -> None:
    """Steps of any size run on oneDNN-prepacked weights (Conv1D included), as plain ones."""
    if not P.prepack_available():
        pytest.skip("this torch has no oneDNN prepacking")
    from sagellm_backend.engine.hf.loader import load_model_and_tokenizer
    from sagellm_backend.kv.spec import KVSpec
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    path = str(ensure_tiny_model(name))
    runners = []
    for prepack in (True, False):
        model, _ = load_model_and_tokenizer(path, device="cpu", dtype="float32")
        spec = KVSpec.from_model_config(model.config, block_size=BS, dtype="fp32")
        data = torch.full((spec.num_layers, 2, 64 * BS, spec.num_kv_heads, spec.head_dim), 7.0)
        runner = P.PagedRunner(
            model,
            lambda i, d=data: (d[i, 0], d[i, 1]),
            block_size=BS,
            max_context=256,
            prepack_weights=prepack,
        )
        assert runner.prepacked == prepack
        runners.append((runner, data))
    packed_model = runners[0][0].model
    assert any(
        getattr(m.__dict__.get("forward"), "sagellm_prepacked", False)
        for m in packed_model.modules()
    )
    prompts = [[5 + i, 17, 3 * i + 9, 40][: 1 + i % 4] for i in range(16)]
    for batch in (5, 16, 2, 1):
        chunks = [SeqChunk(str(i), p, 0, [4 * i, 4 * i + 1], True) for i, p in enumerate(prompts)]
        chunks = chunks[:batch]
        outs = [r.execute(chunks) for r, _ in runners]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
        steps = [
            SeqChunk(c.seq_id, [int(outs[0][i].argmax())], len(c.token_ids), c.block_table, True)
            for i, c in enumerate(chunks)
        ]
        outs = [r.execute(steps) for r, _ in runners]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
        # Both pools hold the same K/V.
        torch.testing.assert_close(runners[0][1], runners[1][1], rtol=1e-4, atol=1e-4)


def test_split_decode_cuts_only_where_it_saves_pages() -> None:
    assert P.split_decode([]) == []
    assert P.split_decode([3]) == []
    assert P.split_decode([5, 6, 7, 8]) == []  # at most 3/32 of the pages saved
    assert P.split_decode([2] * 15 + [12]) == [15]  # one long sequence among short ones
    assert P.split_decode([2, 2, 2, 14, 14]) == [3]
    assert P.split_decode([2, 2, 2, 14, 14], min_saving=1.0) == []
    assert P.split_decode(list(range(1, 17))) == []  # the best cut saves under half
    cuts = P.split_decode(list(range(1, 17)), min_saving=0.25)
    assert cuts == sorted(set(cuts)) and len(cuts) > 0 and cuts[0] > 0 and cuts[-1] < 16


def test_grouped_decode_matches_one_decode_group() -> None:
    """Decode rows of mixed lengths, given out of order: split or not, the same logits."""
    torch.manual_seed(3)
    lengths = [30, 3, 17, 45, 5, 2, 28, 9]  # prompt lengths, deliberately unsorted
    results = []
    for saving in (0.25, 1.0):
        pool = _Pool(pages=128)
        runner = P.PagedRunner(_tiny_llama(), pool.layer_kv, block_size=BS, max_context=256)
        runner.decode_split_saving = saving
        gen = torch.Generator().manual_seed(4)
        prompts = [torch.randint(0, 64, (n,), generator=gen).tolist() for n in lengths]
        tables = [list(range(16 * i, 16 * i + 16))[::-1] for i in range(len(lengths))]
        chunks = [SeqChunk(str(i), p, 0, tables[i], True) for i, p in enumerate(prompts)]
        logits = runner.execute(chunks)
        outs = []
        for _ in range(3):
            step, *_ = runner._prepare(
                [
                    SeqChunk(c.seq_id, [1], c.start + len(c.token_ids), c.block_table, True)
                    for c in chunks
                ]
            )
            assert (len(step.decode) > 1) == (saving < 1.0)
            chunks = [
                SeqChunk(
                    c.seq_id,
                    [int(logits[i].argmax())],
                    c.start + len(c.token_ids),
                    c.block_table,
                    True,
                )
                for i, c in enumerate(chunks)
            ]
            logits = runner.execute(chunks)
            outs.append(logits)
        results.append(torch.stack(outs))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)
