"""transformers models on the paged KV cache (tts_kernels.models.hf_paged) against dense runs.

Tiny random Llama, Qwen2 (without and with a sliding window on one layer) and Mistral
(sliding window 4, shorter than every sequence here). The reference for every logit is
the same weights at attn_implementation="sdpa" running the row's whole sequence in one
forward without a cache (left-padded, with its attention mask and generate()'s positions);
DynamicCache decoding is checked too. fp32, 1e-4 relative. Blocks of 4 tokens, so prompts,
forks and beams end in partial, shared tail blocks.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from tts_kernels.models import ATTN_IMPLEMENTATION, PagedCache, use_paged_attention  # noqa: E402
from tts_kernels.models.compat import ForwardArgs  # noqa: E402

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min)

hf_logging.set_verbosity_error()
KINDS = ("llama", "qwen2", "qwen2_sliding", "mistral")
V = 300
P = 4  # block size


@functools.cache
def tiny(kind: str):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed({"llama": 0, "qwen2": 1, "qwen2_sliding": 2, "mistral": 3}[kind])
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif kind == "qwen2_sliding":  # layer 0 full attention, layer 1 a 4-token window
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=1))
        assert model.config.layer_types == ["full_attention", "sliding_attention"]
    else:
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=4))
    return use_paged_attention(model.eval())


@contextlib.contextmanager
def attn(model, name):
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def assert_rel(a, b, tol=1e-4):
    assert a.shape == b.shape
    err = rel_err(a, b)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def left_padded(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(8, V, (len(lengths), T), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate(lengths):
        ids[i, : T - n] = 0
        mask[i, : T - n] = 0
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def dense_full(model, ids, mask):
    """Logits of every position: one cache-less sdpa forward over the whole (left-padded) rows."""
    with attn(model, "sdpa"):
        return model(ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits


@torch.no_grad()
def paged_forward(model, cache, ids, mask=None):
    if mask is not None:
        cache.set_attention_mask(mask)
    return model(**ForwardArgs(model)(cache, input_ids=ids, position_ids=cache.position_ids(ids.shape[1]),
                                      use_cache=True)).logits


def new_cache(model, batch, blocks=256):
    return PagedCache(model, batch_size=batch, num_blocks=blocks, block_size=P)


# ----------------------------------------------------------------------------- logits against dense runs

@pytest.mark.parametrize("kind", KINDS)
def test_prefill_and_decode_left_padded(kind):
    model = tiny(kind)
    ids, mask = left_padded([7, 3, 6], seed=0)
    cache = new_cache(model, 3)
    got = paged_forward(model, cache, ids, mask)
    ref = dense_full(model, ids, mask)
    real = mask.bool()
    assert_rel(got[real], ref[real])
    assert torch.equal(cache.lengths(), mask.sum(-1))  # pads were not stored
    assert cache.get_seq_length() == ids.shape[1]     # what a DynamicCache reports

    # DynamicCache decoding of the same rows, side by side.
    dyn = DynamicCache(config=model.config)
    with torch.no_grad(), attn(model, "sdpa"):
        model(**ForwardArgs(model)(dyn, input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                                   use_cache=True))
    g = torch.Generator().manual_seed(1)
    for _ in range(7):  # past the 4-token windows and across block boundaries
        tok = torch.randint(8, V, (3, 1), generator=g)
        pos = positions(mask)[:, -1:] + 1
        ids, mask = torch.cat([ids, tok], 1), torch.cat([mask, torch.ones_like(tok)], 1)
        got = paged_forward(model, cache, tok)[:, -1]
        assert_rel(got, dense_full(model, ids, mask)[:, -1])
        with torch.no_grad(), attn(model, "sdpa"):
            step = model(**ForwardArgs(model)(dyn, input_ids=tok, attention_mask=mask, position_ids=pos,
                                              use_cache=True)).logits[:, -1]
        assert_rel(got, step)
    cache.free()


@pytest.mark.parametrize("kind", KINDS)
def test_multi_token_chunk_on_history(kind):
    # Prefill, decode, then 3 tokens at once on top of the history, then decode again.
    model = tiny(kind)
    ids, mask = left_padded([5, 2], seed=2)
    cache = new_cache(model, 2)
    paged_forward(model, cache, ids, mask)
    g = torch.Generator().manual_seed(3)
    for t in (1, 3, 1, 4, 1):
        tok = torch.randint(8, V, (2, t), generator=g)
        ids, mask = torch.cat([ids, tok], 1), torch.cat([mask, torch.ones_like(tok)], 1)
        got = paged_forward(model, cache, tok)
        assert_rel(got, dense_full(model, ids, mask)[:, -t:])


@pytest.mark.parametrize("kind", KINDS)
def test_best_of_n_fork(kind):
    # Prefill each prompt once, fork N children, decode different tokens per child: each child
    # must match a dense run of its own full sequence. The fork takes no block and moves no bytes.
    model = tiny(kind)
    N = 4
    ids, mask = left_padded([6, 3], seed=4)
    cache = new_cache(model, 2, blocks=64)
    paged_forward(model, cache, ids, mask)
    free0 = cache.kv.num_free_blocks
    pools = (cache.kv.k_pool.clone(), cache.kv.v_pool.clone())
    cache.repeat_interleave(N)
    assert cache.batch_size == 2 * N
    assert cache.kv.num_free_blocks == free0                   # blocks shared, none taken
    assert torch.equal(cache.kv.k_pool, pools[0]) and torch.equal(cache.kv.v_pool, pools[1])
    ids, mask = ids.repeat_interleave(N, 0), mask.repeat_interleave(N, 0)
    g = torch.Generator().manual_seed(5)
    for step in range(6):
        tok = torch.randint(8, V, (2 * N, 1), generator=g)
        ids, mask = torch.cat([ids, tok], 1), torch.cat([mask, torch.ones_like(tok)], 1)
        before = cache.kv.num_free_blocks
        got = paged_forward(model, cache, tok)[:, -1]
        # Each child takes at most one block per step (a copied shared tail, or a fresh one).
        assert before - cache.kv.num_free_blocks <= 2 * N
        assert_rel(got, dense_full(model, ids, mask)[:, -1])
    cache.free()
    assert cache.kv.num_free_blocks == 64


@pytest.mark.parametrize("kind", KINDS)
def test_beam_reorder(kind):
    # Beam steps: rows take random parents of the same prompt; reorder moves no KV bytes and takes
    # no block; every row then matches a dense run of the history it inherited.
    model = tiny(kind)
    B, K = 2, 3
    ids, mask = left_padded([5, 7], seed=6)
    cache = new_cache(model, B, blocks=64)
    paged_forward(model, cache, ids, mask)
    cache.repeat_interleave(K)
    ids, mask = ids.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)
    g = torch.Generator().manual_seed(7)
    for step in range(6):
        tok = torch.randint(8, V, (B * K, 1), generator=g)
        ids, mask = torch.cat([ids, tok], 1), torch.cat([mask, torch.ones_like(tok)], 1)
        got = paged_forward(model, cache, tok)[:, -1]
        assert_rel(got, dense_full(model, ids, mask)[:, -1])
        parents = (torch.randint(0, K, (B, K), generator=g) + torch.arange(B)[:, None] * K).view(-1)
        free0 = cache.kv.num_free_blocks
        pools = (cache.kv.k_pool.clone(), cache.kv.v_pool.clone())
        cache.reorder(parents)
        assert cache.kv.num_free_blocks >= free0                # dropped histories may return blocks
        assert torch.equal(cache.kv.k_pool, pools[0]) and torch.equal(cache.kv.v_pool, pools[1])
        ids, mask = ids[parents], mask[parents]
    cache.free()
    assert cache.kv.num_free_blocks == 64


def test_reorder_cache_and_select_are_transformers_names():
    model = tiny("llama")
    ids, mask = left_padded([4, 6], seed=8)
    cache = new_cache(model, 2)
    paged_forward(model, cache, ids, mask)
    cache.batch_repeat_interleave(2)              # rows 0, 0, 1, 1
    cache.reorder_cache(torch.tensor([3, 2, 1, 0]))  # rows 1, 1, 0, 0
    cache.batch_select_indices(torch.tensor([0, 2]))  # rows 1, 0
    assert torch.equal(cache.lengths(), torch.tensor([6, 4]))
    tok = torch.tensor([[11], [12]])
    ids2, mask2 = ids[[1, 0]], mask[[1, 0]]
    got = paged_forward(model, cache, tok)[:, -1]
    assert_rel(got, dense_full(model, torch.cat([ids2, tok], 1), torch.cat([mask2, torch.ones_like(tok)], 1))[:, -1])


# ----------------------------------------------------------------------------- plumbing

def test_model_without_paged_cache_is_sdpa():
    # A "tts_paged" model runs exactly as sdpa with a DynamicCache (generate()) or no cache.
    model = tiny("mistral")
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    ids, mask = left_padded([6, 3], seed=9)
    with torch.no_grad():
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        plain = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
    with attn(model, "sdpa"), torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        ref_plain = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
    assert torch.equal(ours, ref)
    assert torch.equal(plain, ref_plain)


def test_decode_reads_blocks_in_place(monkeypatch):
    # One new token per row: attention goes through the block tables, no dense gather of history.
    model = tiny("qwen2_sliding")
    ids, mask = left_padded([5, 3], seed=10)
    cache = new_cache(model, 2)
    paged_forward(model, cache, ids, mask)

    def no_gather(*a, **k):
        raise AssertionError("decode gathered the history densely")

    monkeypatch.setattr(cache.kv, "gather", no_gather)
    tok = torch.tensor([[9], [10]])
    got = paged_forward(model, cache, tok)[:, -1]
    assert_rel(got, dense_full(model, torch.cat([ids, tok], 1), torch.cat([mask, torch.ones_like(tok)], 1))[:, -1])


def test_shared_pool_and_geometry():
    model = tiny("llama")
    a = new_cache(model, 2)
    b = PagedCache(model, batch_size=3, kv=a.kv)
    assert b.kv is a.kv and a.kv.num_live_seqs == 5
    assert (a.num_layers, a.num_kv_heads, a.head_dim) == (2, 2, 8)
    assert len(a) == 2 and a.is_sliding == [False, False]
    assert tiny("mistral").config.sliding_window == 4 and new_cache(tiny("mistral"), 1).is_sliding == [True, True]
    with pytest.raises(ValueError, match="does not fit"):
        PagedCache(tiny("qwen2"), batch_size=1, kv=PagedCacheStub())
    a.free()
    b.free()


class PagedCacheStub:
    k_pool = torch.zeros(3, 2, 2, 4, 8)


def test_bad_input():
    model = tiny("llama")
    with pytest.raises(ValueError, match="num_blocks"):
        PagedCache(model, batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        PagedCache(model, batch_size=0, num_blocks=8)
    cache = new_cache(model, 2)
    with pytest.raises(ValueError, match="batch 3 but the cache has 2 rows"), torch.no_grad():
        model(**ForwardArgs(model)(cache, input_ids=torch.randint(8, V, (3, 4)), use_cache=True))
    with pytest.raises(ValueError, match="attention_mask"):
        cache.set_attention_mask(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(NotImplementedError):
        cache.crop(1)
    cache.free()
    assert cache.batch_size == 0
