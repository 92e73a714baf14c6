"""Particle resampling ops (ops/resample.py) against the plain-loop references and hand-computed values."""
import math

import pytest
import torch

from tts_kernels.ops.resample import (entropic_temperature, ess, normalized_entropy, normalized_weights, resample,
                                      uniforms)
from tts_kernels.reference import ess_ref, normalized_entropy_ref, resample_ref


def random_log_weights(P, N, seed, dead=0.1):
    g = torch.Generator().manual_seed(seed)
    lw = torch.randn(P, N, generator=g, dtype=torch.float64) * 3
    lw[torch.rand(P, N, generator=g) < dead] = float("-inf")
    return lw


@pytest.mark.parametrize("P,N,seed", [(1, 1, 0), (3, 7, 1), (5, 64, 2), (2, 3, 3)])
def test_ess_and_entropy_against_the_reference(P, N, seed):
    lw = random_log_weights(P, N, seed)
    lw[0] = float("-inf")  # a row that can draw nothing reads as uniform
    for t in (1.0, 0.5, 4.0):
        torch.testing.assert_close(ess(lw, t), ess_ref(lw, t))
        torch.testing.assert_close(normalized_entropy(lw, t), normalized_entropy_ref(lw, t))
    assert torch.allclose(ess(lw[:1]), torch.tensor([float(N)], dtype=torch.float64))


def test_hand_computed_values():
    lw = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64))
    torch.testing.assert_close(ess(lw), torch.tensor([1 / (0.25 + 2 * 0.0625), 1.0, 3.0], dtype=torch.float64))
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(3)
    torch.testing.assert_close(normalized_entropy(lw), torch.tensor([h, 0.0, 1.0], dtype=torch.float64))
    # Temperature 2 on weights (0.75, 0.25): (sqrt 3, 1) / (sqrt 3 + 1).
    w = normalized_weights(torch.log(torch.tensor([[0.75, 0.25]], dtype=torch.float64)), 2.0)
    torch.testing.assert_close(w, torch.tensor([[math.sqrt(3), 1.0]], dtype=torch.float64) / (math.sqrt(3) + 1))


def test_entropic_temperature_is_the_smallest_that_reaches_the_target():
    lw = torch.tensor([[math.log(3), 0.0], [0.0, 0.0], [20.0, 0.0]], dtype=torch.float64)
    target = 0.9
    T = entropic_temperature(lw, target)
    assert T[1] == 1.0  # already uniform
    for i in (0, 2):
        assert normalized_entropy(lw[i:i + 1], T[i]) >= target
        assert normalized_entropy(lw[i:i + 1], T[i] * (1 - 1e-6)) < target
    # By hand for row 0: H(p) / log 2 = 0.9 with p = 3^(1/T) / (3^(1/T) + 1).
    lo, hi = 1.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        p = 3 ** (1 / mid) / (3 ** (1 / mid) + 1)
        h = -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)
        lo, hi = (lo, mid) if h >= target else (mid, hi)
    assert math.isclose(T[0].item(), hi, rel_tol=1e-6)
    with pytest.raises(ValueError, match="target"):
        entropic_temperature(lw, 1.5)


@pytest.mark.parametrize("method", ["systematic", "multinomial"])
@pytest.mark.parametrize("P,N,seed", [(1, 1, 0), (4, 5, 1), (3, 33, 2), (8, 16, 3)])
def test_resample_against_the_reference(method, P, N, seed):
    lw = random_log_weights(P, N, seed)
    idx = resample(lw, method=method, seed=seed, offset=7)
    u = uniforms(seed, 7, P, 1 if method == "systematic" else N)
    pos = (u + torch.arange(N)) / N if method == "systematic" else u.sort(1).values
    assert torch.equal(idx, resample_ref(lw, pos))
    assert idx.shape == (P, N) and idx.dtype == torch.int64
    assert not torch.isinf(lw.gather(1, idx)).any() or torch.isinf(lw).all(1).any()  # dead slots never drawn


@pytest.mark.parametrize("method", ["systematic", "multinomial"])
@pytest.mark.parametrize("K", [0, 1, 4, 11])
def test_fewer_or_more_draws_than_slots(method, K):
    # Particle Gibbs draws N - R free particles from N slots.
    lw = random_log_weights(3, 7, K)
    idx = resample(lw, method=method, seed=2, offset=5, num_samples=K)
    u = uniforms(2, 5, 3, 1 if method == "systematic" else K)
    pos = (u + torch.arange(K)) / max(K, 1) if method == "systematic" else u.sort(1).values
    assert idx.shape == (3, K) and torch.equal(idx, resample_ref(lw, pos).reshape(3, K))


def test_systematic_draws_each_slot_floor_or_ceil_of_n_w_times():
    for seed in range(20):
        lw = random_log_weights(6, 13, seed, dead=0.3)
        w = normalized_weights(lw)
        idx = resample(lw, method="systematic", seed=seed, offset=seed)
        counts = torch.zeros_like(w).scatter_add_(1, idx, torch.ones_like(idx, dtype=w.dtype))
        n_w = 13 * w
        assert ((counts >= torch.floor(n_w - 1e-9)) & (counts <= torch.ceil(n_w + 1e-9))).all()


def test_multinomial_passes_a_chi_square_test():
    w = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    P = 4000
    idx = resample(torch.log(w).expand(P, 5), method="multinomial", seed=11, offset=3)
    counts = torch.bincount(idx.flatten(), minlength=5).double()
    expected = w * idx.numel()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47  # 4 degrees of freedom, p = 0.001


def test_reproducible_from_seed_and_offset():
    lw = random_log_weights(4, 9, 5)
    a = resample(lw, method="multinomial", seed=1, offset=2)
    assert torch.equal(a, resample(lw, method="multinomial", seed=1, offset=2))
    assert not torch.equal(a, resample(lw, method="multinomial", seed=1, offset=3))


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        resample(torch.zeros(2, 3), method="stratified")
    with pytest.raises(ValueError, match="num_samples must be"):
        resample(torch.zeros(2, 3), num_samples=-1)
    with pytest.raises(ValueError, match="log_weights must have 2 dimensions"):
        ess(torch.zeros(3))
    with pytest.raises(TypeError, match="log_weights must have dtype"):
        ess(torch.zeros(2, 3, dtype=torch.int64))


def test_benchmark_runs_and_agrees_on_its_peer_semantics():
    import random

    from tts_kernels.bench.resample import python_resample, run

    lw = random_log_weights(5, 9, 6, dead=0.0)
    # The peer's systematic loop draws each slot floor or ceil of N w times, as ours does.
    n_w = 9 * normalized_weights(lw)
    for row, nw in zip(python_resample(lw, "systematic", random.Random(1)), n_w):
        counts = torch.bincount(torch.tensor(row), minlength=9).double()
        assert ((counts >= torch.floor(nw - 1e-9)) & (counts <= torch.ceil(nw + 1e-9))).all()
    rows = run(shapes=[(4, 8)], rounds=1, iters=2)
    assert [r["op"] for r in rows] == ["resample[systematic]", "resample[multinomial]"]
    assert all(r["peer_ms"] > 0 and r["ours_ms"] > 0 and r["gbs"] > 0 for r in rows)
