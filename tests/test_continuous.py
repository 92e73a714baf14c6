"""Continuous batching in the sampling decode loop (search.decode.SampleLoop, best_of_n.serve_sampling): groups
of prompts that join a running loop at its host looks get exactly what they get alone (candidates, tokens,
scores, compute), a group waits while the loop is full, a cancelled group leaves the others untouched, and the
pool is empty afterwards."""
import pytest
import torch

from join_checks import served
from tts_kernels import bundled
from tts_kernels.apps.engine import request_seeds
from tts_kernels.search import Settings, run_continuous
from tts_kernels.search.best_of_n import sampling_results, serve_sampling
from tts_kernels.search.cancel import Cancellation, cancellation
from tts_kernels.search.decode import SampleGroup, SampleLoop
from tts_kernels.search.seeds import Seeds

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min): admission

PROMPTS = [p.prompt for p in bundled.test_problems(12)]
RULES = {"best_of_n": "best", "majority": "majority"}


@pytest.fixture(scope="module")
def models():
    return bundled.load_policy("small"), bundled.load_verifier("prm")


def requests():
    """Four requests of 1-3 prompts, each with its request seeds."""
    sizes = [3, 1, 2, 2]
    out, at = [], 0
    for i, k in enumerate(sizes):
        out.append((PROMPTS[at: at + k], request_seeds(100 + i, k)))
        at += k
    return out


def alone(models, prompts, seeds, n, s):
    policy, verifier = models
    return sampling_results(RULES, policy, verifier, prompts, n=n, settings=s, seed=seeds, extract=_extract)


def _extract(text):
    from tts_kernels.search.answers import extract_answer
    return extract_answer(text)


def same(a, b):
    assert a.predictions == b.predictions and a.chosen == b.chosen
    for ca, cb in zip(a.candidates, b.candidates):
        assert [c.token_ids for c in ca] == [c.token_ids for c in cb]
        assert [(c.text, c.finish, c.answer, c.steps) for c in ca] == [(c.text, c.finish, c.answer, c.steps) for c in cb]
        assert [c.score for c in ca] == pytest.approx([c.score for c in cb], rel=1e-5, abs=1e-6, nan_ok=True)
    assert a.compute.policy_prefill_tokens == b.compute.policy_prefill_tokens
    assert a.compute.policy_generated_tokens == b.compute.policy_generated_tokens
    assert a.info["policy_forward_tokens"] == b.info["policy_forward_tokens"]
    assert a.compute.policy_flops == pytest.approx(b.compute.policy_flops, rel=1e-12)


def serve(models, reqs, n, s, *, joins_at, capacity=64):
    """The first request starts the loop; request i > 0 is offered from look ``joins_at[i - 1]`` on. Returns
    {request index: results}, the look at which each started, and the looks seen."""
    policy, verifier = models
    got, began, held, looks = served(
        lambda join, deliver, started: serve_sampling(
            RULES, policy, verifier, reqs[0][0], reqs[0][1], n=n, tag=0, settings=s, extract=_extract, join=join,
            deliver=deliver, started=started, capacity=capacity), reqs, joins_at, held=lambda: policy.kv_ledger.blocks)
    # the groups that end the loop are handed over once its pool is free (a server's last answer finds no KV held)
    assert held[-1] == 0 and held[0] > 0
    return got, began, looks


@pytest.mark.parametrize("s", [Settings(max_new_tokens=40), Settings(max_new_tokens=21, sync_every=4),
                               Settings(max_new_tokens=32, sync_every=3, stop=["\n\n"])],
                         ids=["default", "length-not-a-multiple", "stop-string"])
def test_groups_joining_at_looks_get_what_they_get_alone(models, s):
    reqs = requests()
    got, began, looks = serve(models, reqs, 4, s, joins_at=[1, 1, 3])
    assert sorted(got) == [0, 1, 2, 3] and began[1] == began[2] == 1 and began[3] >= 3
    refs = [alone(models, prompts, seeds, 4, s) for prompts, seeds in reqs]
    for i, ref in enumerate(refs):
        for name in RULES:
            same(got[i][name], ref[name])
    # groups ending at one look are scored in one verifier call: together they ran what they run alone
    assert sum(got[i]["best_of_n"].compute.prm_tokens for i in got) == pytest.approx(
        sum(r["best_of_n"].compute.prm_tokens for r in refs), abs=len(got))
    assert models[0].kv_ledger.blocks == 0 and models[1].kv_ledger.blocks == 0


def test_a_group_waits_while_the_loop_is_full(models):
    """Capacity of 2 prompts' rows: the 3-prompt first request runs alone (a first group runs whatever its size),
    the others join only as rows free up, one at a time; every answer is still exact."""
    s = Settings(max_new_tokens=24)
    reqs = requests()
    got, began, _ = serve(models, reqs, 2, s, joins_at=[0, 0, 0], capacity=2)
    assert sorted(got) == [0, 1, 2, 3]
    assert began[1] > 0 and began[2] > began[1]  # each waited for room
    for i, (prompts, seeds) in enumerate(reqs):
        same(got[i]["best_of_n"], alone(models, prompts, seeds, 2, s)["best_of_n"])
    assert models[0].kv_ledger.blocks == 0


def test_a_cancelled_group_leaves_and_the_others_are_exact(models):
    s = Settings(max_new_tokens=40)
    reqs = requests()
    stop = Cancellation()
    with cancellation(stop):
        policy, verifier = models
        got = {}
        first_of = {}

        def started(g):
            first_of[g.tag] = g.first
            if g.tag == 2:  # its client went away as it joined
                stop.cancel(range(g.first, g.first + len(g.prompts)))

        serve_sampling(RULES, policy, verifier, reqs[0][0], reqs[0][1], n=4, tag=0, settings=s, extract=_extract,
                       join=lambda fit: [g for i in (1, 2, 3) if i not in first_of
                                         for g in [fit(reqs[i][0], reqs[i][1], i)] if g is not None],
                       deliver=lambda g, res: got.__setitem__(g.tag, res), started=started, capacity=64)
    assert first_of == {0: 0, 1: 3, 2: 4, 3: 6}  # prompts numbered across the call, in joining order
    for i in (0, 1, 3):
        same(got[i]["best_of_n"], alone(models, reqs[i][0], reqs[i][1], 4, s)["best_of_n"])
    full = alone(models, reqs[2][0], reqs[2][1], 4, s)["best_of_n"]
    assert got[2]["best_of_n"].compute.policy_generated_tokens < full.compute.policy_generated_tokens
    # its candidates were not scored: the verifier read its prompts only
    assert all(c.steps == [] for row in got[2]["best_of_n"].candidates for c in row)
    assert got[2]["best_of_n"].compute.prm_tokens <= got[2]["best_of_n"].compute.policy_prefill_tokens


def test_per_group_counts_equal_the_sessions(models):
    """Alone, a group's host-side forward and key counts are the session's own."""
    policy = models[0]
    sessions = []

    class Spy:
        def __getattr__(self, name):
            return getattr(policy, name)

        def start(self, *a, **k):
            sessions.append(policy.start(*a, **k))
            return sessions[-1]

    got = []
    loop = SampleLoop(Spy(), max_new_tokens=30, sync_every=4)
    loop.run(SampleGroup(PROMPTS[:3], 5, Seeds(request_seeds(7, 3), 3)),
             done=lambda pairs: got.extend(out for _, out in pairs))
    assert got[0].forward == sessions[0].tokens and got[0].keys == int(sessions[0].keys)
    assert got[0].prefill == sessions[0].prefill_tokens


def test_admit_prefills_into_the_running_pool(models):
    """PolicySession.admit: the new prompts' logits equal a fresh session's, the running rows are untouched."""
    policy = models[0]
    ids = [policy.encode(p) for p in PROMPTS[:4]]
    a = policy.start(ids[:2], rows_hint=8, max_new_tokens=8)
    b = policy.start(ids[2:], rows_hint=8, max_new_tokens=8)
    try:
        before = a.logits.clone()
        a.admit(ids[2:])
        assert a.rows == 4 and torch.equal(a.logits[:2], before)
        torch.testing.assert_close(a.logits[2:], b.logits, rtol=1e-5, atol=1e-5)
        assert a.prefill_tokens == sum(map(len, ids))
        with pytest.raises(ValueError, match="at least one token"):
            a.admit([[]])
        assert a.rows == 4
    finally:
        a.free()
        b.free()
    assert policy.kv_ledger.blocks == 0


def test_admit_into_a_full_pool_fails_and_changes_nothing(models):
    """A pool without room for the new prompts: the error names the pool, and the session is as it was (its rows,
    logits and blocks), so the running rows go on."""
    policy = models[0]
    ids = [policy.encode(p) for p in PROMPTS[:3]]
    saved = policy.num_blocks
    policy.num_blocks = sum(-(-len(i) // policy.block_size) for i in ids[:2]) + 2  # the first two prompts + a token each
    try:
        a = policy.start(ids[:2], rows_hint=2, max_new_tokens=0)
        before, free = a.logits.clone(), a.cache.kv.num_free_blocks
        with pytest.raises(ValueError, match="block"):
            a.admit(ids[2:] * 4)
        assert a.rows == 2 and torch.equal(a.logits, before) and a.cache.kv.num_free_blocks == free
        a.decode(torch.zeros(2, dtype=torch.long))  # the running rows still decode
        a.free()
    finally:
        policy.num_blocks = saved
    assert policy.kv_ledger.blocks == 0


def test_run_continuous_checks_its_arguments(models):
    policy, verifier = models
    kw = dict(budget=2, join=lambda fit: [], deliver=lambda g, r: None, capacity=4)
    with pytest.raises(ValueError, match="does not take requests while it runs.*best_of_n.*dvts.*prm_beam_search.*rebase"):
        run_continuous("particle_gibbs", policy, verifier, PROMPTS[:1], [1], **kw)
    with pytest.raises(ValueError, match="seed"):
        run_continuous("best_of_n", policy, verifier, PROMPTS[:2], [1], **kw)
    with pytest.raises(ValueError, match="capacity"):
        run_continuous("best_of_n", policy, verifier, PROMPTS[:1], [1], **{**kw, "capacity": 0})
    with pytest.raises(ValueError, match="verifier"):
        run_continuous("best_of_n", policy, None, PROMPTS[:1], [1], **kw)


def test_a_failed_continuous_call_answers_every_request_it_took(models):
    """The engine's side: a continuous call whose search fails after requests joined it answers each of them
    with the error (none is left waiting), and the engine goes on to serve the next request."""
    import asyncio

    from tts_kernels.apps.engine import Engine, Job

    policy, verifier = models

    class Boom:  # the policy, whose sessions cannot admit prompts (a failure inside a running call)
        def __getattr__(self, name):
            return getattr(policy, name)

        def start(self, *a, **k):
            session = policy.start(*a, **k)

            class Session:
                def __getattr__(self, name):
                    return getattr(session, name)

                def admit(self, prompt_ids):
                    raise RuntimeError("boom")

            return Session()

    s = Settings(max_new_tokens=96)

    def job(i):
        return Job(id=f"j{i}", prompts=[PROMPTS[i]], seeds=request_seeds(i, 1), strategy="best_of_n", budget=8,
                   settings=s)

    async def main():
        engine = Engine(Boom(), verifier, max_batch=8, max_wait_ms=0)
        await engine.start()
        try:
            first = asyncio.ensure_future(engine.submit(job(0)))
            while engine.running == 0:  # the first call's rows run
                await asyncio.sleep(0.005)
            rest = [asyncio.ensure_future(engine.submit(job(i))) for i in (1, 2)]
            got = await asyncio.wait_for(asyncio.gather(first, *rest, return_exceptions=True), 120)
            after = await asyncio.wait_for(engine.submit(job(3)), 120)  # a call of its own: no admission needed
            return got, after, engine.running
        finally:
            await engine.stop()

    got, after, running = asyncio.run(main())
    assert any(isinstance(g, RuntimeError) and "boom" in str(g) for g in got)
    assert all(isinstance(g, RuntimeError) or g.result.predictions is not None for g in got)
    assert after.result.candidates and running == 0
    assert policy.kv_ledger.blocks == 0


def _serve_revise(models, reqs, budget, s, *, joins_at, stop=None, cancel_on_start=()):
    """``revise`` under continuous batching (run_continuous): request i > 0 is offered from look ``joins_at[i-1]``
    on; those in ``cancel_on_start`` are cancelled as they start. Returns {request: result}, {request: look}."""
    policy, verifier = models

    def cancel(g):
        if g.tag in cancel_on_start:
            stop.cancel(range(g.first, g.first + len(g.prompts)))

    with cancellation(stop or Cancellation()):
        got, began, _, _ = served(
            lambda join, deliver, started: run_continuous(
                "revise", policy, verifier, reqs[0][0], reqs[0][1], budget=budget, settings=s, tag=0, join=join,
                deliver=deliver, started=started, capacity=16), reqs, joins_at, on_start=cancel)
    return got, began


@pytest.mark.parametrize("budget,s", [(4, Settings(revisions=1, max_new_tokens=32)),
                                      (6, Settings(revisions=2, max_new_tokens=21, sync_every=4, stop=["\n\n"]))],
                         ids=["one-revision", "two-revisions-stop"])
def test_revise_requests_joining_a_running_call_get_what_they_get_alone(models, budget, s):
    """Each revision round of each request is a group of the loop, joining at a look after its previous round
    ended (a new loop when its round ended the last one); a request's attempts, scores and compute are those
    of its run alone, whatever rounds of other requests it shared looks with."""
    from tts_kernels.search import run

    reqs = requests()
    got, began = _serve_revise(models, reqs, budget, s, joins_at=[1, 2, 6])
    assert sorted(got) == [0, 1, 2, 3] and began[1] == 1 and began[2] >= 2 and began[3] >= 6
    for i, (prompts, seeds) in enumerate(reqs):
        ref = run("revise", *models, prompts, budget=budget, settings=s, seed=seeds)
        same(got[i], ref)
        assert got[i].compute.prm_tokens == ref.compute.prm_tokens and got[i].prompt_info == ref.prompt_info
    assert models[0].kv_ledger.blocks == 0 and models[1].kv_ledger.blocks == 0


def test_a_cancelled_revise_request_stops_its_rounds_and_the_others_are_exact(models):
    from tts_kernels.search import run

    s = Settings(revisions=2, max_new_tokens=24)
    reqs = requests()[:3]
    stop = Cancellation()
    got, _ = _serve_revise(models, reqs, 3, s, joins_at=[1, 1], stop=stop, cancel_on_start={1})
    assert sorted(got) == [0, 1, 2]
    # its rows left at their first look, and no later round ran: nothing of it was generated beyond that look
    assert got[1].compute.policy_generated_tokens <= len(reqs[1][0]) * s.sync_every
    for i in (0, 2):
        same(got[i], run("revise", *models, reqs[i][0], budget=3, settings=s, seed=reqs[i][1]))
    assert models[0].kv_ledger.blocks == 0


def test_a_revise_round_that_outgrows_a_fixed_pool_fails_its_request_only(models):
    """A fixed KV pool (``num_blocks`` 60) holds every request's first round, but not the second round of a
    3-prompt request (each chain re-reads its prompt, attempt and revision prompt: 76 blocks at worst). That
    request fails with ``PoolTooSmall`` when its second round would join; the requests sharing the call are
    answered as alone, and no block is left held."""
    from join_checks import Offers

    from tts_kernels.search import run
    from tts_kernels.search.validate import PoolTooSmall

    policy, verifier = models
    s = Settings(revisions=1, max_new_tokens=32)
    reqs = [([PROMPTS[0]], request_seeds(1, 1)), (PROMPTS[1:4], request_seeds(2, 3)), ([PROMPTS[4]], request_seeds(3, 1))]
    got, began = {}, {}
    join = Offers(reqs, [1, 1])
    policy.num_blocks = 60
    try:
        run_continuous("revise", policy, verifier, reqs[0][0], reqs[0][1], budget=4, settings=s, tag=0, join=join,
                       deliver=lambda g, res: got.__setitem__(g.tag, res),
                       started=lambda g: began.__setitem__(g.tag, join.looks), capacity=16)
        refs = {i: run("revise", policy, verifier, prompts, budget=4, settings=s, seed=seeds)
                for i, (prompts, seeds) in enumerate(reqs) if i != 1}
    finally:
        policy.num_blocks = None
    assert sorted(got) == [0, 1, 2] and began[1] == 1  # (its first round ran)
    assert isinstance(got[1], PoolTooSmall) and "holds 60 in all" in str(got[1])
    for i, ref in refs.items():
        same(got[i], ref)
    assert policy.kv_ledger.blocks == 0
