"""select_best, majority_vote, weighted_vote, topk_per_group against their plain-loop references."""
import pytest
import torch

from tts_kernels.ops.select import majority_vote, select_best, topk_per_group, weighted_vote
from tts_kernels.reference import majority_vote_ref, select_best_ref, topk_per_group_ref, weighted_vote_ref


def answers(B, N, vocab):
    # Few distinct answers and many -1s: lots of ties and all-(-1) rows.
    a = torch.randint(-1, vocab, (B, N))
    a[0] = -1
    return a


def scores(B, N, dtype=torch.float32):
    s = torch.randint(0, 4, (B, N)).to(dtype) / 4  # exact ties
    s[1, ::3] = float("nan")
    s[2] = float("-inf")
    return s


@pytest.mark.parametrize("B,N,vocab", [(5, 1, 2), (6, 7, 3), (9, 64, 5), (4, 256, 40)])
def test_votes_match_reference(B, N, vocab):
    for trial in range(5):
        a = answers(B, N, vocab)
        s = scores(B, N)
        for got, want in [(majority_vote(a), majority_vote_ref(a)), (weighted_vote(a, s), weighted_vote_ref(a, s))]:
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_vote_rules_by_hand():
    a = torch.tensor([[3, 5, 5, 3, -1, -1, -1], [-1, -1, -1, -1, -1, -1, -1], [7, 7, 2, 2, 2, -1, 9]])
    s = torch.tensor([[0.75, 0.5, 0.5, 0.25, 1.0, 1.0, 1.0], [1.0] * 7, [0.5, 0.5, 0.25, 0.5, 0.25, 5.0, 0.0]])
    ans, idx = majority_vote(a)
    assert ans.tolist() == [3, -1, 2] and idx.tolist() == [0, 0, 2]  # 3 and 5 tie at 2: 3 came first; -1 never wins
    ans, idx = weighted_vote(a, s)
    assert ans.tolist() == [3, -1, 7] and idx.tolist() == [0, 0, 0]  # equal sums: first occurrence wins
    assert select_best(s).tolist() == [4, 0, 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_select_best_and_topk_match_reference(dtype):
    for B, N in [(1, 1), (5, 7), (8, 300)]:
        s = scores(max(B, 3), N, dtype)
        assert torch.equal(select_best(s), select_best_ref(s))
        for k in {0, 1, N // 2, N}:
            v, i = topk_per_group(s, k)
            rv, ri = topk_per_group_ref(s, k)
            assert torch.equal(i, ri) and torch.equal(v, rv.to(dtype))


def test_ops_do_not_sync_and_compile():
    a, s = answers(4, 16, 3), scores(4, 16)
    f = torch.compile(lambda a, s: (weighted_vote(a, s), majority_vote(a), select_best(s), topk_per_group(s, 4)),
                      fullgraph=True)
    got = f(a, s)
    assert torch.equal(got[0][0], weighted_vote_ref(a, s)[0])


def test_bad_input():
    a, s = answers(2, 3, 3), scores(3, 3)[:2]
    with pytest.raises(TypeError, match="answer_ids"):
        majority_vote(a.float())
    with pytest.raises(ValueError, match="answer_ids must have 2"):
        majority_vote(a[0])
    with pytest.raises(ValueError, match="scores has shape"):
        weighted_vote(a, s[:, :2])
    with pytest.raises(TypeError, match="scores"):
        select_best(a)
    with pytest.raises(ValueError, match="k must be"):
        topk_per_group(s, 4)
    with pytest.raises(ValueError, match="at least one candidate"):
        select_best(torch.zeros(2, 0))
