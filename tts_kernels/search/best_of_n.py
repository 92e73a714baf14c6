"""Best-of-N with a verifier, majority and weighted voting, on the paged KV cache.

``best_of_n(policy, verifier, prompts, n=N, select=...)`` samples ``N`` completions per
prompt and picks one per prompt by ``select``: the best verifier aggregate (``"best"``,
best-of-N), the most frequent answer (``"majority"``), or the answer with the largest
summed score (``"weighted"``). The registered strategies ``best_of_n``, ``majority`` and
``weighted_best_of_n`` are these three rules; run together (``search.run_together``) they
share one sampling run (:func:`sampling_results`). What it does differently from the usual transformers recipe
(``generate(do_sample=True, num_return_sequences=n)`` then one PRM forward per full
candidate):

* each prompt is prefilled once, then forked ``n`` times on the paged cache (no
  copies; ``generate()`` prefills it ``n`` times);
* every step samples all rows with the fused :func:`~tts_kernels.sample` (per-row
  counter-based randomness, offsets advanced on the device): no host sync per token;
* the host looks every ``sync_every`` steps, to stop rows at EOS or a stop string and
  drop finished rows from the batch (so they cost nothing afterwards);
* the verifier prefills each prompt once too, forks per candidate and runs only the
  completions' tokens (:class:`~tts_kernels.models.HFPRM`); the completions are split into
  steps by ``settings.step_delimiter``, the same steps every search scores;
* selection and voting are device ops over ``[P, n]``.

Randomness: each row draws at its own token count as offset (:mod:`~tts_kernels.search.decode`, the one
decode loop). With one seed per prompt a candidate's tokens depend on its prompt's seed and its index only;
with one run seed the stream is the row's place in the batch, and the layout after dropping finished rows
is part of the key, so a different ``sync_every`` gives a different (equally valid) sample.

Token accounting is exact: ``info["policy_forward_tokens"]`` counts every token the policy
model ran (prompts once each, one per live row per decode step, including rows that
finished since the last look; the policy FLOPs are computed from it), ``compute.prm_tokens``
every token the verifier ran.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._threads import in_search_pool
from ..models.text import split_steps
from ..ops._validate import check_int
from .accounting import Compute, count_flops
from .answers import extract_answer
from .cancel import cancelled
from .decode import GroupSample, SampleGroup, SampleLoop
from .result import SELECT_RULES, Candidate, SearchResult, select_candidates
from .seeds import Seeds
from .settings import Settings, resolve
from .thinking import ThinkingBudget
from .validate import check_prompts


def _check(prompts, n, max_new_tokens, sync_every, stop):
    check_prompts(prompts)
    for name, v in (("n", n), ("max_new_tokens", max_new_tokens), ("sync_every", sync_every)):
        check_int(name, v, minimum=1)
    if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop)):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")


@torch.no_grad()
@in_search_pool
def sample_completions(policy, prompts: Sequence[str], n: int, *, max_new_tokens: int, temperature=1.0,
                       top_p=1.0, top_k=0, min_p=0.0, stop: Sequence[str] | None = None, seed: int | Sequence[int] = 0,
                       sync_every: int = 8, stats: dict | None = None, thinking: ThinkingBudget | None = None):
    """``n`` sampled completions per prompt: ``(texts [P][n], token ids [P][n], finish [P][n], policy tokens)``.

    ``seed``: the run's seed, or one per prompt (:mod:`~tts_kernels.search.seeds`: then a prompt's
    candidate ``j`` draws under (its seed, ``j``) whatever else is in the batch).

    ``thinking``: a :class:`~tts_kernels.search.thinking.ThinkingBudget` applied to every row's logits on
    the device (:mod:`tts_kernels.ops.thinking`).

    ``stats`` (a dict, optional) receives ``prefill`` (prompt tokens), ``keys`` (keys attended, summed
    over every token run: the attention part of the FLOP estimate) and, with ``thinking``,
    ``thinking`` (``[P][n]`` tokens each candidate wrote while thinking)."""
    _check(prompts, n, max_new_tokens, sync_every, stop)
    loop = SampleLoop(policy, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                      min_p=min_p, stop=stop, sync_every=sync_every, thinking=thinking)
    got: list[GroupSample] = []
    loop.run(SampleGroup(list(prompts), n, Seeds.of(seed, len(prompts))),
             done=lambda pairs: got.extend(out for _, out in pairs))
    out = got[0]
    if stats is not None:
        stats["keys"], stats["prefill"] = out.keys, out.prefill
        if thinking is not None:
            stats["thinking"] = out.thinking
    return out.texts, out.ids, out.finish, out.forward


def _check_select(select: str, verifier) -> None:
    if select not in SELECT_RULES:
        raise ValueError(f"select must be one of {SELECT_RULES}, got {select!r}")
    if select != "majority" and verifier is None:
        raise ValueError(f"select={select!r} needs a verifier (only 'majority' runs without one)")


def score_texts(verifier, prompts, texts: list[list[str]], *, settings: Settings, gone=None):
    """``texts [P][n]`` split into steps by ``settings.step_delimiter`` and scored as completions of
    ``prompts`` (one verifier call; ``verifier=None``: not scored; the texts of the prompts in ``gone``,
    by default the cancelled ones, are not scored either): ``(steps, scores [P][n], step_scores,
    prm_tokens, prm_flops)``."""
    P, n = len(prompts), len(texts[0]) if texts else 0
    gone = cancelled() if gone is None else gone  # cancelled prompts' candidates: nothing is left to pick for
    steps = [[[] if p in gone else split_steps(t, settings.step_delimiter) for t in row] for p, row in enumerate(texts)]
    if verifier is None:
        return steps, [[float("nan")] * n for _ in range(P)], [[[] for _ in range(n)] for _ in range(P)], 0, 0.0
    scored = verifier.score_steps(list(prompts), steps, agg=settings.agg)
    return (steps, scored.aggregate.reshape(P, n).tolist(), scored.step_scores, scored.tokens,
            count_flops(verifier.flop_module, scored.tokens, int(scored.keys)))


def sampling_loop(policy, settings: Settings, *, capacity: int = 0) -> SampleLoop:
    """The decode loop of the sampling strategies under ``settings``' sampling fields."""
    s = settings
    return SampleLoop(policy, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                      top_k=s.top_k, min_p=s.min_p, stop=list(s.stop) or None, sync_every=s.sync_every,
                      thinking=s.thinking, capacity=capacity)


def group_results(rules: dict[str, str], policy, verifier, done: list[tuple[SampleGroup, GroupSample]], *,
                  settings: Settings, extract) -> list[dict[str, SearchResult]]:
    """Finished sampling groups' candidates, scored by ``verifier`` in one call (``None``: not scored) and picked
    by each of ``rules`` (result name -> ``"best"``, ``"majority"`` or ``"weighted"``): per group, one result per
    rule, all with the same candidates and the group's compute. The policy side of that compute is the group's
    own; the verifier's tokens and FLOPs are the group's own when it is scored alone, else its share of the
    call by its prompts' and candidates' policy tokens."""
    if len({g.n for g, _ in done}) > 1:
        raise ValueError("groups scored together must have the same n")
    prompts, texts, gone, at = [], [], set(), 0
    now = cancelled()
    for g, out in done:
        P = len(g.prompts)
        gone |= {at + p - g.first for p in now if g.first <= p < g.first + P}
        prompts += g.prompts
        texts += out.texts
        at += P
    steps, scores, step_scores, prm_tokens, prm_flops = score_texts(verifier, prompts, texts, settings=settings,
                                                                    gone=gone)
    weight = [out.prefill + sum(len(x) for row in out.ids for x in row) for _, out in done]
    results, at = [], 0
    for (g, out), w in zip(done, weight):
        n, P = g.n, len(g.prompts)
        share = 1.0 if len(done) == 1 else w / max(sum(weight), 1)
        ids, fins, thought = out.ids, out.finish, out.thinking
        cands = [[Candidate(text=out.texts[p][j], answer=extract(out.texts[p][j]), score=scores[at + p][j],
                            finish=fins[p][j], steps=steps[at + p][j], step_scores=list(step_scores[at + p][j]),
                            token_ids=ids[p][j], thinking_tokens=None if thought is None else thought[p][j])
                  for j in range(n)] for p in range(P)]
        at += P
        compute = Compute(policy_prefill_tokens=out.prefill,
                          policy_generated_tokens=sum(len(x) for row in ids for x in row),
                          prm_tokens=round(prm_tokens * share),
                          policy_flops=count_flops(policy.model, out.forward, out.keys),
                          prm_flops=prm_flops * share, thinking_tokens=sum(map(sum, thought)) if thought else 0)
        res = {}
        for name, rule in rules.items():
            chosen, answers = select_candidates(cands, rule, policy.device, settings.vote_key)
            res[name] = SearchResult(strategy=name, budget=n, predictions=answers, chosen=chosen, candidates=cands,
                                     compute=compute, samples=n * P, info={"policy_forward_tokens": out.forward})
        results.append(res)
    return results


@in_search_pool
def sampling_results(rules: dict[str, str], policy, verifier, prompts, *, n: int, settings: Settings, seed: int,
                     extract) -> dict[str, SearchResult]:
    """One sampling run shared by several selection rules: ``rules`` maps a result name to its rule
    (``"best"``, ``"majority"``, ``"weighted"``); every result has the same candidates and compute."""
    out: dict[str, SearchResult] = {}
    done = lambda pairs: out.update(group_results(rules, policy, verifier, pairs,  # noqa: E731
                                                  settings=settings, extract=extract)[0])
    sampling_loop(policy, settings).run(SampleGroup(list(prompts), n, Seeds.of(seed, len(prompts))), done=done)
    return out


@in_search_pool
def serve_sampling(rules: dict[str, str], policy, verifier, prompts: list[str], seeds: list[int], *, n: int, tag,
                   settings: Settings, extract, join, deliver, started=None, capacity: int) -> None:
    """Continuous batching of a sampling strategy. ``prompts`` (one seed per prompt, ``seeds``; the caller's
    ``tag``) start a decode loop of at most ``capacity`` prompts' rows; at each of its looks
    ``join(fits)`` may hand over more requests: it calls ``fits(prompts, seeds, tag)`` for each in turn,
    which returns the group they become when they fit beside what runs (else ``None``: stop there), and
    returns those groups. ``started(group)`` is called when a group's rows start (``group.first``: the
    index of its first prompt in the call's numbering, which :func:`~tts_kernels.search.cancel.cancelled`
    and the progress events use); ``deliver(group, results)`` gets its :func:`group_results` (or the
    exception scoring it raised) as soon as its rows end (the groups that end at one look are scored in one
    verifier call). All on this thread. A group's results equal :func:`sampling_results` over its prompts
    with its seeds (the verifier's compute: see :func:`group_results`)."""
    loop = sampling_loop(policy, settings, capacity=capacity * n)

    def done(pairs):  # the groups that ended at one look, scored together
        try:
            results = group_results(rules, policy, verifier, pairs, settings=settings, extract=extract)
        except Exception as exc:  # noqa: BLE001 - those groups' failure, handed to their owners; the others go on
            results = [exc] * len(pairs)
        for (g, _), res in zip(pairs, results):
            deliver(g, res)

    def groups(fits):
        def fit(p, sd, t):
            g = SampleGroup(list(p), n, Seeds(list(sd), len(p)), t)
            return g if fits(g) else None
        return join(fit)

    loop.run(SampleGroup(list(prompts), n, Seeds(list(seeds), len(prompts)), tag), done=done, join=groups,
             started=started)


@torch.no_grad()
def best_of_n(policy, verifier, prompts: Sequence[str], *, n: int, select: str = "best",
              settings: Settings | None = None, seed: int | Sequence[int] = 0,
              extract: Callable[[str], str | None] = extract_answer,
              **overrides) -> SearchResult:
    """Sample ``n`` completions per prompt, score them with ``verifier``, pick one per prompt.

    Args:
        policy: a :class:`~tts_kernels.search.protocols.Policy` (e.g. :class:`~tts_kernels.models.HFPolicy`).
        verifier: a :class:`~tts_kernels.search.protocols.Verifier` (e.g. :class:`~tts_kernels.models.HFPRM`),
            or ``None`` (``select="majority"`` only; candidates are then not scored).
        prompts: ``P`` prompt strings.
        n: samples per prompt.
        select: ``"best"`` (best-of-N: the best aggregate score), ``"majority"`` (the most frequent
            answer) or ``"weighted"`` (the answer with the largest summed score).
        settings: :class:`~tts_kernels.search.Settings`; keyword ``overrides`` change single fields
            (``temperature``, ``top_p``, ``top_k``, ``min_p``, ``max_new_tokens``, ``stop``, ``agg``,
            ``step_delimiter``, ``sync_every`` are read).
        seed: the sampling seed, or one per prompt (:mod:`~tts_kernels.search.seeds`).
        extract: the answer of a completion text (default: ``\\boxed{X}`` / ``The answer is X``).

    Returns a :class:`~tts_kernels.search.SearchResult`; ``info["policy_forward_tokens"]`` counts
    every token position the policy ran.
    """
    s = resolve(settings, overrides)
    check_prompts(prompts)
    check_int("n", n, minimum=1)
    _check_select(select, verifier)
    return sampling_results({"best_of_n": select}, policy, verifier, list(prompts), n=n, settings=s, seed=seed,
                            extract=extract)["best_of_n"]
