"""particle_filter on the scripted fake backend: resampling forks exactly the drawn particles, finished
particles keep their slot and weight, keep-best, the selection rules, the temperatures."""
import math

import pytest
import torch
from scripted import ScriptedPolicy, ScriptedVerifier, step_score
from tiny_models import search_models

from tts_kernels.ops.resample import entropic_temperature, normalized_entropy, resample
from tts_kernels.search import Settings, particle_filter, run
from tts_kernels.search.particle_filter import _RESAMPLE_OFFSET, _temperature

PROMPTS = ["abc", "h.", "ggg a"]
S = Settings(max_new_tokens=10, max_step_tokens=5, num_iterations=2, step_delimiter=".", temperature=1.0)


def extract(text):
    return text[:1] or None


def fakes():
    return ScriptedPolicy(boost={".": 1.5, 1: -2.0}), ScriptedVerifier()


def _first_steps(res):
    return [[c.steps[0] if c.steps else None for c in cands] for cands in res.candidates]


@pytest.mark.parametrize("method", ["systematic", "multinomial"])
def test_resampling_forks_exactly_the_drawn_particles(method):
    policy, verifier = fakes()
    N = 8
    s = S.replace(resampling=method)
    # Never resampling: the population after the first step, slot for slot.
    plain = particle_filter(policy, verifier, PROMPTS, n=N, settings=s.replace(ess_threshold=0.0), seed=4,
                            extract=extract)
    assert all(info["resampled"] == [] for info in plain.prompt_info)
    first = _first_steps(plain)
    # Their log-weights after step 0: logit of the step's score (agg "last"), -inf where nothing was scored.
    a = torch.tensor([[c.step_scores[0] if c.steps else float("nan") for c in cands] for cands in plain.candidates],
                     dtype=torch.float32).double()
    p = a.clamp(1e-6, 1 - 1e-6)
    lw = torch.where(torch.isnan(a), float("-inf"), torch.log(p) - torch.log1p(-p))
    idx = resample(lw, method=method, seed=4, offset=_RESAMPLE_OFFSET).tolist()
    res = particle_filter(policy, verifier, PROMPTS, n=N, settings=s, seed=4, extract=extract)
    assert all(info["resampled"] == [0] for info in res.prompt_info)
    got = _first_steps(res)
    for pr in range(len(PROMPTS)):
        assert got[pr] == [first[pr][i] for i in idx[pr]]
        for c in res.candidates[pr]:  # each candidate's scores are the fake's, on its own steps
            assert c.step_scores == pytest.approx([step_score(t) for t in c.steps], abs=1e-6)
    assert policy.live_sessions == 0 and verifier.live_sessions == 0


def test_finished_particles_keep_their_slot_and_weight():
    policy, verifier = fakes()
    res = particle_filter(policy, verifier, PROMPTS, n=6, settings=S.replace(num_iterations=3), seed=1,
                          extract=extract)
    for cands, info in zip(res.candidates, res.prompt_info):
        assert len(cands) == 6 and all(c.finish in ("eos", "empty", "length", "final") for c in cands)
        w = info["weights"]
        assert math.isclose(sum(w), 1.0, abs_tol=1e-5) and len(w) == 6
        # Equal particles (copies) carry equal weights.
        for i in range(6):
            for j in range(6):
                if cands[i] is cands[j]:
                    assert w[i] == w[j]


def test_keep_best_never_loses_the_best_particle():
    policy, verifier = fakes()
    N = 6
    s = S.replace(resampling="multinomial")
    plain = particle_filter(policy, verifier, PROMPTS, n=N, settings=s.replace(ess_threshold=0.0), seed=9,
                            extract=extract)
    for seed in range(9, 14):
        res = particle_filter(policy, verifier, PROMPTS, n=N, settings=s.replace(keep_best=True), seed=seed,
                              extract=extract)
        if seed != 9:
            plain = particle_filter(policy, verifier, PROMPTS, n=N, settings=s.replace(ess_threshold=0.0),
                                    seed=seed, extract=extract)
        for before, after in zip(plain.candidates, res.candidates):
            scores = [c.step_scores[0] if c.steps else -1.0 for c in before]
            best = before[max(range(N), key=lambda j: (scores[j], -j))]
            if best.steps:
                assert best.steps[0] in [c.steps[0] for c in after if c.steps]


def test_selection_rules_and_self_certainty():
    policy, verifier = fakes()
    best = particle_filter(policy, verifier, PROMPTS, n=6, settings=S, seed=2, extract=extract)
    for p, info in enumerate(best.prompt_info):
        w = info["weights"]
        assert best.chosen[p] == max(range(6), key=lambda j: (w[j], -j))
    vote = particle_filter(policy, verifier, PROMPTS, n=6, settings=S.replace(particle_select="weighted"), seed=2,
                           extract=extract)
    for p, (cands, info) in enumerate(zip(vote.candidates, vote.prompt_info)):
        totals = {}
        for c, w in zip(cands, info["weights"]):
            if c.answer is not None:
                totals[c.answer] = totals.get(c.answer, 0.0) + w
        assert vote.predictions[p] == (max(totals, key=totals.get) if totals else None)
    a = particle_filter(policy, verifier, PROMPTS, n=6, settings=S.replace(particle_select="sample"), seed=2,
                        extract=extract)
    b = particle_filter(policy, verifier, PROMPTS, n=6, settings=S.replace(particle_select="sample"), seed=2,
                        extract=extract)
    assert a.chosen == b.chosen and a.predictions == b.predictions
    # Self-certainty needs no verifier: weights from the tokens' own log-probabilities.
    sc = particle_filter(policy, None, PROMPTS, n=6, settings=S.replace(particle_weight="self_certainty"), seed=2,
                         extract=extract)
    assert sc.compute.prm_tokens == 0 and all(len(c) == 6 for c in sc.candidates)
    assert all(math.isnan(c.score) for cands in sc.candidates for c in cands)
    with pytest.raises(ValueError, match="needs a verifier"):
        particle_filter(policy, None, PROMPTS, n=6, settings=S)
    # A stop string ends a particle after the step that holds it (kept whole), as in the step searches.
    stopped = particle_filter(policy, verifier, PROMPTS, n=6, settings=S.replace(stop=tuple("aeiou")))
    ends = [c for row in stopped.candidates for c in row if c.finish == "stop"]
    assert ends and all(any(x in c.steps[-1] for x in "aeiou") for c in ends)


def test_temperatures():
    lw = torch.tensor([[8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0]], dtype=torch.float64)
    s = Settings(weight_temperature=2.0, num_iterations=4)
    assert torch.equal(_temperature(lw, s, 0), torch.full((2,), 2.0, dtype=torch.float64))
    annealed = s.replace(entropic="annealed")
    assert [float(_temperature(lw, annealed, t)[0]) for t in range(4)] == [8.0, 4.0, 8 / 3, 2.0]
    adaptive = s.replace(entropic="adaptive", entropy_target=0.9)
    T = _temperature(lw, adaptive, 0)
    torch.testing.assert_close(T, 2.0 * entropic_temperature(lw / 2.0, 0.9))
    assert T[1] == 2.0 and T[0] > 2.0  # only the collapsed row is flattened
    assert normalized_entropy(lw[:1], T[:1]) >= 0.9


def test_giannone_schedules_by_hand():
    lw = torch.tensor([[8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0]], dtype=torch.float64)
    w = torch.softmax(lw, 1)
    r = (1 / (w * w).sum(1) / 4).tolist()
    h = (-(w * w.log()).sum(1) / math.log(4)).tolist()
    assert r[0] < 0.5 < r[1]  # only the first row has collapsed
    s = Settings(num_iterations=4, weight_temperature=2.0)
    for kind, want in (("ess", max(1, 0.75 / r[0])), ("entropy", max(1, 1 / (h[0] + (1 - h[0]) * 0.25))),
                       ("base", 1.75)):
        got = _temperature(lw, s.replace(entropic=kind), 0).tolist()
        assert got == pytest.approx([2.0 * want, 2.0])
        assert _temperature(lw, s.replace(entropic=kind), 1).tolist() == [2.0, 2.0]  # progress 0.5: not early
        assert _temperature(lw, s.replace(entropic=kind, anneal_below=0.2), 0).tolist() == [2.0, 2.0]


def test_strategies_run_on_a_transformers_model():
    policy, prm = search_models()
    s = Settings(max_new_tokens=10, max_step_tokens=8, num_iterations=3, step_delimiter="e", temperature=1.0)
    for name in ("particle_filtering", "entropic_particle_filtering"):
        res = run(name, policy, prm, ["Q: 1+1?\n", "Q: 2*3?\n"], budget=4, settings=s, seed=3, extract=extract)
        again = run(name, policy, prm, ["Q: 1+1?\n", "Q: 2*3?\n"], budget=4, settings=s, seed=3, extract=extract)
        assert res.strategy == name and [len(c) for c in res.candidates] == [4, 4]
        assert [[c.text for c in cs] for cs in res.candidates] == [[c.text for c in cs] for cs in again.candidates]
        assert res.compute.prm_tokens > 0 and res.compute.policy_prefill_tokens > 0
