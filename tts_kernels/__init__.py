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
- :mod:`tts_kernels.search` — every search behind one entry point: ``search.run(strategy, policy,
  verifier, prompts, budget=N)`` over a registry (``search.STRATEGIES``), one ``SearchResult``;
  the policy/verifier protocols; the drivers (``best_of_n``, ``prm_beam_search``, ``dvts``,
  ``compute_optimal``, and ``beam_search``, the ``generate()`` drop-in).
- :mod:`tts_kernels.models` — transformers models on the paged KV cache (``PagedCache``, the
  ``"tts_paged"`` attention, ``HFPolicy``, ``HFPRM``); loaded on first use (they import transformers).
- :mod:`tts_kernels.bundled` — the bundled task, tiny models and their trainer.
- :mod:`tts_kernels.apps` — the ``tts-kernels`` command: ``demo``, ``eval``, ``check``, ``bench``.
- :mod:`tts_kernels.reference` — plain-PyTorch meaning of every op.

Layers import downward only (kernels < cache < models < search < bundled < bench, apps);
``tests/test_layering.py`` checks it. The design notes are in ``docs/``.
"""
from importlib import metadata as _metadata

from . import _ext, _threads, cache, search
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

try:
    __version__ = _metadata.version("tts-kernels")  # the one version string: setup.py's, via the metadata
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
HAS_C = _ext.HAS_C
_threads.configure_pool()  # no more threads than the affinity mask and the cgroup quota allow

__all__ = ["beam_topk", "kv_reorder_", "paged_attention", "sample", "prm_score", "select_best", "majority_vote",
           "weighted_vote", "topk_per_group", "allocate_budget", "expected_coverage", "cache", "search", "HAS_C",
           "__version__"]
