"""compute_optimal: never over budget, exact where it can be, allocation from allocate_budget, the pilot
kept in every prompt's pick, a strategy per level from a plan or a fitted table; the table's pieces
(calibration, levels, choice) against what they are defined to do.

``budget`` is samples per prompt (as for every strategy): ``budget * P`` in all."""
import json

import pytest
import torch
from tiny_models import search_models

from tts_kernels.ops.allocate import allocate_budget, expected_coverage
from tts_kernels.search import STRATEGIES, Settings, best_of_n, register_strategy, run
from tts_kernels.search.compute_optimal import (Calibration, OptimalTable, _top_up, calibration_error,
                                                compute_optimal, default_plan, pilot_features)
from tts_kernels.search.result import Candidate, select_candidates

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min)

PROMPTS = ["Q: 1+1?\n", "Q: 2*3?\n", "Q: 9-4?\n", "Q: 7*7?\n", "Q: 8/2?\n"]
KW = dict(max_new_tokens=10, max_step_tokens=8, num_iterations=2, step_delimiter="e", temperature=1.0,
          extract=lambda t: t[:1] or None)  # toy answers: the first character
P = len(PROMPTS)


@pytest.fixture(scope="module")
def models():
    return search_models()


def _check_pick(res, rules):
    """Each prediction is its rule's pick over all of the prompt's candidates (pilot and search together)."""
    for i, rule in enumerate(rules):
        c, a = select_candidates([res.candidates[i]], rule)
        assert (res.chosen[i], res.predictions[i]) == (c[0], a[0])


@pytest.mark.parametrize("budget", [2, 3, 5, 10])
def test_never_over_budget_and_allocation_is_optimal(models, budget):
    policy, prm = models
    res = compute_optimal(policy, prm, PROMPTS, budget=budget, pilot_n=2, levels=2, beam_width=2, seed=1,
                          strategies=("weighted_best_of_n", "prm_beam_search"), **KW)
    info = res.prompt_info
    assert res.samples <= budget * P
    assert res.samples == 2 * P + sum(r["n"] for r in info)
    assert res.compute.prm_tokens > 0 and res.compute.policy_flops > 0 and res.compute.prm_flops > 0
    assert res.compute.policy_prefill_tokens >= sum(len(policy.encode(p)) for p in PROMPTS)
    p = torch.tensor([r["p"] for r in info], dtype=torch.float64)
    alloc = (allocate_budget(p, budget * P, n_min=2) - 2).tolist()  # the pilot counts toward the coverage
    plan = default_plan(2, ("weighted_best_of_n", "prm_beam_search"), 2)
    widths = [max(1, min(plan[r["level"]][1], a)) for r, a in zip(info, alloc)]  # a beam no wider than its samples
    want = [a - a % w for a, w in zip(alloc, widths)]
    _top_up(want, widths, p.tolist(), budget * P - 2 * P - sum(want), None, 2)  # what rounding freed, handed back
    for i, r in enumerate(info):
        assert r["n"] == want[i]
        assert r["strategy"] == (plan[r["level"]][0] if want[i] else "pilot")
        assert len(res.candidates[i]) >= 2  # the pilot's candidates are always kept
    # Level 0 holds the prompts with the highest estimated success probability.
    easy = [r["p"] for r in info if r["level"] == 0]
    hard = [r["p"] for r in info if r["level"] == 1]
    assert min(easy) >= max(hard)
    _check_pick(res, ["best" if r["strategy"] == "prm_beam_search" else "weighted" for r in info])
    # Exact whenever a best-of-N prompt can take the single samples rounding frees.
    if any(r["level"] == 0 for r in info):
        assert res.samples == budget * P


def test_top_up_hands_back_where_coverage_rises_most():
    p = [0.5, 0.1, 0.0]
    alloc, widths = [1, 0, 0], [1, 4, 1]
    left = _top_up(alloc, widths, p, 6, None)
    assert left == 0 and sum(alloc) == 7
    # Greedy by marginal coverage per sample, checked step by step against expected_coverage.
    a2, left2 = [1, 0, 0], 6
    while left2:
        gains = []
        for i in range(3):
            if widths[i] > left2:
                gains.append(-1.0)
                continue
            nxt = list(a2)
            nxt[i] += widths[i]
            gains.append(float(expected_coverage(torch.tensor(p), torch.tensor(nxt)).sum()
                               - expected_coverage(torch.tensor(p), torch.tensor(a2)).sum()) / widths[i])
        i = max(range(3), key=lambda k: (gains[k], -k))
        a2[i] += widths[i]
        left2 -= widths[i]
    assert alloc == a2
    assert _top_up([0, 0], [4, 4], [0.5, 0.5], 3, None) == 3  # nothing fits: left as it is
    assert _top_up([0, 0], [1, 1], [0.5, 0.5], 3, 1) == 1  # n_max caps each prompt


def _table(tmp_path):
    w, b = ("weighted_best_of_n", 1), ("prm_beam_search", 2)
    plans = {2: {0: {1: (*w, 0.8), 2: (*w, 0.9), 4: (*b, 0.95)},  # pilot 1 at budget 2
                 1: {1: (*w, 0.1), 2: (*b, 0.3), 4: (*b, 0.4)}},
             4: {0: {1: (*w, 0.8), 4: (*w, 0.9)}, 1: {1: (*w, 0.1), 4: (*b, 0.3)}}}
    t = OptimalTable({1: Calibration((1.0, 0.5, 2.0), -1.0), 2: Calibration((0.8, 0.4, 1.0), -0.5)},
                     edges=(0.6,), plans=plans, meta={"verifier": "toy"})
    path = tmp_path / "table.json"
    t.save(path)
    return t, path


def test_table_round_trip_choice_and_levels(tmp_path):
    t, path = _table(tmp_path)
    back = OptimalTable.load(path)
    assert back.to_dict() == t.to_dict()
    assert back.levels == 2
    assert back.level(torch.tensor([0.9, 0.6, 0.59, 0.0])) == [0, 0, 1, 1]
    assert back.row(3) is back.plans[2] and back.row(100) is back.plans[4] and back.row(1) is back.plans[2]
    assert back.choose(2, 1, 2) == ("prm_beam_search", 2) and back.choose(2, 1, 3) == ("prm_beam_search", 2)
    assert back.choose(2, 0, 1) == ("weighted_best_of_n", 1) and back.choose(2, 0, 100) == ("prm_beam_search", 2)
    assert back.calibration(1).coef == (1.0, 0.5, 2.0) and back.calibration(3).coef == (0.8, 0.4, 1.0)
    # One strategy everywhere (adaptive_best_of_n): its own measured accuracies where meta holds them.
    back.meta["measured"] = {"2": {"1": {"4": {"weighted_best_of_n/1": 0.25}}}}
    only = back.only("weighted_best_of_n")
    assert {p[:2] for row in only.plans.values() for opts in row.values() for p in opts.values()} == \
        {("weighted_best_of_n", 1)}
    assert only.plans[2][1][4][2] == 0.25 and only.plans[2][1][2][2] == 0.3  # measured / as it was
    with pytest.raises(ValueError, match="descending"):
        OptimalTable(t.calibrations, (0.2, 0.5), t.plans)
    with pytest.raises(ValueError, match=r"plans\[2\]\[1\]"):
        OptimalTable(t.calibrations, (0.6,), {2: {0: t.plans[2][0]}})
    with pytest.raises(ValueError, match=r"plans\[2\]\[0\]\[1\]"):
        OptimalTable(t.calibrations, (0.6,), {2: {0: {1: ("mcts", 1, 0.5)}, 1: t.plans[2][1]}})
    with pytest.raises(ValueError, match="calibrations"):
        OptimalTable({}, (0.6,), t.plans)


def _best_allocation(hulls_levels, row, pilot_n, total):
    """Brute force over every prompt's fitted sample counts."""
    import itertools

    opts = [[t for t in sorted(row[lv]) if t >= pilot_n] for lv in hulls_levels]
    best = None
    for ts in itertools.product(*opts):
        if sum(ts) <= total:
            v = sum(row[lv][t][2] for lv, t in zip(hulls_levels, ts))
            best = v if best is None or v > best else best
    return best


@pytest.mark.parametrize("total", [3, 5, 6, 8, 12])
def test_allocation_is_the_knapsack_optimum_on_concave_curves(tmp_path, total):
    t, _ = _table(tmp_path)
    levels = [0, 1, 1]
    got = t.allocate(2, levels, 1, total)
    assert sum(got) <= total and all(x >= 1 for x in got)
    row = t.row(2)
    value = sum(row[lv][x][2] for lv, x in zip(levels, got))
    # Both levels' curves are concave here, so the greedy is optimal wherever the last upgrade fits.
    assert value == pytest.approx(_best_allocation(levels, row, 1, total))


def test_allocation_buys_flat_upgrades_last(tmp_path):
    t, _ = _table(tmp_path)
    flat = OptimalTable(t.calibrations, t.edges, {2: {0: {1: ("weighted_best_of_n", 1, 0.9),
                                                         4: ("prm_beam_search", 2, 0.9)},
                                                     1: {1: ("weighted_best_of_n", 1, 0.1), 4: ("dvts", 2, 0.5)}}})
    assert flat.allocate(2, [0, 1], 1, 5) == [1, 4]  # the upgrade that buys something first
    assert flat.allocate(2, [0, 1], 1, 100) == [4, 4]  # then, with budget left, the one that measured no gain


def test_calibration_fit_recovers_a_known_logistic_model():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    coef, b = torch.tensor([1.5, -0.7, 0.3], dtype=torch.float64), -0.4
    p = torch.sigmoid(x @ coef + b)
    trials = torch.full((4000,), 16.0, dtype=torch.float64)
    succ = torch.binomial(trials, p, generator=g)
    cal = Calibration.fit(x, succ, trials, l2=0.0)
    torch.testing.assert_close(torch.tensor(cal.coef, dtype=torch.float64), coef, atol=0.06, rtol=0)
    assert abs(cal.intercept - b) < 0.06
    # Calibrated on its own data: small error; a constant 0.5 guess is far off for this spread.
    assert calibration_error(cal.predict(x), succ, trials) < 0.03
    assert calibration_error(torch.full_like(p, 0.9), succ, trials) > 0.2


def test_calibration_error_by_hand():
    p = torch.tensor([0.05, 0.15, 0.95])
    succ, trials = torch.tensor([0.0, 4.0, 10.0]), torch.tensor([10.0, 10.0, 10.0])
    # bins: 0 -> |0.5 - 0| = 0.5, 1 -> |1.5 - 4| = 2.5, 9 -> |9.5 - 10| = 0.5; over 30 trials
    assert calibration_error(p, succ, trials) == pytest.approx(3.5 / 30)


def test_pilot_features():
    rows = [[Candidate("a", "1", 0.5), Candidate("b", "1", 0.9), Candidate("c", "2", float("nan"))],
            [Candidate("d", None, 0.2)]]
    f = pilot_features(rows)
    lg = lambda v: torch.logit(torch.tensor(v, dtype=torch.float64)).item()  # noqa: E731
    assert f[0].tolist() == pytest.approx([lg(1.4 / 3), lg(0.9), 2 / 3])
    assert f[1].tolist() == pytest.approx([lg(0.2), lg(0.2), 0.0])


def test_with_a_table_levels_strategies_and_allocation_come_from_it(models, tmp_path):
    policy, prm = models
    t, path = _table(tmp_path)
    res = compute_optimal(policy, prm, PROMPTS, budget=2, pilot_n=1, table=path, seed=2, **KW)
    lv = [r["level"] for r in res.prompt_info]
    want = [x - 1 for x in t.allocate(2, lv, 1, 2 * P)]
    for r, a in zip(res.prompt_info, want):
        assert r["level"] == t.level(torch.tensor([r["p"]]))[0]
        if r["strategy"] != "pilot":  # the plan of its (level, samples); a beam search's count a multiple of it
            assert (r["strategy"], r["beam_width"]) == t.choose(2, r["level"], 1 + a)
            assert r["n"] % r["beam_width"] == 0
    assert res.samples <= 2 * P
    # Settings.optimal_table is what the registered strategy reads; the same result either way.
    got = run("compute_optimal", policy, prm, PROMPTS, budget=2, seed=2, extract=KW["extract"],
              settings=Settings(optimal_table=str(path), **{k: v for k, v in KW.items() if k != "extract"}))
    assert got.predictions == res.predictions and got.samples == res.samples
    assert [i["strategy"] for i in got.prompt_info] == [i["strategy"] for i in res.prompt_info]


def test_max_rows_batches_without_changing_the_allocation(models):
    policy, prm = models
    a = compute_optimal(policy, prm, PROMPTS, budget=6, pilot_n=2, levels=2, seed=3, **KW)
    b = compute_optimal(policy, prm, PROMPTS, budget=6, pilot_n=2, levels=2, seed=3, max_rows=4, **KW)
    # The pilots differ (other batches draw under other seeds) but each run spends exactly what it allocates.
    for res in (a, b):
        assert res.samples == 2 * P + sum(r["n"] for r in res.prompt_info) <= 6 * P
        assert all(len(c) == 2 + r["n"] for c, r in zip(res.candidates, res.prompt_info)
                   if r["strategy"] in ("pilot", "weighted_best_of_n"))
    # Per-prompt seeds: batching is invisible.
    seeds = [11, 12, 13, 14, 15]
    c = compute_optimal(policy, prm, PROMPTS, budget=6, pilot_n=2, levels=2, seed=seeds, **KW)
    d = compute_optimal(policy, prm, PROMPTS, budget=6, pilot_n=2, levels=2, seed=seeds, max_rows=4, **KW)
    assert c.predictions == d.predictions
    assert [(r["level"], r["strategy"], r["n"]) for r in c.prompt_info] == \
        [(r["level"], r["strategy"], r["n"]) for r in d.prompt_info]
    assert [[x.text for x in row] for row in c.candidates] == [[x.text for x in row] for row in d.candidates]


def test_bad_arguments(models, tmp_path):
    policy, prm = models
    with pytest.raises(ValueError, match="below the pilot"):
        compute_optimal(policy, prm, PROMPTS, budget=1, pilot_n=2, **KW)
    with pytest.raises(ValueError, match="strategies"):
        compute_optimal(policy, prm, PROMPTS, budget=5, pilot_n=2, strategies=("mcts",), **KW)
    with pytest.raises(ValueError, match="plan\\[1\\]"):
        compute_optimal(policy, prm, PROMPTS, budget=5, pilot_n=2, levels=2, plan={0: ("best_of_n", 1)}, **KW)
    with pytest.raises(ValueError, match="needs a verifier"):
        compute_optimal(policy, None, PROMPTS, budget=5, **KW)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"calibrations": {}}))
    with pytest.raises(ValueError, match="table: cannot read"):
        compute_optimal(policy, prm, PROMPTS, budget=5, table=bad, **KW)
    with pytest.raises(ValueError, match="max_rows"):
        Settings(max_rows=-1)
    with pytest.raises(ValueError, match="optimal_table"):
        Settings(optimal_table=3)


def _toy_table(strategy: str, calibration_levels: int = 1) -> OptimalTable:
    """Every level: the pilot alone (1 sample) or ``strategy`` at beam width 2 for 3 samples in all."""
    return OptimalTable({1: Calibration((0.0, 0.0, 0.0), 0.0)}, edges=(), plans={
        3: {0: {1: ("weighted_best_of_n", 1, 0.1), 3: (strategy, 2, 0.5)}}})


@pytest.mark.parametrize("select", [None, "weighted"])
def test_a_strategy_registered_later_runs_where_the_table_names_it(models, select):
    policy, prm = models
    calls = []

    def toy_last(policy, verifier, prompts, *, budget, settings, seed, extract):
        calls.append((list(prompts), budget, settings.beam_width, seed))
        res = best_of_n(policy, verifier, prompts, n=budget, select="best", settings=settings, seed=seed,
                        extract=extract)
        res.strategy = "toy_last"  # its own rule: the last candidate
        res.chosen = [len(row) - 1 for row in res.candidates]
        res.predictions = [row[-1].answer for row in res.candidates]
        return res

    register_strategy("toy_last", toy_last, select=select, description="a test's strategy")
    try:
        table = _toy_table("toy_last")
        seeds = [21, 22, 23, 24, 25]
        res = compute_optimal(policy, prm, PROMPTS, budget=3, table=table, seed=seeds, **KW)
        # The knapsack gives every prompt t = 3: its 1-sample pilot and 2 samples of toy_last at beam width 2.
        assert calls == [(PROMPTS, 2, 2, [s + 1 for s in seeds])]  # one call, the searches' seeds (seed + 1)
        assert [(r["strategy"], r["beam_width"], r["n"]) for r in res.prompt_info] == [("toy_last", 2, 2)] * P
        assert res.samples == 3 * P  # exact: pilot 1 + 2 per prompt, as allocated and as spent
        pilot = best_of_n(policy, prm, PROMPTS, n=1, select="weighted", seed=seeds, max_new_tokens=10,
                          max_step_tokens=8, num_iterations=2, step_delimiter="e", temperature=1.0,
                          extract=KW["extract"])
        search = best_of_n(policy, prm, PROMPTS, n=2, select="best", seed=[s + 1 for s in seeds], max_new_tokens=10,
                           max_step_tokens=8, num_iterations=2, step_delimiter="e", temperature=1.0, beam_width=2,
                           extract=KW["extract"])
        assert res.compute == pilot.compute + search.compute
        for i in range(P):
            assert [c.text for c in res.candidates[i]] == [c.text for c in pilot.candidates[i] + search.candidates[i]]
        if select is None:  # its own pick, counted after the pilot's candidates
            assert res.chosen == [3 - 1] * P and res.predictions == [row[-1].answer for row in res.candidates]
        else:  # its declared rule over the pilot and the search together
            _check_pick(res, ["weighted"] * P)
        # A plan without a table names it too.
        calls.clear()
        got = compute_optimal(policy, prm, PROMPTS, budget=4, pilot_n=2, levels=1, plan={0: ("toy_last", 2)},
                              seed=3, **KW)
        assert all(r["strategy"] in ("toy_last", "pilot") for r in got.prompt_info)
        assert sum(len(c[0]) * c[1] for c in calls) == sum(r["n"] for r in got.prompt_info) == got.samples - 2 * P
    finally:
        STRATEGIES.pop("toy_last", None)
    with pytest.raises(ValueError, match=r"plans\[3\]\[0\]\[3\]: strategy 'toy_last' is not a registered strategy"):
        _toy_table("toy_last")


def test_plans_name_registered_per_prompt_strategies_only(models):
    policy, prm = models
    with pytest.raises(ValueError, match=r"plans\[3\]\[0\]\[3\]: strategy 'compute_optimal' pools its budget"):
        _toy_table("compute_optimal")
    with pytest.raises(ValueError, match=r"plan\[0\]: strategy 'mcts' is not a registered strategy"):
        compute_optimal(policy, prm, PROMPTS, budget=4, pilot_n=1, levels=1, plan={0: ("mcts", 1)}, **KW)
    with pytest.raises(ValueError, match="strategies: strategy 'adaptive_best_of_n' pools"):
        compute_optimal(policy, prm, PROMPTS, budget=4, strategies=("adaptive_best_of_n",), **KW)

    def overspender(policy, verifier, prompts, *, budget, settings, seed, extract):
        res = best_of_n(policy, verifier, prompts, n=budget + 1, settings=settings, seed=seed, extract=extract)
        return res

    register_strategy("toy_overspend", overspender)
    try:
        with pytest.raises(RuntimeError, match="strategy 'toy_overspend' spent"):
            compute_optimal(policy, prm, PROMPTS, budget=3, table=_toy_table("toy_overspend"), seed=0, **KW)
    finally:
        STRATEGIES.pop("toy_overspend", None)


def test_phases_over_parts_equal_one_call(models):
    # What eval does: each part's pilot, one allocation over every prompt, each part's searches. With per-prompt
    # seeds that is the one call over all prompts.
    policy, prm = models
    strat = STRATEGIES["compute_optimal"].fn
    s = Settings(levels=2, beam_width=2, **{k: v for k, v in KW.items() if k != "extract"})
    seeds, ex = [31, 32, 33, 34, 35], KW["extract"]
    one = run("compute_optimal", policy, prm, PROMPTS, budget=6, settings=s, seed=seeds, extract=ex)
    parts = [[0, 1], [2, 3, 4]]
    pilots = [strat.pilot(policy, prm, [PROMPTS[i] for i in part], budget=6, table=None, settings=s,
                          seed=[seeds[i] for i in part], extract=ex) for part in parts]
    feats = torch.cat([pilot_features(pl.candidates) for pl in pilots])
    alloc = strat.allocate(feats, budget=6, table=None, settings=s)
    assert alloc.samples <= 6 * P and len(alloc) == P
    got = [strat.search(policy, prm, [PROMPTS[i] for i in part], pl, alloc.take(part), settings=s,
                        seed=[seeds[i] for i in part], extract=ex) for part, pl in zip(parts, pilots)]
    assert sum(g.samples for g in got) == one.samples
    assert [r for g in got for r in g.prompt_info] == one.prompt_info
    assert [p for g in got for p in g.predictions] == one.predictions
    assert [[c.text for c in row] for g in got for row in g.candidates] == [[c.text for c in row]
                                                                             for row in one.candidates]
