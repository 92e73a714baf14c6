"""Running only some rows of a batch: ``PagedCache.only``, ``PolicySession.decode(rows=)``, the PRM's
length buckets (``length_buckets``) and ``sample_steps`` leaving finished rows out. Each gives what the
whole padded batch gives; the rows left out are untouched."""
import itertools
import random

import pytest
import torch
from test_hf_prm import COMPLETIONS, PROMPTS, make
from tiny_models import search_models

from tts_kernels.models import prm as prm_mod
from tts_kernels.models.prm import length_buckets, split_steps
from tts_kernels.search import steps as steps_mod
from tts_kernels.search.steps import DelimiterMatcher, sample_steps

pytestmark = pytest.mark.models


def brute_buckets(lengths, max_buckets, cost):
    """Every split of the distinct sorted lengths into at most max_buckets runs: the cheapest cost."""
    d = sorted(set(lengths))
    best = None
    for k in range(1, min(max_buckets, len(d)) + 1):
        for cuts in itertools.combinations(range(1, len(d)), k - 1):
            edges = [0, *cuts, len(d)]
            c = 0
            for a, b in zip(edges, edges[1:]):
                rows = [n for n in lengths if d[a] <= n <= d[b - 1]]
                c += len(rows) * d[b - 1] + cost
            best = c if best is None else min(best, c)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_length_buckets_are_the_cheapest_split(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([0, 1, 2, 3, 5, 8, 13, 24]) for _ in range(rng.randint(1, 60))]
    cost, K = rng.choice([0, 4, 32, 256]), rng.randint(1, 4)
    groups = length_buckets(lengths, max_buckets=K, forward_cost=cost)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))  # a partition
    assert len(groups) <= K and all(g == sorted(g) for g in groups)
    got = sum(len(g) * max(lengths[r] for r in g) + cost for g in groups)
    assert got == brute_buckets(lengths, K, cost)


def test_length_buckets_keep_one_group_when_splitting_does_not_pay():
    assert length_buckets([3, 3, 3]) == [[0, 1, 2]]
    assert length_buckets([4, 5, 6], forward_cost=256) == [[0, 1, 2]]
    assert length_buckets([]) == [[]]
    assert length_buckets([1, 24, 1, 24], forward_cost=0) == [[0, 2], [1, 3]]


@pytest.mark.parametrize("kind", ["classifier", "likelihood"])
def test_prm_buckets_score_as_one_batch(kind, monkeypatch):
    prm = make(kind)
    one = prm.score(PROMPTS, COMPLETIONS, agg="min")
    monkeypatch.setattr(prm_mod, "FORWARD_COST", 0)  # every distinct length its own forward
    calls = []
    real = prm_mod.PRMSession._forward_batch

    def spy(self, ids, ends):
        calls.append(len(ids))
        return real(self, ids, ends)

    monkeypatch.setattr(prm_mod.PRMSession, "_forward_batch", spy)
    many = prm.score(PROMPTS, COMPLETIONS, agg="min")
    assert len(calls) > 2  # the prompts, then several buckets of steps
    assert many.tokens == one.tokens and many.keys == one.keys
    torch.testing.assert_close(many.aggregate, one.aggregate, rtol=1e-5, atol=1e-6)
    for a, b in zip(many.step_scores, one.step_scores):
        for x, y in zip(a, b):
            torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=1e-5, atol=1e-6)


def test_prm_buckets_continue_rows_incrementally(monkeypatch):
    # Rows of different step lengths, over two calls: the running state written back per bucket.
    monkeypatch.setattr(prm_mod, "FORWARD_COST", 0)
    prm = make("likelihood", "mean")
    steps = split_steps(COMPLETIONS[0][0])
    s = prm.start(PROMPTS[:1], agg="last")
    s.fork(torch.tensor([0, 0, 0]))
    s.add_steps([steps[:1], steps[:2], []])
    got = s.add_steps([steps[1:], steps[2:], steps])
    monkeypatch.setattr(prm_mod, "FORWARD_COST", 10**9)
    t = prm.start(PROMPTS[:1], agg="last")
    t.fork(torch.tensor([0, 0, 0]))
    t.add_steps([steps[:1], steps[:2], []])
    want = t.add_steps([steps[1:], steps[2:], steps])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(s.aggregate, t.aggregate, rtol=1e-5, atol=1e-6)
    assert s._lens == t._lens and s.count.tolist() == t.count.tolist()
    s.free()
    t.free()


def _session(policy, n=5):
    s = policy.start([policy.encode("ab"), policy.encode("hello w")], rows_hint=n, max_new_tokens=16)
    s.fork(torch.tensor([0, 0, 1, 1, 1][:n]))
    return s


def test_decode_rows_matches_the_masked_batch():
    policy, _ = search_models()
    g = torch.Generator().manual_seed(0)
    a, b = _session(policy), _session(policy)
    for step in range(4):
        tok = torch.randint(5, 60, (5,), generator=g)
        active = torch.rand(5, generator=g) < 0.7
        rows = torch.tensor([r for r in range(5) if r % 2 == step % 2 or active[r]])
        before = b.logits.clone()
        a.decode(tok, active=active)
        b.decode(tok, active=active, rows=rows)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(b.positions, a.positions)
        out = torch.tensor([r not in rows.tolist() for r in range(5)])
        assert torch.equal(b.logits[out], before[out])  # the rows left out are untouched
    assert torch.equal(a.cache.lengths(), b.cache.lengths())
    a.free()
    b.free()


def test_only_restores_the_batch_when_the_forward_raises():
    policy, _ = search_models()
    s = _session(policy)
    ids, lens = s.cache.seq_ids.clone(), s.cache.lengths().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with s.cache.only(torch.tensor([1, 3])):
            assert s.cache.batch_size == 2
            raise RuntimeError("boom")
    assert torch.equal(s.cache.seq_ids, ids) and torch.equal(s.cache.lengths(), lens)
    s.decode(torch.tensor([7, 8, 9, 10, 11]))  # still usable
    s.free()


@pytest.mark.parametrize("narrow", [0.0, 1.0])
def test_sample_steps_with_finished_rows_left_out_give_the_same_steps(narrow, monkeypatch):
    policy, _ = search_models()
    matcher = DelimiterMatcher(policy.tokenizer, "e", policy.model.config.vocab_size)

    def run():
        s = _session(policy)
        st = sample_steps(s, max_tokens=12, eos_ids=[policy.tokenizer.eos_token_id], matcher=matcher,
                          temperature=1.0, seed=3, sync_every=2)
        lens = s.cache.lengths().clone()
        s.free()
        return st, lens

    monkeypatch.setattr(steps_mod, "_NARROW", 0.0)  # never narrowed: the reference
    want, want_lens = run()
    monkeypatch.setattr(steps_mod, "_NARROW", 1.0)  # narrowed at every look
    got, got_lens = run()
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.counts, want.counts)
    assert torch.equal(got.eos, want.eos) and torch.equal(got.delimited, want.delimited)
    assert torch.equal(got_lens, want_lens)
    assert got.forward_rows < want.forward_rows  # the finished rows were left out
