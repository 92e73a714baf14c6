"""Named test-time strategies at a sample budget, with one result shape: what ``demo`` and ``eval`` run.

``run_strategies(names, policy, prm, prompts, budget, settings=...)`` runs each named
strategy over all ``prompts`` with ``budget`` samples per prompt and returns, per
strategy, a :class:`StrategyRun`: one :class:`Outcome` per prompt (prediction, every
candidate's answer and score) and the :class:`~tts_kernels.search.Compute` spent.

Strategies (budget ``N`` = samples, or beams, per prompt):

* ``greedy`` — one greedy completion (the budget is ignored: always 1).
* ``majority``, ``best_of_n``, ``weighted_best_of_n`` — ``N`` sampled completions, then the
  most frequent answer, the PRM's best completion, or the answer with the largest summed
  PRM score. The three share one :func:`~tts_kernels.search.best_of_n` run when asked
  together (same samples, same compute).
* ``prm_beam_search``, ``dvts`` — step-level searches with ``N`` beams and beam width
  ``min(settings.beam_width, N)``.
* ``compute_optimal`` — the whole budget ``P * N`` spent by
  :func:`~tts_kernels.search.compute_optimal`: a best-of-``N/4`` pilot, difficulty levels,
  best-of-N for easier and PRM beam search for harder prompts, the rest allocated where
  it raises expected accuracy most.
* ``adaptive_best_of_n`` — the same pilot and allocation with weighted best-of-N for
  every level: uniform ``weighted_best_of_n`` and this differ only in where the samples
  go, so the pair measures allocation alone at equal sample budget.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .accounting import Compute
from .answers import extract_answer
from .best_of_n import best_of_n
from .compute_optimal import compute_optimal
from .step_search import dvts, prm_beam_search

SAMPLING = ("majority", "best_of_n", "weighted_best_of_n")
STRATEGIES = ("greedy",) + SAMPLING + ("prm_beam_search", "dvts", "compute_optimal", "adaptive_best_of_n")
NEEDS_PRM = frozenset(STRATEGIES) - {"greedy", "majority"}


@dataclass(frozen=True)
class SearchSettings:
    """Generation and search settings shared by every strategy."""

    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 96  # a whole completion (sampling strategies, a search's last iteration)
    max_step_tokens: int = 24  # one step of a step-level search
    num_iterations: int = 8  # steps of a step-level search (the last one generates to the end)
    beam_width: int = 4
    agg: str = "last"  # how step scores fold into a candidate's score
    step_delimiter: str = "\n\n"
    levels: int = 4  # compute_optimal difficulty levels


@dataclass
class Outcome:
    """One prompt's result: the prediction and every candidate's answer and score."""

    prediction: str | None
    answers: list[str | None] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # strategy-specific (compute_optimal: level, strategy, n)


@dataclass
class StrategyRun:
    strategy: str
    budget: int  # samples per prompt asked for
    outcomes: list[Outcome]
    compute: Compute
    samples: int  # samples (completions / beams) actually spent over all prompts


def _sampling_runs(names, policy, prm, prompts, n, s: SearchSettings, seed, extract) -> dict[str, StrategyRun]:
    res = best_of_n(policy, prm, prompts, n, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                    top_p=s.top_p, agg=s.agg, seed=seed, extract=extract)
    pick = {"majority": res.majority, "best_of_n": res.best_of_n, "weighted_best_of_n": res.weighted}
    out = {}
    for name in names:
        outcomes = [Outcome(prediction=pick[name][i], answers=[c.answer for c in row],
                            scores=[c.score for c in row]) for i, row in enumerate(res.candidates)]
        out[name] = StrategyRun(name, n, outcomes, res.compute, n * len(prompts))
    return out


def _step_run(name, policy, prm, prompts, n, s: SearchSettings, seed, extract) -> StrategyRun:
    search = prm_beam_search if name == "prm_beam_search" else dvts
    res = search(policy, prm, prompts, n=n, beam_width=min(s.beam_width, n), num_iterations=s.num_iterations,
                 step_delimiter=s.step_delimiter, max_step_tokens=s.max_step_tokens,
                 max_final_tokens=s.max_new_tokens, agg=s.agg, temperature=s.temperature, top_p=s.top_p, seed=seed,
                 extract=extract)
    pred = res.best_answer if name == "prm_beam_search" else res.weighted
    outcomes = [Outcome(prediction=pred[i], answers=[c.answer for c in done], scores=[c.score for c in done])
                for i, done in enumerate(res.completed)]
    return StrategyRun(name, n, outcomes, res.compute, n * len(prompts))


def _optimal_run(name, policy, prm, prompts, n, s: SearchSettings, seed, extract) -> StrategyRun:
    strategies = ("best_of_n",) if name == "adaptive_best_of_n" else ("best_of_n", "prm_beam_search")
    res = compute_optimal(policy, prm, prompts, budget=n * len(prompts), pilot_n=max(1, n // 4), levels=s.levels,
                          strategies=strategies, beam_width=s.beam_width, max_new_tokens=s.max_new_tokens,
                          max_step_tokens=s.max_step_tokens, num_iterations=s.num_iterations,
                          step_delimiter=s.step_delimiter, temperature=s.temperature, top_p=s.top_p, agg=s.agg,
                          seed=seed, extract=extract)
    outcomes = [Outcome(prediction=r.answer, info={"p": r.p, "level": r.level, "strategy": r.strategy, "n": r.n,
                                                   "pilot_answer": r.pilot_answer}) for r in res.prompts]
    return StrategyRun(name, n, outcomes, res.compute, res.samples_spent)


def run_strategies(names: Sequence[str], policy, prm, prompts: Sequence[str], budget: int, *,
                   settings: SearchSettings = SearchSettings(), seed: int = 0,
                   extract: Callable[[str], str | None] = extract_answer) -> dict[str, StrategyRun]:
    """Run each of ``names`` (from :data:`STRATEGIES`) on ``prompts`` at ``budget`` samples per prompt."""
    if isinstance(names, str) or not names or any(n not in STRATEGIES for n in names):
        raise ValueError(f"names must be a non-empty list from {STRATEGIES}, got {names!r}")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    if prm is None and any(n in NEEDS_PRM for n in names):
        raise ValueError(f"strategies {sorted(NEEDS_PRM & set(names))} need a prm")
    prompts = list(prompts)
    out: dict[str, StrategyRun] = {}
    sampling = [n for n in names if n in SAMPLING]
    if sampling:
        out.update(_sampling_runs(sampling, policy, prm if set(sampling) - {"majority"} else None, prompts, budget,
                                  settings, seed, extract))
    for name in names:
        if name == "greedy":
            res = best_of_n(policy, None, prompts, 1, max_new_tokens=settings.max_new_tokens, temperature=0.0,
                            extract=extract)
            out[name] = StrategyRun(name, 1, [Outcome(prediction=a, answers=[a], scores=[float("nan")])
                                              for a in res.majority], res.compute, len(prompts))
        elif name in ("prm_beam_search", "dvts"):
            out[name] = _step_run(name, policy, prm, prompts, budget, settings, seed, extract)
        elif name in ("compute_optimal", "adaptive_best_of_n"):
            out[name] = _optimal_run(name, policy, prm, prompts, budget, settings, seed, extract)
    return {n: out[n] for n in names}
