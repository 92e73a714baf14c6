"""Fake (meta) kernels: output shapes for torch.compile / FakeTensor tracing."""
from __future__ import annotations

import torch


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
