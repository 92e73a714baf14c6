"""Compute-optimal test-time search: spend a sample budget where it buys the most.

``compute_optimal(policy, verifier, prompts, budget=N)`` spends ``N * len(prompts)`` samples
(``N`` per prompt on average, the meaning ``budget`` has for every strategy), after Snell et
al. (arXiv 2408.03314), in four moves:

1. **Pilot.** Best-of-``pilot_n`` on every prompt (one batched ``best_of_n`` call; default
   ``pilot_n = max(1, N // 4)``).
2. **Difficulty.** Per prompt, ``p_i`` = the mean PRM aggregate of its pilot answers
   times the agreement among them (the share of pilot answers equal to the majority
   answer; 1 when no answer could be extracted): an estimate of the chance that one
   more sample is right. Prompts are binned into ``levels`` difficulty levels by
   quantiles of ``p`` (level 0: easiest); ``Settings.levels`` levels.
3. **Strategy per level.** ``plan[level] = (strategy, beam_width)``; the default
   follows the paper's finding: best-of-N for the easier half of the levels, PRM beam
   search (``Settings.beam_width``) for the harder half.
4. **Allocation.** The budget left after the pilot is split by
   :func:`~tts_kernels.allocate_budget` to maximise ``sum_i 1 - (1 - p_i)^N_i``
   (exact), then each ``N_i`` is rounded *down* to a multiple of its beam width, so
   the total never exceeds ``N * P``. Prompts with ``N_i = 0`` keep their pilot answer.

The budget counts samples (generated candidates / beams): the pilot spends
``P * pilot_n``; a best-of-N run spends ``N``; a beam search with ``n`` beams spends ``n``
(one beam per sample slot, as the paper equates them). The result's ``compute`` sums the
pilot's and every search's records; ``prompt_info[i]`` holds prompt ``i``'s ``p``, ``level``,
``strategy`` (``"pilot"`` when nothing more was spent), ``n`` (samples beyond the pilot) and
``pilot_answer``; its candidates are the pilot's followed by those of its search.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch

from ..ops._validate import check_int
from ..ops.allocate import allocate_budget
from .answers import extract_answer, vote_key
from .best_of_n import best_of_n
from .cancel import sub_run
from .result import SearchResult
from .seeds import Seeds
from .settings import Settings, resolve
from .step_search import dvts, prm_beam_search
from .validate import check_prompts

STRATEGIES = ("best_of_n", "prm_beam_search", "dvts")
# How each plan strategy picks its answer (best_of_n here is weighted best-of-N, as in the paper's
# "best-of-N weighted" for easy questions).
_SEARCH = {"best_of_n": (best_of_n, "weighted"), "prm_beam_search": (prm_beam_search, "best"),
           "dvts": (dvts, "weighted")}


def _levels(p: torch.Tensor, levels: int) -> list[int]:
    """Quantile bins of ``p`` (descending: level 0 holds the highest p, the easiest prompts)."""
    P = p.shape[0]
    order = torch.argsort(-p, stable=True).tolist()
    out = [0] * P
    for rank, i in enumerate(order):
        out[i] = min(levels - 1, rank * levels // max(P, 1))
    return out


def default_plan(levels: int, strategies: Sequence[str] = ("best_of_n", "prm_beam_search"),
                 beam_width: int = 4) -> dict[int, tuple[str, int]]:
    """The easier half of the levels get ``strategies[0]``, the harder half ``strategies[-1]``
    (tree searches with ``beam_width``)."""
    def width(s):
        return 1 if s == "best_of_n" else beam_width
    easy, hard = strategies[0], strategies[-1]
    return {lv: ((easy, width(easy)) if lv < (levels + 1) // 2 else (hard, width(hard))) for lv in range(levels)}


@torch.no_grad()
def compute_optimal(policy, verifier, prompts: Sequence[str], *, budget: int, pilot_n: int | None = None,
                    strategies: Sequence[str] = ("best_of_n", "prm_beam_search"),
                    plan: dict[int, tuple[str, int]] | None = None, n_max: int | None = None,
                    settings: Settings | None = None, seed: int | Sequence[int] = 0,
                    extract: Callable[[str], str | None] = extract_answer, name: str = "compute_optimal",
                    **overrides) -> SearchResult:
    """Pilot, estimate difficulty, choose a strategy per level, allocate the rest of ``budget * P`` samples.

    ``budget``: samples per prompt on average. ``strategies`` (from ``"best_of_n"``,
    ``"prm_beam_search"``, ``"dvts"``), ``Settings.levels`` and ``Settings.beam_width`` build the
    default plan (:func:`default_plan`); ``plan`` maps level -> ``(strategy, beam_width)``
    explicitly instead. ``n_max`` caps the samples of one prompt. The searches run with
    ``settings`` (and keyword ``overrides``), the pilot with ``seed`` and the searches with
    ``seed + 1`` (per prompt when ``seed`` is a list). ``name`` is the result's ``strategy``.
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
    if isinstance(strategies, str) or not strategies or any(x not in STRATEGIES for x in strategies):
        raise ValueError(f"strategies must be a non-empty list from {STRATEGIES}, got {strategies!r}")
    levels = s.levels
    plan = plan or default_plan(levels, strategies, s.beam_width)
    for lv in range(levels):
        strat, bw = plan.get(lv, (None, None))
        if strat not in STRATEGIES or not isinstance(bw, int) or bw < 1:
            raise ValueError(f"plan[{lv}] must be (one of {STRATEGIES}, beam_width >= 1), got {plan.get(lv)!r}")

    pilot = best_of_n(policy, verifier, prompts, n=pilot_n, select="weighted", settings=s, seed=keys,
                      extract=extract)
    compute = pilot.compute
    scores = torch.tensor([[c.score for c in row] for row in pilot.candidates], dtype=torch.float32)
    mean = torch.nan_to_num(scores, nan=0.0).mean(1)
    agree = []
    key = vote_key(s.vote_key) or (lambda a: a)
    for row in pilot.candidates:
        answers = [key(c.answer) for c in row if c.answer is not None]
        agree.append(Counter(answers).most_common(1)[0][1] / len(row) if answers else 1.0)
    p = (mean * torch.tensor(agree)).clamp(0.0, 1.0).double()
    lv = _levels(p, levels)

    spent = P * pilot_n
    alloc = allocate_budget(p, total - spent, n_min=0, n_max=n_max).tolist()
    n_run = []
    for i in range(P):
        strat, bw = plan[lv[i]]
        n_run.append(alloc[i] - alloc[i] % bw if strat != "best_of_n" else alloc[i])
    info = [{"p": float(p[i]), "level": lv[i], "strategy": "pilot", "n": 0, "pilot_answer": pilot.predictions[i]}
            for i in range(P)]
    predictions, chosen = list(pilot.predictions), list(pilot.chosen)
    candidates = [list(row) for row in pilot.candidates]
    # One batched call per (strategy, n, beam width).
    groups: dict[tuple, list[int]] = {}
    for i in range(P):
        if n_run[i] > 0:
            strat, bw = plan[lv[i]]
            groups.setdefault((strat, n_run[i], bw), []).append(i)
    for (strat, n, bw), idx in sorted(groups.items()):
        search, rule = _SEARCH[strat]
        with sub_run(idx):  # a prompt cancelled in this run is cancelled in the sub-search, by its new index
            res = search(policy, verifier, [prompts[i] for i in idx], n=n, select=rule,
                         settings=s.replace(beam_width=bw), seed=keys.shift(1).take(idx), extract=extract)
        compute = compute + res.compute
        for j, i in enumerate(idx):
            info[i]["strategy"], info[i]["n"] = strat, n
            if res.predictions[j] is not None:
                predictions[i] = res.predictions[j]
                chosen[i] = len(candidates[i]) + res.chosen[j]
            candidates[i] += res.candidates[j]
        spent += n * len(idx)
    assert spent <= total, (spent, total)  # by construction: allocation sums to <= the rest, rounded down
    return SearchResult(strategy=name, budget=budget, predictions=predictions, chosen=chosen, candidates=candidates,
                        compute=compute, samples=spent, prompt_info=info)
