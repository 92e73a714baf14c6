"""Search: whole test-time-compute searches built from the fused ops, behind one entry point.

``run(strategy, policy, verifier, prompts, budget=N, settings=Settings(...))`` runs any
registered strategy (:data:`STRATEGIES`; add one with :func:`register_strategy`) and returns a
:class:`SearchResult`: ``predictions``, ``candidates``, ``compute``. ``budget`` is samples (or
beams) per prompt for every strategy. Models plug in through the protocols of
:mod:`~tts_kernels.search.protocols` (:class:`Policy`, :class:`Verifier` and their sessions).

The drivers behind the strategies stay public and return :class:`SearchResult` too:
:func:`best_of_n`, :func:`prm_beam_search`, :func:`dvts`, :func:`compute_optimal`,
:func:`particle_filter`, :func:`particle_gibbs`, :func:`revise`, :func:`rebase`; the
token-level :func:`beam_search` keeps ``generate()``'s signature (it is the transformers
drop-in) and returns :class:`BeamSearchOutput`.
"""
from .accounting import Compute, count_flops
from .answers import answer_ids, extract_answer
from .beam_search import FROM_MODEL, BeamSearchOutput, beam_search
from .best_of_n import best_of_n, sample_completions
from .compute_optimal import OptimalTable, compute_optimal
from .particle_filter import particle_filter, particle_gibbs
from .protocols import Policy, PolicySession, StepScores, Tokenizer, Verifier, VerifierSession
from .rebase import rebase
from .result import Candidate, SearchResult, select_candidates
from .revise import revise
from .settings import Settings
from .step_search import dvts, prm_beam_search
from .strategies import STRATEGIES, Strategy, register_strategy, run, run_continuous, run_together
from .thinking import ThinkingBudget

__all__ = ["run", "run_together", "run_continuous", "STRATEGIES", "Strategy", "register_strategy", "Settings", "SearchResult",
           "Candidate", "select_candidates", "Compute", "count_flops", "Policy", "PolicySession", "Verifier",
           "VerifierSession", "StepScores", "Tokenizer", "best_of_n", "sample_completions", "prm_beam_search", "dvts",
           "compute_optimal", "OptimalTable", "particle_filter", "particle_gibbs", "beam_search", "BeamSearchOutput", "FROM_MODEL", "answer_ids", "extract_answer", "revise", "rebase", "ThinkingBudget"]
