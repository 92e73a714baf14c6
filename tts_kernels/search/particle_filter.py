"""Particle filtering over reasoning steps, batched over prompts, resampling as a fork of KV histories.

After Puri et al. 2025 ("A Probabilistic Inference Approach to Inference-Time Scaling of LLMs
using Particle-Based Monte Carlo Methods"), read for its meaning; the waste is removed as in the
step searches (:mod:`~tts_kernels.search.step_search`): all prompts in one batch, histories kept
in the paged cache and forked, the verifier scoring only each new step.

``N = budget`` particles per prompt. Each iteration every live particle samples one step (up to
``step_delimiter``; the last iteration generates to the end) and the verifier scores it. A
particle's log-weight is ``logit(a)`` of its aggregate step score ``a`` (the paper's choice;
``particle_weight="self_certainty"``: the mean log-probability of its tokens, no verifier needed).
Then, per prompt, when the effective sample size of ``softmax(log_weight / T)`` falls below
``ess_threshold * N``, the population is resampled (``systematic`` or ``multinomial``,
:mod:`~tts_kernels.ops.resample`): slot ``j`` takes particle ``idx[j]``, which for a live particle
is a fork of its KV history on the paged cache (no bytes move) and for a finished one a copy of
it. Finished particles (EOS, an empty step, no delimiter within ``max_step_tokens``, the last
iteration) keep their weight and stay in the population; a prompt stops when all have finished.
The answer comes from the final population (``particle_select``): the particle of the ``"best"``
weight, a ``"weighted"`` vote (answers weighted by ``softmax(log_weight / T)``), or a ``"sample"``
drawn by those weights.

Temperature ``T`` (``weight_temperature``, then ``entropic``; after Giannone et al. 2025,
"Mitigating Premature Exploitation in Particle-based Monte Carlo for Inference-Time Scaling"):

* ``"none"``: ``T = weight_temperature``;
* ``"adaptive"``: per prompt and step, the smallest ``T >= weight_temperature`` at which the
  normalised entropy ``H(softmax(log_weight / T)) / log N`` reaches ``entropy_target``
  (:func:`~tts_kernels.ops.resample.entropic_temperature`): when the weights collapse onto a
  few particles, resampling is flattened just enough to keep that much diversity;
* ``"annealed"``: ``T_t = weight_temperature * I / (t + 1)`` at iteration ``t`` of ``I``: flat
  early (exploration), the plain weights at the end (exploitation).

``keep_best``: before each resample the particle of the highest weight is guaranteed a slot
(it replaces the last drawn index when it was not drawn), so the best particle seen is never
lost to an unlucky draw, which its_hub's implementation can do at its last resample.

Everything per step is batched over prompts on the device: weights ``[P, N]``, ESS, the
temperatures, the resampling indices; the host looks once per step (the verifier needs the
step's text; the indices drive the fork). Randomness is counter-based: a run is reproducible
from its ``seed`` (tokens use offsets ``0, 1, ...``; resampling its own stream).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._threads import in_search_pool
from ..ops._validate import check_int
from ..ops.resample import entropic_temperature, ess, normalized_weights, resample, uniforms
from ..ops.select import select_best, weighted_vote
from .answers import answer_ids, extract_answer
from .result import Candidate, SearchResult
from .settings import Settings, resolve
from .step_search import _Search
from .validate import check_prompts

_RESAMPLE_OFFSET = 1 << 40  # resampling's uniforms: a counter range tokens never reach
_LOGIT_EPS = 1e-6


def _log_weights(search: _Search, kind: str) -> torch.Tensor:
    """``[rows]`` float64 log-weights of the live rows (``-inf`` where nothing was scored yet)."""
    if kind == "self_certainty":
        mean = search.lp_sum.double() / search.lp_count.clamp(min=1)
        return torch.where(search.lp_count > 0, mean, float("-inf"))
    a = search.prm.aggregate.double()
    p = a.clamp(_LOGIT_EPS, 1 - _LOGIT_EPS)
    return torch.where(torch.isnan(a), float("-inf"), torch.log(p) - torch.log1p(-p))


def _temperature(lw: torch.Tensor, s: Settings, it: int) -> torch.Tensor:
    base = torch.full((lw.shape[0],), s.weight_temperature, dtype=torch.float64, device=lw.device)
    if s.entropic == "adaptive":
        return base * entropic_temperature(lw / base[:, None], s.entropy_target)
    if s.entropic == "annealed":
        return base * (s.num_iterations / (it + 1))
    return base


def _check(verifier, prompts, n: int, s: Settings) -> list[str]:
    if s.particle_weight == "verifier" and verifier is None:
        raise ValueError("particle_filter with particle_weight='verifier' needs a verifier "
                         "(particle_weight='self_certainty' runs without one)")
    prompts = check_prompts(prompts)
    check_int("n", n, minimum=1)
    if s.stop:
        raise ValueError(f"stop={list(s.stop)!r}: stop strings apply to the sampling strategies only")
    return prompts


@torch.no_grad()
@in_search_pool
def particle_filter(policy, verifier, prompts: Sequence[str], *, n: int, settings: Settings | None = None,
                    seed: int = 0, extract: Callable[[str], str | None] = extract_answer,
                    **overrides) -> SearchResult:
    """Particle filtering with ``n`` particles per prompt (see the module docstring).

    Settings read: ``num_iterations``, ``step_delimiter``, ``max_step_tokens``, ``max_new_tokens``,
    ``agg``, ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``sync_every`` (as the step searches),
    and ``resampling``, ``ess_threshold``, ``particle_weight``, ``particle_select``,
    ``weight_temperature``, ``entropic``, ``entropy_target``, ``keep_best``.

    Returns a :class:`~tts_kernels.search.SearchResult` whose candidates are the final population
    (``n`` per prompt; resampled copies appear more than once) and whose ``prompt_info`` holds
    each prompt's final normalised ``weights``, the steps at which it ``resampled`` and its
    ``ess`` before each resampling decision.
    """
    s = resolve(settings, overrides)
    prompts = _check(verifier, prompts, n, s)
    P, N = len(prompts), n
    use_verifier = s.particle_weight == "verifier"
    search = _Search(policy, verifier if use_verifier else None, prompts, s, seed=seed, rows=P * N,
                     track_logprobs=not use_verifier)
    dev = search.pol.logits.device
    lw = torch.full((P, N), float("-inf"), dtype=torch.float64, device=dev)  # every slot's log-weight
    done: list[list[Candidate | None]] = [[None] * N for _ in range(P)]  # finished particle in a slot
    slot_of = [(p, j) for p in range(P) for j in range(N)]  # the slot each live row fills
    info = [{"resampled": [], "ess": []} for _ in range(P)]
    arange = torch.arange(N, device=dev).expand(P, N)
    try:
        search.fork([p for p in range(P) for _ in range(N)])
        for it in range(s.num_iterations):
            last = it == s.num_iterations - 1
            _, finish = search.step(last)
            flat = torch.tensor([p * N + j for p, j in slot_of], dtype=torch.long, device=dev)
            lw.view(-1).index_copy_(0, flat, _log_weights(search, s.particle_weight))
            agg = search.prm.aggregate.tolist() if use_verifier else [float("nan")] * search.rows
            live_rows = []
            for r, f in enumerate(finish):
                p, j = slot_of[r]
                if f is None:
                    live_rows.append(r)
                else:  # it keeps its weight and its slot
                    done[p][j] = search.candidate(r, agg[r], f, extract)
            if last or not live_rows:
                break
            # Resample the prompts whose weights have collapsed (all on the device, one host look).
            T = _temperature(lw, s, it)
            e = ess(lw, T)
            alive_h = sorted({slot_of[r][0] for r in live_rows})  # prompts with a live particle (host)
            alive = torch.zeros(P, dtype=torch.bool, device=dev)
            alive[torch.tensor(alive_h, device=dev)] = True
            do = alive & (e < s.ess_threshold * N * (1 - 1e-9))  # (1.0: unless the weights are all equal)
            idx = resample(lw, method=s.resampling, seed=seed, offset=_RESAMPLE_OFFSET + it, temperature=T)
            if s.keep_best:
                best = select_best(torch.where(torch.isinf(lw), float("nan"), lw).float())
                drawn = (idx == best[:, None]).any(1)
                idx[:, -1] = torch.where(drawn, idx[:, -1], best)
            idx = torch.where(do[:, None], idx, arange)
            idx_h, do_h, e_h = idx.tolist(), do.tolist(), e.tolist()
            for p in alive_h:
                info[p]["ess"].append(round(e_h[p], 4))
                if do_h[p]:
                    info[p]["resampled"].append(it)
            row_of = {slot: r for r, slot in enumerate(slot_of)}
            rows, new_slots, new_done = [], [], [[None] * N for _ in range(P)]
            for p in range(P):
                for j in range(N):
                    src = idx_h[p][j]
                    if done[p][src] is not None:
                        new_done[p][j] = done[p][src]
                    elif (p, src) in row_of and finish[row_of[(p, src)]] is None:
                        rows.append(row_of[(p, src)])
                        new_slots.append((p, j))
            lw = lw.gather(1, idx)
            done, slot_of = new_done, new_slots
            if not rows:
                break
            search.fork(rows)
        compute = search.compute()
    finally:
        search.free()
    return _result(done, lw, s, seed, compute, info)


def _result(done, lw, s: Settings, seed: int, compute, info) -> SearchResult:
    P, N = lw.shape
    cands = [[c if c is not None else Candidate(text="", answer=None, finish="empty") for c in row] for row in done]
    w = normalized_weights(lw, s.weight_temperature)
    if s.particle_select == "best":
        chosen = select_best(torch.where(torch.isinf(lw), float("nan"), lw).float()).tolist()
    elif s.particle_select == "weighted":
        _, chosen = weighted_vote(answer_ids([[c.answer for c in row] for row in cands], device=lw.device), w)
        chosen = chosen.tolist()
    else:  # "sample": one particle drawn by weight, from the resampling stream's next counter
        u = uniforms(seed, _RESAMPLE_OFFSET - 1, P, 1, device=lw.device)
        chosen = torch.searchsorted(w.cumsum(1) / w.sum(1, keepdim=True), u, right=True).clamp(max=N - 1)
        chosen = chosen[:, 0].tolist()
    w_h = w.tolist()
    for p in range(P):
        info[p]["weights"] = [round(x, 6) for x in w_h[p]]
    predictions = [cands[p][chosen[p]].answer for p in range(P)]
    if s.particle_select == "weighted":  # no answer anywhere: the vote has no winner
        chosen = [c if predictions[p] is not None else None for p, c in enumerate(chosen)]
    return SearchResult(strategy="particle_filtering", budget=N, predictions=predictions, chosen=chosen,
                        candidates=cands, compute=compute, samples=N * P, prompt_info=info)
