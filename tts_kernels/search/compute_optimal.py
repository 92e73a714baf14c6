"""Compute-optimal test-time search: spend a sample budget where it buys the most.

``compute_optimal(policy, verifier, prompts, budget=N)`` spends at most ``N * len(prompts)`` samples
(``N`` per prompt on average, the meaning ``budget`` has for every strategy), after Snell et al.
(arXiv 2408.03314), in four moves:

1. **Pilot.** Weighted best-of-``pilot_n`` on every prompt (default ``pilot_n = max(1, N // 4)``). The
   pilot's samples count toward the budget and stay in the final selection: every prompt keeps at least
   its pilot, and whatever else it gets is added to it.
2. **Difficulty.** Pilot statistics per prompt (:func:`pilot_features`: mean and best verifier score,
   agreement of the answers). With a fitted :class:`OptimalTable` they map to a calibrated probability
   ``p_i`` that one more sample is right (Platt scaling fitted on a validation split,
   :class:`Calibration`) and to a difficulty level by the table's fixed edges (a prompt's level does not
   depend on the other prompts). Without one: ``p_i`` = mean score times agreement (uncalibrated) and
   levels by quantiles of ``p`` over the call (level 0: easiest).
3. **Allocation.** The budget left after the pilot is split over *all* the prompts of the call by
   :func:`~tts_kernels.allocate_budget` to maximise ``sum_i 1 - (1 - p_i)^N_i``; each prompt's strategy
   comes from its (level, pilot + allocated samples) (:meth:`OptimalTable.choose`; without a table a
   fixed ``plan`` per level); a tree search's count is rounded down to a multiple of its beam width and
   what rounding frees is handed back, a beam width at a time, where it adds the most expected coverage,
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

    ``calibrations[pilot_n]``: the :class:`Calibration` for a pilot of that many samples; ``edges``: the
    calibrated-``p`` edges between levels, descending (``p >= edges[0]``: level 0, the easiest);
    ``table[budget][level]``: ``(strategy, beam_width)`` chosen for prompts given about ``budget``
    samples; ``meta``: how it was fitted (validation split, cross-validated accuracies, calibration
    error, models)."""

    calibrations: dict[int, Calibration]
    edges: tuple[float, ...]
    table: dict[int, dict[int, tuple[str, int]]]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.calibrations:
            raise ValueError("OptimalTable.calibrations must hold at least one pilot size")
        if list(self.edges) != sorted(self.edges, reverse=True):
            raise ValueError(f"OptimalTable.edges must be descending, got {self.edges!r}")
        for budget, row in self.table.items():
            for lv in range(self.levels):
                strat, bw = row.get(lv, (None, None))
                if strat not in STRATEGIES or not isinstance(bw, int) or bw < 1:
                    raise ValueError(f"OptimalTable.table[{budget}][{lv}] must be (one of {STRATEGIES}, "
                                     f"beam_width >= 1), got {row.get(lv)!r}")
        if not self.table:
            raise ValueError("OptimalTable.table must hold at least one budget")

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

    def choose(self, level: int, samples: int) -> tuple[str, int]:
        """The strategy for a prompt of ``level`` spending ``samples`` in all: the row of the largest
        fitted budget not above it (the smallest one when it is below them all)."""
        budgets = sorted(self.table)
        fit = [b for b in budgets if b <= samples]
        return tuple(self.table[fit[-1] if fit else budgets[0]][level])

    def only(self, strategy: str, beam_width: int = 1) -> OptimalTable:
        """This table's calibration and levels with ``(strategy, beam_width)`` in every row."""
        return OptimalTable(self.calibrations, self.edges,
                            {b: {lv: (strategy, beam_width) for lv in row} for b, row in self.table.items()},
                            dict(self.meta, only=strategy))

    def to_dict(self) -> dict:
        return {"calibrations": {str(k): {"coef": list(c.coef), "intercept": c.intercept, "features": PILOT_FEATURES}
                                 for k, c in self.calibrations.items()},
                "edges": list(self.edges),
                "table": {str(b): {str(lv): list(v) for lv, v in row.items()} for b, row in self.table.items()},
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> OptimalTable:
        return cls(calibrations={int(k): Calibration(tuple(v["coef"]), float(v["intercept"]))
                                 for k, v in d["calibrations"].items()},
                   edges=tuple(float(e) for e in d["edges"]),
                   table={int(b): {int(lv): (v[0], int(v[1])) for lv, v in row.items()} for b, row in d["table"].items()},
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


def _top_up(alloc: list[int], widths: list[int], p: list[float], left: int, n_max: int | None) -> int:
    """Hand ``left`` samples back, one beam width at a time, to the prompt whose expected coverage
    ``1 - (1 - p)^N`` rises most per sample (ties to the lower index); returns what is left."""
    while left > 0:
        best, gain = None, -1.0
        for i, (a, w) in enumerate(zip(alloc, widths)):
            if w > left or (n_max is not None and a + w > n_max):
                continue
            g = ((1 - p[i]) ** a) * (1 - (1 - p[i]) ** w) / w
            if g > gain:
                best, gain = i, g
        if best is None:
            return left
        alloc[best] += widths[best]
        left -= widths[best]
    return 0


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
    pilot_n = max(1, budget // 4) if pilot_n is None else check_int("pilot_n", pilot_n, minimum=1)
    total = budget * P
    if total < P * pilot_n:
        raise ValueError(f"budget={budget} per prompt is below the pilot's pilot_n = {pilot_n} samples per prompt")
    if n_max is not None:
        check_int("n_max", n_max, minimum=0)
    table = table if table is not None else s.optimal_table
    if table is not None and not isinstance(table, OptimalTable):
        try:
            table = OptimalTable.load(table)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"table: cannot read an OptimalTable from {table!r}: {exc}") from exc
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
    alloc = allocate_budget(p, rest, n_min=0, n_max=n_max).tolist()
    pick = []
    for i in range(P):
        strat, bw = (table.choose(lv[i], pilot_n + alloc[i]) if table is not None else plan[lv[i]])
        pick.append((strat, min(_width(strat, bw), max(budget, 1))))
    widths = [w for _, w in pick]
    n_run = [a - a % w for a, w in zip(alloc, widths)]
    _top_up(n_run, widths, p.tolist(), rest - sum(n_run), n_max)

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
