"""prm_score: the three PRM head families, the aggregates, incremental folding, bad input."""
import pytest
import torch

from tts_kernels.ops.prm import (AGGREGATES, LIKELIHOOD_REDUCES, init_aggregate, init_likelihood_state,
                                 label_token_head, prefix_likelihood, prm_score)
from tts_kernels.reference import prefix_likelihood_ref, prm_score_ref

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # head dot products over F=48


def case(n=5, T=9, F=48, S=4, dtype=torch.float32):
    x = torch.randn(n, T, F).to(dtype)
    pos = torch.randint(-1, T, (n, S))
    pos[0] = -1  # a row with no step this time
    pos[1, -1] = T + 3  # out of range counts as none
    return x, pos


@pytest.mark.parametrize("agg", AGGREGATES)
@pytest.mark.parametrize("C,bias", [(1, True), (2, False), (2, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(agg, C, bias, dtype):
    x, pos = case(dtype=dtype)
    w = torch.randn(C, x.shape[2]).to(dtype) / 7
    b = torch.randn(C) if bias else None
    a0, c0 = init_aggregate(x.shape[0], agg)
    a0[2:] = torch.rand(3)  # rows that already had steps
    c0[2:] = torch.tensor([1, 3, 2])
    got = prm_score(x, pos, w, b, aggregate=a0, count=c0, agg=agg)
    want = prm_score_ref(x.float(), pos, w.float(), b, aggregate=a0, count=c0, agg=agg)
    tol = TOL[dtype]
    torch.testing.assert_close(got[0], want[0], atol=tol, rtol=tol, equal_nan=True)
    torch.testing.assert_close(got[1], want[1], atol=tol, rtol=tol, equal_nan=True)
    assert torch.equal(got[2], want[2])


def test_label_token_prm_equals_softmax_over_full_logits():
    # What people do today: full-vocabulary logits, then softmax over [good, bad] at the step tag.
    V, F = 500, 32
    lm_head = torch.randn(V, F)
    good, bad = 17, 311
    x, pos = case(F=F)
    a0, c0 = init_aggregate(x.shape[0], "min")
    scores, _, _ = prm_score(x, pos, label_token_head(lm_head, good, bad), aggregate=a0, count=c0, agg="min")
    logits = x @ lm_head.T
    for i in range(x.shape[0]):
        for s in range(pos.shape[1]):
            t = int(pos[i, s])
            if 0 <= t < x.shape[1]:
                want = torch.softmax(logits[i, t, [good, bad]], 0)[0]
                torch.testing.assert_close(scores[i, s], want, atol=1e-5, rtol=1e-5)
            else:
                assert torch.isnan(scores[i, s])


def test_logits_input_without_head():
    x = torch.randn(3, 6, 2)
    pos = torch.tensor([[0, 5], [2, -1], [-1, -1]])
    a0, c0 = init_aggregate(3, "last")
    s, a, c = prm_score(x, pos, None, aggregate=a0, count=c0, positive_class=0)
    torch.testing.assert_close(s[0, 1], torch.softmax(x[0, 5], 0)[0])
    assert c.tolist() == [2, 1, 0] and torch.isnan(a[2])


@pytest.mark.parametrize("agg", AGGREGATES)
def test_incremental_fold_equals_one_fold(agg):
    # Scoring the steps in two calls gives the aggregate of scoring them all at once.
    x, pos = case(S=6)
    w = torch.randn(2, x.shape[2]) / 7
    a0, c0 = init_aggregate(x.shape[0], agg)
    _, a_all, c_all = prm_score(x, pos, w, aggregate=a0, count=c0, agg=agg)
    _, a1, c1 = prm_score(x, pos[:, :2], w, aggregate=a0, count=c0, agg=agg)
    _, a2, c2 = prm_score(x, pos[:, 2:], w, aggregate=a1, count=c1, agg=agg)
    torch.testing.assert_close(a2, a_all, equal_nan=True)
    assert torch.equal(c2, c_all)


def test_compiles_without_graph_breaks():
    x, pos = case()
    w = torch.randn(2, x.shape[2])
    a0, c0 = init_aggregate(x.shape[0], "mean")
    f = torch.compile(lambda x, p, a, c: prm_score(x, p, w, aggregate=a, count=c, agg="mean"), fullgraph=True)
    got = f(x, pos, a0, c0)
    torch.testing.assert_close(got[1], prm_score(x, pos, w, aggregate=a0, count=c0, agg="mean")[1])


def test_bad_input():
    x, pos = case()
    w = torch.randn(2, x.shape[2])
    a0, c0 = init_aggregate(x.shape[0], "last")
    with pytest.raises(ValueError, match="agg must be"):
        prm_score(x, pos, w, aggregate=a0, count=c0, agg="max")
    with pytest.raises(ValueError, match="weight has"):
        prm_score(x, pos, w[:, :3], aggregate=a0, count=c0)
    with pytest.raises(ValueError, match="1 \\(sigmoid\\) or 2"):
        prm_score(x, pos, torch.randn(3, x.shape[2]), aggregate=a0, count=c0)
    with pytest.raises(TypeError, match="positions"):
        prm_score(x, pos.float(), w, aggregate=a0, count=c0)
    with pytest.raises(ValueError, match="aggregate has"):
        prm_score(x, pos, w, aggregate=a0[:2], count=c0)
    with pytest.raises(ValueError, match="good_token_id"):
        label_token_head(torch.randn(10, 4), 10, 0)


def likelihood_case(n=6, T=11, S=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(n, T, generator=g) * 4
    lp[:, :3] = float("nan")  # left padding
    lp[1, :] = float("nan")  # a row with no token this time
    pos = torch.sort(torch.randint(3, T, (n, S), generator=g), 1).values
    pos[0] = -1  # a row with no step
    pos[2, -1] = -1
    pos[3, -1] = T + 2  # out of range counts as none
    return lp.to(dtype), pos


@pytest.mark.parametrize("reduce", LIKELIHOOD_REDUCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(6, 11, 4), (7, 1, 1), (9, 33, 5)])
def test_prefix_likelihood_matches_reference(reduce, dtype, shape):
    n, T, S = shape
    lp, pos = likelihood_case(n, max(T, 4), S, dtype, seed=T)
    state = init_likelihood_state(n)
    state[0][4:] = -torch.rand(n - 4) * 3  # rows that already had tokens
    state[1][4:] = state[0][4:] * 2
    state[2][4:] = 5
    got, got_state = prefix_likelihood(lp, pos, state, reduce=reduce)
    want, want_state = prefix_likelihood_ref(lp.float(), pos, state, reduce=reduce)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, equal_nan=True)
    for a, b in zip(got_state, want_state):
        torch.testing.assert_close(a, b)
    assert torch.isnan(got[0]).all() and not torch.isnan(got[5]).any()


@pytest.mark.parametrize("reduce", LIKELIHOOD_REDUCES)
def test_prefix_likelihood_in_chunks_equals_one_call(reduce):
    lp, pos = likelihood_case(T=14)
    n = lp.shape[0]
    _, (m, s, c) = prefix_likelihood(lp, pos, init_likelihood_state(n), reduce=reduce)
    half = torch.where(pos < 8, pos, -1), torch.where(pos >= 8, pos - 8, -1)
    a, st = prefix_likelihood(lp[:, :8], half[0], init_likelihood_state(n), reduce=reduce)
    b, (m2, s2, c2) = prefix_likelihood(lp[:, 8:], half[1], st, reduce=reduce)
    one, _ = prefix_likelihood(lp, pos, init_likelihood_state(n), reduce=reduce)
    torch.testing.assert_close(torch.where(pos < 8, a, b), one, equal_nan=True)
    torch.testing.assert_close((m2, s2, c2), (m, s, c))


def test_prefix_likelihood_compiles_without_graph_breaks():
    lp, pos = likelihood_case()
    st = init_likelihood_state(lp.shape[0])
    f = torch.compile(lambda lp, p, a, b, c: prefix_likelihood(lp, p, (a, b, c), reduce="mean"), fullgraph=True)
    torch.testing.assert_close(f(lp, pos, *st)[0], prefix_likelihood(lp, pos, st, reduce="mean")[0], equal_nan=True)


def test_prefix_likelihood_bad_input():
    lp, pos = likelihood_case()
    st = init_likelihood_state(lp.shape[0])
    with pytest.raises(ValueError, match="reduce must be"):
        prefix_likelihood(lp, pos, st, reduce="max")
    with pytest.raises(TypeError, match="token_logp must be floating"):
        prefix_likelihood(lp.long(), pos, st)
    with pytest.raises(TypeError, match="positions"):
        prefix_likelihood(lp, pos.float(), st)
    with pytest.raises(ValueError, match="positions has"):
        prefix_likelihood(lp, pos[:2], st)
    with pytest.raises(ValueError, match="state must be"):
        prefix_likelihood(lp, pos, st[:2])
    with pytest.raises(ValueError, match="run_count has"):
        prefix_likelihood(lp, pos, (st[0], st[1], st[2][:2]))
