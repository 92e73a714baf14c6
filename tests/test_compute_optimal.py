"""compute_optimal: never over budget, allocation from allocate_budget, a strategy per level.

``budget`` is samples per prompt (as for every strategy): ``budget * P`` in all."""
import pytest
import torch
from tiny_models import search_models

from tts_kernels.ops.allocate import allocate_budget
from tts_kernels.search.compute_optimal import compute_optimal, default_plan

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min)

PROMPTS = ["Q: 1+1?\n", "Q: 2*3?\n", "Q: 9-4?\n", "Q: 7*7?\n"]
KW = dict(max_new_tokens=10, max_step_tokens=8, num_iterations=2, step_delimiter="e", temperature=1.0,
          extract=lambda t: t[:1] or None)  # toy answers: the first character
P = len(PROMPTS)


@pytest.fixture(scope="module")
def models():
    return search_models()


@pytest.mark.parametrize("budget", [2, 3, 5, 10])
def test_never_over_budget_and_allocation_is_optimal(models, budget):
    policy, prm = models
    res = compute_optimal(policy, prm, PROMPTS, budget=budget, pilot_n=2, levels=2, beam_width=2, seed=1, **KW)
    info = res.prompt_info
    assert res.samples <= budget * P
    assert res.samples == 2 * P + sum(r["n"] for r in info)
    # The Compute record sums the pilot's and every search's records.
    assert res.compute.prm_tokens > 0
    assert res.compute.policy_prefill_tokens >= sum(len(policy.encode(p)) for p in PROMPTS)
    assert res.compute.policy_flops > 0 and res.compute.prm_flops > 0
    p = torch.tensor([r["p"] for r in info], dtype=torch.float64)
    alloc = allocate_budget(p, budget * P - 8, n_min=0).tolist()
    for i, (r, a) in enumerate(zip(info, alloc)):
        plan = default_plan(2, ("best_of_n", "prm_beam_search"), 2)[r["level"]]
        want = a if plan[0] == "best_of_n" else a - a % plan[1]
        assert r["n"] == want
        assert r["strategy"] == (plan[0] if want else "pilot")
        # The prediction is that of the candidate it names: the pilot's (2 candidates) or its search's.
        assert len(res.candidates[i]) >= 2
        if res.chosen[i] is not None:
            assert res.predictions[i] == res.candidates[i][res.chosen[i]].answer
    # Level 0 holds the prompts with the highest estimated success probability.
    easy = [r["p"] for r in info if r["level"] == 0]
    hard = [r["p"] for r in info if r["level"] == 1]
    assert min(easy) >= max(hard)


def test_bad_arguments(models):
    policy, prm = models
    with pytest.raises(ValueError, match="below the pilot"):
        compute_optimal(policy, prm, PROMPTS, budget=1, pilot_n=2, **KW)
    with pytest.raises(ValueError, match="strategies"):
        compute_optimal(policy, prm, PROMPTS, budget=5, pilot_n=2, strategies=("mcts",), **KW)
    with pytest.raises(ValueError, match="plan\\[1\\]"):
        compute_optimal(policy, prm, PROMPTS, budget=5, pilot_n=2, levels=2, plan={0: ("best_of_n", 1)}, **KW)
    with pytest.raises(ValueError, match="needs a verifier"):
        compute_optimal(policy, None, PROMPTS, budget=5, **KW)
