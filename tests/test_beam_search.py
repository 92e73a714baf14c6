"""beam_search against transformers' generate(): same sequences, scores, beam indices.

Tiny randomly initialised Llama, Qwen2 and GPT-2 models. An EOS id is made likely
(or impossible) by swapping the LM head for a biased copy, so the finished-beam
bookkeeping, early stopping and padding paths all run. Most cases use float32
models, whose prefill logits at batch B and at batch B*K (generate()) can differ in
the last bit on CPU (MKL rounds row counts that are not a multiple of 4 differently);
the sequences still agree, and scores agree to 1e-5. test_float64_models removes
that effect: float64 logits rounded to float32 agree whatever the batch size.

Most tests run both KV cache modes: ``cache="dense"`` (DynamicCache + kv_reorder_) and
``cache="paged"`` (PagedKVCache through the "tts_paged" attention), the latter with 4-token
blocks so that prompts and beams end in partial, shared, copy-on-write tail blocks.
"""
from __future__ import annotations

import functools
import importlib
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.utils import logging as hf_logging  # noqa: E402

from tts_kernels.search import FROM_MODEL, beam_search  # noqa: E402

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min)

bs_mod = importlib.import_module("tts_kernels.search.beam_search")  # the module, not the function
steps_mod = importlib.import_module("tts_kernels.search.beam_steps")  # the search loop
dec_mod = importlib.import_module("tts_kernels.models.hf_decoding")  # the model plumbing (cache reorders)

hf_logging.set_verbosity_error()
EOS, EOS2 = 5, 7
KINDS = ("llama", "qwen2", "gpt2")
CACHES = ("dense", "paged")


def _build(kind: str, seed: int, dtype: torch.dtype, bias: tuple[tuple[int, float], ...]):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(seed)
    if kind == "llama":
        h, V = 32, 300
        model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=h, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))
    elif kind == "qwen2":
        h, V = 48, 512
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=h, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))
    elif kind == "mistral":  # a 3-token sliding window, shorter than every sequence in the tests
        h, V = 32, 300
        model = MistralForCausalLM(MistralConfig(vocab_size=V, hidden_size=h, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, sliding_window=3))
    elif kind == "qwen2_sliding":  # layer 0 full attention, layer 1 a 3-token window
        h, V = 48, 512
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=h, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                             sliding_window=3, max_window_layers=1))
    else:
        h, V = 64, 1000
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=h, n_layer=2, n_head=4, n_positions=128))
    model = model.eval().to(dtype)
    if bias:
        # A biased copy of the LM head: makes chosen tokens likely (or impossible) without touching the rest.
        head = torch.nn.Linear(h, V, bias=True).to(dtype)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            for tok, b in bias:
                head.bias[tok] = b
        model.lm_head = head
    return model


@functools.cache
def tiny(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32, bias=((EOS, 1.5),)):
    return _build(kind, seed, dtype, bias)


def prompts(model, B: int, L: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = min(8, model.config.vocab_size - 1)  # keep clear of the special ids used here
    return torch.randint(low, model.config.vocab_size, (B, L), generator=g)


def left_padded(model, lengths, seed: int, pad: int = 0):
    ids = prompts(model, len(lengths), max(lengths), seed)
    mask = torch.ones_like(ids)
    for i, n in enumerate(lengths):
        ids[i, : max(lengths) - n] = pad
        mask[i, : max(lengths) - n] = 0
    return ids, mask


def generate(model, input_ids, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids, do_sample=False, output_scores=True, return_dict_in_generate=True, **kw)


def assert_matches(model, input_ids, *, sync_every: int = 4, cache: str = "dense", block_size: int = 4, **kw):
    """Run both, compare everything generate() returns that beam_search claims; returns generate()'s output."""
    ref = generate(model, input_ids, **kw)
    ours = beam_search(model, input_ids, sync_every=sync_every, cache=cache, block_size=block_size, **kw)
    assert ours.sequences.shape == ref.sequences.shape, (ours.sequences, ref.sequences)
    assert torch.equal(ours.sequences, ref.sequences), (ours.sequences, ref.sequences)
    ref_scores = getattr(ref, "sequences_scores", None)
    if ref_scores is None:  # num_beams=1: generate() runs greedy search and returns no scores
        assert ours.sequences_scores is None and ours.beam_indices is None
    else:
        assert ours.sequences_scores.dtype == torch.float32
        # 1e-5: the fused kernel's log-softmax may differ from torch's in the last bit of each step's
        # term, and up to max_new_tokens such terms are summed (about 12 * 6e-8 * |score| here).
        torch.testing.assert_close(ours.sequences_scores, ref_scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(ours.beam_indices, ref.beam_indices), (ours.beam_indices, ref.beam_indices)
    return ref


# ----------------------------------------------------------------------------- equality with generate()

@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.5, 2.0])
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cache", CACHES)
def test_matches_generate_eos_often(kind, early_stopping, length_penalty, cache):
    model = tiny(kind)
    finished_early = 0
    for num_beams in (2, 3, 5):
        for seed in (0, 1):
            ids = prompts(model, 2, 5 + seed, seed)
            ref = assert_matches(model, ids, cache=cache, num_beams=num_beams, max_new_tokens=9, eos_token_id=EOS,
                                 pad_token_id=None, early_stopping=early_stopping, length_penalty=length_penalty,
                                 num_return_sequences=2)
            finished_early += int((ref.sequences[:, ids.shape[1]:] == EOS).any())
    assert finished_early > 0  # the EOS bookkeeping really ran


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_beams", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("cache", CACHES)
def test_matches_generate_num_beams(kind, num_beams, cache):
    model = tiny(kind, seed=1)
    for nrs in sorted({1, num_beams}):
        ids = prompts(model, 2, 6, num_beams)
        assert_matches(model, ids, cache=cache, num_beams=num_beams, max_new_tokens=10, eos_token_id=EOS,
                       pad_token_id=None, num_return_sequences=nrs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cache", CACHES)
def test_eos_never_hit(kind, cache):
    model = tiny(kind, bias=((EOS, -40.0),))
    ids = prompts(model, 2, 7, 3)
    for es in (True, False, "never"):
        ref = assert_matches(model, ids, cache=cache, num_beams=4, max_new_tokens=8, eos_token_id=EOS,
                             pad_token_id=None, early_stopping=es, num_return_sequences=3)
        assert ref.sequences.shape[1] == 7 + 8


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cache", CACHES)
def test_no_eos(kind, cache):
    model = tiny(kind, seed=2)
    ids = prompts(model, 3, 4, 4)
    for lp in (1.0, 2.0):
        ref = assert_matches(model, ids, cache=cache, num_beams=3, max_new_tokens=7, eos_token_id=None,
                             pad_token_id=None, length_penalty=lp, num_return_sequences=2)
        assert ref.sequences.shape[1] == 4 + 7


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cache", CACHES)
def test_two_eos_ids(kind, cache):
    model = tiny(kind, seed=3, bias=((EOS, 1.2), (EOS2, 1.2)))
    for es in (True, False, "never"):
        for lp in (1.0, -0.5):
            ids = prompts(model, 2, 5, 7)
            ref = assert_matches(model, ids, cache=cache, num_beams=3, max_new_tokens=9, eos_token_id=[EOS, EOS2],
                                 pad_token_id=1, early_stopping=es, length_penalty=lp, num_return_sequences=3)
            assert torch.isin(ref.sequences[:, 5:], torch.tensor([EOS, EOS2])).any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cache", CACHES)
def test_left_padded_batch(kind, cache):
    model = tiny(kind, seed=4)
    ids, mask = left_padded(model, [3, 7, 5], seed=5, pad=0)
    for num_beams in (1, 2, 4):
        assert_matches(model, ids, cache=cache, attention_mask=mask, num_beams=num_beams, max_new_tokens=8,
                       eos_token_id=EOS, pad_token_id=0, num_return_sequences=1 if num_beams == 1 else 2)


@pytest.mark.parametrize("cache", CACHES)
def test_sliding_window_models(cache):
    for kind in ("mistral", "qwen2_sliding"):
        model = tiny(kind, seed=8)
        ids, mask = left_padded(model, [6, 2, 4], seed=11, pad=0)
        for K in (1, 3):
            assert_matches(model, ids, cache=cache, attention_mask=mask, num_beams=K, max_new_tokens=8,
                           eos_token_id=EOS, pad_token_id=0, num_return_sequences=1 if K == 1 else 2)


@pytest.mark.parametrize("cache", CACHES)
def test_mask_inferred_from_pad_token(cache):
    # No attention_mask: generate() infers it from the pad token (pad not an EOS id).
    model = tiny("llama", seed=4)
    ids, _ = left_padded(model, [4, 6, 2], seed=6, pad=1)
    assert_matches(model, ids, cache=cache, num_beams=3, max_new_tokens=6, eos_token_id=EOS, pad_token_id=1)


def test_fill_value_precedence():
    # generate(): output_fill_value = (pad or eos[0]) if eos is not None else -1, so pad 0 fills with EOS.
    model = tiny("llama")
    ids = prompts(model, 2, 5, 0)
    for pad, fill in ((0, EOS), (3, 3), (None, EOS)):
        ref = assert_matches(model, ids, num_beams=3, max_new_tokens=9, eos_token_id=[EOS, EOS2],
                             pad_token_id=pad, num_return_sequences=3)
        past_end = ref.beam_indices == -1
        assert past_end.any()  # some returned hypothesis is shorter than the output
        assert (ref.sequences[:, 5:][past_end] == fill).all()


def test_defaults_from_generation_config():
    # Not passing eos/pad means the model's generation_config values, as with generate().
    model = tiny("llama", seed=5, bias=((2, 1.5),))  # LlamaConfig's default eos_token_id is 2
    assert model.generation_config.eos_token_id == 2
    ids = prompts(model, 2, 5, 8)
    ref = generate(model, ids, num_beams=3, max_new_tokens=9, num_return_sequences=2)
    ours = beam_search(model, ids, num_beams=3, max_new_tokens=9, num_return_sequences=2)
    assert ours.sequences.shape[1] < 5 + 9 and torch.equal(ours.sequences, ref.sequences)
    torch.testing.assert_close(ours.sequences_scores, ref.sequences_scores, rtol=1e-5, atol=1e-5)
    # ... and None means none, again as with generate().
    none = beam_search(model, ids, num_beams=3, max_new_tokens=9, eos_token_id=None, pad_token_id=None)
    assert none.sequences.shape[1] == 5 + 9
    assert repr(FROM_MODEL) == "FROM_MODEL"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cache", CACHES)
def test_float64_models(kind, cache):
    model = tiny(kind, seed=6, dtype=torch.float64)
    ids, mask = left_padded(model, [5, 3], seed=9)
    for es, lp in ((True, 1.0), (False, 2.0), ("never", -0.5), ("never", 2.0)):
        assert_matches(model, ids, cache=cache, attention_mask=mask, num_beams=4, max_new_tokens=10, eos_token_id=EOS,
                       pad_token_id=0, early_stopping=es, length_penalty=lp, num_return_sequences=2)


@pytest.mark.parametrize("cache", CACHES)
def test_small_vocab_first_step_expanded(cache):
    # V < C = 2K: the first step cannot use the single-row shortcut and expands like generate().
    small = _build_small_vocab()
    ids = torch.randint(2, 8, (2, 4), generator=torch.Generator().manual_seed(1))
    for K in (3, 5):
        for eos in (None, 1, [1, 3]):
            assert_matches(small, ids, cache=cache, num_beams=K, max_new_tokens=6, eos_token_id=eos, pad_token_id=0,
                           num_return_sequences=2)


@functools.cache
def _build_small_vocab():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval().double()


@pytest.mark.parametrize("sync_every", [1, 2, 4, 100])
@pytest.mark.parametrize("cache", CACHES)
def test_result_independent_of_sync_interval(sync_every, cache):
    # Steps run after generate() would have stopped must not change anything.
    model = tiny("qwen2", seed=7, bias=((EOS, 2.5),))
    ids = prompts(model, 3, 5, 10)
    for es, lp in ((True, 1.0), (True, 2.0), (False, 1.0), (False, -0.5), ("never", -0.5), ("never", 0.0)):
        # lp = 2 favours long hypotheses: a finished set that is full (early_stopping=True) must
        # not take the better ones found after generate() would have stopped.
        assert_matches(model, ids, cache=cache, sync_every=sync_every, num_beams=3, max_new_tokens=16, eos_token_id=EOS,
                       pad_token_id=None, early_stopping=es, length_penalty=lp, num_return_sequences=2)


@pytest.mark.parametrize("cache", CACHES)
def test_inference_mode(cache):
    model = tiny("llama")
    ids = prompts(model, 2, 5, 0)
    with torch.inference_mode():
        assert_matches(model, ids, cache=cache, num_beams=3, max_new_tokens=6, eos_token_id=EOS, pad_token_id=None)


def _sweep_case(rng):
    import random  # noqa: F401  (rng is a random.Random)

    kind = rng.choice(KINDS)
    eos_mode = rng.choice(["none", "one", "two", "model"])
    bias = () if eos_mode == "none" else ((EOS, rng.choice([0.0, 1.0, 2.0])), (EOS2, rng.choice([0.0, 1.5])))
    K = rng.randint(1, 5)
    B, L = rng.randint(1, 3), rng.randint(2, 8)
    kw = dict(num_beams=K, max_new_tokens=rng.randint(1, 12), early_stopping=rng.choice([True, False, "never"]),
              length_penalty=rng.choice([1.0, 0.0, -0.5, 2.0]), num_return_sequences=rng.randint(1, K),
              pad_token_id=rng.choice([None, 0, 1]))
    if eos_mode != "model":
        kw["eos_token_id"] = {"none": None, "one": EOS, "two": [EOS, EOS2]}[eos_mode]
    return kind, rng.randint(0, 3), bias, B, L, kw, rng.choice([1, 2, 4, 100]), rng.random() < 0.4


@pytest.mark.parametrize("chunk", range(4))
@pytest.mark.parametrize("cache", CACHES)
def test_random_sweep(chunk, cache):
    """Seeded random configurations, 40 per chunk: every option against generate() together."""
    import random

    rng = random.Random(1234)
    cases = [_sweep_case(rng) for _ in range(160)][chunk * 40:(chunk + 1) * 40]
    for i, (kind, seed, bias, B, L, kw, sync_every, padded) in enumerate(cases):
        model = tiny(kind, seed=seed, bias=bias)
        ids = prompts(model, B, L, seed * 100 + i)
        mask = None
        if padded and B > 1:
            ids, mask = left_padded(model, [L - j % L for j in range(B)], seed=i, pad=0)
        try:
            assert_matches(model, ids, cache=cache, block_size=(1, 2, 4, 16)[i % 4], attention_mask=mask,
                           sync_every=sync_every, **kw)
        except AssertionError as e:
            raise AssertionError(f"case {chunk * 40 + i}: {kind} seed={seed} bias={bias} B={B} L={L} {kw} "
                                 f"sync_every={sync_every} padded={mask is not None}") from e


# ----------------------------------------------------------------------------- how it runs

def _forward_shapes(model):
    shapes = []
    handle = model.register_forward_pre_hook(
        lambda mod, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    return shapes, handle


def test_prefills_prompt_once_then_one_token_per_beam():
    model = tiny("llama", bias=((EOS, -40.0),))
    B, L, K, N = 3, 6, 4, 5
    ids = prompts(model, B, L, 0)
    shapes, handle = _forward_shapes(model)
    try:
        beam_search(model, ids, num_beams=K, max_new_tokens=N, eos_token_id=EOS, pad_token_id=None)
        ours = list(shapes)
        shapes.clear()
        generate(model, ids, num_beams=K, max_new_tokens=N, eos_token_id=EOS, pad_token_id=None)
        peer = list(shapes)
    finally:
        handle.remove()
    assert ours == [(B, L)] + [(B * K, 1)] * (N - 1)
    assert peer[0] == (B * K, L)  # generate() prefills every prompt K times


def test_one_kv_reorder_per_step(monkeypatch):
    model = tiny("gpt2", bias=((EOS, -40.0),))
    calls = []
    real = dec_mod.kv_reorder_

    def counting(tensors, parents, **kw):
        calls.append((len(tensors), tuple(parents.shape)))
        return real(tensors, parents, **kw)

    monkeypatch.setattr(dec_mod, "kv_reorder_", counting)
    B, K, N = 2, 3, 6
    beam_search(model, prompts(model, B, 4, 0), num_beams=K, max_new_tokens=N, eos_token_id=EOS, pad_token_id=None)
    layers = model.config.n_layer
    assert calls == [(2 * layers, (B * K,))] * (N - 1)


def test_paged_mode_moves_block_tables_not_kv(monkeypatch):
    from tts_kernels.models import hf_paged

    model = tiny("llama", bias=((EOS, -40.0),))
    before = model.config._attn_implementation
    calls, pools = {"reorder": 0, "kv_reorder_": 0, "free": 0}, []
    real_reorder, real_free = hf_paged.PagedCache.reorder, hf_paged.PagedCache.free

    def reorder(self, parents):
        calls["reorder"] += 1
        return real_reorder(self, parents)

    def free(self):
        calls["free"] += 1
        pools.append(self.kv)
        return real_free(self)

    monkeypatch.setattr(hf_paged.PagedCache, "reorder", reorder)
    monkeypatch.setattr(hf_paged.PagedCache, "free", free)
    monkeypatch.setattr(dec_mod, "kv_reorder_", lambda *a, **k: calls.__setitem__("kv_reorder_", 1))
    B, K, N = 2, 3, 6
    beam_search(model, prompts(model, B, 5, 0), num_beams=K, max_new_tokens=N, eos_token_id=EOS, pad_token_id=None,
                cache="paged", block_size=2)
    assert calls == {"reorder": N - 1, "kv_reorder_": 0, "free": 1}
    assert pools[0].num_free_blocks == pools[0].num_blocks  # every block went back to the pool
    assert model.config._attn_implementation == before      # the model's attention is restored


def test_host_reads_are_rare(monkeypatch):
    # The loop may read device data only for the stop check every sync_every steps (plus the end).
    model = tiny("llama")
    here = {bs_mod.__file__, steps_mod.__file__, dec_mod.__file__}
    reads = []

    def counted(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if sys._getframe(1).f_code.co_filename in here:
                reads.append(name)
            return real(self, *a, **k)
        return wrapper

    for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    ids = prompts(model, 2, 5, 0)
    N, every = 24, 4
    before_loop = 3  # attention-mask checks (values, right padding, all ones)
    beam_search(model, ids, num_beams=3, max_new_tokens=N, eos_token_id=EOS, pad_token_id=None, sync_every=every,
                early_stopping="never", length_penalty=2.0)  # "never" + lp > 0: runs all N steps
    assert len(reads) <= before_loop + (N - 1) // every + 1, reads  # + 1: the output length, at the end


def test_warns_about_generation_config_it_ignores():
    model = _build("llama", 0, torch.float32, ())
    model.generation_config.repetition_penalty = 1.3
    with pytest.warns(UserWarning, match="repetition_penalty"):
        beam_search(model, prompts(model, 1, 4, 0), num_beams=2, max_new_tokens=2, eos_token_id=None)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(num_beams=0), ValueError, "num_beams"),
    (dict(num_beams=2.0), TypeError, "num_beams"),
    (dict(num_beams=True), TypeError, "num_beams"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(num_return_sequences=3), ValueError, "num_return_sequences"),
    (dict(num_return_sequences=0), ValueError, "num_return_sequences"),
    (dict(length_penalty="1"), TypeError, "length_penalty"),
    (dict(length_penalty=float("nan")), ValueError, "length_penalty"),
    (dict(early_stopping="always"), ValueError, "early_stopping"),
    (dict(early_stopping=1), ValueError, "early_stopping"),
    (dict(eos_token_id=-1), ValueError, "eos_token_id"),
    (dict(eos_token_id=[]), TypeError, "eos_token_id"),
    (dict(eos_token_id=2.5), TypeError, "eos_token_id"),
    (dict(pad_token_id="0"), TypeError, "pad_token_id"),
    (dict(sync_every=0), ValueError, "sync_every"),
    (dict(cache="static"), ValueError, "cache"),
    (dict(cache="paged", block_size=0), ValueError, "block_size"),
    (dict(input_ids=torch.zeros(5, dtype=torch.long)), ValueError, "input_ids"),
    (dict(input_ids=torch.zeros(2, 5, dtype=torch.int32)), ValueError, "input_ids"),
    (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), ValueError, "input_ids"),
    (dict(input_ids=[[1, 2]]), TypeError, "input_ids"),
    (dict(attention_mask=torch.ones(2, 4, dtype=torch.long)), ValueError, "attention_mask"),
    (dict(attention_mask=torch.ones(2, 5)), TypeError, "attention_mask"),
    (dict(attention_mask=torch.full((2, 5), 2)), ValueError, "attention_mask"),
    (dict(attention_mask=torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])), ValueError, "right padding"),
])
def test_bad_input(kwargs, exc, match):
    model = tiny("llama")
    args = dict(input_ids=prompts(model, 2, 5, 0), num_beams=2, max_new_tokens=3)
    args.update(kwargs)
    input_ids = args.pop("input_ids")
    with pytest.raises(exc, match=match):
        beam_search(model, input_ids, **args)


def test_bad_model():
    with pytest.raises(TypeError, match="model"):
        beam_search(object(), torch.zeros(1, 3, dtype=torch.long), num_beams=2, max_new_tokens=2)
