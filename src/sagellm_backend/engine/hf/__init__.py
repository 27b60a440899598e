"""The HF engine core shared by HFCudaEngine and CPUEngine.

Modules (import them directly; this package imports nothing heavy):

* :mod:`.loader` -- loads a Hugging Face causal LM and tokenizer (dtype, device_map,
  bitsandbytes 8/4-bit, trust_remote_code) with clear errors;
* :mod:`.runner` -- one forward pass per step: the paged runner for Llama-family models
  (packed variable-length prefill, batched paged decode, K/V in the provider's pool) and
  the ``DynamicCache`` fallback for other architectures;
* :mod:`.detok` -- incremental detokenisation for streaming;
* :mod:`.core` -- :class:`~.core.HFEngineCore`, the engine both faces extend: the shared
  scheduler and driver (:mod:`sagellm_backend.engine.sched`) over a runner from
  :func:`~.core.build_runner`;
* :mod:`.face` -- what the faces share besides the core: their extra config fields, field
  checks, :class:`~.face.LoadSettings`, the ``mock_mode`` serving set;
* :mod:`.distributed` -- tensor-parallel ranks.
"""
