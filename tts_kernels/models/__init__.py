"""Model adapters: transformers causal LMs on the paged KV cache (:mod:`.hf_paged`).

Importing this package imports ``transformers`` and registers the ``"tts_paged"``
attention implementation with it.
"""
from .hf_paged import ATTN_IMPLEMENTATION, PagedCache, paged_attention_forward, register, use_paged_attention

__all__ = ["ATTN_IMPLEMENTATION", "PagedCache", "paged_attention_forward", "register", "use_paged_attention"]
