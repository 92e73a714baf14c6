"""Selection and voting over candidates: ``select_best``, ``majority_vote``, ``weighted_vote``, ``topk_per_group``.

Best-of-N and the tree searches end every round by choosing among ``N``
candidates per prompt. These are batched device ops over ``[B, N]`` tensors:
no host read, no Python loop over rows, fixed output shapes, so a search loop
can call them every step without a sync. Their meaning is written as plain
loops in :mod:`tts_kernels.reference` (``select_best_ref`` ...), and the tests
compare the two on random inputs full of ties.

Conventions shared by all of them:

* ties go to the candidate that comes first (lowest index ``j``);
* a NaN score is never preferred to a number (it ranks as ``-inf``; among
  ``-inf``/NaN only, the first candidate wins);
* an answer id of ``-1`` means "no answer": it never wins a vote unless every
  candidate of the row has it, and then the result is ``-1``.
"""
from __future__ import annotations

import torch

from ._validate import check_same_device, check_tensor

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _clean(scores: torch.Tensor) -> torch.Tensor:
    s = scores.float() if scores.dtype != torch.float64 else scores
    return torch.where(torch.isnan(s), float("-inf"), s)


def _first_argmax(x: torch.Tensor, among: torch.Tensor | None = None) -> torch.Tensor:
    """Argmax over the last dim (only positions where ``among``, if given), ties to the lowest index
    (found explicitly, not left to torch.argmax). A row with no eligible position gives 0."""
    n = x.shape[-1]
    if among is not None:
        x = torch.where(among, x, float("-inf"))
    is_max = x == x.max(dim=-1, keepdim=True).values
    if among is not None:
        is_max &= among
    pos = torch.where(is_max, torch.arange(n, device=x.device), n)
    return pos.min(dim=-1).values.clamp(max=max(n - 1, 0))


def select_best(scores: torch.Tensor) -> torch.Tensor:
    """``scores [B, N]`` (float) -> ``index [B]`` int64 of each row's best candidate."""
    check_tensor("scores", scores, ndim=2, dtypes=_FLOAT_DTYPES)
    if scores.shape[1] == 0:
        raise ValueError("scores must have at least one candidate per row (N >= 1)")
    return _first_argmax(_clean(scores))


def _vote(answer_ids: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    a = answer_ids.to(torch.int64)
    B, N = a.shape
    # same[b, i, j]: candidates i and j gave the same answer. O(N^2) per row on the
    # device, which for N up to a few hundred is cheaper than a sort and keeps
    # "first occurrence" exact.
    same = a[:, :, None] == a[:, None, :]
    if weights is None:
        tally = same.sum(-1).to(torch.float64)
    else:
        w = weights.to(torch.float64)
        w = torch.where(torch.isnan(w), 0.0, w)  # (nan_to_num would also clip +-inf)
        tally = torch.where(same, w[:, None, :], 0.0).sum(-1)  # not same * w: 0 * -inf is NaN
    first = _first_argmax(same.to(torch.int8))  # first j with the same answer as i
    idx = torch.arange(N, device=a.device)
    leader = (first == idx) & (a != -1)  # one representative per distinct answer
    win = _first_argmax(tally, among=leader)
    any_answer = leader.any(-1)
    answer = torch.where(any_answer, a.gather(1, win[:, None]).squeeze(1), -1)
    index = torch.where(any_answer, win, 0)
    return answer, index


def _check_answers(answer_ids) -> None:
    check_tensor("answer_ids", answer_ids, ndim=2, dtypes=_INT_DTYPES)
    if answer_ids.shape[1] == 0:
        raise ValueError("answer_ids must have at least one candidate per row (N >= 1)")


def majority_vote(answer_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Most frequent answer per row.

    ``answer_ids [B, N]`` integer (-1 = no answer) -> ``(answer [B], index [B])``: the
    winning answer id and the position of its first occurrence (a candidate that
    gave it). Equal counts: the answer that occurs first wins.
    """
    _check_answers(answer_ids)
    return _vote(answer_ids, None)


def weighted_vote(answer_ids: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer with the largest summed score per row (weighted best-of-N).

    ``answer_ids [B, N]`` integer (-1 = no answer), ``scores [B, N]`` float (NaN counts
    as 0) -> ``(answer [B], index [B])`` as in :func:`majority_vote`. Sums are taken
    in float64, so the tie rule (first occurrence) is exact for float32 scores.
    """
    _check_answers(answer_ids)
    check_tensor("scores", scores, ndim=2, dtypes=_FLOAT_DTYPES)
    if scores.shape != answer_ids.shape:
        raise ValueError(f"scores has shape {tuple(scores.shape)}, answer_ids {tuple(answer_ids.shape)}; "
                         "they must match")
    check_same_device(answer_ids=answer_ids, scores=scores)
    return _vote(answer_ids, scores)


def topk_per_group(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best candidates of each row (group), for pruning beams.

    ``scores [B, N]`` float -> ``(values [B, k], index [B, k])``, sorted best first,
    ties by lower index, NaN ranked as ``-inf``. ``k <= N``.
    """
    check_tensor("scores", scores, ndim=2, dtypes=_FLOAT_DTYPES)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= scores.shape[1]:
        raise ValueError(f"k must be an int in [0, N={scores.shape[1]}], got {k!r}")
    s = _clean(scores)
    # Stable descending sort keeps equal scores in index order; O(N log N) per row on
    # tiny N (candidates, not vocabulary).
    values, index = torch.sort(s, dim=1, descending=True, stable=True)
    return values[:, :k].to(scores.dtype), index[:, :k]
