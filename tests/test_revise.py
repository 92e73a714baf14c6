"""``revise``: sequential revisions, batched over prompts and chains."""
import pytest

from scripted import ScriptedPolicy, ScriptedVerifier
from tts_kernels import search
from tts_kernels.search import Settings, revise, sample_completions
from tts_kernels.search.revise import _round_seed
from tts_kernels.search.seeds import Seeds

PROMPTS = ["abc", "h a", "gg"]


def test_each_attempt_reads_the_previous_one():
    pol, ver = ScriptedPolicy(seed=1), ScriptedVerifier()
    s = Settings(max_new_tokens=10, temperature=0.9, revisions=2, revision_prompt=" . ")
    seeds = [4, 5, 6]
    res = revise(pol, ver, PROMPTS, n=6, settings=s, seed=seeds)
    assert [len(c) for c in res.candidates] == [6, 6, 6]
    assert res.prompt_info[0] == {"chains": 2, "revisions": 2}
    for p, prompt in enumerate(PROMPTS):
        for chain in range(2):
            history = prompt
            for r in range(3):
                c = res.candidates[p][chain * 3 + r]
                if r == 0:  # first attempts: the prompt forked per chain, chain c on stream c
                    texts, _, _, _ = sample_completions(pol, [history], 2, max_new_tokens=10, temperature=0.9,
                                                        seed=[_round_seed(Seeds.of(seeds, 3), p, 0, 0)])
                    want = texts[0][chain]
                else:
                    texts, _, _, _ = sample_completions(pol, [history], 1, max_new_tokens=10, temperature=0.9,
                                                        seed=[_round_seed(Seeds.of(seeds, 3), p, chain, r)])
                    want = texts[0][0]
                assert c.text == want  # attempt r read the prompt, the attempts before it and the revision prompts
                history += c.text + " . "
                # scored against the original prompt, as a completion of it
                want = ver.score_steps([prompt], [[c.steps]], agg="last").step_scores[0][0]
                assert c.step_scores == pytest.approx(want)
    # the prompts once, then every revision's history
    prefill = sum(len(pol.encode(p)) for p in PROMPTS) + sum(len(pol.encode(h)) for hs in _histories(res, s)[1:] for h in hs)
    assert res.compute.policy_prefill_tokens == prefill
    assert res.samples == 18 and res.compute.policy_generated_tokens == sum(
        len(c.token_ids) for cs in res.candidates for c in cs)


def _histories(res, s):
    """What each chain's attempts read, by attempt: [0] the prompts (forked), [r] attempt r's histories."""
    out = [[] for _ in range(s.revisions + 1)]
    for p, prompt in enumerate(PROMPTS):
        for chain in range(res.prompt_info[p]["chains"]):
            h = prompt
            for r in range(s.revisions + 1):
                out[r].append(h)
                h += res.candidates[p][chain * (s.revisions + 1) + r].text + s.revision_prompt
    return out


def test_the_registered_strategy_fits_the_budget_and_picks_by_vote():
    pol, ver = ScriptedPolicy(seed=2), ScriptedVerifier()
    s = Settings(max_new_tokens=8, revisions=3)
    res = search.run("revise", pol, ver, PROMPTS, budget=6, settings=s, seed=0)  # 6 // 4 = 1 chain of 4
    assert [len(c) for c in res.candidates] == [4, 4, 4] and res.samples == 12
    small = search.run("revise", pol, None, PROMPTS, budget=2, settings=s, seed=0)  # revisions cut to 1
    assert small.prompt_info[0] == {"chains": 1, "revisions": 1} and small.strategy == "revise"
    parallel = search.run("revise", pol, ver, PROMPTS, budget=4, settings=s.replace(revisions=0), seed=0)
    assert parallel.prompt_info[0] == {"chains": 4, "revisions": 0}
    with pytest.raises(ValueError, match="multiple of revisions"):
        revise(pol, ver, PROMPTS, n=5, settings=s.replace(revisions=1))
    with pytest.raises(ValueError, match="Settings.revisions must be >= 0"):
        Settings(revisions=-1)
