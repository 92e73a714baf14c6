"""search.run and the strategy registry: each name runs the search it names, with the same seeds and
settings; strategies of one group share one run; a registered strategy is run like a built-in."""
import math

import pytest
from tiny_models import search_models

from tts_kernels.search import (STRATEGIES, SearchResult, Settings, best_of_n, compute_optimal, dvts,
                                prm_beam_search, register_strategy, run, run_together)

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min)

PROMPTS = ["Q: 1+1?\n", "Q: 2*3?\n", "Q: 9-4?\n"]
S = Settings(max_new_tokens=10, max_step_tokens=8, num_iterations=2, step_delimiter="e", temperature=1.0,
             levels=2, beam_width=2)


def extract(text):
    return text[:1] or None  # toy answers: the first character


@pytest.fixture(scope="module")
def models():
    return search_models()


def test_sampling_strategies_share_one_best_of_n_run(models):
    policy, prm = models
    got = run_together(["majority", "best_of_n", "weighted_best_of_n"], policy, prm, PROMPTS, budget=4, settings=S,
                       seed=3, extract=extract)
    for name, rule in (("majority", "majority"), ("best_of_n", "best"), ("weighted_best_of_n", "weighted")):
        ref = best_of_n(policy, prm, PROMPTS, n=4, select=rule, settings=S, seed=3, extract=extract)
        assert got[name].predictions == ref.predictions and got[name].chosen == ref.chosen
        assert got[name].strategy == name
    ref = best_of_n(policy, prm, PROMPTS, n=4, max_new_tokens=10, temperature=1.0, step_delimiter="e", seed=3,
                    extract=extract)
    for res in got.values():
        assert res.compute == ref.compute and res.samples == 4 * len(PROMPTS) and res.budget == 4
        assert [[c.answer for c in r] for r in res.candidates] == [[c.answer for c in r] for r in ref.candidates]
        assert [[c.score for c in row] for row in res.candidates] == [[c.score for c in row] for row in ref.candidates]
    # run() of one of them alone gives the same as its share of the group run.
    alone = run("weighted_best_of_n", policy, prm, PROMPTS, budget=4, settings=S, seed=3, extract=extract)
    assert alone.predictions == got["weighted_best_of_n"].predictions and alone.compute == ref.compute


def test_majority_alone_runs_without_prm(models):
    policy, _ = models
    got = run_together(["majority", "greedy"], policy, None, PROMPTS, budget=4, settings=S, seed=3, extract=extract)
    assert all(math.isnan(c.score) for row in got["majority"].candidates for c in row)
    assert got["majority"].compute.prm_tokens == 0
    greedy = best_of_n(policy, None, PROMPTS, n=1, max_new_tokens=10, temperature=0.0, select="majority",
                       extract=extract)
    assert got["greedy"].predictions == greedy.predictions
    assert got["greedy"].budget == 1 and got["greedy"].samples == len(PROMPTS)


@pytest.mark.parametrize("name,search,rule", [("prm_beam_search", prm_beam_search, "best"),
                                              ("dvts", dvts, "weighted")])
def test_step_searches(models, name, search, rule):
    policy, prm = models
    got = run(name, policy, prm, PROMPTS, budget=4, settings=S, seed=5, extract=extract)
    ref = search(policy, prm, PROMPTS, n=4, beam_width=2, num_iterations=2, step_delimiter="e", max_step_tokens=8,
                 max_new_tokens=10, temperature=1.0, seed=5, extract=extract)
    assert got.predictions == ref.predictions
    assert [[c.answer for c in r] for r in got.candidates] == [[c.answer for c in r] for r in ref.candidates]
    assert got.compute == ref.compute and got.strategy == name
    # Each strategy picks its own prediction: beam search the best candidate, DVTS the weighted vote.
    again = search(policy, prm, PROMPTS, n=4, select=rule, settings=S, seed=5, extract=extract)
    assert again.predictions == got.predictions


def test_step_search_beam_width_follows_the_budget(models):
    policy, prm = models
    # budget 1 < beam_width 2: one beam (width 1), as a budget of 1 sample allows.
    got = run("prm_beam_search", policy, prm, PROMPTS, budget=1, settings=S, seed=5, extract=extract)
    assert got.samples == len(PROMPTS) and got.budget == 1


@pytest.mark.parametrize("name", ["compute_optimal", "adaptive_best_of_n"])
def test_allocating_strategies(models, name):
    policy, prm = models
    got = run(name, policy, prm, PROMPTS, budget=8, settings=S, seed=1, extract=extract)
    strategies = ("weighted_best_of_n",) if name == "adaptive_best_of_n" else ("weighted_best_of_n", "prm_beam_search")
    ref = compute_optimal(policy, prm, PROMPTS, budget=8, pilot_n=2, strategies=strategies, settings=S, seed=1,
                          extract=extract)
    assert got.predictions == ref.predictions
    assert got.samples == ref.samples <= 8 * len(PROMPTS)
    assert [i["strategy"] for i in got.prompt_info] == [i["strategy"] for i in ref.prompt_info]
    if name == "adaptive_best_of_n":
        assert {i["strategy"] for i in got.prompt_info} <= {"weighted_best_of_n", "pilot"}


def test_a_registered_strategy_runs_like_a_built_in(models):
    policy, prm = models
    calls = []

    def first_sample(policy, verifier, prompts, *, budget, settings, seed, extract):
        calls.append((budget, settings, seed))
        res = best_of_n(policy, verifier, prompts, n=budget, select="majority", settings=settings, seed=seed,
                        extract=extract)
        res.strategy = "first_sample"
        res.predictions = [row[0].answer for row in res.candidates]
        res.chosen = [0] * len(prompts)
        return res

    register_strategy("first_sample", first_sample, needs_verifier=False, description="the first sample's answer")
    try:
        assert "first_sample" in STRATEGIES
        with pytest.raises(ValueError, match="already registered"):
            register_strategy("first_sample", first_sample)
        got = run("first_sample", policy, None, PROMPTS, budget=3, settings=S, seed=7, extract=extract)
        assert isinstance(got, SearchResult) and calls == [(3, S, 7)]
        ref = best_of_n(policy, None, PROMPTS, n=3, select="majority", settings=S, seed=7, extract=extract)
        assert got.predictions == [row[0].answer for row in ref.candidates]
        both = run_together(["first_sample", "majority"], policy, None, PROMPTS, budget=3, settings=S, seed=7,
                            extract=extract)
        assert list(both) == ["first_sample", "majority"] and both["first_sample"].predictions == got.predictions
        # The applications list what is registered.
        from tts_kernels.apps.options import parse_strategies, search_strategies

        assert "first_sample" in search_strategies()
        assert parse_strategies("first_sample,majority") == ["first_sample", "majority"]
    finally:
        STRATEGIES.pop("first_sample", None)
    with pytest.raises(ValueError, match="strategy must be one of"):
        run("first_sample", policy, None, PROMPTS, budget=3)


def test_bad_arguments(models):
    policy, prm = models
    with pytest.raises(ValueError, match="strategy must be one of"):
        run("mcts", policy, prm, PROMPTS, budget=4)
    with pytest.raises(ValueError, match="strategies must be a non-empty list"):
        run_together("greedy", policy, prm, PROMPTS, budget=4)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        run("greedy", policy, prm, PROMPTS, budget=0)
    with pytest.raises(TypeError, match="budget must be an int"):
        run("greedy", policy, prm, PROMPTS, budget=2.5)
    with pytest.raises(ValueError, match="needs a verifier"):
        run("dvts", policy, None, PROMPTS, budget=4)
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        run("greedy", policy, prm, "Q: 1+1?", budget=1)
    with pytest.raises(TypeError, match="settings must be"):
        run("greedy", policy, prm, PROMPTS, budget=1, settings={"temperature": 0.5})
    with pytest.raises(TypeError, match="Settings.stop_at_answer must be a bool"):
        S.replace(stop_at_answer=1)
    with pytest.raises(ValueError, match="identifier"):
        register_strategy("not a name", lambda *a, **k: None)
    with pytest.raises(TypeError, match="callable"):
        register_strategy("nothing", None)


@pytest.mark.parametrize("field,value,match", [
    ("temperature", -1.0, "temperature must be finite and >= 0"), ("top_p", 0.0, "top_p must be in"),
    ("max_new_tokens", 0, "max_new_tokens must be >= 1"), ("agg", "max", "agg must be one of"),
    ("step_delimiter", "", "step_delimiter must be a non-empty string"), ("stop", "x", "stop must be a list"),
    ("beam_width", True, "beam_width must be an int"), ("lookahead", -1, "lookahead must be >= 0")])
def test_settings_are_checked(field, value, match):
    with pytest.raises((TypeError, ValueError), match=match):
        Settings(**{field: value})
    with pytest.raises(TypeError, match="unknown setting"):
        Settings().replace(temprature=0.5)
    assert Settings(stop=["a"]).stop == ("a",) and Settings().as_dict()["stop"] == []


def test_sal_recipe_holds_search_and_learns_published_values():
    # src/sal/config.py defaults, recipes/*/beam_search.yaml (filter_duplicates: true) and their DVTS output pool
    # (every sibling of a subtree's last expansion), read by hand.
    s = Settings.recipe("sal")
    want = dict(temperature=0.8, top_p=1.0, beam_width=4, num_iterations=40, lookahead=0, agg="last",
                step_delimiter="\n\n", max_new_tokens=2048, max_step_tokens=2048, step_cap="end",
                filter_duplicates=True, stop_at_answer=True, return_siblings=True)
    assert {k: getattr(s, k) for k in want} == want
    assert Settings.recipe("sal", beam_width=2).beam_width == 2  # changes apply on top
    assert Settings.recipe("sal").vote_key == Settings().vote_key  # what the recipe does not set stays
    with pytest.raises(ValueError, match="unknown recipe 'ours'; recipes: \\['sal'\\]"):
        Settings.recipe("ours")
    with pytest.raises(TypeError, match="unknown setting"):
        Settings.recipe("sal", beams=2)
