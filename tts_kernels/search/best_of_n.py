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

Randomness: the tokens are a pure function of (``seed``, the prompts, the sampling
parameters, ``sync_every``): the row layout after dropping finished rows is part of
the counter, so a different ``sync_every`` gives a different (equally valid) sample.

Token accounting is exact: ``info["policy_forward_tokens"]`` counts every token the policy
model ran (prompts once each, one per live row per decode step, including rows that
finished since the last look; the policy FLOPs are computed from it), ``compute.prm_tokens``
every token the verifier ran.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._threads import in_search_pool
from ..models.text import cut_at_stop, split_steps
from ..ops._validate import check_int
from ..ops.sample import sample
from ..ops.thinking import ThinkingState, thinking_logits, thinking_update
from .accounting import Compute, count_flops
from .answers import extract_answer
from .cancel import cancelled, listening, report
from .result import SELECT_RULES, Candidate, SearchResult, select_candidates
from .seeds import Seeds, engine_seeds
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
    keys = Seeds.of(seed, len(prompts))
    tok = policy.tokenizer
    P = len(prompts)
    R = P * n
    session = policy.start([policy.encode(p) for p in prompts], rows_hint=R, max_new_tokens=max_new_tokens)
    dev = session.logits.device
    try:
        session.fork(torch.arange(P, device=dev).repeat_interleave(n))
        eos = torch.tensor(policy.eos_token_ids or [-1], device=dev)
        out = torch.full((R, max_new_tokens), -1, dtype=torch.long, device=dev)
        live = torch.arange(R, device=dev)  # original row of each batch row
        done = torch.zeros(R, dtype=torch.bool, device=dev)  # per batch row
        seed_t, stream = keys.rows(live // n, live % n, dev)  # (prompt, candidate) of each row
        rule = None if thinking is None else thinking.rule(tok, policy.eos_token_ids, dev)
        if rule is not None:
            think = ThinkingState.start(R, dev)
            thought = torch.zeros(R, dtype=torch.int64, device=dev)  # per original row
        if hasattr(session, "generate"):  # a text-level engine (e.g. vLLM) samples whole completions itself
            if rule is not None:
                raise ValueError("Settings.thinking runs inside this package's decode loop; a text-level engine "
                                 "(the vLLM backend) does not take it")
            outs = session.generate(None, max_tokens=max_new_tokens, stop=list(stop or []),
                                    temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                                    min_p=float(min_p), logprobs=False, seeds=engine_seeds(seed_t, stream, 0, R))
            for r, (row, _, _) in enumerate(outs):
                out[r, : len(row)] = torch.tensor(row[:max_new_tokens], dtype=torch.long, device=dev)
        else:
            offset = torch.zeros((), dtype=torch.int64, device=dev)
            looked = 0  # the step after the last look (progress reports the tokens since)
            for step in range(max_new_tokens):
                logits = session.logits if rule is None else thinking_logits(session.logits, think, rule)
                tokens, _ = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                   seed=seed_t, offset=offset, stream=stream)
                offset += 1
                out[live, step] = torch.where(done, -1, tokens)
                if rule is not None:
                    think = thinking_update(think, tokens, rule, active=~done)
                    thought.index_copy_(0, live, think.thought)
                done |= torch.isin(tokens, eos)
                last = step == max_new_tokens - 1
                if (step + 1) % sync_every == 0 or last:
                    done_h = done.tolist()  # the host looks: once every sync_every steps
                    rows_h = live.tolist()
                    if listening():  # progress: each row's tokens since the last look (-1: after its end)
                        report("tokens", {"rows": [(r // n, r % n) for r in rows_h],
                                          "ids": out[live, looked: step + 1].tolist()})
                        looked = step + 1
                    gone = cancelled()
                    if gone:  # prompts nobody waits for any more: their rows leave the batch here
                        done_h = [d or r // n in gone for d, r in zip(done_h, rows_h)]
                    if stop:
                        texts = tok.batch_decode(_rows_tokens(out[live, : step + 1].tolist(), eos_set(policy)),
                                                 skip_special_tokens=True)
                        for j, text in enumerate(texts):
                            if not done_h[j] and any(s in text for s in stop):
                                done_h[j] = True
                    if last:
                        break
                    keep = [j for j, d in enumerate(done_h) if not d]
                    if not keep:
                        break
                    if len(keep) < len(rows_h):
                        idx = torch.tensor(keep, device=dev)
                        session.fork(idx)
                        live = live.index_select(0, idx)
                        seed_t, stream = keys.rows(live // n, live % n, dev)
                        tokens = tokens.index_select(0, idx)
                        if rule is not None:
                            think = think.select(idx)
                        done = torch.zeros(len(keep), dtype=torch.bool, device=dev)
                # Rows that finished since the last look still run until the next one (no sync to
                # find them); their tokens are not recorded.
                session.decode(tokens)
        policy_tokens = session.tokens
        if stats is not None:
            stats["keys"] = int(session.keys)
            stats["prefill"] = session.prefill_tokens
            if rule is not None:
                stats["thinking"] = [thought.tolist()[i * n:(i + 1) * n] for i in range(P)]
    finally:
        session.free()
    eos_ids = eos_set(policy)
    ids_all = out.tolist()
    texts, ids, fins = [], [], []
    for r in range(R):
        row = [t for t in ids_all[r] if t >= 0]
        cut = next((i for i, t in enumerate(row) if t in eos_ids), None)
        if cut is not None:
            row, fin = row[: cut + 1], "eos"
        else:
            fin = "length"
        text = tok.decode([t for t in row if t not in eos_ids], skip_special_tokens=True)
        if stop and fin != "eos":
            cut = cut_at_stop(text, stop)
            if cut is not None:
                text, fin = cut, "stop"
        texts.append(text)
        ids.append(row)
        fins.append(fin)
    group = lambda xs: [xs[i * n:(i + 1) * n] for i in range(P)]  # noqa: E731
    return group(texts), group(ids), group(fins), policy_tokens


def eos_set(policy) -> set[int]:
    return set(policy.eos_token_ids)


def _rows_tokens(rows: list[list[int]], eos: set[int]) -> list[list[int]]:
    return [[t for t in row if t >= 0 and t not in eos] for row in rows]


def _check_select(select: str, verifier) -> None:
    if select not in SELECT_RULES:
        raise ValueError(f"select must be one of {SELECT_RULES}, got {select!r}")
    if select != "majority" and verifier is None:
        raise ValueError(f"select={select!r} needs a verifier (only 'majority' runs without one)")


def score_texts(verifier, prompts, texts: list[list[str]], *, settings: Settings):
    """``texts [P][n]`` split into steps by ``settings.step_delimiter`` and scored as completions of
    ``prompts`` (one verifier call; ``verifier=None``: not scored; cancelled prompts' texts are not
    scored either): ``(steps, scores [P][n], step_scores, prm_tokens, prm_flops)``."""
    P, n = len(prompts), len(texts[0]) if texts else 0
    gone = cancelled()  # cancelled prompts' candidates are not scored (nothing is left to pick for)
    steps = [[[] if p in gone else split_steps(t, settings.step_delimiter) for t in row] for p, row in enumerate(texts)]
    if verifier is None:
        return steps, [[float("nan")] * n for _ in range(P)], [[[] for _ in range(n)] for _ in range(P)], 0, 0.0
    scored = verifier.score_steps(list(prompts), steps, agg=settings.agg)
    return (steps, scored.aggregate.reshape(P, n).tolist(), scored.step_scores, scored.tokens,
            count_flops(verifier.flop_module, scored.tokens, int(scored.keys)))


def sample_and_score(policy, verifier, prompts: Sequence[str], *, n: int, settings: Settings, seed: int,
                     extract: Callable[[str], str | None]) -> tuple[list[list[Candidate]], Compute, int]:
    """``n`` sampled candidates per prompt, split into steps by ``settings.step_delimiter`` and
    scored by ``verifier`` when it is not ``None``: ``(candidates [P][n], compute, policy forward
    tokens)``. The shared first half of every sampling strategy."""
    s = settings
    stats: dict = {}
    texts, ids, fins, forward_tokens = sample_completions(
        policy, prompts, n, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        min_p=s.min_p, stop=list(s.stop) or None, seed=seed, sync_every=s.sync_every, stats=stats,
        thinking=s.thinking)
    P = len(prompts)
    steps, scores, step_scores, prm_tokens, prm_flops = score_texts(verifier, prompts, texts, settings=s)
    thought = stats.get("thinking")
    cands = [[Candidate(text=texts[p][j], answer=extract(texts[p][j]), score=scores[p][j], finish=fins[p][j],
                        steps=steps[p][j], step_scores=list(step_scores[p][j]), token_ids=ids[p][j],
                        thinking_tokens=None if thought is None else thought[p][j])
              for j in range(n)] for p in range(P)]
    generated = sum(len(x) for row in ids for x in row)
    compute = Compute(policy_prefill_tokens=stats["prefill"], policy_generated_tokens=generated, prm_tokens=prm_tokens,
                      policy_flops=count_flops(policy.model, forward_tokens, stats["keys"]), prm_flops=prm_flops,
                      thinking_tokens=sum(map(sum, thought)) if thought else 0)
    return cands, compute, forward_tokens


@in_search_pool
def sampling_results(rules: dict[str, str], policy, verifier, prompts, *, n: int, settings: Settings, seed: int,
                     extract) -> dict[str, SearchResult]:
    """One sampling run shared by several selection rules: ``rules`` maps a result name to its rule
    (``"best"``, ``"majority"``, ``"weighted"``); every result has the same candidates and compute."""
    cands, compute, forward = sample_and_score(policy, verifier, prompts, n=n, settings=settings, seed=seed,
                                               extract=extract)
    out = {}
    for name, rule in rules.items():
        chosen, answers = select_candidates(cands, rule, policy.device, settings.vote_key)
        out[name] = SearchResult(strategy=name, budget=n, predictions=answers, chosen=chosen, candidates=cands,
                                 compute=compute, samples=n * len(prompts), info={"policy_forward_tokens": forward})
    return out


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
