"""The load generator of ``bench``: warm-up, then every request at bounded concurrency.

:func:`measure` sends the workload's requests (at most ``concurrency`` in flight; a new one
as soon as one finishes), counts tokens as they stream, and samples the KV figures and the
process's RSS every 50 ms; :func:`run_hf_baseline` runs plain transformers
``model.generate`` on the same weights and prompt ids for comparison.

Invariant: an engine fault fails one request (its :class:`RequestResult`), never the run;
importing this module imports neither torch nor transformers (the baseline imports torch
when called).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from sagellm_backend.cli._common import describe_exception, request_error_text
from sagellm_backend.cli._table import Progress
from sagellm_backend.cli.bench.workload import Workload, request_for

__all__ = ["LiveCounters", "RequestResult", "measure", "run_hf_baseline"]


@dataclass
class RequestResult:
    """What one measured request gave (``metrics`` is the protocol Metrics, if any)."""

    index: int
    ok: bool
    prompt_tokens: int
    output_tokens: list[int]
    finish_reason: str
    latency_s: float
    error: str | None = None
    metrics: Any = None


@dataclass
class LiveCounters:
    """Counters the requests update and the sampler reads (same event loop)."""

    tokens: int = 0
    finished: int = 0
    failed: int = 0
    kv_peak_tokens: int = 0
    kv_peak_bytes: int = 0
    rss_peak: int | None = None
    samples: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _kv_stats(engine: Any) -> Any:
    kv = getattr(engine, "kv_manager", None)
    if kv is None:
        return None
    try:
        return kv.stats()
    except Exception:  # a figure we cannot read is reported as missing, not fatal
        return None


def _rss_reader() -> Any:
    try:
        import psutil
    except ImportError:
        return None
    proc = psutil.Process()
    return lambda: int(proc.memory_info().rss)


async def _sample(engine: Any, live: LiveCounters, progress: Progress, total_requests: int) -> None:
    rss = _rss_reader()
    interval = 0.05
    while True:
        stats = _kv_stats(engine)
        if stats is not None:
            live.kv_peak_tokens = max(live.kv_peak_tokens, int(stats.kv_used_tokens))
            live.kv_peak_bytes = max(live.kv_peak_bytes, int(stats.kv_used_bytes))
        if rss is not None:
            value = rss()
            live.rss_peak = value if live.rss_peak is None else max(live.rss_peak, value)
        live.samples += 1
        if live.done.is_set():
            return  # the caller closes the progress line with the final figures
        failed = f", {live.failed} failed" if live.failed else ""
        progress.update(live.tokens, f"{live.finished}/{total_requests} requests{failed}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.done.wait(), interval)


async def _one(
    engine: Any, request: Any, index: int, prompt_tokens: int, stream: bool, live: LiveCounters
) -> RequestResult:
    from sagellm_protocol import StreamEventDelta, StreamEventEnd

    t0 = time.perf_counter()
    try:
        if stream:
            end: Any = None
            async for event in engine.stream(request):
                if isinstance(event, StreamEventDelta):
                    live.tokens += len(event.chunk_tokens)
                elif isinstance(event, StreamEventEnd):
                    end = event
            if end is None:
                raise RuntimeError("the stream ended without an end event")
            result = end
        else:
            result = await engine.execute(request)
            live.tokens += len(result.output_tokens)
    except Exception as exc:  # an engine fault fails this request, not the benchmark
        live.finished += 1
        live.failed += 1
        latency = time.perf_counter() - t0
        return RequestResult(
            index, False, prompt_tokens, [], "error", latency, error=describe_exception(exc)
        )
    latency = time.perf_counter() - t0
    ok = result.finish_reason != "error"
    live.finished += 1
    live.failed += 0 if ok else 1
    error = None
    if not ok:
        err = result.error
        error = f"{err.code}: {err.message}" if err is not None else "unknown error"
    return RequestResult(
        index,
        ok,
        prompt_tokens,
        list(result.output_tokens),
        str(result.finish_reason),
        latency,
        error=error,
        metrics=result.metrics,
    )


async def measure(
    engine: Any,
    wl: Workload,
    *,
    label: str,
    concurrency: int,
    stream: bool,
    warmup: int,
    progress: Progress,
) -> tuple[list[RequestResult], float, Any, Any, LiveCounters]:
    """Warm up, run every request (at most ``concurrency`` at once), sample; stops nothing."""
    await _warmup(engine, wl, label, warmup)
    n = len(wl.texts)
    requests = [request_for(wl, i, label, stream, "bench") for i in range(n)]
    live = LiveCounters()
    kv_before = _kv_stats(engine)
    sem = asyncio.Semaphore(concurrency)

    async def limited(i: int) -> RequestResult:
        async with sem:
            return await _one(engine, requests[i], i, wl.lengths[i], stream, live)

    sampler = asyncio.create_task(_sample(engine, live, progress, n))
    t0 = time.perf_counter()
    try:
        results = await asyncio.gather(*(limited(i) for i in range(n)))
    finally:
        duration = time.perf_counter() - t0
        live.done.set()
        await sampler
    kv_after = _kv_stats(engine)
    return list(results), duration, kv_before, kv_after, live


async def _warmup(engine: Any, wl: Workload, label: str, count: int) -> None:
    """``count`` unmeasured requests: the shared prefix alone first (if any), then others."""
    from sagellm_protocol import Request

    for k in range(count):
        if k == 0 and wl.shared_prefix:
            metadata: dict[str, Any] = {"ignore_eos": True}
            if wl.prefix_ids is not None:
                metadata["prompt_token_ids"] = list(wl.prefix_ids)
            prompt = wl.prefix_text or "<prefix>"
        else:
            # A prompt shaped like the measured ones but not one of them (no cache hits).
            src = wl.ids[0] if wl.ids is not None else None
            metadata = {"ignore_eos": True}
            if src is not None:
                rotated = src[len(src) // 2 :] + src[: len(src) // 2]
                metadata["prompt_token_ids"] = list(reversed(rotated))
            prompt = " ".join(reversed(wl.texts[0].split(" "))) or wl.texts[0]
        request = Request(
            request_id=f"warmup-{k}",
            trace_id="bench-warmup",
            model=label,
            prompt=prompt,
            max_tokens=min(2, wl.output_len),
            stream=False,
            metadata=metadata,
        )
        response = await engine.execute(request)
        if response.finish_reason == "error":
            raise RuntimeError(f"the warm-up request failed: {request_error_text(response.error)}")


#: The generation-config fields :func:`greedy_config` clears: the sampling settings and
#: every length or end-of-sequence rule other than ``max_new_tokens``.
_GREEDY_CLEARED = ("temperature", "top_p", "top_k", "min_new_tokens", "max_length", "eos_token_id")


def greedy_config(model: Any, tokenizer: Any, new_tokens: int) -> Any:
    """Greedy, exactly ``new_tokens`` tokens (end of sequence does not stop generation)."""
    import copy

    gen = copy.deepcopy(model.generation_config)
    gen.do_sample = False
    for name in _GREEDY_CLEARED:
        setattr(gen, name, None)
    gen.max_new_tokens = new_tokens
    pad = tokenizer.pad_token_id
    gen.pad_token_id = pad if pad is not None else 0
    return gen


def run_hf_baseline(
    engine: Any,
    wl: Workload,
    modes: Sequence[str],
    batch: int,
    engine_outputs: dict[int, list[int]],
    *,
    progress_stream: TextIO | None,
) -> dict[str, Any]:
    """Plain ``model.generate`` on the engine's own model weights and the same prompt ids.

    Args:
        engine: a started-then-stopped HF engine (its ``model`` and ``tokenizer``).
        wl: the workload (``ids`` required).
        modes: ``"sequential"`` and/or ``"static"`` (left-padded batches of ``batch``).
        batch: static batch size.
        engine_outputs: the engine's output ids by request index (completed requests).
        progress_stream: where to report each phase starting (None: silent).

    Returns:
        ``{mode: {"seconds", "output_tokens", "output_tok_s", "req_s", "same_tokens",
        "compared", "batch_size"}}``.
    """
    import torch

    model = engine.model
    tokenizer = engine.tokenizer
    if model is None or wl.ids is None:
        raise RuntimeError("the hf baseline needs a Hugging Face engine with its model loaded")
    device = next(model.parameters()).device
    gen = greedy_config(model, tokenizer, wl.output_len)
    pad = int(gen.pad_token_id)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        warm = greedy_config(model, tokenizer, 2)
        x = torch.tensor([wl.ids[0][:8]], device=device)
        model.generate(x, attention_mask=torch.ones_like(x), generation_config=warm)
        for mode in modes:
            if progress_stream is not None:
                progress_stream.write(f"baseline: transformers generate, {mode} ...\n")
                progress_stream.flush()
            outputs: list[list[int]] = []
            t0 = time.perf_counter()
            if mode == "sequential":
                for ids in wl.ids:
                    x = torch.tensor([ids], device=device)
                    y = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gen)
                    outputs.append(y[0, len(ids) :].tolist())
            else:
                for start in range(0, len(wl.ids), batch):
                    chunk = wl.ids[start : start + batch]
                    width = max(len(i) for i in chunk)
                    x = torch.tensor([[pad] * (width - len(i)) + i for i in chunk], device=device)
                    mask = torch.tensor(
                        [[0] * (width - len(i)) + [1] * len(i) for i in chunk], device=device
                    )
                    y = model.generate(x, attention_mask=mask, generation_config=gen)
                    outputs.extend(row[width:].tolist() for row in y)
            seconds = time.perf_counter() - t0
            n_out = sum(len(o) for o in outputs)
            compared = [i for i in engine_outputs if i < len(outputs)]
            out[mode] = {
                "seconds": seconds,
                "output_tokens": n_out,
                "output_tok_s": n_out / seconds if seconds > 0 else None,
                "req_s": len(outputs) / seconds if seconds > 0 else None,
                "same_tokens": sum(1 for i in compared if engine_outputs[i] == outputs[i]),
                "compared": len(compared),
                "batch_size": 1 if mode == "sequential" else batch,
            }
    return out
