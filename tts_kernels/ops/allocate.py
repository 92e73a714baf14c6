"""Compute-optimal allocation of samples across prompts: ``allocate_budget`` and ``expected_coverage``.

Given per-prompt success probabilities ``p [P]`` (the chance that one sample of
prompt ``i`` is correct, e.g. estimated from a few probe samples or a PRM), a
best-of-N / coverage search that draws ``N_i`` independent samples of prompt
``i`` solves it with probability ``1 - (1 - p_i)^N_i``. ``allocate_budget``
chooses the integer counts that maximise the expected number of solved
prompts under a total sample budget; ``expected_coverage`` evaluates that
objective.

``allocate_budget`` is a host-side *planning* op, not a decode-loop op: it
reads the values of ``p`` (one copy to the CPU, which syncs with the device
when ``p`` lives on a GPU) and returns a small ``int64`` tensor on ``p``'s
device. ``expected_coverage`` is a plain device op with no host read.
"""
from __future__ import annotations

import struct
import sys

import torch

from ._validate import check_int, check_same_device, check_tensor

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

# Counts are handled as float64 inside the threshold search (floor of a
# quotient), so they must be integers that float64 represents exactly.
MAX_BUDGET = 2**53


# Order-preserving map between finite/infinite float64 values and integers, so
# the threshold search can bisect over *every* float64 exactly (<= 64 steps).
def _key(x: float) -> int:
    b = struct.unpack("<q", struct.pack("<d", x))[0]
    return b if b >= 0 else -(b & 0x7FFF_FFFF_FFFF_FFFF)


def _from_key(k: int) -> float:
    bits = k if k >= 0 else (-k) | (1 << 63)
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def _fill_in_order(room: torch.Tensor, amount: int) -> torch.Tensor:
    """Hand out ``amount`` units over the slots ``room [P]``, lower index first (the tie rule)."""
    before = torch.cumsum(room, 0) - room
    return (amount - before).clamp(min=0).minimum(room)


def allocate_budget(p: torch.Tensor, budget: int, *, n_min: int = 1, n_max: int | None = None,
                    spend_all: bool = False) -> torch.Tensor:
    r"""Sample counts ``N [P]`` (int64, on ``p``'s device) that maximise the expected coverage.

    Solves, over integers ``N_i``::

        maximise   sum_i 1 - (1 - p_i)^N_i
        subject to n_min <= N_i <= n_max   (no upper bound when n_max is None)
                   sum_i N_i <= budget

    Args:
        p: ``[P]`` floating tensor of per-sample success probabilities, each in ``[0, 1]``.
        budget: total number of samples available (int, ``0 <= budget <= 2**53``); must be at
            least ``P * n_min``.
        n_min: samples every prompt gets regardless of gain (int >= 0, default 1).
        n_max: most samples any prompt may get (int >= n_min), or None for no cap.
        spend_all: if False (default), samples whose marginal gain is exactly 0 are not drawn,
            so ``sum N_i`` can be below ``budget``; if True, leftover budget goes to those
            zero-gain samples too (lower prompt index first, up to ``n_max``).

    Returns:
        ``N [P]`` int64 with ``n_min <= N_i <= n_max`` and ``sum N_i <= budget``. The sum equals
        ``budget`` unless every prompt left below its cap has marginal gain 0 (a prompt with
        ``p_i = 0``, or ``p_i = 1`` after its first sample) and ``spend_all`` is False, or every
        prompt is at ``n_max``.

    Marginal gains and optimality (exchange argument).
        Write ``f_i(n) = 1 - (1 - p_i)^n``. The gain of prompt ``i``'s ``n``-th sample is
        ``g_i(n) = f_i(n) - f_i(n-1) = p_i (1 - p_i)^(n-1) >= 0``, which is non-increasing in
        ``n`` since ``0 <= 1 - p_i <= 1``: each ``f_i`` is concave, and the objective is
        separable. For ``p_i = 1`` the gains are ``1, 0, 0, ...``; for ``p_i = 0`` all are 0.

        Let ``R = budget - P * n_min`` and call ``(i, n)`` for ``n_min < n <= n_max`` a
        *candidate* sample with gain ``g_i(n)``. Any feasible ``N`` is determined by its set
        ``S(N) = {(i, n): n_min < n <= N_i}`` of at most ``R`` candidates, and
        ``objective(N) = sum_i f_i(n_min) + sum_{(i,n) in S(N)} g_i(n)``.

        Order all candidates by gain, descending, ties by prompt index ``i`` ascending, then by
        ``n`` ascending, and let ``T`` be the first ``R`` of them (all of them if fewer). Then:

        1. ``T`` is feasible: if ``(i, n)`` is in ``T`` and ``n_min < m < n`` then
           ``g_i(m) >= g_i(n)`` and, on equality, ``m < n`` puts ``(i, m)`` earlier in the order,
           so ``(i, m)`` is in ``T`` too. ``T`` therefore is a prefix ``n_min < n <= N_i`` of
           every prompt's candidates, i.e. ``T = S(N*)`` for counts ``N*`` within the bounds
           and with ``sum N*_i <= budget``.
        2. ``T`` is optimal: for any feasible ``N``, ``S(N)`` holds ``k <= R`` candidates, and
           ``k`` is at most the number of candidates. Exchange, one at a time, an element of
           ``S(N)`` outside ``T`` for an element of ``T`` outside ``S(N)`` (one exists while
           ``S(N)`` is not inside ``T``, as ``|T| >= k``): every element of ``T`` ranks at least
           as high as every element outside it, so no exchange lowers the sum. The result is a
           subset of ``T``, whose sum is at most that of ``T`` because gains are ``>= 0``. So
           ``objective(N) <= objective(N*)``.

        Dropping the zero-gain candidates from ``T`` (``spend_all=False``) leaves the sum, and
        the prefix property, unchanged.

    Ties.
        Equal marginal gains go to the lower prompt index first (and within a prompt to the
        earlier sample). So prompts with equal ``p`` share extra samples from the lowest index
        up, e.g. ``p = [0.5, 0.5, 0.5]``, ``budget = 4`` gives ``[2, 1, 1]``. Gains are compared
        as float64 log-gains ``log p_i + (n - 1) log(1 - p_i)``, which never underflow; two
        candidates whose exact gains differ by less than float64 rounding may be ordered
        either way, which moves the objective by at most that rounding.

    Algorithm and complexity.
        No loop over samples. For a log-gain level ``L``, the number of candidates of prompt
        ``i`` with log-gain ``>= L`` has the closed form
        ``clamp(floor((log p_i - L) / -log(1 - p_i)) + 1 - n_min, 0, cap)``, computed for all
        prompts at once; it is non-increasing in ``L`` even in floating point (each step is a
        monotone rounded operation). The ``R``-th largest level ``L*`` is found by bisection
        over the bit patterns of float64 (at most 64 steps, exact), every candidate above
        ``L*`` is taken, and the rest of the budget goes to the candidates at exactly ``L*``
        by the tie rule. Time ``O(64 P)``, memory ``O(P)``, independent of ``budget``.

    Raises:
        TypeError: ``p`` is not a floating tensor, or an integer argument is not an int.
        ValueError: ``p`` is not 1-D or has values outside ``[0, 1]`` (or NaN); ``budget``,
            ``n_min`` negative; ``n_max < n_min``; ``budget < P * n_min`` (the message says
            how many samples are needed); ``budget > 2**53``.
    """
    check_tensor("p", p, dtypes=_FLOAT_DTYPES)
    if p.dim() != 1:
        raise ValueError(f"p must be a 1-D tensor of per-prompt probabilities [P], got shape {tuple(p.shape)}")
    budget = check_int("budget", budget)
    n_min = check_int("n_min", n_min)
    if n_max is not None:
        n_max = check_int("n_max", n_max)
        if n_max < n_min:
            raise ValueError(f"n_max must be >= n_min, got n_max={n_max} < n_min={n_min}")
    if not isinstance(spend_all, bool):
        raise TypeError(f"spend_all must be a bool, got {type(spend_all).__name__}")
    if budget > MAX_BUDGET:
        raise ValueError(f"budget must be at most 2**53 = {MAX_BUDGET}, got {budget}")
    P = p.shape[0]
    needed = P * n_min
    if budget < needed:
        raise ValueError(f"budget={budget} is too small: {P} prompts with n_min={n_min} need at least "
                         f"P * n_min = {needed} samples")

    # The one host read of this op (documented: it is a planning op).
    q = p.detach().to(device="cpu", dtype=torch.float64)
    bad = torch.isnan(q) | (q < 0) | (q > 1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"p must hold probabilities in [0, 1], got p[{i}] = {q[i].item()}")

    counts = torch.full((P,), n_min, dtype=torch.int64)
    R = budget - needed
    cap = R if n_max is None else min(n_max - n_min, R)  # no prompt can use more than R extra samples
    if P == 0 or R == 0 or cap == 0:
        return counts.to(p.device)

    inner = (q > 0) & (q < 1)
    log_p = torch.where(inner, torch.log(q), 0.0)
    # -log(1-p) >= p > 0; the maximum guards subnormal p, where log1p(-p) can come back as 0.
    neg_log_1mp = torch.where(inner, torch.maximum(-torch.log1p(-q), q), 1.0)
    # p = 1: gain 1 for the first sample (log-gain 0) and 0 after, so a candidate only if n_min = 0.
    first_is_sure = ((q == 1) & (n_min == 0)).to(torch.int64)
    cap_f = float(cap)

    def count_ge(level: float) -> torch.Tensor:
        """Per prompt: how many candidates have log-gain >= level (non-increasing in level)."""
        x = torch.floor((log_p - level) / neg_log_1mp) + (1 - n_min)
        m = torch.where(inner, x.clamp(0.0, cap_f), 0.0).to(torch.int64)
        return m + first_is_sure * int(level <= 0.0)

    lo, hi = _key(-sys.float_info.max), _key(float("inf"))
    positive = count_ge(_from_key(lo))  # every candidate with a positive gain
    total = int(positive.sum())
    if total <= R:
        counts += positive
        if spend_all:
            limit = n_min + R if n_max is None else n_max
            counts += _fill_in_order(limit - counts, R - total)
        return counts.to(p.device)

    # Invariant: count(lo) >= R > count(hi). Ends with hi = lo + 1: lo is the R-th largest
    # log-gain L*, and hi is the next float above it.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if int(count_ge(_from_key(mid)).sum()) >= R:
            lo = mid
        else:
            hi = mid
    above = count_ge(_from_key(hi))  # log-gain > L*
    at = count_ge(_from_key(lo)) - above  # log-gain == L*
    counts += above + _fill_in_order(at, R - int(above.sum()))
    return counts.to(p.device)


def expected_coverage(p: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """``sum_i 1 - (1 - p_i)^N_i``: expected number of prompts solved by ``N_i`` samples each.

    ``p [P]`` floating probabilities in ``[0, 1]``, ``N [P]`` integer counts ``>= 0``, same
    device. Returns a 0-dim float64 tensor on that device. Computed as
    ``-expm1(N_i * log1p(-p_i))`` (accurate for tiny ``p_i``), with ``p_i = 1`` giving
    ``1`` when ``N_i > 0`` and ``0`` when ``N_i = 0``. A device op: the values are not checked
    (that would need a host read).
    """
    check_tensor("p", p, ndim=1, dtypes=_FLOAT_DTYPES)
    check_tensor("N", N, ndim=1, dtypes=_INT_DTYPES)
    if N.shape != p.shape:
        raise ValueError(f"N must have the shape of p {tuple(p.shape)}, got {tuple(N.shape)}")
    check_same_device(p=p, N=N)
    q = p.to(torch.float64)
    n = N.to(torch.float64)
    sure = q >= 1
    per_prompt = torch.where(sure, (n > 0).to(torch.float64),
                             -torch.expm1(n * torch.log1p(-torch.where(sure, 0.0, q))))
    return per_prompt.sum()
