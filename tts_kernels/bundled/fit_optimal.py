"""Fit the compute-optimal table of the bundled models: ``python -m tts_kernels.bundled.fit_optimal``.

Everything is measured on a **validation split** drawn from the task's training distribution
(``arith.generate(split="train")`` under its own seed), never on the held-out test problems, with the
small policy and the bundled verifier (``--verifier``):

1. **Calibration.** Per prompt, a scored pilot pool (weighted best-of-16's samples) and 16 fresh samples
   whose share of right answers is the target. For each pilot size the table uses
   (``max(1, budget // --pilot-divisor)`` of each ``--budgets`` value; the pilot is overhead wherever
   a tree search beats best-of-N, so it is kept small), a
   :class:`~tts_kernels.search.compute_optimal.Calibration` (Platt scaling of the pilot's first
   ``pilot_n`` samples' features) is fitted. Its expected calibration error is reported on the
   validation split and, with the same procedure, on ``--heldout`` held-out test problems (seed 77).
2. **Levels.** ``--levels`` bins by quantiles of the calibrated ``p`` (at the middle budget's pilot size; tied quantiles merged),
   stored as fixed edges: a prompt's level never depends on the other prompts of a call.
3. **Plans per (budget, level, samples).** Every candidate (``--candidates``, default :data:`CANDIDATES`:
   best-of-N, weighted best-of-N, PRM beam search and DVTS at beam widths 2 and 4; any registered strategy
   that spends its budget per prompt, as ``name/beam_width``) runs uniformly, through the strategy registry,
   on every validation problem at every sample count of the grid (the budgets and the pilot sizes). For a call of budget ``B``
   (levels from its pilot), at each count ``t`` above the pilot, a per-level choice (each level's most
   accurate candidate) and a single choice (the most accurate overall) are compared by
   ``--folds``-fold cross-validation (fit on the other folds, score on the held-out fold); the per-level
   choice is kept only when its cross-validated accuracy is higher. Ties go to the cheaper candidate
   (sampling before tree searches, narrower beams first). ``t`` equal to the pilot is the pilot alone.
   Each plan keeps its measured accuracy: :meth:`~tts_kernels.search.compute_optimal.OptimalTable.allocate`
   spends a call's budget where those curves rise most.

Writes the :class:`~tts_kernels.search.compute_optimal.OptimalTable` JSON (default: the bundled one, which
``tts-kernels demo`` uses) with every measured accuracy, the cross-validated accuracies and the
calibration errors under ``meta``. About 8 minutes on 2 CPU cores at the defaults.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from . import ROOT, arith, load_policy, load_verifier, sample_texts, test_problems
from ..search import STRATEGIES, Settings, run_together
from ..search.answers import extract_answer
from ..search.best_of_n import best_of_n
from ..search.compute_optimal import SAMPLING, Calibration, OptimalTable, calibration_error, pilot_features
from ..search.optimal_table import plan_strategy

VALIDATION_SEED = 31337
HELDOUT_SEED = 77  # held-out problems for the calibration error (not the demo's TEST_SEED problems)
CANDIDATES = (("best_of_n", 1), ("weighted_best_of_n", 1), ("prm_beam_search", 2), ("prm_beam_search", 4),
              ("dvts", 2), ("dvts", 4))
PILOT = ("weighted_best_of_n", 1)  # what the pilot runs (compute_optimal's weighted best-of-pilot_n)
POOL = 16  # pilot pool and fresh samples per problem for the calibration


def _pools(policy, verifier, problems, *, seed: int, chunk: int, settings: Settings):
    """Per problem: the scored pilot pool (``POOL`` candidates) and the right count of ``POOL`` fresh samples."""
    prompts = [p.prompt for p in problems]
    pilots = []
    for i in range(0, len(prompts), chunk):
        pilots += best_of_n(policy, verifier, prompts[i: i + chunk], n=POOL, select="weighted", settings=settings,
                            seed=seed + i).candidates
    fresh = sample_texts(policy, problems, POOL, temperature=settings.temperature, seed=seed + 10**6, chunk=chunk,
                         max_new_tokens=settings.max_new_tokens)
    right = [sum(arith.grade(extract_answer(t), p) for t in row) for row, p in zip(fresh, problems)]
    return pilots, torch.tensor(right, dtype=torch.float64)


def _features(pilots, pilot_n: int) -> torch.Tensor:
    return pilot_features([row[:pilot_n] for row in pilots])


def parse_candidates(text: str) -> tuple[tuple[str, int], ...]:
    """``--candidates``: ``name/beam_width`` (or ``name``: width 1), comma-separated, each a registered strategy
    that spends its budget per prompt (a ``ValueError`` names any other)."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, _, width = item.partition("/")
        try:
            w = int(width or 1)
        except ValueError:
            raise ValueError(f"--candidates: {item!r} must be name/beam_width with an int width") from None
        if w < 1:
            raise ValueError(f"--candidates: {item!r} needs a beam width >= 1")
        plan_strategy(name, f"--candidates {item!r}")
        out.append((name, w))
    if not out:
        raise ValueError(f"--candidates must name at least one strategy, got {text!r}")
    return tuple(dict.fromkeys(out))


def _uniform_runs(policy, verifier, problems, budgets, *, seed: int, chunk: int, settings: Settings,
                  candidates=CANDIDATES) -> dict:
    """``correct[(strategy, width)][budget]``: per-problem correctness of every candidate run uniformly
    (through the registry; candidates of one width and one registry group share one run)."""
    prompts = [p.prompt for p in problems]
    out: dict = {c: {} for c in candidates}
    batches: dict = {}  # (width, registry group or name) -> names, in candidates' order
    for strat, width in candidates:
        batches.setdefault((width, STRATEGIES[strat].group or strat), []).append(strat)
    for b in budgets:
        for (width, _), names in batches.items():
            if width > b and not all(n in SAMPLING for n in names):
                continue  # a beam wider than the budget is not a choice
            got = {n: [] for n in names}
            for i in range(0, len(prompts), chunk):
                res = run_together(names, policy, verifier, prompts[i: i + chunk], budget=b, seed=seed + 7919 * i,
                                   settings=settings.replace(beam_width=width))
                for n in names:
                    got[n] += [arith.grade(a, p) for a, p in zip(res[n].predictions, problems[i: i + chunk])]
            for n in names:
                out[(n, width)][b] = got[n]
            print(f"  budget {b} {'/'.join(names)} width {width}: "
                  + ", ".join(f"{n} {sum(got[n]) / len(problems):.3f}" for n in names), flush=True)
    return out


def _best(cands, correct, idx, b):
    """The candidate with the most right answers over problems ``idx`` (ties: the earlier, cheaper one)."""
    ok = [c for c in cands if b in correct[c]]
    return max(ok, key=lambda c: (sum(correct[c][b][i] for i in idx), -ok.index(c)))


def choose_table(correct: dict, levels: list[int], n_levels: int, budgets, *, folds: int, seed: int,
                 candidates=None):
    """Per budget: the per-level and the single choice, their cross-validated accuracies, the one kept.
    ``candidates``: in preference order for ties (default: ``correct``'s keys in order)."""
    candidates = list(correct) if candidates is None else list(candidates)
    P = len(levels)
    order = list(range(P))
    random.Random(seed).shuffle(order)
    fold_of = {i: k % folds for k, i in enumerate(order)}
    table, report = {}, {}
    for b in budgets:
        cv = {"per_level": 0, "single": 0}
        for f in range(folds):
            train = [i for i in range(P) if fold_of[i] != f]
            test = [i for i in range(P) if fold_of[i] == f]
            single = _best(candidates, correct, train, b)
            cv["single"] += sum(correct[single][b][i] for i in test)
            for lv in range(n_levels):
                tr = [i for i in train if levels[i] == lv]
                pick = _best(candidates, correct, tr, b) if tr else single
                cv["per_level"] += sum(correct[pick][b][i] for i in test if levels[i] == lv)
        cv = {k: v / P for k, v in cv.items()}
        everyone = list(range(P))
        single = _best(candidates, correct, everyone, b)
        per_level = {lv: (_best(candidates, correct, [i for i in everyone if levels[i] == lv], b)
                          if any(x == lv for x in levels) else single) for lv in range(n_levels)}
        kept = "per_level" if cv["per_level"] > cv["single"] else "single"
        table[b] = per_level if kept == "per_level" else {lv: single for lv in range(n_levels)}
        report[str(b)] = {"cv_accuracy": cv, "kept": kept}
    return table, report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tts_kernels.bundled.fit_optimal", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "compute_optimal.json"))
    ap.add_argument("--models", default=None, help="folder with the bundled models (default: the package's)")
    ap.add_argument("--verifier", default="prm", help="prm or likelihood (default prm)")
    ap.add_argument("--problems", type=int, default=200, help="validation problems (train distribution)")
    ap.add_argument("--heldout", type=int, default=200, help="held-out test problems for the calibration error")
    ap.add_argument("--budgets", default="4,16,64")
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-size", type=int, default=20)
    ap.add_argument("--candidates", default=",".join(f"{s}/{w}" for s, w in CANDIDATES),
                    help="strategies measured, name/beam_width, comma-separated: any registered strategy that spends "
                         "its budget per prompt (default: %(default)s)")
    ap.add_argument("--pilot-divisor", type=int, default=16,
                    help="a call of budget B pilots max(1, B // this) samples per prompt (default 16)")
    args = ap.parse_args(argv)
    budgets = sorted(int(x) for x in args.budgets.split(","))
    try:
        candidates = parse_candidates(args.candidates)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if args.problems < args.folds or args.levels < 1 or not budgets or min(budgets) < 1:
        raise SystemExit("need --problems >= --folds, --levels >= 1 and budgets >= 1")
    def pilot_of(b):
        return max(1, b // args.pilot_divisor)

    t0 = time.perf_counter()
    policy = load_policy("small", root=args.models)
    verifier = load_verifier(args.verifier, root=args.models)
    s = Settings()
    val = arith.generate(args.problems, seed=VALIDATION_SEED, split="train")
    held = test_problems(args.heldout, seed=HELDOUT_SEED)
    pilots, right = _pools(policy, verifier, val, seed=args.seed, chunk=args.chunk_size, settings=s)
    h_pilots, h_right = _pools(policy, verifier, held, seed=args.seed, chunk=args.chunk_size, settings=s)
    trials = torch.full_like(right, POOL)
    cals, ece = {}, {}
    for pilot_n in sorted({pilot_of(b) for b in budgets}):
        cal = Calibration.fit(_features(pilots, pilot_n), right, trials)
        cals[pilot_n] = cal
        ece[str(pilot_n)] = {
            "validation": calibration_error(cal.predict(_features(pilots, pilot_n)), right, trials),
            "heldout": calibration_error(cal.predict(_features(h_pilots, pilot_n)), h_right,
                                         torch.full_like(h_right, POOL))}
        print(f"calibration, pilot of {pilot_n}: coef {[round(c, 3) for c in cal.coef]} intercept "
              f"{cal.intercept:.3f}; ECE validation {ece[str(pilot_n)]['validation']:.3f}, "
              f"held-out {ece[str(pilot_n)]['heldout']:.3f}", flush=True)
    mid = pilot_of(budgets[len(budgets) // 2])
    p_mid = cals[mid].predict(_features(pilots, mid))
    qs = torch.quantile(p_mid, torch.tensor([1 - (k + 1) / args.levels for k in range(args.levels - 1)],
                                            dtype=torch.float64)).tolist()
    edges = []
    for q in sorted(qs, reverse=True):  # (nearly) tied quantiles (many equal p) would leave a level empty
        if not edges or edges[-1] - q > 1e-3:
            edges.append(q)
    edges = tuple(edges)
    n_levels = len(edges) + 1
    print(f"level edges (calibrated p): {[round(e, 3) for e in edges]}", flush=True)
    grid = sorted(set(budgets) | {pilot_of(b) for b in budgets})
    runs = tuple(dict.fromkeys(candidates + (PILOT,)))  # the pilot alone (t = pilot) is measured too
    correct = _uniform_runs(policy, verifier, val, grid, seed=args.seed + 1, chunk=args.chunk_size, settings=s,
                            candidates=runs)
    plans, report, measured = {}, {}, {}
    for b in budgets:  # a call's levels come from its own pilot size's calibration
        pilot_n = pilot_of(b)
        lv = [sum(float(x) < e for e in edges) for x in cals[pilot_n].predict(_features(pilots, pilot_n))]
        plans[b] = {L: {} for L in range(n_levels)}
        report[str(b)], measured[str(b)] = {}, {}
        for t in [t for t in grid if t >= pilot_n]:
            if t == pilot_n:  # the pilot alone: weighted best-of-pilot_n
                chosen = {L: PILOT for L in range(n_levels)}
                r = {"kept": "pilot"}
            else:
                tab, rep = choose_table(correct, lv, n_levels, [t], folds=args.folds, seed=args.seed,
                                        candidates=candidates)
                chosen, r = tab[t], rep[str(t)]
            report[str(b)][str(t)] = r
            for L in range(n_levels):
                idx = [i for i in range(len(val)) if lv[i] == L] or list(range(len(val)))
                accs = {f"{c}/{w}": sum(correct[(c, w)][t][i] for i in idx) / len(idx)
                        for c, w in runs if t in correct[(c, w)]}
                measured[str(b)].setdefault(str(L), {})[str(t)] = accs
                plans[b][L][t] = (*chosen[L], accs[f"{chosen[L][0]}/{chosen[L][1]}"])
        print(f"budget {b} (pilot {pilot_n}, levels {[lv.count(L) for L in range(n_levels)]}): "
              + "; ".join(f"L{L} " + ", ".join(f"{t}:{p[0]}/{p[1]} {p[2]:.2f}" for t, p in sorted(plans[b][L].items()))
                          for L in range(n_levels)), flush=True)
    table = OptimalTable(cals, edges, plans, meta={
        "verifier": args.verifier, "validation": {"split": "train", "seed": VALIDATION_SEED, "problems": args.problems},
        "heldout": {"split": "test", "seed": HELDOUT_SEED, "problems": args.heldout}, "budgets": budgets,
        "grid": grid, "folds": args.folds, "candidates": [list(c) for c in candidates], "calibration_error": ece,
        "strategy_choice": report, "measured": measured, "seed": args.seed,
        "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__})
    table.save(args.out)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
