"""Compute accounting for searches: exact token counts and a FLOP estimate, so strategies compare at equal compute.

Every search reports a :class:`Compute` record: how many tokens the policy
prefilled and generated, how many tokens the PRM processed, and the FLOPs of
those forward passes. The FLOP model (all quantities in FLOPs, 1 multiply-add =
2 FLOPs) is the usual one:

    forward FLOPs = 2 * N * tokens  +  4 * n_layers * n_heads * head_dim * keys

* ``N`` (:func:`model_flops_per_token` ``/ 2``) is the number of non-embedding
  parameters, each used in one multiply-add per token. The input-embedding
  lookup is a gather, not a matmul, so the embedding table is not counted;
  the LM head is a matmul and is counted, also when tied to the embedding.
* ``keys`` (:func:`attention_flops`) is the sum, over the query tokens of the
  forward, of the number of keys each attends; ``Q K^T`` and ``A V`` cost
  ``2 * head_dim`` FLOPs each per (query, key, head, layer). Softmax, rotary,
  norms' elementwise work and sampling are not counted (lower order).

For a causal prefill of ``t`` tokens after ``past`` cached ones,
``keys = t * past + t (t + 1) / 2`` (:func:`causal_context_sum`); a decode
step is the case ``t = 1``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ..ops._validate import check_int

__all__ = ["Compute", "model_flops_per_token", "attention_flops", "causal_context_sum", "FlopCounter",
           "count_flops"]


@dataclass(frozen=True)
class Compute:
    """Exact compute spent by a search (or one prompt / one iteration of it); records add up with ``+``.

    Attributes:
        policy_prefill_tokens: token positions the policy ran in prefill forwards (prompts, and any
            text fed back in, e.g. re-prefilled prefixes).
        policy_generated_tokens: tokens the policy sampled (each costs one decode position).
        prm_tokens: token positions the PRM ran (each scored step's new tokens, or whole prefixes
            when re-scored).
        policy_flops, prm_flops: FLOPs of those forwards (the model in the module docstring).
        thinking_tokens: of ``policy_generated_tokens``, those written while thinking
            (``Settings.thinking``; the rest are answer tokens).
    """

    policy_prefill_tokens: int = 0
    policy_generated_tokens: int = 0
    prm_tokens: int = 0
    policy_flops: float = 0.0
    prm_flops: float = 0.0
    thinking_tokens: int = 0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int":
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f"Compute.{f.name} must be an int, got {type(v).__name__}")
            elif isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"Compute.{f.name} must be a number, got {type(v).__name__}")
            if v < 0:
                raise ValueError(f"Compute.{f.name} must be >= 0, got {v}")

    @property
    def policy_tokens(self) -> int:
        """Policy token positions run: prefill + generated."""
        return self.policy_prefill_tokens + self.policy_generated_tokens

    @property
    def total_flops(self) -> float:
        """Policy + PRM FLOPs."""
        return self.policy_flops + self.prm_flops

    def __add__(self, other: Compute) -> Compute:
        if not isinstance(other, Compute):
            return NotImplemented
        return Compute(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))

    def __radd__(self, other) -> Compute:
        # sum(records) starts from 0.
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        return NotImplemented

    def as_dict(self) -> dict[str, int | float]:
        """The fields plus ``policy_tokens`` and ``total_flops`` (for logs and JSON)."""
        d = dataclasses.asdict(self)
        d["policy_tokens"] = self.policy_tokens
        d["total_flops"] = self.total_flops
        return d


# Per family: (q/k/v bias, o bias, MLP bias, per-head q/k norms). Values are config attribute
# names, True/False, matching transformers' modeling_<family>.py.
_FAMILIES = {
    "llama": ("attention_bias", "attention_bias", "mlp_bias", False),
    "mistral": (False, False, False, False),
    "qwen2": (True, False, False, False),
    "qwen3": ("attention_bias", "attention_bias", False, True),
}


def _flag(config, spec) -> bool:
    return bool(getattr(config, spec, False)) if isinstance(spec, str) else spec


def _field(config, name: str) -> int:
    v = getattr(config, name, None)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"config.{name} must be a positive int, got {v!r}")
    return v


def _head_dim(config) -> int:
    d = getattr(config, "head_dim", None)
    if d is None:
        return _field(config, "hidden_size") // _field(config, "num_attention_heads")
    return _field(config, "head_dim")


def _config_params(config) -> int:
    """Non-embedding parameters of a Llama/Mistral/Qwen2/Qwen3 causal LM, from its config."""
    family = getattr(config, "model_type", None)
    if family not in _FAMILIES:
        raise ValueError(
            f"model_or_config: no parameter formula for config model_type {family!r} (known: "
            f"{', '.join(_FAMILIES)}); pass the model instead, e.g. built without memory under "
            "`with torch.device('meta'): model = AutoModelForCausalLM.from_config(config)`")
    qkv_bias, o_bias, mlp_bias, qk_norm = (_flag(config, s) for s in _FAMILIES[family])
    h = _field(config, "hidden_size")
    inter = _field(config, "intermediate_size")
    n_layers = _field(config, "num_hidden_layers")
    n_heads = _field(config, "num_attention_heads")
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    d = _head_dim(config)
    vocab = _field(config, "vocab_size")
    q, kv = n_heads * d, n_kv * d
    attention = h * q + 2 * h * kv + q * h + qkv_bias * (q + 2 * kv) + o_bias * h + qk_norm * 2 * d
    mlp = 3 * h * inter + mlp_bias * (2 * inter + h)  # gate, up: h x I; down: I x h
    norms = 2 * h  # input and post-attention RMSNorm weights
    return n_layers * (attention + mlp + norms) + h + vocab * h  # + final norm + LM head (tied or not)


def _module_params(model: nn.Module) -> int:
    """Distinct parameters, less the tables used only as lookups (nn.Embedding weights that no
    nn.Linear shares: a tied LM head stays counted)."""
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    lookups -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    return sum(p.numel() for p in model.parameters() if id(p) not in lookups)


def model_flops_per_token(model_or_config) -> float:
    """Forward FLOPs per token outside attention: ``2 * N`` for ``N`` non-embedding parameters.

    ``model_or_config``:

    * an ``nn.Module`` (any model, e.g. a PRM with its own head): ``N`` counts every distinct
      parameter except the weights of ``nn.Embedding`` tables that are only looked up (the input
      embedding, learned position tables). An embedding weight shared with an ``nn.Linear`` (a
      tied LM head) is counted once. A model built on the ``meta`` device works (no memory).
    * a transformers config of a Llama, Mistral, Qwen2 or Qwen3 causal LM: ``N`` from the sizes
      (hidden ``h``, intermediate ``I``, layers ``L``, heads ``H``, kv heads ``K``, head dim ``d``,
      vocabulary ``V``)::

          N = L * (2 h H d + 2 h K d        q, o; k, v projections
                   + 3 h I                  gate, up, down
                   + 2 h                    the two RMSNorm weights
                   + biases / q-k norms     per family: Qwen2 q/k/v bias; Llama attention_bias,
                  )                         mlp_bias; Qwen3 attention_bias and 2 d of q/k norms
              + h                           final norm
              + V h                         LM head, counted whether tied or not

    Every parameter is taken as one multiply-add (2 FLOPs) per token: exact for the matmul
    weights; norm weights and biases cost about half that, and are well under 0.1% of ``N``
    for real models. Returns FLOPs per token (a float).
    """
    if isinstance(model_or_config, nn.Module):
        return 2.0 * _module_params(model_or_config)
    return 2.0 * _config_params(model_or_config)


def _attention_config(model_or_config):
    if isinstance(model_or_config, nn.Module):
        config = getattr(model_or_config, "config", None)
        if config is None:
            raise TypeError("model_or_config: this model has no .config; pass its config (num_hidden_layers, "
                            "num_attention_heads, head_dim or hidden_size)")
        return config
    return model_or_config


def _attention_flops_per_key(config) -> float:
    return 4.0 * _field(config, "num_hidden_layers") * _field(config, "num_attention_heads") * _head_dim(config)


def attention_flops(model_or_config, query_tokens: int, context_tokens_sum: int) -> float:
    """FLOPs of the attention scores and mixing: ``4 * L * H * d * context_tokens_sum``.

    ``context_tokens_sum`` is the number of (query, key) pairs: the sum, over the
    ``query_tokens`` query tokens of the forward, of the number of keys each attends (itself
    included, so it is ``>= query_tokens``). Per pair, head and layer: ``Q K^T`` is ``d``
    multiply-adds and ``A V`` another ``d``: ``4 d`` FLOPs. Query heads count, not kv heads (GQA
    shares K/V storage, not this work). For causal attention use :func:`causal_context_sum`;
    a sliding window or a tree mask is the caller's count.
    """
    q = check_int("query_tokens", query_tokens)
    keys = check_int("context_tokens_sum", context_tokens_sum)
    if keys < q:
        raise ValueError(f"context_tokens_sum must be >= query_tokens (each query attends at least itself), "
                         f"got {keys} < {q}")
    return _attention_flops_per_key(_attention_config(model_or_config)) * keys


def causal_context_sum(new_tokens: int, past_tokens: int = 0) -> int:
    """Keys attended by ``new_tokens`` appended after ``past_tokens`` cached ones, causally:
    ``sum_{j=1..new} (past + j) = new * past + new (new + 1) / 2``."""
    t = check_int("new_tokens", new_tokens)
    past = check_int("past_tokens", past_tokens)
    return t * past + t * (t + 1) // 2


class FlopCounter:
    """Forward FLOPs of one model, with the per-token and per-key constants computed once.

    ``count(tokens, context_sum) = model_flops_per_token * tokens + 4 L H d * context_sum``.
    """

    def __init__(self, model_or_config):
        self.flops_per_token = model_flops_per_token(model_or_config)
        self.flops_per_key = _attention_flops_per_key(_attention_config(model_or_config))

    def count(self, tokens: int, context_sum: int) -> float:
        """FLOPs of a forward over ``tokens`` query tokens attending ``context_sum`` keys in all."""
        t = check_int("tokens", tokens)
        keys = check_int("context_sum", context_sum)
        if keys < t:
            raise ValueError(f"context_sum must be >= tokens (each token attends at least itself), got {keys} < {t}")
        return self.flops_per_token * t + self.flops_per_key * keys

    def causal(self, new_tokens: int, past_tokens: int = 0) -> float:
        """FLOPs of a causal forward of ``new_tokens`` after ``past_tokens`` cached ones
        (a prefill, or with ``new_tokens=1`` a decode step)."""
        return self.count(new_tokens, causal_context_sum(new_tokens, past_tokens))


def count_flops(model_or_config, tokens: int, context_sum: int) -> float:
    """``FlopCounter(model_or_config).count(tokens, context_sum)``; keep a :class:`FlopCounter`
    in loops (a model's parameters are counted on each call here)."""
    return FlopCounter(model_or_config).count(tokens, context_sum)
