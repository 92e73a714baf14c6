"""allocate_budget / expected_coverage: brute force over all allocations, optimality conditions, bad input."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tts_kernels import allocate_budget, expected_coverage

# Values that make the interesting cases: 0 and 1 (zero gains), exact cross-prompt ties
# (0.5 and 0.25: g(0.5, n=2) = 0.25 = g(0.25, n=1)), and tiny/near-one probabilities.
SPECIAL = [0.0, 1.0, 0.5, 0.25, 0.75, 1e-9, 1 - 1e-9]


def coverage(p, N) -> float:
    return sum(1.0 - (1.0 - pi) ** ni for pi, ni in zip(p, N, strict=True))


def brute_force(p, budget, n_min, n_max):
    """Best objective over every integer allocation within the bounds."""
    R = budget - len(p) * n_min
    top = R if n_max is None else min(R, n_max - n_min)
    best = -1.0
    for extra in itertools.product(range(top + 1), repeat=len(p)):
        if sum(extra) <= R:
            best = max(best, coverage(p, [n_min + e for e in extra]))
    return best


def log_gain(pi: float, n: int) -> float:
    """log of the n-th sample's marginal gain p (1-p)^(n-1); -inf for a zero gain."""
    if pi == 0.0 or (pi == 1.0 and n > 1):
        return -math.inf
    if pi == 1.0:
        return 0.0
    return math.log(pi) + (n - 1) * math.log1p(-pi)


def check_constraints(N, p, budget, n_min, n_max):
    assert N.dtype == torch.int64 and N.shape == p.shape and N.device == p.device
    assert int(N.min()) >= n_min if N.numel() else True
    if n_max is not None and N.numel():
        assert int(N.max()) <= n_max
    assert int(N.sum()) <= budget


def check_optimality_conditions(N, p, budget, n_min, n_max, spend_all=False):
    """For a separable concave objective, N is optimal iff no sample can be moved to a better
    place: every gain taken above n_min is >= every gain not taken, and budget is left only
    when no positive gain is left (or every prompt is at n_max). Compared in log space, with a
    relative tolerance for float64 rounding of the log-gains."""
    pl, Nl = p.tolist(), N.tolist()
    taken = [log_gain(pi, ni) for pi, ni in zip(pl, Nl, strict=True) if ni > n_min]
    nexts = [log_gain(pi, ni + 1) for pi, ni in zip(pl, Nl, strict=True) if n_max is None or ni < n_max]
    if taken and nexts and max(nexts) > -math.inf:
        lo, hi = min(taken), max(nexts)
        assert lo >= hi - 1e-12 * max(1.0, abs(hi)), (lo, hi)
    if sum(Nl) < budget:
        assert all(g == -math.inf for g in nexts)  # only zero gains left, or every prompt at n_max
        if spend_all:
            assert not Nl or (n_max is not None and all(ni == n_max for ni in Nl))


def random_p(rng: random.Random, P: int) -> list[float]:
    out = []
    for _ in range(P):
        r = rng.random()
        out.append(rng.choice(SPECIAL) if r < 0.4 else (out[-1] if out and r < 0.55 else rng.random()))
    return out


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("n_max_above", [None, 0, 1, 3])
def test_matches_brute_force(P, n_max_above):
    rng = random.Random(1000 * P + (n_max_above or 99))
    for R in range(0, 13):
        for _ in range(4):
            p = random_p(rng, P)
            n_min = rng.choice([0, 1, 2])
            n_max = None if n_max_above is None else n_min + n_max_above
            budget = P * n_min + R
            pt = torch.tensor(p, dtype=torch.float64)
            N = allocate_budget(pt, budget, n_min=n_min, n_max=n_max)
            check_constraints(N, pt, budget, n_min, n_max)
            assert abs(coverage(p, N.tolist()) - brute_force(p, budget, n_min, n_max)) <= 1e-12, (p, budget, N)
            assert abs(float(expected_coverage(pt, N)) - coverage(p, N.tolist())) <= 1e-12
            # spend_all changes only where zero-gain samples go, never the objective.
            N_all = allocate_budget(pt, budget, n_min=n_min, n_max=n_max, spend_all=True)
            check_constraints(N_all, pt, budget, n_min, n_max)
            assert abs(coverage(p, N_all.tolist()) - coverage(p, N.tolist())) <= 1e-12
            cap_total = math.inf if n_max is None else P * n_max
            assert int(N_all.sum()) == min(budget, cap_total)


def test_ties_go_to_lower_index():
    half = torch.full((3,), 0.5, dtype=torch.float64)
    assert allocate_budget(half, 4).tolist() == [2, 1, 1]
    assert allocate_budget(half, 5).tolist() == [2, 2, 1]
    assert allocate_budget(half, 6).tolist() == [2, 2, 2]
    assert allocate_budget(half, 7).tolist() == [3, 2, 2]
    mixed = torch.tensor([0.3, 0.6, 0.3, 0.6], dtype=torch.float64)
    # gains: 0.6 -> .6 .24 .096 ...; 0.3 -> .3 .21 .147 ...; with n_min=0 the order is
    # .6(1) .6(3) .3(0) .3(2) .24(1) .24(3) .21(0) .21(2) ...
    assert allocate_budget(mixed, 1, n_min=0).tolist() == [0, 1, 0, 0]
    assert allocate_budget(mixed, 3, n_min=0).tolist() == [1, 1, 0, 1]
    assert allocate_budget(mixed, 5, n_min=0).tolist() == [1, 2, 1, 1]
    assert allocate_budget(mixed, 8, n_min=0).tolist() == [2, 2, 2, 2]
    # The same on a permutation: ties follow the index, not the value order.
    assert allocate_budget(mixed.flip(0), 5, n_min=0).tolist() == [2, 1, 1, 1]


def test_zero_and_one():
    p = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    # p = 1 gains nothing after its first sample, p = 0 nothing at all.
    assert allocate_budget(p, 10).tolist() == [1, 1, 8]
    assert allocate_budget(p, 10, n_min=0).tolist() == [0, 1, 9]
    # With a cap the positive gains run out: budget is left unspent ...
    assert allocate_budget(p, 10, n_max=3).tolist() == [1, 1, 3]
    # ... unless spend_all, which hands zero-gain samples out lower index first.
    assert allocate_budget(p, 10, n_max=3, spend_all=True).tolist() == [3, 3, 3]
    assert allocate_budget(p, 8, n_max=3, spend_all=True).tolist() == [3, 2, 3]
    only_zero = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert allocate_budget(only_zero, 9).tolist() == [1, 1]
    assert allocate_budget(only_zero, 9, spend_all=True).tolist() == [8, 1]
    assert allocate_budget(only_zero, 9, n_min=0).tolist() == [1, 0]


def test_trivial_shapes_and_budgets():
    assert allocate_budget(torch.empty(0, dtype=torch.float64), 0).tolist() == []
    assert allocate_budget(torch.empty(0, dtype=torch.float64), 5).tolist() == []
    p = torch.tensor([0.2, 0.9])
    assert allocate_budget(p, 2).tolist() == [1, 1]  # budget == P * n_min
    assert allocate_budget(p, 0, n_min=0).tolist() == [0, 0]
    assert allocate_budget(p, 7, n_min=2, n_max=2).tolist() == [2, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    p = torch.tensor([0.1, 0.5, 0.9], dtype=dtype)
    N = allocate_budget(p, 12)
    check_constraints(N, p, 12, 1, None)
    assert int(N.sum()) == 12
    check_optimality_conditions(N, p.double(), 12, 1, None)


def test_underflow_and_tiny_probabilities():
    # (1-p)^N underflows in linear space long before these counts; log gains do not.
    p = torch.tensor([0.0, 1.0, 0.3, 1e-300, 0.999999, 5e-324], dtype=torch.float64)
    N = allocate_budget(p, 10**6)
    check_constraints(N, p, 10**6, 1, None)
    assert int(N.sum()) == 10**6
    check_optimality_conditions(N, p, 10**6, 1, None)
    assert N.tolist()[:2] == [1, 1]
    # 1e-300 outranks 5e-324 for every sample; 0.3 stops once its gain falls below 1e-300.
    assert N[5] == 1 and N[3] > 900_000
    assert N[2] == math.floor((math.log(0.3) - math.log(1e-300)) / -math.log1p(-0.3)) + 1  # = 1934


@pytest.mark.parametrize("n_max", [None, 700, 5000])
def test_large_budget(n_max):
    # P = 1000, budget 10**6: the threshold search is O(64 P), independent of the budget.
    g = torch.Generator().manual_seed(3)
    p = torch.rand(1000, generator=g, dtype=torch.float64) ** 3
    p[::97] = 0.0
    p[5::89] = 1.0
    N = allocate_budget(p, 10**6, n_max=n_max)
    check_constraints(N, p, 10**6, 1, n_max)
    check_optimality_conditions(N, p, 10**6, 1, n_max)
    if n_max is None:
        assert int(N.sum()) == 10**6


@settings(max_examples=200, deadline=None)
@given(
    p=st.lists(st.one_of(st.sampled_from(SPECIAL), st.floats(0.0, 1.0)), min_size=0, max_size=12),
    extra=st.integers(0, 10**7),
    n_min=st.integers(0, 3),
    n_max_above=st.one_of(st.none(), st.integers(0, 50)),
    spend_all=st.booleans(),
)
def test_property_optimality_conditions(p, extra, n_min, n_max_above, spend_all):
    pt = torch.tensor(p, dtype=torch.float64)
    n_max = None if n_max_above is None else n_min + n_max_above
    budget = len(p) * n_min + extra
    N = allocate_budget(pt, budget, n_min=n_min, n_max=n_max, spend_all=spend_all)
    check_constraints(N, pt, budget, n_min, n_max)
    check_optimality_conditions(N, pt, budget, n_min, n_max, spend_all)
    # Deterministic, and monotone in the budget for a fixed instance.
    assert torch.equal(N, allocate_budget(pt, budget, n_min=n_min, n_max=n_max, spend_all=spend_all))
    if extra:
        fewer = allocate_budget(pt, budget - 1, n_min=n_min, n_max=n_max, spend_all=spend_all)
        assert bool((fewer <= N).all())


def test_expected_coverage():
    p = torch.tensor([0.0, 1.0, 1.0, 0.5, 1e-12], dtype=torch.float64)
    N = torch.tensor([5, 0, 3, 2, 10], dtype=torch.int32)
    got = expected_coverage(p, N)
    assert got.dtype == torch.float64 and got.dim() == 0
    # tiny p: 1 - (1 - 1e-12)^10 ~= 1e-11, kept to full precision by expm1/log1p.
    assert abs(float(got) - (0 + 0 + 1 + 0.75 + 1e-11)) <= 1e-15
    assert float(expected_coverage(p[:0], N[:0])) == 0.0


def test_bad_input():
    p = torch.tensor([0.2, 0.5])
    with pytest.raises(TypeError, match="p must be a torch.Tensor"):
        allocate_budget([0.2, 0.5], 4)
    with pytest.raises(TypeError, match="p must have dtype"):
        allocate_budget(torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="p must be a 1-D"):
        allocate_budget(p[None], 4)
    with pytest.raises(ValueError, match=r"p\[1\] = 1.5"):
        allocate_budget(torch.tensor([0.2, 1.5]), 4)
    with pytest.raises(ValueError, match=r"p\[0\] = -0.1"):
        allocate_budget(torch.tensor([-0.1, 0.5]), 4)
    with pytest.raises(ValueError, match=r"p\[0\] = nan"):
        allocate_budget(torch.tensor([float("nan"), 0.5]), 4)
    with pytest.raises(ValueError, match=r"budget=3 is too small: 2 prompts with n_min=2 need at least P \* n_min = 4"):
        allocate_budget(p, 3, n_min=2)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        allocate_budget(p, -1)
    with pytest.raises(TypeError, match="budget must be an int, got float"):
        allocate_budget(p, 4.0)
    with pytest.raises(TypeError, match="budget must be an int, got bool"):
        allocate_budget(p, True)
    with pytest.raises(ValueError, match="budget must be at most 2\\*\\*53"):
        allocate_budget(p, 2**53 + 1)
    with pytest.raises(ValueError, match="n_min must be >= 0"):
        allocate_budget(p, 4, n_min=-1)
    with pytest.raises(TypeError, match="n_max must be an int"):
        allocate_budget(p, 4, n_max=2.5)
    with pytest.raises(ValueError, match="n_max must be >= n_min, got n_max=1 < n_min=2"):
        allocate_budget(p, 4, n_min=2, n_max=1)
    with pytest.raises(TypeError, match="spend_all must be a bool"):
        allocate_budget(p, 4, spend_all=1)
    with pytest.raises(TypeError, match="N must have dtype"):
        expected_coverage(p, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="N must have the shape of p"):
        expected_coverage(p, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="p must have dtype"):
        expected_coverage(torch.tensor([1, 2]), torch.tensor([1, 2]))
