"""The HF engine core shared by HFCudaEngine and CPUEngine.

Modules (import them directly; this package imports nothing heavy):

* :mod:`.loader` -- loads a Hugging Face causal LM and tokenizer (dtype, device_map,
  bitsandbytes 8/4-bit, trust_remote_code) with clear errors;
* :mod:`.runner` -- facts read off a loaded model (compute dtype, context length); the
  runners themselves live in :mod:`sagellm_backend.engine.runners`;
* :mod:`.detok` -- incremental detokenisation for streaming;
* :mod:`.core` -- :class:`~.core.HFEngineCore`, the engine both faces extend: the shared
  scheduler and driver (:mod:`sagellm_backend.engine.sched`) over a runner from
  :func:`~.core.build_runner`;
* :mod:`._serving_parts` -- the pieces the core assembles: runner choice, tokenize and
  detokenize adapters, release and worker-thread hooks;
* :mod:`.face` -- what the faces share besides the core: their extra config fields, field
  checks, :class:`~.face.LoadSettings`, the ``mock_mode`` serving set;
* :mod:`.distributed` -- tensor-parallel ranks.
"""
