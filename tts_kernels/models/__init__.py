"""Model adapters: transformers models on the paged KV cache, as search policies and verifiers.

- :mod:`.hf_paged` — ``PagedCache`` (a transformers ``Cache`` over ``PagedKVCache``) and the
  ``"tts_paged"`` attention;
- :mod:`.policy` — ``HFPolicy``: a causal LM as a search :class:`~tts_kernels.search.Policy`
  (paged for :data:`PAGED_ARCHITECTURES`, else :mod:`.fallback`'s ``DenseSession`` on a ``DynamicCache``);
- :mod:`.prm` — ``HFPRM``: label-token, classifier, value-head and likelihood verifiers, scored
  incrementally (a search :class:`~tts_kernels.search.Verifier`);
- :mod:`.hf_decoding` — calling a causal LM as ``generate()`` does (the token-level beam search);
- :mod:`.text` — how a completion splits into steps (no transformers import).

The names below load on first use: importing this package (or :mod:`.text`) does not import
``transformers``; touching ``HFPolicy``, ``HFPRM`` or ``PagedCache`` imports it and registers the
``"tts_paged"`` attention implementation with it.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ATTN_IMPLEMENTATION": "hf_paged", "PagedCache": "hf_paged", "paged_attention_forward": "hf_paged",
    "register": "hf_paged", "use_paged_attention": "hf_paged",
    "PAGED_ARCHITECTURES": "hf_paged", "paged_unsupported": "hf_paged",
    "HFPolicy": "policy", "PolicySession": "policy", "DenseSession": "fallback",
    "HFPRM": "prm", "PRMScores": "prm", "PRMSession": "prm",
    "split_steps": "text",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
