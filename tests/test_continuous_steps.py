"""Continuous batching of the step searches (step_loop.run_groups with join, serve_steps, search.run_continuous):
requests that join a running PRM beam search, DVTS, particle filter or REBASE at a step boundary get exactly what they get alone
(candidates, steps, scores, tokens), their compute is their own and adds up to the sessions', a request that
does not fit waits, a cancelled one leaves the others exact, and the pools are empty afterwards."""
import pytest
import torch

from join_checks import Offers, served
from tts_kernels import bundled
from tts_kernels.apps.engine import request_seeds
from tts_kernels.search import Settings, run, run_continuous
from tts_kernels.search.cancel import Cancellation, cancellation
from tts_kernels.search.rows import StepRows
from tts_kernels.search.seeds import Seeds
from tts_kernels.search.validate import PoolTooSmall

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min): admission

PROMPTS = [p.prompt for p in bundled.test_problems(12)]


@pytest.fixture(scope="module")
def models():
    return bundled.load_policy("small"), bundled.load_verifier("prm")


def requests(sizes=(2, 1, 2, 1)):
    out, at = [], 0
    for i, k in enumerate(sizes):
        out.append((PROMPTS[at: at + k], request_seeds(200 + i, k)))
        at += k
    return out


def serve(models, strategy, reqs, budget, s, *, joins_at, capacity=64):
    """The first request starts the search; request i > 0 is offered from step boundary ``joins_at[i - 1]``
    on. Returns {request: result}, the boundary at which each started, and the KV blocks held at each answer."""
    policy, verifier = models
    got, began, held, _ = served(
        lambda join, deliver, started: run_continuous(
            strategy, policy, verifier, reqs[0][0], reqs[0][1], budget=budget, settings=s, tag=0, join=join,
            deliver=deliver, started=started, capacity=capacity),
        reqs, joins_at, held=lambda: policy.kv_ledger.blocks + verifier.kv_ledger.blocks)
    return got, began, held


def close(a, b):
    """Equal structures, floats to within a batch's rounding (a row's logits in a batch of another size)."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            close(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            close(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    else:
        assert a == b


def same(a, b):
    assert a.strategy == b.strategy and a.predictions == b.predictions and a.chosen == b.chosen
    close(a.prompt_info, b.prompt_info)  # particles: weights, ess, resampling steps; rebase: widths
    for ca, cb in zip(a.candidates, b.candidates, strict=True):
        assert [(c.text, c.finish, c.answer, c.steps) for c in ca] == [(c.text, c.finish, c.answer, c.steps) for c in cb]
        assert [c.score for c in ca] == pytest.approx([c.score for c in cb], rel=1e-5, abs=1e-6, nan_ok=True)
        assert [c.step_scores for c in ca] == [pytest.approx(c.step_scores, rel=1e-5, abs=1e-6) for c in cb]
    # a request's own tokens, and its verifier's work, are what it spends alone
    for f in ("policy_prefill_tokens", "policy_generated_tokens", "prm_tokens", "thinking_tokens"):
        assert getattr(a.compute, f) == getattr(b.compute, f), f
    assert a.compute.prm_flops == pytest.approx(b.compute.prm_flops, rel=1e-12)
    assert a.compute.policy_flops > 0


SETTINGS = [
    ("prm_beam_search", 4, Settings(num_iterations=4, beam_width=2)),
    ("prm_beam_search", 4, Settings(num_iterations=3, beam_width=2, lookahead=1, max_step_tokens=13)),
    ("prm_beam_search", 6, Settings(num_iterations=4, beam_width=3, filter_duplicates=True, sync_every=3)),
    ("dvts", 4, Settings(num_iterations=4, beam_width=2)),
    ("dvts", 4, Settings(num_iterations=3, beam_width=2, return_siblings=True, lookahead=1)),
    ("particle_filtering", 4, Settings(num_iterations=4, keep_best=True)),
    # temperatures that follow each prompt's own iteration; weights without a verifier; a pick drawn by weight
    ("particle_filtering", 4, Settings(num_iterations=4, entropic="annealed", ess_threshold=1.0,
                                       particle_weight="self_certainty", particle_select="sample")),
    ("entropic_particle_filtering", 5, Settings(num_iterations=4, resampling="multinomial")),
    ("rebase", 4, Settings(num_iterations=4)),
]


@pytest.mark.parametrize("strategy,budget,s", SETTINGS,
                         ids=["beam", "beam-lookahead", "beam-dedupe", "dvts", "dvts-siblings-lookahead", "particles",
                              "particles-annealed-self-certainty", "entropic-particles", "rebase"])
def test_requests_joining_at_step_boundaries_get_what_they_get_alone(models, strategy, budget, s):
    reqs = requests()
    got, began, held = serve(models, strategy, reqs, budget, s, joins_at=[1, 1, 2])
    assert sorted(got) == [0, 1, 2, 3] and began[1] == began[2] == 1 and began[3] == 2
    for i, (prompts, seeds) in enumerate(reqs):
        same(got[i], run(strategy, *models, prompts, budget=budget, settings=s, seed=seeds))
    # the request that ends the search is answered once its pools are free
    assert held[-1] == 0 and held[0] > 0
    assert models[0].kv_ledger.blocks == 0 and models[1].kv_ledger.blocks == 0


def test_a_request_joining_on_the_last_iteration_of_another_is_exact(models):
    # request 0 steps to its end while request 1 samples its first step (per-row final steps)
    s = Settings(num_iterations=3, beam_width=2, max_new_tokens=40)
    reqs = requests((1, 2))
    got, began, _ = serve(models, "prm_beam_search", reqs, 4, s, joins_at=[2])
    assert began[1] == 2
    for i, (prompts, seeds) in enumerate(reqs):
        same(got[i], run("prm_beam_search", *models, prompts, budget=4, settings=s, seed=seeds))


def test_a_request_waits_while_the_search_is_full(models):
    s = Settings(num_iterations=3, beam_width=2)
    reqs = requests((2, 1, 1))
    # capacity: 3 prompts' rows; request 1 fits beside request 0, request 2 waits for request 0 to end
    got, began, _ = serve(models, "dvts", reqs, 4, s, joins_at=[1, 1], capacity=3)
    assert began[1] == 1 and began[2] > 1
    for i, (prompts, seeds) in enumerate(reqs):
        same(got[i], run("dvts", *models, prompts, budget=4, settings=s, seed=seeds))


@pytest.mark.parametrize("strategy", ["prm_beam_search", "particle_filtering", "rebase"])
def test_a_cancelled_request_leaves_and_the_others_are_exact(models, strategy):
    s = Settings(num_iterations=4, beam_width=2)
    reqs = requests((1, 2, 1))
    stop = Cancellation()
    firsts = {}

    policy, verifier = models
    got, join = {}, Offers(reqs, [1, 1])

    def started(g):
        firsts[g.tag] = g.first
        if g.tag == 1:  # cancelled as it joins
            stop.cancel(range(g.first, g.first + len(g.prompts)))

    with cancellation(stop):
        run_continuous(strategy, policy, verifier, reqs[0][0], reqs[0][1], budget=4, settings=s, tag=0,
                       join=join, deliver=lambda g, res: got.__setitem__(g.tag, res), started=started, capacity=64)
    assert sorted(got) == [0, 1, 2] and firsts == {0: 0, 1: 1, 2: 3}
    for i in (0, 2):
        same(got[i], run(strategy, *models, reqs[i][0], budget=4, settings=s, seed=reqs[i][1]))
    assert policy.kv_ledger.blocks == 0 and verifier.kv_ledger.blocks == 0


def test_per_prompt_counts_add_up_to_the_sessions(models):
    """StepRows(tally=True) with prompts admitted mid-search and lookahead rollouts: the per-prompt counts sum to
    exactly what the sessions ran (policy positions and keys, verifier tokens and keys)."""
    policy, verifier = models
    s = Settings(num_iterations=4, beam_width=2, lookahead=1)
    rows = StepRows(policy, verifier, PROMPTS[:2], s, seeds=Seeds([1, 2], 2), capacity=16, tally=True)
    try:
        assert rows.admits
        rows.fork([0, 0, 1, 1])
        _, finish = rows.step(False)
        rows.lookahead_scores(finish, 1)
        rows.admit(PROMPTS[2:4], [3, 4])
        rows.fork([0, 1, 2, 3, 4, 4, 5, 5])
        rows.step([False, False, True, True])  # the first two prompts sample a step, the new ones to the end
        _, finish = rows.step([True, True, True, True])
        t = rows.tally
        assert len(t.prefill) == 4 and all(v > 0 for v in t.forward) and all(v > 0 for v in t.prm_tokens)
        assert sum(t.forward) == rows.pol.prefill_tokens + rows.forward_rows
        assert sum(t.keys) == int(rows.pol.keys) + rows.keys_extra
        assert sum(t.prm_tokens) == rows.prm.tokens + rows.prm_extra
        assert sum(t.prm_keys) == rows.prm.keys + rows.prm_keys_extra
        assert sum(t.generated) == rows.generated and sum(t.prefill) == rows.pol.prefill_tokens
        whole, parts = rows.compute(), [rows.compute([p]) for p in range(4)]
        assert sum(c.policy_generated_tokens for c in parts) == whole.policy_generated_tokens
        assert sum(c.prm_tokens for c in parts) == whole.prm_tokens
        assert sum(c.policy_flops for c in parts) == pytest.approx(whole.policy_flops, rel=1e-9)
        assert sum(c.prm_flops for c in parts) == pytest.approx(whole.prm_flops, rel=1e-9)
    finally:
        rows.free()


def test_admitted_prompts_step_as_a_fresh_search(models):
    """A prompt admitted into running rows samples and scores its first step as a fresh StepRows does."""
    policy, verifier = models
    s = Settings(num_iterations=3, beam_width=2)
    fresh = StepRows(policy, verifier, PROMPTS[4:5], s, seeds=Seeds([9], 1), capacity=8, tally=True)
    rows = StepRows(policy, verifier, PROMPTS[:1], s, seeds=Seeds([1], 1), capacity=8, tally=True)
    try:
        fresh.fork([0, 0])
        want, _ = fresh.step(False)
        rows.fork([0, 0])
        rows.step(False)
        rows.admit(PROMPTS[4:5], [9])
        rows.fork([0, 1, 2, 2])
        got, _ = rows.step([False, False])
        assert got[2:] == want
        assert rows.step_scores[2:] == [pytest.approx(x, rel=1e-5) for x in fresh.step_scores]
        assert rows.tally.prefill[1] == fresh.tally.prefill[0] and rows.tally.prm_tokens[1] == fresh.tally.prm_tokens[0]
    finally:
        rows.free()
        fresh.free()
    assert policy.kv_ledger.blocks == 0 and verifier.kv_ledger.blocks == 0


def test_admit_refuses_and_changes_nothing(models):
    policy, verifier = models
    s = Settings(num_iterations=3, beam_width=2)
    rows = StepRows(policy, verifier, PROMPTS[:1], s, seeds=0, capacity=8, tally=True)
    try:
        with pytest.raises(ValueError, match="one seed per prompt"):
            rows.admit(PROMPTS[1:2], [1])  # a run seed: rows draw by batch position
    finally:
        rows.free()
    rows = StepRows(policy, verifier, PROMPTS[:1], s, seeds=[1], capacity=8, tally=True)
    try:
        with pytest.raises(ValueError, match="one seed per prompt"):
            rows.admit(PROMPTS[1:3], [1])
        before = (len(rows), rows.pol.rows, rows.prm.rows, policy.kv_ledger.blocks)
        real = verifier.encode_prompt
        verifier.encode_prompt = lambda p: (_ for _ in ()).throw(RuntimeError("verifier down"))
        try:
            with pytest.raises(RuntimeError, match="verifier down"):
                rows.admit(PROMPTS[1:2], [5])
        finally:
            verifier.encode_prompt = real
        assert (len(rows), rows.pol.rows, rows.prm.rows, policy.kv_ledger.blocks) == before
        assert rows.P == 1 and len(rows.tally.prefill) == 1
    finally:
        rows.free()
    untallied = StepRows(policy, verifier, PROMPTS[:1], s, seeds=[1], capacity=8)
    try:
        with pytest.raises(TypeError, match="tally"):
            untallied.admit(PROMPTS[1:2], [5])
        with pytest.raises(ValueError, match="tally"):
            untallied.compute([0])
    finally:
        untallied.free()


def test_sample_steps_per_row_final_and_offsets_match_separate_calls(models):
    """sample_steps with per-row offsets and final flags gives each row what a call of its own kind gives (the
    same two prompts prefilled together each time: a batch's padding is part of what a row sees)."""
    from tts_kernels.search.steps import DelimiterMatcher, sample_steps
    policy, _ = models
    ids = [policy.encode(p) for p in PROMPTS[:2]]
    m = DelimiterMatcher(policy.tokenizer, "\n\n", policy.model.config.vocab_size)
    kw = dict(eos_ids=list(policy.eos_token_ids), temperature=1.0, sync_every=4, offset=torch.tensor([5, 30]),
              seed=torch.tensor([7, 8]))

    def call(**k):
        sess = policy.start(ids, rows_hint=2, max_new_tokens=64)
        try:
            st = sample_steps(sess, **kw, **k)
            return st, sess.tokens - sess.prefill_tokens, int(sess.keys)
        finally:
            sess.free()

    steps, _, _ = call(max_tokens=12, matcher=m)
    ends, _, _ = call(max_tokens=40, matcher=None)
    st, ran, keys = call(max_tokens=12, matcher=m, final=torch.tensor([False, True]), final_tokens=40, count_rows=True)
    for i, want in enumerate([steps, ends]):
        count = int(want.counts[i])
        assert int(st.counts[i]) == count and bool(st.delimited[i]) == bool(want.delimited[i])
        assert st.tokens[i].tolist()[:count] == want.tokens[i].tolist()[:count]
        assert all(t == -1 for t in st.tokens[i].tolist()[count:])
    assert not bool(st.delimited[1]) and int(st.counts[1]) > 12  # the final row ran past the step limit
    # per-row counts: every decode position and every key the session ran
    assert int(st.row_forward.sum()) == st.forward_rows == ran
    assert int(st.row_keys.sum()) == keys - sum(len(p) * (len(p) + 1) // 2 for p in ids)


def test_an_answered_request_leaves_nothing_in_the_search(models):
    """A long continuous call keeps only its running prompts' state: once every request is answered, the
    searches (beam, particles, REBASE) hold no prompt's completions, particles, weights or info."""
    from tts_kernels.search.particle_filter import _Particles
    from tts_kernels.search.rebase import _Tree
    from tts_kernels.search.step_loop import serve_groups
    from tts_kernels.search.step_search import _search

    policy, verifier = models
    s = Settings(num_iterations=3, beam_width=2)
    reqs = requests((1, 2, 1))
    for search in (_search("prm_beam_search", 4, s, "best", lambda t: None, policy.device),
                   _Particles(4, s, lambda t: None, policy.device, lambda g, *rest: rest),
                   _Tree(4, s, "weighted", lambda t: None, policy.device)):
        got = []
        serve_groups(search, policy, verifier, *reqs[0], s=s, tag=0, join=Offers(reqs, [1, 1]),
                     deliver=lambda g, res: got.append(g.tag), capacity=16)
        assert sorted(got) == [0, 1, 2]
        state = [v for k, v in vars(search).items() if k in ("completed", "done", "info", "held", "slot_of")]
        assert state and all(len(v) == 0 for v in state), vars(search)
        if isinstance(search, _Particles):
            assert search.lw.shape[0] == 0


def test_a_joining_prefill_fits_beside_what_ended_groups_still_hold():
    """The room check at a step boundary where a group ended: the ended group's blocks are free for the joining
    group's worst case, but its rows leave only in the boundary's fork, after the admission's prefill. A group
    whose prefill does not fit beside them waits; once they have left it joins."""
    from types import SimpleNamespace

    from tts_kernels.search.step_loop import StepGroup, _join

    B = 4
    rows = SimpleNamespace(pol=SimpleNamespace(pool=(100, B, 1000)), prm=None, capacity=1000,
                           policy=SimpleNamespace(num_blocks=100, block_size=B), prm_model=None)

    def blocks_of(g):  # (prefill, worst case): its prompt blocks, and 50 more for its rows
        prefill = sum(-(-len(p) // B) for p in g.prompts)
        return (prefill, 0), (prefill + 50, 0)

    new = StepGroup(["x" * 24], Seeds([1], 1))  # 6 prompt blocks, 56 in all
    ended = [SimpleNamespace(commit=(60, 0))]

    def offer(fit):
        return [g for g in [new] if fit(g)]

    held = {"blocks": (40, 0)}  # the running groups' (the ended group's 60 already given back)
    assert _join(offer, rows, 8, 2, held, blocks_of, ended) == []  # prefill: 40 + 60 + 6 > 100
    assert _join(offer, rows, 8, 2, held, blocks_of, ()) == [new]  # 40 + 56 <= 100
    held = {"blocks": (30, 0)}
    assert _join(offer, rows, 8, 2, held, blocks_of, ended) == [new]  # 30 + 60 + 6 <= 100
    # A group whose worst case exceeds the whole (fixed) pool could never join: refused, not kept waiting.
    new = StepGroup(["x" * 204], Seeds([1], 1))  # 51 prompt blocks, 101 in all
    with pytest.raises(PoolTooSmall, match="needs up to 101 KV blocks in the policy's pool, which holds 100"):
        _join(offer, rows, 0, 2, {"blocks": (0, 0)}, blocks_of, ())
