"""Per-prompt seeds (tts_kernels.search.seeds): a prompt keyed by its own seed gets the same candidates
alone or batched with any others, for every strategy that does not pool its budget over prompts."""
import math

import pytest
import torch
from tiny_models import search_models

from tts_kernels.ops.resample import resample
from tts_kernels.search import STRATEGIES, Settings, run
from tts_kernels.search.seeds import Seeds, check_seed

pytestmark = pytest.mark.models

PROMPTS = ["Q: 1+1?\n", "Q: 2*3?\n", "Q: 9-4?\n", "Q: 7+8?\n"]
SEEDS = [11, -5, 2**62, 11]  # a repeated seed on another prompt draws other tokens (its own prompt)
S = Settings(max_new_tokens=10, max_step_tokens=8, num_iterations=3, step_delimiter="e", temperature=1.0,
             levels=2, beam_width=2, ess_threshold=1.0)


def extract(text):
    return text[:1] or None


@pytest.fixture(scope="module")
def models():
    return search_models()


def _view(res, p):
    return ([(c.text, c.answer, c.finish) for c in res.candidates[p]], res.predictions[p],
            [c.score for c in res.candidates[p]])


def _same(a, b):
    (ca, pa, sa), (cb, pb, sb) = a, b
    assert ca == cb and pa == pb
    assert all((math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-5 for x, y in zip(sa, sb))


@pytest.mark.parametrize("name", sorted(n for n, e in STRATEGIES.items() if not e.pooled))
def test_a_prompt_draws_the_same_alone_and_batched(models, name):
    policy, prm = models
    batched = run(name, policy, prm, PROMPTS, budget=4, settings=S, seed=SEEDS, extract=extract)
    # Reordered, among other prompts (one of them a copy of prompt 2 under another seed).
    others = [PROMPTS[2], "Q: 3*3?\n", PROMPTS[0], PROMPTS[2]]
    mixed = run(name, policy, prm, others, budget=4, settings=S, seed=[SEEDS[2], 99, SEEDS[0], 7], extract=extract)
    for p in range(len(PROMPTS)):
        alone = run(name, policy, prm, [PROMPTS[p]], budget=4, settings=S, seed=[SEEDS[p]], extract=extract)
        _same(_view(alone, 0), _view(batched, p))
    _same(_view(mixed, 2), _view(batched, 0))
    _same(_view(mixed, 0), _view(batched, 2))
    if name != "greedy":
        # The draws do depend on the seed: the same prompt under another seed samples other texts.
        assert [c.text for c in mixed.candidates[3]] != [c.text for c in mixed.candidates[0]]


def test_a_run_seed_keeps_its_layout(models):
    # An int seed is the run's seed: rows keyed by batch position (results of earlier releases unchanged),
    # so a prompt's candidates follow its place in the batch.
    policy, prm = models
    a = run("best_of_n", policy, prm, PROMPTS[:2], budget=4, settings=S, seed=3, extract=extract)
    b = run("best_of_n", policy, prm, PROMPTS[1:2], budget=4, settings=S, seed=3, extract=extract)
    assert [c.text for c in a.candidates[1]] != [c.text for c in b.candidates[0]]


@pytest.mark.parametrize("name", sorted(n for n, e in STRATEGIES.items() if e.pooled))
def test_pooled_strategies_take_per_prompt_seeds(models, name):
    policy, prm = models
    a = run(name, policy, prm, PROMPTS, budget=4, settings=S, seed=SEEDS, extract=extract)
    b = run(name, policy, prm, PROMPTS, budget=4, settings=S, seed=SEEDS, extract=extract)
    assert a.predictions == b.predictions and a.samples <= 4 * len(PROMPTS)


def test_bad_seeds_are_refused_naming_seed(models):
    policy, prm = models
    for bad, err in (([1, 2], ValueError), ("7", TypeError), ([1, 2, True, 4], TypeError), (2**64, ValueError),
                     ([1.0, 2, 3, 4], TypeError), (None, TypeError)):
        with pytest.raises(err, match="seed"):
            run("best_of_n", policy, prm, PROMPTS, budget=2, settings=S, seed=bad, extract=extract)
    with pytest.raises(ValueError, match="one int per prompt"):
        check_seed([1], 2)


def test_rows_of_slots_count_within_each_prompt():
    seed, stream = Seeds([10, 20, 30], 3).rows_of([2, 0, 2, 2, 0], "cpu")
    assert seed.tolist() == [30, 10, 30, 30, 10] and stream.tolist() == [0, 0, 1, 2, 1]
    seed, stream = Seeds(5, 3).rows_of([2, 0], "cpu")
    assert int(seed) == 5 and stream is None
    keys = Seeds([1, 2, 3], 3).shift(2**63 - 2).take([2, 0])
    assert keys.per_prompt == [-(2**63) + 1, 2**63 - 1]  # wrapped to 64 bits


def test_resample_row_keyed_by_its_own_seed_draws_the_same_anywhere():
    g = torch.Generator().manual_seed(0)
    lw = torch.randn(5, 7, generator=g, dtype=torch.float64)
    seeds = torch.tensor([3, 9, 27, 81, 243])
    zeros = torch.zeros(5, dtype=torch.int64)
    for method in ("systematic", "multinomial"):
        full = resample(lw, method=method, seed=seeds, offset=4, stream=zeros)
        for p in range(5):
            one = resample(lw[p:p + 1], method=method, seed=seeds[p:p + 1], offset=4, stream=zeros[:1])
            assert torch.equal(one[0], full[p])
    # Without streams the rows are keyed by index: row 3 alone (index 0) draws other uniforms.
    assert not torch.equal(resample(lw[3:4], method="multinomial", seed=seeds[3:4], offset=4)[0],
                           resample(lw, method="multinomial", seed=seeds, offset=4)[3])
