"""``prm_beam_search`` / ``dvts`` against the search-and-learn-style baseline in ``benchmarks/``.

Same seed, same offsets, same row indices: both must make the same choices, so they
return the same completed candidates (texts, steps, finish reasons) with the same PRM
scores (ours scores each step once on a forked cache, the baseline re-scores full
prefixes from scratch: equal up to float rounding), and pick the same answers: ours with
the device selection ops (``select_candidates``), the baseline with its own plain Python.

The tiny char-level policy gets a bias on the delimiter's logit so that steps of a few
characters end by the delimiter often, and by the token limit sometimes.
"""
import math
import pathlib
import sys

import pytest
import torch
from tiny_models import CHARS, char_tokenizer, tiny_llama
from transformers import LlamaForTokenClassification

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from step_search_baseline import baseline_beam_search, baseline_dvts, counts  # noqa: E402

from tts_kernels.models.policy import HFPolicy  # noqa: E402
from tts_kernels.models.prm import HFPRM  # noqa: E402
from tts_kernels.search import select_candidates  # noqa: E402
from tts_kernels.search.step_search import dvts, prm_beam_search  # noqa: E402

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min)

DELIM = " "
PROMPTS = ["What is 2+3? ", "Compute 7*6 and box it. ", "x"]


@pytest.fixture(scope="module")
def models():
    tok = char_tokenizer()
    model = tiny_llama(0)
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[CHARS.index(DELIM)] = 3.0  # p(" ") ~ 0.15: steps of ~6 chars, some hit max_step_tokens
    model.lm_head = biased
    policy = HFPolicy(model, tok)
    prm = HFPRM(tiny_llama(4, cls=LlamaForTokenClassification, num_labels=2), tok, head="classifier")
    return policy, prm


def _same(ours, base, rule):
    assert len(ours.candidates) == len(base.completed)
    for a_list, b_list in zip(ours.candidates, base.completed):
        assert [(c.text, c.steps, c.finish) for c in a_list] == [(c.text, c.steps, c.finish) for c in b_list]
        for a, b in zip(a_list, b_list):
            assert len(a.step_scores) == len(b.step_scores)
            assert all(math.isclose(x, y, abs_tol=1e-4) for x, y in zip(a.step_scores, b.step_scores))
            assert (math.isnan(a.score) and math.isnan(b.score)) or math.isclose(a.score, b.score, abs_tol=1e-4)
            assert a.answer == b.answer
    assert ours.predictions == {"best": base.best_answer, "weighted": base.weighted}[rule]
    assert select_candidates(ours.candidates, "best")[1] == base.best_answer
    assert select_candidates(ours.candidates, "majority")[1] == base.majority
    assert select_candidates(ours.candidates, "weighted")[1] == base.weighted
    best = [None if i is None else cs[i] for i, cs in zip(select_candidates(ours.candidates, "best")[0],
                                                           ours.candidates)]
    assert [c.text if c else None for c in best] == [c.text if c else None for c in base.best]


def _finishes(res):
    return {c.finish for cs in res.candidates for c in cs}


@pytest.mark.parametrize("agg", ["last", "min"])
def test_beam_search_matches_baseline(models, agg):
    policy, prm = models
    kw = dict(n=8, beam_width=2, num_iterations=4, step_delimiter=DELIM, max_step_tokens=8, max_new_tokens=8,
              agg=agg, temperature=1.0, seed=3)
    ours = prm_beam_search(policy, prm, PROMPTS, **kw)
    base = baseline_beam_search(policy, prm, PROMPTS, **kw)
    _same(ours, base, "best")
    # The configuration exercises what it should: several iterations, delimiter and length ends.
    assert max(len(c.steps) for cs in ours.candidates for c in cs) >= 3
    assert {"length", "final"} <= _finishes(ours)
    for cs in ours.candidates:
        # Each prompt completes at most n beams per iteration, and its last iteration completes all n
        # (or the prompt died earlier because no beam was left to keep).
        assert 0 < len(cs)
        for c in cs:
            assert c.text == "".join(c.steps) and len(c.step_scores) == len(c.steps)
            assert all(0 <= x <= 1 for x in c.step_scores)
            want = c.step_scores[-1] if agg == "last" else min(c.step_scores)
            assert math.isclose(c.score, want, abs_tol=1e-6)
            assert len(c.steps) <= kw["num_iterations"]
        # beams finishing at the last iteration ("final"/eos/empty there) come in one batch of n
        last_batch = [c for c in cs if len(c.steps) == kw["num_iterations"]]
        assert len(last_batch) in (0, kw["n"]) or any(c.finish in ("eos", "empty") for c in cs)
    oc, bc = counts(ours.compute), counts(base.compute)
    # Compute: ours prefills each prompt once, the baseline every beam's history every iteration.
    assert oc["policy_prefill_tokens"] == sum(len(policy.encode(p)) for p in PROMPTS)
    assert bc["policy_prefill_tokens"] > 8 * oc["policy_prefill_tokens"]
    assert counts(ours.compute)["policy_generated_tokens"] == counts(base.compute)["policy_generated_tokens"]
    assert bc["prm_tokens"] > oc["prm_tokens"]


def test_dvts_matches_baseline(models):
    policy, prm = models
    n, bw, iters = 8, 4, 3
    kw = dict(n=n, beam_width=bw, num_iterations=iters, step_delimiter=DELIM, max_step_tokens=16, max_new_tokens=16,
              temperature=1.0, seed=11)
    ours = dvts(policy, prm, PROMPTS, **kw)
    base = baseline_dvts(policy, prm, PROMPTS, **kw)
    _same(ours, base, "weighted")
    for cs in ours.candidates:
        assert len(cs) == n // bw  # every subtree ends exactly once
        for c in cs:
            assert c.text == "".join(c.steps) and 1 <= len(c.steps) <= iters
            assert math.isclose(c.score, c.step_scores[-1], abs_tol=1e-6)
            if c.finish == "final":
                assert len(c.steps) == iters
    assert max(len(c.steps) for cs in ours.candidates for c in cs) == iters
    assert counts(ours.compute)["policy_generated_tokens"] == counts(base.compute)["policy_generated_tokens"]


def test_different_seed_changes_choices(models):
    """A control: the agreement above is not vacuous (other seeds give other samples)."""
    policy, prm = models
    kw = dict(n=4, beam_width=2, num_iterations=2, step_delimiter=DELIM, max_step_tokens=8, max_new_tokens=8,
              temperature=1.0)
    a = prm_beam_search(policy, prm, PROMPTS[:1], seed=0, **kw)
    b = baseline_beam_search(policy, prm, PROMPTS[:1], seed=1, **kw)
    assert [c.text for c in a.candidates[0]] != [c.text for c in b.completed[0]]
