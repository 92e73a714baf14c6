"""Model adapters: transformers models on the paged KV cache.

- :mod:`.hf_paged` — ``PagedCache`` (a transformers ``Cache`` over ``PagedKVCache``) and the
  ``"tts_paged"`` attention;
- :mod:`.policy` — ``HFPolicy``: a causal LM as a search policy (the policy protocol);
- :mod:`.prm` — ``HFPRM``: label-token, classifier and value-head PRMs, scored incrementally.

Importing this package imports ``transformers`` and registers the ``"tts_paged"``
attention implementation with it.
"""
from .hf_paged import ATTN_IMPLEMENTATION, PagedCache, paged_attention_forward, register, use_paged_attention
from .policy import HFPolicy, PolicySession
from .prm import HFPRM, PRMScores, PRMSession, split_steps

__all__ = ["ATTN_IMPLEMENTATION", "PagedCache", "paged_attention_forward", "register", "use_paged_attention",
           "HFPolicy", "PolicySession", "HFPRM", "PRMScores", "PRMSession", "split_steps"]
