"""Compute-optimal test-time search: spend a sample budget where it buys the most.

``compute_optimal(policy, verifier, prompts, budget=N)`` spends at most ``N * len(prompts)`` samples
(``N`` per prompt on average, the meaning ``budget`` has for every strategy), after Snell et al.
(arXiv 2408.03314), in four moves:

1. **Pilot** (:func:`run_pilot`). Weighted best-of-``pilot_n`` on every prompt (default: the size the table
   was fitted with, ``max(1, N // 16)`` for the bundled one; without a table ``max(1, N // 4)``). The
   pilot's samples count toward the budget and stay in the final selection: every prompt keeps at least
   its pilot, and whatever else it gets is added to it.
2. **Difficulty** (:func:`difficulty`). Pilot statistics per prompt (:func:`pilot_features`: mean and best
   verifier score, agreement of the answers). With a fitted :class:`OptimalTable` they map to a calibrated
   probability ``p_i`` that one more sample is right (Platt scaling fitted on a validation split,
   :class:`Calibration`) and to a difficulty level by the table's fixed edges (a prompt's level does not
   depend on the other prompts). Without one: ``p_i`` = mean score times agreement (uncalibrated) and
   levels by quantiles of ``p`` over the call (level 0: easiest).
3. **Allocation** (:func:`allocate`, an :class:`Allocation`). The whole budget is split over *all* the
   prompts, the pilot being every prompt's floor. With a table: each prompt spends one of its level's fitted
   sample counts ``t`` and the counts maximise the summed *measured* accuracy of (level, ``t``)
   (:meth:`OptimalTable.allocate`, a knapsack over the validation curves); without one:
   :func:`~tts_kernels.allocate_budget` maximises ``sum_i 1 - (1 - p_i)^N_i`` (pass@N, the oracle-verifier
   objective). Each prompt's strategy comes from its (level, samples) (:meth:`OptimalTable.choose`; without
   a table a fixed ``plan`` per level); a count is rounded down to a multiple of the plan's beam width
   (1 for the sampling strategies; never wider than the samples) and what rounding (or a table whose curves
   stop rising) leaves is handed back, a beam width at a time, where pass@N coverage rises most, so the
   spend is exact whenever a best-of-N prompt can take single samples.
4. **Search** (:func:`search_allocated`). Each prompt's strategy is looked up in the strategy registry
   (:data:`~tts_kernels.search.STRATEGIES`) and run as :func:`~tts_kernels.search.run` would run it, with
   its samples as ``budget`` and its beam width as ``Settings.beam_width``: one call per (strategy,
   samples, beam width), split into batches of at most ``Settings.max_rows`` rows (prompts times samples;
   memory) without changing the allocation. A plan may name any registered strategy that spends its budget
   per prompt (one registered after this module was written too); a strategy that spends more than it was
   allocated is an error naming it. A prompt's answer is its strategy's rule (``Strategy.select``) over
   its pilot and search candidates together; a strategy that picks by a rule of its own keeps its own pick
   (its candidates still follow the pilot's).

The moves are separate functions so that one budget can be spent over more prompts than one call holds:
``tts-kernels eval`` runs every chunk's pilot, one run-wide :func:`allocate`, then every chunk's searches
(:class:`OptimalStrategy` holds them for the registered ``compute_optimal`` and ``adaptive_best_of_n``).

The table (:class:`OptimalTable`, :mod:`~tts_kernels.search.optimal_table`) is what
:mod:`tts_kernels.bundled.fit_optimal` fits for the bundled models: per pilot size a :class:`Calibration`, the
level edges, and per (budget, level) the strategy and beam width with the best measured accuracy on a
validation split drawn from the task's training distribution (cross-validated; see that module).
``Settings.optimal_table`` names a table file for the registered strategies.

The budget counts samples (generated candidates / beams): the pilot spends ``P * pilot_n``; a best-of-N
run ``n``; a beam search with ``n`` beams ``n`` (one beam per sample slot, as the paper equates them).
The result's ``samples`` is the pilot's plus what each search reports (its ``samples``), its ``compute``
the pilot's and every search's records; ``prompt_info[i]`` holds prompt ``i``'s ``p``, ``level``,
``strategy`` (``"pilot"`` when nothing more was spent), ``beam_width``, ``n`` (samples allocated beyond
the pilot) and ``pilot_answer``; its candidates are the pilot's followed by those of its search.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..ops._validate import check_int
from ..ops.allocate import allocate_budget
from .answers import extract_answer, vote_key
from .best_of_n import best_of_n
from .cancel import sub_run
from .optimal_table import (PILOT_FEATURES, Calibration, OptimalTable, calibration_error, pilot_features,
                            plan_strategy)
from .result import SearchResult, select_candidates
from .seeds import Seeds
from .settings import Settings, resolve
from .validate import check_prompts

__all__ = ["compute_optimal", "OptimalStrategy", "Allocation", "run_pilot", "difficulty", "allocate",
           "search_allocated", "default_plan", "OptimalTable", "Calibration", "calibration_error", "pilot_features",
           "PILOT_FEATURES", "SAMPLING"]

# Strategies whose counts are single samples whatever the plan's beam width says.
SAMPLING = ("majority", "best_of_n", "weighted_best_of_n")
PILOT_RULE = "weighted"


def _width(strategy: str, beam_width: int) -> int:
    return 1 if strategy in SAMPLING else beam_width


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


@dataclass
class Allocation:
    """Who spends what: per prompt its calibrated (or estimated) ``p``, its ``level``, the ``strategy`` it runs
    after the pilot (``None``: the pilot alone), that strategy's ``beam_width`` and ``n``, its samples beyond
    the pilot; for ``budget`` samples per prompt with a pilot of ``pilot_n``. Plain data (a run can keep it)."""

    budget: int
    pilot_n: int
    p: list[float]
    level: list[int]
    strategy: list[str | None]
    beam_width: list[int | None]
    n: list[int]

    def __len__(self) -> int:
        return len(self.p)

    @property
    def samples(self) -> int:
        """Samples allocated in all: every pilot and every search."""
        return self.pilot_n * len(self) + sum(self.n)

    def take(self, idx: Sequence[int]) -> Allocation:
        """The allocation of prompts ``idx`` (a chunk of a larger run)."""
        return Allocation(self.budget, self.pilot_n, *([getattr(self, k)[i] for i in idx]
                                                       for k in ("p", "level", "strategy", "beam_width", "n")))


def _load(table) -> OptimalTable | None:
    if table is None or isinstance(table, OptimalTable):
        return table
    try:
        return OptimalTable.load(table)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"table: cannot read an OptimalTable from {table!r}: {exc}") from exc


def _setup(budget: int, *, pilot_n, strategies, plan, table, n_max, s: Settings):
    """Check the arguments of a compute-optimal search: ``(table, plan, pilot_n)``."""
    check_int("budget", budget, minimum=1)
    table = _load(table)
    if pilot_n is None:
        pilot_n = min(table.pilot(budget), budget) if table is not None else max(1, budget // 4)
    check_int("pilot_n", pilot_n, minimum=1)
    if budget < pilot_n:
        raise ValueError(f"budget={budget} per prompt is below the pilot's pilot_n = {pilot_n} samples per prompt")
    if n_max is not None:
        check_int("n_max", n_max, minimum=0)
    if table is None:
        if isinstance(strategies, str) or not strategies:
            raise ValueError(f"strategies must be a non-empty list of registered strategies, got {strategies!r}")
        for x in strategies:
            plan_strategy(x, "strategies")
        plan = plan or default_plan(s.levels, strategies, s.beam_width)
        for lv in range(s.levels):
            strat, bw = plan.get(lv, (None, None))
            if not isinstance(strat, str) or not isinstance(bw, int) or isinstance(bw, bool) or bw < 1:
                raise ValueError(f"plan[{lv}] must be (a registered strategy, beam_width >= 1), got {plan.get(lv)!r}")
            plan_strategy(strat, f"plan[{lv}]")
    return table, plan, pilot_n


@torch.no_grad()
def run_pilot(policy, verifier, prompts: Sequence[str], *, pilot_n: int, settings: Settings,
              seed: int | Sequence[int] | Seeds = 0, extract: Callable[[str], str | None] = extract_answer
              ) -> SearchResult:
    """Weighted best-of-``pilot_n`` on every prompt, in batches of at most ``settings.max_rows`` rows (batch
    ``b`` of a run seed draws under ``seed + 7919 b``; per-prompt seeds are kept)."""
    keys = Seeds.of(seed, len(prompts))
    pilot = None
    for b, part in enumerate(_batches(list(range(len(prompts))), pilot_n, settings.max_rows)):
        with sub_run(part):
            got = best_of_n(policy, verifier, [prompts[i] for i in part], n=pilot_n, select=PILOT_RULE,
                            settings=settings, seed=keys.take(part) if keys.keyed else keys.shift(7919 * b),
                            extract=extract)
        if pilot is None:
            pilot = got
        else:
            pilot.predictions += got.predictions
            pilot.chosen += got.chosen
            pilot.candidates += got.candidates
            pilot.compute = pilot.compute + got.compute
            pilot.samples += got.samples
    return pilot


def difficulty(features: torch.Tensor, *, table: OptimalTable | None, pilot_n: int, levels: int
               ) -> tuple[torch.Tensor, list[int]]:
    """``(p [P], level per prompt)`` from pilot features ``[P, 3]`` (:func:`pilot_features`): the table's
    calibration and edges, or (no table) mean score times agreement binned by quantiles over these prompts."""
    if table is not None:
        p = table.calibration(pilot_n).predict(features)
        return p, table.level(p)
    mean = torch.sigmoid(features[:, 0])
    p = (mean * features[:, 2]).clamp(0.0, 1.0)
    return p, _levels(p, levels)


def allocate(p: torch.Tensor, level: list[int], *, budget: int, pilot_n: int, table: OptimalTable | None = None,
             plan: dict[int, tuple[str, int]] | None = None, n_max: int | None = None) -> Allocation:
    """Split ``budget * P`` samples over the ``P`` prompts whose pilot estimates are ``p`` and ``level`` (move 3
    of the module docstring): a knapsack over ``table``'s measured curves, or pass@N coverage with ``plan``."""
    P = len(level)
    total, rest = budget * P, (budget - pilot_n) * P
    if table is not None:  # measured accuracy per (level, samples): a knapsack over the fitted plans
        alloc = [t - pilot_n for t in table.allocate(budget, level, pilot_n, total)]
        if n_max is not None:
            alloc = [min(a, n_max) for a in alloc]
    else:  # coverage counts the pilot's samples too: the whole budget with the pilot as each floor
        alloc = (allocate_budget(p, total, n_min=pilot_n, n_max=None if n_max is None else pilot_n + n_max)
                 - pilot_n).tolist()
    pick = []
    for i in range(P):
        strat, bw = table.choose(budget, level[i], pilot_n + alloc[i]) if table is not None else plan[level[i]]
        # A beam wider than the samples it gets runs as wide as they allow (as every registered tree search does).
        pick.append((strat, max(1, min(_width(strat, bw), alloc[i]))))
    widths = [w for _, w in pick]
    n_run = [a - a % w for a, w in zip(alloc, widths)]
    _top_up(n_run, widths, p.tolist(), rest - sum(n_run), n_max, pilot_n)
    return Allocation(budget, pilot_n, [float(x) for x in p.tolist()], list(level),
                      [st if n else None for (st, _), n in zip(pick, n_run)],
                      [w if n else None for (_, w), n in zip(pick, n_run)], n_run)


@torch.no_grad()
def search_allocated(policy, verifier, prompts: Sequence[str], pilot: SearchResult, alloc: Allocation, *,
                     settings: Settings, seed: int | Sequence[int] | Seeds = 0,
                     extract: Callable[[str], str | None] = extract_answer, name: str = "compute_optimal"
                     ) -> SearchResult:
    """Move 4: run each prompt's allocated strategy through the registry (under ``seed + 1``, per prompt when
    ``seed`` is a list) and pick each prompt's answer over its ``pilot`` candidates and its search's. ``pilot``
    holds the prompts' pilot (its ``candidates``, ``predictions``, ``compute``, ``samples``)."""
    s = settings
    P = len(prompts)
    keys = Seeds.of(seed, P).shift(1)
    info = [{"p": alloc.p[i], "level": alloc.level[i], "strategy": "pilot", "beam_width": None, "n": 0,
             "pilot_answer": pilot.predictions[i]} for i in range(P)]
    candidates = [list(row) for row in pilot.candidates]
    rule_of: list[str | None] = [PILOT_RULE] * P
    own: dict[int, tuple] = {}  # prompt -> (chosen, prediction) of a strategy that picks by its own rule
    groups: dict[tuple, list[int]] = {}
    for i in range(P):
        if alloc.n[i] > 0:
            groups.setdefault((alloc.strategy[i], alloc.n[i], alloc.beam_width[i]), []).append(i)
    compute, spent = pilot.compute, pilot.samples
    for (strat, n, bw), idx in sorted(groups.items()):
        entry = plan_strategy(strat, f"prompt {idx[0]}'s plan")
        for b, part in enumerate(_batches(idx, n, s.max_rows)):
            with sub_run(part):  # a prompt cancelled in this run is cancelled in the sub-search, by its new index
                res = entry.fn(policy, verifier, [prompts[i] for i in part], budget=n,
                               settings=s.replace(beam_width=bw), extract=extract,
                               seed=keys.take(part).per_prompt if keys.keyed else keys.seed + 7919 * b)
            if res.samples > n * len(part):
                raise RuntimeError(f"strategy {strat!r} spent {res.samples} samples where it was allocated {n} for "
                                   f"each of {len(part)} prompts")
            compute = compute + res.compute
            spent += res.samples
            for j, i in enumerate(part):
                info[i].update(strategy=strat, beam_width=bw, n=n)
                rule_of[i] = entry.select
                if entry.select is None:
                    c = res.chosen[j]
                    own[i] = (None if c is None else len(candidates[i]) + c, res.predictions[j])
                candidates[i] += res.candidates[j]
    # Each prompt's answer by its strategy's rule over the pilot and the search together (one call per rule).
    chosen, predictions = [None] * P, [None] * P
    for i, (c, a) in own.items():
        chosen[i], predictions[i] = c, a
    for rule in sorted({r for r in rule_of if r is not None}):
        idx = [i for i in range(P) if rule_of[i] == rule]
        c, a = select_candidates([candidates[i] for i in idx], rule, None, s.vote_key)
        for j, i in enumerate(idx):
            chosen[i], predictions[i] = c[j], a[j]
    return SearchResult(strategy=name, budget=alloc.budget, predictions=predictions, chosen=chosen,
                        candidates=candidates, compute=compute, samples=spent, prompt_info=info)


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
    one, ``strategies`` (registered strategies: :data:`~tts_kernels.search.STRATEGIES`), ``Settings.levels``
    and ``Settings.beam_width`` build :func:`default_plan`, or ``plan`` maps level -> ``(strategy,
    beam_width)`` explicitly. ``n_max`` caps the samples allocated to one prompt beyond its pilot. The searches
    run with ``settings`` (and keyword ``overrides``), the pilot with ``seed`` and the searches with
    ``seed + 1`` (per prompt when ``seed`` is a list). ``name`` is the result's ``strategy``.
    """
    s = resolve(settings, overrides)
    prompts = check_prompts(prompts)
    if verifier is None:
        raise ValueError(f"{name} needs a verifier (difficulty comes from its scores)")
    keys = Seeds.of(seed, len(prompts))
    table, plan, pilot_n = _setup(budget, pilot_n=pilot_n, strategies=strategies, plan=plan,
                                  table=table if table is not None else s.optimal_table, n_max=n_max, s=s)
    pilot = run_pilot(policy, verifier, prompts, pilot_n=pilot_n, settings=s, seed=keys, extract=extract)
    p, lv = difficulty(pilot_features(pilot.candidates, vote_key(s.vote_key)), table=table, pilot_n=pilot_n,
                       levels=s.levels)
    alloc = allocate(p, lv, budget=budget, pilot_n=pilot_n, table=table, plan=plan, n_max=n_max)
    res = search_allocated(policy, verifier, prompts, pilot, alloc, settings=s, seed=keys, extract=extract, name=name)
    assert res.samples <= budget * len(prompts), (res.samples, budget)  # allocation sums to <= the budget
    return res


@dataclass(frozen=True)
class OptimalStrategy:
    """A registered compute-optimal strategy: ``compute_optimal`` (``strategies``: its default plan's, without
    a table) or, with one strategy, ``adaptive_best_of_n`` (the table's calibration and levels with that
    strategy in every plan: :meth:`OptimalTable.only`). Called as a strategy it is :func:`compute_optimal`
    over the call's prompts with ``Settings.optimal_table``. Its phases, :meth:`pilot`, :meth:`allocate` and
    :meth:`search`, let a caller spend one budget over more prompts than one call holds (``tts-kernels eval``:
    every chunk's pilot, one run-wide allocation, every chunk's searches); run over one call's prompts they
    are that call."""

    name: str
    strategies: tuple[str, ...]

    def fitted(self, table) -> OptimalTable | None:
        """``table`` (an :class:`OptimalTable`, a path or ``None``) as this strategy reads it."""
        table = _load(table)
        return table.only(self.strategies[0]) if table is not None and len(self.strategies) == 1 else table

    def __call__(self, policy, verifier, prompts, *, budget, settings, seed, extract) -> SearchResult:
        return compute_optimal(policy, verifier, prompts, budget=budget, strategies=self.strategies, settings=settings,
                               table=self.fitted(settings.optimal_table), seed=seed, extract=extract, name=self.name)

    def pilot_n(self, budget: int, table, settings: Settings) -> int:
        """The pilot's samples per prompt at ``budget`` (checking the arguments as a call does)."""
        return _setup(budget, pilot_n=None, strategies=self.strategies, plan=None, table=self.fitted(table),
                      n_max=None, s=settings)[2]

    def pilot(self, policy, verifier, prompts, *, budget: int, table, settings: Settings, seed,
              extract=extract_answer) -> SearchResult:
        """Move 1 over ``prompts``."""
        return run_pilot(policy, verifier, prompts, pilot_n=self.pilot_n(budget, table, settings), settings=settings,
                         seed=seed, extract=extract)

    def allocate(self, features: torch.Tensor, *, budget: int, table, settings: Settings) -> Allocation:
        """Moves 2 and 3 over every prompt whose pilot features (``[P, 3]``, :func:`pilot_features`) are given."""
        fitted, plan, pilot_n = _setup(budget, pilot_n=None, strategies=self.strategies, plan=None,
                                       table=self.fitted(table), n_max=None, s=settings)
        p, lv = difficulty(features, table=fitted, pilot_n=pilot_n, levels=settings.levels)
        return allocate(p, lv, budget=budget, pilot_n=pilot_n, table=fitted, plan=plan)

    def search(self, policy, verifier, prompts, pilot: SearchResult, alloc: Allocation, *, settings: Settings, seed,
               extract=extract_answer) -> SearchResult:
        """Move 4 over ``prompts`` (``alloc``: theirs, e.g. :meth:`Allocation.take` of a run-wide one)."""
        return search_allocated(policy, verifier, prompts, pilot, alloc, settings=settings, seed=seed, extract=extract,
                                name=self.name)
