"""Any transformers decoder: the paged fast path on the architectures it is known exact for, and the
dense fallback (tts_kernels.models.fallback.DenseSession) everywhere else, both against generate().

Tiny randomly initialised models of each architecture in PAGED_ARCHITECTURES, with what makes each one
itself: Mistral and Qwen2 sliding windows (Qwen2 on one layer of two), Qwen3's q/k norms, Gemma 3's
sliding and full layers from ``layer_types`` (a 4-token window, shorter than every sequence here), q/k
norms, scaled embeddings, ``query_pre_attn_scalar`` != head_dim and a rope base per layer type, GPT-2's
learned positions. Gemma 2 (attention logit soft-capping, eager attention, a 4-token window) is the
architecture the paged attention does not know. Each must give, through HFPolicy (prefill of a
left-padded batch of prompts of different lengths, decodes, forks, clones), ``generate(do_sample=False)``
token for token (logits to 1e-4 relative), and through beam_search, ``generate(num_beams=4)``'s
sequences. The fallback session is checked against the paged one operation by operation (forks, paused
rows, ``rows=`` subsets, clones, truncation), on a sliding-window model too, where a paused row or a
roll-back must not shift the window.
"""
from __future__ import annotations

import functools
import logging
import warnings

import pytest
import torch

pytest.importorskip("transformers")
from tiny_models import CHARS, char_tokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from tts_kernels.models import PAGED_ARCHITECTURES, HFPolicy, paged_unsupported  # noqa: E402
from tts_kernels.search import Settings, beam_search, run  # noqa: E402

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min)

hf_logging.set_verbosity_error()
V = len(CHARS)
EOS = 2
PAGED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2")
UNKNOWN = "gemma2"
PROMPTS = ["The cat sat on a mat, then", "ab", "hello world", "x = 3 + 4 ="]


def _common(**kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=EOS)
    base.update(kw)
    return base


@functools.cache
def build(kind: str, seed: int = 0, **over):
    """A tiny random model of ``kind`` (its attention as transformers picks it: sdpa, eager for Gemma 2)."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**_common(**over)))
    elif kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**_common(sliding_window=4, **over)))
    elif kind == "qwen2":  # layer 0 full attention, layer 1 a 4-token window
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**_common(use_sliding_window=True, sliding_window=4,
                                                             max_window_layers=1, **over)))
    elif kind == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**_common(head_dim=16, **over)))
    elif kind == "gemma3_text":
        cfg = dict(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}})
        cfg.update(over)
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_common(**cfg)))
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                                 pad_token_id=0, bos_token_id=1, eos_token_id=EOS, **over))
    elif kind == "gemma2":  # soft-capped attention logits: only eager attention computes them
        cfg = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4, attn_logit_softcapping=1.0,
                   attn_implementation="eager")  # a cap the tiny model's attention logits reach
        cfg.update(over)
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**_common(**cfg)))
        with torch.no_grad():  # attention logits of order 1, so that the cap bites
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(8)
                layer.self_attn.k_proj.weight.mul_(8)
    else:
        raise ValueError(kind)
    return model.eval()


@functools.cache
def tok():
    return char_tokenizer()


def batch(prompts=PROMPTS):
    enc = tok()(prompts, padding=True, return_tensors="pt", padding_side="left")
    return enc.input_ids, enc.attention_mask, [tok()(p).input_ids for p in prompts]


def generate(model, ids, mask, **kw):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return model.generate(ids, attention_mask=mask, pad_token_id=0, return_dict_in_generate=True, **kw)


def policy(model, paged=None):
    return HFPolicy(model, tok(), block_size=4, paged=paged)


def assert_rel(a, b, tol=1e-4):
    err = float((a - b).abs().max() / b.abs().max())
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


# ----------------------------------------------------------------------------- which path

def test_allow_list_is_what_these_tests_check():
    assert PAGED_ARCHITECTURES == frozenset(build(k).config.model_type for k in PAGED)
    for kind in PAGED:
        assert paged_unsupported(build(kind)) is None
    reason = paged_unsupported(build(UNKNOWN))
    assert "'gemma2'" in reason and "Gemma2ForCausalLM" in reason and "llama" in reason
    # A known type with a feature the pool does not compute is not exact either.
    capped = build("gemma3_text", attn_logit_softcapping=50.0)
    assert "attn_logit_softcapping" in paged_unsupported(capped)
    assert "bidirectional" in paged_unsupported(build("gemma3_text", use_bidirectional_attention=True))


@pytest.mark.parametrize("kind", PAGED + (UNKNOWN,))
def test_policy_picks_the_path_once(kind, caplog):
    model = build(kind)
    with caplog.at_level(logging.INFO, logger="tts_kernels"):
        pol = policy(model)
        session = pol.start(batch()[2], rows_hint=4, max_new_tokens=4)
        session.fork(torch.tensor([0, 0, 1, 2, 3]))
        session.decode(session.logits.argmax(-1))
        session.free()
    notes = [r for r in caplog.records if r.name == "tts_kernels"]
    if kind == UNKNOWN:
        assert not pol.paged and pol.model.config._attn_implementation == "eager"  # left as it was
        assert len(notes) == 1 and notes[0].levelno == logging.WARNING
        msg = notes[0].getMessage()
        assert "paged fast path is off" in msg and "'gemma2'" in msg and "DynamicCache" in msg
    else:
        assert pol.paged and pol.model.config._attn_implementation == "tts_paged"
        assert notes == []


def test_paged_true_on_an_unknown_architecture_raises():
    with pytest.raises(ValueError, match=r"paged=True.*'gemma2'.*supported: gemma3_text"):
        policy(build(UNKNOWN), paged=True)
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        policy(build("gemma3_text", attn_logit_softcapping=50.0), paged=True)
    with pytest.raises(TypeError, match="paged"):
        policy(build("llama"), paged="yes")


def test_prm_refuses_an_unknown_architecture():
    from tts_kernels.models import HFPRM

    with pytest.raises(ValueError, match=r"HFPRM.*'gemma2' \(Gemma2ForCausalLM\).*supported: gemma3_text, gpt2, llama"):
        HFPRM(build(UNKNOWN), tok(), head="likelihood")


def test_forced_fallback_is_logged_at_info_only(caplog):
    with caplog.at_level(logging.INFO, logger="tts_kernels"):
        pol = policy(build("llama"), paged=False)
    assert not pol.paged
    assert [r.levelno for r in caplog.records if r.name == "tts_kernels"] == [logging.INFO]


# ----------------------------------------------------------------------------- greedy through HFPolicy == generate()

@pytest.mark.parametrize("kind, paged", [(k, p) for k in PAGED for p in (True, False)] + [(UNKNOWN, False)],
                         ids=[f"{k}-{p}" for k in PAGED for p in ("paged", "dense")] + [f"{UNKNOWN}-dense"])
def test_greedy_policy_matches_generate(kind, paged):
    model = build(kind)
    N = 12
    ids, mask, prompt_ids = batch()
    ref = generate(model, ids, mask, max_new_tokens=N, do_sample=False, eos_token_id=None, output_logits=True)
    want = ref.sequences[:, ids.shape[1]:]
    pol = policy(model, paged=None if kind == UNKNOWN else paged)
    assert pol.paged == paged
    session = pol.start(prompt_ids, rows_hint=8, max_new_tokens=N)
    origin = list(range(len(PROMPTS)))  # the prompt each row continues
    clone = None
    for t in range(N):
        assert_rel(session.logits, ref.logits[t][origin])
        nxt = session.logits.argmax(-1)
        assert torch.equal(nxt, want[origin, t]), (kind, t)
        session.decode(nxt)
        if t == 2:  # fork: reorder, repeat, drop
            rows = [3, 0, 0, 2, 1, 3]
            session.fork(torch.tensor(rows))
            origin = [origin[r] for r in rows]
        if t == 5:  # a clone continues two rows on its own; this session is unchanged
            clone, corigin = session.clone(torch.tensor([4, 1])), [origin[4], origin[1]]
        if clone is not None and t >= 5 and t + 1 < N:
            assert_rel(clone.logits, ref.logits[t + 1][corigin])
            clone.decode(clone.logits.argmax(-1))
    assert session.rows == 6 and clone.rows == 2
    assert pol.kv_ledger.sessions == 1 and (pol.kv_ledger.blocks > 0) == paged
    clone.free()
    session.free()
    assert pol.kv_ledger.sessions == 0 and pol.kv_ledger.blocks == 0


# ----------------------------------------------------------------------------- beam search == generate(num_beams=4)

@pytest.mark.parametrize("kind", PAGED + (UNKNOWN,))
def test_beam_search_matches_generate(kind, caplog):
    model = build(kind)
    ids, mask, _ = batch()
    kw = dict(num_beams=4, max_new_tokens=10, eos_token_id=EOS, num_return_sequences=2)
    ref = generate(model, ids, mask, do_sample=False, output_scores=True, **kw)
    attn = model.config._attn_implementation
    with caplog.at_level(logging.WARNING, logger="tts_kernels"):
        ours = beam_search(model, ids, attention_mask=mask, pad_token_id=0, cache="paged", block_size=4, **kw)
    assert model.config._attn_implementation == attn
    assert torch.equal(ours.sequences, ref.sequences)
    torch.testing.assert_close(ours.sequences_scores, ref.sequences_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.beam_indices, ref.beam_indices)
    fell_back = [r for r in caplog.records if r.name == "tts_kernels" and "paged fast path is off" in r.getMessage()]
    assert len(fell_back) == (kind == UNKNOWN)
    # The same search on the policy's own sessions (paged, or the dense fallback).
    on_policy = beam_search(policy(model), ids, attention_mask=mask, pad_token_id=0, **kw)
    assert torch.equal(on_policy.sequences, ref.sequences)


# ----------------------------------------------------------------------------- the fallback session, op by op

@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])
def test_dense_session_matches_paged_session(kind):
    """Every PolicySession operation the searches use, on the fallback and the paged path side by side:
    forks, paused rows (``active``), ``rows=`` subsets, clones, truncation. On Gemma 3 (4-token window)
    the paused rows' and rolled-back rows' windows must count real tokens only, as on the pool."""
    model = build(kind)
    paged, dense = policy(model, paged=True), policy(model, paged=False)
    _, _, prompt_ids = batch()
    a, b = paged.start(prompt_ids, rows_hint=8, max_new_tokens=24), dense.start(prompt_ids, rows_hint=8,
                                                                                    max_new_tokens=24)
    g = torch.Generator().manual_seed(0)
    hist = [list(p) for p in prompt_ids]  # each row's tokens (host), to pick roll-back points

    def check():
        assert a.rows == b.rows
        assert_rel(b.logits, a.logits)
        assert torch.equal(a.positions, b.positions)
        assert b.positions.tolist() == [len(h) for h in hist]

    def decode(active=None, rows=None):
        toks = torch.randint(8, V, (a.rows,), generator=g)
        a.decode(toks, active=active, rows=rows)
        b.decode(toks, active=active, rows=rows)
        go = torch.ones(a.rows, dtype=torch.bool) if active is None else active.clone()
        if rows is not None:
            go &= torch.zeros(a.rows, dtype=torch.bool).index_fill_(0, rows, True)
        for r in range(a.rows):
            if go[r]:
                hist[r].append(int(toks[r]))
        check()

    check()
    for _ in range(3):
        decode()
    rows = torch.tensor([3, 0, 0, 2, 1, 3])
    a.fork(rows)
    b.fork(rows)
    hist = [list(hist[r]) for r in rows.tolist()]
    check()
    for step in range(8):  # rows pause and resume; some steps run only a subset of rows
        active = torch.rand(a.rows, generator=g) < 0.6
        decode(active=active, rows=torch.tensor([0, 2, 3, 5]) if step % 3 == 1 else None)
    ca, cb = a.clone(torch.tensor([5, 1])), b.clone(torch.tensor([5, 1]))
    chist = [list(hist[5]), list(hist[1])]
    for _ in range(2):
        toks = torch.randint(8, V, (2,), generator=g)
        ca.decode(toks)
        cb.decode(toks)
        for r in range(2):
            chist[r].append(int(toks[r]))
        assert_rel(cb.logits, ca.logits)
    check()  # the originals are unchanged by their clones
    cut = torch.tensor([1, 4])
    lengths = torch.tensor([len(prompt_ids[0]) + 2, 3])  # one row keeps more than the window, one less
    last = torch.tensor([hist[1][int(lengths[0]) - 1], hist[4][2]])
    a.truncate(cut, lengths, last)
    b.truncate(cut, lengths, last)
    hist[1], hist[4] = hist[1][: int(lengths[0])], hist[4][:3]
    check()
    for _ in range(5):  # longer than the window again after the roll-back
        decode(active=torch.rand(a.rows, generator=g) < 0.8)
    assert b.tokens > 0 and int(b.keys) > 0 and b.prefill_tokens == sum(len(p) for p in prompt_ids)
    for s in (ca, cb, a, b):
        s.free()
    assert dense.kv_ledger.sessions == paged.kv_ledger.sessions == 0


def test_window_is_exercised():
    # The sequences above are longer than Gemma 3's 4-token window: the same weights with a wide window
    # give other logits, so the window semantics are really compared.
    narrow, wide = build("gemma3_text"), build("gemma3_text", sliding_window=64)
    ids, mask, _ = batch()
    with torch.no_grad():
        x = narrow(ids, attention_mask=mask).logits[:, -1]
        y = wide(ids, attention_mask=mask).logits[:, -1]
    assert float((x - y).abs().max()) > 1e-3


def test_gemma2_softcapping_is_exercised():
    # Gemma 2's soft-capped attention changes its logits here: an attention that ignored it (sdpa, or the
    # pool) would give a wrong answer, which is why the fallback keeps the model's own (eager) attention.
    ids, mask, _ = batch()
    with torch.no_grad():
        x = build(UNKNOWN)(ids, attention_mask=mask).logits[:, -1]
        y = build(UNKNOWN, attn_logit_softcapping=None)(ids, attention_mask=mask).logits[:, -1]
    assert float((x - y).abs().max()) > 1e-3


# ----------------------------------------------------------------------------- searches on the fallback

SAMPLING = Settings(max_new_tokens=10, temperature=1.0, step_delimiter=" ")


def extract(text):
    return text.strip()[:1] or None


@functools.cache
def tiny_prm():
    from tiny_models import tiny_llama
    from transformers import LlamaForTokenClassification

    from tts_kernels.models import HFPRM

    return HFPRM(tiny_llama(4, cls=LlamaForTokenClassification, num_labels=2), tok(), head="classifier")


def test_sampling_strategies_run_on_the_fallback():
    pol = policy(build(UNKNOWN))
    assert not pol.paged
    prompts = PROMPTS[:3]
    maj = run("majority", pol, None, prompts, budget=4, settings=SAMPLING, seed=0, extract=extract)
    best = run("best_of_n", pol, tiny_prm(), prompts, budget=4, settings=SAMPLING, seed=0, extract=extract)
    for res in (maj, best):
        assert len(res.predictions) == 3 and all(len(c) == 4 for c in res.candidates)
        assert res.compute.policy_prefill_tokens == sum(len(tok()(p).input_ids) for p in prompts)
    # Same samples either way (same seed, same logits); only the pick differs.
    assert [[c.text for c in cs] for cs in maj.candidates] == [[c.text for c in cs] for cs in best.candidates]
    assert pol.kv_ledger.sessions == 0


@pytest.mark.parametrize("name", ["best_of_n", "particle_gibbs"])
def test_fallback_samples_what_the_paged_path_samples(name):
    # A Llama forced onto the fallback draws the same candidates as on the pool (same seed, logits equal to
    # float rounding); particle Gibbs rolls rows back (truncate) and pauses rows between steps.
    model = build("llama", seed=3)
    settings = Settings(max_new_tokens=12, max_step_tokens=5, temperature=1.0, step_delimiter=" ", num_iterations=3)
    got = {}
    for paged in (True, False):
        res = run(name, policy(model, paged=paged), tiny_prm(), PROMPTS[:2], budget=4, settings=settings, seed=1,
                  extract=extract)
        got[paged] = ([[c.text for c in cs] for cs in res.candidates], res.predictions)
    assert got[True] == got[False]
