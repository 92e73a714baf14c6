"""The step loop: groups of prompts searched step by step over :class:`~tts_kernels.search.rows.StepRows`, that
may join while it runs. ``prm_beam_search``, ``dvts``, the particle filters (particle Gibbs's sweeps too) and
``rebase`` are policies it runs (a :class:`StepSearch`); a search is one group run to its end, and the
server's continuous batching adds groups at step boundaries (not to particle Gibbs: its parked references
must stay the last rows).

Each iteration every row samples one step and the verifier scores it (:meth:`StepRows.step`); the search
records what finished and names the rows to continue (``choose``), which the loop forks. A group whose prompts
have no row left has ended: it is handed to ``done`` with its result, built by the search from its prompts'
state and its compute.

**Joining.** At every step boundary ``join(fits)`` may hand over groups. Their prompts are prefilled into the
running sessions, each group in a forward of its own as when it runs alone (a batch's padding is part of what
a row sees; :meth:`StepRows.admit`), and their rows start their first iteration with the others' next one.
Each prompt draws under its own seed at its own step offsets and steps to the end on its own last iteration,
so a group's result is what it gets alone; its compute is its own (:meth:`StepRows.compute` over its prompts,
counted per prompt: ``StepRows(tally=True)``). A group joins only when it fits: its rows within ``capacity``,
its worst-case KV blocks beside the running groups' within both sessions' pools, and the sequence slots its
prefill and the next fork need. The groups that end the loop are handed over once its sessions are freed, so
whoever hears of the last request's end finds no KV block held for it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .._threads import PoolTuner, in_search_pool
from .cancel import cancelled, listening, report
from .rows import StepRows
from .seeds import Seeds
from .settings import Settings
from .validate import check_pools


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


class StepSearch(Protocol):
    """A search the loop runs. ``width``: rows per prompt at its start (forked from the prompt's row);
    ``reports``: whether the loop reports each prompt's best newest step (progress events)."""

    width: int
    reports: bool

    def start(self, prompts: range) -> None:
        """Prompts ``prompts`` join (their rows will be the next ``width`` each, after those ``choose`` kept)."""

    def choose(self, rows: StepRows, finish: list[str | None], its: dict[int, int],
               gone: frozenset[int]) -> list[int]:
        """After a step (``its[p]``: the iteration each prompt with rows just ran; ``gone``: prompts nobody waits
        for, whose rows must not continue): the rows to continue with (repeats allowed), a prompt's rows
        together."""

    def result(self, group: StepGroup, compute):
        """What ``done`` gets for an ended group."""

    # Optional: ``forked(rows)``, called after each fork of the rows ``choose`` kept (particle Gibbs rolls the
    # copies of its reference particles back there).


@in_search_pool
def run_groups(policy, verifier, first: StepGroup, search: StepSearch, *, s: Settings, cancelled,
               done: Callable[[list[tuple[StepGroup, object]]], None], rows_kw: dict | None = None,
               join=None, started: Callable[[StepGroup], None] | None = None, capacity: int = 0) -> None:
    """Run ``first`` (and every group ``join`` hands over) under ``search`` (see the module docstring).
    ``done([(group, search.result(group, compute)), ...])`` is called with the groups that ended at each step
    boundary. ``join(fits)`` returns the groups to add, in order, each accepted by ``fits(group)``;
    ``started(group)`` is called as each group's rows start. ``rows_kw``: more :class:`StepRows` arguments
    (``capacity`` counts rows at once, at least the first group's)."""
    n = search.width
    rows = StepRows(policy, verifier, first.prompts, s, seeds=first.seeds, cancelled=cancelled,
                    capacity=max(capacity, len(first.prompts) * n), tally=join is not None, **(rows_kw or {}))
    groups = [first]
    of: dict[int, StepGroup] = dict.fromkeys(first.indices, first)  # the group of each running prompt
    held = {"blocks": (0, 0)}
    admits = join is not None and rows.admits
    # A loop that takes new groups may run for as long as they come: its thread count follows the load.
    tuner = PoolTuner() if admits else None
    forked = getattr(search, "forked", None)

    def blocks(g: StepGroup) -> tuple[tuple[int, int], tuple[int, int]]:
        """``g``'s KV blocks, each (the policy's, the verifier's): its prompts' prefill, and its worst case (the
        prefill and ``n`` rows a prompt, each its tokens' blocks, a partial block copied on write and one of
        rounding)."""
        B, k = rows.pol.pool[1], len(g.prompts) * n
        prompts = (sum(-(-len(policy.encode(p)) // B) for p in g.prompts),
                   0 if rows.prm is None else rows.prm.blocks_for(g.prompts, 0))
        grown = (k * (rows.budget // B + 2), 0 if rows.prm is None else rows.prm.blocks_for([], k))
        return prompts, (prompts[0] + grown[0], prompts[1] + grown[1])

    def take(g: StepGroup) -> None:
        g.commit = blocks(g)[1] if admits else (0, 0)
        if g is first and admits:  # (the joiners were checked by the room check)
            check_pools(g.commit, policy, verifier)
        held["blocks"] = tuple(a + b for a, b in zip(held["blocks"], g.commit))
        search.start(g.indices)
        if started is not None:
            started(g)

    def result(g: StepGroup):
        compute = rows.compute(g.indices) if admits else rows.compute()
        if join is None:
            return g, search.result(g, compute)
        try:
            return g, search.result(g, compute)
        except Exception as exc:  # noqa: BLE001 - that group's failure, handed to its owner; the others go on
            return g, exc

    ended: list[StepGroup] = []
    try:
        take(first)
        rows.fork([p for p in range(rows.P) for _ in range(n)])  # (parked rows follow)
        while True:
            its = {p: of[p].iteration for p in set(rows.owner)}  # the prompts with rows (not every one seen)
            _, finish = rows.step({p: it == s.num_iterations - 1 for p, it in its.items()})
            if search.reports and listening():  # progress: each prompt's best newest step (this look's host data)
                report_steps(rows)
            gone = rows.cancelled_prompts()
            keep = search.choose(rows, finish, its, gone)
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
                for p in g.indices:
                    del of[p]
                held["blocks"] = tuple(a - b for a, b in zip(held["blocks"], g.commit))
            if tuner is not None:
                tuner.tick()
            new = _join(join, rows, len(keep), n, held, blocks, ended) if admits else []
            if ended and (groups or new):  # others go on: these are done now
                done([result(g) for g in ended])
                ended = []
            if not groups and not new:
                break
            for g in new:
                at = len(rows)  # its prompts' rows come after the rows now
                rows.admit(g.prompts, g.seeds.per_prompt)
                g.first = rows.P - len(g.prompts)  # (the loop's prompt numbering: StepRows')
                of.update(dict.fromkeys(g.indices, g))
                groups.append(g)
                take(g)
                keep = keep + [at + j for j in range(len(g.prompts)) for _ in range(n)]
            rows.fork(keep)
            if forked is not None:
                forked(rows)
        final = [result(g) for g in ended]  # read before the sessions go
    finally:
        rows.free()
    if final:
        done(final)


def _join(join, rows: StepRows, running: int, n: int, held: dict, blocks_of, ended=()) -> list[StepGroup]:
    """The groups ``join`` hands over at this step boundary, each accepted by the room check: rows within the
    loop's capacity, worst-case KV blocks within both pools beside the running groups' (and their prefill beside
    what the groups that ended here may still hold: their rows leave in this boundary's fork, after the
    admissions), and the sequence slots their prefill and the next fork need. ``blocks_of(group)``: its KV
    blocks, ``(prefill, worst case)``, each ``(policy's, verifier's)``."""
    blocks, _, slots = rows.pol.pool
    prm_blocks, _, prm_slots = rows.prm.pool if rows.prm is not None else (0, 0, 0)
    room = {"rows": running, "prompts": 0, "blocks": held["blocks"]}
    # what the ended groups may still hold, plus the prefill of the groups accepted so far (until the fork)
    now = [sum(g.commit[0] for g in ended), sum(g.commit[1] for g in ended)]

    def fits(g: StepGroup) -> bool:
        if not g.seeds.keyed:
            return False
        prefill, want = blocks_of(g)
        check_pools(want, rows.policy, rows.prm_model)  # (a group that could never fit is refused, not kept waiting)
        k = len(g.prompts)
        r = room["rows"] + k * n
        b = (room["blocks"][0] + want[0], room["blocks"][1] + want[1])
        seqs = room["prompts"] + k + r  # admitted prompt rows, and the fork's new rows beside the old
        ok = (r <= rows.capacity and b[0] <= blocks and (rows.prm is None or b[1] <= prm_blocks)
              and room["blocks"][0] + now[0] + prefill[0] <= blocks
              and (rows.prm is None or room["blocks"][1] + now[1] + prefill[1] <= prm_blocks)
              and seqs <= slots and (rows.prm is None or seqs <= prm_slots))
        if ok:
            room.update(rows=r, prompts=room["prompts"] + k, blocks=b)
            now[0] -= want[0] - prefill[0]  # (its rows grow only after the fork)
            now[1] -= want[1] - prefill[1]
        return ok

    return join(fits)


def report_steps(rows: StepRows) -> None:
    """``report("step", ...)`` per prompt: the newest step of its row whose newest step scored highest
    (NaN lowest; without a verifier, its first row)."""
    d = rows.data
    best: dict[int, tuple] = {}
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


def serve_groups(search: StepSearch, policy, verifier, prompts: list[str], seeds: list[int], *, s: Settings, tag,
                 join, deliver, started=None, capacity: int, rows_kw: dict | None = None) -> None:
    """Continuous batching of ``search``: ``prompts`` (one seed each; the caller's ``tag``) start the loop, of at
    most ``capacity`` prompts' rows; at every step boundary ``join(fits)`` may hand over more requests: it calls
    ``fits(prompts, seeds, tag)`` for each in turn, which returns the group they become when they fit now (else
    ``None``: stop there), and returns those groups. ``deliver(group, result)`` gets each group's result (or the
    exception building it raised) as its rows end; ``started(group)`` as its rows start. All on this thread."""
    def groups(fits):
        def fit(p, sd, t):
            g = StepGroup(list(p), Seeds(list(sd), len(p)), t)
            return g if fits(g) else None
        return join(fit)

    run_groups(policy, verifier, StepGroup(list(prompts), Seeds(list(seeds), len(prompts)), tag), search, s=s,
               cancelled=cancelled, done=lambda pairs: [deliver(g, res) for g, res in pairs], rows_kw=rows_kw,
               join=groups, started=started, capacity=capacity * search.width)


def alone(policy, verifier, prompts: Sequence[str], seed, search: StepSearch, *, s: Settings, cancelled,
          rows_kw: dict | None = None, capacity: int = 0):
    """``search`` over ``prompts`` on its own: its result. ``capacity``: rows at once, when more than
    ``search.width`` per prompt (parked rows)."""
    out = []
    run_groups(policy, verifier, StepGroup(list(prompts), Seeds.of(seed, len(prompts))), search, s=s,
               cancelled=cancelled, done=out.extend, rows_kw=rows_kw, capacity=capacity)
    (_, res), = out
    return res
