"""Dropping prompts from a search under way (tts_kernels.search.cancel): the dropped prompts stop costing
compute at the next host look, the others get exactly what they would have got."""
import pytest
from tiny_models import search_models

from tts_kernels.search import STRATEGIES, Settings, run
from tts_kernels.search.cancel import Cancellation, cancellation, cancelled, sub_run

pytestmark = pytest.mark.models

PROMPTS = ["Q: 1+1?\n", "Q: 2*3?\n", "Q: 9-4?\n"]
SEEDS = [4, 5, 6]
S = Settings(max_new_tokens=16, max_step_tokens=12, num_iterations=4, step_delimiter="e", temperature=1.0,
             levels=2, beam_width=2, sync_every=2)


def extract(text):
    return text[:1] or None


@pytest.fixture(scope="module")
def models():
    return search_models()


class AfterLooks(Cancellation):
    """Cancels ``prompts`` once the search has looked ``looks`` times (a client leaving mid-search)."""

    def __init__(self, prompts, looks):
        super().__init__()
        self.later, self.looks = set(prompts), looks

    @property
    def prompts(self):
        self.looks -= 1
        return frozenset(self.later) if self.looks < 0 else frozenset()


def _texts(res, p):
    """Prompt ``p``'s candidates: texts exactly, scores to float32 rounding (the verifier's batch loses the
    dropped prompt's rows, and a matmul over fewer rows may round differently on some CPUs)."""
    return [(c.text, None if c.score != c.score else pytest.approx(c.score, rel=1e-5, abs=1e-6))
            for c in res.candidates[p]]


@pytest.mark.parametrize("looks", [0, 1])
@pytest.mark.parametrize("name", sorted(n for n, e in STRATEGIES.items() if not e.pooled and n != "greedy"))
def test_dropped_prompt_stops_and_the_others_are_unchanged(models, name, looks):
    policy, prm = models
    full = run(name, policy, prm, PROMPTS, budget=4, settings=S, seed=SEEDS, extract=extract)
    with cancellation(AfterLooks([1], looks)):
        part = run(name, policy, prm, PROMPTS, budget=4, settings=S, seed=SEEDS, extract=extract)
    for p in (0, 2):
        assert _texts(part, p) == _texts(full, p) and part.predictions[p] == full.predictions[p]
    assert part.compute.policy_generated_tokens < full.compute.policy_generated_tokens
    if STRATEGIES[name].needs_verifier:
        assert part.compute.prm_tokens < full.compute.prm_tokens


@pytest.mark.parametrize("name", sorted(n for n, e in STRATEGIES.items() if e.pooled) + ["greedy"])
def test_cancelling_every_prompt_cuts_the_run_short(models, name):
    policy, prm = models
    full = run(name, policy, prm, PROMPTS, budget=4, settings=S, seed=SEEDS, extract=extract)
    c = Cancellation()
    c.cancel(range(len(PROMPTS)))
    with cancellation(c):
        part = run(name, policy, prm, PROMPTS, budget=4, settings=S, seed=SEEDS, extract=extract)
    assert part.compute.policy_generated_tokens < full.compute.policy_generated_tokens


def test_scope_is_per_block_and_thread():
    import threading

    c = Cancellation()
    c.cancel([2, 0])
    seen = {}
    with cancellation(c):
        assert cancelled() == {0, 2}
        t = threading.Thread(target=lambda: seen.setdefault("other", cancelled()))
        t.start()
        t.join()
    assert cancelled() == frozenset() and seen["other"] == frozenset()


def test_a_sub_run_sees_the_cancelled_prompts_by_its_own_indices():
    c = Cancellation()
    c.cancel([2, 5])
    with sub_run([5, 0, 3]):  # outside any cancellation: nothing to map
        assert cancelled() == frozenset()
    with cancellation(c):
        with sub_run([5, 0, 2, 3]):  # run prompts 5, 0, 2, 3 as 0, 1, 2, 3
            assert cancelled() == {0, 2}
            with sub_run([2, 1]):  # nested: indices into the sub-run (its 2 = run's 2)
                assert cancelled() == {0}
            c.cancel([3])  # seen live, mapped
            assert cancelled() == {0, 2, 3}
        assert cancelled() == {2, 3, 5}
