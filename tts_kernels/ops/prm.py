"""``prm_score``: score new reasoning steps with a PRM head and fold them into running aggregates.

A process reward model (PRM) scores every step of a candidate. The three
families in use all reduce to a small linear head applied at step-end
positions, followed by a 2-way softmax or a sigmoid:

1. label-token PRMs (Math-Shepherd, RLHFlow): the LM head's rows of the
   "good" and "bad" label tokens, at the step tag: ``p = softmax([z_good, z_bad])[0]``;
   :func:`label_token_head` slices those two rows so the full-vocabulary logits
   are never computed;
2. two-class token classification (Qwen2.5-Math-PRM): ``W [2, F]`` at the step
   separators, ``p = softmax(z)[1]``;
3. value heads (Skywork): ``w [1, F] (+ b)``, ``p = sigmoid(z)``.

With a 2-row head, ``softmax(z)[pos] = sigmoid(z[pos] - z[1 - pos])``, which is
what is computed (one fewer exp, no overflow).

Meaning (shapes: ``n`` candidates, ``T`` new positions, ``F`` features, ``S``
step slots)::

    h[i, s]     = x[i, positions[i, s]]                       (positions[i, s] >= 0)
    z[i, s]     = h[i, s] @ weight.T + bias                    [C] with C in {1, 2}
    p[i, s]     = sigmoid(z[..., 0]) if C == 1 else sigmoid(z[pos] - z[1 - pos])
    step_scores = p where positions >= 0, else NaN             [n, S]
    aggregate   = fold of the valid p[i, :] (in order) into agg[i]:
                  last: the last one; min: running min; prod: running product;
                  mean: (agg * count + sum p) / (count + k)
    count       = count + k   (k = valid steps of row i)

Rows with no valid step keep their aggregate and count. The start of a fold is
``agg = init_aggregate(agg)``: 1 for prod, +inf for min, 0 for mean, NaN for last
(no score yet). Everything is a handful of batched tensor ops with fixed shapes:
no host read, so a search loop calls it every step without a sync. ``x`` may be
hidden states (then ``weight`` is the head) or already logits over two labels /
classes (then pass ``weight=None`` and ``x [n, T, C]``).
"""
from __future__ import annotations

import torch

from ._validate import check_same_device, check_tensor

AGGREGATES = ("last", "min", "prod", "mean")


def init_aggregate(n: int, agg: str, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting ``(aggregate [n] float32, count [n] int64)`` for ``agg``."""
    _check_agg(agg)
    start = {"last": float("nan"), "min": float("inf"), "prod": 1.0, "mean": 0.0}[agg]
    return torch.full((n,), start, device=device), torch.zeros(n, dtype=torch.int64, device=device)


def label_token_head(lm_head_weight: torch.Tensor, good_token_id: int, bad_token_id: int) -> torch.Tensor:
    """The ``[2, F]`` head of a label-token PRM: LM-head rows of (bad, good), so the positive class is 1."""
    check_tensor("lm_head_weight", lm_head_weight, ndim=2)
    V = lm_head_weight.shape[0]
    for name, t in (("good_token_id", good_token_id), ("bad_token_id", bad_token_id)):
        if not isinstance(t, int) or not 0 <= t < V:
            raise ValueError(f"{name} must be a token id in [0, {V}), got {t!r}")
    return lm_head_weight[[bad_token_id, good_token_id]]


def _check_agg(agg) -> None:
    if agg not in AGGREGATES:
        raise ValueError(f"agg must be one of {AGGREGATES}, got {agg!r}")


def prm_score(x: torch.Tensor, positions: torch.Tensor, weight: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, *, aggregate: torch.Tensor, count: torch.Tensor,
              agg: str = "last", positive_class: int = 1):
    """Score step-end rows of ``x`` and fold them into the running aggregate.

    Args:
        x: ``[n, T, F]`` hidden states (or ``[n, T, C]`` head outputs when ``weight`` is None).
        positions: ``[n, S]`` int64 indices into ``T`` of the step ends, ``-1`` for none.
        weight: ``[C, F]`` head, ``C`` 1 (sigmoid) or 2 (softmax, class ``positive_class``).
        bias: optional ``[C]``.
        aggregate, count: running state ``[n]`` (see :func:`init_aggregate`).
        agg: ``"last"``, ``"min"``, ``"prod"`` or ``"mean"``.

    Returns ``(step_scores [n, S] float32, aggregate [n], count [n])`` (new tensors).
    """
    _check_agg(agg)
    check_tensor("x", x, ndim=3)
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be floating point, got {x.dtype}")
    check_tensor("positions", positions, ndim=2, dtypes=(torch.int64, torch.int32))
    n = x.shape[0]
    if positions.shape[0] != n:
        raise ValueError(f"positions has {positions.shape[0]} rows, x has {n}")
    if weight is not None:
        check_tensor("weight", weight, ndim=2)
        if weight.shape[1] != x.shape[2]:
            raise ValueError(f"weight has {weight.shape[1]} features, x has {x.shape[2]}")
        C = weight.shape[0]
    else:
        C = x.shape[2]
    if C not in (1, 2):
        raise ValueError(f"the head must have 1 (sigmoid) or 2 (softmax) outputs, got {C}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != C:
            raise ValueError(f"bias has {bias.shape[0]} entries, the head {C}")
    if positive_class not in (0, 1):
        raise ValueError(f"positive_class must be 0 or 1, got {positive_class!r}")
    for name, t, dt in (("aggregate", aggregate, (torch.float32,)), ("count", count, (torch.int64,))):
        check_tensor(name, t, ndim=1, dtypes=dt)
        if t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} entries, x has {n} rows")
    check_same_device(x=x, positions=positions, aggregate=aggregate, count=count,
                      **({"weight": weight} if weight is not None else {}))

    T = x.shape[1]
    valid = (positions >= 0) & (positions < T)
    idx = torch.where(valid, positions, 0).to(torch.int64)
    rows = x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[2]))  # [n, S, F]: only the step ends
    if weight is not None:
        z = rows.float() @ weight.float().T  # [n, S, C]
    else:
        z = rows.float()
    if bias is not None:
        z = z + bias.float()
    if C == 1:
        p = torch.sigmoid(z[..., 0])
    else:
        p = torch.sigmoid(z[..., positive_class] - z[..., 1 - positive_class])
    step_scores = torch.where(valid, p, float("nan"))

    k = valid.sum(1)
    has = k > 0
    if agg == "last":
        last_pos = torch.where(valid, torch.arange(valid.shape[1], device=x.device), -1).max(1).values
        last = p.gather(1, last_pos.clamp(min=0)[:, None]).squeeze(1)
        new = torch.where(has, last, aggregate)
    elif agg == "min":
        new = torch.minimum(aggregate, torch.where(valid, p, float("inf")).min(1).values) if p.shape[1] else aggregate
    elif agg == "prod":
        new = aggregate * torch.where(valid, p, 1.0).prod(1)
    else:  # mean
        total = aggregate.double() * count + torch.where(valid, p, 0.0).double().sum(1)
        new = torch.where(has, (total / (count + k).clamp(min=1)).float(), aggregate)
    return step_scores, new.float(), count + k
