"""Sequential revisions: the policy's answer fed back with a revision prompt, ``revisions`` times.

Snell et al. (2024, "Scaling LLM test-time compute optimally can be more effective than scaling model
parameters") compare spending samples in parallel (best-of-N) with spending them in sequence (each new
attempt conditioned on the previous one) and mixes of the two at equal compute. ``revise`` is that
knob: a budget of ``n`` samples per prompt runs ``n // (revisions + 1)`` independent chains of
``revisions + 1`` attempts; attempt ``r + 1`` of a chain reads the prompt and each earlier attempt of its
chain, every one followed by ``Settings.revision_prompt`` (a history that grows by an attempt a round, and
is not cut to the model's context). Every attempt of every chain is a candidate; the verifier scores each
against the original prompt (one batched call at the end) and ``select`` picks among all of them.
``revisions=0`` is weighted best-of-N; ``n = revisions + 1`` is one purely sequential chain.

Batched: each round is one group of the sampling decode loop (:class:`~tts_kernels.search.decode.SampleLoop`)
over every prompt's chains: the first attempts fork each prompt once; a revision re-prefills its chain's
history (those tokens are counted as prefill). Seeds: a round's draws are keyed by (the prompt's seed, the
chain, the round), so with one seed per prompt a prompt's result does not depend on its batch. Thinking
budgets (``Settings.thinking``) apply to every attempt. Under the server's continuous batching
(:func:`serve_revise`) the rounds of many requests share one running loop, each joining at a look.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from .._threads import in_search_pool
from ..ops._validate import check_int
from .accounting import Compute, count_flops
from .answers import extract_answer
from .best_of_n import sampling_loop, score_texts
from .cancel import sub_run
from .decode import GroupSample, SampleGroup
from .result import Candidate, SearchResult, select_candidates
from .seeds import Seeds, splitmix64
from .settings import Settings, resolve
from .validate import PoolTooSmall, check_prompts, check_select


def _round_seed(seeds: Seeds, p: int, chain: int, r: int) -> int:
    base = seeds.per_prompt[p] if seeds.keyed else splitmix64(seeds.seed * 0xD6E8FEB86659FD93 + p)
    z = splitmix64(base * 0x9E3779B97F4A7C15 + (chain + 1) * 0xBF58476D1CE4E5B9 + r * 0x94D049BB133111EB)
    return z - 2**64 if z >= 2**63 else z


class _Chains:
    """One run's chains: ``chains`` per prompt of ``prompts``, ``k + 1`` attempts each, what its rounds sampled
    and its compute so far. Round ``r``'s :class:`~tts_kernels.search.decode.SampleGroup` (:meth:`group`):
    the first forks each prompt ``chains`` times, a revision samples each chain's history once. Under the
    server's continuous batching it is also what the caller sees of the request (``tag``, ``first``: its
    first prompt's index in the call, ``prompts``, ``forward``: policy token positions run so far)."""

    def __init__(self, prompts: list[str], seeds: Seeds, chains: int, s: Settings, *, tag=None, first: int = 0):
        P, k = len(prompts), s.revisions
        self.prompts, self.seeds, self.chains, self.k, self.s, self.tag, self.first = (
            prompts, seeds, chains, k, s, tag, first)
        self.texts = [[[""] * (k + 1) for _ in range(chains)] for _ in range(P)]  # [P][chain][attempt]
        self.ids = [[[[] for _ in range(k + 1)] for _ in range(chains)] for _ in range(P)]
        self.fins = [[["length"] * (k + 1) for _ in range(chains)] for _ in range(P)]
        self.thought = [[[None] * (k + 1) for _ in range(chains)] for _ in range(P)]
        self.history = [[p for _ in range(chains)] for p in prompts]  # what the next attempt reads, per chain
        self.round = 0
        self.prefill = self.spent = self.keys = 0  # (spent: forward of the rounds done)
        self.running: SampleGroup | None = None

    @property
    def forward(self) -> int:
        return self.spent + (0 if self.running is None else self.running.forward)

    def group(self) -> SampleGroup:
        """This round's group: its draws keyed by (the prompt's seed, the chain, the round)."""
        P, chains, r, sd = len(self.prompts), self.chains, self.round, self.seeds
        if r == 0:  # first attempts: each prompt prefilled once and forked per chain, chain c on stream c
            g = SampleGroup(list(self.prompts), chains, Seeds([_round_seed(sd, p, 0, 0) for p in range(P)], P), self)
        else:  # revisions: every chain reads its own history
            g = SampleGroup([self.history[p][c] for p in range(P) for c in range(chains)], 1,
                            Seeds([_round_seed(sd, p, c, r) for p in range(P) for c in range(chains)], P * chains),
                            self)
        self.running = g
        return g

    def record(self, out: GroupSample) -> bool:
        """This round's sample; whether a round is left."""
        r, chains = self.round, self.chains
        at = (lambda x, p, c: x[p][c]) if r == 0 else (lambda x, p, c: x[p * chains + c][0])  # noqa: E731
        self.prefill, self.spent, self.keys = self.prefill + out.prefill, self.spent + out.forward, self.keys + out.keys
        self.running = None
        for p in range(len(self.prompts)):
            for c in range(chains):
                self.texts[p][c][r], self.ids[p][c][r] = at(out.texts, p, c), at(out.ids, p, c)
                self.fins[p][c][r] = at(out.finish, p, c)
                if out.thinking is not None:
                    self.thought[p][c][r] = at(out.thinking, p, c)
                self.history[p][c] = self.history[p][c] + self.texts[p][c][r] + self.s.revision_prompt
        self.round += 1
        return self.round <= self.k

    def result(self, policy, verifier, select: str, extract, gone=None) -> SearchResult:
        """Every attempt scored against its original prompt (one verifier call; ``gone``: as
        :func:`~tts_kernels.search.best_of_n.score_texts`), ``select`` picking among them."""
        s, P, k, chains = self.s, len(self.prompts), self.k, self.chains
        n = chains * (k + 1)
        flat = lambda x, p: [x[p][c][r] for c in range(chains) for r in range(k + 1)]  # noqa: E731
        steps, scores, step_scores, prm_tokens, prm_flops = score_texts(
            verifier, self.prompts, [flat(self.texts, p) for p in range(P)], settings=s, gone=gone)
        cands = []
        for p in range(P):
            tx, ix, fx, th = flat(self.texts, p), flat(self.ids, p), flat(self.fins, p), flat(self.thought, p)
            cands.append([Candidate(text=tx[j], answer=extract(tx[j]), score=scores[p][j], finish=fx[j],
                                    steps=steps[p][j], step_scores=list(step_scores[p][j]), token_ids=ix[j],
                                    thinking_tokens=th[j]) for j in range(n)])
        generated = sum(len(x) for row in self.ids for chain in row for x in chain)
        thinking = sum(x for row in self.thought for chain in row for x in chain if x is not None)
        compute = Compute(policy_prefill_tokens=self.prefill, policy_generated_tokens=generated, prm_tokens=prm_tokens,
                          policy_flops=count_flops(policy.model, self.spent, self.keys), prm_flops=prm_flops,
                          thinking_tokens=thinking)
        chosen, answers = select_candidates(cands, select, policy.device, s.vote_key)
        return SearchResult(strategy="revise", budget=n, predictions=answers, chosen=chosen, candidates=cands,
                            compute=compute, samples=n * P,
                            prompt_info=[{"chains": chains, "revisions": k} for _ in range(P)],
                            info={"policy_forward_tokens": self.spent})


def _check(prompts, n: int, select: str, verifier, s: Settings) -> tuple[list[str], int]:
    prompts = check_prompts(prompts)
    check_int("n", n, minimum=1)
    check_select(select, verifier)
    k = s.revisions
    if n % (k + 1):
        raise ValueError(f"n ({n}) must be a multiple of revisions + 1 ({k + 1}): each chain spends revisions + 1 "
                         f"samples")
    return prompts, n // (k + 1)


@torch.no_grad()
def revise(policy, verifier, prompts: Sequence[str], *, n: int, select: str = "weighted",
           settings: Settings | None = None, seed: int | Sequence[int] = 0,
           extract: Callable[[str], str | None] = extract_answer, **overrides) -> SearchResult:
    """``n // (revisions + 1)`` chains of ``revisions + 1`` attempts per prompt (see the module docstring).
    ``select``: ``"best"``, ``"majority"`` (no verifier needed) or ``"weighted"``. Settings read: ``revisions``,
    ``revision_prompt``, and the sampling ones of :func:`~tts_kernels.search.best_of_n`."""
    s = resolve(settings, overrides)
    prompts, chains = _check(prompts, n, select, verifier, s)
    P = len(prompts)
    run = _Chains(prompts, Seeds.of(seed, P), chains, s)
    while True:
        got: list[GroupSample] = []
        # a revision's rows are chains: a cancelled prompt's chains stop
        scope = contextlib.nullcontext() if run.round == 0 else sub_run([p for p in range(P) for _ in range(chains)])
        with scope:
            sampling_loop(policy, s).run(run.group(), done=lambda pairs: got.extend(out for _, out in pairs))
        if not run.record(got[0]):
            return run.result(policy, verifier, select, extract)


@torch.no_grad()
@in_search_pool
def serve_revise(policy, verifier, prompts: list[str], seeds: list[int], *, n: int, select: str, tag,
                 settings: Settings, extract, join, deliver, started=None, capacity: int) -> None:
    """Continuous batching of ``revise``, as :func:`~tts_kernels.search.best_of_n.serve_sampling`: ``prompts``
    (one seed each) start the decode loop; at its looks ``join(fits)`` may hand over more requests
    (``fits(prompts, seeds, tag)``: what the request becomes when its first round fits now, else ``None``).
    Each request's rounds are groups of the loop: when one ends, the next joins at a later look (before any new
    request), as it would start alone, so a request's attempts are what :func:`revise` gives it with its seeds.
    ``started(request)`` and ``deliver(request, result)`` (or the exception building it) get the request
    (``tag``, ``first``, ``prompts``, ``forward``: :class:`_Chains`) once, at its first round's start and when
    its last round ends and its attempts are scored. Cancellation reaches every round: the call's cancelled
    prompts are mapped onto each round's rows (:func:`~tts_kernels.search.cancel.sub_run`); a request
    whose prompts are all cancelled ends at its round's end. All on this thread."""
    s = settings
    prompts, chains = _check(prompts, n, select, verifier, s)
    loop = sampling_loop(policy, s, capacity=capacity * chains)
    waiting: list[_Chains] = []  # requests whose next round waits to join
    numbering = [0]  # the call's prompt indices: the next request's first

    def request(p, sd, t) -> _Chains:
        run = _Chains(list(p), Seeds(list(sd), len(p)), chains, s, tag=t, first=numbering[0])
        numbering[0] += len(p)
        return run

    with sub_run() as mapping:
        def on_start(g: SampleGroup) -> None:
            run = g.tag
            mapping.map(g.first, [run.first + (i if run.round == 0 else i // chains) for i in range(len(g.prompts))])
            if run.round == 0 and started is not None:
                started(run)

        def end(run: _Chains) -> None:
            mine = range(run.first, run.first + len(run.prompts))
            gone = {p - run.first for p in mapping.enclosing if p in mine}
            try:
                res = run.result(policy, verifier, select, extract, gone=gone)
            except Exception as exc:  # noqa: BLE001 - that request's failure, handed to its owner; the others go on
                res = exc
            mapping.forget(mine)
            deliver(run, res)

        def fail(run: _Chains, exc: Exception) -> None:  # its next round can never fit the KV pool
            mapping.forget(range(run.first, run.first + len(run.prompts)))
            deliver(run, exc)

        def done(pairs) -> None:
            for g, out in pairs:
                run = g.tag
                left = run.record(out)
                if left and not set(range(run.first, run.first + len(run.prompts))) <= mapping.enclosing:
                    waiting.append(run)
                else:
                    end(run)

        def groups(fits) -> list[SampleGroup]:
            out = []
            while waiting:  # the running requests' next rounds first
                g = waiting[0].group()
                try:
                    if not fits(g):
                        return out
                except PoolTooSmall as exc:  # (a round's history grew past a fixed pool: that request fails)
                    fail(waiting.pop(0), exc)
                    continue
                out.append(g)
                waiting.pop(0)

            def fit(p, sd, t):
                run = request(p, sd, t)
                taken = False
                try:  # (fits raises PoolTooSmall for a request the caller refuses)
                    taken = fits(run.group())
                finally:
                    if not taken:
                        numbering[0] -= len(p)  # (not taken: its indices are the next one's)
                return run if taken else None
            return out + [run.running for run in join(fit)]

        waiting.append(request(prompts, seeds, tag))
        while waiting:  # a loop ends when its batch empties; a round that ended it starts the next loop
            run = waiting.pop(0)
            try:
                loop.run(run.group(), done=done, join=groups, started=on_start)
            except PoolTooSmall as exc:  # (raised before the loop's session starts: nothing ran)
                if run.round == 0:  # the call's first request: the caller refuses it
                    raise
                fail(run, exc)
