"""HFPRM: the three PRM head families on the paged cache against a plain full-sequence forward."""
import pytest
import torch
from tiny_models import biased_policy_model, char_tokenizer, tiny_llama
from transformers import LlamaForTokenClassification

from tts_kernels.models.prm import HFPRM, split_steps

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min)

PROMPTS = ["Q: 2+3*4?\n", "Q: what is 7-5?\n"]
COMPLETIONS = [
    ["2+3=5\n\n5*4=20\n\nThe answer is 20", "3*4=12\n\n2+12=14\n\nThe answer is 14", "14"],
    ["7-5=2\n\nThe answer is 2", "The answer is 3\n\n", "\n\n7-5=2\n\n\n\nx"],
]


def dense_scores(prm, prompt, completion):
    """What a PRM user does without us: one forward over the whole text, read every step end."""
    ids, ends = prm.encode_steps(split_steps(completion, prm.step_delimiter))
    p_ids = prm.encode_prompt(prompt)
    full = torch.tensor([p_ids + ids])
    with torch.no_grad():
        if prm.head_kind == "likelihood":  # log p of each completion token under the LM, reduced over the prefix
            logp = prm.model(full).logits[0].float().log_softmax(-1)
            n = len(p_ids)
            tok_lp = logp[n - 1:-1].gather(-1, full[0, n:, None])[:, 0]
            red = {"min": torch.min, "sum": torch.sum, "mean": torch.mean}[prm.reduce]
            return [float(red(tok_lp[: e + 1]).exp()) for e in ends]
        if prm.head_kind == "label_token":
            logits = prm.model(full).logits[0]
            good, bad = prm.weight_ids
            return [float(torch.softmax(logits[len(p_ids) + e, [good, bad]], 0)[0]) for e in ends]
        logits = prm.model(full).logits[0]
        if prm.head_kind == "value":
            return [float(torch.sigmoid(logits[len(p_ids) + e, 0])) for e in ends]
        return [float(torch.softmax(logits[len(p_ids) + e], 0)[prm.positive_class]) for e in ends]


def make(kind, reduce="min"):
    tok = char_tokenizer()
    if kind == "likelihood":  # an LM head with a bias, to cover it
        return HFPRM(biased_policy_model(tok, bias=1.0), tok, head="likelihood", reduce=reduce)
    if kind == "label_token":
        prm = HFPRM(tiny_llama(1), tok, head="label_token", step_tag="#", good_token="+", bad_token="-")
        prm.weight_ids = (tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-"))
        return prm
    labels = 2 if kind == "classifier" else 1
    model = tiny_llama(2, cls=LlamaForTokenClassification, num_labels=labels)
    return HFPRM(model, tok, head=kind, step_tag="\x0b" if kind == "classifier" else None)


@pytest.mark.parametrize("kind", ["label_token", "classifier", "value", "likelihood", "likelihood-sum",
                                  "likelihood-mean"])
@pytest.mark.parametrize("agg", ["last", "min", "prod", "mean"])
def test_scores_match_full_forward(kind, agg):
    prm = make(*kind.split("-"))
    out = prm.score(PROMPTS, COMPLETIONS, agg=agg)
    flat = []
    for p, (prompt, cs) in enumerate(zip(PROMPTS, COMPLETIONS)):
        for c, completion in enumerate(cs):
            want = dense_scores(prm, prompt, completion)
            got = out.step_scores[p][c]
            assert len(got) == len(want) == len(split_steps(completion))
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)
            fold = {"last": want[-1], "min": min(want), "prod": float(torch.tensor(want).prod()),
                    "mean": sum(want) / len(want)}[agg]
            flat.append(fold)
    torch.testing.assert_close(out.aggregate, torch.tensor(flat), rtol=1e-4, atol=1e-5)
    # Tokens: each prompt once, each completion once (the PRM never re-reads a prefix).
    n_prompt = sum(len(prm.encode_prompt(p)) for p in PROMPTS)
    n_steps = sum(len(prm.encode_steps(split_steps(c))[0]) for cs in COMPLETIONS for c in cs)
    assert out.tokens == n_prompt + n_steps


@pytest.mark.parametrize("kind", ["classifier", "likelihood"])
def test_incremental_steps_equal_one_pass(kind):
    prm = make(kind)
    completion = COMPLETIONS[0][0]
    steps = split_steps(completion)
    s = prm.start(PROMPTS[:1], agg="min")
    s.fork(torch.tensor([0, 0]))
    first = s.add_steps([steps[:1], steps[:2]])  # row 1 runs ahead by a step
    second = s.add_steps([steps[1:], steps[2:]])
    want = dense_scores(prm, PROMPTS[0], completion)
    torch.testing.assert_close(first[0, :1], torch.tensor(want[:1]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second[0, :2], torch.tensor(want[1:]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.aggregate, torch.tensor([min(want)] * 2), rtol=1e-4, atol=1e-5)
    assert s.count.tolist() == [3, 3]
    s.free()


def test_split_steps():
    assert split_steps("a\n\nb\n\n\n\nc\n\n") == ["a\n\n", "b\n\n", "c\n\n"]
    assert split_steps("") == []


def test_bad_configuration():
    tok = char_tokenizer()
    with pytest.raises(ValueError, match="head must be"):
        HFPRM(tiny_llama(), tok, head="reward")
    with pytest.raises(ValueError, match="good_token and bad_token"):
        HFPRM(tiny_llama(), tok, head="label_token")
    with pytest.raises(ValueError, match="single token"):
        HFPRM(tiny_llama(), tok, head="label_token", good_token="ok", bad_token="-")
    with pytest.raises(ValueError, match="ForTokenClassification"):
        HFPRM(tiny_llama(), tok, head="classifier")
    with pytest.raises(ValueError, match="needs 1 output"):
        HFPRM(tiny_llama(cls=LlamaForTokenClassification, num_labels=2), tok, head="value")
    with pytest.raises(ValueError, match="reduce must be"):
        HFPRM(tiny_llama(), tok, head="likelihood", reduce="max")
    with pytest.raises(ValueError, match="step_tag"):
        HFPRM(tiny_llama(), tok, head="likelihood", step_tag="#")
    with pytest.raises(ValueError, match="lm_head"):
        HFPRM(tiny_llama(cls=LlamaForTokenClassification, num_labels=2), tok, head="likelihood")


def test_likelihood_clone_continues_rows():
    # A clone of some rows scores their next steps as the original rows would.
    prm = make("likelihood", "mean")
    steps = split_steps(COMPLETIONS[0][1])
    s = prm.start(PROMPTS[:1], agg="last")
    s.fork(torch.tensor([0, 0, 0]))
    s.add_steps([steps[:1], steps[:2], []])
    c = s.clone(torch.tensor([1, 0]))
    got = c.add_steps([steps[2:], steps[1:]])
    want = dense_scores(prm, PROMPTS[0], COMPLETIONS[0][1])
    torch.testing.assert_close(got[0, :1], torch.tensor(want[2:]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1, :2], torch.tensor(want[1:]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c.aggregate, torch.tensor([want[-1], want[-1]]), rtol=1e-4, atol=1e-5)
    s.free()


def test_likelihood_benchmark_agrees_with_the_full_forward_recipe():
    # The benchmark's peer (full forward + full-vocabulary log_softmax per candidate) gives the same step
    # scores (run() raises otherwise), and ours runs each prompt once.
    from tts_kernels.bench.likelihood import run

    (row,) = run(quick=True, rounds=1)
    assert row["ours_tokens"] == row["peer_tokens"] - (4 - 1) * 2 * 16  # P=2 prompts of 16 tokens, N=4
