"""Fake (meta) kernels: output shapes for torch.compile / FakeTensor tracing.

Every schema of ``_ext.SCHEMAS`` has one here or a line in ``NO_FAKE`` saying
why it cannot (tests/test_dispatch.py checks).
"""
from __future__ import annotations

import torch

# The PagedKVCache bookkeeping ops return an error word (schema `int`) that the host reads to decide what
# to do next. A fake can only return a constant there, which would bake "no error" into a graph, and an
# unbacked SymInt is refused ("could not extract specialized integer": the schema says int, not SymInt).
_ERROR_WORD = "returns the error word (schema int) the host branches on; a fake could only fake 'no error'"
NO_FAKE = {
    "paged_fork_": _ERROR_WORD,
    "paged_reorder_": _ERROR_WORD,
    "paged_free_": _ERROR_WORD,
    "paged_begin_step_": _ERROR_WORD + ", and blk/slot are undefined tensors when it is non-zero",
}


@torch.library.register_fake("tts::beam_topk")
def _beam_topk_fake(logits, beam_scores, num_candidates, temperature):
    B = beam_scores.shape[0]
    scores = beam_scores.new_empty((B, num_candidates))
    parents = beam_scores.new_empty((B, num_candidates), dtype=torch.int64)
    tokens = beam_scores.new_empty((B, num_candidates), dtype=torch.int64)
    return scores, parents, tokens


@torch.library.register_fake("tts::kv_reorder_")
def _kv_reorder_fake(caches, parents):
    return None


@torch.library.register_fake("tts::paged_attention")
def _paged_attention_fake(query, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, prefix_lens):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


@torch.library.register_fake("tts::sample")
def _sample_fake(logits, temperature, top_k, top_p, min_p, seed, offset, temperatures, top_ks, top_ps, min_ps, seeds,
                 offsets, streams=None, stats_k=0, stats=None):
    R = logits.shape[0]
    return logits.new_empty((R,), dtype=torch.int64), logits.new_empty((R,), dtype=torch.float32)
