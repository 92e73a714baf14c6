"""compute_optimal: never over budget, allocation from allocate_budget, a strategy per level."""
import pytest
import torch
from tiny_models import search_models

from tts_kernels.ops.allocate import allocate_budget
from tts_kernels.search.compute_optimal import compute_optimal, default_plan

PROMPTS = ["Q: 1+1?\n", "Q: 2*3?\n", "Q: 9-4?\n", "Q: 7*7?\n"]
KW = dict(max_new_tokens=10, max_step_tokens=8, num_iterations=2, step_delimiter="e", temperature=1.0,
          extract=lambda t: t[:1] or None)  # toy answers: the first character


@pytest.fixture(scope="module")
def models():
    return search_models()


@pytest.mark.parametrize("budget", [8, 9, 21, 40])
def test_never_over_budget_and_allocation_is_optimal(models, budget):
    policy, prm = models
    res = compute_optimal(policy, prm, PROMPTS, budget=budget, pilot_n=2, levels=2, beam_width=2, seed=1, **KW)
    assert res.samples_spent <= budget
    assert res.samples_spent == 2 * len(PROMPTS) + sum(r.n for r in res.prompts)
    # The Compute record sums the pilot's and every search's records.
    assert res.compute.prm_tokens == res.tokens["prm"] > 0
    assert res.compute.policy_prefill_tokens >= sum(len(policy.encode(p)) for p in PROMPTS)
    assert res.compute.policy_flops > 0 and res.compute.prm_flops > 0
    p = torch.tensor([r.p for r in res.prompts], dtype=torch.float64)
    alloc = allocate_budget(p, budget - 8, n_min=0).tolist()
    for r, a in zip(res.prompts, alloc):
        plan = default_plan(2, ("best_of_n", "prm_beam_search"), 2)[r.level]
        want = a if plan[0] == "best_of_n" else a - a % plan[1]
        assert r.n == want
        assert r.strategy == (plan[0] if want else "pilot")
    # Level 0 holds the prompts with the highest estimated success probability.
    easy = [r.p for r in res.prompts if r.level == 0]
    hard = [r.p for r in res.prompts if r.level == 1]
    assert min(easy) >= max(hard)


def test_bad_arguments(models):
    policy, prm = models
    with pytest.raises(ValueError, match="below the pilot"):
        compute_optimal(policy, prm, PROMPTS, budget=7, pilot_n=2, **KW)
    with pytest.raises(ValueError, match="strategies"):
        compute_optimal(policy, prm, PROMPTS, budget=20, pilot_n=2, strategies=("mcts",), **KW)
    with pytest.raises(ValueError, match="plan\\[1\\]"):
        compute_optimal(policy, prm, PROMPTS, budget=20, pilot_n=2, levels=2, plan={0: ("best_of_n", 1)}, **KW)
