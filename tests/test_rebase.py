"""rebase (REBASE, Wu et al. 2024) on the scripted fake: the allocation rule against a plain-Python reference,
the tree it grows (each depth's children follow the rule from the verifier's scores), completed leaves, the
budget spent exactly, and per-prompt seeds' batch invariance."""
import math
import random

import pytest
import torch
from scripted import ScriptedPolicy, ScriptedVerifier, step_score

from tts_kernels.search import STRATEGIES, Settings, rebase, run
from tts_kernels.search.rebase import expansion_widths
from tts_kernels.search.rows import StepRows

PROMPTS = ["abc", "h.", "ggg a"]
S = Settings(max_new_tokens=10, max_step_tokens=5, num_iterations=4, step_delimiter=".", temperature=1.0,
             rebase_temperature=0.2)


def extract(text):
    return text[:1] or None


def fakes():
    return ScriptedPolicy(boost={".": 1.5, "a": 0.5, 1: -2.0}), ScriptedVerifier()


def widths_ref(scores: list[float], width: int, temperature: float) -> list[int]:
    """REBASE's allocation in plain Python: ``width`` children over the nodes by ``softmax(score / T)``, shares
    floored, the rest one each to the largest remainders (ties to the earlier node); NaN scores rank as -inf,
    all -inf split evenly."""
    if not scores:
        return []
    s = [-math.inf if math.isnan(x) else x for x in scores]
    top = max(s)
    z = [0.0] * len(s) if top == -math.inf else [(x - top) / temperature for x in s]
    e = [math.exp(v) for v in z]
    total = sum(e)
    share = [v / total * width for v in e]
    base = [math.floor(x) for x in share]
    rem = [x - b for x, b in zip(share, base)]
    for i in sorted(range(len(s)), key=lambda i: (-rem[i], i))[: width - sum(base)]:
        base[i] += 1
    return base


def _device_widths(rows: list[list[float]], widths: list[int], T: float, K: int) -> list[list[int]]:
    scores = torch.full((len(rows), K), float("nan"), dtype=torch.float64)
    live = torch.zeros(len(rows), K, dtype=torch.bool)
    for p, r in enumerate(rows):
        scores[p, : len(r)] = torch.tensor(r, dtype=torch.float64)
        live[p, : len(r)] = True
    got = expansion_widths(scores, live, torch.tensor(widths), T)
    assert bool((got[~live] == 0).all())
    return [got[p, : len(r)].tolist() for p, r in enumerate(rows)]


@pytest.mark.parametrize("T", [0.05, 0.2, 1.0, 10.0])
def test_widths_match_the_plain_python_rule(T):
    rng = random.Random(int(T * 100))
    for _ in range(40):
        P, K = rng.randint(1, 5), rng.randint(1, 9)
        rows, widths = [], []
        for _ in range(P):
            k = rng.randint(0, K)
            rows.append([rng.random() for _ in range(k)])
            widths.append(rng.randint(k, K) if k else 0)  # REBASE: as many children as live nodes, or more
        got = _device_widths(rows, widths, T, K)
        assert got == [widths_ref(r, w, T) for r, w in zip(rows, widths)]
        assert [sum(g) for g in got] == widths  # exactly the width, every time


def test_widths_edge_cases():
    # Ties go to the earlier node; NaN ranks as -inf; all -inf splits evenly; a row never sees its neighbours.
    assert _device_widths([[0.5, 0.5, 0.5]], [4], 0.2, 3) == [[2, 1, 1]] == [widths_ref([0.5] * 3, 4, 0.2)]
    assert _device_widths([[float("nan"), 0.3]], [2], 1.0, 2) == [[0, 2]]
    assert _device_widths([[float("-inf"), float("-inf"), float("-inf")]], [5], 0.2, 3) == [[2, 2, 1]]
    assert _device_widths([[0.9, 0.1]], [3], 0.01, 2) == [[3, 0]]  # a cold temperature: all to the best
    alone = _device_widths([[0.2, 0.7, 0.4]], [5], 0.2, 6)
    assert _device_widths([[0.9, 0.9, 0.9, 0.1, 0.5, 0.5], [0.2, 0.7, 0.4]], [6, 5], 0.2, 6)[1] == alone[0]
    with pytest.raises(ValueError, match="temperature"):
        expansion_widths(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), torch.tensor([2]), 0.0)
    with pytest.raises(ValueError, match=r"scores \[P, K\]"):
        expansion_widths(torch.zeros(2), torch.ones(2, dtype=torch.bool), torch.tensor([2]), 1.0)


def _spy(monkeypatch):
    """Per depth: each prompt's rows that sampled, their finish, last step and the children forked from them."""
    log = []
    real_step, real_fork = StepRows.step, StepRows.fork

    def step(self, last, rows=None):
        texts, finish = real_step(self, last, rows)
        log.append(dict(owner=list(self.owner), finish=list(finish), texts=list(texts), children=None))
        return texts, finish

    def fork(self, rows):
        if log:
            log[-1]["children"] = list(rows)
        return real_fork(self, rows)

    monkeypatch.setattr(StepRows, "step", step)
    monkeypatch.setattr(StepRows, "fork", fork)
    return log


@pytest.mark.parametrize("T", [0.2, 0.05])
def test_the_tree_follows_the_rule_and_spends_the_budget_exactly(monkeypatch, T):
    policy, verifier = fakes()
    n = 6
    log = _spy(monkeypatch)
    res = rebase(policy, verifier, PROMPTS, n=n, settings=S.replace(rebase_temperature=T), seed=1, extract=extract)
    P = len(PROMPTS)
    done = [0] * P
    shapes = set()
    for d, depth in enumerate(log):
        owner, finish = depth["owner"], depth["finish"]
        for p in range(P):
            # Every row of a prompt is a child at this depth, and they number its remaining width.
            assert owner.count(p) == n - done[p]
        for r, f in enumerate(finish):
            done[owner[r]] += f is not None
        if depth["children"] is None:
            assert d == len(log) - 1
            continue
        for p in range(P):
            nodes = [r for r in range(len(owner)) if owner[r] == p and finish[r] is None]
            # The verifier's aggregate ("last") of a live node is the fake's score of its new step (float32).
            scores = [float(torch.tensor(step_score(depth["texts"][r]), dtype=torch.float32)) for r in nodes]
            want = widths_ref(scores, n - done[p], T)
            got = [depth["children"].count(r) for r in nodes]
            assert got == want, (d, p, scores)
            shapes.add(tuple(sorted(set(got))))
            assert [r for r in depth["children"] if owner[r] == p] == [r for r, k in zip(nodes, want) for _ in range(k)]
    assert any(0 in s for s in shapes) and any(max(s) >= 2 for s in shapes), "the run never pruned or branched"
    # Completed leaves: exactly n per prompt, each with its steps and the fake's scores of them.
    assert done == [n] * P and [len(c) for c in res.candidates] == [n] * P
    assert res.samples == n * P and res.budget == n and res.strategy == "rebase"
    for cands in res.candidates:
        for c in cands:
            assert c.finish in ("eos", "stop", "length", "empty", "final")
            assert c.text == "".join(c.steps) and len(c.steps) <= S.num_iterations
            assert c.step_scores == pytest.approx([step_score(t) for t in c.steps], abs=1e-6)
    # Accounting: each prompt prefilled once; the verifier ran the prompts and every sampled step once.
    assert res.compute.policy_prefill_tokens == sum(len(policy.encode(p)) for p in PROMPTS)
    assert res.compute.prm_tokens == sum(len(p) for p in PROMPTS) + sum(len(t) for depth in log for t in depth["texts"])
    assert policy.live_sessions == 0 and verifier.live_sessions == 0


def test_prompt_info_and_the_pick():
    policy, verifier = fakes()
    res = rebase(policy, verifier, PROMPTS, n=4, settings=S, seed=3, extract=extract)
    for p, cands in enumerate(res.candidates):
        for w in res.prompt_info[p]["widths"]:
            assert sum(w) <= 4 and all(k >= 0 for k in w)
        totals = {}
        for c in cands:
            if c.answer is not None and c.score == c.score:
                totals[c.answer] = totals.get(c.answer, 0.0) + c.score
        assert res.predictions[p] == (max(totals, key=totals.get) if totals else None)  # the weighted vote
    best = rebase(policy, verifier, PROMPTS, n=4, select="best", settings=S, seed=3, extract=extract)
    assert [[c.text for c in cs] for cs in best.candidates] == [[c.text for c in cs] for cs in res.candidates]
    for p, cands in enumerate(best.candidates):
        assert best.chosen[p] == max(range(4), key=lambda j: (cands[j].score, -j))


def test_a_prompt_grows_the_same_tree_alone_and_batched():
    policy, verifier = fakes()
    seeds = [7, 8, 9]
    both = run("rebase", policy, verifier, PROMPTS, budget=6, settings=S, seed=seeds, extract=extract)
    view = lambda res, p: [(c.text, c.score, c.finish) for c in res.candidates[p]]  # noqa: E731
    for p in range(3):
        alone = run("rebase", policy, verifier, [PROMPTS[p]], budget=6, settings=S, seed=[seeds[p]], extract=extract)
        assert view(alone, 0) == view(both, p) and alone.prompt_info[0] == both.prompt_info[p]
    swapped = run("rebase", policy, verifier, [PROMPTS[2], PROMPTS[0]], budget=6, settings=S, seed=[9, 7],
                  extract=extract)
    assert view(swapped, 0) == view(both, 2) and view(swapped, 1) == view(both, 0)
    other = run("rebase", policy, verifier, [PROMPTS[0]], budget=6, settings=S, seed=[70], extract=extract)
    assert view(other, 0) != view(both, 0)  # the draws do follow the seed


def test_registered_and_checked():
    policy, verifier = fakes()
    assert STRATEGIES["rebase"].needs_verifier and STRATEGIES["rebase"].select == "weighted"
    with pytest.raises(ValueError, match="needs a verifier"):
        run("rebase", policy, None, PROMPTS, budget=4, settings=S)
    with pytest.raises(ValueError, match="needs a verifier"):
        rebase(policy, None, PROMPTS, n=4, settings=S)
    with pytest.raises(ValueError, match="Settings.rebase_temperature must be finite and > 0"):
        S.replace(rebase_temperature=0.0)
    with pytest.raises(ValueError, match="select"):
        rebase(policy, verifier, PROMPTS, n=4, select="vote", settings=S)
    one = run("rebase", policy, verifier, PROMPTS, budget=1, settings=S, seed=0, extract=extract)
    assert [len(c) for c in one.candidates] == [1, 1, 1]  # a budget of 1 is one path
