"""Sequential revisions: the policy's answer fed back with a revision prompt, ``revisions`` times.

Snell et al. (2024, "Scaling LLM test-time compute optimally can be more effective than scaling model
parameters") compare spending samples in parallel (best-of-N) with spending them in sequence (each new
attempt conditioned on the previous one) and mixes of the two at equal compute. ``revise`` is that
knob: a budget of ``n`` samples per prompt runs ``n // (revisions + 1)`` independent chains of
``revisions + 1`` attempts; attempt ``r + 1`` of a chain reads the prompt, attempt ``r`` and
``Settings.revision_prompt``. Every attempt of every chain is a candidate; the verifier scores each
against the original prompt (one batched call at the end) and ``select`` picks among all of them.
``revisions=0`` is weighted best-of-N; ``n = revisions + 1`` is one purely sequential chain.

Batched: each round is one :func:`~tts_kernels.search.best_of_n.sample_completions` call over every
prompt's chains: the first attempts fork each prompt once; a revision re-prefills its chain's history
(those tokens are counted as prefill). Seeds: a round's draws are keyed by (the prompt's seed, the
chain, the round), so with one seed per prompt a prompt's result does not depend on its batch. Thinking budgets (``Settings.thinking``) apply to every attempt.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..ops._validate import check_int
from .accounting import Compute, count_flops
from .answers import extract_answer
from .best_of_n import sample_completions, score_texts
from .cancel import sub_run
from .result import Candidate, SearchResult, select_candidates
from .seeds import Seeds, splitmix64
from .settings import Settings, resolve
from .validate import check_prompts, check_select


def _round_seed(seeds: Seeds, p: int, chain: int, r: int) -> int:
    base = seeds.per_prompt[p] if seeds.keyed else splitmix64(seeds.seed * 0xD6E8FEB86659FD93 + p)
    z = splitmix64(base * 0x9E3779B97F4A7C15 + (chain + 1) * 0xBF58476D1CE4E5B9 + r * 0x94D049BB133111EB)
    return z - 2**64 if z >= 2**63 else z


@torch.no_grad()
def revise(policy, verifier, prompts: Sequence[str], *, n: int, select: str = "weighted",
           settings: Settings | None = None, seed: int | Sequence[int] = 0,
           extract: Callable[[str], str | None] = extract_answer, **overrides) -> SearchResult:
    """``n // (revisions + 1)`` chains of ``revisions + 1`` attempts per prompt (see the module docstring).
    ``select``: ``"best"``, ``"majority"`` (no verifier needed) or ``"weighted"``. Settings read: ``revisions``,
    ``revision_prompt``, and the sampling ones of :func:`~tts_kernels.search.best_of_n`."""
    s = resolve(settings, overrides)
    prompts = check_prompts(prompts)
    check_int("n", n, minimum=1)
    check_select(select, verifier)
    k = s.revisions
    if n % (k + 1):
        raise ValueError(f"n ({n}) must be a multiple of revisions + 1 ({k + 1}): each chain spends revisions + 1 "
                         f"samples")
    chains = n // (k + 1)
    P = len(prompts)
    seeds = Seeds.of(seed, P)
    texts = [[[""] * (k + 1) for _ in range(chains)] for _ in range(P)]  # [P][chain][attempt]
    ids = [[[[] for _ in range(k + 1)] for _ in range(chains)] for _ in range(P)]
    fins = [[["length"] * (k + 1) for _ in range(chains)] for _ in range(P)]
    thought = [[[None] * (k + 1) for _ in range(chains)] for _ in range(P)]
    prefill = forward = keys = 0
    history = [[p for _ in range(chains)] for p in prompts]  # what attempt r reads, per chain
    sampling = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                    min_p=s.min_p, stop=list(s.stop) or None, sync_every=s.sync_every, thinking=s.thinking)
    for r in range(k + 1):
        stats: dict = {}
        if r == 0:  # first attempts: each prompt prefilled once and forked per chain, chain c on stream c
            t, i, f, tokens = sample_completions(policy, list(prompts), chains, seed=[
                _round_seed(seeds, p, 0, 0) for p in range(P)], stats=stats, **sampling)
            at = lambda x, p, c: x[p][c]  # noqa: E731
        else:  # revisions: every chain reads its own history
            flat = [history[p][c] for p in range(P) for c in range(chains)]
            with sub_run([p for p in range(P) for _ in range(chains)]):  # a cancelled prompt's chains stop
                t, i, f, tokens = sample_completions(policy, flat, 1, seed=[
                    _round_seed(seeds, p, c, r) for p in range(P) for c in range(chains)], stats=stats, **sampling)
            at = lambda x, p, c: x[p * chains + c][0]  # noqa: E731
        prefill, forward, keys = prefill + stats["prefill"], forward + tokens, keys + stats["keys"]
        for p in range(P):
            for c in range(chains):
                texts[p][c][r], ids[p][c][r], fins[p][c][r] = at(t, p, c), at(i, p, c), at(f, p, c)
                if "thinking" in stats:
                    thought[p][c][r] = at(stats["thinking"], p, c)
                history[p][c] = history[p][c] + texts[p][c][r] + s.revision_prompt
    flat_c = lambda x, p: [x[p][c][r] for c in range(chains) for r in range(k + 1)]  # noqa: E731
    steps, scores, step_scores, prm_tokens, prm_flops = score_texts(
        verifier, prompts, [flat_c(texts, p) for p in range(P)], settings=s)
    cands = []
    for p in range(P):
        tx, ix, fx, th = flat_c(texts, p), flat_c(ids, p), flat_c(fins, p), flat_c(thought, p)
        cands.append([Candidate(text=tx[j], answer=extract(tx[j]), score=scores[p][j], finish=fx[j], steps=steps[p][j],
                                step_scores=list(step_scores[p][j]), token_ids=ix[j], thinking_tokens=th[j])
                      for j in range(n)])
    generated = sum(len(x) for row in ids for chain in row for x in chain)
    thinking = sum(x for row in thought for chain in row for x in chain if x is not None)
    compute = Compute(policy_prefill_tokens=prefill, policy_generated_tokens=generated, prm_tokens=prm_tokens,
                      policy_flops=count_flops(policy.model, forward, keys), prm_flops=prm_flops,
                      thinking_tokens=thinking)
    chosen, answers = select_candidates(cands, select, policy.device, s.vote_key)
    return SearchResult(strategy="revise", budget=n, predictions=answers, chosen=chosen, candidates=cands,
                        compute=compute, samples=n * P, prompt_info=[{"chains": chains, "revisions": k} for _ in range(P)],
                        info={"policy_forward_tokens": forward})
