"""Sequential revisions against parallel sampling at a fixed budget, on the bundled task.

    python benchmarks/bench_revise.py [--problems 200] [--budget 16] [--revisions 0,1,3,7,15] [--json PATH]

``revise`` with ``budget`` samples per problem split into ``budget // (revisions + 1)`` chains of
``revisions + 1`` attempts (``revisions=0``: weighted best-of-N), policy-small, the likelihood verifier
(policy-large), weighted vote over every attempt. Accuracy with a 95% bootstrap interval and the compute
spent (policy tokens include each revision's re-read history).
"""
import argparse
import time

from tts_kernels import bundled
from tts_kernels.apps.report import write_json
from tts_kernels.bench.stats import bootstrap_ci
from tts_kernels.bundled import arith
from tts_kernels.search import Settings, run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--revisions", default="0,1,3,7,15")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    policy, verifier = bundled.load_policy("small"), bundled.load_verifier("likelihood")
    probs = bundled.test_problems(a.problems)
    prompts = [p.prompt for p in probs]
    rows = []
    print(f"{'revisions':>9} {'chains':>6} {'accuracy':>9} {'95% interval':>15} {'policy tok/problem':>19} "
          f"{'GFLOP/problem':>14} {'s':>6}")
    for k in (int(x) for x in a.revisions.split(",")):
        t0 = time.perf_counter()
        res = run("revise", policy, verifier, prompts, budget=a.budget, settings=Settings(revisions=k), seed=0)
        ok = [arith.grade(x, p) for x, p in zip(res.predictions, probs)]
        lo, hi = bootstrap_ci(ok)
        row = {"revisions": k, "chains": res.prompt_info[0]["chains"], "accuracy": sum(ok) / len(ok), "ci95": (lo, hi),
               "policy_tokens_per_problem": res.compute.policy_tokens / len(probs),
               "gflop_per_problem": res.compute.total_flops / len(probs) / 1e9, "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{k:9d} {row['chains']:6d} {row['accuracy']:9.3f} {f'[{lo:.3f}, {hi:.3f}]':>15} "
              f"{row['policy_tokens_per_problem']:19.1f} {row['gflop_per_problem']:14.3f} {row['seconds']:6.1f}")
    write_json(a.json, rows)


if __name__ == "__main__":
    main()
