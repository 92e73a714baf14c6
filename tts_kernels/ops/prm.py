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

A fourth kind of verifier needs no head: a causal LM's own likelihood of the text
(:func:`prefix_likelihood`, running min / sum / count of token log-probabilities per
row); its step scores fold with the same :func:`fold_step_scores` as the heads'.
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

    new, count = fold_step_scores(p, valid, aggregate, count, agg)
    return step_scores, new, count


def fold_step_scores(p: torch.Tensor, valid: torch.Tensor, aggregate: torch.Tensor, count: torch.Tensor,
                     agg: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the valid step scores ``p [n, S]`` (in order) into ``(aggregate, count)``."""
    k = valid.sum(1)
    has = k > 0
    if agg == "last":
        last_pos = torch.where(valid, torch.arange(valid.shape[1], device=p.device), -1).max(1).values
        last = p.gather(1, last_pos.clamp(min=0)[:, None]).squeeze(1)
        new = torch.where(has, last, aggregate)
    elif agg == "min":
        new = torch.minimum(aggregate, torch.where(valid, p, float("inf")).min(1).values) if p.shape[1] else aggregate
    elif agg == "prod":
        new = aggregate * torch.where(valid, p, 1.0).prod(1)
    else:  # mean
        total = aggregate.double() * count + torch.where(valid, p, 0.0).double().sum(1)
        new = torch.where(has, (total / (count + k).clamp(min=1)).float(), aggregate)
    return new.float(), count + k


LIKELIHOOD_REDUCES = ("min", "mean", "sum")


def init_likelihood_state(n: int, *, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Starting ``(run_min [n] float32 = +inf, run_sum [n] float32 = 0, run_count [n] int64 = 0)`` of
    :func:`prefix_likelihood`: no token seen yet."""
    return (torch.full((n,), float("inf"), device=device), torch.zeros(n, device=device),
            torch.zeros(n, dtype=torch.int64, device=device))


def prefix_likelihood(token_logp: torch.Tensor, positions: torch.Tensor, state, *, reduce: str = "min"):
    """Step scores of a likelihood verifier: how likely a causal LM finds each candidate's text so far.

    A step ending at new position ``e`` scores ``exp(f(l))`` where ``l`` are the log-probabilities
    of every token the row has had (earlier calls, carried in ``state``, and this call's up to
    ``e``) and ``f`` is ``reduce``: ``"min"`` (the least likely token), ``"mean"`` (the geometric
    mean token probability) or ``"sum"`` (the probability of the whole prefix). So a step's score
    covers its whole prefix, as a Math-Shepherd label does (a step is good iff it and all before
    it are): fold with ``agg="last"``.

    Args:
        token_logp: ``[n, T]`` log-probability of each new token; NaN where a row has no token
            (padding).
        positions: ``[n, S]`` int64/int32 step-end indices into ``T``, increasing along a row;
            ``-1`` (or out of range) for none.
        state: ``(run_min, run_sum, run_count)`` from :func:`init_likelihood_state` or the
            previous call.
        reduce: ``"min"``, ``"mean"`` or ``"sum"``.

    Returns ``(step_scores [n, S] float32, NaN where no step, new state)``: a handful of batched
    tensor ops, no host read.
    """
    if reduce not in LIKELIHOOD_REDUCES:
        raise ValueError(f"reduce must be one of {LIKELIHOOD_REDUCES}, got {reduce!r}")
    check_tensor("token_logp", token_logp, ndim=2)
    if not token_logp.dtype.is_floating_point:
        raise TypeError(f"token_logp must be floating point, got {token_logp.dtype}")
    check_tensor("positions", positions, ndim=2, dtypes=(torch.int64, torch.int32))
    n, T = token_logp.shape
    if positions.shape[0] != n:
        raise ValueError(f"positions has {positions.shape[0]} rows, token_logp has {n}")
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        raise ValueError("state must be (run_min, run_sum, run_count) from init_likelihood_state")
    run_min, run_sum, run_count = state
    for name, t, dt in (("run_min", run_min, (torch.float32,)), ("run_sum", run_sum, (torch.float32,)),
                        ("run_count", run_count, (torch.int64,))):
        check_tensor(name, t, ndim=1, dtypes=dt)
        if t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} entries, token_logp has {n} rows")
    check_same_device(token_logp=token_logp, positions=positions, run_min=run_min, run_sum=run_sum,
                      run_count=run_count)

    lp = token_logp.float()
    has_tok = ~torch.isnan(lp)
    if T:
        cmin = torch.minimum(torch.where(has_tok, lp, float("inf")).cummin(1).values, run_min[:, None])
        csum = run_sum[:, None] + torch.where(has_tok, lp, 0.0).cumsum(1)
        ccnt = run_count[:, None] + has_tok.long().cumsum(1)
    else:
        cmin = run_min[:, None].expand(n, 1)
        csum, ccnt = run_sum[:, None].expand(n, 1), run_count[:, None].expand(n, 1)
    valid = (positions >= 0) & (positions < T)
    idx = torch.where(valid, positions, 0).to(torch.int64)
    if reduce == "min":
        f = cmin.gather(1, idx)
    elif reduce == "sum":
        f = csum.gather(1, idx)
    else:
        f = csum.gather(1, idx) / ccnt.gather(1, idx).clamp(min=1)
    step_scores = torch.where(valid, f.clamp(max=0.0).exp(), float("nan"))  # no token yet: 1
    return step_scores, (cmin[:, -1].contiguous(), csum[:, -1].contiguous(), ccnt[:, -1].contiguous())
