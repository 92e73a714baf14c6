"""Early-stopping strategies against the full-budget ones, on the bundled task.

    python benchmarks/bench_early_stop.py [--model bundled] [--problems 200] [--budgets 16,64] [--json PATH]

``--model bundled``: policy-small, the chosen verifier (default: the bundled PRM), held-out problems;
``--model smollm2-135m`` (a fetched real model, ``tts-kernels fetch-models``): the word problems of
:mod:`tts_kernels.bench.real_models` in its chat template, its own likelihood as verifier. One seed per problem
(so ``deepconf``, ``deepconf_offline`` and ``adaptive_consistency`` draw exactly ``majority``'s candidates
and stop some of them early: the comparisons are paired). Per strategy and budget: accuracy with a 95%
bootstrap interval, the paired bootstrap interval of its difference to ``majority`` (voting methods)
or ``best_of_n`` (verifier methods) at the same budget, policy tokens per problem and their share of
the reference's, total FLOPs, wall seconds. Then KV blocks in use over time for one chunk of
``deepconf`` against ``deepconf_offline`` (the same candidates, none stopped).
"""
import argparse
import time

from tts_kernels import bundled
from tts_kernels.apps.report import write_json
from tts_kernels.bench.stats import bootstrap_ci, paired_bootstrap_ci
from tts_kernels.bundled import arith
from tts_kernels.search import STRATEGIES, Settings, run
from tts_kernels.search.answers import extract_answer
from tts_kernels.search.early_stop import deepconf, deepconf_offline

VOTING = ("majority", "deepconf", "deepconf_offline", "adaptive_consistency")


DEFAULT_RUNS = ("majority,deepconf,deepconf:deepconf_keep=0.1,deepconf_offline,deepconf_offline:deepconf_keep=0.1,"
                "adaptive_consistency,adaptive_consistency:stop_confidence=0.8,best_of_n,weighted_best_of_n,"
                "speculative_rejection,rebase")


def parse_runs(text: str) -> list[tuple[str, str, dict]]:
    """``name[:field=value[:field=value]],...`` -> (label, strategy, Settings changes)."""
    out = []
    for item in text.split(","):
        name, *kv = item.split(":")
        changes = {k: float(v) if "." in v else int(v) for k, v in (x.split("=") for x in kv)}
        out.append((item.replace(":", " ") if kv else name, name, changes))
    return out


def chunked(name, policy, verifier, prompts, budget, settings, seeds, chunk, extract):
    preds, compute, seconds = [], None, 0.0
    for i in range(0, len(prompts), chunk):
        t0 = time.perf_counter()
        res = run(name, policy, verifier, prompts[i:i + chunk], budget=budget, settings=settings,
                  seed=seeds[i:i + chunk], extract=extract)
        seconds += time.perf_counter() - t0
        preds += res.predictions
        compute = res.compute if compute is None else compute + res.compute
    return preds, compute, seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--budgets", default="16,64")
    ap.add_argument("--chunk", type=int, default=50, help="problems per call")
    ap.add_argument("--verifier", default="prm")
    ap.add_argument("--strategies", default=DEFAULT_RUNS,
                    help="runs: strategy[:setting=value...] (e.g. deepconf:deepconf_keep=0.1)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--window", type=int, default=8,
                    help="confidence_window (tokens; default 8: the bundled task's candidates are ~40 tokens long)")
    ap.add_argument("--model", default="bundled", help="bundled, or a fetched real model (smollm2-135m, gemma3-270m)")
    a = ap.parse_args()
    if a.model == "bundled":
        policy, verifier = bundled.load_policy("small"), bundled.load_verifier(a.verifier)
        probs = bundled.test_problems(a.problems)
        prompts = [p.prompt for p in probs]
        grade, extract, settings = arith.grade, extract_answer, Settings()
    else:
        from tts_kernels.bench import real_models as rm
        from tts_kernels.bundled.real_models import folder
        from tts_kernels.models import HFPRM, HFPolicy

        policy = HFPolicy.from_pretrained(folder(a.model))
        verifier = HFPRM(policy.model, policy.tokenizer, head="likelihood")  # the model's own likelihood
        probs = [ans for _, ans in rm.PROBLEMS[: a.problems]]
        prompts = rm.chat_prompts(policy.tokenizer, [q for q, _ in rm.PROBLEMS[: a.problems]])
        grade, extract = (lambda pred, ans: pred == ans), rm.extract_number
        settings = Settings(max_new_tokens=128, max_step_tokens=48, num_iterations=4, temperature=0.7,
                            confidence_window=a.window)
    seeds = [1000 + i for i in range(len(prompts))]
    if a.model == "bundled":
        settings = settings.replace(confidence_window=a.window)
    runs = [r for r in parse_runs(a.strategies) if r[1] in STRATEGIES]
    rows, ok_of = [], {}
    print(f"{'strategy':>30} {'N':>3} {'accuracy':>8} {'95% interval':>15} {'vs reference (paired)':>26} "
          f"{'policy tok/problem':>18} {'share':>6} {'gen share':>9} {'GFLOP/problem':>13} {'s':>6}")
    for budget in (int(b) for b in a.budgets.split(",")):
        for label, name, changes in runs:
            preds, comp, secs = chunked(name, policy, verifier, prompts, budget, settings.replace(**changes), seeds,
                                        a.chunk, extract)
            ok = [grade(x, p) for x, p in zip(preds, probs)]
            ok_of[label, budget] = ok
            ref = "majority" if name in VOTING else "best_of_n"
            row = {"strategy": label, "budget": budget, "accuracy": sum(ok) / len(ok), "ci95": bootstrap_ci(ok),
                   "policy_tokens_per_problem": comp.policy_tokens / len(probs),
                   "generated_per_problem": comp.policy_generated_tokens / len(probs),
                   "prm_tokens_per_problem": comp.prm_tokens / len(probs),
                   "gflop_per_problem": comp.total_flops / len(probs) / 1e9, "seconds": secs, "reference": ref,
                   "settings": changes}
            base = next((r for r in rows if r["strategy"] == ref and r["budget"] == budget), None)
            if base is not None and label != ref:
                row["diff_ci95"] = paired_bootstrap_ci(ok, ok_of[ref, budget])
                row["token_share"] = row["policy_tokens_per_problem"] / base["policy_tokens_per_problem"]
                row["generated_share"] = row["generated_per_problem"] / base["generated_per_problem"]
                row["flop_share"] = row["gflop_per_problem"] / base["gflop_per_problem"]
                row["time_share"] = secs / base["seconds"]
            rows.append(row)
            d = row.get("diff_ci95")
            print(f"{label:>30} {budget:>3} {row['accuracy']:8.3f} [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] "
                  f"{'' if d is None else f'[{d[0]:+.3f}, {d[1]:+.3f}] vs {ref}':>26} "
                  f"{row['policy_tokens_per_problem']:18.1f} {row.get('token_share', 1.0):6.2f} "
                  f"{row.get('generated_share', 1.0):9.2f} "
                  f"{row['gflop_per_problem']:13.3f} {secs:6.1f}", flush=True)
    # KV blocks in use over time: one chunk of deepconf with and without aborts
    budget = max(int(b) for b in a.budgets.split(","))
    kv = {}
    for label, driver in (("deepconf", deepconf), ("full", deepconf_offline)):  # the same candidates, uncut
        res = driver(policy, None, prompts[:a.chunk], n=budget, settings=settings, seed=seeds[:a.chunk],
                     track_blocks=True, extract=extract)
        series = res.info["blocks_in_use"]
        kv[label] = {"series": series, "peak": max(b for _, b in series),
                     "block_steps": sum(b * (t2 - t1) for (t1, b), (t2, _) in zip(series, series[1:])),
                     "steps": series[-1][0], "policy_tokens": res.compute.policy_tokens}
        print(f"KV blocks, {label:>8}: peak {kv[label]['peak']}, block-steps {kv[label]['block_steps']}, "
              f"decode steps {kv[label]['steps']}, policy tokens {res.compute.policy_tokens}")
    if a.json:
        write_json(a.json, {"rows": rows, "kv_blocks": kv, "problems": len(probs), "model": a.model,
                            "verifier": a.verifier if a.model == "bundled" else "likelihood",
                            "settings": settings.as_dict()})


if __name__ == "__main__":
    main()
