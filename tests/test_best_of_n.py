"""best_of_n over a tiny random Llama policy and PRM: exact against transformers where it must be."""
import pytest
import torch
from tiny_models import char_tokenizer, tiny_llama
from transformers import DynamicCache, LlamaForTokenClassification

from tts_kernels import sample
from tts_kernels.models.compat import ForwardArgs
from tts_kernels.models.policy import HFPolicy
from tts_kernels.models.prm import HFPRM
from tts_kernels.search import select_candidates
from tts_kernels.search.best_of_n import best_of_n, sample_completions

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min)

PROMPTS = ["Q: 12+30?\nA:", "Q: 2*3+1?\n\nA: let"]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def policy(tok):
    return HFPolicy(tiny_llama(3), tok)


@pytest.fixture(scope="module")
def prm(tok):
    return HFPRM(tiny_llama(4, cls=LlamaForTokenClassification, num_labels=2), tok, head="classifier")


def test_greedy_equals_generate(policy, tok):
    texts, ids, fins, _ = sample_completions(policy, PROMPTS, 3, max_new_tokens=12, temperature=0.0)
    for p, prompt in enumerate(PROMPTS):
        x = torch.tensor([tok(prompt).input_ids])
        ref = policy.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12,
                                    eos_token_id=policy.eos_token_ids, pad_token_id=0)[0, x.shape[1]:].tolist()
        for j in range(3):
            assert ids[p][j] == ref[: len(ids[p][j])] and (fins[p][j] == "eos" or len(ids[p][j]) == 12)


def test_sampled_tokens_equal_a_dense_loop(policy, tok):
    # The same sampling op and randomness over transformers' own dense cache, row layout
    # [prompt0 x n, prompt1 x n], no EOS within the budget: the tokens must be identical.
    n, T, seed = 4, 10, 11
    eos_before = policy.eos_token_ids
    policy.eos_token_ids = []
    try:
        _, ids, _, used = sample_completions(policy, PROMPTS, n, max_new_tokens=T, temperature=0.8, top_p=0.9,
                                             top_k=20, seed=seed)
    finally:
        policy.eos_token_ids = eos_before
    model = policy.model
    for p, prompt in enumerate(PROMPTS):
        x = torch.tensor([tok(prompt).input_ids]).repeat(n, 1)
        cache = DynamicCache(config=model.config)
        fwd = ForwardArgs(model)
        logits = model(**fwd(cache, input_ids=x, use_cache=True)).logits[:, -1]
        got = []
        for step in range(T):
            # Rows p*n .. p*n+n-1 of the batch: sample on the full layout so row indices match.
            full = torch.zeros(len(PROMPTS) * n, logits.shape[1])
            full[p * n:(p + 1) * n] = logits
            t, _ = sample(full, temperature=0.8, top_p=0.9, top_k=20, seed=torch.tensor(seed),
                          offset=torch.tensor(step))
            t = t[p * n:(p + 1) * n]
            got.append(t)
            logits = model(**fwd(cache, input_ids=t[:, None], use_cache=True)).logits[:, -1]
        got = torch.stack(got, 1).tolist()
        assert [ids[p][j] for j in range(n)] == got
    assert used == sum(len(tok(q).input_ids) for q in PROMPTS) + len(PROMPTS) * n * (T - 1)


def test_eos_and_stop_strings(policy, tok):
    # One row, a fixed seed: the same sample every time, up to where EOS or a stop cuts it.
    kw = dict(max_new_tokens=16, temperature=1.0, seed=5)
    _, ids, _, _ = sample_completions(policy, PROMPTS[:1], 1, **kw)
    seq = ids[0][0]
    k = next(i for i in range(3, len(seq)) if seq[i] not in seq[:i] and seq[i] not in policy.eos_token_ids)
    before = policy.eos_token_ids
    policy.eos_token_ids = [seq[k]]
    try:
        texts, ids, fins, used = sample_completions(policy, PROMPTS[:1], 1, sync_every=3, **kw)
        assert ids[0][0] == seq[: k + 1] and fins[0] == ["eos"]
        assert texts[0][0] == tok.decode(seq[:k])  # EOS not in the text
        # The row runs until the host looks after its EOS (after steps 2, 5, 8, ...) and then leaves
        # the batch: one decode after every sampled step before that look.
        decodes = -(-(k + 1) // 3) * 3 - 1
        assert used == len(tok(PROMPTS[0]).input_ids) + decodes
    finally:
        policy.eos_token_ids = before
    stop = tok.decode(seq[1:3])
    texts, ids, fins, _ = sample_completions(policy, PROMPTS[:1], 1, stop=[stop], sync_every=2, **kw)
    full = tok.decode([t for t in seq if t not in policy.eos_token_ids])
    assert fins[0] == ["stop"] and texts[0][0] == full[: full.find(stop) + len(stop)]


def _scores(res):
    return torch.tensor([[c.score for c in row] for row in res.candidates])


def test_best_of_n_selection_and_counts(policy, prm, tok):
    res = best_of_n(policy, prm, PROMPTS, n=5, max_new_tokens=20, temperature=1.0, seed=3, agg="min",
                    extract=lambda t: t[:1] or None)  # a toy extractor: the first character
    assert len(res.candidates) == 2 and all(len(c) == 5 for c in res.candidates)
    again = prm.score(PROMPTS, [[c.text for c in row] for row in res.candidates], agg="min")
    torch.testing.assert_close(_scores(res).flatten(), again.aggregate)
    assert res.compute.prm_tokens == again.tokens
    majority = select_candidates(res.candidates, "majority")[1]
    for p in range(2):
        scores = _scores(res)[p]
        assert res.chosen[p] == int(torch.argmax(torch.nan_to_num(scores, nan=-1e9)))
        assert res.predictions[p] == res.candidates[p][res.chosen[p]].answer
        answers = [c.answer for c in res.candidates[p]]
        counts = {a: answers.count(a) for a in answers if a is not None}
        if counts:
            top = max(counts.values())
            assert majority[p] == next(a for a in answers if counts.get(a) == top)
    again2 = best_of_n(policy, prm, PROMPTS, n=5, max_new_tokens=20, temperature=1.0, seed=3, agg="min",
                       extract=lambda t: t[:1] or None, select="majority")
    assert [[c.text for c in r] for r in again2.candidates] == [[c.text for c in r] for r in res.candidates]
    assert again2.predictions == majority
    other = best_of_n(policy, None, PROMPTS, n=5, max_new_tokens=20, temperature=1.0, seed=4, select="majority")
    assert [[c.text for c in r] for r in other.candidates] != [[c.text for c in r] for r in res.candidates]
    assert torch.isnan(_scores(other)).all() and other.compute.prm_tokens == 0


def test_bad_arguments(policy):
    with pytest.raises(ValueError, match="prompts"):
        best_of_n(policy, None, "one prompt", n=2, max_new_tokens=4, select="majority")
    with pytest.raises(ValueError, match="n must be"):
        best_of_n(policy, None, PROMPTS, n=0, max_new_tokens=4, select="majority")
    with pytest.raises(ValueError, match="stop must be"):
        best_of_n(policy, None, PROMPTS, n=2, max_new_tokens=4, stop="\n", select="majority")
    with pytest.raises(ValueError, match="top_p"):
        best_of_n(policy, None, PROMPTS, n=2, max_new_tokens=4, top_p=0.0, select="majority")
    with pytest.raises(ValueError, match="needs a verifier"):
        best_of_n(policy, None, PROMPTS, n=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="select must be"):
        best_of_n(policy, None, PROMPTS, n=2, max_new_tokens=4, select="first")
    with pytest.raises(TypeError, match="unknown setting"):
        best_of_n(policy, None, PROMPTS, n=2, max_tokens=4, select="majority")


def test_compute_accounting_by_hand(policy, prm, tok):
    # No EOS: every row runs all T steps. Policy: prompts prefilled once (causal keys L(L+1)/2),
    # then T-1 decodes of R = P*n rows, the row at position L+s attending L+s+1 keys. PRM: each
    # prompt once, then each completion's tokens on top of its prompt.
    n, T = 3, 6
    before = policy.eos_token_ids
    policy.eos_token_ids = []
    try:
        res = best_of_n(policy, prm, PROMPTS, n=n, max_new_tokens=T, seed=0)
    finally:
        policy.eos_token_ids = before
    from tts_kernels.models.text import split_steps
    from tts_kernels.search.accounting import count_flops

    L = [len(tok(p).input_ids) for p in PROMPTS]
    c = res.compute
    assert c.policy_prefill_tokens == sum(L)
    assert c.policy_generated_tokens == len(PROMPTS) * n * T
    tokens = sum(L) + len(PROMPTS) * n * (T - 1)
    keys = sum(x * (x + 1) // 2 for x in L) + sum(n * (x + s + 1) for x in L for s in range(T - 1))
    assert c.policy_flops == count_flops(policy.model, tokens, keys)
    Lp = [len(prm.encode_prompt(p)) for p in PROMPTS]
    prm_keys = sum(x * (x + 1) // 2 for x in Lp)
    for p, row in enumerate(res.candidates):
        for cand in row:
            m = len(prm.encode_steps(split_steps(cand.text))[0])
            prm_keys += m * Lp[p] + m * (m + 1) // 2
    assert c.prm_flops == count_flops(prm.base, c.prm_tokens, prm_keys)
    assert res.info["policy_forward_tokens"] == tokens
    assert c.total_flops == c.policy_flops + c.prm_flops > 0
