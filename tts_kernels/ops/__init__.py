from . import _dispatch, _fake  # noqa: F401  (register the Python CUDA kernels and the fake kernels)
from .allocate import allocate_budget, expected_coverage
from .attention import paged_attention
from .beam import beam_topk
from .confidence import SlidingWindow
from .kv import kv_reorder_
from .prm import prm_score
from .sample import sample
from .select import majority_vote, select_best, topk_per_group, weighted_vote

__all__ = ["beam_topk", "kv_reorder_", "paged_attention", "sample", "prm_score", "select_best", "majority_vote",
           "weighted_vote", "topk_per_group", "allocate_budget", "expected_coverage", "SlidingWindow"]
