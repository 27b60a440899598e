"""bitsandbytes 8-bit and 4-bit models served by CPUEngine (issue 16), on tiny offline models.

Each quantised engine serves concurrent ``execute`` and ``stream`` requests through the
batching runners; every bitsandbytes layer runs as its own module (its forward hook fires);
weights take at most 0.55x (8-bit) / 0.35x (4-bit) of their fp16 bytes; bad settings fail
before anything is loaded.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.metadata
import importlib.util
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

import torch

from sagellm_backend.capability import DType
from sagellm_backend.engine.cpu import CPUEngine, CPUEngineConfig, create_cpu_engine
from sagellm_backend.engine.hf import _quant, loader
from sagellm_backend.engine.hf.loader import load_model_and_tokenizer, weight_memory
from sagellm_backend.errors import ConfigError, DependencyMissingError

from .conftest import PROMPTS, make_request, wait_until

#: (model, bits, torch_dtype, 4-bit quant type): both architectures, both widths, fp32 and
#: bf16 activations on the CPU, nf4 and fp4.
CASES = [
    ("tiny-llama", 8, "float32", "nf4"),
    ("tiny-llama", 4, "bfloat16", "nf4"),
    ("tiny-gpt2", 8, "bfloat16", "nf4"),
    ("tiny-gpt2", 4, "float32", "fp4"),
]


def _is_bnb(module: Any) -> bool:
    return type(module).__module__.startswith("bitsandbytes.")


def _quant_fields(bits: int, quant_type: str = "nf4") -> dict[str, Any]:
    if bits == 8:
        return {"load_in_8bit": True}
    return {"load_in_4bit": True, "bnb_4bit_quant_type": quant_type}


@pytest.fixture(scope="module")
def paths(tiny_llama: str, tiny_gpt2: str) -> dict[str, str]:
    return {"tiny-llama": tiny_llama, "tiny-gpt2": tiny_gpt2}


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record every ``from_pretrained`` of a model (the tests expect none)."""
    import transformers

    calls: list[Any] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    return calls


# ---- serving ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "bits", "dtype", "qtype"), CASES)
async def test_quantized_engine_serves_concurrent_requests(
    engine_factory: Any, paths: dict[str, str], name: str, bits: int, dtype: str, qtype: str
) -> None:
    engine = engine_factory(
        paths[name], torch_dtype=dtype, max_batch_size=4, **_quant_fields(bits, qtype)
    )
    await engine.start()
    model = engine.model
    quantized = {n: m for n, m in model.named_modules() if _is_bnb(m)}
    assert len(quantized) == {"tiny-llama": 14, "tiny-gpt2": 8}[name]
    for module in quantized.values():  # quantised storage, never a float matrix
        assert module.weight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    embed = model.get_input_embeddings().weight
    assert embed.dtype == getattr(torch, dtype)  # the dtype is honoured for the rest
    fired: dict[str, int] = dict.fromkeys(quantized, 0)
    hooks = [
        m.register_forward_hook(lambda *_a, n=n: fired.__setitem__(n, fired[n] + 1))
        for n, m in quantized.items()
    ]

    async def streamed(prompt: str) -> tuple[list[int], str, str, Any]:
        ids: list[int] = []
        text: list[str] = []
        end: Any = None
        async for event in engine.stream(make_request(prompt, 10)):
            if event.event == "delta":
                ids.extend(event.chunk_tokens)
                text.append(event.chunk)
            elif event.event == "end":
                end = event
        assert end is not None
        return ids, "".join(text), end.output_text, end

    try:
        execs = [engine.execute(make_request(p, 10)) for p in PROMPTS[:4]]
        streams = [streamed(p) for p in PROMPTS[4:6]]
        results = await asyncio.gather(*execs, *streams)
    finally:
        for hook in hooks:
            hook.remove()
    responses, stream_results = results[:4], results[4:]
    for resp in responses:
        assert resp.finish_reason == "length", resp.error
        assert len(resp.output_tokens) == 10
        assert f"weights:bnb-{'int8' if bits == 8 else qtype}" in resp.metrics.component_trace
    for ids, text, end_text, end in stream_results:
        assert end.finish_reason == "length", end.error
        assert ids == list(end.output_tokens) and len(ids) == 10
        assert text == end_text
    assert all(fired.values()), {n: c for n, c in fired.items() if not c}
    await wait_until(lambda: engine.kv_manager.stats().num_seqs == 0)
    assert engine.kv_manager.stats().kv_used_tokens == 0

    info = engine.get_info()
    assert info["quantization"] == f"bnb-{'int8' if bits == 8 else qtype}"
    assert info["load_in_8bit"] is (bits == 8) and info["load_in_4bit"] is (bits == 4)
    assert info["weight_memory_bytes"] == weight_memory(model).total_bytes > 0
    assert info["weight_memory"]["quantized_layers"] == len(quantized)

    if dtype == "float32":  # the batched runners compute what transformers computes
        outputs = [r.output_tokens for r in responses] + [s[0] for s in stream_results]
        # A second load of the same checkpoint: bitsandbytes quantises deterministically.
        ref_model, tok = load_model_and_tokenizer(
            paths[name], device="cpu", dtype=dtype, **_quant_fields(bits, qtype)
        )
        for prompt, got in zip(PROMPTS[:6], outputs, strict=True):
            ids = tok(prompt)["input_ids"]
            with torch.inference_mode():
                ref = ref_model.generate(
                    torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=10,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            assert got == ref[0, len(ids) :].tolist(), prompt


async def test_bf16_model_on_cpu(engine_factory: Any, tiny_llama: str) -> None:
    """dtype bfloat16 is honoured on the CPU without quantisation (weights, KV, serving)."""
    engine = engine_factory(tiny_llama, torch_dtype="bfloat16")
    await engine.start()
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert engine.get_info()["quantization"] == "none"
    responses = await asyncio.gather(*(engine.execute(make_request(p, 6)) for p in PROMPTS[:3]))
    assert [r.finish_reason for r in responses] == ["length"] * 3
    fp32 = weight_memory(load_model_and_tokenizer(tiny_llama, device="cpu", dtype="float32")[0])
    held = engine.get_info()["weight_memory"]
    assert held["linear_bytes"] * 2 == fp32.linear_bytes  # norms' buffers may stay fp32
    assert fp32.total_bytes / 2 <= held["total_bytes"] < fp32.total_bytes * 0.51


# ---- weight memory ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "bits", "fields", "limit"),
    [
        ("tiny-llama", 8, {}, 0.55),
        ("tiny-gpt2", 8, {}, 0.55),
        # Double quantisation keeps a 1 KiB codebook per layer: more than it saves on
        # 64-wide layers (0.36x here), so the Llama case measures plain nf4.
        ("tiny-llama", 4, {"bnb_4bit_use_double_quant": False}, 0.35),
        ("tiny-gpt2", 4, {}, 0.35),
    ],
)
def test_weight_memory_against_fp16(
    paths: dict[str, str], name: str, bits: int, fields: dict[str, Any], limit: float
) -> None:
    path = paths[name]
    fp16, _ = load_model_and_tokenizer(path, device="cpu", dtype="float16")
    quant, _ = load_model_and_tokenizer(
        path, device="cpu", dtype="float16", **_quant_fields(bits), **fields
    )
    layers = {n for n, m in quant.named_modules() if _is_bnb(m)}
    assert layers, "nothing was quantised"
    fp16_bytes = sum(
        sum(t.numel() * t.element_size() for t in m.parameters(recurse=False))
        for n, m in fp16.named_modules()
        if n in layers
    )
    with torch.inference_mode():  # bitsandbytes may repack its state on the first call
        quant(torch.tensor([[1, 5, 9, 7]]))
    held = weight_memory(quant, "q")
    assert held.quantized_layers == len(layers)
    ratio = held.quantized_bytes / fp16_bytes
    assert ratio <= limit, f"{name} {bits}-bit Linear weights take {ratio:.3f}x of fp16"
    assert ratio > (0.5 if bits == 8 else 0.25)  # the quantisation state is counted too
    assert held.total_bytes < weight_memory(fp16).total_bytes


# ---- bad input: a clear error, nothing loaded --------------------------------------------


def test_both_flags_rejected_at_construction(tiny_llama: str) -> None:
    with pytest.raises(ConfigError, match="mutually exclusive"):
        CPUEngineConfig(engine_id="q", model_path=tiny_llama, load_in_8bit=True, load_in_4bit=True)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"load_in_4bit": "yes"}, ["load_in_4bit", "'yes'"]),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "int3"}, ["'int3'", "nf4", "fp4"]),
        ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "auto"}, ["compute_dtype", "'auto'"]),
        ({"load_in_4bit": True, "bnb_4bit_use_double_quant": 1}, ["double_quant"]),
        ({"load_in_8bit": True, "bnb_4bit_quant_type": "fp4"}, ["load_in_4bit=True"]),
        ({"bnb_4bit_compute_dtype": "bfloat16"}, ["only apply to 4-bit"]),
    ],
)
def test_bad_4bit_options(tiny_llama: str, fields: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        CPUEngineConfig(engine_id="q", model_path=tiny_llama, **fields)
    for word in ["CPUEngineConfig", *words]:
        assert word in str(err.value)


def test_factory_accepts_the_4bit_options(tiny_llama: str) -> None:
    engine = create_cpu_engine(
        {
            "engine_id": "q",
            "model_path": tiny_llama,
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "fp4",
            "bnb_4bit_compute_dtype": "bf16",
            "bnb_4bit_use_double_quant": False,
        }
    )
    assert isinstance(engine, CPUEngine)
    assert engine.get_info()["load_in_4bit"] is True


@pytest.mark.parametrize("bits", [8, 4])
async def test_bitsandbytes_missing(
    engine_factory: Any,
    tiny_llama: str,
    monkeypatch: pytest.MonkeyPatch,
    no_load: list[Any],
    bits: int,
) -> None:
    real = importlib.util.find_spec

    def no_bnb(name: str, *a: Any) -> Any:
        return None if name == "bitsandbytes" else real(name, *a)

    monkeypatch.setattr(loader.importlib.util, "find_spec", no_bnb)
    engine = engine_factory(tiny_llama, **_quant_fields(bits))
    with pytest.raises(DependencyMissingError, match=r"pip install 'isagellm-backend\[quant\]'"):
        await engine.start()
    assert not no_load and engine.model is None and not engine.is_running


async def test_bitsandbytes_too_old_for_cpu(
    engine_factory: Any, tiny_llama: str, monkeypatch: pytest.MonkeyPatch, no_load: list[Any]
) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(
        loader.importlib.metadata,
        "version",
        lambda name: "0.45.5" if name == "bitsandbytes" else real(name),
    )
    engine = engine_factory(tiny_llama, load_in_4bit=True)
    with pytest.raises(DependencyMissingError) as err:
        await engine.start()
    msg = str(err.value)
    assert ">= 0.48" in msg and "0.45.5" in msg and "pip install -U 'bitsandbytes>=0.48'" in msg
    assert not no_load and engine.model is None


def test_quantization_the_device_cannot_run(
    tiny_llama: str, monkeypatch: pytest.MonkeyPatch, no_load: list[Any]
) -> None:
    with pytest.raises(ConfigError, match=r"load_in_8bit cannot run on device 'meta'"):
        load_model_and_tokenizer(tiny_llama, device="meta", load_in_8bit=True)
    # A bitsandbytes whose native library is not a CUDA one cannot quantise on a GPU.
    monkeypatch.setattr(_quant, "_bnb_native_backend", lambda: "CPU")
    with pytest.raises(ConfigError, match=r"device 'cuda:0'.*loaded its CPU library"):
        load_model_and_tokenizer(tiny_llama, device="cuda:0", load_in_4bit=True)
    assert not no_load


@pytest.mark.parametrize(
    ("fields", "what"),
    [
        ({"torch_dtype": "bfloat16", "load_in_8bit": True}, "dtype='bfloat16'"),
        (
            {"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16"},
            "bnb_4bit_compute_dtype='bfloat16'",
        ),
    ],
)
async def test_bf16_where_the_device_has_none(
    engine_factory: Any,
    tiny_llama: str,
    monkeypatch: pytest.MonkeyPatch,
    no_load: list[Any],
    fields: dict[str, Any],
    what: str,
) -> None:
    from sagellm_backend.providers.cpu import CPUBackendProvider

    provider = CPUBackendProvider(kv_memory_bytes=8 << 20)
    cap = copy.copy(provider.capability())
    cap.supported_dtypes = [DType.FP32]
    monkeypatch.setattr(provider, "capability", lambda: cap)
    engine = engine_factory(tiny_llama, provider=provider, **fields)
    with pytest.raises(ConfigError) as err:
        await engine.start()
    msg = str(err.value)
    assert what in msg and "no bfloat16 arithmetic" in msg and "['float32']" in msg, msg
    assert not no_load and engine.model is None
