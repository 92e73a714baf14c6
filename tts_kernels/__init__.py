"""tts-kernels: fused kernels for test-time-compute search over LLMs.

Public API:

- :func:`beam_topk` — fused beam expansion step (log-softmax + cumulative score + top-k).
- :func:`kv_reorder_` — in-place beam reorder of dense KV caches over all layers in one call.
- :mod:`tts_kernels.search` — search drivers (``beam_search``).
- :mod:`tts_kernels.reference` — plain-PyTorch meaning of every op.
"""
from . import _ext, search
from .ops import beam_topk, kv_reorder_

__version__ = "0.1.0"
HAS_C = _ext.HAS_C

__all__ = ["beam_topk", "kv_reorder_", "search", "HAS_C", "__version__"]
