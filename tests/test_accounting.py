"""Compute accounting: hand-counted parameters and attention FLOPs, checked against real models."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tts_kernels.search.accounting import (
    Compute,
    FlopCounter,
    attention_flops,
    causal_context_sum,
    count_flops,
    model_flops_per_token,
)

# A Llama small enough to count by hand: h = 8, I = 12, L = 2, H = 2, K = 1, d = 8 / 2 = 4, V = 10.
TINY = dict(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1)
# Per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192; MLP 3*8*12 = 288; two norms 2*8 = 16 -> 496.
# Two layers 992, final norm 8, LM head 10*8 = 80: N = 1080 (the 80 embedding weights excluded).
TINY_N = 1080
TINY_NORMS = 2 * 2 * 8 + 8  # norm weights: no matmul, not seen by torch's FLOP counter
TINY_PER_KEY = 4 * 2 * 2 * 4  # 4 * L * H * d = 64 FLOPs per (query, key) pair


def llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY, "tie_word_embeddings": False, **kw})


def build(config, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def embedding_numel(model) -> int:
    return model.get_input_embeddings().weight.numel()


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_llama_by_hand(tie):
    cfg = llama_config(tie_word_embeddings=tie)
    model = build(cfg)
    total = sum(p.numel() for p in model.parameters())  # distinct parameters: a tied head once
    assert total == (TINY_N + 80 if not tie else TINY_N)
    # Untied: everything but the embedding. Tied: the head is the embedding, and its matmul counts.
    assert total - embedding_numel(model) + (80 if tie else 0) == TINY_N
    assert model_flops_per_token(cfg) == 2.0 * TINY_N
    assert model_flops_per_token(model) == 2.0 * TINY_N


@pytest.mark.parametrize("family,kw", [
    ("llama", {}),
    ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=6)),
    ("mistral", dict(head_dim=6)),
    ("qwen2", {}),
    ("qwen2", dict(tie_word_embeddings=True)),
    ("qwen3", dict(head_dim=6)),
    ("qwen3", dict(head_dim=6, attention_bias=True, tie_word_embeddings=True)),
])
def test_config_formula_matches_model(family, kw):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(family, **{**TINY, **kw})
    model = build(cfg)
    expected = sum(p.numel() for p in model.parameters()) - embedding_numel(model)
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        expected += embedding_numel(model)  # tied LM head: still a matmul
    assert model_flops_per_token(cfg) == 2.0 * expected
    assert model_flops_per_token(model) == 2.0 * expected
    with torch.device("meta"):  # counting a model needs no memory
        assert model_flops_per_token(build(cfg)) == 2.0 * expected


def test_generic_module_excludes_lookup_tables_only():
    class Toy(nn.Module):
        def __init__(self, tie):
            super().__init__()
            self.tok = nn.Embedding(11, 4)
            self.pos = nn.Embedding(7, 4)
            self.mix = nn.Linear(4, 4)  # 16 + 4
            self.head = nn.Linear(4, 11, bias=False)  # 44
            if tie:
                self.head.weight = self.tok.weight

    assert model_flops_per_token(Toy(tie=False)) == 2.0 * (20 + 44)
    assert model_flops_per_token(Toy(tie=True)) == 2.0 * (20 + 44)


def test_causal_context_sum():
    assert causal_context_sum(5) == 1 + 2 + 3 + 4 + 5 == 15
    assert causal_context_sum(1, 5) == 6  # a decode step after 5 cached tokens
    assert causal_context_sum(3, 4) == 5 + 6 + 7
    assert causal_context_sum(0, 9) == 0
    for t in range(6):
        for past in range(6):
            assert causal_context_sum(t, past) == sum(past + j for j in range(1, t + 1))


def test_attention_flops_by_hand():
    cfg = llama_config()
    assert attention_flops(cfg, 5, causal_context_sum(5)) == TINY_PER_KEY * 15 == 960
    assert attention_flops(cfg, 1, causal_context_sum(1, 5)) == TINY_PER_KEY * 6 == 384
    assert attention_flops(build(cfg), 1, 6) == 384  # a model's .config is used
    # head_dim given apart from hidden_size / heads: 4 * 2 * 2 * 6
    assert attention_flops(llama_config(head_dim=6), 2, 3) == 96 * 3
    counter = FlopCounter(cfg)
    assert counter.count(5, 15) == 2 * TINY_N * 5 + 960
    assert counter.causal(5) == counter.count(5, 15)
    assert counter.causal(1, past_tokens=5) == 2 * TINY_N + 384
    assert count_flops(cfg, 5, 15) == counter.count(5, 15)


def test_flops_match_torch_flop_counter():
    """Independent check with torch's FLOP counter on a real forward. It counts matmuls only
    (not the norm weights), and the eager attention computes the full t x t score matrix before
    masking, so a t-token prefill shows t*t keys where the causal count needs t(t+1)/2; a decode
    step attends all past + 1 keys either way."""
    cfg = llama_config()
    cfg._attn_implementation = "eager"
    model = build(cfg)
    matmul_per_token = model_flops_per_token(model) - 2 * TINY_NORMS
    t = 5
    with FlopCounterMode(display=False) as fc:
        out = model(torch.arange(1, t + 1)[None], use_cache=True)
    assert fc.get_total_flops() == matmul_per_token * t + attention_flops(cfg, t, t * t)
    with FlopCounterMode(display=False) as fc:
        model(torch.tensor([[6]]), cache=out.past_key_values, use_cache=True)
    assert fc.get_total_flops() == matmul_per_token + attention_flops(cfg, 1, causal_context_sum(1, t))


def test_compute_addition():
    a = Compute(policy_prefill_tokens=10, policy_generated_tokens=20, prm_tokens=5, policy_flops=1e3, prm_flops=2e2)
    b = Compute(1, 2, 3, 4.0, 5.0)
    c = a + b
    assert c == Compute(11, 22, 8, 1004.0, 205.0)
    assert c.policy_tokens == 33 and c.total_flops == 1209.0
    assert sum([a, b]) == c and sum([], Compute()) == Compute()
    assert a + Compute() == a
    assert c.as_dict() == dict(policy_prefill_tokens=11, policy_generated_tokens=22, prm_tokens=8,
                               policy_flops=1004.0, prm_flops=205.0, thinking_tokens=0, policy_tokens=33,
                               total_flops=1209.0)
    with pytest.raises(TypeError):
        _ = a + 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.prm_tokens = 3


def test_bad_input():
    cfg = llama_config()
    with pytest.raises(ValueError, match="context_tokens_sum must be >= query_tokens"):
        attention_flops(cfg, 5, 4)
    with pytest.raises(ValueError, match="query_tokens must be >= 0"):
        attention_flops(cfg, -1, 4)
    with pytest.raises(TypeError, match="context_tokens_sum must be an int"):
        attention_flops(cfg, 1, 2.5)
    with pytest.raises(ValueError, match="context_sum must be >= tokens"):
        FlopCounter(cfg).count(3, 2)
    with pytest.raises(ValueError, match="past_tokens must be >= 0"):
        causal_context_sum(1, -1)
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="no parameter formula for config model_type 'gpt2'"):
        model_flops_per_token(GPT2Config())
    with pytest.raises(ValueError, match="config.num_hidden_layers must be a positive int"):
        attention_flops(object(), 1, 1)
    with pytest.raises(TypeError, match="has no .config"):
        attention_flops(nn.Linear(2, 2), 1, 1)
    with pytest.raises(ValueError, match="Compute.prm_tokens must be >= 0"):
        Compute(prm_tokens=-1)
    with pytest.raises(TypeError, match="Compute.policy_prefill_tokens must be an int"):
        Compute(policy_prefill_tokens=1.5)
