"""Fitting the compute-optimal table (tts_kernels.bundled.fit_optimal): the cross-validated choice
between a per-level table and one strategy, and the whole command at a toy size on the bundled models."""
import json

import pytest

from tts_kernels import bundled
from tts_kernels.bench.verifiers import baselines, quality
from tts_kernels.bundled import arith
from tts_kernels.bundled.fit_optimal import CANDIDATES, choose_table, main, parse_candidates
from tts_kernels.search import STRATEGIES, register_strategy, run
from tts_kernels.search.compute_optimal import OptimalTable, compute_optimal


def _correct(per_level: dict, levels: list[int], b: int) -> dict:
    """Candidate -> {b: correctness}: right on every problem of the levels it is listed for."""
    return {c: {b: [lv in per_level.get(c, ()) for lv in levels]} for c in CANDIDATES}


def test_per_level_choice_kept_when_it_cross_validates():
    levels = [0, 1] * 20
    correct = _correct({("best_of_n", 1): (0,), ("dvts", 4): (1,)}, levels, 16)
    table, report = choose_table(correct, levels, 2, [16], folds=4, seed=0)
    assert report["16"]["kept"] == "per_level"
    assert table[16] == {0: ("best_of_n", 1), 1: ("dvts", 4)}
    assert report["16"]["cv_accuracy"]["per_level"] == 1.0 and report["16"]["cv_accuracy"]["single"] <= 0.55


def test_single_choice_kept_when_levels_do_not_help():
    levels = [0, 1] * 20
    correct = _correct({("weighted_best_of_n", 1): (0, 1), ("dvts", 4): (1,)}, levels, 4)
    table, report = choose_table(correct, levels, 2, [4], folds=4, seed=0)
    assert report["4"]["kept"] == "single"
    assert table[4] == {0: ("weighted_best_of_n", 1), 1: ("weighted_best_of_n", 1)}
    # A tie goes to the cheaper candidate (listed first).
    correct = _correct({("best_of_n", 1): (0, 1), ("dvts", 4): (0, 1)}, levels, 4)
    table, _ = choose_table(correct, levels, 2, [4], folds=2, seed=0)
    assert set(table[4].values()) == {("best_of_n", 1)}


def test_verifier_quality_by_hand():
    probs = arith.generate(2, seed=5)
    a0, a1 = probs[0].answer, probs[1].answer
    pool = [[f"The answer is {a0}", f"The answer is {a0 + 1}", f"The answer is {a0 + 1}", "no answer"],
            [f"The answer is {a1 + 2}", f"The answer is {a1}", f"The answer is {a1 + 2}", f"The answer is {a1 + 2}"]]
    # Scores as a verifier returns them (float32 values: 0.5 + 0.25 ties 0.75 exactly, in float64 sums too).
    scores = [[0.75, 0.5, 0.25, 0.125], [0.2, 0.1, 0.3, 0.2]]
    q = quality(probs, pool, scores, ks=(2, 4))
    # problem 0: right 0.75 vs wrong 0.5, 0.25, 0.125 -> 3/3; problem 1: right 0.1 vs wrong 0.2, 0.3, 0.2 -> 0/3
    assert q["pair_ordering"] == 0.5 and q["pairs"] == 6
    assert q["best_of_2"] == 0.5 and q["best_of_4"] == 0.5
    assert q["weighted_4"] == 0.5  # problem 0: a0 0.75 vs a0+1 0.75 -> tie to the first seen; problem 1: wrong 0.7
    b = baselines(probs, pool, ks=(2, 4))
    assert b["single"] == 2 / 8 and b["pass_2"] == 1.0 and b["majority_4"] == 0.0


@pytest.mark.models
def test_fit_command_at_a_toy_size(tmp_path):
    out = tmp_path / "table.json"
    assert main(["--problems", "6", "--heldout", "4", "--budgets", "4", "--folds", "2", "--levels", "2",
                 "--chunk-size", "6", "--out", str(out)]) == 0
    table = OptimalTable.load(out)
    meta = json.loads(out.read_text())["meta"]
    assert table.levels == 2 and sorted(table.plans) == [4] and sorted(table.calibrations) == [1]
    assert meta["verifier"] == "prm" and meta["validation"]["split"] == "train" and meta["grid"] == [1, 4]
    assert set(meta["calibration_error"]["1"]) == {"validation", "heldout"}
    choice = meta["strategy_choice"]["4"]
    assert choice["1"]["kept"] == "pilot" and choice["4"]["kept"] in ("per_level", "single")
    for lv, opts in table.plans[4].items():
        assert sorted(opts) == [1, 4] and opts[1][:2] == ("weighted_best_of_n", 1)  # t = pilot: the pilot alone
        assert opts[4][:2] in {tuple(c) for c in CANDIDATES}
        # Each plan's accuracy is its candidate's measured accuracy on the level's validation problems.
        assert opts[4][2] == meta["measured"]["4"][str(lv)]["4"][f"{opts[4][0]}/{opts[4][1]}"]
    # The fitted table drives a search.
    probs = bundled.test_problems(3)
    res = compute_optimal(bundled.load_policy("small"), bundled.load_verifier("prm"), [p.prompt for p in probs],
                          budget=4, table=out, seed=0)
    assert res.samples <= 12 and all(len(c) >= 1 for c in res.candidates)


def test_candidates_are_registered_per_prompt_strategies():
    assert parse_candidates("best_of_n/1,dvts/4,majority") == (("best_of_n", 1), ("dvts", 4), ("majority", 1))
    assert parse_candidates(",".join(f"{s}/{w}" for s, w in CANDIDATES)) == CANDIDATES
    with pytest.raises(ValueError, match="--candidates 'mcts/2': strategy 'mcts' is not a registered strategy"):
        parse_candidates("best_of_n/1,mcts/2")
    with pytest.raises(ValueError, match="strategy 'compute_optimal' pools its budget"):
        parse_candidates("compute_optimal/1")
    with pytest.raises(ValueError, match="beam width >= 1"):
        parse_candidates("dvts/0")
    with pytest.raises(SystemExit, match="'mcts' is not a registered strategy"):
        main(["--candidates", "mcts/2", "--problems", "2", "--folds", "2"])


@pytest.mark.models
def test_fit_measures_a_strategy_registered_later(tmp_path):
    # A strategy registered after the library (here: DVTS under another name) is measured, chosen and run.
    def toy_tree(policy, verifier, prompts, *, budget, settings, seed, extract):
        res = run("dvts", policy, verifier, prompts, budget=budget, settings=settings, seed=seed, extract=extract)
        res.strategy = "toy_tree"
        return res

    register_strategy("toy_tree", toy_tree, select="weighted")
    out = tmp_path / "table.json"
    try:
        assert main(["--problems", "4", "--heldout", "2", "--budgets", "4", "--folds", "2", "--levels", "1",
                     "--chunk-size", "4", "--candidates", "toy_tree/2", "--out", str(out)]) == 0
        table = OptimalTable.load(out)
        assert table.plans[4][0][4][:2] == ("toy_tree", 2)  # the only candidate above the pilot
        assert json.loads(out.read_text())["meta"]["candidates"] == [["toy_tree", 2]]
        probs = bundled.test_problems(2)
        res = compute_optimal(bundled.load_policy("small"), bundled.load_verifier("prm"), [p.prompt for p in probs],
                              budget=4, table=out, seed=0)
        assert {i["strategy"] for i in res.prompt_info} <= {"toy_tree", "pilot"} and res.samples <= 8
    finally:
        STRATEGIES.pop("toy_tree", None)
    with pytest.raises(ValueError, match="'toy_tree' is not a registered strategy"):
        OptimalTable.load(out)
