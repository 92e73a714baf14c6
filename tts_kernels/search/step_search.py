"""Step-level searches guided by a PRM: ``prm_beam_search`` and ``dvts``.

Semantics follow huggingface/search-and-learn (Snell et al., arXiv 2408.03314), read
for their meaning only; the waste is removed:

* all prompts run together in one batch (there: one prompt at a time);
* a beam's history stays in the paged KV cache and is forked, never re-prefilled
  (there: every beam's full text is resubmitted to the engine each step);
* the PRM keeps its own forked cache and scores only each new step (there: every
  full prefix is re-scored each step);
* a step ends on the device (``steps.DelimiterMatcher``), and selection runs on the
  device (``topk_per_group`` / ``select_best``); the host looks once per step to
  detokenize the new steps (the PRM needs their text) and rebuild the batch.

Differences, on purpose: a step ends at the end of the token that completes the
delimiter (never inside a token); and with ``lookahead`` the rolled-out steps are
greedy, as there. A step's text is what it adds to the decoded completion
(``decode(completion + step)`` minus ``decode(completion)``), so tokenizers whose
decode depends on context (SentencePiece's leading spaces) give the same text as
decoding the whole completion.

Both searches are policies over :class:`~tts_kernels.search.rows.StepRows` (the rows, their sessions
and every per-row field), run by the step loop (:mod:`~tts_kernels.search.step_loop`: it steps every row and
forks the rows ``choose`` keeps). A search is one group of prompts; the server's continuous batching
(:func:`serve_steps`) adds groups at step boundaries, each getting what it gets alone.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..ops._validate import check_int
from ..ops.select import select_best, topk_per_group
from .accounting import Compute
from .answers import extract_answer
from .cancel import cancelled
from .dedupe import RowHashes  # noqa: F401 (tests patch step_search.RowHashes)
from .result import SELECT_RULES, Candidate, SearchResult, select_candidates
from .rows import StepRows
from .step_loop import alone, serve_groups
from .settings import Settings, resolve
from .validate import check_prompts


# The rows' engine under its earlier name (tests patch it here, e.g. ``step_search._Search.lookahead_scores``).
_Search = StepRows


def _check(name: str, verifier, prompts, n: int, select: str, s: Settings) -> list[str]:
    if verifier is None:
        raise ValueError(f"{name} needs a verifier (it scores every step)")
    prompts = check_prompts(prompts)
    check_int("n", n, minimum=1)
    if n % s.beam_width:
        raise ValueError(f"n ({n}) must be a multiple of beam_width ({s.beam_width})")
    if select not in SELECT_RULES:
        raise ValueError(f"select must be one of {SELECT_RULES}, got {select!r}")
    return prompts


def _result(name: str, n: int, completed, compute: Compute, select: str, device, vote_key: str) -> SearchResult:
    chosen, answers = select_candidates(completed, select, device, vote_key)
    return SearchResult(strategy=name, budget=n, predictions=answers, chosen=chosen, candidates=completed,
                        compute=compute, samples=n * len(completed))


class _Completions:
    """What a step search keeps per prompt: its completed rows (``completed[p]``), as the loop's
    :class:`~tts_kernels.search.step_loop.StepSearch`; the result is ``name``'s :class:`SearchResult`."""

    reports = True

    def __init__(self, name: str, n: int, width: int, s: Settings, select: str, extract, device):
        self.name, self.n, self.width, self.s, self.select, self.extract = name, n, width, s, select, extract
        self.device = device
        self.completed: dict[int, list[Candidate]] = {}  # the running prompts' (dropped with their result)

    def start(self, prompts: range) -> None:
        self.completed.update((p, []) for p in prompts)

    def result(self, group, compute) -> SearchResult:
        return _result(self.name, self.n, [self.completed.pop(p) for p in group.indices], compute, self.select,
                       self.device, self.s.vote_key)


class _Beams(_Completions):
    """PRM beam search (see :func:`prm_beam_search`): rows come in blocks of ``n`` per live prompt."""

    def choose(self, rows, finish, its, gone):
        s, n, completed = self.s, self.n, self.completed
        agg_scores = rows.prm.aggregate
        agg_h = agg_scores.tolist()
        for r, f in enumerate(finish):
            if f is not None:
                completed[rows.owner[r]].append(rows.candidate(r, agg_h[r], f, self.extract))
        if all(f is not None for f in finish):  # (the last iteration of every prompt: all finished)
            return []
        # The best n // beam_width unfinished rows of each prompt, ranked by their aggregate, or by that of
        # their greedy rollout with lookahead.
        rank = rows.lookahead_scores(finish, s.lookahead) if s.lookahead else agg_scores
        live = torch.tensor([f is None for f in finish], device=agg_scores.device)
        if s.filter_duplicates:  # a beam whose text repeats another's is not a second survivor
            repeats = rows.duplicates(n, live)
            if repeats:
                live[torch.tensor(repeats, device=live.device)] = False
        values, idx = topk_per_group(torch.where(live, rank, float("-inf")).view(-1, n), n // s.beam_width)
        values, idx = values.tolist(), idx.tolist()
        nxt = []
        for g in range(len(idx)):
            survivors = [g * n + j for v, j in zip(values[g], idx[g]) if v > float("-inf")]
            if survivors:  # duplicated in turn back to n beams
                nxt += [survivors[i % len(survivors)] for i in range(n)]
        return nxt


class _Subtrees(_Completions):
    """DVTS (see :func:`dvts`): rows come in blocks of ``beam_width`` per live subtree."""

    def choose(self, rows, finish, its, gone):
        s, completed, bw = self.s, self.completed, self.s.beam_width
        agg_scores = rows.prm.aggregate
        # Each subtree keeps its best expansion by aggregate, or by its greedy rollout's with lookahead.
        rollout = s.lookahead and any(f is None for f in finish)
        rank = rows.lookahead_scores(finish, s.lookahead) if rollout else agg_scores
        best = select_best(rank.view(-1, bw)).tolist()  # per subtree, on the device
        agg_h = agg_scores.tolist()
        nxt = []
        for g, b in enumerate(best):
            r = g * bw + b
            if finish[r] is not None:
                # The subtree ends: its pick, or with return_siblings every expansion of this last step.
                for q in range(g * bw, (g + 1) * bw) if s.return_siblings else (r,):
                    completed[rows.owner[q]].append(rows.candidate(q, agg_h[q], finish[q] or "sibling",
                                                                   self.extract))
            else:
                nxt += [r] * bw
        return nxt


def _search(name: str, n: int, s: Settings, select: str, extract, device) -> _Completions:
    return (_Beams if name == "prm_beam_search" else _Subtrees)(name, n, n, s, select, extract, device)


@torch.no_grad()
def prm_beam_search(policy, verifier, prompts: Sequence[str], *, n: int, select: str = "best",
                    settings: Settings | None = None, seed: int | Sequence[int] = 0,
                    extract: Callable[[str], str | None] = extract_answer, **overrides) -> SearchResult:
    """Step-level beam search with a verifier (search-and-learn semantics; see the module docstring).

    ``n`` beams per prompt; each iteration every beam samples one step (up to and including
    ``step_delimiter``); beams that end (EOS, no delimiter within ``max_step_tokens`` unless
    ``step_cap="continue"``, an empty step, a step holding a ``stop`` string, or with
    ``stop_at_answer`` a closed ``\\boxed{}``) are completed; the others are scored by the verifier
    on their new step and the best ``n // beam_width`` per prompt by aggregate score survive and are
    duplicated (in turn) back to ``n`` beams; on the last of ``num_iterations`` iterations beams generate to
    the end (up to ``max_new_tokens``). With ``lookahead > 0`` the ranking score is that of each
    beam rolled out ``lookahead`` more greedy steps (not kept). With ``filter_duplicates`` a beam whose
    token ids repeat another live beam's of its prompt is not ranked (:mod:`~tts_kernels.search.dedupe`:
    hashed on the device, confirmed exactly). The prediction is picked from
    the completed beams by ``select`` (default ``"best"``: the best aggregate score).
    Settings read: ``beam_width``, ``num_iterations``, ``step_delimiter``, ``max_step_tokens``,
    ``max_new_tokens``, ``lookahead``, ``agg``, ``temperature``, ``top_p``, ``top_k``, ``min_p``,
    ``sync_every`` (``settings`` and keyword ``overrides``, as :func:`~tts_kernels.search.best_of_n`).
    """
    s = resolve(settings, overrides)
    prompts = _check("prm_beam_search", verifier, prompts, n, select, s)
    return alone(policy, verifier, prompts, seed, _search("prm_beam_search", n, s, select, extract, policy.device),
                 s=s, cancelled=cancelled, rows_kw={"hash_rows": s.filter_duplicates})


@torch.no_grad()
def dvts(policy, verifier, prompts: Sequence[str], *, n: int, select: str = "weighted",
         settings: Settings | None = None, seed: int | Sequence[int] = 0,
         extract: Callable[[str], str | None] = extract_answer,
         **overrides) -> SearchResult:
    """Diverse verifier tree search: ``n // beam_width`` independent subtrees per prompt.

    Each iteration every live subtree samples ``beam_width`` candidate next steps, the verifier
    scores them, and the subtree continues with the best one (by aggregate score, ties to
    the first); a subtree ends when its chosen step ends with EOS, is empty, has no
    delimiter within ``max_step_tokens``, completes the answer (``stop``, ``stop_at_answer``, as
    :func:`prm_beam_search`), or on the last iteration (which generates to the end). Every
    subtree's final candidate is returned; the prediction is picked by ``select``
    (default ``"weighted"``: the answer with the largest summed score). Settings as
    :func:`prm_beam_search`; with ``lookahead > 0`` a subtree picks the expansion whose greedy rollout of
    ``lookahead`` more steps scores best (the rollouts are thrown away; a candidate keeps its own score).
    With ``return_siblings`` a subtree also returns the expansions it did not pick at its last step
    (search-and-learn's output pool: ``n`` candidates per prompt), and ``select`` picks among all of them.
    """
    s = resolve(settings, overrides)
    prompts = _check("dvts", verifier, prompts, n, select, s)
    return alone(policy, verifier, prompts, seed, _search("dvts", n, s, select, extract, policy.device), s=s,
                 cancelled=cancelled)


@torch.no_grad()
def serve_steps(name: str, policy, verifier, prompts: list[str], seeds: list[int], *, n: int, select: str, tag,
                settings: Settings, extract, join, deliver, started=None, capacity: int) -> None:
    """Continuous batching of a step search (``name``: ``"prm_beam_search"`` or ``"dvts"``), as
    :func:`~tts_kernels.search.best_of_n.serve_sampling` for the sampling strategies: ``prompts`` (one seed
    each) start the search of at most ``capacity`` prompts' rows; at every step boundary ``join(fits)`` may
    hand over more requests (``fits(prompts, seeds, tag)``: their group, or ``None`` when they do not fit now);
    ``deliver(group, result)`` gets each group's :class:`SearchResult` (or the exception building it raised)
    as its rows end. A group's result equals the search run alone over its prompts with its seeds; its
    compute is its own (:mod:`~tts_kernels.search.step_loop`)."""
    s = settings
    prompts = _check(name, verifier, prompts, n, select, s)
    serve_groups(_search(name, n, s, select, extract, policy.device), policy, verifier, prompts, seeds, s=s,
                 tag=tag, join=join, deliver=deliver, started=started, capacity=capacity,
                 rows_kw={"hash_rows": s.filter_duplicates and name == "prm_beam_search"})
