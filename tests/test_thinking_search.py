"""Thinking budgets inside the searches, on the scripted policy (its logits are a function of a row's last
token and position, so every candidate can be replayed): each generated token is checked against the
plain per-row reference rule (tts_kernels.reference.thinking_ref), sampling strategies token for token
(the same draws), the others for compliance; thinking tokens are counted per candidate and in Compute."""
import pytest
import torch

from scripted import ScriptedPolicy, ScriptedVerifier
from tts_kernels import search
from tts_kernels.ops.sample import sample
from tts_kernels.reference import thinking_ref
from tts_kernels.search import Settings
from tts_kernels.search.thinking import ThinkingBudget

PROMPTS = ["abc", "h a", "gg"]
# "." ends the thinking; below the minimum "ab" (two tokens) or "h" is written instead, in turn; at the
# maximum "." and then " e" are forced. The policy likes "." and EOS, so it tries to stop often.
BUDGET = ThinkingBudget(min_thinking_tokens=6, max_thinking_tokens=14, end=".", continuations=("ab", "h"),
                        answer_prefix=" e")


def policy():
    return ScriptedPolicy(seed=3, boost={".": 2.5, 1: 1.0})


def rule_lists(pol, budget=BUDGET):
    rule = budget.rule(pol.tokenizer, pol.eos_token_ids)
    forced = [[t for t in row if t >= 0] for row in rule.forced.tolist()]
    return forced, rule.marker.tolist(), pol.eos_token_ids, budget.min_thinking_tokens, budget.max_thinking_tokens


def replay(pol, prompt, tokens, *, draw=None, budget=BUDGET):
    """Run ``tokens`` (what a row generated) through the reference rule; every token must be allowed. With
    ``draw(i, logits)``, each token must also be what that draw picks from the reference's logits.
    Returns the reference's final state."""
    forced, marker, eos, lo, hi = rule_lists(pol, budget)
    p_ids = pol.encode(prompt)
    state = dict(thought=0, answering=0, fseq=0, fpos=-1, injections=0, mpos=0)
    for i, tok in enumerate(tokens):
        last = torch.tensor([p_ids[-1] if i == 0 else tokens[i - 1]])
        logits = pol.logits(last, torch.tensor([len(p_ids) + i]))[0]
        x, update = thinking_ref(logits, state, forced, marker, eos, lo, hi)
        assert x[tok] > float("-inf"), (prompt, tokens, i, state)
        if draw is not None:
            assert draw(i, x) == tok, (prompt, i)
        state = update(tok)
    return state


TIGHT = ThinkingBudget(min_thinking_tokens=1, max_thinking_tokens=3, end=".", continuations=("ab", "h"),
                       answer_prefix=" e")


@pytest.mark.parametrize("budget", [BUDGET, TIGHT], ids=["min", "max"])
def test_sampling_strategies_draw_what_the_reference_rule_draws(budget):
    pol = policy()
    seeds = [11, 12, 13]
    s = Settings(max_new_tokens=30, temperature=0.9, thinking=budget)
    res = search.run("majority", pol, None, PROMPTS, budget=4, settings=s, seed=seeds)
    total = 0
    ended_early = forced_end = 0
    for p, cands in enumerate(res.candidates):
        for j, c in enumerate(cands):
            def draw(i, x, p=p, j=j):
                tok, _ = sample(x[None].float(), temperature=0.9, seed=torch.tensor([seeds[p]]),
                                offset=torch.tensor(i), stream=torch.tensor([j]))
                return int(tok[0])

            end = replay(pol, PROMPTS[p], c.token_ids, draw=draw, budget=budget)
            assert c.thinking_tokens == end["thought"]
            total += c.thinking_tokens
            text = c.text
            if end["answering"]:  # thinking ended: never before the minimum, the marker counted
                assert budget.min_thinking_tokens + 1 <= c.thinking_tokens <= budget.max_thinking_tokens + 1
            if end["injections"]:
                ended_early += 1
            if c.thinking_tokens == budget.max_thinking_tokens + 1 and end["answering"]:
                forced_end += 1
                assert ". e" in text  # the marker then the answer prefix
    assert res.compute.thinking_tokens == total
    assert (ended_early if budget is BUDGET else forced_end) > 0  # the bound acted in this run


def test_without_a_budget_nothing_changes():
    pol = policy()
    s = Settings(max_new_tokens=20, temperature=0.9)
    a = search.run("majority", pol, None, PROMPTS, budget=3, settings=s, seed=5)
    assert a.compute.thinking_tokens == 0 and all(c.thinking_tokens is None for cs in a.candidates for c in cs)
    b = search.run("majority", pol, None, PROMPTS, budget=3, settings=s.replace(thinking=ThinkingBudget(
        min_thinking_tokens=0, end=".")), seed=5)  # a budget that never acts: the same samples
    assert [[c.text for c in cs] for cs in a.candidates] == [[c.text for c in cs] for cs in b.candidates]


@pytest.mark.parametrize("strategy", ["prm_beam_search", "dvts", "particle_filtering"])
def test_step_searches_follow_the_rule_through_forks(strategy):
    pol, ver = policy(), ScriptedVerifier()
    s = Settings(max_new_tokens=16, max_step_tokens=6, num_iterations=4, step_delimiter=" ", beam_width=2,
                 temperature=0.9, thinking=BUDGET)
    res = search.run(strategy, pol, ver, PROMPTS, budget=4, settings=s, seed=2)
    tok = pol.tokenizer
    kept = 0
    for p, cands in enumerate(res.candidates):
        for c in cands:
            ids = tok.encode(c.text)  # one character per token: the text is the token sequence (EOS aside)
            end = replay(pol, PROMPTS[p], ids)
            assert c.thinking_tokens == end["thought"], (strategy, c.text)
            kept += c.thinking_tokens
    assert res.compute.thinking_tokens >= kept > 0  # pruned beams' thinking counts too
    assert pol.live_sessions == 0


@pytest.mark.parametrize("num_beams", [1, 3])
def test_token_beam_search_carries_each_beams_state(num_beams):
    pol = policy()
    ids = torch.tensor([pol.encode("abc")])
    out = search.beam_search(pol, ids, num_beams=num_beams, max_new_tokens=24, num_return_sequences=num_beams,
                             thinking=BUDGET)
    for row in out.sequences.tolist():
        gen = [t for t in row[ids.shape[1]:] if t != 1]
        replay(pol, "abc", gen)
    plain = search.beam_search(pol, ids, num_beams=num_beams, max_new_tokens=24, num_return_sequences=num_beams)
    assert plain.sequences.tolist() != out.sequences.tolist()  # the rule changed what was found


def test_searches_that_cannot_take_it_say_so():
    pol, ver = policy(), ScriptedVerifier()
    s = Settings(num_iterations=2, max_step_tokens=4, max_new_tokens=8, thinking=BUDGET)
    with pytest.raises(ValueError, match="particle_gibbs does not take Settings.thinking"):
        search.run("particle_gibbs", pol, ver, PROMPTS, budget=4, settings=s)
    with pytest.raises(ValueError, match="Settings.thinking.end 'z' is not a token"):
        search.run("majority", pol, None, PROMPTS, budget=2, settings=s.replace(thinking={"end": "z"}))
    assert Settings(thinking={"min_thinking_tokens": 3, "end": "."}).as_dict()["thinking"]["min_thinking_tokens"] == 3
