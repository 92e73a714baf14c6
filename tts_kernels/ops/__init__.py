from . import _fake  # noqa: F401  (registers the fake kernels)
from .beam import beam_topk
from .kv import kv_reorder_

__all__ = ["beam_topk", "kv_reorder_"]
