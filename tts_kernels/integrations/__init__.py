"""Backends from other engines, implementing the search protocols (:mod:`tts_kernels.search.protocols`):
``integrations.vllm.VLLMPolicy`` (a vLLM engine generates; the verifier scores with this package's ops)."""
