from . import _fake  # noqa: F401  (registers the fake kernels)
from .attention import paged_attention
from .beam import beam_topk
from .kv import kv_reorder_
from .sample import sample

__all__ = ["beam_topk", "kv_reorder_", "paged_attention", "sample"]
