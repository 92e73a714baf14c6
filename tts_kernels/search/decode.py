"""The sampling decode loop: groups of prompts, each prompt sampled ``n`` times, that may join while it runs.

:class:`SampleLoop` is the token loop under every sampling strategy (``sample_completions``: one group, run to
its end) and under the server's continuous batching (:func:`run` with ``join``: a new request's prompts
become a group at the loop's next host look and leave it when their rows end).

Each group's prompts are prefilled once, in a forward of their own as when the group runs alone (the first
group by ``policy.start``, later ones into the same paged pool by ``session.admit``) and forked ``n`` times. Every token, the fused
:func:`~tts_kernels.sample` draws one token per row under the row's key ``(seed, stream, offset)``: the
seed and stream are its prompt's seed and its candidate number (:mod:`~tts_kernels.search.seeds`), the
offset its own token count (a per-row device tensor), so a row draws the same tokens whatever else is in
the batch and whenever it joined.

**Looks.** The host looks every ``sync_every`` tokens, counted from the step the loop (re)started; groups
join only at those looks, so a group's looks fall at the same steps of its own as when it runs alone.
At a look: each row's tokens since the last look go to the progress listener; rows of cancelled prompts,
and rows that ended (EOS, a stop string) leave the batch; a group whose rows have all left is finished
(``done`` is called with the texts of those that ended there), and ``join`` is asked for new groups. A group that reaches
``max_new_tokens`` ends at that step (its rows are all done: they leave without a look at the others).
Rows that end between looks still run until the next one (no sync finds them); their tokens are not
recorded. So a group's tokens, texts and compute are what the loop gives it alone (up to the models'
floating-point batch invariance).

**Room.** ``capacity`` rows at most run at once; a group joins only when its rows fit beside those running,
its prompts' and rows' worst-case KV blocks (its prompts' blocks, ``max_new_tokens // block_size + 2`` per
row) fit in the pool beside every running group's, and the pool has the sequence slots its forks need. A
group that does not fit waits; when nothing runs, the loop ends and the caller runs what waits in a new one.

**Accounting, per group, exact.** ``prefill`` (its prompt tokens), ``forward`` (those plus one per row of
the group in every decode it rode in) and ``keys`` (keys attended over those tokens) are counted on the
host from the prompt lengths and the steps, as the session counts them for the whole batch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .._threads import PoolTuner
from ..models.text import cut_at_stop
from ..ops.sample import sample
from ..ops.thinking import ThinkingState, thinking_logits, thinking_update
from .cancel import cancelled, listening, report
from .seeds import Seeds, engine_seeds
from .thinking import ThinkingBudget
from .validate import check_pool, fixed_pool


@dataclass(eq=False)
class SampleGroup:
    """``prompts``, each sampled ``n`` times under ``seeds`` (:class:`~tts_kernels.search.seeds.Seeds`; a group
    that joins a running loop has one seed per prompt). ``tag``: the caller's (the server's job). The loop sets
    ``first`` (the index of its first prompt among every prompt the loop has run: the index
    :func:`~tts_kernels.search.cancel.cancelled` and the progress events use) and the rest."""

    prompts: list[str]
    n: int
    seeds: Seeds
    tag: object = None
    first: int = 0
    ids: list[list[int]] | None = None  # the prompts' token ids
    start: int = 0  # the loop step of its first token
    out: torch.Tensor | None = None  # [rows, T] its rows' tokens (-1: none), written as rows leave the batch
    thought: torch.Tensor | None = None  # [rows] thinking tokens, written as rows leave
    looked: int = 0  # tokens per row reported so far (progress)
    live: int = 0  # its rows in the batch now
    commit: int = 0  # KV blocks held for it
    prefill: int = 0
    forward: int = 0
    keys: int = 0
    length_sum: int = 0  # prompt tokens of its rows in the batch (for the keys count)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


@dataclass
class GroupSample:
    """A finished group: ``texts``, ``ids``, ``finish`` as ``[P][n]`` lists; ``prefill`` (prompt tokens),
    ``forward`` (token positions the policy ran for it), ``keys`` (keys attended over those) and, with a
    thinking budget, ``thinking`` (``[P][n]`` tokens written while thinking)."""

    texts: list[list[str]]
    ids: list[list[list[int]]]
    finish: list[list[str]]
    prefill: int
    forward: int
    keys: int
    thinking: list[list[int]] | None = None


class SampleLoop:
    """The loop (see the module docstring); the sampling parameters are the loop's, shared by every group.
    ``capacity``: rows that may run at once (groups wait beyond it; the first group runs whatever its size)."""

    def __init__(self, policy, *, max_new_tokens: int, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
                 stop: Sequence[str] | None = None, sync_every: int = 8, thinking: ThinkingBudget | None = None,
                 capacity: int = 0):
        self.policy = policy
        self.T, self.sync_every, self.stop = max_new_tokens, sync_every, list(stop or [])
        self.params = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        self.thinking, self.capacity = thinking, capacity
        self.prompts = 0  # prompts seen: the next group's first index
        self.committed = 0  # KV blocks held for the groups running

    def _encode(self, g: SampleGroup) -> None:
        if g.ids is None:
            g.ids = [self.policy.encode(p) for p in g.prompts]

    def _commit(self, g: SampleGroup, block_size: int) -> int:
        """The KV blocks ``g`` may need at most: its prompts', and per row its new tokens' plus a partial
        block copied on write and one of rounding."""
        return sum(-(-len(p) // block_size) for p in g.ids) + g.rows * (self.T // block_size + 2)

    @torch.no_grad()
    def run(self, first: SampleGroup, *, done: Callable[[list[tuple[SampleGroup, GroupSample]]], None],
            join: Callable[[Callable[[SampleGroup], bool]], list[SampleGroup]] | None = None,
            started: Callable[[SampleGroup], None] | None = None) -> None:
        """Sample ``first``, and every group ``join`` hands over, calling ``done([(group, sample), ...])`` with the
        groups that ended at each look (on this thread; those that end the loop once its session is freed).
        ``join(fits)`` is called at the looks where groups may join, with a predicate that says whether a group
        fits now (beside those running and those ``fits`` already accepted in this call); it returns the groups
        to add, in order, each accepted by ``fits``. ``started(group)`` is called as each group's rows start
        (``group.first`` set)."""
        self._encode(first)
        fixed = fixed_pool(self.policy)
        if join is not None and fixed is not None:  # (before its prefill: a revise round's history may not fit)
            check_pool(self._commit(first, fixed[1]), self.policy, "policy")
        session = self.policy.start(first.ids, rows_hint=max(first.rows, self.capacity), max_new_tokens=self.T)
        try:
            if hasattr(session, "generate"):  # a text-level engine (e.g. vLLM) samples whole completions itself
                first.first, self.prompts = self.prompts, self.prompts + len(first.prompts)
                if started is not None:
                    started(first)
                last = self._generate(session, first)
            else:
                last = self._decode(session, first, done, join, started)
        finally:
            session.free()
        # The groups that ended the loop are handed over once its pool is free: whoever hears of the last
        # request's end finds no KV block held for it.
        if last:
            done(last)

    def _generate(self, session, g: SampleGroup) -> list[tuple[SampleGroup, GroupSample]]:
        if self.thinking is not None:
            raise ValueError("Settings.thinking runs inside this package's decode loop; a text-level engine "
                             "(the vLLM backend) does not take it")
        dev = session.logits.device
        P, n, T, p = len(g.prompts), g.n, self.T, self.params
        session.fork(torch.arange(P, device=dev).repeat_interleave(n))
        live = torch.arange(P * n, device=dev)
        seed_t, stream = g.seeds.rows(live // n, live % n, dev)
        outs = session.generate(None, max_tokens=T, stop=self.stop, temperature=float(p["temperature"]),
                                top_p=float(p["top_p"]), top_k=int(p["top_k"]), min_p=float(p["min_p"]),
                                logprobs=False, seeds=engine_seeds(seed_t, stream, 0, P * n))
        g.out = torch.full((P * n, T), -1, dtype=torch.long, device=dev)
        for r, (row, _, _) in enumerate(outs):
            g.out[r, : len(row)] = torch.tensor(row[:T], dtype=torch.long, device=dev)
        g.prefill, g.forward, g.keys = session.prefill_tokens, int(session.tokens), int(session.keys)
        return [(g, self._finish(g))]

    def _decode(self, session, first: SampleGroup, done, join, started) -> list[tuple[SampleGroup, GroupSample]]:
        """The token loop; returns the groups that ended at its last look (the others went to ``done``)."""
        policy, T, s = self.policy, self.T, self.sync_every
        dev = session.logits.device
        eos = torch.tensor(policy.eos_token_ids or [-1], device=dev)
        eos_ids = set(policy.eos_token_ids)
        rule = None if self.thinking is None else self.thinking.rule(policy.tokenizer, policy.eos_token_ids, dev)
        admits = hasattr(session, "admit") and hasattr(session, "pool")
        # A loop that takes new groups may run for as long as they come: its thread count follows the load.
        tuner = PoolTuner() if join is not None else None
        B = session.pool[1] if admits else 1
        # Per batch row: (group, its row in the group) on the host (rows grouped by group, in the order the
        # groups joined); the row's tokens, token count and end flag on the device.
        owner: list[tuple[SampleGroup, int]] = []
        groups: list[SampleGroup] = []
        buf = torch.empty((0, T), dtype=torch.long, device=dev)
        age = torch.empty(0, dtype=torch.long, device=dev)
        ended = torch.empty(0, dtype=torch.bool, device=dev)
        think = ThinkingState.start(0, dev) if rule is not None else None

        def add(gs: list[SampleGroup], step: int, prefilled: bool) -> None:
            nonlocal buf, age, ended, think
            k = len(owner)  # rows running; the groups' prompt rows come after them
            if not prefilled:  # each group on its own, as alone (a batch's padding is part of what a row sees)
                for g in gs:
                    session.admit(g.ids)
            parents, at = [torch.arange(k, device=dev)], k
            for g in gs:
                g.first, self.prompts = self.prompts, self.prompts + len(g.prompts)
                g.start, g.live, g.looked = step, g.rows, 0
                g.out = torch.full((g.rows, T), -1, dtype=torch.long, device=dev)
                g.thought = torch.zeros(g.rows, dtype=torch.long, device=dev)
                g.commit = self._commit(g, B)
                self.committed += g.commit
                g.prefill = g.forward = sum(len(i) for i in g.ids)
                g.keys = sum(len(i) * (len(i) + 1) // 2 for i in g.ids)
                g.length_sum = sum(len(i) for i in g.ids) * g.n
                parents.append(at + torch.arange(len(g.prompts), device=dev).repeat_interleave(g.n))
                at += len(g.prompts)
                owner.extend((g, r) for r in range(g.rows))
                groups.append(g)
                if started is not None:
                    started(g)
            session.fork(torch.cat(parents))
            new = sum(g.rows for g in gs)
            buf = torch.cat([buf, torch.full((new, T), -1, dtype=torch.long, device=dev)])
            age = torch.cat([age, torch.zeros(new, dtype=torch.long, device=dev)])
            ended = torch.cat([ended, torch.zeros(new, dtype=torch.bool, device=dev)])
            if rule is not None:
                fresh = ThinkingState.start(new, dev)
                think = think.cat(fresh)

        def keys_of():
            if len(groups) == 1 and not groups[0].seeds.keyed:  # one run seed: the stream is the batch row
                return groups[0].seeds.rows(None, None, dev)
            local = torch.tensor([r for _, r in owner], dtype=torch.long, device=dev)
            seeds, streams, at = [], [], 0
            for g in groups:
                sl = local[at: at + g.live]
                sd, st = g.seeds.rows(sl // g.n, sl % g.n, dev)
                seeds.append(sd)
                streams.append(st)
                at += g.live
            return torch.cat(seeds), torch.cat(streams)

        def leave(keep: list[int]) -> list[SampleGroup]:
            """Rows not in ``keep`` leave the batch (their tokens go to their group); returns the emptied groups."""
            nonlocal buf, age, ended, think
            if len(keep) < len(owner):
                kept = set(keep)
                gone = [j for j in range(len(owner)) if j not in kept]
                for g in dict.fromkeys(owner[j][0] for j in gone):
                    js = [j for j in gone if owner[j][0] is g]
                    idx = torch.tensor(js, device=dev)
                    loc = torch.tensor([owner[j][1] for j in js], device=dev)
                    g.out.index_copy_(0, loc, buf.index_select(0, idx))
                    if rule is not None:
                        g.thought.index_copy_(0, loc, think.thought.index_select(0, idx))
                    g.live -= len(js)
                    g.length_sum -= sum(len(g.ids[owner[j][1] // g.n]) for j in js)
                idx = torch.tensor(keep, dtype=torch.long, device=dev)
                session.fork(idx)
                buf, age, ended = buf.index_select(0, idx), age.index_select(0, idx), ended.index_select(0, idx)
                if rule is not None:
                    think = think.select(idx)
                owner[:] = [owner[j] for j in keep]
            finished = [g for g in groups if g.live == 0]
            for g in finished:
                groups.remove(g)
                self.committed -= g.commit
            return finished

        add([first], 0, prefilled=True)
        seed_t, stream = keys_of()
        step = base = 0  # looks fall at steps base + k * sync_every - 1 (base: where the schedule started)
        while True:
            logits = session.logits if rule is None else thinking_logits(session.logits, think, rule)
            tokens, _ = sample(logits, **self.params, seed=seed_t, offset=age, stream=stream)
            buf.scatter_(1, age.clamp(max=T - 1)[:, None], torch.where(ended, -1, tokens)[:, None])
            if rule is not None:
                think = thinking_update(think, tokens, rule, active=~ended)
            ended = ended | torch.isin(tokens, eos)
            age = age + 1
            regular = (step - base + 1) % s == 0
            ending = [g for g in groups if step - g.start + 1 == T]
            relaid, ended_here = False, []
            if regular or ending:  # the host looks
                if listening():
                    self._report(owner, buf, groups if regular else ending, step)
                keep = self._survivors(owner, buf, ended, eos_ids) if regular else list(range(len(owner)))
                keep = [j for j in keep if step - owner[j][0].start + 1 < T]
                relaid = len(keep) < len(owner)
                if relaid:
                    tokens = tokens.index_select(0, torch.tensor(keep, dtype=torch.long, device=dev))
                ended_here = leave(keep)
                if ended_here and owner:  # others go on: these groups are done now
                    done([(g, self._finish(g)) for g in ended_here])
                    ended_here = []
            if owner:  # every row in the batch runs its token (rows that ended since the last look too)
                for g in groups:
                    t = step - g.start
                    g.forward += g.live
                    g.keys += g.length_sum + g.live * (t + 1)
                session.decode(tokens)
            step += 1
            if join is not None and admits and (regular or not owner):
                if tuner is not None:
                    tuner.tick()
                if not owner:
                    base = step  # nothing runs: the look schedule starts again here
                taken = self._join(join, session, len(owner))
                if taken:
                    add(taken, step, prefilled=False)
                    relaid = True
            if not owner:
                return [(g, self._finish(g)) for g in ended_here]
            if ended_here:  # the batch emptied and new groups joined: the loop goes on
                done([(g, self._finish(g)) for g in ended_here])
            if relaid:
                seed_t, stream = keys_of()

    def _join(self, join, session, running: int) -> list[SampleGroup]:
        blocks, B, slots = session.pool
        held = {"rows": running, "blocks": self.committed, "slots": running, "prompts": 0}

        def fits(g: SampleGroup) -> bool:
            self._encode(g)
            if not g.seeds.keyed:
                return False
            commit = self._commit(g, B)
            check_pool(commit, self.policy, "policy")  # (a group that could never fit is refused, not kept waiting)
            rows = held["rows"] + g.rows
            ok = (rows <= max(self.capacity, 1) and held["blocks"] + commit <= blocks
                  and held["slots"] + g.rows + held["prompts"] + len(g.prompts) <= slots)
            if ok:
                held["rows"], held["blocks"] = rows, held["blocks"] + commit
                held["slots"] += g.rows
                held["prompts"] += len(g.prompts)
            return ok

        return join(fits)

    def _survivors(self, owner, buf, ended, eos_ids) -> list[int]:
        """At a regular look: the rows that go on (not ended, not cancelled, no stop string yet)."""
        ended_h = ended.tolist()
        gone = cancelled()
        keep = [j for j, (g, r) in enumerate(owner) if not ended_h[j] and g.first + r // g.n not in gone]
        if self.stop and keep:
            rows = buf.index_select(0, torch.tensor(keep, device=buf.device)).tolist()
            texts = self.policy.tokenizer.batch_decode([[t for t in row if t >= 0 and t not in eos_ids]
                                                        for row in rows], skip_special_tokens=True)
            keep = [j for j, text in zip(keep, texts) if not any(x in text for x in self.stop)]
        return keep

    @staticmethod
    def _report(owner, buf, looked: list[SampleGroup], step: int) -> None:
        """Progress: each row of the ``looked`` groups, its tokens since the group's last look (-1: after its end)."""
        rows = [j for j, (g, _) in enumerate(owner) if g in looked]
        if not rows:
            return
        ids = buf.index_select(0, torch.tensor(rows, device=buf.device)).tolist()
        event = {"rows": [], "ids": []}
        for j, row in zip(rows, ids):
            g, r = owner[j]
            event["rows"].append((g.first + r // g.n, r % g.n))
            event["ids"].append(row[g.looked: step - g.start + 1])
        for g in looked:
            g.looked = step - g.start + 1
        report("tokens", event)

    def _finish(self, g: SampleGroup) -> GroupSample:
        """The group's rows as texts, token ids (to the first EOS, which is kept) and finish reasons."""
        tok, eos_ids, n, P = self.policy.tokenizer, set(self.policy.eos_token_ids), g.n, len(g.prompts)
        texts, ids, fins = [], [], []
        for row in g.out.tolist():
            row = [t for t in row if t >= 0]
            cut = next((i for i, t in enumerate(row) if t in eos_ids), None)
            if cut is not None:
                row, fin = row[: cut + 1], "eos"
            else:
                fin = "length"
            text = tok.decode([t for t in row if t not in eos_ids], skip_special_tokens=True)
            if self.stop and fin != "eos":
                cut = cut_at_stop(text, self.stop)
                if cut is not None:
                    text, fin = cut, "stop"
            texts.append(text)
            ids.append(row)
            fins.append(fin)
        per = lambda xs: [xs[i * n:(i + 1) * n] for i in range(P)]  # noqa: E731
        thought = per(g.thought.tolist()) if self.thinking is not None else None
        return GroupSample(per(texts), per(ids), per(fins), g.prefill, g.forward, g.keys, thought)
