"""The console entry points run end to end and write what they promise (no timing asserted)."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "tts_kernels", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_bench_quick_writes_table(tmp_path):
    res = run_cli("bench", "--quick", "--cpu-only", "--skip-search", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "bench.json").read_text())
    ops = [r["op"] for r in data["rows"]]
    assert ops.count("beam_topk") == 2 and "kv_reorder_" in ops  # fp32 and bf16, and the cache reorder
    assert any(op.startswith("sample") for op in ops)
    for r in data["rows"]:
        assert r["peer_ms"] > 0 and r["ours_ms"] > 0 and r["ratio"] > 0 and r["gbs"] > 0
    with open(tmp_path / "bench.csv") as f:
        assert len(list(csv.DictReader(f))) == len(data["rows"])
    assert "ratio" in res.stdout and "kv_reorder_" in res.stdout


@pytest.mark.models
def test_check_quick_matches_generate(tmp_path):
    res = run_cli("check", "--quick", "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads((tmp_path / "check.json").read_text())
    assert data["beam_search_identical"] is True
    assert "identical to transformers generate(): sequences True, scores True" in res.stdout


@pytest.mark.models
@pytest.mark.parametrize("verifier,chunk", [("likelihood", "20"), ("prm", "2")])  # 3 problems: 1 chunk, 2 chunks
def test_demo_reduced_end_to_end(tmp_path, verifier, chunk):
    res = run_cli("demo", "--problems", "3", "--budgets", "1,4", "--no-progress", "--out", str(tmp_path),
                  "--verifier", verifier, "--chunk-size", chunk, "--thinking-mins", "0,16")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    from tts_kernels.search import STRATEGIES

    searches = [s for s in STRATEGIES if s != "greedy"]  # every registered strategy runs by default
    assert {"majority", "best_of_n", "weighted_best_of_n", "prm_beam_search", "dvts", "compute_optimal",
            "adaptive_best_of_n", "particle_filtering", "entropic_particle_filtering"} <= set(searches)
    # 3 problems x (greedy small, greedy large, 7 searches x 2 budgets)
    assert len(lines) == 3 * (2 + 2 * len(searches))
    assert {(x["model"], x["strategy"], x["budget"]) for x in lines} == (
        {("small", "greedy", 1), ("large", "greedy", 1)} | {("small", s, b) for s in searches for b in (1, 4)})
    for x in lines:
        assert x["correct"] == (x["prediction"] is not None and int(x["prediction"]) == x["answer"])
        if x["strategy"] in ("majority", "best_of_n", "weighted_best_of_n"):
            assert len(x["answers"]) == x["budget"] == len(x["scores"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["verifier"] == verifier and f"verifier {verifier}" in res.stdout
    assert len(summary["rows"]) == 2 + 2 * len(searches)
    for row in summary["rows"]:
        assert row["correct"] == sum(x["correct"] for x in lines if (x["model"], x["strategy"], x["budget"]) ==
                                     (row["model"], row["strategy"], row["budget"]))
        assert row["flops_per_problem"] > 0 and row["policy_tokens_per_problem"] > 0
        assert row["samples_per_problem"] <= row["budget"]
    assert summary["findings"] and "what this run shows" in res.stdout and "accuracy" in res.stdout
    # Intervals: every row's 95% bootstrap interval holds its accuracy; the findings compare at equal budget.
    for row in summary["rows"]:
        lo, hi = row["ci95"]
        assert lo <= row["accuracy"] <= hi and len(row["outcomes"]) == 3
    assert "95% interval" in res.stdout
    assert any(f.startswith("verifier-guided searches vs majority voting") for f in summary["findings"])
    assert any(f.startswith("compute_optimal vs the best uniform strategy") for f in summary["findings"])
    assert any(f.startswith("efficiency: compute_optimal") for f in summary["findings"])
    # The fitted table is the bundled PRM's: printed with it, not used with another verifier.
    assert ("compute_optimal table (validation split" in res.stdout) == (verifier == "prm")
    assert ("no fitted table for verifier" in res.stdout) == (verifier != "prm")
    assert (summary["settings"]["optimal_table"] is not None) == (verifier == "prm")
    # The thinking policy's curve: a forced minimum is thought at least (its tokens counted apart).
    thinking = summary["thinking"]
    assert [r["min_thinking"] for r in thinking] == [0, 16] and "thinking budget (policy-think" in res.stdout
    assert all(0 <= r["accuracy"] <= 1 and r["tokens_per_problem"] >= r["thinking_per_problem"] for r in thinking)
    assert thinking[1]["thinking_per_problem"] >= 16 and any("thinking policy" in f for f in summary["findings"])
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_bad_flags(tmp_path):
    res = run_cli("demo", "--budgets", "4,x", "--out", str(tmp_path))
    assert res.returncode != 0 and "--budgets" in res.stderr
    res = run_cli("demo", "--strategies", "mcts", "--out", str(tmp_path))
    assert res.returncode != 0 and "mcts" in res.stderr
    res = run_cli("demo", "--chunk-size", "0", "--out", str(tmp_path))
    assert res.returncode != 0 and "--chunk-size" in res.stderr
    res = run_cli("demo", "--verifier", "orm", "--out", str(tmp_path))
    assert res.returncode != 0 and "--verifier" in res.stderr


def test_demo_and_eval_share_the_verifier_and_strategies_flags():
    from tts_kernels.apps import cli
    from tts_kernels.search import STRATEGIES

    sub = next(a for a in cli.parser()._actions if a.dest == "cmd").choices

    def option(cmd, flag):
        return next(a for a in sub[cmd]._actions if flag in a.option_strings)

    demo_v, eval_v = option("demo", "--verifier"), option("eval", "--verifier")
    assert demo_v.choices == eval_v.choices and demo_v.default == eval_v.default == "prm"
    assert option("demo", "--strategies").dest == option("eval", "--strategies").dest == "strategies"
    # Every registered strategy but greedy (the reference line) runs in the demo by default.
    assert option("demo", "--strategies").default.split(",") == [s for s in STRATEGIES if s != "greedy"]
    args = cli.parser().parse_args(["eval", "--out", "x", "--strategy", "dvts", "--prm", "folder"])
    assert args.strategies == "dvts" and args.verifier_model == "folder"  # the old spellings still parse
