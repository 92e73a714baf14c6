"""The main job: test-time scaling on the bundled models, measured.

    tts-kernels demo [--problems 40] [--budgets 1,4,16,64] [--device cpu] [--out demo_out]

On held-out arithmetic problems (:mod:`tts_kernels.bundled.arith`, never seen in
training) the small bundled policy runs every registered strategy
(:data:`tts_kernels.search.STRATEGIES`: majority vote, best-of-N, weighted best-of-N, PRM
beam search, DVTS, compute-optimal search, adaptive (allocation-only) best-of-N, and any
strategy registered since) at each budget through :func:`tts_kernels.search.run_together`,
guided by the chosen verifier; both policies run greedy as reference lines. It prints
accuracy against budget and against the compute actually spent (policy and PRM tokens,
FLOPs), states what the numbers show, and writes ``results.jsonl`` (one line per problem,
strategy and budget), ``summary.json`` and ``scaling.png`` under ``--out``.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from .. import bundled
from ..bundled import arith
from ..search import STRATEGIES, Settings, run_together
from .options import (add_strategies_argument, add_verifier_argument, parse_budgets, parse_strategies,
                      search_strategies)
from .report import machine_info, plot_scaling, print_summary, summarize


def add_arguments(ap) -> None:
    ap.add_argument("--out", default="demo_out", help="directory for results.jsonl, summary.json, scaling.png")
    ap.add_argument("--problems", type=int, default=40, help="held-out problems (default 40)")
    ap.add_argument("--budgets", default="1,4,16,64", help="samples per problem (default 1,4,16,64)")
    add_strategies_argument(ap, ",".join(search_strategies()), "; greedy always runs for both policies")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=None, help="folder with policy-small, policy-large, prm (default: bundled)")
    add_verifier_argument(ap)
    ap.add_argument("--chunk-size", type=int, default=20,
                    help="problems per batch (default 20; peak memory ~3.8 GB at budget 64): memory grows with it "
                         "times the budget; chunk c > 0 samples with seed + 7919 c")
    ap.add_argument("--thinking-mins", default="0,32,64,128",
                    help="forced minimum thinking tokens for the thinking policy's curve (greedy; '' to skip)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")


def findings(rows: list[dict], verifier: str = "prm") -> list[str]:
    """What the table shows, in sentences computed from it (whatever it turns out to be)."""
    out = []
    by = {(r["model"], r["strategy"], r["budget"]): r for r in rows}
    budgets = sorted({r["budget"] for r in rows if r["strategy"] != "greedy"})
    small = by.get(("small", "greedy", 1))
    large = by.get(("large", "greedy", 1))
    searches = list(dict.fromkeys(r["strategy"] for r in rows if r["strategy"] != "greedy"))
    if small:
        out.append(f"greedy accuracy: small policy {small['accuracy']:.3f}"
                   + (f", large policy {large['accuracy']:.3f}" if large else ""))
    for s in searches:
        accs = [by[("small", s, b)]["accuracy"] for b in budgets if ("small", s, b) in by]
        if len(accs) >= 2:
            trend = "rises" if accs[-1] > accs[0] else ("is flat" if accs[-1] == accs[0] else "falls")
            monotone = all(b >= a for a, b in zip(accs, accs[1:]))
            out.append(f"{s}: accuracy {trend} with budget ({' -> '.join(f'{a:.3f}' for a in accs)} at "
                       f"{'/'.join(map(str, budgets[:len(accs)]))}){'' if monotone else ', not monotonically'}")
    if large:
        reach = [(r["flops_per_problem"], r) for r in rows if r["model"] == "small" and r["strategy"] != "greedy"
                 and r["accuracy"] >= large["accuracy"]]
        if reach:
            f, r = min(reach, key=lambda x: x[0])
            out.append(f"small policy + search reaches the large policy's greedy accuracy ({large['accuracy']:.3f}): "
                       f"cheapest is {r['strategy']} at budget {r['budget']} ({r['accuracy']:.3f}, "
                       f"{f / 1e6:.1f} MFLOP/problem vs {large['flops_per_problem'] / 1e6:.1f} for large greedy)"
                       + (" -- with the large policy itself judging the steps (its likelihood; its FLOPs counted)"
                          if verifier == "likelihood" and r["strategy"] != "majority" else ""))
        else:
            best = max((r for r in rows if r["model"] == "small"), key=lambda r: r["accuracy"])
            out.append(f"small policy + search does NOT reach the large policy's greedy accuracy "
                       f"({large['accuracy']:.3f}); best is {best['strategy']} at budget {best['budget']} "
                       f"({best['accuracy']:.3f})")
    out += [f for f in (_versus_majority(by, budgets), _optimal_versus_uniform(by, budgets),
                        _efficiency(by, budgets), _early_stopping(by, budgets)) if f]
    for opt, uniform in (("adaptive_best_of_n", "weighted_best_of_n"),):
        pairs = [(b, by[("small", opt, b)], by[("small", uniform, b)]) for b in budgets
                 if ("small", opt, b) in by and ("small", uniform, b) in by and b > 1]
        if pairs:
            wins = sum(o["accuracy"] > u["accuracy"] for _, o, u in pairs)
            ties = sum(o["accuracy"] == u["accuracy"] for _, o, u in pairs)
            detail = ", ".join(f"N={b}: {o['accuracy']:.3f} vs {u['accuracy']:.3f} "
                               f"({o['flops_per_problem'] / max(u['flops_per_problem'], 1):.2f}x the FLOPs)"
                               for b, o, u in pairs)
            out.append(f"{opt} (allocation alone) vs uniform {uniform} at equal sample budget: better at {wins}, "
                       f"equal at {ties}, worse at {len(pairs) - wins - ties} of {len(pairs)} budgets ({detail})")
    return out


def _uniform(by, b):
    """The uniform searches of the small policy at budget ``b`` (every strategy that does not pool its budget)."""
    return [r for (m, s, bb), r in by.items() if m == "small" and bb == b and s != "greedy" and s in STRATEGIES
            and not STRATEGIES[s].pooled]


def _versus_majority(by, budgets) -> str | None:
    parts = []
    for b in budgets:
        maj = by.get(("small", "majority", b))
        guided = [r for (m, s, bb), r in by.items() if m == "small" and bb == b and s in STRATEGIES
                  and STRATEGIES[s].needs_verifier]
        if maj is None or not guided or b == 1:
            continue
        above = [r for r in guided if r["accuracy"] > maj["accuracy"]]
        parts.append(f"N={b}: {len(above)} of {len(guided)} above majority {maj['accuracy']:.3f}"
                     + (f" (best {max(guided, key=lambda r: r['accuracy'])['strategy']} "
                        f"{max(r['accuracy'] for r in guided):.3f})"))
    return "verifier-guided searches vs majority voting at equal budget: " + "; ".join(parts) if parts else None


# The early-stopping strategies and the full-budget one each is measured against (same budget).
EARLY_STOPPING = {"deepconf": "majority", "adaptive_consistency": "majority", "speculative_rejection": "best_of_n"}


def _early_stopping(by, budgets) -> str | None:
    """The headline of stopping samples early: at the largest budget where both ran, each early-stopping
    strategy's accuracy and policy tokens against the full-budget strategy it saves on."""
    parts = []
    for s, ref in EARLY_STOPPING.items():
        both = [b for b in budgets if b > 1 and ("small", s, b) in by and ("small", ref, b) in by]
        if not both:
            continue
        b = both[-1]
        e, r = by[("small", s, b)], by[("small", ref, b)]
        share = e["policy_tokens_per_problem"] / max(r["policy_tokens_per_problem"], 1e-9)
        parts.append(f"{s} {e['accuracy']:.3f} vs {ref} {r['accuracy']:.3f} at N={b} with {share:.0%} of its "
                     f"policy tokens")
    return "stopping samples early: " + "; ".join(parts) if parts else None


def _optimal_versus_uniform(by, budgets) -> str | None:
    from ..bench.stats import paired_bootstrap_ci

    parts = []
    for b in budgets:
        opt = by.get(("small", "compute_optimal", b))
        uni = _uniform(by, b)
        if opt is None or not uni or "outcomes" not in opt:
            continue
        best = max(uni, key=lambda r: r["accuracy"])
        lo, hi = paired_bootstrap_ci(opt["outcomes"], best["outcomes"])
        verdict = "better" if lo > 0 else ("worse" if hi < 0 else "level within the interval")
        parts.append(f"N={b}: {opt['accuracy']:.3f} vs {best['strategy']} {best['accuracy']:.3f}, difference "
                     f"{opt['accuracy'] - best['accuracy']:+.3f} [95% {lo:+.3f}, {hi:+.3f}]: {verdict}")
    return "compute_optimal vs the best uniform strategy at each budget: " + "; ".join(parts) if parts else None


def _efficiency(by, budgets) -> str | None:
    top = max(budgets)
    ref = by.get(("small", "best_of_n", top))
    opts = [by[("small", "compute_optimal", b)] for b in budgets if ("small", "compute_optimal", b) in by]
    if ref is None or not opts:
        return None
    reach = [r for r in opts if r["accuracy"] >= ref["accuracy"]]
    if not reach:
        return (f"efficiency: compute_optimal does not reach uniform best_of_n@{top}'s accuracy "
                f"({ref['accuracy']:.3f}) at any budget run (best {max(r['accuracy'] for r in opts):.3f})")
    r = min(reach, key=lambda r: r["budget"])
    ratio = ref["flops_per_problem"] / r["flops_per_problem"]
    return (f"efficiency: compute_optimal reaches uniform best_of_n@{top}'s accuracy ({ref['accuracy']:.3f}) at "
            f"budget {r['budget']} ({r['accuracy']:.3f}): "
            + (f"{ratio:.2f}x less compute" if ratio >= 1 else f"{1 / ratio:.2f}x the compute")
            + f" ({r['flops_per_problem'] / 1e6:.1f} vs {ref['flops_per_problem'] / 1e6:.1f} MFLOP/problem)")


VERIFIER_TITLES = {"likelihood": "policy-large likelihood as verifier", "prm": "bundled PRM"}


def plot(rows: list[dict], path: Path, verifier: str = "likelihood") -> None:
    """The demo's plot: the small policy's searches as curves, greedy runs as reference lines."""
    curves = [r for r in rows if r["model"] == "small" and r["strategy"] != "greedy"]
    plot_scaling(curves, path, f"tts-kernels demo: small policy + {VERIFIER_TITLES[verifier]}, held-out problems",
                 references=[r for r in rows if r["strategy"] == "greedy"])


def run_chunked(names, policy, verifier, prompts, budget, *, settings, seed: int, chunk_size: int) -> dict:
    """``run_together`` over ``prompts`` in chunks of ``chunk_size`` (chunk ``c`` with seed ``seed + 7919 c``):
    per strategy, ``{"predictions", "answers", "scores", "info", "samples", "compute"}`` merged over chunks.
    Strategies that pool their budget over the prompts (``compute_optimal``) run once over all of them,
    their sub-searches in batches of at most ``chunk_size * budget`` rows (``Settings.max_rows``)."""
    pooled = all(STRATEGIES[n].pooled for n in names)
    if pooled:
        settings = settings.replace(max_rows=chunk_size * budget)
        chunk_size = len(prompts)
    merged: dict[str, dict] = {}
    for c, i in enumerate(range(0, len(prompts), chunk_size)):
        got = run_together(names, policy, verifier, prompts[i: i + chunk_size], budget=budget, settings=settings,
                           seed=seed + 7919 * c)
        for name, res in got.items():
            m = merged.setdefault(name, {"predictions": [], "answers": [], "scores": [], "info": [], "samples": 0,
                                         "compute": None})
            m["predictions"] += res.predictions
            m["answers"] += [[c.answer for c in cands] for cands in res.candidates]
            m["scores"] += [[c.score for c in cands] for cands in res.candidates]
            m["info"] += res.prompt_info
            m["samples"] += res.samples
            m["compute"] = res.compute if m["compute"] is None else m["compute"] + res.compute
    return merged


def _groups(strategies: list[str]) -> list[list[str]]:
    """Strategies that share work (one registry group) run, and are timed, together."""
    out: dict = {}
    for name in strategies:  # a pooled strategy runs alone (over every prompt at once)
        out.setdefault(STRATEGIES[name].group or name, []).append(name)
    return list(out.values())


def print_table_summary(table, verifier: str) -> None:
    """The compute-optimal table the run uses (fitted by ``python -m tts_kernels.bundled.fit_optimal``)."""
    if table is None:
        print(f"compute_optimal: no fitted table for verifier {verifier!r}: uncalibrated difficulty, fixed plan")
        return
    meta = table.meta
    ece = meta.get("calibration_error", {})
    print(f"compute_optimal table (validation split: {meta.get('validation', {}).get('problems')} train-distribution "
          f"problems; refit: python -m tts_kernels.bundled.fit_optimal):")
    print("  calibration (Platt) error, held-out: "
          + ", ".join(f"pilot {k}: {v['heldout']:.3f}" for k, v in sorted(ece.items(), key=lambda x: int(x[0]))))
    print(f"  level edges (calibrated p, level 0 easiest): {', '.join(f'{e:.3f}' for e in table.edges)}")
    print("  per budget and level, samples in all -> strategy/beam width (validation accuracy):")
    for b in sorted(table.plans):
        for lv, opts in sorted(table.plans[b].items()):
            print(f"    budget {b:3d} L{lv}: " + ", ".join(
                f"{t} -> {'pilot' if t == min(opts) else f'{st}/{w}'} ({a:.2f})" for t, (st, w, a) in sorted(opts.items())))


def thinking_section(args, device) -> list[dict]:
    """policy-think on the same problems, greedy, at each forced minimum of thinking tokens (printed)."""
    from ..bench.thinking import thinking_curve

    mins = tuple(int(x) for x in args.thinking_mins.split(",") if x.strip())
    if any(m < 0 for m in mins):
        raise SystemExit(f"--thinking-mins must be >= 0, got {args.thinking_mins!r}")
    try:
        bundled.path("policy-think", args.models)
    except FileNotFoundError as exc:
        print(f"\nthinking budget: skipped ({exc})")
        return []
    rows = thinking_curve(args.problems, mins=mins, best_of=(), combined=(), device=device, root=args.models)
    print("\nthinking budget (policy-think, greedy; a forced minimum of thinking tokens, s1-style budget forcing):")
    print(f"  {'min thinking':>12} {'accuracy':>9} {'95% interval':>15} {'thinking/problem':>17} {'tokens/problem':>15}")
    for r in rows:
        lo, hi = r["ci95"]
        print(f"  {r['min_thinking']:12d} {r['accuracy']:9.3f} {f'[{lo:.3f}, {hi:.3f}]':>15} "
              f"{r['thinking_per_problem']:17.1f} {r['tokens_per_problem']:15.1f}")
    return rows


def thinking_findings(rows: list[dict]) -> list[str]:
    """What the thinking curve shows, computed from it."""
    if len(rows) < 2:
        return []
    first, best = rows[0], max(rows, key=lambda r: r["accuracy"])
    last = rows[-1]
    if best["accuracy"] > first["accuracy"] and best is not first:
        verdict = (f"forcing at least {best['min_thinking']} thinking tokens raised accuracy from "
                   f"{first['accuracy']:.3f} to {best['accuracy']:.3f}")
    else:
        verdict = f"forcing longer thinking did not raise accuracy (best {best['accuracy']:.3f} at min " \
                  f"{best['min_thinking']})"
    return [f"thinking policy: {verdict}; at min {last['min_thinking']} it is {last['accuracy']:.3f} "
            f"({last['thinking_per_problem']:.0f} thinking tokens per problem vs {first['thinking_per_problem']:.0f})"]


def main(args) -> int:
    from tqdm.auto import tqdm

    budgets = parse_budgets(args.budgets)
    strategies = parse_strategies(args.strategies, search_strategies())
    if args.problems < 1:
        raise SystemExit(f"--problems must be >= 1, got {args.problems}")
    if args.chunk_size < 1:
        raise SystemExit(f"--chunk-size must be >= 1, got {args.chunk_size}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    problems = bundled.test_problems(args.problems)
    prompts = [p.prompt for p in problems]
    small = bundled.policy_from("policy-small", device=device, root=args.models)  # the loader of every command
    large = bundled.policy_from("policy-large", device=device, root=args.models)
    prm = bundled.verifier_from(args.verifier, device=device, root=args.models)
    table = bundled.optimal_table(args.verifier, args.models)
    settings = Settings(optimal_table=None if table is None else str(bundled.optimal_table_path(args.models)))
    print(f"tts-kernels demo: {len(problems)} held-out problems, budgets {budgets}, verifier {args.verifier}, "
          f"device {device}, threads {torch.get_num_threads()}", flush=True)
    if any(STRATEGIES[n].pooled for n in strategies):
        print_table_summary(table, args.verifier)

    plan = [("small", ["greedy"], 1), ("large", ["greedy"], 1)]
    # Strategies of one group (majority, best_of_n, weighted_best_of_n) share one run and its time.
    plan += [("small", g, b) for b in budgets for g in _groups(strategies)]
    runs = []
    with open(out / "results.jsonl", "w") as jf, tqdm(total=sum(len(s) for _, s, _ in plan), unit="run",
                                                       desc="demo", disable=args.no_progress, file=sys.stderr) as bar:
        for model, names, budget in plan:
            policy = small if model == "small" else large
            bar.set_postfix_str(f"{model} {'/'.join(names)} N={budget}")
            t0 = time.perf_counter()
            got = run_chunked(names, policy, prm, prompts, budget, settings=settings, seed=args.seed,
                              chunk_size=args.chunk_size)
            seconds = time.perf_counter() - t0  # a shared run's time is each of its strategies' time
            for name, run in got.items():
                outcomes = []
                for i, p in enumerate(problems):
                    ok = arith.grade(run["predictions"][i], p)
                    outcomes.append(ok)
                    info = run["info"][i]
                    jf.write(json.dumps({"id": p.id, "level": p.level, "model": model, "strategy": name,
                                         "budget": budget, "prediction": run["predictions"][i], "answer": p.answer,
                                         "correct": ok, "answers": run["answers"][i],
                                         "scores": [None if math.isnan(s) else round(s, 5) for s in run["scores"][i]],
                                         **({"info": info} if info else {})}) + "\n")
                runs.append({"model": model, "strategy": name, "budget": budget, "correct": sum(outcomes),
                             "outcomes": outcomes,
                             "samples": run["samples"], "compute": run["compute"].__dict__, "seconds": seconds})
                bar.update(1)
    rows = summarize(runs, len(problems))
    print()
    print_summary(rows)
    notes = findings(rows, args.verifier)
    print("\nwhat this run shows:")
    for n in notes:
        print(f"  - {n}")
    thinking = thinking_section(args, device) if args.thinking_mins.strip() else []
    for n in thinking_findings(thinking):
        print(f"  - {n}")
        notes.append(n)
    plot(rows, out / "scaling.png", args.verifier)
    total = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(
        {"machine": machine_info(), "problems": len(problems), "budgets": budgets, "strategies": strategies,
         "verifier": args.verifier, "chunk_size": args.chunk_size, "settings": settings.as_dict(), "seed": args.seed,
         "seconds": round(total, 1), "rows": rows, "thinking": thinking, "findings": notes}, indent=1) + "\n")
    print(f"\nwrote {out / 'results.jsonl'}, {out / 'summary.json'}, {out / 'scaling.png'} ({total:.0f} s)")
    return 0
