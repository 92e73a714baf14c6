"""Plain-PyTorch meaning of every op: the specification and the test oracle.

Every backend (CPU C++, CUDA C++, Triton) is tested against these functions.
They favour clarity over speed and compute in float32.
"""
from __future__ import annotations

from typing import Sequence

import torch


def beam_topk_ref(
    logits: torch.Tensor,
    beam_scores: torch.Tensor,
    num_candidates: int | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One beam-search expansion step.

    Shapes: ``logits [B*K, V]`` (float32/float16/bfloat16; row ``b*K + j`` is
    beam ``j`` of batch item ``b``), ``beam_scores [B, K]`` float32.

    Formula::

        s = log_softmax(logits.float() / temperature, -1) + beam_scores.reshape(-1, 1)
        s = s.view(B, K * V)
        scores, flat = topk(s, C)            # C = num_candidates, default 2*K, sorted descending
        parents, tokens = flat // V, flat % V

    NaN and +inf values of ``logits / temperature`` are treated as -inf (never
    selected: they come from overflow, not from a model's preference). A row
    whose logits are all -inf (or NaN) yields -inf for all of its candidates,
    never NaN.
    Returns ``scores [B, C]`` float32, ``parents [B, C]`` int64, ``tokens [B, C]`` int64.
    """
    B, K = beam_scores.shape
    V = logits.shape[-1]
    C = 2 * K if num_candidates is None else int(num_candidates)
    x = logits.float() / temperature
    # NaN and +inf (after scaling) are garbage (overflow), never a choice: -inf.
    x = torch.where(torch.isnan(x) | torch.isposinf(x), torch.full_like(x, float("-inf")), x)
    logp = torch.log_softmax(x, dim=-1)
    # log_softmax of an all -inf row is NaN (-inf - -inf); the op's meaning is -inf.
    logp = torch.where(torch.isnan(logp), torch.full_like(logp, float("-inf")), logp)
    s = (logp + beam_scores.float().reshape(-1, 1)).reshape(B, K * V)
    scores, flat = torch.topk(s, C, dim=-1, largest=True, sorted=True)
    return scores, torch.div(flat, V, rounding_mode="floor"), flat % V


def kv_reorder_ref(caches: Sequence[torch.Tensor], parents: torch.Tensor) -> None:
    """In-place beam reorder of dense KV caches.

    Each tensor in ``caches`` has the beam/sequence dimension first (``[N, ...]``);
    ``parents [N]`` int64. Afterwards ``cache[i]`` holds what ``cache[parents[i]]``
    held before the call, for every tensor in ``caches``. Rows with
    ``parents[i] == i`` are left untouched.
    """
    for c in caches:
        c.copy_(c.index_select(0, parents.to(c.device)))
