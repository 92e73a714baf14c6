"""Search drivers: whole test-time-compute searches built from the fused ops."""
from .accounting import Compute, count_flops
from .answers import answer_ids, extract_answer
from .beam_search import FROM_MODEL, BeamSearchOutput, beam_search
from .best_of_n import BestOfNResult, Candidate, best_of_n, sample_completions
from .compute_optimal import ComputeOptimalResult, PromptReport, compute_optimal
from .step_search import StepCandidate, StepSearchResult, dvts, prm_beam_search

__all__ = ["FROM_MODEL", "BeamSearchOutput", "beam_search", "BestOfNResult", "Candidate", "best_of_n",
           "sample_completions", "answer_ids", "extract_answer", "StepCandidate", "StepSearchResult", "dvts",
           "prm_beam_search", "compute_optimal", "ComputeOptimalResult", "PromptReport", "Compute", "count_flops"]
