"""Best-of-N with a PRM, majority and weighted voting, on the paged KV cache.

``best_of_n(policy, prm, prompts, n, ...)`` samples ``n`` completions per prompt and
picks one per prompt three ways: the best PRM aggregate (best-of-N), the most
frequent answer (majority vote), and the answer with the largest summed PRM score
(weighted best-of-N). What it does differently from the usual transformers recipe
(``generate(do_sample=True, num_return_sequences=n)`` then one PRM forward per full
candidate):

* each prompt is prefilled once, then forked ``n`` times on the paged cache (no
  copies; ``generate()`` prefills it ``n`` times);
* every step samples all rows with the fused :func:`~tts_kernels.sample` (per-row
  counter-based randomness, offsets advanced on the device): no host sync per token;
* the host looks every ``sync_every`` steps, to stop rows at EOS or a stop string and
  drop finished rows from the batch (so they cost nothing afterwards);
* the PRM prefills each prompt once too, forks per candidate and runs only the
  completions' tokens (:class:`~tts_kernels.models.HFPRM`);
* selection and voting are device ops over ``[P, n]``.

Randomness: the tokens are a pure function of (``seed``, the prompts, the sampling
parameters, ``sync_every``): the row layout after dropping finished rows is part of
the counter, so a different ``sync_every`` gives a different (equally valid) sample.

Token accounting is exact: ``policy_tokens`` counts every token the policy model ran
(prompts once each, one per live row per decode step, including rows that finished
since the last look), ``prm_tokens`` every token the PRM ran.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..ops.sample import sample
from ..ops.select import majority_vote, select_best, weighted_vote
from .accounting import Compute, count_flops
from .answers import answer_ids, extract_answer


@dataclass
class Candidate:
    text: str
    token_ids: list[int]
    finish: str  # "eos", "stop" or "length"
    answer: str | None
    step_scores: list[float] = field(default_factory=list)
    score: float = float("nan")  # PRM aggregate


@dataclass
class BestOfNResult:
    candidates: list[list[Candidate]]  # [P][n]
    scores: torch.Tensor  # [P, n] PRM aggregates (NaN without a PRM)
    answer_ids: torch.Tensor  # [P, n] per-row answer ids (-1: none)
    best_index: list[int]  # best-of-N: candidate with the best aggregate
    best_of_n: list[str | None]  # its answer
    majority: list[str | None]
    weighted: list[str | None]
    policy_tokens: int
    prm_tokens: int
    compute: Compute | None = None  # prefill / generated / PRM tokens and the FLOP estimate


def _check(prompts, n, max_new_tokens, sync_every, stop):
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be strings")
    for name, v, lo in (("n", n, 1), ("max_new_tokens", max_new_tokens, 1), ("sync_every", sync_every, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop)):
        raise ValueError("stop must be a list of non-empty strings")


@torch.no_grad()
def sample_completions(policy, prompts: Sequence[str], n: int, *, max_new_tokens: int, temperature=1.0,
                       top_p=1.0, top_k=0, min_p=0.0, stop: Sequence[str] | None = None, seed: int = 0,
                       sync_every: int = 8, stats: dict | None = None):
    """``n`` sampled completions per prompt: ``(texts [P][n], token ids [P][n], finish [P][n], policy tokens)``.

    ``stats`` (a dict, optional) receives ``prefill`` (prompt tokens) and ``keys`` (keys
    attended, summed over every token run: the attention part of the FLOP estimate)."""
    _check(prompts, n, max_new_tokens, sync_every, stop)
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
        seed_t = torch.tensor(seed, dtype=torch.int64, device=dev)
        offset = torch.zeros((), dtype=torch.int64, device=dev)
        for step in range(max_new_tokens):
            tokens, _ = sample(session.logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               seed=seed_t, offset=offset)
            offset += 1
            out[live, step] = torch.where(done, -1, tokens)
            done |= torch.isin(tokens, eos)
            last = step == max_new_tokens - 1
            if (step + 1) % sync_every == 0 or last:
                done_h = done.tolist()  # the host looks: once every sync_every steps
                rows_h = live.tolist()
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
                    tokens = tokens.index_select(0, idx)
                    done = torch.zeros(len(keep), dtype=torch.bool, device=dev)
            # Rows that finished since the last look still run until the next one (no sync to
            # find them); their tokens are not recorded.
            session.decode(tokens)
        policy_tokens = session.tokens
        if stats is not None:
            stats["keys"] = int(session.keys)
            stats["prefill"] = session.prefill_tokens
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
            hits = [(text.find(s), s) for s in stop if s in text]
            if hits:
                pos, s = min(hits)
                text, fin = text[: pos + len(s)], "stop"
        texts.append(text)
        ids.append(row)
        fins.append(fin)
    group = lambda xs: [xs[i * n:(i + 1) * n] for i in range(P)]  # noqa: E731
    return group(texts), group(ids), group(fins), policy_tokens


def eos_set(policy) -> set[int]:
    return set(policy.eos_token_ids)


def _rows_tokens(rows: list[list[int]], eos: set[int]) -> list[list[int]]:
    return [[t for t in row if t >= 0 and t not in eos] for row in rows]


def best_of_n(policy, prm, prompts: Sequence[str], n: int, *, max_new_tokens: int, temperature=1.0, top_p=1.0,
              top_k=0, min_p=0.0, stop: Sequence[str] | None = None, agg: str = "last", seed: int = 0,
              extract: Callable[[str], str | None] = extract_answer, sync_every: int = 8) -> BestOfNResult:
    """Sample ``n`` completions per prompt, score them with ``prm``, and select.

    Args:
        policy: an :class:`~tts_kernels.models.HFPolicy` (or any object with its protocol).
        prm: an :class:`~tts_kernels.models.HFPRM` (or any object with ``score(prompts,
            completions, agg=) -> (step_scores, aggregate, tokens)``), or ``None`` for
            majority voting only.
        prompts: ``P`` prompt strings.
        n: samples per prompt.
        max_new_tokens, temperature, top_p, top_k, min_p: sampling (see :func:`tts_kernels.sample`).
        stop: strings that end a completion (kept in its text), besides EOS.
        agg: how step scores fold into a candidate's score: ``last``, ``min``, ``prod``, ``mean``.
        seed: the sampling seed.
        extract: answer of a completion text (default: ``\\boxed{X}`` / ``The answer is X``).
        sync_every: decode steps between host looks (stop checks and dropping finished rows).
    """
    stats: dict = {}
    texts, ids, fins, policy_tokens = sample_completions(
        policy, prompts, n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=min_p, stop=stop, seed=seed, sync_every=sync_every, stats=stats)
    P = len(prompts)
    answers = [[extract(t) for t in row] for row in texts]
    dev = policy.device
    aids = answer_ids(answers, device=dev)
    if prm is not None:
        scored = prm.score(list(prompts), texts, agg=agg)
        scores = scored.aggregate.reshape(P, n).to(dev)
        step_scores, prm_tokens = scored.step_scores, scored.tokens
        prm_flops = count_flops(prm.flop_module, prm_tokens, scored.keys) if hasattr(prm, "flop_module") else 0.0
    else:
        scores = torch.full((P, n), float("nan"), device=dev)
        step_scores, prm_tokens, prm_flops = [[[] for _ in range(n)] for _ in range(P)], 0, 0.0
    best = select_best(scores)
    maj_ans, maj_idx = majority_vote(aids)
    w_ans, w_idx = weighted_vote(aids, scores)
    best_h, maj_h, w_h = best.tolist(), maj_idx.tolist(), w_idx.tolist()
    maj_a, w_a = maj_ans.tolist(), w_ans.tolist()
    scores_h = scores.tolist()
    cands = [[Candidate(text=texts[p][j], token_ids=ids[p][j], finish=fins[p][j], answer=answers[p][j],
                        step_scores=step_scores[p][j], score=scores_h[p][j]) for j in range(n)] for p in range(P)]
    return BestOfNResult(
        candidates=cands, scores=scores, answer_ids=aids, best_index=best_h,
        best_of_n=[answers[p][best_h[p]] for p in range(P)],
        majority=[answers[p][maj_h[p]] if maj_a[p] >= 0 else None for p in range(P)],
        weighted=[answers[p][w_h[p]] if w_a[p] >= 0 else None for p in range(P)],
        policy_tokens=policy_tokens, prm_tokens=prm_tokens,
        compute=Compute(policy_prefill_tokens=stats["prefill"],
                        policy_generated_tokens=sum(len(x) for row in ids for x in row), prm_tokens=prm_tokens,
                        policy_flops=count_flops(policy.model, policy_tokens, stats["keys"]), prm_flops=prm_flops))
