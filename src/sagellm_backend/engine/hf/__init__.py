"""The HF engine core shared by HFCudaEngine and CPUEngine.

Modules (import them directly; this package imports nothing heavy):

* :mod:`.loader` -- loads a Hugging Face causal LM and tokenizer (dtype, device_map,
  bitsandbytes 8/4-bit, trust_remote_code) with clear errors;
* :mod:`.runner` -- one forward pass per step: the paged runner for Llama-family models
  (packed variable-length prefill, batched paged decode, K/V in the provider's pool) and
  the ``DynamicCache`` fallback for other architectures;
* :mod:`.scheduler` -- iteration-level continuous batching in one worker thread, KV
  admission and prefix reuse, sampling, cancellation, preemption;
* :mod:`.detok` -- incremental detokenisation for streaming;
* :mod:`.core` -- :class:`~.core.HFEngineCore`, the ``BaseEngine`` both faces extend.
"""
