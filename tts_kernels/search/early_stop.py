"""Sampling that stops early: candidates aborted by their token confidence, prompts whose vote has
settled, partial samples rejected by the verifier, and the freed rows refilled.

One decode loop (:class:`TraceRun`) serves four strategies; each is a small rule (a *controller*) over it:

* ``deepconf`` (online; Fu et al. 2025, "Deep Think with Confidence"): per prompt, the first
  ``warmup`` candidates run to the end; the threshold is the ``1 - deepconf_keep`` quantile of their
  *lowest group confidence*; every later candidate stops (``finish="aborted"``) the token its group
  confidence (the mean token confidence over the last ``confidence_window`` tokens) falls below it (by more than
  :data:`TIE` of it: a candidate that repeats a warm-up one ties with the threshold, and a batch's float
  rounding must not split the tie). A
  prompt stops starting candidates once the confidence-weighted vote of its finished, unaborted
  candidates gives one answer at least ``consensus`` of the weight. The answer: that vote.
* ``deepconf_offline``: ``N`` candidates to the end (the same draws as ``majority``); the
  ``deepconf_keep`` share with the highest confidence vote, weighted by it.
* ``adaptive_consistency`` (Aggarwal et al. 2023): per prompt the Beta stopping rule over its answers:
  stop once ``P(p_1 > p_2) > stop_confidence`` for the two most frequent answers' counts ``a, b``
  (``p ~ Beta(a + 1, b + 1)``; exact for integers via the binomial sum).
* ``speculative_rejection`` (Sun et al. 2024): every ``checkpoint_tokens`` tokens the verifier scores
  each live partial candidate and the worst ``rejection_rate`` of each prompt's live candidates stop
  (``finish="rejected"``); the verifier's best finished candidate is the answer.

**Device work.** Every token: :func:`~tts_kernels.sample` with ``stats_k`` returns the token
confidence (the negated mean of the top-``confidence_k`` log-probabilities), the entropy and the
self-certainty of each row's distribution, read where the logits are read; a
:class:`~tts_kernels.ops.confidence.SlidingWindow` keeps each row's group confidence; a row whose
window mean is below its prompt's threshold stops in that step and its KV blocks go back to the pool in
that step (``PolicySession.release``: a masked truncate to length 0, no host sync). Every
``sync_every`` tokens the host looks: it records finished candidates, applies the prompt rules, and
re-lays the batch: finished and stopped rows leave it, and new candidates of prompts that still need
them take their place (forked from the prompt's row, which every prompt keeps parked at the head of
the batch: no prompt is prefilled twice).

**Reproducible.** Candidate ``j`` of prompt ``p`` draws under (``p``'s seed, stream ``j``) at offsets
``0, 1, ...`` of its own tokens, wherever and whenever it runs: with one seed per prompt it is the same
candidate as ``majority``'s ``j``-th. Every rule reads a prompt's candidates in index order only (the
decision after candidates ``0..k-1`` have all finished), so a prompt's result does not depend on the
batch: what the schedule changes is only how many tokens candidates past the decision spent before they
were stopped, and those are counted.

**Requests joining** (:func:`serve_early`, the server's continuous batching). The loop runs groups of prompts
(:class:`TraceGroup`): a new group is prefilled into the running pool at a host look and its prompts' parked rows
join the head of the batch (speculative rejection: each group's checkpoints count from the look it joined at, which
needs ``checkpoint_tokens`` to be a multiple of ``sync_every``; otherwise groups join only at checkpoints); an
ended group's rows leave in the next re-lay and its result is handed over. Each group's candidate rows stay
within what its KV blocks were held for. A group's candidates and answers are its run alone's; its compute is
counted per group, exactly.

**Accounting.** ``Compute.policy_generated_tokens`` counts every token sampled for a candidate while it
ran (aborted, rejected and cut-off ones included); the FLOPs count every row the policy ran (finished
rows riding along until the next look included); ``prm_tokens`` every token the verifier ran
(speculative rejection re-scores each live partial candidate from its prompt at a checkpoint).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .._threads import PoolTuner, in_search_pool
from ..models.text import cut_at_stop, split_steps
from ..ops._validate import check_int
from ..ops.confidence import SlidingWindow
from ..ops.sample import sample
from .accounting import Compute, count_flops
from .answers import extract_answer, vote_key
from .cancel import cancelled
from .result import Candidate, SearchResult, select_candidates
from .seeds import Seeds
from .settings import Settings, resolve
from .validate import check_pools, check_prompts


@dataclass
class Trace:
    """One candidate as generated: its prompt, its index there, its tokens (EOS included), why it
    ended, and per token the confidence; the entropy and self-certainty summed over its tokens."""

    prompt: int
    index: int
    ids: list[int]
    finish: str
    confidence: list[float]
    entropy_sum: float = 0.0
    certainty_sum: float = 0.0
    text: str = ""
    lowest: float | None = None  # its lowest group confidence, once a rule has computed it

    def summary(self, window: int) -> dict:
        """``mean``, ``lowest_group`` (the lowest mean over ``window`` consecutive tokens; the mean when
        shorter), ``tail`` (the mean of the last ``window``), ``entropy`` and ``self_certainty`` (means)."""
        c, n = self.confidence, len(self.confidence)
        if n == 0:
            nan = float("nan")
            return {"mean": nan, "lowest_group": nan, "tail": nan, "entropy": nan, "self_certainty": nan}
        tail = c[-window:]
        return {"mean": sum(c) / n, "lowest_group": lowest_group(c, window), "tail": sum(tail) / len(tail),
                "entropy": self.entropy_sum / n, "self_certainty": self.certainty_sum / n}


TIE = 1e-5  # relative: a confidence this close to the threshold is not below it (float rounding, not a difference)


def lowest_group(conf: Sequence[float], window: int) -> float:
    """DeepConf's lowest group confidence: the smallest mean over ``window`` consecutive values (the
    mean of all when there are fewer)."""
    n = len(conf)
    if n == 0:
        return float("nan")
    if n <= window:
        return sum(conf) / n
    acc = sum(conf[:window])
    low = acc
    for i in range(window, n):
        acc += conf[i] - conf[i - window]
        low = min(low, acc)
    return low / window


def beta_settled(a: int, b: int, confidence: float) -> bool:
    """Adaptive consistency's Beta stopping rule: ``P(X > 1/2) > confidence`` for ``X ~ Beta(a + 1, b + 1)``
    (``a``, ``b``: the two largest answer counts). Exact: ``P(X <= 1/2) = P(Binomial(a + b + 1, 1/2) >= a + 1)``."""
    m = a + b + 1
    tail = sum(math.comb(m, i) for i in range(a + 1, m + 1)) / 2 ** m
    return 1.0 - tail > confidence


def tie_classes(values: Sequence[float]) -> list[list[int]]:
    """The indices of ``values`` in ascending order of value, in classes of ties: the NaNs first (as -inf), then
    runs of values each within :data:`TIE` of the one before (a batch's float rounding must not order them)."""
    classes: list[list[int]] = [[i for i, v in enumerate(values) if v != v]]
    last = None
    for i in sorted((i for i, v in enumerate(values) if v == v), key=lambda i: values[i]):
        v = values[i]
        if last is None or v - last > TIE * max(abs(v), abs(last)):
            classes.append([])
        classes[-1].append(i)
        last = v
    return [c for c in classes if c]


def _same(a: str) -> str:
    return a


def weighted_share(answers: Sequence[str | None], weights: Sequence[float], key) -> float:
    """The largest share of the summed weight one answer holds (answers ``None`` do not vote; 0 without votes)."""
    votes: dict = {}
    for a, w in zip(answers, weights):
        if a is not None and math.isfinite(w):
            votes[key(a)] = votes.get(key(a), 0.0) + w
    total = sum(votes.values())
    return max(votes.values()) / total if total > 0 else 0.0


# ----------------------------------------------------------------------------- controllers

class Rule:
    """What a strategy decides at the host looks (the base: ``n`` candidates each, all at once, no stop). Its
    per-prompt state is keyed by the prompt's index in the loop: prompts join (:meth:`grow`) and leave
    (:meth:`drop`) as the loop's groups do."""

    needs_release = False  # rows can stop on their confidence (the step frees their blocks)
    checkpoint_tokens = 0  # speculative rejection: the verifier looks every this many tokens

    def __init__(self, n: int):
        self.n = n
        self.traces: dict[int, dict[int, Trace]] = {}
        self.settled: dict[int, bool] = {}  # no more candidates; running ones stop
        self.decided: dict[int, int | None] = {}  # candidates 0..k-1 decide the prompt

    @property
    def opening(self) -> int:
        """Candidates a new prompt runs at once (:meth:`in_flight` before any has finished)."""
        return self.n

    @property
    def most(self) -> int:
        """Candidates a prompt runs at once at most (:meth:`in_flight` in any state)."""
        return self.n

    def grow(self, prompts: Sequence[int]) -> None:
        """New prompts, with no candidate yet."""
        for p in prompts:
            self.traces[p], self.settled[p], self.decided[p] = {}, False, None

    def drop(self, prompts: Sequence[int]) -> None:
        """Forget prompts (their results have been taken)."""
        for p in prompts:
            for d in self._state():
                d.pop(p, None)

    def _state(self) -> list[dict]:
        return [self.traces, self.settled, self.decided]

    def startable(self, p: int) -> int:
        """Candidates prompt ``p`` may have started by now (in index order)."""
        return self.n

    def in_flight(self, p: int) -> int:
        """Candidates of ``p`` running at once at most."""
        return self.n

    def threshold(self, p: int) -> float:
        return float("-inf")

    def finished(self, p: int, trace: Trace) -> None:
        self.traces[p][trace.index] = trace
        if not self.settled[p]:
            self.update(p)

    def update(self, p: int) -> None:
        """After a candidate of ``p`` finished: decide whether ``p`` is settled."""

    def prefix(self, p: int) -> list[Trace]:
        """``p``'s finished candidates ``0, 1, ...`` up to the first not finished."""
        out, t = [], self.traces[p]
        while len(out) in t:
            out.append(t[len(out)])
        return out

    def settle(self, p: int, k: int) -> None:
        self.settled[p], self.decided[p] = True, k


class DeepConfOnline(Rule):
    needs_release = True

    def __init__(self, n, *, warmup, keep, consensus, window, extract, key, parallel):
        super().__init__(n)
        self.parallel = parallel
        self.warmup, self.keep, self.consensus, self.window = min(warmup, n), keep, consensus, window
        self.extract, self.key = extract, key
        self.thresholds: dict[int, float] = {}
        self.ready: dict[int, bool] = {}
        self.votes: dict[int, dict] = {}  # per prompt: confidence-weighted votes of the candidates checked
        self.checked: dict[int, int] = {}  # per prompt: candidates 0..k-1 checked for consensus

    @property
    def opening(self):
        return self.warmup

    @property
    def most(self):
        return max(self.warmup, self.parallel)

    def grow(self, prompts):
        super().grow(prompts)
        for p in prompts:
            self.thresholds[p], self.ready[p] = float("-inf"), False

    def _state(self):
        return super()._state() + [self.thresholds, self.ready, self.votes, self.checked]

    def startable(self, p):
        return self.n if self.ready[p] else self.warmup

    def in_flight(self, p):
        return self.parallel if self.ready[p] else self.warmup

    def threshold(self, p):
        """What a window mean must fall below to stop the row: the threshold less :data:`TIE` of it."""
        thr = self.thresholds[p]
        return thr - TIE * abs(thr) if math.isfinite(thr) else thr

    def lowest(self, t: Trace) -> float:
        """``t``'s lowest group confidence (computed once)."""
        if t.lowest is None:
            t.lowest = lowest_group(t.confidence, self.window)
        return t.lowest

    def retained(self, p: int, t: Trace) -> bool:
        """Whether ``t`` votes: not aborted, and its lowest group confidence not below the threshold (:data:`TIE`)."""
        return t.finish != "aborted" and not self.lowest(t) < self.threshold(p)

    def update(self, p):
        pre = self.prefix(p)
        if not self.ready[p] and len(pre) >= self.warmup:
            lows = sorted(self.lowest(t) for t in pre[: self.warmup])
            lows = [x for x in lows if math.isfinite(x)]
            self.thresholds[p] = quantile(lows, 1.0 - self.keep) if lows else float("-inf")
            self.ready[p] = True
        if not self.ready[p] or self.consensus >= 1.0:
            return
        # The first k (from the warm-up on) at which the vote has settled, checked as the prefix grows: the
        # votes of candidates 0..k-1 are kept per prompt, so each candidate is added once.
        votes = self.votes.setdefault(p, {})
        k = self.checked.get(p, 0)
        while k < len(pre):
            t = pre[k]
            k += 1
            a = self.extract(t.text) if self.retained(p, t) else None
            w = self.lowest(t)
            if a is not None and math.isfinite(w):
                votes[self.key(a)] = votes.get(self.key(a), 0.0) + w
            total = sum(votes.values())
            if k >= max(self.warmup, 1) and total > 0 and max(votes.values()) / total >= self.consensus:
                self.settle(p, k)
                break
        self.checked[p] = k


class AdaptiveConsistency(Rule):
    def __init__(self, n, *, parallel, confidence, extract, key):
        super().__init__(n)
        self.parallel, self.confidence, self.extract, self.key = parallel, confidence, extract, key
        self.counts: dict[int, Counter] = {}
        self.checked: dict[int, int] = {}

    @property
    def opening(self):
        return self.parallel

    @property
    def most(self):
        return self.parallel

    def _state(self):
        return super()._state() + [self.counts, self.checked]

    def in_flight(self, p):
        return self.parallel

    def update(self, p):
        pre = self.prefix(p)
        counts = self.counts.setdefault(p, Counter())  # answers of candidates 0..k-1, added once each
        k = self.checked.get(p, 0)
        while k < len(pre):
            a = self.extract(pre[k].text)
            k += 1
            if a is not None:
                counts[self.key(a)] += 1
            top = counts.most_common(2) + [(None, 0), (None, 0)]
            if k >= 2 and top[0][1] and beta_settled(top[0][1], top[1][1], self.confidence):
                self.settle(p, k)
                break
        self.checked[p] = k


class Rejection(Rule):
    def __init__(self, n, *, checkpoint_tokens, rate):
        super().__init__(n)
        self.checkpoint_tokens, self.rate = checkpoint_tokens, rate

    def reject(self, live: list[tuple[int, float]]) -> set[int]:
        """Rows to stop among one prompt's live rows ``(row, partial score)``: the worst ``rate`` of them
        (NaN scores worst; ties to the later candidate), at least one kept. Scores within :data:`TIE` of each
        other tie (candidates identical so far score the same up to the batch's float rounding, which must not
        choose between them); a prompt's rows lie in candidate order."""
        drop = min(int(math.floor(self.rate * len(live))), len(live) - 1)
        order = [live[i] for c in tie_classes([x[1] for x in live]) for i in sorted(c, key=lambda i: -live[i][0])]
        return {r for r, _ in order[:drop]}


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (linear interpolation between order statistics, numpy's default)."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ----------------------------------------------------------------------------- the decode loop

@dataclass
class RunOutput:
    traces: list[dict[int, Trace]]
    compute: Compute
    forward_tokens: int
    blocks_in_use: list[tuple[int, int]] = field(default_factory=list)  # (step, blocks) at each look
    spent: list[int] = field(default_factory=list)  # [P] tokens sampled for the prompt's candidates, kept or not
    started: list[int] = field(default_factory=list)  # [P] candidates started


@dataclass(eq=False)
class TraceGroup:
    """``prompts`` under ``seeds`` (:class:`~tts_kernels.search.seeds.Seeds`; a group that joins a running loop has
    one seed per prompt). ``tag``: the caller's (the server's job). The loop sets ``first`` (the index of its first
    prompt among every prompt the loop has run: the index the rule, :func:`~tts_kernels.search.cancel.cancelled`
    and the progress events use) and the rest; ``prefill``, ``forward``, ``keys``: what the policy ran for it,
    counted on the host as the session counts them for the whole batch."""

    prompts: list[str]
    seeds: Seeds
    tag: object = None
    first: int = 0
    ids: list[list[int]] | None = None  # the prompts' token ids
    cap: int = 0  # candidate rows the batch is refilled up to on its account
    prompt_blocks: int = 0  # KV blocks its prompts' prefill takes
    most: int = 0  # its candidate rows at once, at most (when groups join)
    commit: int = 0  # KV blocks held for it
    verifier_commit: int = 0  # verifier KV blocks held for it (speculative rejection)
    verifier_prefill: int = 0  # verifier KV blocks its prompts' prefill takes
    start: int = 0  # the loop's step at which its rows started (its checkpoints count from it)
    prefill: int = 0
    forward: int = 0
    keys: int = 0

    @property
    def indices(self) -> range:
        return range(self.first, self.first + len(self.prompts))


class TraceRun:
    """The decode loop of the early-stopping strategies (see the module docstring): one group run to its end, or
    groups joining it at its host looks (:func:`serve_early`). ``capacity``: candidate rows that may run at once
    when groups join (the first group runs whatever its size). ``verifier``: speculative rejection's (its
    :class:`PartialScorer`, :attr:`scorer`, is made as the loop starts)."""

    def __init__(self, policy, rule: Rule, s: Settings, *, verifier=None, track_blocks: bool = False,
                 capacity: int = 0):
        self.policy, self.rule, self.s = policy, rule, s
        self.verifier, self.scorer = verifier, None
        self.track_blocks, self.capacity = track_blocks, capacity
        self.prompts = 0  # prompts seen: the next group's first index
        self.committed = 0  # KV blocks held for the groups running
        self.verifier_committed = 0  # the same in the verifier's pool
        self.ending = False  # set as the groups that end the loop are handed over
        self.started: dict[int, int] = {}  # per prompt: candidates started
        self.spent: dict[int, int] = {}  # per prompt: tokens sampled for its candidates (kept or not)
        self.plen: dict[int, int] = {}  # per prompt: its tokens
        self.seed_of: dict[int, int] = {}  # per prompt: its seed (groups with one seed per prompt)
        self.run_seed: int | None = None  # a lone group's run seed: a row's stream is prompt * n + candidate
        self.looks: list[tuple[int, int]] = []  # (step, blocks in use) at each look (track_blocks)
        self.totals = (0, 0, 0)  # the session's own (prefill, forward, keys) counts as it ended

    def _encode(self, g: TraceGroup) -> None:
        if g.ids is None:
            g.ids = [self.policy.encode(p) for p in g.prompts]

    def _size(self, g: TraceGroup, block_size: int) -> None:
        """``g``'s rows, and its KV blocks at most: its prompts', and per row its new tokens' plus a partial block
        copied on write and one of rounding."""
        n, P = self.rule.n, len(g.prompts)
        g.cap, g.most = P * min(self.rule.opening, n), P * min(self.rule.most, n)
        g.prompt_blocks = sum(-(-len(i) // block_size) for i in g.ids)
        g.commit = g.prompt_blocks + g.most * (self.s.max_new_tokens // block_size + 2)

    def _size_verifier(self, g: TraceGroup) -> None:
        """``g``'s verifier KV blocks (speculative rejection, a scorer that admits): its prompts' prefill, and at
        most, with ``n`` rows a prompt (computed once)."""
        if not g.verifier_commit:
            session = self.scorer.session
            g.verifier_prefill = session.blocks_for(g.prompts, 0)
            g.verifier_commit = g.verifier_prefill + session.blocks_for([], len(g.prompts) * self.rule.n)

    def _fit_pools(self, g: TraceGroup) -> None:
        """:class:`~tts_kernels.search.validate.PoolTooSmall` unless ``g``'s worst case fits the fixed pools."""
        if self.scorer is not None:
            self._size_verifier(g)
        check_pools((g.commit, g.verifier_commit), self.policy, self.verifier)

    def output(self, g: TraceGroup) -> RunOutput:
        """``g``'s traces (per prompt, by candidate index), compute and per-prompt counts."""
        ps = list(g.indices)
        spent = [self.spent[p] for p in ps]
        compute = Compute(policy_prefill_tokens=g.prefill, policy_generated_tokens=sum(spent),
                          policy_flops=count_flops(self.policy.model, g.forward, g.keys))
        return RunOutput([self.rule.traces[p] for p in ps], compute, g.forward, list(self.looks), spent,
                         [self.started[p] for p in ps])

    def forget(self, g: TraceGroup) -> None:
        """Drop ``g``'s per-prompt state (its results have been taken): a loop that groups keep joining holds only
        its running prompts'."""
        for p in g.indices:
            for d in (self.started, self.spent, self.plen, self.seed_of):
                d.pop(p, None)
        self.rule.drop(g.indices)
        if self.scorer is not None:
            self.scorer.drop(g.indices)

    @torch.no_grad()
    def run(self, first: TraceGroup, *, done: Callable[[list[TraceGroup]], None],
            join: Callable[[Callable[[TraceGroup], bool]], list[TraceGroup]] | None = None,
            started: Callable[[TraceGroup], None] | None = None) -> None:
        """Run ``first`` and every group ``join`` hands over, calling ``done(groups)`` with the groups that ended
        at each look (on this thread; those that end the loop once its session is freed, with :attr:`ending` set:
        the caller frees the verifier's, :attr:`scorer`, once it has their scores). ``join(fits)`` as
        :meth:`~tts_kernels.search.decode.SampleLoop.run` calls it; ``started(group)`` as each group joins
        (``group.first`` set). With checkpoints (speculative rejection) each group's checkpoints count from the look
        it joined at: when ``checkpoint_tokens`` is a multiple of ``sync_every`` every look is ``sync_every`` tokens
        after the last, so a group may join at any look and its looks and checkpoints fall at its own steps as when
        it runs alone; otherwise groups join only at checkpoints (where every group's fall)."""
        policy, s = self.policy, self.s
        self._encode(first)
        P = len(first.prompts)
        hint = P * self.rule.n + P  # at most n candidates of a prompt run at once (fewer in waves)
        if join is not None:  # capacity candidate rows, and a parked row for each prompt they can belong to
            hint = max(hint, self.capacity + -(-self.capacity // min(self.rule.most, self.rule.n)) + P)
        session = policy.start(first.ids, rows_hint=hint, max_new_tokens=s.max_new_tokens)
        last: list[TraceGroup] = []
        try:
            if hasattr(session, "generate"):  # a text-level engine (the vLLM backend) samples whole completions
                raise ValueError("the early-stopping strategies need per-token statistics from this package's "
                                 "decode loop; a text-level engine (the vLLM backend) does not give them")
            if self.verifier is not None:
                self.scorer = PartialScorer(self.verifier, first.prompts, self.rule.n, s,
                                            rows=self.capacity if join is not None else 0)
            last = self._decode(session, first, done, join, started)
            self.totals = (session.prefill_tokens, int(session.tokens), int(session.keys))
        finally:
            session.free()
        if last:
            self.ending = True
            done(last)
            if join is not None:
                for g in last:
                    self.forget(g)

    def _keys(self, head: list[int], slots: list[tuple[int, int]], dev):
        """Per row (the parked rows of prompts ``head``, then the candidates ``slots``): seed and stream."""
        owner = head + [p for p, _ in slots]
        cand = torch.tensor([0] * len(head) + [j for _, j in slots], dtype=torch.long, device=dev)
        if self.run_seed is not None:  # one run seed: the stream is (prompt, candidate), wherever the row sits
            return (torch.tensor(self.run_seed, dtype=torch.int64, device=dev),
                    torch.tensor(owner, dtype=torch.long, device=dev) * self.rule.n + cand)
        return torch.tensor([self.seed_of[p] for p in owner], dtype=torch.int64, device=dev), cand

    def _add(self, session, gs: list[TraceGroup], prefilled: bool, block_size: int, started) -> list[int]:
        """``gs`` join: their prompts are prefilled (each group in a forward of its own, as alone) into rows after
        those the session holds. Returns their prompt indices, in row order."""
        rule, fresh = self.rule, []
        for g in gs:
            self._encode(g)
            if not prefilled:
                session.admit(g.ids)
            g.first, self.prompts = self.prompts, self.prompts + len(g.prompts)
            ps = g.indices
            if self.scorer is not None:
                if not prefilled:
                    self.scorer.admit(ps, g.prompts)
                if self.scorer.admits:  # (set by the room check for the groups that join)
                    self._size_verifier(g)
                self.verifier_committed += g.verifier_commit
            rule.grow(ps)
            if g.seeds.keyed:
                self.seed_of.update(zip(ps, g.seeds.per_prompt))
            else:
                self.run_seed = g.seeds.seed
            for p, ids in zip(ps, g.ids):
                self.started[p] = self.spent[p] = 0
                self.plen[p] = len(ids)
            self._size(g, block_size)
            self.committed += g.commit
            g.prefill = g.forward = sum(len(i) for i in g.ids)
            g.keys = sum(len(i) * (len(i) + 1) // 2 for i in g.ids)
            fresh.extend(ps)
            if started is not None:
                started(g)
        return fresh

    def _join(self, join, session, groups: list[TraceGroup], ended: list[TraceGroup]) -> list[TraceGroup]:
        """The groups ``join`` hands over at this look, each accepted by the room check: candidate rows within
        ``capacity``, worst-case KV blocks within the pools beside the running groups' (and, for the prefill at
        this look, beside the blocks the groups that ended here still hold: their rows leave in this look's
        re-lay), and the sequence slots the admissions and re-lays need."""
        blocks, B, free = session.pool
        now = session.rows
        # what the groups that ended here may still hold, and the admitted prompts' prefill, until the re-lay
        held_now = {"blocks": sum(g.commit for g in ended), "v_blocks": sum(g.verifier_commit for g in ended)}
        held = {"rows": sum(g.most for g in groups), "blocks": self.committed,
                "seqs": sum(g.most + len(g.prompts) for g in groups), "admitted": 0,
                "v_blocks": self.verifier_committed, "v_new": 0}
        vblocks, _, vfree = self.scorer.session.pool if self.scorer is not None else (0, 0, 0)

        def fits(g: TraceGroup) -> bool:
            self._encode(g)
            if not g.seeds.keyed:
                return False
            self._size(g, B)
            self._fit_pools(g)  # (a group that could never fit is refused, not kept waiting)
            rows, seqs = held["rows"] + g.most, held["seqs"] + g.most + len(g.prompts)
            # (sequence slots: a re-lay forks the new batch, up to every group's parked and candidate rows, before
            # the rows it replaces go: at this look the rows now and the admitted prompts', later a batch as big)
            ok = (rows <= max(self.capacity, 1) and held["blocks"] + g.commit <= blocks
                  and held["blocks"] + held_now["blocks"] + g.prompt_blocks <= blocks
                  and held["admitted"] + len(g.prompts) + seqs <= free and 2 * seqs <= free + now)
            if ok and self.scorer is not None:  # its verifier rows (n a prompt) and their partial tails' clones
                v_prefill, v_commit = g.verifier_prefill, g.verifier_commit
                v_new = held["v_new"] + len(g.prompts) * self.rule.n
                # (each admission forks every verifier row before the old ones go; a checkpoint clones the live
                # rows beside them; the rows of groups that ended at this look leave after it)
                v_now = len(self.scorer.cands)
                ok = (held["v_blocks"] + v_commit <= vblocks
                      and held["v_blocks"] + held_now["v_blocks"] + v_prefill <= vblocks
                      and held["admitted"] + len(g.prompts) + 2 * (v_now + v_new) <= vfree + v_now)
            if ok:
                held["rows"], held["blocks"], held["seqs"] = rows, held["blocks"] + g.commit, seqs
                held["admitted"] += len(g.prompts)
                held_now["blocks"] -= g.commit - g.prompt_blocks  # (its rows come only after the re-lay)
                if self.scorer is not None:
                    held["v_blocks"], held["v_new"] = held["v_blocks"] + v_commit, v_new
                    held_now["v_blocks"] -= v_commit - v_prefill
            return ok

        return join(fits)

    def _decode(self, session, first: TraceGroup, done, join, started) -> list[TraceGroup]:
        """The token loop; returns the groups that ended at its last look (the others went to ``done``)."""
        s, rule, policy = self.s, self.rule, self.policy
        T, W = s.max_new_tokens, s.confidence_window
        tok = policy.tokenizer
        eos_ids = list(policy.eos_token_ids)
        eos_set = set(eos_ids)
        release = getattr(session, "release", None) if rule.needs_release else None
        dev = session.logits.device
        on_cpu = dev.type == "cpu"
        eos = torch.tensor(eos_ids or [-1], device=dev)
        joins = (join is not None and hasattr(session, "admit") and hasattr(session, "pool")
                 and (self.scorer is None or self.scorer.admits))
        bounded = join is not None  # each group runs at most its own rows (what its KV blocks were held for)
        B = session.pool[1] if joins else 1
        # A loop that takes new groups may run for as long as they come: its thread count follows the load.
        tuner = PoolTuner() if joins else None
        groups: list[TraceGroup] = []
        group_of: dict[int, TraceGroup] = {}
        head: list[int] = []  # rows 0..len(head)-1: each running prompt's parked row (its prompt)
        slots: list[tuple[int, int]] = []  # the candidate rows after them: (prompt, candidate)
        if joins:  # the first group fits the empty pools (the room check refuses the joiners that never could)
            self._size(first, B)
            self._fit_pools(first)
        # the prompts prefilled but not yet laid out, at their rows in the session
        fresh = {p: i for i, p in enumerate(self._add(session, [first], True, B, started))}
        groups.append(first)
        group_of.update((p, first) for p in first.indices)
        cap = first.cap  # candidate rows the batch is refilled up to
        # Per row, on the device (a parked row holds the empty state every new candidate starts from).
        buf = torch.full((0, T), -1, dtype=torch.long, device=dev)
        cbuf = torch.zeros((0, T), dtype=torch.float32, device=dev)
        counts = torch.zeros(0, dtype=torch.long, device=dev)
        sums = torch.zeros((0, 2), dtype=torch.float32, device=dev)  # entropy, self-certainty
        ended_t = torch.zeros(0, dtype=torch.bool, device=dev)
        aborted = torch.zeros(0, dtype=torch.bool, device=dev)
        window = SlidingWindow.start(0, W, dev)
        step = burst = 0
        base = 0  # checkpoints fall at steps base + k * checkpoint_tokens (base: where the schedule started)
        c0: list[int] = []  # each candidate row's token count when the burst began
        while True:
            # ---- the host looks: record finished rows, apply the rules, re-lay the batch
            H = len(head)
            finished_h = ended_t.tolist()
            aborted_h = aborted.tolist()
            counts_h = counts.tolist()
            # What the burst ran, per group, as the session counts it: every candidate row, every step; a row's
            # keys are its position + 1, its position frozen from the token that stopped it.
            for i, (p, _) in enumerate(slots):
                g, a, b, pl = group_of[p], c0[i], counts_h[H + i], self.plen[p]
                g.forward += burst
                k = b - a if finished_h[H + i] else burst
                g.keys += k * (pl + a + 1) + k * (k - 1) // 2 + (burst - k) * (pl + b)
            gone = cancelled() or frozenset()
            fin_rows = [r for r in range(H, len(finished_h)) if finished_h[r]]
            if fin_rows:
                idx = torch.tensor(fin_rows, device=dev)
                ids_h, conf_h, sums_h = buf[idx].tolist(), cbuf[idx].tolist(), sums[idx].tolist()
                for i, r in enumerate(fin_rows):
                    p, j = slots[r - H]
                    n_tok = counts_h[r]
                    ids = ids_h[i][:n_tok]
                    fin = "aborted" if aborted_h[r] else ("eos" if ids and ids[-1] in eos_set else "length")
                    text = tok.decode([t for t in ids if t not in eos_set], skip_special_tokens=True)
                    cut = cut_at_stop(text, s.stop) if fin == "length" else None
                    if cut is not None:  # a stop string in a row that did not end otherwise, as majority cuts
                        text, fin = cut, "stop"
                    self.spent[p] += n_tok
                    rule.finished(p, Trace(p, j, ids, fin, conf_h[i][:n_tok], sums_h[i][0], sums_h[i][1], text))
            live_rows = [r for r in range(H, len(finished_h)) if not finished_h[r]]
            stop_rows = set()
            if s.stop and live_rows:  # stop strings: on the host, at the looks
                idx = torch.tensor(live_rows, device=dev)
                ids_h = buf[idx].tolist()
                for i, r in enumerate(live_rows):
                    n_tok = counts_h[r]
                    text = tok.decode([t for t in ids_h[i][:n_tok] if t not in eos_set], skip_special_tokens=True)
                    cut = cut_at_stop(text, s.stop)
                    if cut is not None:
                        p, j = slots[r - H]
                        rule.finished(p, Trace(p, j, ids_h[i][:n_tok], "stop", cbuf[r, :n_tok].tolist(),
                                               *sums[r].tolist(), cut))
                        stop_rows.add(r)
            ck = rule.checkpoint_tokens
            if ck:  # the live rows of the groups at one of their checkpoints
                def due(r: int) -> bool:
                    t = step - group_of[slots[r - H][0]].start
                    return t > 0 and t % ck == 0

                stop_rows |= self._checkpoint([r for r in live_rows if r not in stop_rows and due(r)], H, slots, buf,
                                              counts_h, eos_set, rule)
            keep = []
            for r in live_rows:
                p = slots[r - H][0]
                if r in stop_rows or rule.settled[p] or p in gone:
                    self.spent[p] += counts_h[r]  # its tokens were spent; the candidate is not kept
                    continue
                keep.append(r)
            running = Counter(slots[r - H][0] for r in keep)

            def startable(p: int) -> bool:  # (a candidate of p the rule lets start now)
                return self.started[p] < min(rule.startable(p), rule.n)

            # A group has ended when none of its prompts has a row running or a candidate to start.
            ended = [g for g in groups if not any(
                running[p] or (not rule.settled[p] and p not in gone and startable(p)) for p in g.indices)]
            for g in ended:
                groups.remove(g)
                cap -= g.cap
                self.committed -= g.commit
                self.verifier_committed -= g.verifier_commit
            if not groups:  # nothing runs: the checkpoint schedule may start again here
                base = step
            if joins and (not ck or ck % s.sync_every == 0 or (step - base) % ck == 0):
                tuner.tick()
                taken = self._join(join, session, groups, ended)
                if taken:
                    at = session.rows  # (admitted rows come after every row the session holds)
                    fresh.update((p, at + i) for i, p in enumerate(self._add(session, taken, False, B, started)))
                    for g in taken:
                        g.start = step
                        groups.append(g)
                        group_of.update((p, g) for p in g.indices)
                        cap += g.cap
                    gone = cancelled() or frozenset()
            live = set(groups)
            new: list[tuple[int, int]] = []
            grows = Counter(group_of[slots[r - H][0]] for r in keep)  # candidate rows per group

            def room(p: int) -> bool:
                return not bounded or grows[group_of[p]] < group_of[p].most

            def start(p: int) -> None:
                new.append((p, self.started[p]))
                self.started[p] += 1
                running[p] += 1
                grows[group_of[p]] += 1

            open_ = [p for g in groups for p in g.indices if not (rule.settled[p] or p in gone)]
            for p in open_:
                while running[p] < rule.in_flight(p) and startable(p) and room(p):
                    start(p)
            # The rows settled prompts left go to prompts still open (round robin, in prompt order), so the
            # batch stays as wide as it started: a hard prompt's later candidates run beside, not after.
            while len(keep) + len(new) < cap:
                more = [p for p in open_ if startable(p) and room(p)]
                if not more:
                    break
                for p in more[: cap - len(keep) - len(new)]:
                    if room(p):  # (bounded: an earlier prompt of its group may have taken its last row)
                        start(p)
            new.sort()
            if not keep and not new:  # nothing runs and nothing can start: every group has ended
                if self.track_blocks:
                    self.looks.append((step, _blocks_in_use(session)))
                return ended + groups
            pos_of = {p: i for i, p in enumerate(head)}
            pos_of.update(fresh)
            head = [p for p in head if group_of[p] in live] + [p for p in fresh if group_of[p] in live]
            fresh = {}
            order = [pos_of[p] for p in head] + keep + [pos_of[p] for p, _ in new]
            session.fork(torch.tensor(order, dtype=torch.long, device=dev))
            slots = [slots[r - H] for r in keep] + new
            c0 = [counts_h[r] for r in keep] + [0] * len(new)
            # The device state: the parked and new rows empty (one empty row appended, picked for each), the
            # kept rows their own.
            blank = len(finished_h)
            pick = torch.tensor([blank] * len(head) + keep + [blank] * len(new), dtype=torch.long, device=dev)
            buf = torch.cat([buf, torch.full((1, T), -1, dtype=torch.long, device=dev)]).index_select(0, pick)
            cbuf = torch.cat([cbuf, torch.zeros((1, T), dtype=torch.float32, device=dev)]).index_select(0, pick)
            counts = torch.cat([counts, torch.zeros(1, dtype=torch.long, device=dev)]).index_select(0, pick)
            sums = torch.cat([sums, torch.zeros((1, 2), dtype=torch.float32, device=dev)]).index_select(0, pick)
            window = window.grow(1).select(pick)
            H, R = len(head), len(head) + len(slots)
            ended_t = torch.zeros(R, dtype=torch.bool, device=dev)
            aborted = torch.zeros(R, dtype=torch.bool, device=dev)
            active = torch.ones(R, dtype=torch.bool, device=dev)
            active[:H] = False
            run = torch.arange(H, R, device=dev)
            seed_t, stream_t = self._keys(head, slots, dev)
            thr = torch.tensor([float("-inf")] * H + [rule.threshold(p) for p, _ in slots], dtype=torch.float32,
                               device=dev)
            if self.track_blocks:
                self.looks.append((step, _blocks_in_use(session)))
            if ended:  # the others go on: these groups are done now (their rows have left the session)
                done(ended)
                for g in ended:
                    self.forget(g)
                    for p in g.indices:
                        del group_of[p]
            # ---- sync_every tokens on the device (to the next checkpoint at most), no host look
            burst = s.sync_every
            if ck:
                burst = min(burst, ck - (step - base) % ck)
            for _ in range(burst):
                toks, _, st = sample(session.logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                     min_p=s.min_p, seed=seed_t, offset=counts, stream=stream_t,
                                     stats_k=s.confidence_k)
                conf = st[:, 0]
                pos = counts.clamp(max=T - 1)[:, None]
                buf.scatter_(1, pos, torch.where(active, toks, buf.gather(1, pos)[:, 0])[:, None])
                cbuf.scatter_(1, pos, torch.where(active, conf, cbuf.gather(1, pos)[:, 0])[:, None])
                sums += torch.where(active[:, None], st[:, 1:], 0.0)
                window.push(conf, active)
                counts = counts + active
                is_eos = torch.isin(toks, eos) & active
                low = active & ~is_eos & (window.count >= W) & (window.mean < thr)
                full = active & (counts >= T)
                feed = active & ~is_eos & ~low & ~full
                ended_t = ended_t | (active & ~feed)
                aborted = aborted | low
                active = feed
                # The aborted rows' blocks go back to the pool now (on a CPU, reading the mask costs no
                # device sync: the release is skipped when nothing stopped).
                if release is not None and (not on_cpu or bool(low.any())):
                    release(low)
                session.decode(toks, active=feed, rows=run)
                step += 1

    def _checkpoint(self, rows, H, slots, buf, counts_h, eos_set, rule) -> set[int]:
        """Speculative rejection's look: score every live partial candidate, stop the worst of each prompt."""
        if not rows:
            return set()
        tok = self.policy.tokenizer
        ids_h = buf[torch.tensor(rows, device=buf.device)].tolist()
        texts = [tok.decode([t for t in ids_h[i][:counts_h[r]] if t not in eos_set], skip_special_tokens=True)
                 for i, r in enumerate(rows)]
        agg = self.scorer.partial([slots[r - H] for r in rows], texts, rule)
        by_prompt: dict[int, list] = {}
        for r, a in zip(rows, agg):
            by_prompt.setdefault(slots[r - H][0], []).append((r, a))
        out = set()
        for p, live in by_prompt.items():
            for r in rule.reject(live):
                out.add(r)
                pp, j = slots[r - H]
                n_tok = counts_h[r]
                rule.finished(pp, Trace(pp, j, ids_h[rows.index(r)][:n_tok], "rejected", [], 0.0, 0.0,
                                        texts[rows.index(r)]))
        return out


class PartialScorer:
    """The verifier's view of speculative rejection's candidates: one verifier row per candidate, forked from its
    prompt's, holding the candidate's complete steps. A checkpoint adds each candidate's steps completed since the
    last one, then scores the partial last step on a throw-away clone; the final scores add the remaining steps.
    Each token is run about once (the partial tails again at each checkpoint), instead of every prefix from its
    prompt; the scores are those of ``score_steps`` on the same texts.

    Prompts are numbered as the loop numbers them (the first ``prompts`` are ``0..P-1``); more join
    (:meth:`admit`) and leave (:meth:`drop`) with the loop's groups. With a session that reports its forwards per
    row (``last_rows``), the tokens and keys it runs are counted per prompt (:meth:`spent`). ``rows``: the
    candidate rows to size the pool for (default ``P * n``)."""

    def __init__(self, verifier, prompts: list[str], n: int, s: Settings, *, rows: int = 0):
        self.n, self.delim = n, s.step_delimiter
        P = len(prompts)
        # (room for the step formats' tags and the partial tails' clones beside the completions)
        self.session = verifier.start(list(prompts), agg=s.agg, rows=max(rows, P * n),
                                      max_new_tokens=2 * s.max_new_tokens + 64)
        self.dev = verifier.device
        self.per_row = hasattr(self.session, "last_rows")
        self.count: dict[int, list[int]] = {}  # per prompt: tokens, keys
        self._tally(list(range(P)))
        self.cands = [(p, j) for p in range(P) for j in range(n)]  # each row's candidate
        self.row_of = {c: r for r, c in enumerate(self.cands)}
        self.session.fork(torch.arange(P, device=self.dev).repeat_interleave(n))
        self.held = [0] * (P * n)  # complete steps each row holds
        self.tokens = self.keys = 0

    @property
    def admits(self) -> bool:
        """Whether prompts can join (a session that prefills into its running pool, counted per row)."""
        return self.per_row and all(hasattr(self.session, a) for a in ("admit", "pool", "blocks_for"))

    def _tally(self, owners: list[int], session=None) -> None:
        """Add the last forward of ``session`` (default: the scorer's), whose row ``i`` belongs to ``owners[i]``."""
        if not self.per_row:
            return
        tokens, keys = (session or self.session).last_rows
        for p, t, k in zip(owners, tokens, keys):
            c = self.count.setdefault(p, [0, 0])
            c[0] += t
            c[1] += k

    def admit(self, indices: Sequence[int], prompts: list[str]) -> None:
        """New prompts (numbered ``indices``): their rows after the others, ``n`` candidates each."""
        R, k = len(self.cands), len(prompts)
        self.session.admit(list(prompts))
        self._tally(list(indices))
        self.session.fork(torch.cat([torch.arange(R, device=self.dev),
                                     R + torch.arange(k, device=self.dev).repeat_interleave(self.n)]))
        self.cands += [(p, j) for p in indices for j in range(self.n)]
        self.row_of = {c: r for r, c in enumerate(self.cands)}
        self.held += [0] * (k * self.n)

    def drop(self, indices: Sequence[int]) -> None:
        """Prompts ``indices`` leave (their results have been taken): their rows and counts go."""
        gone = set(indices)
        keep = [r for r, (p, _) in enumerate(self.cands) if p not in gone]
        if len(keep) < len(self.cands):
            self.session.fork(torch.tensor(keep, dtype=torch.long, device=self.dev))
            self.cands = [self.cands[r] for r in keep]
            self.held = [self.held[r] for r in keep]
            self.row_of = {c: r for r, c in enumerate(self.cands)}
        for p in gone:
            self.count.pop(p, None)

    def spent(self, indices: Sequence[int]) -> tuple[int, int]:
        """Tokens run and keys attended for prompts ``indices`` (a session that counts per row)."""
        return (sum(self.count.get(p, (0, 0))[0] for p in indices), sum(self.count.get(p, (0, 0))[1] for p in indices))

    def _complete(self, text: str) -> tuple[list[str], str | None]:
        parts = text.split(self.delim)
        done = [x + self.delim for x in parts[:-1] if (x + self.delim).strip()]
        return done, (parts[-1] if parts[-1].strip() else None)

    def _add(self, new: dict[int, list[str]]) -> None:
        if any(new.values()):
            self.session.add_steps([new.get(r, []) for r in range(len(self.held))])
            self._tally([p for p, _ in self.cands])
            for r, steps in new.items():
                self.held[r] += len(steps)

    def partial(self, cands: list[tuple[int, int]], texts: list[str], rule) -> list[float]:
        """Aggregate scores of the candidates ``(p, j)`` as far as ``texts``, their partial last step included."""
        rows = [self.row_of[c] for c in cands]
        split = [self._complete(t) for t in texts]
        self._add({r: done[self.held[r]:] for r, (done, _) in zip(rows, split)})
        scores = self.session.aggregate.index_select(0, torch.tensor(rows, device=self.dev)).clone()
        tails = [i for i, (_, tail) in enumerate(split) if tail is not None]
        if tails:
            idx = torch.tensor([rows[i] for i in tails], device=self.dev)
            clone = self.session.clone(idx)
            try:
                clone.add_steps([[split[i][1]] for i in tails])
                self._tally([cands[i][0] for i in tails], clone)
                scores[torch.tensor(tails, device=self.dev)] = clone.aggregate.to(scores.dtype)
                self.tokens += clone.tokens
                self.keys += int(clone.keys)
            finally:
                clone.free()
        return scores.tolist()

    def final(self, cands: list[tuple[int, int]], texts: list[str]) -> list[float]:
        """Aggregate scores of finished candidates ``(p, j)`` with texts ``texts`` (all their steps)."""
        rows = [self.row_of[c] for c in cands]
        self._add({r: split_steps(t, self.delim)[self.held[r]:] for r, t in zip(rows, texts)})
        return self.session.aggregate.index_select(0, torch.tensor(rows, device=self.dev)).tolist() if rows else []

    def free(self) -> tuple[int, int]:
        """Free the verifier rows; the tokens run and keys attended in all."""
        tokens, keys = self.session.tokens + self.tokens, int(self.session.keys) + self.keys
        self.session.free()
        return tokens, keys


def _blocks_in_use(session) -> int:
    kv = getattr(getattr(session, "cache", None), "kv", None)
    return -1 if kv is None else int(kv.num_blocks - kv.num_free_blocks)


# ----------------------------------------------------------------------------- the strategies

def _auto(v: int, n: int) -> int:
    return min(n, v if v else max(2, n // 4))


def _start(name, policy, verifier, prompts, n, settings, overrides, *, needs_verifier=False):
    s = resolve(settings, overrides)
    prompts = check_prompts(prompts)
    check_int("n", n, minimum=1)
    if needs_verifier and verifier is None:
        raise ValueError(f"{name} needs a verifier (it scores the partial candidates)")
    if s.thinking is not None:
        raise ValueError(f"{name} does not take Settings.thinking")
    return s, prompts


def _candidate(t: Trace, s: Settings, extract, *, score=None, voting=True) -> Candidate:
    summ = t.summary(s.confidence_window)
    return Candidate(text=t.text, answer=extract(t.text) if voting else None,
                     score=summ["lowest_group"] if score is None else score, finish=t.finish,
                     steps=split_steps(t.text, s.step_delimiter), token_ids=list(t.ids), confidence=summ,
                     token_confidence=list(t.confidence))


def _result(name, n, cands, out: RunOutput, s, device, *, select="weighted", compute=None, info=None,
            prompt_info=None) -> SearchResult:
    chosen, answers = select_candidates(cands, select, device, s.vote_key)
    return SearchResult(strategy=name, budget=n, predictions=answers, chosen=chosen, candidates=cands,
                        compute=compute or out.compute, samples=sum(len(c) for c in out.traces),
                        prompt_info=[{**i, "started": a, "tokens": t} for i, a, t in
                                     zip(prompt_info or [{} for _ in cands], out.started, out.spent)],
                        info={"policy_forward_tokens": out.forward_tokens, "blocks_in_use": out.blocks_in_use,
                              **(info or {})})


# Each strategy without a verifier: its rule for a budget and settings, and a prompt's candidates and
# prompt_info from the rule once the prompt has ended.

def _deepconf_rule(n, s, extract):
    return DeepConfOnline(n, warmup=_auto(s.deepconf_warmup, n), keep=s.deepconf_keep, consensus=s.consensus,
                          window=s.confidence_window, extract=extract, key=vote_key(s.vote_key) or _same,
                          parallel=s.parallel_samples or n)


def _deepconf_pick(rule, p, s, extract):
    k = rule.decided[p]
    pre = rule.prefix(p)[:k] if k is not None else rule.prefix(p)
    thr = rule.thresholds[p]
    retained = [rule.retained(p, t) for t in pre]
    if not any(retained):
        retained = [t.finish != "aborted" for t in pre]
    return ([_candidate(t, s, extract, voting=v) for t, v in zip(pre, retained)],
            {"threshold": thr if math.isfinite(thr) else None, "decided_at": k,
             "aborted": sum(t.finish == "aborted" for t in pre)})


def _offline_rule(n, s, extract):
    return Rule(n)


def _offline_pick(rule, p, s, extract):
    pre = rule.prefix(p)
    conf = [t.summary(s.confidence_window)["lowest_group"] for t in pre]
    keep_n = max(1, math.ceil(s.deepconf_keep * len(pre)))
    order = [i for c in reversed(tie_classes(conf)) for i in sorted(c)]  # most confident first; ties by index
    kept = set(order[:keep_n])
    return ([_candidate(t, s, extract, voting=i in kept) for i, t in enumerate(pre)],
            {"filtered": sorted(set(range(len(pre))) - kept)})


def _adaptive_rule(n, s, extract):
    return AdaptiveConsistency(n, parallel=_auto(s.parallel_samples, n), confidence=s.stop_confidence,
                               extract=extract, key=vote_key(s.vote_key) or _same)


def _adaptive_pick(rule, p, s, extract):
    k = rule.decided[p]
    pre = rule.prefix(p)[:k] if k is not None else rule.prefix(p)
    return [_candidate(t, s, extract, score=float("nan")) for t in pre], {"decided_at": k}


def _rejection_rule(n, s, extract):
    return Rejection(n, checkpoint_tokens=s.checkpoint_tokens, rate=s.rejection_rate)


_RULES = {"deepconf": (_deepconf_rule, _deepconf_pick, "weighted"),
          "deepconf_offline": (_offline_rule, _offline_pick, "weighted"),
          "adaptive_consistency": (_adaptive_rule, _adaptive_pick, "majority"),
          "speculative_rejection": (_rejection_rule, None, "best")}


def _rejection_result(runner: TraceRun, g: TraceGroup, extract, *, per_prompt: bool = True) -> SearchResult:
    """Speculative rejection's result for ``g``: its finished candidates scored whole by the verifier, the best
    the answer. ``per_prompt``: its verifier compute is its prompts' counts (else the caller adds the verifier's
    totals, read as it frees the session)."""
    s, rule, verifier = runner.s, runner.rule, runner.verifier
    out = runner.output(g)
    traces = [rule.prefix(p) for p in g.indices]
    whole = [(t.prompt, t.index) for row in traces for t in row if t.finish != "rejected"]
    texts = [rule.traces[p][j].text for p, j in whole]
    final = dict(zip(whole, runner.scorer.final(whole, texts)))
    prm_tokens, prm_keys = runner.scorer.spent(g.indices) if per_prompt else (0, 0)
    cands = [[_candidate(t, s, extract, score=final[t.prompt, t.index]) if t.finish != "rejected"
              else _candidate(t, s, extract, score=float("nan"), voting=False) for t in row] for row in traces]
    compute = out.compute + Compute(prm_tokens=prm_tokens,
                                    prm_flops=count_flops(verifier.flop_module, prm_tokens, prm_keys)) \
        if per_prompt else out.compute
    info = [{"rejected": sum(t.finish == "rejected" for t in row)} for row in traces]
    return _result("speculative_rejection", rule.n, cands, out, s, runner.policy.device, select="best",
                   compute=compute, prompt_info=info)


def _group_result(name, runner: TraceRun, g: TraceGroup, extract) -> SearchResult:
    if name == "speculative_rejection":
        return _rejection_result(runner, g, extract)
    _, pick, select = _RULES[name]
    out = runner.output(g)
    picked = [pick(runner.rule, p, runner.s, extract) for p in g.indices]
    return _result(name, runner.rule.n, [c for c, _ in picked], out, runner.s, runner.policy.device,
                   select=select, prompt_info=[i for _, i in picked])


def _alone(name, policy, prompts, n, s, seed, extract, track_blocks=False) -> SearchResult:
    """``name`` over ``prompts``: one group, run to its end."""
    runner = TraceRun(policy, _RULES[name][0](n, s, extract), s, track_blocks=track_blocks)
    g = TraceGroup(prompts, Seeds.of(seed, len(prompts)))
    runner.run(g, done=lambda gs: None)
    return _group_result(name, runner, g, extract)


def serve_early(name: str, policy, verifier, prompts: list[str], seeds: list[int], *, n: int, tag,
                settings: Settings, extract, join, deliver, started=None, capacity: int) -> None:
    """Continuous batching of ``deepconf``, ``deepconf_offline``, ``adaptive_consistency`` or
    ``speculative_rejection`` (``name``; its ``verifier``, ``None`` for the others), as
    :func:`~tts_kernels.search.best_of_n.serve_sampling` for sampling: requests join the token loop at its host
    looks (each prompt parked at the head of the batch and forked into candidates as its rule allows), at most
    ``capacity`` prompts' worth of candidate rows at once (each group runs at most its own: ``n`` a prompt, or
    ``parallel_samples``). A request's candidates, answers and ``prompt_info`` equal :func:`run` over its prompts
    with its seeds; its compute is its own, counted exactly, and depends on the batch (the tokens candidates
    past a prompt's decision spent before its next look; speculative rejection's is its run alone's: every
    candidate starts at once, and its checkpoints count from the look it joined at)."""
    rejection = name == "speculative_rejection"
    s, prompts = _start(name, policy, verifier, prompts, n, settings, {}, needs_verifier=rejection)
    runner = TraceRun(policy, _RULES[name][0](n, s, extract), s, capacity=capacity * n,
                      verifier=verifier if rejection else None)

    def done(gs):
        results = []
        for g in gs:
            try:
                results.append(_group_result(name, runner, g, extract))
            except Exception as exc:  # noqa: BLE001 - that group's failure, handed to its owner; the others go on
                results.append(exc)
        if runner.ending and runner.scorer is not None:  # the last answers find no verifier block held either
            runner.scorer.free()
            runner.scorer = None
        for g, res in zip(gs, results):
            deliver(g, res)

    def groups(fits):
        def fit(p, sd, t):
            g = TraceGroup(list(p), Seeds(list(sd), len(p)), t)
            return g if fits(g) else None
        return join(fit)

    try:
        runner.run(TraceGroup(list(prompts), Seeds(list(seeds), len(prompts)), tag), done=done, join=groups,
                   started=started)
    finally:
        if runner.scorer is not None:  # (the loop failed before its last groups were handed over)
            runner.scorer.free()


@torch.no_grad()
@in_search_pool
def deepconf(policy, verifier, prompts: Sequence[str], *, n: int, settings: Settings | None = None,
             seed: int | Sequence[int] = 0, extract: Callable[[str], str | None] = extract_answer,
             track_blocks: bool = False, **overrides) -> SearchResult:
    """DeepConf online (see the module docstring): at most ``n`` candidates per prompt, no verifier.

    Candidates are those of the decision (``0..k-1``); an aborted one keeps its text but casts no vote.
    ``prompt_info[p]``: ``threshold`` (``None``: the warm-up had no finite confidence), ``decided_at`` (``k``;
    ``None``: all ``n`` ran), ``aborted``, ``started``, ``tokens`` (spent on the prompt, kept or not).
    Settings read: ``deepconf_warmup``, ``deepconf_keep``, ``consensus``, ``confidence_k``,
    ``confidence_window``, the sampling settings and ``max_new_tokens``, ``sync_every``, ``stop``,
    ``vote_key``."""
    s, prompts = _start("deepconf", policy, verifier, prompts, n, settings, overrides)
    return _alone("deepconf", policy, prompts, n, s, seed, extract, track_blocks)


@torch.no_grad()
@in_search_pool
def deepconf_offline(policy, verifier, prompts: Sequence[str], *, n: int, settings: Settings | None = None,
                     seed: int | Sequence[int] = 0, extract: Callable[[str], str | None] = extract_answer,
                     track_blocks: bool = False, **overrides) -> SearchResult:
    """DeepConf offline: ``n`` whole candidates per prompt (with one seed per prompt, ``majority``'s
    candidates); the ``deepconf_keep`` share with the highest lowest group confidence (at least one) vote,
    weighted by it. No verifier. The others stay in ``candidates`` without a vote (``answer`` kept in
    ``prompt_info[p]["filtered"]``, their indices)."""
    s, prompts = _start("deepconf_offline", policy, verifier, prompts, n, settings, overrides)
    return _alone("deepconf_offline", policy, prompts, n, s, seed, extract, track_blocks)


@torch.no_grad()
@in_search_pool
def adaptive_consistency(policy, verifier, prompts: Sequence[str], *, n: int, settings: Settings | None = None,
                         seed: int | Sequence[int] = 0, extract: Callable[[str], str | None] = extract_answer,
                         **overrides) -> SearchResult:
    """Adaptive consistency: at most ``n`` candidates per prompt, ``parallel_samples`` of them running at
    once, a prompt stopping at the first ``k`` whose answers settle the Beta rule (``stop_confidence``);
    the majority of candidates ``0..k-1``. No verifier. ``prompt_info[p]["decided_at"]``: ``k`` (``None``:
    all ``n`` ran)."""
    s, prompts = _start("adaptive_consistency", policy, verifier, prompts, n, settings, overrides)
    return _alone("adaptive_consistency", policy, prompts, n, s, seed, extract)


@torch.no_grad()
@in_search_pool
def speculative_rejection(policy, verifier, prompts: Sequence[str], *, n: int, settings: Settings | None = None,
                          seed: int | Sequence[int] = 0, extract: Callable[[str], str | None] = extract_answer,
                          **overrides) -> SearchResult:
    """Speculative rejection: ``n`` candidates per prompt start; every ``checkpoint_tokens`` tokens the
    verifier scores the live partial ones and the worst ``rejection_rate`` of each prompt's stop
    (``finish="rejected"``, no vote); the finished ones are scored whole and the best is the answer."""
    s, prompts = _start("speculative_rejection", policy, verifier, prompts, n, settings, overrides,
                        needs_verifier=True)
    runner = TraceRun(policy, _rejection_rule(n, s, extract), s, verifier=verifier)
    g = TraceGroup(prompts, Seeds.of(seed, len(prompts)))
    try:
        runner.run(g, done=lambda gs: None)
        res = _rejection_result(runner, g, extract, per_prompt=False)  # (any verifier: its totals, below)
    finally:
        if runner.scorer is not None:
            prm_tokens, prm_keys = runner.scorer.free()
    res.compute = res.compute + Compute(prm_tokens=prm_tokens,
                                        prm_flops=count_flops(verifier.flop_module, prm_tokens, prm_keys))
    return res
