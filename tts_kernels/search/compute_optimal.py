"""Compute-optimal test-time search: spend a sample budget where it buys the most.

``compute_optimal(policy, verifier, prompts, budget=N)`` spends at most ``N * len(prompts)`` samples
(``N`` per prompt on average, the meaning ``budget`` has for every strategy), after Snell et al.
(arXiv 2408.03314), in four moves:

1. **Pilot.** Weighted best-of-``pilot_n`` on every prompt (default: the size the table was fitted with,
   ``max(1, N // 16)`` for the bundled one; without a table ``max(1, N // 4)``). The
   pilot's samples count toward the budget and stay in the final selection: every prompt keeps at least
   its pilot, and whatever else it gets is added to it.
2. **Difficulty.** Pilot statistics per prompt (:func:`pilot_features`: mean and best verifier score,
   agreement of the answers). With a fitted :class:`OptimalTable` they map to a calibrated probability
   ``p_i`` that one more sample is right (Platt scaling fitted on a validation split,
   :class:`Calibration`) and to a difficulty level by the table's fixed edges (a prompt's level does not
   depend on the other prompts). Without one: ``p_i`` = mean score times agreement (uncalibrated) and
   levels by quantiles of ``p`` over the call (level 0: easiest).
3. **Allocation.** The whole budget is split over *all* the prompts of the call, the pilot being every
   prompt's floor. With a table: each prompt spends one of its level's fitted sample counts ``t`` and the
   counts maximise the summed *measured* accuracy of (level, ``t``) (:meth:`OptimalTable.allocate`, a
   knapsack over the validation curves); without one: :func:`~tts_kernels.allocate_budget` maximises
   ``sum_i 1 - (1 - p_i)^N_i`` (pass@N, the oracle-verifier objective). Each prompt's strategy comes from
   its (level, samples) (:meth:`OptimalTable.choose`; without a table a fixed ``plan`` per level); a tree
   search's count is rounded down to a multiple of its beam width and what rounding (or a table whose
   curves stop rising) leaves is handed back, a beam width at a time, where pass@N coverage rises most,
   so the spend is exact whenever a best-of-N prompt can take single samples.
4. **Search.** One batched call per (strategy, samples, beam width), split into batches of at most
   ``Settings.max_rows`` rows (prompts times samples; memory) without changing the allocation; each
   prompt's answer is selected by its strategy's rule over its pilot and search candidates together.

The table (:class:`OptimalTable`) is what :mod:`tts_kernels.bundled.fit_optimal` fits for the bundled
models: per pilot size a :class:`Calibration`, the level edges, and per (budget, level) the strategy and
beam width with the best measured accuracy on a validation split drawn from the task's training
distribution (cross-validated; see that module). ``Settings.optimal_table`` names a table file for the
registered strategies.

The budget counts samples (generated candidates / beams): the pilot spends ``P * pilot_n``; a best-of-N
run ``n``; a beam search with ``n`` beams ``n`` (one beam per sample slot, as the paper equates them).
The result's ``compute`` sums the pilot's and every search's records; ``prompt_info[i]`` holds prompt
``i``'s ``p``, ``level``, ``strategy`` (``"pilot"`` when nothing more was spent), ``beam_width``,
``n`` (samples beyond the pilot) and ``pilot_answer``; its candidates are the pilot's followed by those
of its search.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..ops._validate import check_int
from ..ops.allocate import allocate_budget
from .answers import extract_answer, vote_key
from .best_of_n import best_of_n
from .cancel import sub_run
from .result import SearchResult, select_candidates
from .seeds import Seeds
from .settings import Settings, resolve
from .step_search import dvts, prm_beam_search
from .validate import check_prompts

STRATEGIES = ("best_of_n", "weighted_best_of_n", "prm_beam_search", "dvts")
SAMPLING = ("best_of_n", "weighted_best_of_n")
# Each plan strategy's search and the rule that picks its answer (names mean what the registry's do).
_SEARCH = {"best_of_n": (best_of_n, "best"), "weighted_best_of_n": (best_of_n, "weighted"),
           "prm_beam_search": (prm_beam_search, "best"), "dvts": (dvts, "weighted")}
PILOT_FEATURES = ("logit_mean_score", "logit_max_score", "agreement")


def _width(strategy: str, beam_width: int) -> int:
    return 1 if strategy in SAMPLING else beam_width


def _logit(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(1e-4, 1 - 1e-4)
    return torch.log(x) - torch.log1p(-x)


def pilot_features(candidates: Sequence[Sequence], key: Callable | None = None) -> torch.Tensor:
    """``[P, 3]`` float64 per prompt's pilot candidates: logit of the mean and of the best verifier
    score (NaN scores as 0) and the agreement (share of the candidates holding the most frequent
    answer; 0 when none states one)."""
    key = key or (lambda a: a)
    rows = []
    for row in candidates:
        s = torch.tensor([c.score for c in row], dtype=torch.float64).nan_to_num(0.0).clamp(0.0, 1.0)
        answers = [key(c.answer) for c in row if c.answer is not None]
        agree = Counter(answers).most_common(1)[0][1] / len(row) if answers else 0.0
        rows.append([float(_logit(s.mean())), float(_logit(s.max())), agree])
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(PILOT_FEATURES))


@dataclass(frozen=True)
class Calibration:
    """Platt scaling of pilot features (:func:`pilot_features`) to the probability that one more
    sample of the prompt is right: ``sigmoid(coef . features + intercept)``."""

    coef: tuple[float, ...]
    intercept: float

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        w = torch.tensor(self.coef, dtype=torch.float64)
        return torch.sigmoid(features.to(torch.float64) @ w + self.intercept)

    @classmethod
    def fit(cls, features: torch.Tensor, successes: torch.Tensor, trials: torch.Tensor, *,
            l2: float = 1e-3) -> Calibration:
        """Logistic regression with binomial targets (``successes`` of ``trials`` fresh samples per
        prompt), fitted by L-BFGS with a small L2 penalty on ``coef``."""
        x = features.to(torch.float64)
        k, n = successes.to(torch.float64), trials.to(torch.float64)
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            z = x @ w + b
            nll = -(k * torch.nn.functional.logsigmoid(z) + (n - k) * torch.nn.functional.logsigmoid(-z)).sum()
            loss = nll / n.sum() + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(tuple(float(v) for v in w.detach()), float(b.detach()))


def calibration_error(p: torch.Tensor, successes: torch.Tensor, trials: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error: over ``bins`` equal-width bins of the predicted ``p``, the
    trial-weighted mean of ``|mean predicted - observed success rate|``."""
    p, k, n = p.to(torch.float64), successes.to(torch.float64), trials.to(torch.float64)
    b = (p * bins).long().clamp(0, bins - 1)
    err = 0.0
    for i in range(bins):
        m = b == i
        if n[m].sum() > 0:
            err += float((p[m] * n[m]).sum() - k[m].sum()).__abs__()
    return err / float(n.sum())


@dataclass
class OptimalTable:
    """A fitted compute-optimal plan (what :mod:`tts_kernels.bundled.fit_optimal` writes).

    * ``calibrations[pilot_n]``: the :class:`Calibration` for a pilot of that many samples;
    * ``edges``: the calibrated-``p`` edges between levels, descending (``p >= edges[0]``: level 0, the
      easiest);
    * ``plans[budget][level][t]``: for a call of ``budget`` samples per prompt (whose pilot sizes its
      levels), a prompt of ``level`` that spends ``t`` samples in all runs ``(strategy, beam_width)`` and
      was measured to be right with probability ``accuracy`` on the validation split: ``t`` equal to the
      pilot's size is the pilot alone (weighted best-of-``t``); a larger ``t`` adds a search of
      ``t - pilot`` samples;
    * ``meta``: how it was fitted (validation split, cross-validated accuracies, calibration error,
      every candidate's measured accuracy).
    """

    calibrations: dict[int, Calibration]
    edges: tuple[float, ...]
    plans: dict[int, dict[int, dict[int, tuple[str, int, float]]]]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.calibrations:
            raise ValueError("OptimalTable.calibrations must hold at least one pilot size")
        if list(self.edges) != sorted(self.edges, reverse=True):
            raise ValueError(f"OptimalTable.edges must be descending, got {self.edges!r}")
        if not self.plans:
            raise ValueError("OptimalTable.plans must hold at least one budget")
        for budget, row in self.plans.items():
            for lv in range(self.levels):
                opts = row.get(lv)
                if not opts:
                    raise ValueError(f"OptimalTable.plans[{budget}][{lv}] must map samples to a plan, got {opts!r}")
                for t, plan in opts.items():
                    ok = (isinstance(t, int) and t >= 1 and len(plan) == 3 and plan[0] in STRATEGIES
                          and isinstance(plan[1], int) and plan[1] >= 1 and 0.0 <= plan[2] <= 1.0)
                    if not ok:
                        raise ValueError(f"OptimalTable.plans[{budget}][{lv}][{t}] must be (one of {STRATEGIES}, "
                                         f"beam_width >= 1, accuracy in [0, 1]), got {plan!r}")

    @property
    def levels(self) -> int:
        return len(self.edges) + 1

    def calibration(self, pilot_n: int) -> Calibration:
        """The calibration of the pilot size nearest ``pilot_n`` (in log scale)."""
        best = min(self.calibrations, key=lambda k: (abs(math.log(k) - math.log(pilot_n)), k))
        return self.calibrations[best]

    def level(self, p: torch.Tensor) -> list[int]:
        """Each prompt's level: how many edges its ``p`` falls below."""
        return [sum(float(x) < e for e in self.edges) for x in p.tolist()]

    def row(self, budget: int) -> dict[int, dict[int, tuple[str, int, float]]]:
        """The plans of the largest fitted budget not above ``budget`` (the smallest when it is below them all)."""
        fit = [b for b in sorted(self.plans) if b <= budget]
        return self.plans[fit[-1] if fit else min(self.plans)]

    def pilot(self, budget: int) -> int:
        """The pilot size the table was fitted with for a call of ``budget`` (its rows' smallest ``t``)."""
        return min(min(opts) for opts in self.row(budget).values())

    def choose(self, budget: int, level: int, samples: int) -> tuple[str, int]:
        """``(strategy, beam_width)`` for a prompt of ``level`` spending ``samples`` in all, in a call of
        ``budget``: the plan of the largest fitted ``t`` not above ``samples``."""
        opts = self.row(budget)[level]
        fit = [t for t in sorted(opts) if t <= samples]
        return tuple(opts[fit[-1] if fit else min(opts)][:2])

    def allocate(self, budget: int, levels: list[int], pilot_n: int, total: int) -> list[int]:
        """Samples ``t_i`` per prompt (each one of its level's fitted ``t >= pilot_n``, at least the pilot)
        maximising the summed measured accuracy with ``sum t_i <= total``: a multiple-choice knapsack,
        solved greedily over each level's upper concave hull of (samples, running-max accuracy) (exact on
        the hulls up to the last upgrade that does not fit). Upgrades that measured no gain are bought
        last, with what is left. Ties go to the lower prompt index."""
        import heapq

        row = self.row(budget)
        hulls = {}
        for lv in set(levels):
            pts = sorted((t, a) for t, (_, _, a) in row[lv].items() if t >= pilot_n)
            pts = [(pilot_n, max([a for t, a in pts if t == pilot_n], default=0.0))] + [x for x in pts if x[0] > pilot_n]
            hull, top = [pts[0]], pts[0][1]
            for t, a in pts[1:]:
                a = top = max(a, top)  # more samples never measured worse: a dip is noise (a flat step is bought last)
                while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) * (t - hull[-1][0]) <= \
                        (a - hull[-1][1]) * (hull[-1][0] - hull[-2][0]):
                    hull.pop()  # not on the upper concave hull
                hull.append((t, a))
            hulls[lv] = hull
        at = [0] * len(levels)
        left = total - pilot_n * len(levels)
        heap = []

        def push(i):
            h = hulls[levels[i]]
            if at[i] + 1 < len(h):
                (t0, a0), (t1, a1) = h[at[i]], h[at[i] + 1]
                heapq.heappush(heap, (-(a1 - a0) / (t1 - t0), i))

        for i in range(len(levels)):
            push(i)
        while heap and left > 0:
            _, i = heapq.heappop(heap)
            h = hulls[levels[i]]
            cost = h[at[i] + 1][0] - h[at[i]][0]
            if cost <= left:
                at[i] += 1
                left -= cost
                push(i)
        return [hulls[lv][k][0] for lv, k in zip(levels, at)]

    def only(self, strategy: str, beam_width: int = 1) -> OptimalTable:
        """This table's calibration and levels with ``(strategy, beam_width)`` in every plan, with that
        candidate's own measured accuracies where ``meta["measured"]`` holds them."""
        measured = self.meta.get("measured", {})
        key = f"{strategy}/{beam_width}"

        def acc(b, lv, t, a):
            return measured.get(str(b), {}).get(str(lv), {}).get(str(t), {}).get(key, a)

        plans = {b: {lv: {t: ((strategy, beam_width, acc(b, lv, t, a)) if t > min(opts) else (s, w, a))
                          for t, (s, w, a) in opts.items()} for lv, opts in row.items()}
                 for b, row in self.plans.items()}
        return OptimalTable(self.calibrations, self.edges, plans, dict(self.meta, only=strategy))

    def to_dict(self) -> dict:
        return {"calibrations": {str(k): {"coef": list(c.coef), "intercept": c.intercept, "features": PILOT_FEATURES}
                                 for k, c in self.calibrations.items()},
                "edges": list(self.edges),
                "plans": {str(b): {str(lv): {str(t): list(v) for t, v in opts.items()} for lv, opts in row.items()}
                          for b, row in self.plans.items()},
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> OptimalTable:
        return cls(calibrations={int(k): Calibration(tuple(v["coef"]), float(v["intercept"]))
                                 for k, v in d["calibrations"].items()},
                   edges=tuple(float(e) for e in d["edges"]),
                   plans={int(b): {int(lv): {int(t): (v[0], int(v[1]), float(v[2])) for t, v in opts.items()}
                                   for lv, opts in row.items()} for b, row in d["plans"].items()},
                   meta=d.get("meta", {}))

    @classmethod
    def load(cls, path: str | Path) -> OptimalTable:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")


def _levels(p: torch.Tensor, levels: int) -> list[int]:
    """Quantile bins of ``p`` (descending: level 0 holds the highest p, the easiest prompts)."""
    P = p.shape[0]
    order = torch.argsort(-p, stable=True).tolist()
    out = [0] * P
    for rank, i in enumerate(order):
        out[i] = min(levels - 1, rank * levels // max(P, 1))
    return out


def default_plan(levels: int, strategies: Sequence[str] = ("weighted_best_of_n", "prm_beam_search"),
                 beam_width: int = 4) -> dict[int, tuple[str, int]]:
    """Without a fitted table: the easier half of the levels get ``strategies[0]``, the harder half
    ``strategies[-1]`` (tree searches with ``beam_width``)."""
    easy, hard = strategies[0], strategies[-1]
    return {lv: ((easy, _width(easy, beam_width)) if lv < (levels + 1) // 2 else (hard, _width(hard, beam_width)))
            for lv in range(levels)}


def _top_up(alloc: list[int], widths: list[int], p: list[float], left: int, n_max: int | None,
            floor: int = 0) -> int:
    """Hand ``left`` samples back, one beam width at a time, to the prompt whose expected coverage
    ``1 - (1 - p)^(floor + N)`` rises most per sample (ties to the lower index); returns what is left."""
    import heapq

    def gain(i):
        return ((1 - p[i]) ** (floor + alloc[i])) * (1 - (1 - p[i]) ** widths[i]) / widths[i]

    heap = [(-gain(i), i) for i in range(len(alloc))]
    heapq.heapify(heap)
    while heap and left > 0:
        _, i = heapq.heappop(heap)
        if widths[i] > left or (n_max is not None and alloc[i] + widths[i] > n_max):
            continue  # never fits again: what is left only shrinks
        alloc[i] += widths[i]
        left -= widths[i]
        heapq.heappush(heap, (-gain(i), i))
    return left


def _batches(idx: list[int], per_prompt: int, max_rows: int) -> list[list[int]]:
    if not max_rows:
        return [idx]
    k = max(1, max_rows // max(per_prompt, 1))
    return [idx[i: i + k] for i in range(0, len(idx), k)]


@torch.no_grad()
def compute_optimal(policy, verifier, prompts: Sequence[str], *, budget: int, pilot_n: int | None = None,
                    strategies: Sequence[str] = ("weighted_best_of_n", "prm_beam_search"),
                    plan: dict[int, tuple[str, int]] | None = None, table: OptimalTable | str | Path | None = None,
                    n_max: int | None = None, settings: Settings | None = None, seed: int | Sequence[int] = 0,
                    extract: Callable[[str], str | None] = extract_answer, name: str = "compute_optimal",
                    **overrides) -> SearchResult:
    """Pilot, estimate difficulty, allocate the rest of ``budget * P`` samples, choose each prompt's strategy.

    ``budget``: samples per prompt on average. ``table``: an :class:`OptimalTable` (or its JSON file;
    default ``Settings.optimal_table``): calibrated difficulty and the fitted strategy table. Without
    one, ``strategies`` (from :data:`STRATEGIES`), ``Settings.levels`` and ``Settings.beam_width`` build
    :func:`default_plan`, or ``plan`` maps level -> ``(strategy, beam_width)`` explicitly. ``n_max`` caps
    the samples allocated to one prompt beyond its pilot. The searches run with ``settings`` (and keyword
    ``overrides``), the pilot with ``seed`` and the searches with ``seed + 1`` (per prompt when ``seed``
    is a list). ``name`` is the result's ``strategy``.
    """
    s = resolve(settings, overrides)
    prompts = check_prompts(prompts)
    if verifier is None:
        raise ValueError(f"{name} needs a verifier (difficulty comes from its scores)")
    P = len(prompts)
    keys = Seeds.of(seed, P)
    check_int("budget", budget, minimum=1)
    table = table if table is not None else s.optimal_table
    if table is not None and not isinstance(table, OptimalTable):
        try:
            table = OptimalTable.load(table)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"table: cannot read an OptimalTable from {table!r}: {exc}") from exc
    if pilot_n is None:
        pilot_n = min(table.pilot(budget), budget) if table is not None else max(1, budget // 4)
    check_int("pilot_n", pilot_n, minimum=1)
    total = budget * P
    if total < P * pilot_n:
        raise ValueError(f"budget={budget} per prompt is below the pilot's pilot_n = {pilot_n} samples per prompt")
    if n_max is not None:
        check_int("n_max", n_max, minimum=0)
    if table is None:
        if isinstance(strategies, str) or not strategies or any(x not in STRATEGIES for x in strategies):
            raise ValueError(f"strategies must be a non-empty list from {STRATEGIES}, got {strategies!r}")
        plan = plan or default_plan(s.levels, strategies, s.beam_width)
        for lv in range(s.levels):
            strat, bw = plan.get(lv, (None, None))
            if strat not in STRATEGIES or not isinstance(bw, int) or bw < 1:
                raise ValueError(f"plan[{lv}] must be (one of {STRATEGIES}, beam_width >= 1), got {plan.get(lv)!r}")

    pilot_rule = "weighted"
    pilot = None
    for b, part in enumerate(_batches(list(range(P)), pilot_n, s.max_rows)):
        with sub_run(part):  # batch b of a run seed draws under seed + 7919 b; per-prompt seeds are kept
            got = best_of_n(policy, verifier, [prompts[i] for i in part], n=pilot_n, select=pilot_rule, settings=s,
                            seed=keys.take(part) if keys.keyed else keys.shift(7919 * b), extract=extract)
        if pilot is None:
            pilot = got
        else:
            pilot.predictions += got.predictions
            pilot.chosen += got.chosen
            pilot.candidates += got.candidates
            pilot.compute = pilot.compute + got.compute
    compute = pilot.compute
    key = vote_key(s.vote_key)
    feats = pilot_features(pilot.candidates, key)
    if table is not None:
        p = table.calibration(pilot_n).predict(feats)
        lv = table.level(p)
    else:  # uncalibrated: mean score times agreement
        mean = torch.sigmoid(feats[:, 0])
        p = (mean * feats[:, 2]).clamp(0.0, 1.0)
        lv = _levels(p, s.levels)

    rest = total - P * pilot_n
    if table is not None:  # measured accuracy per (level, samples): a knapsack over the fitted plans
        alloc = [t - pilot_n for t in table.allocate(budget, lv, pilot_n, total)]
        if n_max is not None:
            alloc = [min(a, n_max) for a in alloc]
    else:  # coverage counts the pilot's samples too: the whole budget with the pilot as each floor
        alloc = (allocate_budget(p, total, n_min=pilot_n, n_max=None if n_max is None else pilot_n + n_max)
                 - pilot_n).tolist()
    pick = []
    for i in range(P):
        strat, bw = (table.choose(budget, lv[i], pilot_n + alloc[i]) if table is not None else plan[lv[i]])
        # A beam wider than the samples it gets runs as wide as they allow (as every registered tree search does).
        pick.append((strat, max(1, min(_width(strat, bw), alloc[i]))))
    widths = [w for _, w in pick]
    n_run = [a - a % w for a, w in zip(alloc, widths)]
    _top_up(n_run, widths, p.tolist(), rest - sum(n_run), n_max, pilot_n)

    info = [{"p": float(p[i]), "level": lv[i], "strategy": "pilot", "beam_width": None, "n": 0,
             "pilot_answer": pilot.predictions[i]} for i in range(P)]
    candidates = [list(row) for row in pilot.candidates]
    rule_of = ["weighted"] * P
    groups: dict[tuple, list[int]] = {}
    for i in range(P):
        if n_run[i] > 0:
            groups.setdefault((pick[i][0], n_run[i], pick[i][1]), []).append(i)
    spent = P * pilot_n
    for (strat, n, bw), idx in sorted(groups.items()):
        search, rule = _SEARCH[strat]
        for b, part in enumerate(_batches(idx, n, s.max_rows)):
            with sub_run(part):  # a prompt cancelled in this run is cancelled in the sub-search, by its new index
                res = search(policy, verifier, [prompts[i] for i in part], n=n, select=rule,
                             settings=s.replace(beam_width=bw), extract=extract,
                             seed=keys.shift(1).take(part) if keys.keyed else keys.shift(1 + 7919 * b))
            compute = compute + res.compute
            for j, i in enumerate(part):
                info[i].update(strategy=strat, beam_width=bw, n=n)
                candidates[i] += res.candidates[j]
                rule_of[i] = rule
            spent += n * len(part)
    assert spent <= total, (spent, total)  # by construction: allocation sums to <= the rest
    # Each prompt's answer by its strategy's rule over the pilot and the search together (one call per rule).
    chosen, predictions = [None] * P, [None] * P
    for rule in sorted(set(rule_of)):
        idx = [i for i in range(P) if rule_of[i] == rule]
        c, a = select_candidates([candidates[i] for i in idx], rule, None, s.vote_key)
        for j, i in enumerate(idx):
            chosen[i], predictions[i] = c[j], a[j]
    return SearchResult(strategy=name, budget=budget, predictions=predictions, chosen=chosen, candidates=candidates,
                        compute=compute, samples=spent, prompt_info=info)
