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
and every per-row field): a loop that steps every row and forks the rows ``choose`` keeps. The loop runs
groups of prompts (:class:`StepGroup`); a search is one group, and the server's continuous batching
(:func:`serve_steps`) adds groups at step boundaries, each getting what it gets alone.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .._threads import in_search_pool
from ..ops._validate import check_int
from ..ops.select import select_best, topk_per_group
from .accounting import Compute
from .answers import extract_answer
from .cancel import cancelled, listening, report
from .dedupe import RowHashes  # noqa: F401 (tests patch step_search.RowHashes)
from .result import SELECT_RULES, Candidate, SearchResult, select_candidates
from .rows import StepRows
from .seeds import Seeds
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


@dataclass(eq=False)
class StepGroup:
    """``prompts`` searched together under ``seeds`` (one per prompt when it joins a running loop); ``tag``: the
    caller's (the server's job). The loop sets ``first`` (its first prompt's index among the loop's prompts:
    what :func:`~tts_kernels.search.cancel.cancelled` and the progress events use), ``iteration`` (its next
    one) and ``forward`` (policy token positions run for it so far: a server's per-request cap)."""

    prompts: list[str]
    seeds: Seeds
    tag: object = None
    first: int = 0
    iteration: int = 0
    forward: int = 0
    commit: tuple[int, int] = (0, 0)  # KV blocks held for it: the policy's, the verifier's

    @property
    def indices(self) -> range:
        return range(self.first, self.first + len(self.prompts))


@in_search_pool
def _run(policy, prm, first: StepGroup, *, n: int, s: Settings, cancelled, choose, done,
         hash_rows: bool = False, join=None, started=None, capacity: int = 0) -> None:
    """The loop both searches share, a policy over :class:`~tts_kernels.search.rows.StepRows`: ``n`` rows per
    prompt; each iteration every row samples one step and the verifier scores it; ``choose(rows, finish, last,
    completed)`` records finished rows in ``completed[prompt]`` and returns the rows to continue with (host list
    of row indices, a prompt's rows together, forked for the next iteration). The rows of prompts
    ``cancelled()`` names are not continued. A group whose rows have all ended is handed to
    ``done([(group, its completed lists, its compute), ...])``; those that end the loop once its sessions are
    freed.

    Continuous batching: ``join(fits)`` is asked at every step boundary for groups to add (``fits(group)``:
    whether it fits now beside the rows running, within ``capacity`` rows and the sessions' KV pools; the
    groups returned were accepted by it, in order); their prompts are prefilled into the running sessions
    (:meth:`~tts_kernels.search.rows.StepRows.admit`) and their rows start their first iteration with the
    others' next one. Each prompt draws under its own seed at its own step offsets and steps to the end on
    its own last iteration, so a group's result is what it gets alone; its compute is its own
    (:meth:`~tts_kernels.search.rows.StepRows.compute` over its prompts). ``started(group)`` is called as
    each group's rows start."""
    rows = StepRows(policy, prm, first.prompts, s, seeds=first.seeds, cancelled=cancelled,
                    capacity=max(capacity, len(first.prompts) * n), hash_rows=hash_rows, tally=join is not None)
    completed: list[list[Candidate]] = [[] for _ in first.prompts]
    groups = [first]
    of: list[StepGroup] = [first] * len(first.prompts)  # the group of each prompt
    held = {"blocks": (0, 0)}
    admits = join is not None and rows.admits

    def commit(g: StepGroup) -> tuple[int, int]:
        B = rows.pol.pool[1]
        policy_blocks = (sum(-(-len(policy.encode(p)) // B) for p in g.prompts)
                         + len(g.prompts) * n * (rows.budget // B + 2))
        return policy_blocks, 0 if rows.prm is None else rows.prm.blocks_for(g.prompts, len(g.prompts) * n)

    def take(g: StepGroup) -> None:
        g.commit = commit(g) if admits else (0, 0)
        held["blocks"] = tuple(a + b for a, b in zip(held["blocks"], g.commit))
        if started is not None:
            started(g)

    def result(g: StepGroup):
        return g, [completed[p] for p in g.indices], rows.compute(g.indices) if admits else rows.compute()

    ended: list[StepGroup] = []
    try:
        take(first)
        rows.fork([p for p in range(rows.P) for _ in range(n)])
        while True:
            last = [of[p].iteration == s.num_iterations - 1 for p in range(rows.P)]
            _, finish = rows.step(last)
            if listening():  # progress: each prompt's best newest step (host data of this look only)
                _report_steps(rows)
            keep = choose(rows, finish, all(last[p] for p in set(rows.owner)), completed)
            gone = rows.cancelled_prompts()
            if gone:  # prompts nobody waits for any more: their rows are not continued
                keep = [r for r in keep if rows.owner[r] not in gone]
            live = {rows.owner[r] for r in keep}
            for g in groups:
                g.iteration += 1
                if admits:
                    g.forward = sum(rows.tally.forward[p] for p in g.indices)
            ended = [g for g in groups if not any(p in live for p in g.indices)]
            for g in ended:
                groups.remove(g)
                held["blocks"] = tuple(a - b for a, b in zip(held["blocks"], g.commit))
            new = _join(join, rows, len(keep), n, held, commit) if admits else []
            if ended and (groups or new):  # others go on: these are done now
                done([result(g) for g in ended])
                ended = []
            if not groups and not new:
                break
            for g in new:  # each group prefilled on its own, as alone (a batch's padding is part of what a row sees)
                at = len(rows)  # its prompts' rows come after the rows now
                rows.admit(g.prompts, g.seeds.per_prompt)
                g.first = len(completed)
                completed.extend([] for _ in g.prompts)
                of.extend([g] * len(g.prompts))
                groups.append(g)
                take(g)
                keep = keep + [at + j for j in range(len(g.prompts)) for _ in range(n)]
            rows.fork(keep)
        final = [result(g) for g in ended]  # read before the sessions go
    finally:
        rows.free()
    # The groups that ended the loop are handed over once its pools are free: whoever hears of the last
    # request's end finds no KV block held for it.
    if final:
        done(final)


def _join(join, rows: StepRows, running: int, n: int, held: dict, commit) -> list[StepGroup]:
    """The groups ``join`` hands over at this step boundary, each accepted by the room check: rows within the
    loop's capacity, worst-case KV blocks within both pools beside the running groups', and the sequence slots
    their prefill and the next fork need."""
    blocks, _, slots = rows.pol.pool
    prm_blocks, _, prm_slots = rows.prm.pool if rows.prm is not None else (0, 0, 0)
    room = {"rows": running, "prompts": 0, "blocks": held["blocks"]}
    cap = rows.capacity

    def fits(g: StepGroup) -> bool:
        if not g.seeds.keyed:
            return False
        want = commit(g)
        k = len(g.prompts)
        r = room["rows"] + k * n
        b = (room["blocks"][0] + want[0], room["blocks"][1] + want[1])
        seqs = room["prompts"] + k + r  # admitted prompt rows, and the fork's new rows beside the old
        ok = (r <= cap and b[0] <= blocks and (rows.prm is None or b[1] <= prm_blocks)
              and seqs <= slots and (rows.prm is None or seqs <= prm_slots))
        if ok:
            room.update(rows=r, prompts=room["prompts"] + k, blocks=b)
        return ok

    return join(fits)


def _report_steps(rows: StepRows) -> None:
    """``report("step", ...)`` per prompt: the newest step of its row whose newest step scored highest
    (NaN lowest; without a verifier, its first row)."""
    d = rows.data
    best: dict[int, int] = {}
    for r, steps in enumerate(d.steps):
        if not steps or d.parked[r]:
            continue
        score = d.step_scores[r][-1] if len(d.step_scores[r]) == len(steps) else float("nan")
        key = (len(steps), score if score == score else float("-inf"))
        p = d.owner[r]
        if p not in best or key > best[p][0]:
            best[p] = (key, r)
    for p in sorted(best):
        r = best[p][1]
        score = d.step_scores[r][-1] if len(d.step_scores[r]) == len(d.steps[r]) else None
        report("step", {"prompt": p, "index": len(d.steps[r]) - 1, "text": d.steps[r][-1],
                        "score": None if score is None or score != score else float(score)})


def _result(name: str, n: int, completed, compute: Compute, select: str, device, vote_key: str) -> SearchResult:
    chosen, answers = select_candidates(completed, select, device, vote_key)
    return SearchResult(strategy=name, budget=n, predictions=answers, chosen=chosen, candidates=completed,
                        compute=compute, samples=n * len(completed))


def _alone(policy, verifier, prompts, *, n: int, s: Settings, seed, choose, hash_rows: bool = False):
    """One search of ``prompts`` on its own: ``(completed, compute)``."""
    out = []
    _run(policy, verifier, StepGroup(list(prompts), Seeds.of(seed, len(prompts))), n=n, s=s, cancelled=cancelled,
         choose=choose, done=lambda groups: out.extend(groups), hash_rows=hash_rows)
    (_, completed, compute), = out
    return completed, compute


def _beam_choose(s: Settings, n: int, extract):
    """PRM beam search's ``choose`` (see :func:`prm_beam_search`)."""
    lookahead = s.lookahead
    keep = n // s.beam_width

    def choose(rows, finish, last, completed):
        agg_scores = rows.prm.aggregate
        agg_h = agg_scores.tolist()
        for r, f in enumerate(finish):
            if f is not None:
                completed[rows.owner[r]].append(rows.candidate(r, agg_h[r], f, extract))
        if last:
            return []
        # Rows come in blocks of n per live prompt: the best `keep` unfinished rows of each,
        # ranked by their aggregate, or by that of their greedy rollout with lookahead.
        rank = rows.lookahead_scores(finish, lookahead) if lookahead else agg_scores
        live = torch.tensor([f is None for f in finish], device=agg_scores.device)
        if s.filter_duplicates:  # a beam whose text repeats another's is not a second survivor
            repeats = rows.duplicates(n, live)
            if repeats:
                live[torch.tensor(repeats, device=live.device)] = False
        values, idx = topk_per_group(torch.where(live, rank, float("-inf")).view(-1, n), keep)
        values, idx = values.tolist(), idx.tolist()
        nxt = []
        for g in range(len(idx)):
            survivors = [g * n + j for v, j in zip(values[g], idx[g]) if v > float("-inf")]
            if survivors:  # duplicated in turn back to n beams
                nxt += [survivors[i % len(survivors)] for i in range(n)]
        return nxt

    return choose


def _dvts_choose(s: Settings, extract):
    """DVTS's ``choose`` (see :func:`dvts`)."""
    beam_width, lookahead, siblings = s.beam_width, s.lookahead, s.return_siblings

    def choose(rows, finish, last, completed):
        agg_scores = rows.prm.aggregate
        # Each subtree keeps its best expansion by aggregate, or by its greedy rollout's with lookahead.
        rank = rows.lookahead_scores(finish, lookahead) if lookahead and not last else agg_scores
        best = select_best(rank.view(-1, beam_width)).tolist()  # per subtree, on the device
        agg_h = agg_scores.tolist()
        nxt = []
        for g, b in enumerate(best):
            r = g * beam_width + b
            if finish[r] is not None:
                # The subtree ends: its pick, or with return_siblings every expansion of this last step.
                for q in range(g * beam_width, (g + 1) * beam_width) if siblings else (r,):
                    completed[rows.owner[q]].append(rows.candidate(q, agg_h[q], finish[q] or "sibling", extract))
            else:
                nxt += [r] * beam_width
        return nxt

    return choose


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
    completed, compute = _alone(policy, verifier, prompts, n=n, s=s, seed=seed, choose=_beam_choose(s, n, extract),
                                hash_rows=s.filter_duplicates)
    return _result("prm_beam_search", n, completed, compute, select, policy.device, s.vote_key)


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
    completed, compute = _alone(policy, verifier, prompts, n=n, s=s, seed=seed, choose=_dvts_choose(s, extract))
    return _result("dvts", n, completed, compute, select, policy.device, s.vote_key)


_CHOOSE = {"prm_beam_search": lambda s, n, extract: _beam_choose(s, n, extract),
           "dvts": lambda s, n, extract: _dvts_choose(s, extract)}


@torch.no_grad()
def serve_steps(name: str, policy, verifier, prompts: list[str], seeds: list[int], *, n: int, select: str, tag,
                settings: Settings, extract, join, deliver, started=None, capacity: int) -> None:
    """Continuous batching of a step search (``name``: ``"prm_beam_search"`` or ``"dvts"``), as
    :func:`~tts_kernels.search.best_of_n.serve_sampling` for the sampling strategies: ``prompts`` (one seed
    each) start the search of at most ``capacity`` prompts' rows; at every step boundary ``join(fits)`` may
    hand over more requests (``fits(prompts, seeds, tag)``: their group, or ``None`` when they do not fit now);
    ``deliver(group, result)`` gets each group's :class:`SearchResult` (or the exception building it raised)
    as its rows end. A group's result equals the search run alone over its prompts with its seeds; its
    compute is its own."""
    s = settings
    prompts = _check(name, verifier, prompts, n, select, s)

    def done(groups):
        for g, completed, compute in groups:
            try:
                res = _result(name, n, completed, compute, select, policy.device, s.vote_key)
            except Exception as exc:  # noqa: BLE001 - that group's failure, handed to its owner
                res = exc
            deliver(g, res)

    def groups(fits):
        def fit(p, sd, t):
            g = StepGroup(list(p), Seeds(list(sd), len(p)), t)
            return g if fits(g) else None
        return join(fit)

    _run(policy, verifier, StepGroup(list(prompts), Seeds(list(seeds), len(prompts)), tag), n=n, s=s,
         cancelled=cancelled, choose=_CHOOSE[name](s, n, extract), done=done,
         hash_rows=s.filter_duplicates and name == "prm_beam_search",
         join=groups, started=started, capacity=capacity * n)
