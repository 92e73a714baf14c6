"""Plain-PyTorch meaning of every op: the specification and the test oracle.

Every backend (CPU C++, CUDA C++, Triton) is tested against these functions.
They favour clarity over speed and compute in float32.
"""
from __future__ import annotations

import math
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


# ----------------------------------------------------------------------------- selection and voting


def _score_key(x: float) -> float:
    return float("-inf") if math.isnan(x) else x


def select_best_ref(scores: torch.Tensor) -> torch.Tensor:
    """Index of each row's highest score; ties -> first; NaN ranks as -inf. ``[B, N] -> [B]``."""
    out = []
    for row in scores.double().tolist():
        best = 0
        for j, x in enumerate(row):
            if _score_key(x) > _score_key(row[best]):
                best = j
        out.append(best)
    return torch.tensor(out, dtype=torch.int64)


def weighted_vote_ref(answer_ids: torch.Tensor, scores: torch.Tensor | None = None):
    """Per row: the answer id (-1 = none, never wins unless all are -1) with the largest total
    weight (each candidate weighs its score, NaN as 0, or 1 when ``scores`` is None); ties -> the
    answer that occurs first. Returns ``(answer [B], index of its first occurrence [B])``."""
    answers, index = [], []
    rows = answer_ids.tolist()
    weights = [[1.0] * len(r) for r in rows] if scores is None else scores.double().tolist()
    for a_row, w_row in zip(rows, weights):
        total, first = {}, {}
        for j, (a, w) in enumerate(zip(a_row, w_row)):
            if a == -1:
                continue
            total[a] = total.get(a, 0.0) + (0.0 if math.isnan(w) else w)
            first.setdefault(a, j)
        if not total:
            answers.append(-1)
            index.append(0)
            continue
        best = min(total, key=lambda a: (-total[a], first[a]))
        answers.append(best)
        index.append(first[best])
    return torch.tensor(answers, dtype=torch.int64), torch.tensor(index, dtype=torch.int64)


def majority_vote_ref(answer_ids: torch.Tensor):
    """:func:`weighted_vote_ref` with every candidate weighing 1."""
    return weighted_vote_ref(answer_ids, None)


def topk_per_group_ref(scores: torch.Tensor, k: int):
    """Per row, the ``k`` highest scores best first, ties by lower index, NaN as -inf."""
    idx = []
    for row in scores.double().tolist():
        order = sorted(range(len(row)), key=lambda j: (-_score_key(row[j]), j))
        idx.append(order[:k])
    index = torch.tensor(idx, dtype=torch.int64).reshape(scores.shape[0], k)
    values = torch.where(torch.isnan(scores), float("-inf"), scores).gather(1, index)
    return values, index


# ----------------------------------------------------------------------------- PRM scoring


def prm_score_ref(x, positions, weight=None, bias=None, *, aggregate, count, agg="last", positive_class=1):
    """Plain-loop meaning of :func:`tts_kernels.ops.prm.prm_score` (see its docstring): per row, the
    head at each valid step end, the 2-way softmax (class ``positive_class``) or sigmoid, and the fold
    of those scores, in order, into the running ``aggregate``/``count``."""
    n, S = positions.shape
    scores = torch.full((n, S), float("nan"))
    new_agg, new_count = aggregate.clone().float(), count.clone()
    for i in range(n):
        acc, c = float(aggregate[i]), int(count[i])
        for s in range(S):
            t = int(positions[i, s])
            if t < 0 or t >= x.shape[1]:
                continue
            z = x[i, t].double()
            if weight is not None:
                z = weight.double() @ z
            if bias is not None:
                z = z + bias.double()
            p = float(torch.sigmoid(z[0])) if z.shape[0] == 1 else float(torch.softmax(z, 0)[positive_class])
            scores[i, s] = p
            if agg == "last":
                acc = p
            elif agg == "min":
                acc = min(acc, p)
            elif agg == "prod":
                acc = acc * p
            else:
                acc = (acc * c + p) / (c + 1)
            c += 1
        new_agg[i], new_count[i] = acc, c
    return scores, new_agg, new_count
