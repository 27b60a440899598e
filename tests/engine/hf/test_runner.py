"""Model runners against the model's own forward: packed prefill, prefix, decode, fallback.

The generic paged runner (``PagedRunner``) and the batched fallback (``HFBatchedRunner``).
"""

from __future__ import annotations

import copy
import random
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch

from sagellm_backend.engine.hf.runner import model_context_length
from sagellm_backend.engine.runners.base import SeqChunk
from sagellm_backend.engine.runners.hf_cache import HFBatchedRunner as HFCacheRunner
from sagellm_backend.engine.runners.paged import PagedRunner as PagedDecoderRunner
from sagellm_backend.engine.runners.paged import prepack_available
from sagellm_backend.engine.runners.select import describe_runner

from .conftest import Reference

pytestmark = pytest.mark.hf

SRC = Path(__file__).resolve().parents[3] / "src" / "sagellm_backend" / "engine"
BS = 16


class Pool:
    """Flat-slot K/V tensors shaped like TorchKVStorage.layer_kv (NaN-filled on purpose)."""

    def __init__(self, model: Any, num_pages: int = 64) -> None:
        cfg = model.config
        kvh = cfg.num_key_value_heads
        hd = cfg.hidden_size // cfg.num_attention_heads
        self.data = torch.full((cfg.num_hidden_layers, 2, num_pages * BS, kvh, hd), float("nan"))
        self.next = 0

    def layer_kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, 0], self.data[i, 1]

    def pages(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def _prompts(vocab: int, n: int = 5, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randint(1, 50))] for _ in range(n)]


def test_paged_runner_matches_generate_with_joins_chunks_and_prefix(
    tiny_llama: str, llama_ref: Reference
) -> None:
    model = Reference(tiny_llama).model  # a private copy: the runner switches its attention
    pool = Pool(model)
    runner = PagedDecoderRunner(model, pool.layer_kv, block_size=BS, max_context=2048)
    n_new = 10
    prompts = _prompts(model.config.vocab_size)
    tables = [pool.pages((len(p) + n_new) // BS + 1) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    done = [0] * len(prompts)
    with torch.inference_mode():
        for step in range(n_new + len(prompts) + 1):
            chunks, who = [], []
            for i, p in enumerate(prompts):
                if i > step or len(outs[i]) >= n_new:
                    continue  # sequence i joins at step i
                toks = p + outs[i]
                end = len(toks)
                if i == 0 and done[0] == 0 and len(p) > 3:
                    end = 3  # a partial prompt chunk: no logits
                chunks.append(
                    SeqChunk(str(i), toks[done[i] : end], done[i], tables[i], end == len(toks))
                )
                who.append(i if end == len(toks) else None)
                done[i] = end
            if not chunks:
                continue
            logits = runner.execute(chunks)
            assert logits.dtype == torch.float32
            rows = iter(logits.argmax(-1).tolist())
            for w in who:
                if w is not None:
                    outs[w].append(next(rows))
                    if len(outs[w]) == n_new and w % 2:
                        runner.release(str(w))  # finished
        # Prefix reuse: a new sequence sharing the full blocks of prompt 1 (already written).
        base = prompts[1] + outs[1]
        shared = (len(prompts[1]) - 1) // BS
        if shared:
            table = tables[1][:shared] + pool.pages(3)
            logits = runner.execute([SeqChunk("x", base[shared * BS :], shared * BS, table, True)])
            assert int(logits[0].argmax()) == llama_ref.greedy(base, 1)[0]
    for p, out in zip(prompts, outs, strict=True):
        assert out == llama_ref.greedy(p, n_new)


def test_large_packed_prefill_uses_reused_buffers_and_matches_generate(
    tiny_llama: str, llama_ref: Reference
) -> None:
    """Two large packed prefill steps of several prompts, then batched decode."""
    model = Reference(tiny_llama).model
    pool = Pool(model)
    runner = PagedDecoderRunner(model, pool.layer_kv, block_size=BS, max_context=2048)
    rng = random.Random(7)
    vocab = model.config.vocab_size
    waves = [
        [[rng.randrange(4, vocab) for _ in range(n)] for n in (40, 33, 57)],
        [[rng.randrange(4, vocab) for _ in range(n)] for n in (45, 30)],
    ]
    n_new = 6
    prompts = [p for w in waves for p in w]
    tables = [pool.pages((len(p) + n_new) // BS + 1) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        first = 0
        for wave in waves:
            ids = range(first, first + len(wave))
            first += len(wave)
            chunks = [SeqChunk(str(i), list(prompts[i]), 0, tables[i], True) for i in ids]
            for i, tok in zip(ids, runner.execute(chunks).argmax(-1).tolist(), strict=True):
                outs[i].append(tok)
        for _ in range(n_new - 1):
            chunks = [
                SeqChunk(str(i), [outs[i][-1]], len(p) + len(outs[i]) - 1, tables[i], True)
                for i, p in enumerate(prompts)
            ]
            for i, tok in enumerate(runner.execute(chunks).argmax(-1).tolist()):
                outs[i].append(tok)
    for p, out in zip(prompts, outs, strict=True):
        assert out == llama_ref.greedy(p, n_new)


def test_paged_runner_rejects_bad_inputs(tiny_llama: str) -> None:
    model = Reference(tiny_llama).model
    pool = Pool(model)
    runner = PagedDecoderRunner(model, pool.layer_kv, block_size=BS, max_context=64)
    with pytest.raises(ValueError, match="block table"):
        runner.execute([SeqChunk("a", list(range(5, 40)), 0, [0], True)])
    with pytest.raises(ValueError, match="context length"):
        runner.execute([SeqChunk("a", list(range(5, 80)), 0, pool.pages(5), True)])
    bad = torch.zeros(64 * BS, 3, 7)
    with pytest.raises(ValueError, match="kv_heads, head_dim"):
        PagedDecoderRunner(model, lambda i: (bad, bad), block_size=BS, max_context=64)


@pytest.mark.parametrize("prepack", [False, True])
def test_fallback_runner_matches_generate_for_gpt2(
    tiny_gpt2: str, gpt2_ref: Reference, prepack: bool
) -> None:
    model = Reference(tiny_gpt2).model
    assert describe_runner(model)[0] == "paged"  # GPT-2 is paged now; fallback on demand
    assert model_context_length(model.config) == 1024
    if prepack:
        model = copy.deepcopy(model)  # prepacking gives the modules their own forward
    runner = HFCacheRunner(model, max_context=1024, prepack_weights=prepack)
    assert runner.prepacked == (prepack and prepack_available())
    prompts = _prompts(model.config.vocab_size, 3, seed=3)
    outs: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        logits = runner.execute([SeqChunk(str(i), p, 0, [], True) for i, p in enumerate(prompts)])
        for o, t in zip(outs, logits.argmax(-1).tolist(), strict=True):
            o.append(t)
        for _ in range(7):
            chunks = [
                SeqChunk(str(i), [o[-1]], len(p) + len(o) - 1, [], True)
                for i, (p, o) in enumerate(zip(prompts, outs, strict=True))
            ]
            for o, t in zip(outs, runner.execute(chunks).argmax(-1).tolist(), strict=True):
                o.append(t)
        with pytest.raises(ValueError, match="holds 0 tokens"):
            runner.execute([SeqChunk("new", [5, 6], 4, [], True)])
    runner.release("0")
    for p, out in zip(prompts, outs, strict=True):
        assert out == gpt2_ref.greedy(p, 8)


def test_no_device_specific_calls_in_the_engine_code() -> None:
    hf = SRC / "hf"
    files = [SRC / "cpu.py", SRC / "hf_cuda.py"]
    files += [hf / n for n in ("__init__.py", "core.py", "runner.py")]
    files += sorted((SRC / "sched").glob("*.py")) + sorted((SRC / "runners").glob("*.py"))
    offenders = [
        f"{f.name}:{n}"
        for f in files
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if re.search(r"torch\.cuda|\.cuda\(", line)
    ]
    assert offenders == []


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral", "llama-rope-scaled"])
def test_paged_runner_covers_the_llama_family(model_type: str) -> None:
    """Qwen2 (q/k/v bias), Qwen3 (q/k norms), Mistral, Llama with llama3 rope scaling."""
    from transformers import AutoConfig, AutoModelForCausalLM

    geometry: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "max_position_embeddings": 256,
    }
    if model_type == "llama-rope-scaled":
        model_type = "llama"
        geometry["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    if model_type == "qwen3":
        geometry["head_dim"] = 16
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **geometry)
    model = AutoModelForCausalLM.from_config(config).eval()
    ref = Reference.__new__(Reference)
    # Its own config: the runner switches the attention of the config it is given.
    ref.model = AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()
    ref._cache = {}
    ref.model.load_state_dict(model.state_dict())
    pool = Pool(model, num_pages=16)
    runner = PagedDecoderRunner(model, pool.layer_kv, block_size=BS, max_context=256)
    prompts = _prompts(300, 3, seed=5)
    tables = [pool.pages(5) for _ in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        logits = runner.execute(
            [
                SeqChunk(str(i), p, 0, t, True)
                for i, (p, t) in enumerate(zip(prompts, tables, strict=True))
            ]
        )
        for o, tok in zip(outs, logits.argmax(-1).tolist(), strict=True):
            o.append(tok)
        for _ in range(5):
            chunks = [
                SeqChunk(str(i), [o[-1]], len(p) + len(o) - 1, t, True)
                for i, (p, o, t) in enumerate(zip(prompts, outs, tables, strict=True))
            ]
            for o, tok in zip(outs, runner.execute(chunks).argmax(-1).tolist(), strict=True):
                o.append(tok)
    for p, out in zip(prompts, outs, strict=True):
        assert out == ref.greedy(p, 6)


def test_fallback_runner_kept_batch_matches_rebuilding_every_step() -> None:
    """The kept decode batch gives the logits of a cache rebuilt each step.

    Bit for bit while both runners ran the same shapes (until decode rows first run apart
    from a prompt), through a middle row leaving (its row cut, the common padding trimmed),
    prompts joining (decode rows run apart from them, then the new sequences become rows,
    one longer than the batch), a dissolution and a failed forward.
    """
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    path = str(ensure_tiny_model("tiny-bloom"))
    ref = Reference(path)
    model = ref.model
    kept = HFCacheRunner(model, max_context=256)
    rebuilt = HFCacheRunner(model, max_context=256, keep_batch=False)
    rng = random.Random(11)
    vocab = model.config.vocab_size
    prompts = {
        sid: [rng.randrange(4, vocab) for _ in range(n)]
        for sid, n in (("a", 7), ("b", 20), ("c", 3), ("d", 11), ("e", 40))
    }
    outs: dict[str, list[int]] = {sid: [] for sid in prompts}
    exact = [True]

    def chunks_for(decode: list[str], prefill: list[str]) -> list[SeqChunk]:
        return [
            SeqChunk(s, [outs[s][-1]], len(prompts[s]) + len(outs[s]) - 1, [], True) for s in decode
        ] + [SeqChunk(s, prompts[s], 0, [], True) for s in prefill]

    def step(decode: list[str], prefill: list[str] = ()) -> None:  # type: ignore[assignment]
        chunks = chunks_for(decode, prefill)
        with torch.inference_mode():
            got = kept.execute(chunks)
            want = rebuilt.execute(chunks)
        if (prefill and decode) or len(prefill) > 1:  # the kept runner runs decode rows in a
            exact[0] = False  # forward of their own and groups prompts: other GEMM shapes
        if exact[0]:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for c, t in zip(chunks, want.argmax(-1).tolist(), strict=True):
            outs[c.seq_id].append(t)

    for sid in ("a", "b", "c"):  # one prompt per step: the same shapes in both runners
        step([], [sid])
    for _ in range(4):
        step(["a", "b", "c"])
    assert kept.kept_steps == 3 and rebuilt.kept_steps == 0
    for runner in (kept, rebuilt):
        runner.release("b")  # the longest row: the others' common padding goes
    for _ in range(3):
        step(["a", "c"])
    assert kept.kept_steps == 6
    step(["a", "c"], ["d"])  # a prompt joins: the decode rows stay on the kept batch
    step(["a", "c", "d"])  # d becomes a row
    step(["a", "c", "d"], ["e"])
    for _ in range(3):
        step(["a", "c", "d", "e"])  # e is longer than the batch: the others get more padding
    assert kept.kept_steps == 12 and kept.dissolved == 0
    assert kept._kept is not None and kept._kept.ids == ["a", "c", "d", "e"]
    step(["e", "a"])  # not the kept rows in order: every row is written back first
    assert kept.dissolved == 1 and kept._kept is not None and kept._kept.ids == ["e", "a"]
    step(["e", "a", "c", "d"])
    for sid in ("a", "c", "d", "e"):
        assert outs[sid] == ref.greedy(prompts[sid], len(outs[sid]))
    kept.release("c")
    # A forward that fails on the kept batch loses its rows' K/V (the cache may have grown
    # in some layers only): the sequences are forgotten and start again from position 0.
    chunks = chunks_for(["e", "a", "d"], [])  # the kept rows, in order

    def boom(**_: Any) -> None:
        raise RuntimeError("injected forward failure")

    kept.model = boom
    with pytest.raises(RuntimeError, match="injected"):
        kept.execute(chunks)
    assert kept._kept is None and not kept._seqs
    kept.model = model
    with pytest.raises(ValueError, match="holds 0 tokens"):
        kept.execute(chunks)
    with torch.inference_mode():
        again = kept.execute([SeqChunk("a", prompts["a"], 0, [], True)])
    assert again.argmax(-1).tolist() == outs["a"][:1]
    kept.release("a")
    assert kept._kept is None and not kept._seqs


def test_fallback_runner_groups_prompts_of_very_different_lengths_on_the_cpu() -> None:
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    model = Reference(str(ensure_tiny_model("tiny-bloom"))).model
    grouped = HFCacheRunner(model, max_context=256)
    single = HFCacheRunner(model, max_context=256, keep_batch=False)  # one padded forward
    rng = random.Random(5)
    chunks = [
        SeqChunk(str(n), [rng.randrange(4, 1000) for _ in range(n)], 0, [], True)
        for n in (3, 90, 7, 100)
    ]
    calls: list[int] = []

    def counted(**kw: Any) -> Any:
        calls.append(kw["input_ids"].shape[0])
        return model(**kw)

    grouped.model = counted
    with torch.inference_mode():
        got = grouped.execute(chunks)
        want = single.execute(chunks)
    assert sorted(calls) == [2, 2]  # (3, 7) and (90, 100): 214 padded tokens, not 400
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # rows in chunk order
