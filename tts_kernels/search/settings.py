"""``Settings``: the generation and search settings of every strategy, under one set of names.

The same names are used by :func:`~tts_kernels.search.run`, by every driver's keyword
overrides (``best_of_n(..., temperature=0.7)`` is ``settings=replace(settings, temperature=0.7)``),
by the demo and eval configs, and by the server's request fields. A strategy reads the
fields it needs and ignores the rest (each field says who reads it).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from .thinking import ThinkingBudget

AGGREGATES = ("last", "min", "prod", "mean")
RESAMPLERS = ("systematic", "multinomial")
PARTICLE_WEIGHTS = ("verifier", "self_certainty")
PARTICLE_SELECT = ("best", "weighted", "sample")
ENTROPIC = ("none", "adaptive", "annealed", "ess", "entropy", "base")
STEP_CAPS = ("end", "continue")
VOTE_KEYS = ("normalized", "math")  # (tts_kernels.search.answers)


@dataclass(frozen=True)
class Settings:
    """Generation and search settings shared by every strategy.

    Attributes:
        temperature: sampling temperature (0: greedy). All strategies but ``greedy``.
        top_p, top_k, min_p: nucleus, top-k (0: off) and min-p filters, in transformers' order.
        max_new_tokens: tokens of a whole completion (sampling strategies; the last iteration
            of a step-level search, which generates to the end).
        max_step_tokens: tokens of one step of a step-level search.
        step_cap: what a step that reaches ``max_step_tokens`` without the delimiter does: ``"end"``
            the beam (finish ``"length"``, search-and-learn's rule) or ``"continue"``: it is scored as
            a step and the beam goes on in the next iteration.
        num_iterations: steps of a step-level search (the last one generates to the end).
        beam_width: step-level searches: a beam search keeps ``budget // beam_width`` beams and
            expands each ``beam_width`` ways; DVTS grows ``budget // beam_width`` subtrees.
        agg: how step scores fold into a candidate's score: ``last``, ``min``, ``prod``, ``mean``.
        step_delimiter: what ends a step. Every search splits text into steps with it (the
            verifier scores exactly those steps), so it is the one definition of a step.
        filter_duplicates: ``prm_beam_search``: a beam whose completion (token ids) repeats another
            live beam's of its prompt does not compete for survival (search-and-learn's option).
        return_siblings: ``dvts``: besides each subtree's final candidate, return the ``beam_width - 1``
            expansions it did not choose at its last step (finish ``"sibling"`` unless they ended
            themselves), so a prompt gets ``n`` candidates, search-and-learn's output pool.
        lookahead: ``prm_beam_search`` and ``dvts``: rank beams (a subtree's expansions) by their
            score after this many more greedy steps (rolled out on clones, then thrown away).
        sync_every: decode steps between host looks (stop checks, dropping finished rows).
            Part of the random stream's layout: another value gives another (equally valid) sample.
        stop: strings that end a completion besides EOS. Sampling strategies cut the text after the
            string; step-level searches and particle filters end the beam after the step that holds it
            (the step kept whole; finish ``"stop"``).
        stop_at_answer: step-level searches and particle filters: a beam whose text has a closed
            ``\\boxed{...}`` is complete (finish ``"stop"``), as search-and-learn's beams are.
        levels: ``compute_optimal``: difficulty levels (without a fitted table; a table has its own).
        optimal_table: ``compute_optimal``: the path of a fitted
            :class:`~tts_kernels.search.compute_optimal.OptimalTable` (calibrated difficulty, the strategy
            per level and budget); ``None``: uncalibrated difficulty and a fixed plan.
        max_rows: strategies that pool their budget over the prompts of a call (``compute_optimal``):
            at most this many rows (prompts times samples) per batched sub-search, to bound memory
            (0: no limit). It does not change what is allocated.
        resampling, ess_threshold, particle_weight, particle_select, weight_temperature, entropic,
            entropy_target, keep_best: particle filtering (:func:`~tts_kernels.search.particle_filter`):
            ``"systematic"`` or ``"multinomial"`` resampling, done when a prompt's effective sample size
            falls below ``ess_threshold * N`` (1.0: whenever the weights are not all equal); weights
            from the verifier (``logit`` of the aggregate score) or ``"self_certainty"`` (mean token
            log-probability); the answer by the ``"best"`` weight, a ``"weighted"`` vote or a
            ``"sample"``; ``softmax(weight / weight_temperature)``; entropic resampling (``"adaptive"``:
            the temperature rises until the weights' normalised entropy reaches ``entropy_target``;
            ``"annealed"``: it decays from ``num_iterations`` times to 1; ``"ess"``, ``"entropy"``,
            ``"base"``: Giannone et al.'s schedules, applied while the ESS ratio is below
            ``anneal_below`` in the first ``early_phase`` of the iterations; formulas in
            :mod:`~tts_kernels.search.particle_filter`); ``keep_best`` carries the best particle
            through every resample.
        vote_key: what makes two answers one vote (majority, weighted votes, particle filtering's
            weighted pick): ``"normalized"`` (the extracted string) or ``"math"`` (the value
            ``math-verify`` reads: ``\\frac{1}{2}`` and ``0.5`` vote together;
            :mod:`~tts_kernels.search.answers`).
        thinking: a :class:`~tts_kernels.search.thinking.ThinkingBudget` (or its fields as a dict): budget
            forcing of a reasoning policy's thinking, applied on the device in every decode loop (sampling
            strategies, step-level searches, particle filtering; the token beam search takes it as an
            argument). ``None``: off.
        revisions, revision_prompt: ``revise`` (:mod:`~tts_kernels.search.revise`): answers fed back per
            chain (a chain spends ``revisions + 1`` samples), and the text between an answer and the next
            attempt.
        sweeps, reference_particles: particle Gibbs (:func:`~tts_kernels.search.particle_gibbs`):
            passes of ``budget // sweeps`` particles each, and the reference particles carried from
            one pass into the next.
        rebase_temperature: ``rebase`` (:mod:`~tts_kernels.search.rebase`): a prompt's remaining width is
            split over its live nodes by ``softmax(score / rebase_temperature)`` (lower: more children to the
            best-scored nodes; REBASE's balance temperature).
        confidence_k, confidence_window: the early-stopping strategies (:mod:`~tts_kernels.search.early_stop`):
            a token's confidence is the negated mean of its distribution's ``confidence_k`` largest
            log-probabilities; a candidate's group confidence is the mean over its last
            ``confidence_window`` tokens.
        deepconf_warmup, deepconf_keep, consensus: ``deepconf``: candidates per prompt run whole to set
            the threshold (0: ``max(2, budget // 4)``), the share of candidates the threshold keeps (the
            threshold is the ``1 - deepconf_keep`` quantile of the warm-up's lowest group confidence;
            ``deepconf_offline`` keeps that share of its candidates), and the confidence-weighted vote
            share at which a prompt stops sampling (1.0: never early).
        stop_confidence, parallel_samples: ``adaptive_consistency``: a prompt stops sampling once
            ``P(p_1 > p_2)`` under the Beta posterior of its two most frequent answers exceeds
            ``stop_confidence``; candidates of a prompt running at once (0: ``max(2, budget // 4)``).
        checkpoint_tokens, rejection_rate: ``speculative_rejection``: the verifier scores the live partial
            candidates every ``checkpoint_tokens`` tokens and the worst ``rejection_rate`` of each
            prompt's stop.
    """

    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 96
    max_step_tokens: int = 24
    step_cap: str = "end"
    num_iterations: int = 8
    beam_width: int = 4
    agg: str = "last"
    step_delimiter: str = "\n\n"
    lookahead: int = 0
    filter_duplicates: bool = False
    return_siblings: bool = False
    sync_every: int = 8
    stop: tuple[str, ...] = ()
    stop_at_answer: bool = False
    levels: int = 4
    optimal_table: str | None = None
    max_rows: int = 0
    resampling: str = "systematic"
    ess_threshold: float = 1.0
    particle_weight: str = "verifier"
    particle_select: str = "best"
    weight_temperature: float = 1.0
    entropic: str = "none"
    entropy_target: float = 0.5
    keep_best: bool = False
    sweeps: int = 2
    reference_particles: int = 1
    anneal_below: float = 0.5
    early_phase: float = 0.5
    vote_key: str = "normalized"
    thinking: ThinkingBudget | None = None
    revisions: int = 1
    revision_prompt: str = "\n\nCheck the solution above and write it again, correcting any mistake.\n\n"
    confidence_k: int = 20
    confidence_window: int = 32
    deepconf_warmup: int = 0
    deepconf_keep: float = 0.9
    consensus: float = 0.95
    stop_confidence: float = 0.95
    parallel_samples: int = 0
    checkpoint_tokens: int = 16
    rejection_rate: float = 0.5
    rebase_temperature: float = 0.2

    def __post_init__(self):
        def number(name, ok, rule, kind=float):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
                raise TypeError(f"Settings.{name} must be {'a number' if kind is float else 'an int'}, "
                                f"got {type(v).__name__}")
            if not ok(v):
                raise ValueError(f"Settings.{name} must be {rule}, got {v!r}")

        number("temperature", lambda v: math.isfinite(v) and v >= 0, "finite and >= 0")
        number("top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        number("min_p", lambda v: 0 <= v <= 1, "in [0, 1]")
        number("top_k", lambda v: v >= 0, ">= 0 (0: off)", int)
        for name in ("max_new_tokens", "max_step_tokens", "num_iterations", "beam_width", "sync_every", "levels",
                     "sweeps"):
            number(name, lambda v: v >= 1, ">= 1", int)
        number("lookahead", lambda v: v >= 0, ">= 0", int)
        number("revisions", lambda v: v >= 0, ">= 0", int)
        number("max_rows", lambda v: v >= 0, ">= 0 (0: no limit)", int)
        if self.optimal_table is not None:
            if not isinstance(self.optimal_table, (str, os.PathLike)):
                raise ValueError(f"Settings.optimal_table must be a path or None, got {self.optimal_table!r}")
            object.__setattr__(self, "optimal_table", os.fspath(self.optimal_table))
        if not isinstance(self.revision_prompt, str):
            raise ValueError(f"Settings.revision_prompt must be a string, got {self.revision_prompt!r}")
        number("reference_particles", lambda v: v >= 0, ">= 0", int)
        for name in ("confidence_k", "confidence_window", "checkpoint_tokens"):
            number(name, lambda v: v >= 1, ">= 1", int)
        for name in ("deepconf_warmup", "parallel_samples"):
            number(name, lambda v: v >= 0, ">= 0 (0: automatic)", int)
        number("deepconf_keep", lambda v: 0 < v <= 1, "in (0, 1]")
        number("consensus", lambda v: 0 < v <= 1, "in (0, 1] (1: no early stop)")
        number("stop_confidence", lambda v: 0.5 <= v < 1, "in [0.5, 1)")
        number("rejection_rate", lambda v: 0 <= v < 1, "in [0, 1)")
        number("ess_threshold", lambda v: 0 <= v <= 1, "in [0, 1]")
        number("weight_temperature", lambda v: math.isfinite(v) and v > 0, "finite and > 0")
        number("rebase_temperature", lambda v: math.isfinite(v) and v > 0, "finite and > 0")
        number("entropy_target", lambda v: 0 <= v <= 1, "in [0, 1]")
        number("anneal_below", lambda v: 0 <= v <= 1, "in [0, 1]")
        number("early_phase", lambda v: 0 <= v <= 1, "in [0, 1]")
        for name, allowed in (("agg", AGGREGATES), ("resampling", RESAMPLERS), ("particle_weight", PARTICLE_WEIGHTS),
                              ("particle_select", PARTICLE_SELECT), ("entropic", ENTROPIC),
                              ("vote_key", VOTE_KEYS), ("step_cap", STEP_CAPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Settings.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("keep_best", "stop_at_answer", "filter_duplicates", "return_siblings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Settings.{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.step_delimiter, str) or not self.step_delimiter:
            raise ValueError(f"Settings.step_delimiter must be a non-empty string, got {self.step_delimiter!r}")
        stop = self.stop
        if isinstance(stop, str) or not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s
                                                                                   for s in stop):
            raise ValueError(f"Settings.stop must be a list of non-empty strings, got {stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "thinking", ThinkingBudget.of(self.thinking))

    @classmethod
    def recipe(cls, name: str, **changes) -> Settings:
        """Settings of a published recipe, with ``changes`` on top. ``"sal"``: search-and-learn's
        (huggingface/search-and-learn, ``src/sal/config.py`` defaults and its ``recipes/*.yaml``):
        temperature 0.8, top-p 1.0, beam width 4, 40 iterations, no lookahead, ``"last"`` aggregation,
        steps end at ``"\\n\\n"``, 2048 tokens for every generation (a step or the final one), a step
        that hits them ends its beam, a beam ends once its answer is boxed (theirs at ``boxed{``, ours at
        the closed ``\\boxed{...}``), duplicate beams filtered, and DVTS returns every expansion of a
        subtree's last step (their output pool). Not settings, set where they live: the budget ``n`` (theirs: 4, ``budget=``),
        the pick (``select``; theirs: the best aggregate), and the policy's chat template with a
        step-by-step system prompt (``HFPolicy(chat_template=True, system_prompt=MATH_SYSTEM_PROMPT)``)."""
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; recipes: {sorted(RECIPES)}")
        return cls().replace(**RECIPES[name]).replace(**changes)

    def replace(self, **changes) -> Settings:
        """A copy with ``changes`` (Settings names only; an unknown name is a ``TypeError`` naming it)."""
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(changes) - names)
        if bad:
            raise TypeError(f"unknown setting(s) {bad}; Settings has {sorted(names)}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """Plain JSON-able values (``stop`` as a list, ``thinking`` as a dict or None)."""
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["thinking"] = None if self.thinking is None else self.thinking.as_dict()
        return d


# Published recipes (Settings.recipe): only the fields that differ from the defaults above.
RECIPES = {
    "sal": dict(temperature=0.8, top_p=1.0, top_k=0, min_p=0.0, beam_width=4, num_iterations=40, lookahead=0,
                agg="last", step_delimiter="\n\n", max_new_tokens=2048, max_step_tokens=2048, step_cap="end",
                stop_at_answer=True, filter_duplicates=True, return_siblings=True),
}


def resolve(settings: Settings | None, overrides: dict) -> Settings:
    """``settings`` (default ``Settings()``) with keyword ``overrides`` applied."""
    if settings is None:
        settings = Settings()
    elif not isinstance(settings, Settings):
        raise TypeError(f"settings must be a tts_kernels.search.Settings, got {type(settings).__name__}")
    return settings.replace(**overrides) if overrides else settings
