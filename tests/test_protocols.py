"""The search protocols as code: the transformers adapters and a scripted fake both satisfy them, and
every search runs on the fake alone (no transformers model), so a new backend knows what to implement."""
import itertools
import math

import pytest
import torch
from scripted import ScriptedPolicy, ScriptedVerifier, step_score
from tiny_models import char_tokenizer, tiny_llama

from tts_kernels.models.text import split_steps
from tts_kernels.search import (STRATEGIES, Policy, PolicySession, SearchResult, Settings, Verifier, VerifierSession,
                                beam_search, run, run_together)

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min)

PROMPTS = ["abc", "h.", "ggg a"]
S = Settings(max_new_tokens=12, max_step_tokens=6, num_iterations=3, step_delimiter=".", temperature=1.0, levels=2,
             beam_width=2)


def extract(text):
    return text[:1] or None  # toy answers: the first character


def fakes(**kw):
    # "." ends steps often, EOS rarely: searches run several iterations.
    return ScriptedPolicy(boost={".": 1.5, 1: -1.0}, **kw), ScriptedVerifier()


def test_adapters_and_fake_satisfy_the_protocols():
    from transformers import LlamaForTokenClassification

    from tts_kernels.models import HFPRM, HFPolicy

    tok = char_tokenizer()
    policy, prm = HFPolicy(tiny_llama(0), tok), HFPRM(tiny_llama(1, cls=LlamaForTokenClassification, num_labels=2),
                                                     tok, head="classifier")
    fake_policy, fake_verifier = fakes()
    for pol in (policy, fake_policy):
        assert isinstance(pol, Policy)
        session = pol.start([pol.encode("ab")], rows_hint=2, max_new_tokens=4)
        try:
            assert isinstance(session, PolicySession)
            assert isinstance(session.clone(torch.tensor([0])), PolicySession)
        finally:
            session.free()
    for ver in (prm, fake_verifier):
        assert isinstance(ver, Verifier)
        session = ver.start(["ab"], agg="last", rows=1, max_new_tokens=4)
        try:
            assert isinstance(session, VerifierSession)
        finally:
            session.free()
    # Structural checks fail for what lacks a member: a policy without start, a verifier without score_steps.
    assert not isinstance(prm, Policy) and not isinstance(policy, Verifier)
    assert not isinstance(object(), Policy)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_runs_on_the_fake(name):
    policy, verifier = fakes()
    res = run(name, policy, verifier, PROMPTS, budget=4, settings=S, seed=1, extract=extract)
    assert isinstance(res, SearchResult) and res.strategy == name
    assert len(res.predictions) == len(res.candidates) == len(res.chosen) == len(res.prompt_info) == len(PROMPTS)
    for pred, chosen, cands in zip(res.predictions, res.chosen, res.candidates):
        assert cands and all(c.finish in ("eos", "stop", "length", "empty", "final") for c in cands)
        assert pred == (None if chosen is None else cands[chosen].answer)
        for c in cands:
            if name in ("prm_beam_search", "dvts"):  # steps as generated
                assert c.text == "".join(c.steps)
            elif c.token_ids is not None:  # sampled whole, split by the settings' delimiter
                assert c.steps == split_steps(c.text, S.step_delimiter)
            if c.step_scores:  # the fake's scores, as it defines them, on the steps the search split
                assert c.step_scores == pytest.approx([step_score(t) for t in c.steps], abs=1e-6)
    prompt_tokens = sum(len(p) for p in PROMPTS)
    assert res.compute.policy_flops > 0 and res.compute.policy_prefill_tokens >= prompt_tokens
    if name == "particle_gibbs":  # each sweep prefills the prompts, later ones also the references' completions
        sweeps = len(res.prompt_info[0]["sweeps"])
        assert res.compute.policy_prefill_tokens > sweeps * prompt_tokens and sweeps == 2
    elif name == "revise":  # the prompts once, then each revision its chain's history
        assert res.compute.policy_prefill_tokens > prompt_tokens
    elif name not in ("compute_optimal", "adaptive_best_of_n"):  # one run: each prompt prefilled once
        assert res.compute.policy_prefill_tokens == prompt_tokens
    assert 1 <= res.samples <= 4 * len(PROMPTS)
    # Reproducible, and every session it started was freed.
    again = run(name, policy, verifier, PROMPTS, budget=4, settings=S, seed=1, extract=extract)
    assert [[c.text for c in cs] for cs in again.candidates] == [[c.text for c in cs] for cs in res.candidates]
    assert policy.live_sessions == 0 and verifier.live_sessions == 0


def test_step_search_lookahead_runs_on_clones_of_the_fake():
    policy, verifier = fakes()
    res = run("prm_beam_search", policy, verifier, PROMPTS, budget=4, settings=S.replace(lookahead=2), seed=1,
              extract=extract)
    plain = run("prm_beam_search", policy, verifier, PROMPTS, budget=4, settings=S, seed=1, extract=extract)
    assert res.compute.prm_tokens > plain.compute.prm_tokens  # the rollouts were scored
    assert policy.live_sessions == 0 and verifier.live_sessions == 0


def test_sampling_group_shares_samples_on_the_fake():
    policy, verifier = fakes()
    got = run_together(["majority", "best_of_n", "weighted_best_of_n"], policy, verifier, PROMPTS, budget=6,
                       settings=S, seed=2, extract=extract)
    texts = {name: [[c.text for c in cs] for cs in r.candidates] for name, r in got.items()}
    assert texts["majority"] == texts["best_of_n"] == texts["weighted_best_of_n"]
    for p in range(len(PROMPTS)):
        cands = got["best_of_n"].candidates[p]
        assert got["best_of_n"].chosen[p] == max(range(len(cands)), key=lambda j: (cands[j].score, -j))


def _path_logprob(policy, prompt, tokens):
    session = policy.start([prompt], rows_hint=1, max_new_tokens=len(tokens))
    total = 0.0
    for t in tokens:
        total += float(torch.log_softmax(session.logits[0].float(), -1)[t])
        session.decode(torch.tensor([t]))
    session.free()
    return total


def test_token_beam_search_on_the_fake_finds_the_exhaustive_optimum():
    # Five tokens, three steps, no EOS: with num_beams >= 5**2 beam search keeps every prefix that can
    # still win, so its best sequence is the exhaustive argmax of the summed log-probabilities.
    policy = ScriptedPolicy(vocab=["<pad>", "<eos>", "a", "b", "c"], seed=3, eos=False)
    prompts = [[2, 3], [4, 4]]
    out = beam_search(policy, torch.tensor(prompts), num_beams=25, max_new_tokens=3, num_return_sequences=2)
    for b, prompt in enumerate(prompts):
        best = sorted(((_path_logprob(policy, prompt, seq), seq) for seq in itertools.product(range(5), repeat=3)),
                      reverse=True)
        for r in range(2):
            got = out.sequences[b * 2 + r, 2:].tolist()
            assert math.isclose(out.sequences_scores[b * 2 + r].item(), best[r][0] / 3, abs_tol=1e-5)
            assert math.isclose(_path_logprob(policy, prompt, got), best[r][0], abs_tol=1e-5)
    assert policy.live_sessions == 0


def test_token_beam_search_takes_a_policy_and_equals_generate():
    from tts_kernels.models import HFPolicy

    tok = char_tokenizer()
    model = tiny_llama(5)
    ids = torch.tensor([tok("Q: 1+2=").input_ids, tok("?x?  ab").input_ids])
    mask = torch.ones_like(ids)
    ids[1, :1], mask[1, :1] = 0, 0  # left padding
    kw = dict(num_beams=4, max_new_tokens=10, attention_mask=mask, eos_token_id=2, pad_token_id=0,
              num_return_sequences=2)
    ours = beam_search(HFPolicy(model, tok), ids, **kw)
    ref = model.generate(ids, do_sample=False, output_scores=True, return_dict_in_generate=True, **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    torch.testing.assert_close(ours.sequences_scores, ref.sequences_scores, rtol=1e-5, atol=1e-5)
