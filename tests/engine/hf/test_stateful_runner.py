"""Models with recurrent state and models the paged runner refuses after probing them.

The per-sequence runner (``HFStatefulRunner``) on Mamba, hybrid Qwen3-Next and RecurrentGemma
(state kept on its modules); the runner choice for them; the batched fallback on DeepSeek-V3's
latent attention (keys and values of different widths), which the paged runner refuses only
after it switched the model's attention, and must give back.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("transformers")

import torch

from sagellm_backend.engine.runners.base import SeqChunk
from sagellm_backend.engine.runners.hf_state import HFStatefulRunner, recurrent_state_reason
from sagellm_backend.engine.runners.paged import PagedRunner
from sagellm_backend.engine.runners.select import (
    RUNNER_KINDS,
    describe_runner,
    describe_runner_for_path,
)
from sagellm_backend.errors import ConfigError

from .conftest import Reference

pytestmark = pytest.mark.hf

STATEFUL = ["tiny-mamba", "tiny-qwen3-next", "tiny-recurrent-gemma"]
_REFS: dict[str, tuple[str, Reference]] = {}


def _ref(name: str) -> tuple[str, Reference]:
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    if name not in _REFS:
        path = str(ensure_tiny_model(name))
        _REFS[name] = (path, Reference(path))
    return _REFS[name]


def _greedy(runner: Any, steps: list[list[SeqChunk]]) -> list[list[int]]:
    """Run ``steps`` (chunks whose decode tokens are filled in from the previous step)."""
    out: dict[str, list[int]] = {}
    for chunks in steps:
        for c in chunks:
            if c.token_ids == [-1]:  # a decode chunk: feed back the last sampled token
                c.token_ids = [out[c.seq_id][-1]]
        logits = runner.execute(chunks)
        rows = [c for c in chunks if c.need_logits]
        for row, c in enumerate(rows):
            out.setdefault(c.seq_id, []).append(int(logits[row].argmax()))
    return [out[k] for k in sorted(out)]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("name", STATEFUL)
def test_interleaved_sequences_with_split_prompts_equal_generate(name: str, batched: bool) -> None:
    """Two sequences share every step; one prompt arrives in three pieces (chunked); their
    decode steps run merged into one forward (where the model allows it) or one by one."""
    _, ref = _ref(name)
    model = ref.model
    runner = HFStatefulRunner(model, max_context=256)
    runner.batched_decode = runner.batched_decode and batched
    a = [5 + (7 * i) % 900 for i in range(23)]
    b = [9 + (13 * i) % 900 for i in range(6)]
    dec = [-1]
    steps = [
        [SeqChunk("a", a[:10], 0, [], False), SeqChunk("b", b, 0, [], True)],
        [SeqChunk("a", a[10:20], 10, [], False), SeqChunk("b", dec, 6, [], True)],
        [SeqChunk("a", a[20:], 20, [], True), SeqChunk("b", dec, 7, [], True)],
    ]
    for k in range(4):
        steps.append([SeqChunk("a", dec, 23 + k, [], True), SeqChunk("b", dec, 8 + k, [], True)])
    got_a, got_b = _greedy(runner, steps)
    assert got_a == ref.greedy(a, 5)
    assert got_b == ref.greedy(b, 7)
    runner.release("a")
    runner.release("b")
    assert not runner._seqs


def test_a_restart_after_preemption_recomputes_from_scratch() -> None:
    _, ref = _ref("tiny-recurrent-gemma")
    runner = HFStatefulRunner(ref.model, max_context=256)
    a = [11 + (5 * i) % 800 for i in range(9)]
    first = runner.execute([SeqChunk("a", a, 0, [], True)])
    runner.execute([SeqChunk("other", [3, 4, 5], 0, [], True)])  # moves the module state
    again = runner.execute([SeqChunk("a", a, 0, [], True)])  # start 0: state reset
    assert torch.equal(first, again)


def test_the_per_sequence_runner_rejects_bad_chunks() -> None:
    _, ref = _ref("tiny-mamba")
    runner = HFStatefulRunner(ref.model, max_context=32)
    with pytest.raises(ValueError, match="needs at least one chunk"):
        runner.execute([])
    with pytest.raises(ValueError, match="chunk starts at 4, the runner holds 0"):
        runner.execute([SeqChunk("x", [5], 4, [], True)])
    with pytest.raises(ValueError, match="appears twice"):
        runner.execute([SeqChunk("x", [5], 0, [], True), SeqChunk("x", [6], 0, [], True)])
    with pytest.raises(ValueError, match="beyond the context length 32"):
        runner.execute([SeqChunk("x", list(range(4, 40)), 0, [], True)])
    runner.execute([SeqChunk("x", [5, 6], 0, [], False)])
    runner.reset()
    assert not runner._seqs


def test_a_model_without_a_cache_argument_is_refused() -> None:
    class NoCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(8, 4)

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.emb

        def forward(self, input_ids: torch.Tensor, state: Any = None) -> Any:
            return self.emb(input_ids)

    with pytest.raises(ValueError, match="takes no cache argument"):
        HFStatefulRunner(NoCache(), max_context=8)


@pytest.mark.parametrize("name", STATEFUL)
def test_models_with_recurrent_state_get_the_per_sequence_runner(name: str) -> None:
    path, ref = _ref(name)
    assert "hf-sequential" in RUNNER_KINDS
    assert recurrent_state_reason(ref.model) is not None
    assert describe_runner(ref.model)[0] == "hf-sequential"
    assert describe_runner(ref.model, "hf")[0] == "hf-sequential"  # never the padded batch
    assert describe_runner(ref.model.config)[0] == "hf-sequential"  # from config.json alone
    assert describe_runner_for_path(path)["runner"] == "hf-sequential"
    with pytest.raises(ConfigError, match=r"runner='paged' cannot serve this model: .*state"):
        describe_runner(ref.model, "paged")


def test_attention_models_keep_their_runners() -> None:
    for name in ("tiny-llama", "tiny-deepseek-v3"):
        _, ref = _ref(name)
        assert recurrent_state_reason(ref.model) is None


def test_configs_decide_own_cache_layers_and_mixed_head_shapes() -> None:
    """Decided from config.json alone: special cache layers, per-layer head shapes."""
    import transformers

    indexed = transformers.AutoConfig.for_model(
        "deepseek_v32", num_hidden_layers=2, layer_types=["indexed_attention"] * 2
    )
    name, reason = describe_runner(indexed)
    assert name == "hf-sequential" and "indexed_attention" in reason
    with pytest.raises(ConfigError, match="keep more than plain keys and values"):
        describe_runner(indexed, "paged")
    mixed = transformers.AutoConfig.for_model(
        "gemma4_text",
        num_hidden_layers=2,
        num_key_value_heads=2,
        head_dim=16,
        layer_types=["sliding_attention", "full_attention"],
        per_layer_config={"01": {"head_dim": 32}},
    )
    name, reason = describe_runner(mixed)
    assert name == "hf-batched" and "(2, 16), (2, 32)" in reason
    llama = transformers.AutoConfig.for_model("llama", num_hidden_layers=2)
    assert describe_runner(llama)[0] == "paged"


async def test_engine_refuses_runner_paged_for_a_state_model(engine_factory: Any) -> None:
    path, _ = _ref("tiny-mamba")
    engine = engine_factory(path, runner="paged")
    with pytest.raises(ConfigError, match="recurrent state"):
        await engine.start()


def test_a_refused_paged_runner_gives_the_model_its_attention_back() -> None:
    """DeepSeek-V3's latent attention does not fit a (kv_heads, head_dim) pool: the paged
    runner refuses it after switching its attention, and must switch it back (the batched
    fallback then runs the model's own attention, padding mask included)."""
    _, ref = _ref("tiny-deepseek-v3")
    model = ref.model
    before = model.config._attn_implementation
    cfg = model.config
    pool = torch.zeros(cfg.num_hidden_layers, 2, 64, cfg.num_key_value_heads, 8)
    with pytest.raises(ValueError, match="KV storage of layer 0"):
        PagedRunner(model, lambda i: (pool[i, 0], pool[i, 1]), block_size=16, max_context=64)
    assert model.config._attn_implementation == before


def test_decode_steps_are_merged_where_the_model_allows_it() -> None:
    merged = {name: HFStatefulRunner(_ref(name)[1].model, max_context=64) for name in STATEFUL}
    assert merged["tiny-mamba"].batched_decode  # recurrent layers only: no mask
    assert merged["tiny-qwen3-next"].batched_decode  # hybrid: padded K/V and a mask
    assert not merged["tiny-recurrent-gemma"].batched_decode  # state on its modules


def test_a_wrong_merge_is_caught_when_the_runner_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check compares merged and separate decode steps on the model itself."""
    from sagellm_backend.engine.runners import hf_state

    def forget(merged_cache: Any, caches: Any, lengths: Any, width: int) -> None:
        """Keep the sequences' old states: the next merged step starts from stale ones."""

    monkeypatch.setattr(hf_state, "split", forget)
    runner = HFStatefulRunner(_ref("tiny-mamba")[1].model, max_context=64)
    assert not runner.batched_decode
    assert not runner._seqs  # the check's sequences are gone


def test_prefill_groups_bound_the_padding() -> None:
    from sagellm_backend.engine.runners.hf_state import prefill_groups

    def chunks(*lengths: int) -> list[SeqChunk]:
        return [SeqChunk(f"s{i}", [5] * n, 0, [], True) for i, n in enumerate(lengths)]

    def sizes(groups: list[list[SeqChunk]]) -> list[list[int]]:
        return [[len(c.token_ids) for c in g] for g in groups]

    assert sizes(prefill_groups(chunks(40, 1, 23, 7))) == [[1, 7, 23]]  # 40 alone
    assert sizes(prefill_groups(chunks(100, 90, 80, 300, 310))) == [[80, 90, 100], [300, 310]]
    assert prefill_groups(chunks(9)) == []
    assert prefill_groups(chunks(5, 500)) == []  # too much padding: each alone
    for groups in (prefill_groups(chunks(*range(1, 200, 7))),):
        for g in groups:  # within the bound, shortest first
            lengths = [len(c.token_ids) for c in g]
            pad = lengths[-1] * len(g) - sum(lengths)
            assert lengths == sorted(lengths)
            assert pad <= max(0.25 * lengths[-1] * len(g), 16 * len(g))


@pytest.mark.parametrize("name", ["tiny-mamba", "tiny-qwen3-next"])
def test_new_prompts_of_one_step_run_as_one_forward(name: str) -> None:
    """Three new prompts of different lengths: one left-padded forward, each sequence its own
    cache after it; the greedy tokens (decoded merged afterwards) equal generate's."""
    _, ref = _ref(name)
    model = ref.model
    runner = HFStatefulRunner(model, max_context=256)
    assert runner.batched_prefill and runner.batched_decode
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
    prompts = {"a": [7, 8], "b": [5 + (7 * i) % 900 for i in range(9)], "c": [3, 4, 5, 6, 7]}
    dec = [-1]
    steps = [[SeqChunk(sid, ids, 0, [], True) for sid, ids in prompts.items()]]
    for k in range(4):
        steps.append([SeqChunk(sid, dec, len(ids) + k, [], True) for sid, ids in prompts.items()])
    try:
        got = _greedy(runner, steps)
    finally:
        hook.remove()
    assert len(calls) == len(steps)  # one forward per step: prefill and decode batched
    assert got == [ref.greedy(ids, 5) for _, ids in sorted(prompts.items())]
    assert {sid: st.length for sid, st in runner._seqs.items()} == {
        sid: len(ids) + 4 for sid, ids in prompts.items()
    }


@pytest.mark.parametrize("name", ["tiny-mamba", "tiny-qwen3-next"])
def test_the_decode_batch_is_kept_while_its_sequences_stay(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps of the same sequences reuse the merged batch (one merge, no split per step);
    a sequence leaving splits it back, the others are merged again, and every greedy token
    still equals generate's."""
    from sagellm_backend.engine.runners import hf_state

    _, ref = _ref(name)
    runner = HFStatefulRunner(ref.model, max_context=256)
    merges: list[int] = []
    real_merge = hf_state.merge

    def counting(caches: Any, lengths: Any, new_cache: Any) -> int:
        merges.append(len(caches))
        return real_merge(caches, lengths, new_cache)

    monkeypatch.setattr(hf_state, "merge", counting)
    prompts = {"a": [7, 8, 9], "b": [5 + (7 * i) % 900 for i in range(9)], "c": [3, 4]}
    dec = [-1]
    steps = [[SeqChunk(sid, ids, 0, [], True) for sid, ids in prompts.items()]]
    for k in range(4):
        steps.append([SeqChunk(sid, dec, len(ids) + k, [], True) for sid, ids in prompts.items()])
    got = dict(zip(sorted(prompts), _greedy(runner, steps), strict=True))
    assert merges == [3]  # merged once, kept for the next three steps
    assert runner._batch is not None and all(runner._seqs[s].batched for s in prompts)
    runner.release("b")  # b finished: the batch is split back into a's and c's caches
    assert runner._batch is None and not any(st.batched for st in runner._seqs.values())
    out = {sid: got[sid] for sid in ("a", "c")}
    for k in range(2):
        chunks = [SeqChunk(sid, [out[sid][-1]], len(prompts[sid]) + 4 + k, [], True) for sid in out]
        logits = runner.execute(chunks)
        for row, sid in enumerate(out):
            out[sid].append(int(logits[row].argmax()))
    assert merges == [3, 2]
    for sid, ids in prompts.items():
        assert (out.get(sid) or got[sid]) == ref.greedy(ids, 7 if sid in out else 5)
    runner.reset()
    assert runner._batch is None and not runner._seqs


def test_a_wrong_prefill_split_is_caught_when_the_runner_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A prefill split that hands rows their neighbour's state: batched prefill is off, merged
    decode (whose split is right) stays on."""
    from sagellm_backend.engine.runners import _state_batch, hf_state

    def shifted(merged_cache: Any, caches: Any, pads: Any, new_tokens: Any) -> None:
        width = max(new_tokens)
        if any(n + pad != width for n, pad in zip(new_tokens, pads, strict=True)):
            _state_batch.split(merged_cache, caches, pads, new_tokens)  # decode: right
        else:  # a prefill (rows hold their whole prompts): every row gets the next row's state
            _state_batch.split(merged_cache, [*caches[1:], caches[0]], pads, new_tokens)

    monkeypatch.setattr(hf_state, "split", shifted)
    runner = HFStatefulRunner(_ref("tiny-mamba")[1].model, max_context=64)
    assert runner.batched_decode
    assert not runner.batched_prefill
    assert not runner._seqs


def test_unknown_cache_layouts_are_not_merged() -> None:
    from transformers import DynamicCache

    from sagellm_backend.engine.runners._state_batch import UnmergeableError, merge, mergeable

    _, mistral = _ref("tiny-llama")
    cfg = mistral.model.config
    assert mergeable(DynamicCache(config=cfg))  # full attention only
    cfg_sliding = type(cfg).from_dict({**cfg.to_dict(), "sliding_window": 8})
    cfg_sliding.layer_types = ["sliding_attention"] * cfg.num_hidden_layers
    assert not mergeable(DynamicCache(config=cfg_sliding))
    with pytest.raises(UnmergeableError, match="does not know"):
        merge([DynamicCache(config=cfg_sliding)], [1], DynamicCache(config=cfg_sliding))


@pytest.mark.parametrize(
    ("name", "runner"), [("tiny-bloom", "hf-batched"), ("tiny-mamba", "hf-sequential")]
)
async def test_runners_with_their_own_caches_take_no_kv_pool_memory(
    name: str, runner: str, engine_factory: Any
) -> None:
    """Their K/V live in the model's caches: the KV manager only counts (no storage, no
    pool bytes taken from the provider), sized for the batch at full context."""
    from sagellm_backend.testing.tiny_models import ensure_tiny_model

    engine = engine_factory(str(ensure_tiny_model(name)), max_batch_size=3)
    await engine.start()
    assert engine.runner_name == runner
    kv = engine.kv_manager
    assert kv.storage is None
    assert engine.provider.memory_stats()["kv_pool_bytes"] == 0
    per_seq = -(-engine.max_context // kv.spec.block_size)
    assert kv.stats().num_pages == 3 * per_seq
    await engine.stop()
    await engine.start()  # released without the provider (it never held it), built again
    assert engine.kv_manager.storage is None


def test_the_reference_resets_module_state_between_generates() -> None:
    """generate() leaves RecurrentGemma's module state behind, and a 1-token prompt reads it:
    the test reference resets it, so its expected tokens do not depend on earlier calls."""
    _, ref = _ref("tiny-recurrent-gemma")
    runner = HFStatefulRunner(ref.model, max_context=64)
    out = [int(runner.execute([SeqChunk("a", [180], 0, [], True)])[0].argmax())]
    for k in range(3):
        out.append(int(runner.execute([SeqChunk("a", [out[-1]], 1 + k, [], True)])[0].argmax()))
    ref.greedy([3 + i for i in range(20)], 12)
    ref._cache.clear()
    assert ref.greedy([180], 4) == out
