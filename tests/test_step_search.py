"""Step-level search pieces: the device-side delimiter matcher, step sampling, and the
invariants of prm_beam_search / dvts on tiny random models (equality with a
search-and-learn-style baseline is in test_step_search_baseline.py)."""
import random

import pytest
import torch
from tiny_models import search_models

from tts_kernels.search.step_search import dvts, prm_beam_search
from tts_kernels.search.steps import DelimiterMatcher

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min)

PROMPTS = ["Q: 1+1?\n", "Q: 2*3?\n\nA:", "Q: 9-4?"]


def word_tokenizer(words):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("delimiter", ["\n\n", "ab", "aab", "x"])
def test_matcher_finds_the_first_token_completing_the_delimiter(delimiter):
    # Multi-character tokens that start, continue, straddle and contain the delimiter.
    words = ["\n", "\n\n", "a\n", "\nb", "ab", "a", "b", "aa", "ba\n", "\n\nq", "x", "yx", "q"]
    tok = word_tokenizer(words)
    V = len(words) + 3
    texts = [tok.decode([v]) for v in range(V)]
    m = DelimiterMatcher(tok, delimiter, V)
    rng = random.Random(0)
    for _ in range(300):
        seq = [rng.randrange(3, V) for _ in range(12)]
        state = m.start(1)
        got = None
        for i, v in enumerate(seq):
            state = m.step(state, torch.tensor([v]))
            if got is None and int(state) == m.done:
                got = i
        text, want = "", None
        for i, v in enumerate(seq):
            text += texts[v]
            if delimiter in text:
                want = i
                break
        assert got == want, (seq, got, want)


@pytest.fixture(scope="module")
def models():
    return search_models()


KW = dict(step_delimiter="e", max_step_tokens=12, max_new_tokens=10, temperature=1.0, seed=2)


def test_beam_search_invariants(models):
    policy, prm = models
    res = prm_beam_search(policy, prm, PROMPTS, n=6, beam_width=3, num_iterations=4, agg="min", **KW)
    finishes = {c.finish for cs in res.candidates for c in cs}
    assert "length" in finishes or "final" in finishes
    assert any(len(c.steps) > 1 for cs in res.candidates for c in cs), "no beam lived past one step"
    for p, cands in enumerate(res.candidates):
        assert cands, "every prompt completes something"
        for c in cands:
            assert c.text == "".join(c.steps)
            assert all(s.endswith("e") for s in c.steps[:-1])  # all but the last step end at the delimiter
            assert len(c.step_scores) == len(c.steps)
            if not c.steps:  # EOS first: nothing scored
                assert c.finish == "eos" and c.score != c.score
                continue
            assert c.score == pytest.approx(min(c.step_scores), abs=1e-6)
        # The score is what the PRM gives the whole text from scratch.
        scored = [c for c in cands if c.steps]
        fresh = prm.start([PROMPTS[p]], agg="min", rows=len(scored))
        fresh.fork(torch.zeros(len(scored), dtype=torch.long))
        fresh.add_steps([c.steps for c in scored])  # all steps at once, from the prompt
        torch.testing.assert_close(fresh.aggregate, torch.tensor([c.score for c in scored]), atol=1e-4, rtol=1e-4)
        fresh.free()
        assert res.best[p].score == max(c.score for c in scored)  # select="best"
    again = prm_beam_search(policy, prm, PROMPTS, n=6, beam_width=3, num_iterations=4, agg="min", **KW)
    assert [[c.text for c in cs] for cs in again.candidates] == [[c.text for c in cs] for cs in res.candidates]
    comp = res.compute
    assert comp.policy_prefill_tokens == sum(len(policy.encode(p)) for p in PROMPTS)


def test_dvts_one_candidate_per_subtree(models):
    policy, prm = models
    n, bw = 8, 4
    res = dvts(policy, prm, PROMPTS, n=n, beam_width=bw, num_iterations=4, agg="last", **KW)
    for cands in res.candidates:
        assert len(cands) == n // bw
        for c in cands:
            assert (c.score != c.score) if not c.steps else c.score == pytest.approx(c.step_scores[-1], abs=1e-6)
    assert any(len(c.steps) > 1 for cs in res.candidates for c in cs)


def test_dvts_return_siblings_gives_the_whole_pool(models):
    """return_siblings: every subtree's last expansion, all beam_width of them (n per prompt); the picks are
    the plain search's, and every sibling carries the verifier's own scores of its steps."""
    policy, prm = models
    n, bw = 8, 4
    kw = dict(n=n, beam_width=bw, num_iterations=4, agg="last", **KW)
    base = dvts(policy, prm, PROMPTS, **kw)
    pool = dvts(policy, prm, PROMPTS, return_siblings=True, **kw)
    assert pool.compute == base.compute  # the same search; only what it returns differs
    for p, (picks, cands) in enumerate(zip(base.candidates, pool.candidates)):
        assert len(cands) == n
        key = lambda c: (c.text, c.score if c.score == c.score else None, c.finish)  # noqa: E731
        assert {key(c) for c in picks} <= {key(c) for c in cands}
        siblings = [c for c in cands if c.finish == "sibling"]
        assert siblings  # most expansions at a subtree's last step did not end themselves
        for c in siblings:
            want = prm.score_steps([PROMPTS[p]], [[c.steps]]).step_scores[0][0]
            assert c.step_scores == pytest.approx(want, abs=1e-5)
            assert c.score == pytest.approx(want[-1], abs=1e-5)


def test_bad_arguments(models):
    policy, prm = models
    with pytest.raises(ValueError, match="multiple of beam_width"):
        prm_beam_search(policy, prm, PROMPTS, n=6, beam_width=4, num_iterations=2)
    with pytest.raises(ValueError, match="num_iterations"):
        dvts(policy, prm, PROMPTS, n=4, beam_width=2, num_iterations=0)
    with pytest.raises(ValueError, match="prompts"):
        dvts(policy, prm, "one", n=4, beam_width=2, num_iterations=1)
    with pytest.raises(ValueError, match="step_delimiter"):
        dvts(policy, prm, PROMPTS, n=4, beam_width=2, num_iterations=1, step_delimiter="")


def test_lookahead_rolls_out_without_keeping_the_rollout(models):
    policy, prm = models
    base = prm_beam_search(policy, prm, PROMPTS[:2], n=4, beam_width=2, num_iterations=3, agg="last", **KW)
    look = prm_beam_search(policy, prm, PROMPTS[:2], n=4, beam_width=2, num_iterations=3, agg="last", lookahead=2,
                           **KW)
    # The first iteration samples the same steps either way (same seed, same layout); what is kept
    # differs only through the ranking, and rollouts never leak into the kept text.
    for cands in look.candidates:
        for c in cands:
            assert c.text == "".join(c.steps)
    assert look.compute.prm_tokens > base.compute.prm_tokens
    assert look.compute.policy_prefill_tokens == base.compute.policy_prefill_tokens
    with pytest.raises(ValueError, match="lookahead"):
        prm_beam_search(policy, prm, PROMPTS, n=4, beam_width=2, num_iterations=2, lookahead=-1)


def test_dvts_lookahead_ranks_the_expansions(models, monkeypatch):
    from tts_kernels.search import step_search

    policy, prm = models
    kw = dict(n=4, beam_width=2, num_iterations=3, agg="last", **KW)
    base = dvts(policy, prm, PROMPTS[:2], **kw)
    look = dvts(policy, prm, PROMPTS[:2], lookahead=1, **kw)
    assert look.compute.prm_tokens > base.compute.prm_tokens  # the rollouts ran (and were counted)
    assert all(c.text == "".join(c.steps) for cands in look.candidates for c in cands)  # and were not kept
    # The rank is the only thing lookahead changes: ranking by the plain aggregate gives the plain search,
    # ranking by its negation picks other expansions.
    texts = lambda res: [[c.text for c in cands] for cands in res.candidates]  # noqa: E731
    monkeypatch.setattr(step_search._Search, "lookahead_scores", lambda self, finish, steps: self.prm.aggregate)
    assert texts(dvts(policy, prm, PROMPTS[:2], lookahead=1, **kw)) == texts(base)
    monkeypatch.setattr(step_search._Search, "lookahead_scores", lambda self, finish, steps: -self.prm.aggregate)
    assert texts(dvts(policy, prm, PROMPTS[:2], lookahead=1, **kw)) != texts(base)


@pytest.mark.parametrize("search", [prm_beam_search, dvts])
def test_a_beam_ends_after_the_step_holding_a_stop_string(models, search):
    policy, prm = models
    kw = dict(n=4, beam_width=2, num_iterations=4, agg="last", **KW)
    stop = tuple("aeiou")
    base = search(policy, prm, PROMPTS[:2], **kw)
    got = search(policy, prm, PROMPTS[:2], stop=stop, **kw)
    stopped = [c for cands in got.candidates for c in cands if c.finish == "stop"]
    assert stopped and all(any(x in c.steps[-1] for x in stop) for c in stopped)
    for cands in got.candidates:  # no beam went on past a step holding one
        for c in cands:
            assert not any(x in step for step in c.steps[:-1] for x in stop)
    assert got.compute.policy_generated_tokens < base.compute.policy_generated_tokens


def test_stop_at_answer_is_a_closed_box():
    from types import SimpleNamespace

    from tts_kernels.search.step_search import _Search

    on = SimpleNamespace(stop=(), stop_at_answer=True)
    assert _Search._answered(on, "so \\boxed{\\frac{1}{2}} done")
    assert not _Search._answered(on, "so \\boxed{\\frac{1}{2}")  # not closed yet
    assert not _Search._answered(SimpleNamespace(stop=(), stop_at_answer=False), "\\boxed{3}")
    assert _Search._answered(SimpleNamespace(stop=("END",), stop_at_answer=False), "x END y")


@pytest.mark.parametrize("search", [prm_beam_search, dvts])
def test_step_cap_continue_scores_the_cut_step_and_goes_on(models, search):
    policy, prm = models
    kw = dict(KW, max_step_tokens=3)
    kw.pop("step_delimiter")
    args = dict(n=4, beam_width=2, num_iterations=4, agg="last", step_delimiter="e", **kw)
    end = search(policy, prm, PROMPTS[:2], **args)
    cont = search(policy, prm, PROMPTS[:2], step_cap="continue", **args)
    assert any(c.finish == "length" for cands in end.candidates for c in cands)
    assert not any(c.finish == "length" for cands in cont.candidates for c in cands)
    cut = [c for cands in cont.candidates for c in cands
           if any(not step.endswith("e") for step in c.steps[:-1])]
    assert cut  # a step cut at the cap, scored, and the beam went on after it
    assert all(len(c.step_scores) == len(c.steps) for c in cut)
    assert cont.compute.policy_generated_tokens > end.compute.policy_generated_tokens
    with pytest.raises(ValueError, match="Settings.step_cap"):
        search(policy, prm, PROMPTS[:2], step_cap="wrap", **args)
