"""REBASE: reward-balanced expansion of a step tree, on the paged cache.

After Wu et al. 2024 ("Inference Scaling Laws: An Empirical Analysis of Compute-Optimal Inference for
Problem-Solving with Language Models", REBASE), read for its meaning. Per prompt a tree of steps grows
under a width budget ``N`` (``budget``):

* the root (the prompt) is expanded into ``N`` children; every child samples one step (up to
  ``step_delimiter``; the last of ``num_iterations`` generates to the end) and the verifier scores it;
* a child that finishes (EOS, an empty step, no delimiter within ``max_step_tokens`` unless
  ``step_cap="continue"``, a ``stop`` string or with ``stop_at_answer`` a closed ``\\boxed{}``, the last
  iteration) is a completed solution, and the remaining width ``W = N - completed`` shrinks by one;
* the live nodes ``i`` (reward ``r_i``: their aggregate score, ``Settings.agg``) are expanded into
  ``w_i`` children each, ``w = largest_remainder(W * softmax(r / T))`` with ``T =
  Settings.rebase_temperature`` (:func:`expansion_widths`): the shares are floored and the ``W - sum``
  children left go to the largest remainders, ties to the earlier node, so the widths sum to ``W``
  exactly and the rule is deterministic on any device. A node given 0 children is pruned.

No rollouts. Every child either completes or stays live, so a prompt's live nodes always number its
remaining width: it never holds more than ``N`` rows and ends with exactly ``N`` completed leaves
(``N`` samples, as every strategy's budget). The answer is picked from the completed leaves by
``select`` (default ``"weighted"``: the answer with the largest summed score; ``"best"``, ``"majority"``).

A child is a fork of its node's row (:class:`~tts_kernels.search.rows.StepRows`): the policy's paged KV
history and the verifier's row are shared, no bytes move. The allocation is one ``[P, N]`` device op for
all prompts, a prompt's row laid out by its own nodes only (padded to ``N``), and each prompt's children
draw on their own streams, so with one seed per prompt a prompt's tree does not depend on its batch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..ops._validate import check_int
from .answers import extract_answer
from .cancel import cancelled
from .result import SELECT_RULES, Candidate, SearchResult, select_candidates
from .settings import Settings, resolve
from .step_loop import alone, serve_groups
from .validate import check_prompts


def expansion_widths(scores: torch.Tensor, live: torch.Tensor, width: torch.Tensor, temperature: float) -> torch.Tensor:
    """Children per node, ``[P, K]`` int64: ``width[p]`` children split over the live nodes of row ``p`` by
    ``softmax(scores / temperature)`` (float64), the shares floored and the children left over given one
    each to the largest remainders (ties to the lower index); dead nodes get 0.

    ``scores [P, K]`` (any float dtype; NaN ranks as ``-inf``), ``live [P, K]`` bool, ``width [P]`` int. A
    row whose live scores are all ``-inf`` splits evenly; a row with no live node gets nothing. Each row is
    computed from its own entries only. Meaning in plain Python: ``tests/test_rebase.py``'s reference.
    """
    if scores.dim() != 2 or live.shape != scores.shape or width.shape != scores.shape[:1]:
        raise ValueError(f"scores [P, K], live [P, K] and width [P]: got {tuple(scores.shape)}, "
                         f"{tuple(live.shape)}, {tuple(width.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    neg = torch.tensor(float("-inf"), dtype=torch.float64, device=scores.device)
    s = torch.where(live & ~torch.isnan(scores), scores.double(), neg)
    top = s.amax(1, keepdim=True)
    flat = ~torch.isfinite(top)  # no finite live score: an even split
    z = torch.where(flat, torch.where(live, 0.0, neg), torch.where(live, (s - top) / temperature, neg))
    p = torch.softmax(z, 1).nan_to_num(0.0)  # a row with no live node: all zero
    share = p * width.to(torch.float64)[:, None]
    base = share.floor()
    rem = torch.where(live, share - base, -1.0)
    left = width.to(torch.float64) - base.sum(1)
    order = torch.sort(rem, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(rem.shape[1], device=rem.device).expand_as(order))
    extra = (rank < left[:, None]) & live
    return torch.where(live, base.to(torch.int64) + extra.to(torch.int64), 0)


@torch.no_grad()
def rebase(policy, verifier, prompts: Sequence[str], *, n: int, select: str = "weighted",
           settings: Settings | None = None, seed: int | Sequence[int] = 0,
           extract: Callable[[str], str | None] = extract_answer, **overrides) -> SearchResult:
    """REBASE with a width budget of ``n`` per prompt (see the module docstring).

    Settings read: ``rebase_temperature``, ``num_iterations``, ``step_delimiter``, ``max_step_tokens``,
    ``max_new_tokens``, ``step_cap``, ``stop``, ``stop_at_answer``, ``agg``, ``temperature``, ``top_p``,
    ``top_k``, ``min_p``, ``sync_every``, ``thinking``, ``vote_key`` (``settings`` and keyword
    ``overrides``). Returns every completed leaf per prompt (``n`` of them unless the prompt was
    cancelled); ``prompt_info[p]["widths"]`` holds, per depth after the first, the children given to each
    of the prompt's live nodes (in row order).
    """
    s = resolve(settings, overrides)
    prompts = _check(verifier, prompts, n, select)
    return alone(policy, verifier, prompts, seed, _Tree(n, s, select, extract, policy.device), s=s,
                 cancelled=cancelled)


def serve_rebase(policy, verifier, prompts: list[str], seeds: list[int], *, n: int, select: str, tag,
                 settings: Settings, extract, join, deliver, started=None, capacity: int) -> None:
    """Continuous batching of REBASE, as :func:`~tts_kernels.search.step_search.serve_steps` for the step
    searches: requests join at step boundaries, each gets its tree alone (its own seeds), its compute its own."""
    prompts = _check(verifier, prompts, n, select)
    serve_groups(_Tree(n, settings, select, extract, policy.device), policy, verifier, prompts, seeds, s=settings,
                 tag=tag, join=join, deliver=deliver, started=started, capacity=capacity)


def _check(verifier, prompts, n: int, select: str) -> list[str]:
    if verifier is None:
        raise ValueError("rebase needs a verifier (it balances the expansion by the verifier's scores)")
    prompts = check_prompts(prompts)
    check_int("n", n, minimum=1)
    if select not in SELECT_RULES:
        raise ValueError(f"select must be one of {SELECT_RULES}, got {select!r}")
    return prompts


class _Tree:
    """The tree search as the step loop's search (:class:`~tts_kernels.search.step_loop.StepSearch`): per
    prompt its completed leaves and its ``info``; each step every live node of a prompt is a row."""

    reports = True

    def __init__(self, n: int, s: Settings, select: str, extract, device):
        self.width, self.n, self.s, self.select, self.extract, self.device = n, n, s, select, extract, device
        self.completed: dict[int, list[Candidate]] = {}
        self.info: dict[int, dict] = {}

    def start(self, prompts: range) -> None:
        for p in prompts:
            self.completed[p], self.info[p] = [], {"widths": []}

    def choose(self, rows, finish, its, gone):
        n, completed = self.n, self.completed
        agg = rows.prm.aggregate
        agg_h = agg.tolist()
        for r, f in enumerate(finish):
            if f is not None:
                completed[rows.owner[r]].append(rows.candidate(r, agg_h[r], f, self.extract))
        last = self.s.num_iterations - 1
        nodes = [r for r, f in enumerate(finish) if f is None and rows.owner[r] not in gone
                 and its[rows.owner[r]] < last]
        if not nodes:
            return []
        # [P, n] over the prompts with live nodes: prompt p's live nodes in row order (never more than its
        # remaining width <= n); a row of the allocation depends on its own prompt's only.
        ps = sorted({rows.owner[r] for r in nodes})
        at = {p: i for i, p in enumerate(ps)}
        P = len(ps)
        slot, per = [], [0] * P
        for r in nodes:
            i = at[rows.owner[r]]
            slot.append(i * n + per[i])
            per[i] += 1
        dev = agg.device
        where = torch.tensor(slot, dtype=torch.long, device=dev)
        scores = torch.full((P * n,), float("nan"), dtype=agg.dtype, device=dev).index_copy(
            0, where, agg.index_select(0, torch.tensor(nodes, dtype=torch.long, device=dev)))
        live = torch.zeros(P * n, dtype=torch.bool, device=dev).index_fill(0, where, True)
        width = torch.tensor([n - len(completed[p]) for p in ps], device=dev)
        w = expansion_widths(scores.view(P, n), live.view(P, n), width, self.s.rebase_temperature)
        w_h = w.view(-1).index_select(0, where).tolist()  # the one host look at the allocation
        children = []
        for r, k in zip(nodes, w_h):
            children += [r] * k
        for p in ps:
            self.info[p]["widths"].append([k for r, k in zip(nodes, w_h) if rows.owner[r] == p])
        return children

    def result(self, group, compute) -> SearchResult:
        ps = list(group.indices)
        completed = [self.completed.pop(p) for p in ps]
        info = [self.info.pop(p) for p in ps]
        chosen, answers = select_candidates(completed, self.select, self.device, self.s.vote_key)
        return SearchResult(strategy="rebase", budget=self.n, predictions=answers, chosen=chosen,
                            candidates=completed, compute=compute, samples=self.n * len(ps), prompt_info=info)
