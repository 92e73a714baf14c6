"""Compute-optimal test-time search: spend a sample budget where it buys the most.

``compute_optimal(policy, prm, prompts, budget=..., pilot_n=...)``, after Snell et al.
(arXiv 2408.03314), in four moves:

1. **Pilot.** Best-of-``pilot_n`` on every prompt (one batched ``best_of_n`` call).
2. **Difficulty.** Per prompt, ``p_i`` = the mean PRM aggregate of its pilot answers
   times the agreement among them (the share of pilot answers equal to the majority
   answer; 1 when no answer could be extracted): an estimate of the chance that one
   more sample is right. Prompts are binned into ``levels`` difficulty levels by
   quantiles of ``p`` (level 0: easiest).
3. **Strategy per level.** ``plan[level] = (strategy, beam_width)``; the default
   follows the paper's finding: best-of-N for the easier half of the levels, PRM beam
   search (``beam_width`` 4) for the harder half.
4. **Allocation.** The budget left after the pilot is split by
   :func:`~tts_kernels.allocate_budget` to maximise ``sum_i 1 - (1 - p_i)^N_i``
   (exact), then each ``N_i`` is rounded *down* to a multiple of its beam width, so
   the total never exceeds ``budget``. Prompts with ``N_i = 0`` keep their pilot answer.

The budget counts samples (generated candidates / beams): the pilot spends
``P * pilot_n``; a best-of-N run spends ``N``; a beam search with ``n`` beams spends ``n``
(one beam per sample slot, as the paper equates them). Token counts are reported too.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..ops.allocate import allocate_budget
from .accounting import Compute
from .best_of_n import best_of_n
from .step_search import dvts, prm_beam_search


@dataclass
class PromptReport:
    prompt: str
    p: float  # estimated success probability of one sample
    level: int
    strategy: str  # "pilot" when nothing more was spent
    n: int  # samples spent beyond the pilot
    beam_width: int
    answer: str | None
    pilot_answer: str | None


@dataclass
class ComputeOptimalResult:
    prompts: list[PromptReport]
    samples_spent: int
    budget: int
    tokens: dict = field(default_factory=dict)
    compute: Compute = field(default_factory=Compute)  # pilot + every search run, tokens and FLOPs

    @property
    def answers(self) -> list[str | None]:
        return [r.answer for r in self.prompts]


def _levels(p: torch.Tensor, levels: int) -> list[int]:
    """Quantile bins of ``p`` (descending: level 0 holds the highest p, the easiest prompts)."""
    P = p.shape[0]
    order = torch.argsort(-p, stable=True).tolist()
    out = [0] * P
    for rank, i in enumerate(order):
        out[i] = min(levels - 1, rank * levels // max(P, 1))
    return out


STRATEGIES = ("best_of_n", "prm_beam_search", "dvts")


def default_plan(levels: int, strategies: Sequence[str] = ("best_of_n", "prm_beam_search"),
                 beam_width: int = 4) -> dict[int, tuple[str, int]]:
    """The easier half of the levels get ``strategies[0]``, the harder half ``strategies[-1]``
    (tree searches with ``beam_width``)."""
    def width(s):
        return 1 if s == "best_of_n" else beam_width
    easy, hard = strategies[0], strategies[-1]
    return {lv: ((easy, width(easy)) if lv < (levels + 1) // 2 else (hard, width(hard))) for lv in range(levels)}


@torch.no_grad()
def compute_optimal(policy, prm, prompts: Sequence[str], *, budget: int, pilot_n: int = 4, levels: int = 5,
                    strategies: Sequence[str] = ("best_of_n", "prm_beam_search"), beam_width: int = 4,
                    plan: dict[int, tuple[str, int]] | None = None, max_new_tokens: int = 256,
                    max_step_tokens: int = 64, num_iterations: int = 4, step_delimiter: str = "\n\n",
                    temperature: float = 0.8, top_p: float = 1.0, agg: str = "last", seed: int = 0,
                    n_max: int | None = None, **kw) -> ComputeOptimalResult:
    """Pilot, estimate difficulty, choose a strategy per level, allocate the rest of ``budget`` (samples).

    ``strategies`` (from ``"best_of_n"``, ``"prm_beam_search"``, ``"dvts"``) and ``beam_width``
    build the default plan (:func:`default_plan`); ``plan`` maps level -> ``(strategy,
    beam_width)`` explicitly instead. ``n_max`` caps the samples of one prompt. Extra keyword
    arguments go to both searches' common options (e.g. ``extract``).
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    P = len(prompts)
    for name, v in (("budget", budget), ("pilot_n", pilot_n), ("levels", levels)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if budget < P * pilot_n:
        raise ValueError(f"budget={budget} is below the pilot's P * pilot_n = {P} * {pilot_n} = {P * pilot_n} samples")
    if isinstance(strategies, str) or not strategies or any(s not in STRATEGIES for s in strategies):
        raise ValueError(f"strategies must be a non-empty list from {STRATEGIES}, got {strategies!r}")
    plan = plan or default_plan(levels, strategies, beam_width)
    for lv in range(levels):
        strat, bw = plan.get(lv, (None, None))
        if strat not in STRATEGIES or not isinstance(bw, int) or bw < 1:
            raise ValueError(f"plan[{lv}] must be (one of {STRATEGIES}, beam_width >= 1), got {plan.get(lv)!r}")

    pilot = best_of_n(policy, prm, prompts, pilot_n, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_p=top_p, agg=agg, seed=seed, **kw)
    tokens = {"policy": pilot.policy_tokens, "prm": pilot.prm_tokens}
    compute = pilot.compute
    mean = torch.nan_to_num(pilot.scores.float(), nan=0.0).mean(1).cpu()
    agree = []
    for row in pilot.candidates:
        answers = [c.answer for c in row if c.answer is not None]
        agree.append(Counter(answers).most_common(1)[0][1] / len(row) if answers else 1.0)
    p = (mean * torch.tensor(agree)).clamp(0.0, 1.0).double()
    lv = _levels(p, levels)

    spent = P * pilot_n
    alloc = allocate_budget(p, budget - spent, n_min=0, n_max=n_max).tolist()
    n_run = []
    for i in range(P):
        strat, bw = plan[lv[i]]
        n_run.append(alloc[i] - alloc[i] % bw if strat != "best_of_n" else alloc[i])
    reports = [PromptReport(prompt=prompts[i], p=float(p[i]), level=lv[i], strategy="pilot", n=0,
                            beam_width=plan[lv[i]][1], answer=pilot.weighted[i], pilot_answer=pilot.weighted[i])
               for i in range(P)]
    # One batched call per (strategy, n, beam width).
    groups: dict[tuple, list[int]] = {}
    for i in range(P):
        if n_run[i] > 0:
            strat, bw = plan[lv[i]]
            groups.setdefault((strat, n_run[i], bw), []).append(i)
    for (strat, n, bw), idx in sorted(groups.items()):
        sub = [prompts[i] for i in idx]
        if strat == "best_of_n":
            res = best_of_n(policy, prm, sub, n, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, agg=agg, seed=seed + 1, **kw)
            answers = res.weighted
            tokens["policy"] += res.policy_tokens
            tokens["prm"] += res.prm_tokens
            compute = compute + res.compute
        else:
            search = prm_beam_search if strat == "prm_beam_search" else dvts
            res = search(policy, prm, sub, n=n, beam_width=bw, num_iterations=num_iterations,
                         step_delimiter=step_delimiter, max_step_tokens=max_step_tokens,
                         max_final_tokens=max_new_tokens, agg=agg, temperature=temperature, top_p=top_p,
                         seed=seed + 1, **kw)
            answers = res.best_answer if strat == "prm_beam_search" else res.weighted
            tokens["policy"] += res.compute.policy_prefill_tokens + res.compute.policy_generated_tokens
            tokens["prm"] += res.compute.prm_tokens
            compute = compute + res.compute
        for j, i in enumerate(idx):
            reports[i].strategy, reports[i].n = strat, n
            reports[i].answer = answers[j] if answers[j] is not None else reports[i].pilot_answer
        spent += n * len(idx)
    assert spent <= budget, (spent, budget)  # by construction: allocation sums to <= the rest, rounded down
    return ComputeOptimalResult(prompts=reports, samples_spent=spent, budget=budget, tokens=tokens, compute=compute)
