"""The fitted compute-optimal table: :class:`OptimalTable`, its :class:`Calibration` and the pilot features.

Data, not code: :mod:`tts_kernels.bundled.fit_optimal` measures it, :mod:`~tts_kernels.search.compute_optimal`
reads it. A plan names any registered strategy (:data:`~tts_kernels.search.STRATEGIES`) that spends its
budget per prompt; a name that is not registered (or a pooled strategy) is refused where the table is
built or loaded, naming the plan's place and the strategy.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .registry import Strategy, lookup

PILOT_FEATURES = ("logit_mean_score", "logit_max_score", "agreement")


def plan_strategy(name, where: str = "strategy") -> Strategy:
    """The registered strategy a plan names, or a ``ValueError`` naming ``where`` and the strategy: it must be
    registered and spend its budget per prompt (a pooled strategy would pool again inside a plan)."""
    entry = lookup(name, f"{where}: strategy")
    if entry.pooled:
        raise ValueError(f"{where}: strategy {name!r} pools its budget over the prompts of a call; a plan's "
                         f"strategy must spend it per prompt")
    return entry


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
                    where = f"OptimalTable.plans[{budget}][{lv}][{t}]"
                    ok = (isinstance(t, int) and t >= 1 and len(plan) == 3 and isinstance(plan[0], str)
                          and isinstance(plan[1], int) and plan[1] >= 1 and 0.0 <= plan[2] <= 1.0)
                    if not ok:
                        raise ValueError(f"{where} must be (a registered strategy, beam_width >= 1, accuracy in "
                                         f"[0, 1]), got {plan!r}")
                    plan_strategy(plan[0], where)

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
