"""The one entry point: ``run(strategy, policy, verifier, prompts, budget=N)`` over a registry of strategies.

Every strategy takes the same arguments and returns a :class:`~tts_kernels.search.SearchResult`.
``budget`` means the same for all of them: samples (completions, beams, particles) **per
prompt**, on average. ``demo``, ``eval`` and the server list and run what is registered here,
so a strategy added with :func:`register_strategy` shows up in all of them.

Built-in strategies (``settings`` fields in :class:`~tts_kernels.search.Settings`):

* ``greedy`` — one greedy completion (the budget is ignored: always 1).
* ``majority``, ``best_of_n``, ``weighted_best_of_n`` — ``N`` sampled completions, then the most
  frequent answer, the verifier's best completion, or the answer with the largest summed score.
  ``majority`` alone runs without a verifier; :func:`run_together` runs the three on one shared
  set of samples (same candidates, same compute).
* ``prm_beam_search``, ``dvts`` — step-level searches with ``N`` beams and beam width
  ``min(settings.beam_width, N)``.
* ``compute_optimal`` — the whole budget ``N * P`` spent by :func:`~tts_kernels.search.compute_optimal`:
  a best-of-``N/4`` pilot (kept in the final pick), difficulty from it (calibrated with
  ``settings.optimal_table``), the rest allocated over the prompts where it raises expected accuracy
  most, each prompt searched by the strategy its table row (level, samples) names (without a table:
  weighted best-of-N for easier and PRM beam search for harder prompts).
* ``adaptive_best_of_n`` — the same pilot and allocation with weighted best-of-N at every level:
  against uniform ``weighted_best_of_n`` it measures allocation alone at equal sample budget.
* ``particle_filtering`` — ``N`` particles per prompt, resampled by verifier weight as they grow
  step by step (:func:`~tts_kernels.search.particle_filter`); ``entropic_particle_filtering`` — the
  same with entropy-targeting resampling temperatures (``settings.entropic``, default ``"adaptive"``);
  ``particle_gibbs`` — ``settings.sweeps`` passes of ``N / sweeps`` particles, each carrying
  ``settings.reference_particles`` of the last pass's particles (:func:`~tts_kernels.search.particle_gibbs`;
  fitted to the budget: ``gcd(N, sweeps)`` sweeps, at most ``N / sweeps - 1`` references).
* ``revise`` — sequential revisions (:func:`~tts_kernels.search.revise`): ``N // (revisions + 1)`` chains,
  each answer fed back with ``settings.revision_prompt`` ``revisions`` times (fewer when the budget is
  smaller; a budget that ``revisions + 1`` does not divide spends its largest multiple); the weighted
  vote over every attempt (majority without a verifier).
* ``rebase`` — reward-balanced tree search (:func:`~tts_kernels.search.rebase.rebase`, Wu et al. 2024): a
  prompt's width ``N`` split over its live nodes by ``softmax(score / settings.rebase_temperature)`` at every
  depth, each finished node one of the ``N`` completed leaves; the weighted vote over them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ..ops._validate import check_int
from .answers import extract_answer
from .best_of_n import best_of_n, sampling_results, serve_sampling
from .compute_optimal import OptimalStrategy
from .early_stop import adaptive_consistency, deepconf, deepconf_offline, serve_early, speculative_rejection
from .particle_filter import particle_filter, particle_gibbs, serve_particles
from .rebase import rebase, serve_rebase
from .registry import STRATEGIES, GroupFn, Strategy, StrategyFn, register_strategy  # noqa: F401 (re-exported)
from .registry import check_strategy as _check
from .result import SearchResult
from .revise import revise, serve_revise
from .seeds import check_seed
from .settings import Settings, resolve
from .step_search import dvts, prm_beam_search, serve_steps
from .validate import check_prompts


def run(strategy: str, policy, verifier, prompts: Sequence[str], *, budget: int, settings: Settings | None = None,
        seed: int | Sequence[int] = 0, extract: Callable[[str], str | None] = extract_answer) -> SearchResult:
    """Run the registered ``strategy`` on ``prompts`` with ``budget`` samples per prompt.

    ``policy``/``verifier``: objects of the :mod:`~tts_kernels.search.protocols` (the transformers
    adapters :class:`~tts_kernels.models.HFPolicy` / :class:`~tts_kernels.models.HFPRM`, or any
    backend); ``verifier`` may be ``None`` for strategies that need none (``greedy``, ``majority``).
    ``settings``: :class:`Settings` (default ``Settings()``). ``seed``: the sampling seed (a result
    is a pure function of the arguments), or one seed per prompt (a prompt's result is then a
    function of its own seed and text, whatever else is in the call; not for ``pooled`` strategies;
    :mod:`~tts_kernels.search.seeds`). ``extract``: the answer of a completion text.
    Every argument is checked before any model runs.
    """
    entry = _check(strategy, verifier, budget)
    s = resolve(settings, {})
    prompts = check_prompts(prompts)
    check_seed(seed, len(prompts))
    return entry.fn(policy, verifier, prompts, budget=budget, settings=s, seed=seed, extract=extract)


def run_continuous(strategy: str, policy, verifier, prompts: Sequence[str], seeds: Sequence[int], *, budget: int,
                   settings: Settings | None = None, tag=None, join, deliver, started=None, capacity: int,
                   extract: Callable[[str], str | None] = extract_answer) -> None:
    """Continuous batching: run ``strategy`` (one registered ``continuous``) on ``prompts`` (one seed per prompt)
    while requests of the same strategy, budget and settings join at its host looks, up to ``capacity``
    prompts at once; each request's results go to ``deliver`` as its rows end, and equal :func:`run` over its
    prompts with its seeds (see :func:`~tts_kernels.search.best_of_n.serve_sampling` for ``join``,
    ``deliver``, ``started``). What the server runs; checked like :func:`run` before any model runs."""
    entry = _check(strategy, verifier, budget)
    if entry.continuous is None:
        joinable = sorted(n for n, e in STRATEGIES.items() if e.continuous is not None)
        raise ValueError(f"strategy {strategy!r} does not take requests while it runs (those that do: {joinable})")
    s = resolve(settings, {})
    prompts = check_prompts(prompts)
    check_seed(list(seeds), len(prompts))
    check_int("capacity", capacity, minimum=1)
    entry.continuous(policy, verifier, prompts, list(seeds), tag=tag, budget=budget, settings=s, extract=extract,
                     join=join, deliver=deliver, started=started, capacity=capacity)


def run_together(strategies: Sequence[str], policy, verifier, prompts: Sequence[str], *, budget: int,
                 settings: Settings | None = None, seed: int | Sequence[int] = 0,
                 extract: Callable[[str], str | None] = extract_answer) -> dict[str, SearchResult]:
    """:func:`run` for each of ``strategies``, in order, where strategies registered with one ``group``
    (``majority``, ``best_of_n``, ``weighted_best_of_n``) share one run: the same samples, each
    selected by its own rule, and the same compute. What demo and eval run."""
    if isinstance(strategies, str) or not strategies:
        raise ValueError(f"strategies must be a non-empty list of names, got {strategies!r}")
    entries = [_check(name, verifier, budget) for name in strategies]
    s = resolve(settings, {})
    prompts = check_prompts(prompts)
    check_seed(seed, len(prompts))
    out: dict[str, SearchResult] = {}
    done_groups = set()
    for entry in entries:
        if entry.name in out:
            continue
        if entry.group is not None:
            if entry.group in done_groups:
                continue
            done_groups.add(entry.group)
            names = [e.name for e in entries if e.group is entry.group]
            out.update(entry.group(names, policy, verifier, prompts, budget=budget, settings=s, seed=seed,
                                   extract=extract))
        else:
            out[entry.name] = entry.fn(policy, verifier, prompts, budget=budget, settings=s, seed=seed,
                                       extract=extract)
    return {name: out[name] for name in strategies}


# ----------------------------------------------------------------------------- the built-ins

_RULES = {"majority": "majority", "best_of_n": "best", "weighted_best_of_n": "weighted"}


def _sampling_group(names, policy, verifier, prompts, *, budget, settings, seed, extract):
    # Majority alone needs no scores: its samples are not scored (and cost no verifier compute).
    scorer = verifier if set(names) - {"majority"} else None
    return sampling_results({n: _RULES[n] for n in names}, policy, scorer, prompts, n=budget, settings=settings,
                            seed=seed, extract=extract)


def _sampling(name):
    def fn(policy, verifier, prompts, *, budget, settings, seed, extract):
        return _sampling_group([name], policy, verifier, prompts, budget=budget, settings=settings, seed=seed,
                               extract=extract)[name]
    return fn


def _continuous(names):
    def fn(policy, verifier, prompts, seeds, *, tag, budget, settings, extract, join, deliver, started, capacity):
        greedy = names == ["greedy"]
        rules = {"greedy": "majority"} if greedy else {n: _RULES[n] for n in names}
        scorer = verifier if set(names) - {"majority", "greedy"} else None
        if greedy:  # as _greedy: one temperature-0 completion (the seeds draw nothing)
            settings, budget = settings.replace(temperature=0.0), 1
        serve_sampling(rules, policy, scorer, prompts, seeds, n=budget, tag=tag, settings=settings, extract=extract,
                       join=lambda fit: join(fit), deliver=lambda g, res: deliver(g, res if isinstance(res, Exception)
                                                                                   else res[names[0]]),
                       started=started, capacity=capacity)
    return fn


def _greedy(policy, verifier, prompts, *, budget, settings, seed, extract):
    res = best_of_n(policy, None, prompts, n=1, select="majority", settings=settings.replace(temperature=0.0),
                    extract=extract)
    res.strategy = "greedy"
    return res


def _revise_fit(budget, settings, verifier) -> dict:
    """revise's arguments for a budget: a budget below revisions + 1 runs one chain as long as it allows."""
    k = min(settings.revisions, budget - 1)
    return {"n": (budget // (k + 1)) * (k + 1), "settings": settings.replace(revisions=k),
            "select": "weighted" if verifier else "majority"}


def _revise(policy, verifier, prompts, *, budget, settings, seed, extract):
    return revise(policy, verifier, prompts, seed=seed, extract=extract, **_revise_fit(budget, settings, verifier))


def _revise_continuous(policy, verifier, prompts, seeds, *, tag, budget, settings, extract, join, deliver, started,
                       capacity):
    serve_revise(policy, verifier, prompts, seeds, tag=tag, extract=extract, join=join, deliver=deliver,
                 started=started, capacity=capacity, **_revise_fit(budget, settings, verifier))


def _step(name, search):
    def fn(policy, verifier, prompts, *, budget, settings, seed, extract):
        res = search(policy, verifier, prompts, n=budget, settings=settings.replace(
            beam_width=min(settings.beam_width, budget)), seed=seed, extract=extract)
        res.strategy = name
        return res
    return fn


def _step_continuous(name, select):
    def fn(policy, verifier, prompts, seeds, *, tag, budget, settings, extract, join, deliver, started, capacity):
        def named(g, res):
            if not isinstance(res, Exception):
                res.strategy = name
            deliver(g, res)
        serve_steps(name, policy, verifier, prompts, seeds, n=budget, select=select, tag=tag, extract=extract,
                    settings=settings.replace(beam_width=min(settings.beam_width, budget)), join=join,
                    deliver=named, started=started, capacity=capacity)
    return fn


def _optimal(name, strategies):
    # One strategy: the table's calibration, that strategy everywhere. Its phases let eval pool a whole run.
    return OptimalStrategy(name, tuple(strategies))


def _entropic(settings, entropic):
    """``settings`` with the strategy's temperature schedule unless the request names one."""
    return settings.replace(entropic=entropic) if entropic is not None and settings.entropic == "none" else settings


def _particles(name, entropic, driver=particle_filter):
    def fn(policy, verifier, prompts, *, budget, settings, seed, extract):
        settings = _entropic(settings, entropic)
        res = driver(policy, verifier, prompts, n=budget, settings=settings, seed=seed, extract=extract)
        res.strategy = name
        return res
    return fn


def _particles_continuous(name, entropic):
    def fn(policy, verifier, prompts, seeds, *, tag, budget, settings, extract, join, deliver, started, capacity):
        serve_particles(name, policy, verifier, prompts, seeds, n=budget, tag=tag,
                        settings=_entropic(settings, entropic), extract=extract, join=join, deliver=deliver,
                        started=started, capacity=capacity)
    return fn


register_strategy("greedy", _greedy, needs_verifier=False, description="one greedy completion (budget ignored)",
                  continuous=_continuous(["greedy"]))
register_strategy("majority", _sampling("majority"), needs_verifier=False, group=_sampling_group,
                  description="N samples, the most frequent answer", select="majority",
                  continuous=_continuous(["majority"]))
register_strategy("best_of_n", _sampling("best_of_n"), group=_sampling_group,
                  description="N samples, the verifier's best", select="best", continuous=_continuous(["best_of_n"]))
register_strategy("weighted_best_of_n", _sampling("weighted_best_of_n"), group=_sampling_group,
                  description="N samples, the answer with the largest summed verifier score", select="weighted",
                  continuous=_continuous(["weighted_best_of_n"]))
register_strategy("prm_beam_search", _step("prm_beam_search", prm_beam_search),
                  description="step-level beam search: N beams, the best N/beam_width kept each step", select="best",
                  continuous=_step_continuous("prm_beam_search", "best"))
register_strategy("dvts", _step("dvts", dvts), description="diverse verifier tree search: N/beam_width subtrees",
                  select="weighted", continuous=_step_continuous("dvts", "weighted"))
register_strategy("compute_optimal", _optimal("compute_optimal", ("weighted_best_of_n", "prm_beam_search")),
                  description="pilot, difficulty levels, a strategy per level, N*P samples allocated", pooled=True)
register_strategy("adaptive_best_of_n", _optimal("adaptive_best_of_n", ("weighted_best_of_n",)),
                  description="compute_optimal's allocation with weighted best-of-N at every level", pooled=True)
register_strategy("revise", _revise, needs_verifier=False, continuous=_revise_continuous,
                  description="sequential revisions: N/(revisions+1) chains, each answer fed back revisions times")
register_strategy("particle_filtering", _particles("particle_filtering", None),
                  description="N particles grown step by step, resampled by verifier weight (Puri et al. 2025)",
                  continuous=_particles_continuous("particle_filtering", None))
def _gibbs(policy, verifier, prompts, *, budget, settings, seed, extract):
    # Fitted to the budget (every budget runs): gcd(budget, sweeps) sweeps, fewer references than particles.
    sweeps = math.gcd(budget, settings.sweeps)
    refs = min(settings.reference_particles, budget // sweeps - 1)
    return particle_gibbs(policy, verifier, prompts, n=budget, seed=seed, extract=extract,
                          settings=settings.replace(sweeps=sweeps, reference_particles=refs))


register_strategy("particle_gibbs", _gibbs,
                  description="particle Gibbs: sweeps of particle filtering, each with reference particles from the "
                              "last (Puri et al. 2025)")
register_strategy("entropic_particle_filtering", _particles("entropic_particle_filtering", "adaptive"),
                  description="particle filtering with entropy-targeting resampling temperatures (Giannone et al. 2025)",
                  continuous=_particles_continuous("entropic_particle_filtering", "adaptive"))


def _early(driver):
    # (deepconf's candidate scores are confidences, not verifier scores: no select rule is declared, so
    # compute_optimal never re-picks them together with a pilot's verifier-scored candidates.)
    def fn(policy, verifier, prompts, *, budget, settings, seed, extract):
        return driver(policy, verifier, prompts, n=budget, settings=settings, seed=seed, extract=extract)
    return fn


def _early_continuous(name):
    def fn(policy, verifier, prompts, seeds, *, tag, budget, settings, extract, join, deliver, started, capacity):
        serve_early(name, policy, verifier, prompts, seeds, n=budget, tag=tag, settings=settings, extract=extract,
                    join=join, deliver=deliver, started=started, capacity=capacity)
    return fn


register_strategy("deepconf", _early(deepconf), token_loop=True, needs_verifier=False,
                  continuous=_early_continuous("deepconf"),
                  description="DeepConf online: warm-up candidates set a confidence threshold, later ones stop "
                              "below it, sampling stops at consensus (Fu et al. 2025)")
register_strategy("deepconf_offline", _early(deepconf_offline), token_loop=True, needs_verifier=False,
                  continuous=_early_continuous("deepconf_offline"),
                  description="DeepConf offline: N candidates, the most confident share votes weighted by confidence")
register_strategy("adaptive_consistency", _early(adaptive_consistency), token_loop=True, needs_verifier=False,
                  select="majority", continuous=_early_continuous("adaptive_consistency"),
                  description="majority vote that stops sampling a prompt once its Beta rule settles "
                              "(Aggarwal et al. 2023)")
register_strategy("speculative_rejection", _early(speculative_rejection), token_loop=True, select="best",
                  continuous=_early_continuous("speculative_rejection"),
                  description="N candidates, the verifier drops the worst partial ones at checkpoints "
                              "(Sun et al. 2024)")


def _rebase(policy, verifier, prompts, *, budget, settings, seed, extract):
    return rebase(policy, verifier, prompts, n=budget, settings=settings, seed=seed, extract=extract)


def _rebase_continuous(policy, verifier, prompts, seeds, *, tag, budget, settings, extract, join, deliver, started,
                      capacity):
    serve_rebase(policy, verifier, prompts, seeds, n=budget, select="weighted", tag=tag, settings=settings,
                 extract=extract, join=join, deliver=deliver, started=started, capacity=capacity)


register_strategy("rebase", _rebase, select="weighted", continuous=_rebase_continuous,
                  description="REBASE: each depth's remaining width split over the live nodes by softmax of their "
                              "verifier scores; the weighted vote over the N completed leaves (Wu et al. 2024)")
