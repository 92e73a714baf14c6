"""Particle filtering over reasoning steps, batched over prompts, resampling as a fork of KV histories.

After Puri et al. 2025 ("A Probabilistic Inference Approach to Inference-Time Scaling of LLMs
using Particle-Based Monte Carlo Methods"), read for its meaning; the waste is removed as in the
step searches (:mod:`~tts_kernels.search.step_search`): all prompts in one batch, histories kept
in the paged cache and forked, the verifier scoring only each new step. Both are policies over the
same rows (:class:`~tts_kernels.search.rows.StepRows`): a resample is a fork, particle Gibbs's
references are parked rows, and a reference drawn part-way is a copy rolled back.

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
* ``"ess"``, ``"entropy"``, ``"base"``: Giannone et al.'s schedules (the variants of its_hub's
  entropic particle filtering, same formulas). With progress ``pi = (t + 1) / I`` after iteration
  ``t`` of ``I``, the plain weights' ESS ratio ``r = ESS / N`` and normalised entropy ``H``, and only
  while ``r < anneal_below`` and ``pi < early_phase`` (else ``T = weight_temperature``):
  ``T = weight_temperature * max(1, (1 - pi) / r)`` (``"ess"``),
  ``T = weight_temperature * max(1, 1 / (H + (1 - H) pi))`` (``"entropy"``),
  ``T = weight_temperature * max(1, 2 - pi)`` (``"base"``). (its_hub clips the probabilities at
  ``1e-7`` before ESS and entropy and leaves the entropy unnormalised for ``N <= 2``; these do not.)
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
from ..ops.resample import entropic_temperature, ess, normalized_entropy, normalized_weights, resample, uniforms
from ..ops.select import select_best, weighted_vote
from .answers import answer_ids, extract_answer, vote_key
from .cancel import cancelled
from .result import Candidate, SearchResult
from .rows import History, StepRows
from .step_loop import alone, serve_groups
from .seeds import Seeds
from .settings import Settings, resolve
from .validate import check_prompts

_RESAMPLE_OFFSET = 1 << 40  # resampling's uniforms: a counter range tokens never reach
_LOGIT_EPS = 1e-6


def _log_weights(rows: StepRows, kind: str) -> torch.Tensor:
    """``[rows]`` float64 log-weights of the live rows (``-inf`` where nothing was scored yet)."""
    if kind == "self_certainty":
        mean = rows.logprob_sum.double() / rows.logprob_count.clamp(min=1)
        return torch.where(rows.logprob_count > 0, mean, float("-inf"))
    a = rows.prm.aggregate.double()
    p = a.clamp(_LOGIT_EPS, 1 - _LOGIT_EPS)
    return torch.where(torch.isnan(a), float("-inf"), torch.log(p) - torch.log1p(-p))


def _temperature(lw: torch.Tensor, s: Settings, it: int | torch.Tensor) -> torch.Tensor:
    """``[P]`` float64 resampling temperatures of ``lw [P, N]``, each row at its own iteration ``it [P]``."""
    base = torch.full((lw.shape[0],), s.weight_temperature, dtype=torch.float64, device=lw.device)
    if s.entropic == "adaptive":
        return base * entropic_temperature(lw / base[:, None], s.entropy_target)
    if s.entropic == "annealed":
        return base * (s.num_iterations / (it + 1))
    if s.entropic in ("ess", "entropy", "base"):
        N = lw.shape[1]
        progress = (it + 1) / s.num_iterations
        r = ess(lw) / N
        if s.entropic == "ess":
            T = (1 - progress) / r
        elif s.entropic == "entropy":
            h = normalized_entropy(lw)
            T = 1 / (h + (1 - h) * progress)
        else:
            T = (2.0 - progress) + torch.zeros_like(r)
        on = (r < s.anneal_below) & (progress < s.early_phase)
        return base * torch.where(on, T.clamp(min=1.0), 1.0)
    return base


def _check(verifier, prompts, n: int, s: Settings) -> list[str]:
    if s.particle_weight == "verifier" and verifier is None:
        raise ValueError("particle_filter with particle_weight='verifier' needs a verifier "
                         "(particle_weight='self_certainty' runs without one)")
    prompts = check_prompts(prompts)
    check_int("n", n, minimum=1)
    return prompts


@torch.no_grad()
@in_search_pool
def particle_filter(policy, verifier, prompts: Sequence[str], *, n: int, settings: Settings | None = None,
                    seed: int | Sequence[int] = 0, extract: Callable[[str], str | None] = extract_answer,
                    **overrides) -> SearchResult:
    """Particle filtering with ``n`` particles per prompt (see the module docstring).

    Settings read: ``num_iterations``, ``step_delimiter``, ``max_step_tokens``, ``max_new_tokens``,
    ``agg``, ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``sync_every`` (as the step searches),
    and ``resampling``, ``ess_threshold``, ``particle_weight``, ``particle_select``,
    ``weight_temperature``, ``entropic``, ``entropy_target``, ``anneal_below``, ``early_phase``,
    ``keep_best``.

    Returns a :class:`~tts_kernels.search.SearchResult` whose candidates are the final population
    (``n`` per prompt; resampled copies appear more than once) and whose ``prompt_info`` holds
    each prompt's final normalised ``weights``, the steps at which it ``resampled`` and its
    ``ess`` before each resampling decision.
    """
    s = resolve(settings, overrides)
    prompts = _check(verifier, prompts, n, s)
    seed = Seeds.of(seed, len(prompts))
    done, lw, compute, info = _sweep(policy, verifier, prompts, s, n=n, seed=seed, sweep=0, refs=None,
                                     extract=extract, cancelled=cancelled)
    return _result("particle_filtering", _candidates(done), lw, s, seed, compute, info)


@torch.no_grad()
def serve_particles(name: str, policy, verifier, prompts: list[str], seeds: list[int], *, n: int, tag,
                    settings: Settings, extract, join, deliver, started=None, capacity: int) -> None:
    """Continuous batching of particle filtering (``name``: the strategy the results carry), as
    :func:`~tts_kernels.search.step_search.serve_steps` for the step searches: requests join at step boundaries,
    each prompt resampling at its own iterations under its own seed, so a request gets what it gets alone; its
    compute is its own."""
    s = settings
    prompts = _check(verifier, prompts, n, s)
    search = _Particles(n, s, extract, policy.device, lambda g, done, lw, compute, info: _result(
        name, _candidates(done), lw, s, g.seeds, compute, info))
    scorer, rows_kw = _weighing(verifier, s)
    serve_groups(search, policy, scorer, prompts, seeds, s=s, tag=tag, join=join, deliver=deliver, started=started,
                 capacity=capacity, rows_kw=rows_kw)


@torch.no_grad()
@in_search_pool
def particle_gibbs(policy, verifier, prompts: Sequence[str], *, n: int, settings: Settings | None = None,
                   seed: int | Sequence[int] = 0, extract: Callable[[str], str | None] = extract_answer,
                   **overrides) -> SearchResult:
    """Particle Gibbs: ``sweeps`` particle-filter passes of ``n // sweeps`` particles each; after a pass,
    ``reference_particles`` of its final particles are drawn by weight (multinomial) and carried into
    the next, where they hold the last slots of every prompt's population.

    Each step of a later pass, the free particles grow one step and ``N - R`` of them are drawn from all
    ``N`` slots; a reference particle competes with its final weight (as its_hub does). A reference
    drawn at step ``t`` that has more than ``t`` steps continues as a free particle from its first
    ``t`` steps: its policy row is a fork of the reference's row rolled back on the paged cache
    (``PolicySession.truncate``: no KV bytes move, the kept last token runs again), its verifier row
    re-scores those ``t`` steps from the prompt (the verifier's running state is exact, whatever the
    head). One that has finished within ``t`` steps is copied as it is. The answer comes from the last
    pass's population (``particle_select``).

    Settings read: those of :func:`particle_filter` and ``sweeps``, ``reference_particles``.
    ``n`` must be a multiple of ``sweeps``; ``reference_particles < n // sweeps``; weights from the
    verifier. ``prompt_info`` holds each pass's ``resampled`` steps, ``ess`` and the ``references``
    drawn after it (slot indices), and the final ``weights``.
    """
    s = resolve(settings, overrides)
    prompts = _check(verifier, prompts, n, s)
    if s.particle_weight != "verifier":
        raise ValueError("particle_gibbs weighs particles by the verifier (particle_weight='verifier'): a rolled-back "
                         "reference particle's weight is re-scored from its steps")
    if s.thinking is not None:
        raise ValueError("particle_gibbs does not take Settings.thinking: a rolled-back reference particle's "
                         "thinking state is not rolled back with it")
    if n % s.sweeps:
        raise ValueError(f"n ({n}) must be a multiple of sweeps ({s.sweeps}): each sweep runs n // sweeps particles")
    N, R = n // s.sweeps, s.reference_particles
    if R >= N:
        raise ValueError(f"reference_particles ({R}) must be smaller than the particles per sweep "
                         f"(n // sweeps = {N})")
    seed = Seeds.of(seed, len(prompts))
    info = [{"sweeps": []} for _ in prompts]
    refs, compute = None, None
    for sweep in range(s.sweeps):
        done, lw, c, part = _sweep(policy, verifier, prompts, s, n=N, seed=seed, sweep=sweep, refs=refs,
                                   extract=extract, cancelled=cancelled)
        compute = c if compute is None else compute + c
        if sweep < s.sweeps - 1 and R:
            key, stream = seed.prompts(lw.device)
            pick = resample(lw, method="multinomial", seed=key, offset=_RESAMPLE_OFFSET - 2 - sweep,
                            temperature=s.weight_temperature, num_samples=R, stream=stream).tolist()
            lw_h = lw.tolist()
            # (A cancelled prompt's dropped particle, drawn only when it has nothing else: an empty stand-in.)
            empty = (Candidate(text="", answer=None, finish="empty"), ([], []), float("-inf"))
            refs = [[(done[p][i][0], done[p][i][1], lw_h[p][i]) if done[p][i] is not None else empty
                     for i in pick[p]] for p in range(len(prompts))]
            for p in range(len(prompts)):
                part[p]["references"] = pick[p]
        for p in range(len(prompts)):
            info[p]["sweeps"].append(part[p])
    return _result("particle_gibbs", _candidates(done), lw, s, seed, compute, info, budget=n)


class _Particles:
    """Particle filtering as the step loop's search (:class:`~tts_kernels.search.step_loop.StepSearch`): ``n``
    slots per prompt, the last ``R`` of them ``refs[p]`` (candidate, (completion token ids, tokens per step),
    final log-weight) when given (particle Gibbs: parked rows, which the loop's rows start with). Per prompt
    it holds each slot's finished particle (``done``), a row of the log-weights (``lw [prompts held, n]``:
    a prompt's row is dropped when its group's result is taken, so a long continuous call holds only its
    running prompts') and its ``info``. ``make(group, done, lw, compute, info)``: an ended group's result."""

    reports = True

    def __init__(self, n: int, s: Settings, extract, device, make, *, sweep: int = 0, refs=None):
        self.N, self.s, self.extract, self.device, self.make = n, s, extract, device, make
        self.refs = refs
        self.R = len(refs[0]) if refs else 0
        self.width = n - self.R  # free slots: a prompt's rows at its start
        self.weight = s.particle_weight
        self.off = _RESAMPLE_OFFSET + (sweep << 12)  # each sweep its own resampling draws
        self.held: list[int] = []  # the prompts whose state is held, in the order of lw's rows
        self.lw = torch.empty((0, n), dtype=torch.float64, device=device)
        self.done: dict[int, list] = {}  # (candidate, data) of the finished particle in each slot
        self.info: dict[int, dict] = {}
        self.slot_of: list[tuple[int, int]] = []  # the slot each live row fills (rows 0..)
        self.rollback: list[tuple[tuple[int, int, int], int]] = []  # ((row, prompt, reference), steps kept): to roll
        # back after the next fork (copies of references drawn part-way)

    @staticmethod
    def parked(refs) -> list[History]:
        """The references' rows (reference ``k`` of prompt ``p``: the ``p * R + k``-th parked row)."""
        return [History(prompt=p, ids=ref[1][0], text=ref[0].text, steps=list(ref[0].steps),
                        step_scores=list(ref[0].step_scores), step_ntok=list(ref[1][1]))
                for p, mine in enumerate(refs) for ref in mine]

    def start(self, prompts: range) -> None:
        N, F = self.N, self.width
        lw = torch.full((len(prompts), N), float("-inf"), dtype=torch.float64, device=self.device)
        for i, p in enumerate(prompts):
            self.done[p] = [None] * N
            self.info[p] = {"resampled": [], "ess": []}
            for k in range(self.R):  # the parked rows know their whole history
                cand, (ids, ntok), w = self.refs[p][k]
                self.done[p][F + k] = (cand, (ids, ntok))
                lw[i, F + k] = w
        self.held += list(prompts)
        self.lw = torch.cat([self.lw, lw])
        self.slot_of += [(p, j) for p in prompts for j in range(F)]

    def choose(self, rows, finish, its, gone):
        s, N, F, R, done, slot_of = self.s, self.N, self.width, self.R, self.done, self.slot_of
        dev = self.lw.device
        at = {p: i for i, p in enumerate(self.held)}
        live_n = len(slot_of)
        flat = torch.tensor([at[p] * N + j for p, j in slot_of], dtype=torch.long, device=dev)
        self.lw.view(-1).index_copy_(0, flat, _log_weights(rows, self.weight)[:live_n])
        agg = rows.prm.aggregate.tolist() if self.weight == "verifier" else [float("nan")] * len(rows)
        last = s.num_iterations - 1
        live_rows = []
        for r in range(live_n):
            p, j = slot_of[r]
            if finish[r] is None and its[p] < last:
                live_rows.append(r)
            elif finish[r] is not None:  # it keeps its weight and its slot
                done[p][j] = (rows.candidate(r, agg[r], finish[r], self.extract),
                              (list(rows.ids[r]), list(rows.step_ntok[r])))
        self.slot_of = []
        if not live_rows:
            return []
        # Resample the prompts whose weights have collapsed (all on the device, one host look), each at its own
        # iteration: its temperature schedule and its draws' offset.
        held, lw = self.held, self.lw
        it = torch.tensor([its.get(p, 0) for p in held], dtype=torch.float64, device=dev)
        T = _temperature(lw, s, it)
        e = ess(lw, T)
        alive_h = sorted({slot_of[r][0] for r in live_rows})  # prompts with a live particle (host)
        alive = torch.zeros(len(held), dtype=torch.bool, device=dev)
        alive[torch.tensor([at[p] for p in alive_h], device=dev)] = True
        do = alive & (e < s.ess_threshold * N * (1 - 1e-9))  # (1.0: unless the weights are all equal)
        stopped = [i for i, p in enumerate(held) if p in gone]  # nobody waits for them: their particles stop
        if stopped:
            do[torch.tensor(stopped, device=dev)] = False
        key, stream = rows.seeds.prompts(dev, held)  # each prompt draws what it draws wherever it sits
        idx = resample(lw, method=s.resampling, seed=key, offset=self.off + it.long(), temperature=T,
                       num_samples=F if R else None, stream=stream)
        if s.keep_best:
            best = select_best(torch.where(torch.isinf(lw), float("nan"), lw).float())
            drawn = (idx == best[:, None]).any(1)
            idx[:, -1] = torch.where(drawn, idx[:, -1], best)
        idx = torch.where(do[:, None], idx, torch.arange(F, device=dev).expand(len(held), F))
        idx_h, do_h, e_h = idx.tolist(), do.tolist(), e.tolist()
        for p in alive_h:
            self.info[p]["ess"].append(round(e_h[at[p]], 4))
            if do_h[at[p]]:
                self.info[p]["resampled"].append(its[p])
        row_of = {slot: r for r, slot in enumerate(slot_of)}
        keep, rollback = [], []
        for i, p in enumerate(held):
            if p in gone:  # its finished particles stay; the growing ones are dropped (weight 0)
                lw[i] = torch.where(torch.tensor([d is None for d in done[p]], device=dev), float("-inf"), lw[i])
                continue
            mine = [None] * N
            for j in range(F):
                src = idx_h[i][j]
                if src >= F and len(done[p][src][0].steps) > its[p] + 1:  # a reference, rolled back
                    rollback.append(((len(keep), p, src - F), its[p] + 1))
                    keep.append(live_n + (p * R + src - F))
                    self.slot_of.append((p, j))
                elif done[p][src] is not None:
                    mine[j] = done[p][src]
                elif (p, src) in row_of and finish[row_of[(p, src)]] is None:
                    keep.append(row_of[(p, src)])
                    self.slot_of.append((p, j))
            for k in range(R):
                mine[F + k] = done[p][F + k]
            done[p] = mine
        self.lw = torch.cat([lw.gather(1, idx), lw[:, F:]], 1)  # the references keep their slots and weights
        self.rollback = rollback
        return keep

    def forked(self, rows: StepRows) -> None:
        """The copies of references drawn part-way continue from their first steps (:func:`_roll_back`)."""
        for t in sorted({t for _, t in self.rollback}):
            _roll_back(rows, [r for r, at in self.rollback if at == t], self.refs, t)
        self.rollback = []

    def result(self, group, compute):
        ps = list(group.indices)
        at = {p: i for i, p in enumerate(self.held)}
        lw = self.lw[[at[p] for p in ps]]
        rest = [i for i, p in enumerate(self.held) if p not in set(ps)]
        self.held = [self.held[i] for i in rest]
        self.lw = self.lw[rest]
        done, info = [self.done.pop(p) for p in ps], [self.info.pop(p) for p in ps]
        return self.make(group, done, lw, compute, info)


def _sweep(policy, verifier, prompts, s: Settings, *, n: int, seed: Seeds, sweep: int, refs, extract, cancelled):
    """One particle-filter pass over ``n`` slots per prompt (:class:`_Particles` on its own). Returns each
    slot's final (candidate, (token ids, tokens per step)), the ``[P, n]`` log-weights, the pass's compute and
    each prompt's info."""
    search = _Particles(n, s, extract, policy.device, lambda g, done, lw, compute, info: (done, lw, compute, info),
                        sweep=sweep, refs=refs)
    scorer, rows_kw = _weighing(verifier, s)
    return alone(policy, scorer, prompts, seed, search, s=s, cancelled=cancelled,
                 capacity=len(prompts) * (n + search.R),
                 rows_kw={**rows_kw, "parked": _Particles.parked(refs) if refs else (),
                          "offset": sweep << 24})  # each sweep its own token draws (sweep 0: particle_filter's)


def _weighing(verifier, s: Settings):
    """The verifier the rows are scored by, and what else the rows keep: under ``particle_weight="self_certainty"``
    no verifier, and each row's token log-probabilities."""
    by_verifier = s.particle_weight == "verifier"
    return (verifier if by_verifier else None), {"track_logprobs": not by_verifier}


def _roll_back(search: StepRows, rollback, refs, t: int) -> None:
    """Rows forked from parked references continue from the references' first ``t`` steps
    (:meth:`StepRows.roll_back <tts_kernels.search.rows.StepRows.roll_back>`: the policy row cut back on
    the cache, the verifier row, which holds the prompt only, scoring those steps). ``rollback``: (row,
    prompt, reference) triples; ``refs`` the references (their histories are the rows' own)."""
    if not hasattr(search.pol, "truncate"):
        raise TypeError("particle_gibbs needs a policy session with truncate(rows, lengths, tokens) "
                        "(tts_kernels.search.protocols)")
    search.roll_back([r for r, _, _ in rollback], t)


def _candidates(done) -> list[list[Candidate | None]]:
    return [[x[0] if x is not None else None for x in row] for row in done]


def _result(name: str, done, lw, s: Settings, seed: Seeds, compute, info, budget: int | None = None) -> SearchResult:
    """The search result of a final population; ``budget``: samples per prompt (default: its size)."""
    P, N = lw.shape
    budget = N if budget is None else budget
    cands = [[c if c is not None else Candidate(text="", answer=None, finish="empty") for c in row] for row in done]
    w = normalized_weights(lw, s.weight_temperature)
    if s.particle_select == "best":
        chosen = select_best(torch.where(torch.isinf(lw), float("nan"), lw).float()).tolist()
    elif s.particle_select == "weighted":
        aids = answer_ids([[c.answer for c in row] for row in cands], device=lw.device, key=vote_key(s.vote_key))
        _, chosen = weighted_vote(aids, w)
        chosen = chosen.tolist()
    else:  # "sample": one particle drawn by weight, from the resampling stream's next counter
        key, stream = seed.prompts(lw.device)
        u = uniforms(key, _RESAMPLE_OFFSET - 1, P, 1, device=lw.device, stream=stream)
        chosen = torch.searchsorted(w.cumsum(1) / w.sum(1, keepdim=True), u, right=True).clamp(max=N - 1)
        chosen = chosen[:, 0].tolist()
    w_h = w.tolist()
    for p in range(P):
        info[p]["weights"] = [round(x, 6) for x in w_h[p]]
    predictions = [cands[p][chosen[p]].answer for p in range(P)]
    if s.particle_select == "weighted":  # no answer anywhere: the vote has no winner
        chosen = [c if predictions[p] is not None else None for p, c in enumerate(chosen)]
    return SearchResult(strategy=name, budget=budget, predictions=predictions, chosen=chosen,
                        candidates=cands, compute=compute, samples=budget * P, prompt_info=info)
