"""filter_duplicates: rolling hashes of the rows' token ids on the device (tts_kernels.search.dedupe), checked
against Python on random sequences, and prm_beam_search not ranking a beam that repeats another."""
import random

import pytest
import torch
from tiny_models import search_models

from tts_kernels.search import prm_beam_search
from tts_kernels.search import step_search
from tts_kernels.search.dedupe import RowHashes


def _pad(rows, T):
    out = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out, torch.tensor([len(r) for r in rows])


def test_hash_rolls_and_separates():
    rng = random.Random(0)
    seqs = [[rng.randrange(3) for _ in range(rng.randrange(0, 9))] for _ in range(200)]  # small vocab: many repeats
    whole = RowHashes(len(seqs), "cpu")
    whole.extend(*_pad(seqs, 8))
    parts = RowHashes(len(seqs), "cpu")
    cut = [rng.randrange(len(s) + 1) for s in seqs]
    parts.extend(*_pad([s[:c] for s, c in zip(seqs, cut)], 8))
    parts.extend(*_pad([s[c:] for s, c in zip(seqs, cut)], 8))  # (a -1 past each row's count is ignored)
    assert torch.equal(whole.h, parts.h)
    by_hash = {}
    for s, h in zip(seqs, whole.h.tolist()):
        by_hash.setdefault(tuple(h), set()).add(tuple(s))
    assert all(len(v) == 1 for v in by_hash.values())  # equal hashes only for equal sequences here
    assert len(by_hash) == len({tuple(s) for s in seqs})
    # Padding ids beyond a row's count and huge ids do not break it.
    big = RowHashes(2, "cpu")
    big.extend(torch.tensor([[2**31 + 5, 7, 9], [2**31 + 5, 7, -1]]), torch.tensor([2, 2]))
    assert torch.equal(big.h[0], big.h[1])


def test_duplicates_against_python():
    rng = random.Random(1)
    group, groups = 6, 40
    seqs = [[rng.randrange(2) for _ in range(rng.randrange(1, 4))] for _ in range(group * groups)]
    live = torch.tensor([rng.random() < 0.8 for _ in seqs])
    h = RowHashes(len(seqs), "cpu")
    h.extend(*_pad(seqs, 3))
    dup, first = h.duplicates(group, live)
    for r, s in enumerate(seqs):
        g0 = r - r % group
        earlier = [j for j in range(g0, r) if live[j] and seqs[j] == s]
        assert bool(dup[r]) == (bool(live[r]) and bool(earlier))
        if dup[r]:
            assert int(first[r]) == earlier[0]
    h.fork(torch.tensor([5, 5, 0]))
    assert torch.equal(h.h[0], h.h[1])


KW = dict(n=4, beam_width=2, num_iterations=3, step_delimiter="e", max_step_tokens=12, max_new_tokens=10)


@pytest.fixture(scope="module")
def models():
    return search_models()


def _ranked(monkeypatch):
    """Record, per call, how many beams of each prompt competed (finite rank)."""
    seen = []
    real = step_search.topk_per_group

    def spy(values, k):
        seen.append(torch.isfinite(values).sum(1).tolist())
        return real(values, k)

    monkeypatch.setattr(step_search, "topk_per_group", spy)
    return seen


def test_greedy_beams_are_one_beam_with_filter(models, monkeypatch):
    policy, prm = models
    seen = _ranked(monkeypatch)
    plain = prm_beam_search(policy, prm, ["Q: 1+1?\n", "Q: 2*3?\n"], temperature=0.0, seed=1, **KW)
    competed_plain = list(seen)
    seen.clear()
    got = prm_beam_search(policy, prm, ["Q: 1+1?\n", "Q: 2*3?\n"], temperature=0.0, seed=1, filter_duplicates=True,
                          **KW)
    # Greedy: all 4 beams of a prompt write the same step; without the filter all compete, with it one does.
    assert competed_plain[0] == [4, 4] and seen[0] == [1, 1]
    assert [c.text for cands in got.candidates for c in cands] and got.predictions == plain.predictions


def test_a_hash_collision_drops_nothing(models, monkeypatch):
    policy, prm = models
    prompts = ["Q: 1+1?\n", "Q: 2*3?\n", "Q: 9-4?\n"]
    real = prm_beam_search(policy, prm, prompts, temperature=1.0, seed=4, filter_duplicates=True, **KW)

    def everything_collides(self, group, live):  # every live row "equals" its group's first live row
        alive = live.view(-1, group)
        first = alive.to(torch.int8).argmax(1)
        idx = torch.arange(live.numel()).view(-1, group)
        dup = alive & (idx != (idx[:, :1] + first[:, None]))
        return dup.view(-1), (idx[:, :1] + first[:, None]).expand(-1, group).reshape(-1)

    monkeypatch.setattr(step_search.RowHashes, "duplicates", everything_collides)
    collided = prm_beam_search(policy, prm, prompts, temperature=1.0, seed=4, filter_duplicates=True, **KW)
    texts = lambda res: [[c.text for c in cands] for cands in res.candidates]  # noqa: E731
    assert texts(collided) == texts(real) and collided.predictions == real.predictions
