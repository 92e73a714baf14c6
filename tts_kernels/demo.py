"""The main job: test-time scaling on the bundled models, measured.

    tts-kernels demo [--problems 40] [--budgets 1,4,16,64] [--device cpu] [--out demo_out]

On held-out arithmetic problems (:mod:`tts_kernels.models.arith`, never seen in
training) the small bundled policy runs greedy decoding, majority vote, best-of-N,
weighted best-of-N, PRM beam search, DVTS, compute-optimal search and adaptive
(allocation-only) best-of-N at each budget, guided by the bundled PRM; the larger
policy runs greedy. It prints accuracy against budget and against the compute
actually spent (policy and PRM tokens, FLOPs), states what the numbers show, and
writes ``results.jsonl`` (one line per problem, strategy and budget),
``summary.json`` and ``scaling.png`` under ``--out``.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

SEARCHES = ("majority", "best_of_n", "weighted_best_of_n", "prm_beam_search", "dvts", "compute_optimal",
            "adaptive_best_of_n")


def parse_budgets(text: str) -> list[int]:
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--budgets must be comma-separated positive ints, got {text!r}") from None
    if not out or out[0] < 1:
        raise SystemExit(f"--budgets must be comma-separated positive ints, got {text!r}")
    return out


def add_arguments(ap) -> None:
    from .models.bundled import VERIFIERS

    ap.add_argument("--out", default="demo_out", help="directory for results.jsonl, summary.json, scaling.png")
    ap.add_argument("--problems", type=int, default=40, help="held-out problems (default 40)")
    ap.add_argument("--budgets", default="1,4,16,64", help="samples per problem (default 1,4,16,64)")
    ap.add_argument("--strategies", default=",".join(SEARCHES), help="search strategies to run (comma-separated)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=None, help="folder with policy-small, policy-large, prm (default: bundled)")
    ap.add_argument("--verifier", default="likelihood", choices=VERIFIERS,
                    help="what scores steps: policy-large's likelihood of them (default) or the trained PRM")
    ap.add_argument("--chunk-size", type=int, default=20,
                    help="problems per batch (default 20; peak memory ~3.8 GB at budget 64): memory grows with it "
                         "times the budget; chunk c > 0 samples with seed + 7919 c")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")


def summarize(runs: list[dict], problems: int) -> list[dict]:
    """One row per (model, strategy, budget): accuracy and compute per problem."""
    rows = []
    for r in runs:
        c = r["compute"]
        rows.append({"model": r["model"], "strategy": r["strategy"], "budget": r["budget"],
                     "accuracy": r["correct"] / problems, "correct": r["correct"], "problems": problems,
                     "samples_per_problem": r["samples"] / problems,
                     "policy_tokens_per_problem": (c["policy_prefill_tokens"] + c["policy_generated_tokens"]) / problems,
                     "prm_tokens_per_problem": c["prm_tokens"] / problems,
                     "flops_per_problem": (c["policy_flops"] + c["prm_flops"]) / problems, "seconds": r["seconds"]})
    return rows


def print_summary(rows: list[dict], file=sys.stdout) -> None:
    head = ["policy", "strategy", "budget", "accuracy", "samples/prob", "policy tok/prob", "PRM tok/prob",
            "MFLOP/prob", "seconds"]
    cells = [head] + [[r["model"], r["strategy"], str(r["budget"]), f"{r['accuracy']:.3f} ({r['correct']}/{r['problems']})",
                       f"{r['samples_per_problem']:.1f}", f"{r['policy_tokens_per_problem']:.0f}",
                       f"{r['prm_tokens_per_problem']:.0f}", f"{r['flops_per_problem'] / 1e6:.1f}",
                       f"{r['seconds']:.1f}"] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for j, c in enumerate(cells):
        print("  ".join(x.ljust(w) for x, w in zip(c, widths)), file=file)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=file)


def findings(rows: list[dict], verifier: str = "prm") -> list[str]:
    """What the table shows, in sentences computed from it (whatever it turns out to be)."""
    out = []
    by = {(r["model"], r["strategy"], r["budget"]): r for r in rows}
    budgets = sorted({r["budget"] for r in rows if r["strategy"] != "greedy"})
    small = by.get(("small", "greedy", 1))
    large = by.get(("large", "greedy", 1))
    searches = [s for s in SEARCHES if any(k[1] == s for k in by)]
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
    for opt, uniform in (("compute_optimal", "weighted_best_of_n"), ("adaptive_best_of_n", "weighted_best_of_n"),
                         ("compute_optimal", "prm_beam_search")):
        pairs = [(b, by[("small", opt, b)], by[("small", uniform, b)]) for b in budgets
                 if ("small", opt, b) in by and ("small", uniform, b) in by and b > 1]
        if pairs:
            wins = sum(o["accuracy"] > u["accuracy"] for _, o, u in pairs)
            ties = sum(o["accuracy"] == u["accuracy"] for _, o, u in pairs)
            detail = ", ".join(f"N={b}: {o['accuracy']:.3f} vs {u['accuracy']:.3f} "
                               f"({o['flops_per_problem'] / max(u['flops_per_problem'], 1):.2f}x the FLOPs)"
                               for b, o, u in pairs)
            out.append(f"{opt} vs uniform {uniform} at equal sample budget: better at {wins}, equal at {ties}, "
                       f"worse at {len(pairs) - wins - ties} of {len(pairs)} budgets ({detail})")
    return out


def plot_scaling(curves: list[dict], path: Path, title: str, references: list[dict] = ()) -> None:
    """Accuracy against budget and against FLOPs per problem: one line per strategy of ``curves`` (in
    order of first appearance), each row of ``references`` (greedy runs) a horizontal line and a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in dict.fromkeys(r["strategy"] for r in curves):
        pts = sorted((r["budget"], r["flops_per_problem"], r["accuracy"]) for r in curves if r["strategy"] == s)
        axes[0].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=s)
        axes[1].plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=s)
    for r in references:
        style = dict(color="gray" if r["model"] == "small" else "black", linestyle="--" if r["model"] == "small"
                     else ":", label=f"{r['model']} policy, greedy")
        axes[0].axhline(r["accuracy"], **style)
        axes[1].axhline(r["accuracy"], **style)
        axes[1].plot([r["flops_per_problem"]], [r["accuracy"]], marker="*", markersize=12, color=style["color"])
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("budget (samples or beams per problem)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("FLOPs per problem (policy + verifier, measured)")
    for ax in axes:
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left", ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


VERIFIER_TITLES = {"likelihood": "policy-large likelihood as verifier", "prm": "bundled PRM"}


def plot(rows: list[dict], path: Path, verifier: str = "likelihood") -> None:
    """The demo's plot: the small policy's searches as curves, greedy runs as reference lines."""
    order = {s: i for i, s in enumerate(SEARCHES)}
    curves = sorted((r for r in rows if r["model"] == "small" and r["strategy"] in order),
                    key=lambda r: order[r["strategy"]])
    plot_scaling(curves, path, f"tts-kernels demo: small policy + {VERIFIER_TITLES[verifier]}, held-out problems",
                 references=[r for r in rows if r["strategy"] == "greedy"])


def run_chunked(names, policy, prm, prompts, budget, *, settings, seed: int, chunk_size: int) -> dict:
    """``run_strategies`` over ``prompts`` in chunks of ``chunk_size`` (chunk ``c`` with seed ``seed + 7919 c``),
    outcomes, samples and compute merged per strategy."""
    from .search.strategies import run_strategies

    merged = {}
    for c, i in enumerate(range(0, len(prompts), chunk_size)):
        got = run_strategies(names, policy, prm, prompts[i: i + chunk_size], budget, settings=settings,
                             seed=seed + 7919 * c)
        for name, run in got.items():
            if name not in merged:
                merged[name] = run
                continue
            m = merged[name]
            m.outcomes += run.outcomes
            m.samples += run.samples
            m.compute = m.compute + run.compute
    return merged


def main(args) -> int:
    from tqdm.auto import tqdm

    from .cli import machine_info
    from .models import arith, bundled
    from .search.strategies import SearchSettings

    budgets = parse_budgets(args.budgets)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in SEARCHES]
    if bad:
        raise SystemExit(f"--strategies: unknown {bad}; choose from {', '.join(SEARCHES)}")
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
    small = bundled.load_policy("small", device=device, root=args.models)
    large = bundled.load_policy("large", device=device, root=args.models)
    prm = bundled.load_verifier(args.verifier, device=device, root=args.models)
    settings = SearchSettings()
    print(f"tts-kernels demo: {len(problems)} held-out problems, budgets {budgets}, verifier {args.verifier}, "
          f"device {device}, threads {torch.get_num_threads()}", flush=True)

    plan = [("small", ["greedy"], 1), ("large", ["greedy"], 1)]
    # The three sampling strategies share one best-of-N run (and its time); the others run alone.
    sampling = [s for s in strategies if s in ("majority", "best_of_n", "weighted_best_of_n")]
    groups = ([sampling] if sampling else []) + [[s] for s in strategies if s not in sampling]
    plan += [("small", g, b) for b in budgets for g in groups]
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
                correct = 0
                for p, o in zip(problems, run.outcomes):
                    ok = arith.grade(o.prediction, p)
                    correct += ok
                    jf.write(json.dumps({"id": p.id, "level": p.level, "model": model, "strategy": name,
                                         "budget": budget, "prediction": o.prediction, "answer": p.answer,
                                         "correct": ok, "answers": o.answers,
                                         "scores": [None if math.isnan(s) else round(s, 5) for s in o.scores],
                                         **({"info": o.info} if o.info else {})}) + "\n")
                runs.append({"model": model, "strategy": name, "budget": budget, "correct": correct,
                             "samples": run.samples, "compute": run.compute.__dict__, "seconds": seconds})
                bar.update(1)
    rows = summarize(runs, len(problems))
    print()
    print_summary(rows)
    notes = findings(rows, args.verifier)
    print("\nwhat this run shows:")
    for n in notes:
        print(f"  - {n}")
    plot(rows, out / "scaling.png", args.verifier)
    total = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(
        {"machine": machine_info(), "problems": len(problems), "budgets": budgets, "strategies": strategies,
         "verifier": args.verifier, "chunk_size": args.chunk_size, "settings": settings.__dict__, "seed": args.seed,
         "seconds": round(total, 1), "rows": rows, "findings": notes}, indent=1) + "\n")
    print(f"\nwrote {out / 'results.jsonl'}, {out / 'summary.json'}, {out / 'scaling.png'} ({total:.0f} s)")
    return 0
