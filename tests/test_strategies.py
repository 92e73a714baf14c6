"""search.strategies: each name runs the search it names, with the same seeds and settings."""
import math

import pytest
from tiny_models import search_models

from tts_kernels.search import best_of_n, compute_optimal, dvts, prm_beam_search
from tts_kernels.search.strategies import STRATEGIES, SearchSettings, run_strategies

PROMPTS = ["Q: 1+1?\n", "Q: 2*3?\n", "Q: 9-4?\n"]
S = SearchSettings(max_new_tokens=10, max_step_tokens=8, num_iterations=2, step_delimiter="e", temperature=1.0,
                   levels=2, beam_width=2)


def extract(text):
    return text[:1] or None  # toy answers: the first character


@pytest.fixture(scope="module")
def models():
    return search_models()


def test_sampling_strategies_share_one_best_of_n_run(models):
    policy, prm = models
    got = run_strategies(["majority", "best_of_n", "weighted_best_of_n"], policy, prm, PROMPTS, 4, settings=S,
                         seed=3, extract=extract)
    ref = best_of_n(policy, prm, PROMPTS, 4, max_new_tokens=10, temperature=1.0, seed=3, extract=extract)
    assert [o.prediction for o in got["majority"].outcomes] == ref.majority
    assert [o.prediction for o in got["best_of_n"].outcomes] == ref.best_of_n
    assert [o.prediction for o in got["weighted_best_of_n"].outcomes] == ref.weighted
    for run in got.values():
        assert run.compute == ref.compute and run.samples == 4 * len(PROMPTS) and run.budget == 4
        assert [o.answers for o in run.outcomes] == [[c.answer for c in row] for row in ref.candidates]
        assert [o.scores for o in run.outcomes] == [[c.score for c in row] for row in ref.candidates]


def test_majority_alone_runs_without_prm(models):
    policy, _ = models
    got = run_strategies(["majority", "greedy"], policy, None, PROMPTS, 4, settings=S, seed=3, extract=extract)
    assert all(math.isnan(s) for o in got["majority"].outcomes for s in o.scores)
    assert got["majority"].compute.prm_tokens == 0
    greedy = best_of_n(policy, None, PROMPTS, 1, max_new_tokens=10, temperature=0.0, extract=extract)
    assert [o.prediction for o in got["greedy"].outcomes] == greedy.majority
    assert got["greedy"].budget == 1 and got["greedy"].samples == len(PROMPTS)


@pytest.mark.parametrize("name,search", [("prm_beam_search", prm_beam_search), ("dvts", dvts)])
def test_step_searches(models, name, search):
    policy, prm = models
    got = run_strategies([name], policy, prm, PROMPTS, 4, settings=S, seed=5, extract=extract)[name]
    ref = search(policy, prm, PROMPTS, n=4, beam_width=2, num_iterations=2, step_delimiter="e", max_step_tokens=8,
                 max_final_tokens=10, temperature=1.0, seed=5, extract=extract)
    want = ref.best_answer if name == "prm_beam_search" else ref.weighted
    assert [o.prediction for o in got.outcomes] == want
    assert [o.answers for o in got.outcomes] == [[c.answer for c in done] for done in ref.completed]
    assert got.compute == ref.compute


@pytest.mark.parametrize("name", ["compute_optimal", "adaptive_best_of_n"])
def test_allocating_strategies(models, name):
    policy, prm = models
    got = run_strategies([name], policy, prm, PROMPTS, 8, settings=S, seed=1, extract=extract)[name]
    strategies = ("best_of_n",) if name == "adaptive_best_of_n" else ("best_of_n", "prm_beam_search")
    ref = compute_optimal(policy, prm, PROMPTS, budget=8 * len(PROMPTS), pilot_n=2, levels=2, strategies=strategies,
                          beam_width=2, max_new_tokens=10, max_step_tokens=8, num_iterations=2, step_delimiter="e",
                          temperature=1.0, seed=1, extract=extract)
    assert [o.prediction for o in got.outcomes] == ref.answers
    assert got.samples == ref.samples_spent <= 8 * len(PROMPTS)
    assert [o.info["strategy"] for o in got.outcomes] == [r.strategy for r in ref.prompts]
    if name == "adaptive_best_of_n":
        assert {o.info["strategy"] for o in got.outcomes} <= {"best_of_n", "pilot"}


def test_bad_arguments(models):
    policy, prm = models
    with pytest.raises(ValueError, match="names"):
        run_strategies(["mcts"], policy, prm, PROMPTS, 4)
    with pytest.raises(ValueError, match="names"):
        run_strategies("greedy", policy, prm, PROMPTS, 4)
    with pytest.raises(ValueError, match="budget"):
        run_strategies(["greedy"], policy, prm, PROMPTS, 0)
    with pytest.raises(ValueError, match="need a prm"):
        run_strategies(["dvts"], policy, None, PROMPTS, 4)
    assert set(STRATEGIES) >= {"greedy", "majority", "best_of_n", "weighted_best_of_n", "prm_beam_search", "dvts",
                               "compute_optimal"}
