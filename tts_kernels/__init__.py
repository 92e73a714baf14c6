"""tts-kernels: fused kernels for test-time-compute search over LLMs.

Public API:

- :func:`beam_topk` — fused beam expansion step (log-softmax + cumulative score + top-k).
- :func:`kv_reorder_` — in-place beam reorder of dense KV caches over all layers in one call.
- :func:`paged_attention` — decode attention over a paged KV cache (GQA, sliding window, shared prefix).
- :func:`sample` — one token per row: temperature, top-k, top-p, min-p; counter-based (Philox) randomness.
- :mod:`tts_kernels.search` — search drivers (``beam_search``; ``cache="paged"`` runs it on the paged KV cache).
- :mod:`tts_kernels.models` — transformers causal LMs on the paged KV cache (``PagedCache``, the
  ``"tts_paged"`` attention, ``use_paged_attention``); imported on demand (it imports transformers).
- :mod:`tts_kernels.reference` — plain-PyTorch meaning of every op.
"""
from . import _ext, search
from .ops import beam_topk, kv_reorder_, paged_attention, sample

__version__ = "0.1.0"
HAS_C = _ext.HAS_C

__all__ = ["beam_topk", "kv_reorder_", "paged_attention", "sample", "search", "HAS_C", "__version__"]
