"""particle_gibbs: sweeps carrying reference particles, and the roll-back of a reference's copy to its
first ``t`` steps on the real sessions (paged policy cache cut back, verifier re-scoring), checked
against fresh sessions started from the same prefix."""
import importlib

import pytest
import torch
from scripted import ScriptedPolicy, ScriptedVerifier
from tiny_models import search_models

from tts_kernels.search import Settings, particle_filter, particle_gibbs, run

pf_mod = importlib.import_module("tts_kernels.search.particle_filter")  # the module (the package exports the function)

PROMPTS = ["abc", "h.", "ggg a"]
S = Settings(max_new_tokens=10, max_step_tokens=5, num_iterations=4, step_delimiter=".", temperature=1.0,
             sweeps=2, reference_particles=2)


def extract(text):
    return text[:1] or None


def fakes():
    return ScriptedPolicy(boost={".": 1.5, "a": 0.5, 1: -2.0}), ScriptedVerifier()


def spy_rollbacks(monkeypatch, check=None):
    """Count (and check, right after each) the roll-backs of reference copies."""
    seen = []
    real = pf_mod._roll_back

    def spy(search, rollback, refs, t):
        real(search, rollback, refs, t)
        seen.append((t, len(rollback)))
        if check is not None:
            check(search, rollback, refs, t)

    monkeypatch.setattr(pf_mod, "_roll_back", spy)
    return seen


def test_references_hold_the_last_slots_and_are_drawn_back(monkeypatch):
    policy, verifier = fakes()
    seen = spy_rollbacks(monkeypatch)
    res = particle_gibbs(policy, verifier, PROMPTS, n=12, settings=S, seed=1, extract=extract)
    assert res.strategy == "particle_gibbs" and res.budget == 12 and res.samples == 36
    assert [len(c) for c in res.candidates] == [6, 6, 6]  # n // sweeps particles in the final pass
    assert any(n for _, n in seen), "no reference copy was rolled back in this run"
    for p, info in enumerate(res.prompt_info):
        first, second = info["sweeps"]
        assert len(first["references"]) == 2 and "references" not in second
    assert policy.live_sessions == 0 and verifier.live_sessions == 0


def test_sweep_one_is_particle_filtering():
    policy, verifier = fakes()
    pg = particle_gibbs(policy, verifier, PROMPTS, n=6, settings=S.replace(sweeps=1, reference_particles=0), seed=4,
                        extract=extract)
    pf = particle_filter(policy, verifier, PROMPTS, n=6, settings=S, seed=4, extract=extract)
    assert [[c.text for c in cs] for cs in pg.candidates] == [[c.text for c in cs] for cs in pf.candidates]
    assert pg.predictions == pf.predictions and pg.compute == pf.compute


def test_reproducible_and_registered():
    policy, verifier = fakes()
    a = run("particle_gibbs", policy, verifier, PROMPTS, budget=12, settings=S, seed=3, extract=extract)
    b = run("particle_gibbs", policy, verifier, PROMPTS, budget=12, settings=S, seed=3, extract=extract)
    assert [[c.text for c in cs] for cs in a.candidates] == [[c.text for c in cs] for cs in b.candidates]
    assert a.prompt_info == b.prompt_info


def test_bad_settings_name_the_setting():
    policy, verifier = fakes()
    with pytest.raises(ValueError, match=r"n \(10\) must be a multiple of sweeps \(3\)"):
        particle_gibbs(policy, verifier, PROMPTS, n=10, settings=S.replace(sweeps=3))
    with pytest.raises(ValueError, match="reference_particles"):
        particle_gibbs(policy, verifier, PROMPTS, n=4, settings=S.replace(reference_particles=2))
    with pytest.raises(ValueError, match="particle_weight='verifier'"):
        particle_gibbs(policy, verifier, PROMPTS, n=4, settings=S.replace(particle_weight="self_certainty"))
    with pytest.raises(ValueError, match="Settings.sweeps must be >= 1"):
        S.replace(sweeps=0)


@pytest.mark.models  # also under the lowest supported transformers
def test_rolled_back_rows_equal_fresh_sessions_on_a_transformers_model(monkeypatch):
    # The roll-back on the real sessions: right after it, a rolled-back row's next-token logits equal a
    # fresh policy session's over the same prompt + prefix, and its verifier aggregate equals scoring the
    # prefix's steps from scratch; the paged cache holds exactly prompt + prefix.
    policy, prm = search_models()
    s = Settings(max_new_tokens=12, max_step_tokens=8, num_iterations=5, step_delimiter="e", temperature=1.0,
                 sweeps=2, reference_particles=2, agg="min")
    checked = []

    def check(search, rollback, refs, t):
        for r, p, k in rollback:
            cand, (ids, ntok), _ = refs[p][k]
            keep = sum(ntok[:t])
            prefix = search.prompt_ids[p] + ids[:keep]
            fresh = policy.start([prefix], rows_hint=1, max_new_tokens=4)
            torch.testing.assert_close(search.pol.logits[r], fresh.logits[0], rtol=1e-4, atol=1e-4)
            fresh.free()
            assert int(search.pol.cache.lengths()[r]) == len(prefix)
            want = prm.score_steps([PROMPTS_HF[p]], [[cand.steps[:t]]], agg="min")
            torch.testing.assert_close(search.prm.aggregate[r], want.aggregate[0], rtol=1e-4, atol=1e-5)
            assert search.step_scores[r] == pytest.approx(cand.step_scores[:t], abs=1e-5)
            checked.append(r)

    seen = spy_rollbacks(monkeypatch, check)
    res = particle_gibbs(policy, prm, PROMPTS_HF, n=12, settings=s, seed=5)  # rolls back at steps 1..4
    assert len({t for t, _ in seen}) >= 3 and checked, f"too few roll-backs: {seen}"
    assert [len(c) for c in res.candidates] == [6, 6]


PROMPTS_HF = ["Q: 1+1?\n", "Q: 2*3?\n"]


@pytest.mark.models
def test_policy_truncate_equals_a_fresh_start():
    policy, _ = search_models()
    g = torch.Generator().manual_seed(0)
    prompt = policy.encode("hello w")
    s = policy.start([prompt], rows_hint=3, max_new_tokens=20)
    s.fork(torch.tensor([0, 0, 0]))
    toks = torch.randint(5, 60, (10, 3), generator=g)
    for t in range(10):
        s.decode(toks[t])
    keep = torch.tensor([len(prompt) + 4, len(prompt) + 10, len(prompt) + 1])
    rows = torch.tensor([0, 2])
    last = [int(toks[3, 0]), int(toks[0, 2])]
    s.truncate(rows, keep[rows], torch.tensor(last))
    for r, n in ((0, 4), (2, 1)):
        fresh = policy.start([prompt + toks[:n, r].tolist()], rows_hint=1, max_new_tokens=4)
        torch.testing.assert_close(s.logits[r], fresh.logits[0], rtol=1e-4, atol=1e-4)
        fresh.free()
    assert s.cache.lengths().tolist() == keep.tolist() and s.positions.tolist() == keep.tolist()
    # The rows continue from there like fresh ones; row 1 (untouched) still has its 10 tokens.
    s.decode(torch.tensor([7, 8, 9]))
    fresh = policy.start([prompt + toks[:4, 0].tolist() + [7]], rows_hint=1, max_new_tokens=4)
    torch.testing.assert_close(s.logits[0], fresh.logits[0], rtol=1e-4, atol=1e-4)
    fresh.free()
    s.free()


@pytest.mark.parametrize("budget,sweeps,refs", [(1, 1, 0), (2, 2, 0), (3, 1, 0), (4, 2, 1), (12, 2, 2)])
def test_the_strategy_fits_sweeps_and_references_to_any_budget(budget, sweeps, refs, monkeypatch):
    policy, verifier = fakes()
    got = {}
    real = pf_mod._sweep

    def spy(*args, refs=None, **kw):
        got.setdefault("R", set()).add(len(refs[0]) if refs else 0)
        return real(*args, refs=refs, **kw)

    monkeypatch.setattr(pf_mod, "_sweep", spy)
    res = run("particle_gibbs", policy, verifier, PROMPTS, budget=budget, settings=S, seed=0, extract=extract)
    assert len(res.prompt_info[0]["sweeps"]) == sweeps and [len(c) for c in res.candidates] == [budget // sweeps] * 3
    assert max(got["R"]) == refs
