"""Tiny random transformers models and a character tokenizer for search tests (no downloads)."""
from __future__ import annotations

import string

import torch

CHARS = ["<pad>", "<s>", "</s>"] + list(string.printable)


def char_tokenizer():
    """A transformers tokenizer with one token per printable character (+ pad, bos, eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=len(CHARS), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_llama(seed=0, cls=None, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = (cls or LlamaForCausalLM)(llama_config(**kw)).eval()
    return model


def biased_policy_model(tok, delimiter="e", bias=3.0, eos_bias=-1.0):
    """A random char-level Llama whose LM head favours the delimiter (steps of ~6 characters)
    and disfavours EOS, so searches run several iterations."""
    model = tiny_llama(3)
    b = torch.zeros(model.config.vocab_size)
    b[tok.convert_tokens_to_ids(delimiter)] = bias
    b[tok.eos_token_id] = eos_bias
    model.lm_head.bias = torch.nn.Parameter(b)
    return model


def search_models():
    """(policy, PRM) for search tests: the biased char-level policy and a 2-class token-classifier PRM."""
    from transformers import LlamaForTokenClassification

    from tts_kernels.models import HFPRM, HFPolicy

    tok = char_tokenizer()
    policy = HFPolicy(biased_policy_model(tok), tok)
    prm = HFPRM(tiny_llama(4, cls=LlamaForTokenClassification, num_labels=2), tok, head="classifier")
    return policy, prm
