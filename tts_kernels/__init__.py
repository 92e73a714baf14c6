"""tts-kernels: fused kernels for test-time-compute search over LLMs.

Public API:

- :func:`beam_topk` — fused beam expansion step (log-softmax + cumulative score + top-k).
- :func:`kv_reorder_` — in-place beam reorder of dense KV caches over all layers in one call.
- :func:`paged_attention` — decode attention over a paged KV cache (GQA, sliding window, shared prefix).
- :func:`sample` — one token per row: temperature, top-k, top-p, min-p; counter-based (Philox) randomness.
- :func:`prm_score` — PRM head at step ends, folded into running aggregates (last/min/prod/mean).
- :func:`select_best`, :func:`majority_vote`, :func:`weighted_vote`, :func:`topk_per_group` —
  selection and voting over ``[B, N]`` candidates.
- :func:`allocate_budget`, :func:`expected_coverage` — compute-optimal split of a sample budget over
  prompts (exact greedy on the concave coverage objective; a host-side planning op).
- :mod:`tts_kernels.cache` — :class:`~tts_kernels.cache.PagedKVCache`, the block pool with
  copy-on-write forks.
- :mod:`tts_kernels.search` — search drivers (``beam_search``, with ``cache="paged"`` on the paged
  KV cache; ``best_of_n`` with PRM selection and voting).
- :mod:`tts_kernels.models` — transformers models on the paged KV cache (``PagedCache``, the
  ``"tts_paged"`` attention, ``HFPolicy``, ``HFPRM``); imported on demand (it imports transformers).
- :mod:`tts_kernels.reference` — plain-PyTorch meaning of every op.
"""
from . import _ext, cache, search
from .ops import (
    allocate_budget,
    beam_topk,
    expected_coverage,
    kv_reorder_,
    majority_vote,
    paged_attention,
    prm_score,
    sample,
    select_best,
    topk_per_group,
    weighted_vote,
)

__version__ = "0.1.0"
HAS_C = _ext.HAS_C

__all__ = ["beam_topk", "kv_reorder_", "paged_attention", "sample", "prm_score", "select_best", "majority_vote",
           "weighted_vote", "topk_per_group", "allocate_budget", "expected_coverage", "cache", "search", "HAS_C",
           "__version__"]
