"""Continuous batching of the early-stopping strategies (early_stop.TraceRun with join, serve_early,
search.run_continuous): requests that join a running deepconf, deepconf_offline, adaptive_consistency or
speculative_rejection token loop at a host look get the candidates, answers and per-prompt decisions they get alone;
their compute is their own and adds up exactly to the sessions'; a request that does not fit waits; a cancelled one
leaves the others exact; and after the last answer no KV block and no prompt's state is held."""
import pytest

from join_checks import Offers, served
from tts_kernels import bundled
from tts_kernels.apps.engine import request_seeds
from tts_kernels.search import Settings, run, run_continuous
from tts_kernels.search.answers import extract_answer
from tts_kernels.search.cancel import Cancellation, cancellation
from tts_kernels.search.early_stop import _RULES, TraceGroup, TraceRun
from tts_kernels.search.seeds import Seeds

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min): admission

PROMPTS = [p.prompt for p in bundled.test_problems(12)]

# (strategy, budget, settings): each makes its rule act (aborted candidates and settled prompts for deepconf,
# prompts settling at different k for adaptive consistency, stop strings for deepconf_offline)
CASES = [
    ("deepconf", 8, Settings(temperature=1.1, deepconf_keep=0.6, consensus=0.6, confidence_window=4,
                             deepconf_warmup=3, max_new_tokens=64, sync_every=4)),
    ("adaptive_consistency", 10, Settings(stop_confidence=0.8, parallel_samples=3, max_new_tokens=64)),
    ("deepconf_offline", 4, Settings(deepconf_keep=0.5, stop=["="], max_new_tokens=32, sync_every=5)),
    ("speculative_rejection", 6, Settings(checkpoint_tokens=8, rejection_rate=0.5, max_new_tokens=48, sync_every=4)),
    # (checkpoints not a multiple of the looks: a request joins only at a checkpoint)
    ("speculative_rejection", 6, Settings(checkpoint_tokens=6, rejection_rate=0.5, max_new_tokens=48, sync_every=4)),
]
IDS = ["deepconf", "adaptive_consistency", "deepconf_offline", "speculative_rejection",
       "speculative_rejection-checkpoints-unaligned"]
# (whose compute is their run alone's: nothing stops early, or every candidate starts at once and a request joins
# at a checkpoint)
EXACT_COMPUTE = ("deepconf_offline", "speculative_rejection")


@pytest.fixture(scope="module")
def policy():
    return bundled.load_policy("small")


@pytest.fixture(scope="module")
def verifier():
    return bundled.load_verifier("prm")


def scorer(strategy, verifier):
    return verifier if strategy == "speculative_rejection" else None


def requests(sizes=(2, 1, 2, 1)):
    out, at = [], 0
    for i, k in enumerate(sizes):
        out.append((PROMPTS[at: at + k], request_seeds(300 + i, k)))
        at += k
    return out


def serve(policy, strategy, reqs, budget, s, *, joins_at, capacity=64, verifier=None):
    """The first request starts the loop; request i > 0 is offered from look ``joins_at[i - 1]`` on. Returns
    {request: result}, the look at which each started, and the KV blocks held at each answer."""
    got, began, held, _ = served(
        lambda join, deliver, started: run_continuous(
            strategy, policy, verifier, reqs[0][0], reqs[0][1], budget=budget, settings=s, tag=0, join=join,
            deliver=deliver, started=started, capacity=capacity),
        reqs, joins_at, held=lambda: policy.kv_ledger.blocks + (verifier.kv_ledger.blocks if verifier else 0))
    return got, began, held


def same_decisions(a, b):
    """The same candidates (tokens, texts, finishes, answers, confidences), answers and per-prompt decisions;
    ``started`` and ``tokens`` (candidates begun and tokens spent past the decision) depend on the batch."""
    assert a.predictions == b.predictions and a.chosen == b.chosen
    for ca, cb in zip(a.candidates, b.candidates, strict=True):
        assert [(c.token_ids, c.text, c.finish, c.answer) for c in ca] == [
            (c.token_ids, c.text, c.finish, c.answer) for c in cb]
        for x, y in zip(ca, cb):
            assert x.score == pytest.approx(y.score, rel=1e-5, nan_ok=True)
            assert x.token_confidence == pytest.approx(y.token_confidence, rel=1e-5)
    for x, y in zip(a.prompt_info, b.prompt_info, strict=True):
        assert x.keys() == y.keys()
        for k in x.keys() - {"started", "tokens"}:  # (a threshold: to a batch's rounding)
            assert x[k] == (pytest.approx(y[k], rel=1e-5) if isinstance(y[k], float) else y[k]), k
    assert a.compute.policy_prefill_tokens == b.compute.policy_prefill_tokens


@pytest.mark.parametrize("strategy,budget,s", CASES, ids=IDS)
def test_requests_joining_at_looks_decide_as_alone(policy, verifier, strategy, budget, s):
    reqs = requests()
    ver = scorer(strategy, verifier)
    got, began, held = serve(policy, strategy, reqs, budget, s, joins_at=[1, 1, 3], verifier=ver)
    assert sorted(got) == [0, 1, 2, 3] and began[1] == began[2] == 1 and began[3] >= 3
    refs = [run(strategy, policy, ver, prompts, budget=budget, settings=s, seed=seeds) for prompts, seeds in reqs]
    for i, ref in enumerate(refs):
        same_decisions(got[i], ref)
        assert sum(info["started"] for info in got[i].prompt_info) <= budget * len(reqs[i][0])
    if strategy == "deepconf":  # the rule acted: candidates aborted, prompts settled before their budget
        assert any(i["aborted"] for r in refs for i in r.prompt_info)
        assert any(i["decided_at"] is not None for r in refs for i in r.prompt_info)
    if strategy == "adaptive_consistency":
        assert len({i["decided_at"] for r in refs for i in r.prompt_info}) > 1
    if strategy == "deepconf_offline":
        assert any(c.finish == "stop" for r in refs for row in r.candidates for c in row)
    if strategy == "speculative_rejection":  # the verifier rejected candidates at checkpoints
        assert all(i["rejected"] for r in refs for i in r.prompt_info)
    if strategy in EXACT_COMPUTE:  # every candidate runs as alone: compute is equal
        for i, ref in enumerate(refs):
            assert got[i].compute.policy_generated_tokens == ref.compute.policy_generated_tokens
            assert got[i].info["policy_forward_tokens"] == ref.info["policy_forward_tokens"]
            assert got[i].compute.policy_flops == pytest.approx(ref.compute.policy_flops, rel=1e-12)
            assert got[i].compute.prm_tokens == ref.compute.prm_tokens
            assert got[i].compute.prm_flops == pytest.approx(ref.compute.prm_flops, rel=1e-12)
    # the group that ends the loop is handed over once its pool is free
    assert held[-1] == 0 and policy.kv_ledger.blocks == 0 and verifier.kv_ledger.blocks == 0


def test_speculative_rejection_joins_between_checkpoints(policy, verifier):
    """Checkpoints every 8 tokens, looks every 4: requests offered at the second and fourth looks (4 and 12 tokens
    in, between the running request's checkpoints) join there, and their checkpoints count from there: their
    candidates, decisions and compute (policy and verifier) are their runs alone's."""
    strategy, budget, s = CASES[3]
    reqs = requests((2, 1, 1))
    got, began, _ = serve(policy, strategy, reqs, budget, s, joins_at=[2, 4], verifier=verifier)
    assert began == {0: 0, 1: 2, 2: 4}
    for i, (prompts, seeds) in enumerate(reqs):
        ref = run(strategy, policy, verifier, prompts, budget=budget, settings=s, seed=seeds)
        same_decisions(got[i], ref)
        assert got[i].compute.policy_generated_tokens == ref.compute.policy_generated_tokens
        assert got[i].compute.prm_tokens == ref.compute.prm_tokens


def test_a_request_waits_while_the_loop_is_full(policy):
    """Room for one prompt's worth of rows (10 at budget 10; a request of 2 prompts runs 2 x 3 at once): the first
    request runs, each next one waits for the one before to end; every answer is still as alone."""
    strategy, budget, s = CASES[1]
    reqs = requests((2, 2, 2))
    got, began, _ = serve(policy, strategy, reqs, budget, s, joins_at=[0, 0], capacity=1)
    assert sorted(got) == [0, 1, 2] and began[1] > 1 and began[2] > began[1]
    for i, (prompts, seeds) in enumerate(reqs):
        same_decisions(got[i], run(strategy, policy, None, prompts, budget=budget, settings=s, seed=seeds))


def test_a_cancelled_request_leaves_and_the_others_are_exact(policy):
    strategy, budget, s = CASES[0]
    reqs = requests()
    stop = Cancellation()
    got, first_of = {}, {}

    def started(g):
        first_of[g.tag] = g.first
        if g.tag == 2:  # its client went away as it joined
            stop.cancel(range(g.first, g.first + len(g.prompts)))

    with cancellation(stop):
        run_continuous(strategy, policy, None, reqs[0][0], reqs[0][1], budget=budget, settings=s, tag=0,
                       join=Offers(reqs, [1, 1, 1]), deliver=lambda g, res: got.__setitem__(g.tag, res),
                       started=started, capacity=64)
    assert first_of == {0: 0, 1: 2, 2: 3, 3: 5}  # prompts numbered across the call, in joining order
    for i in (0, 1, 3):
        same_decisions(got[i], run(strategy, policy, None, reqs[i][0], budget=budget, settings=s, seed=reqs[i][1]))
    assert got[2].compute.policy_generated_tokens == 0 and got[2].samples == 0  # no candidate of it started
    assert policy.kv_ledger.blocks == 0


COUNTED = [CASES[0], CASES[1], CASES[3]]


@pytest.mark.parametrize("strategy,budget,s", COUNTED, ids=[c[0] for c in COUNTED])
def test_per_group_counts_add_up_to_the_sessions_and_no_state_is_left(policy, verifier, strategy, budget, s):
    """Groups joining and leaving: their host-side prefill, forward and key counts add up to the session's own
    (the verifier's per-prompt counts to its totals), and once every group has been handed over the loop keeps no
    prompt's state."""
    reqs = requests((2, 1, 3, 1, 2))
    ver = scorer(strategy, verifier)
    runner = TraceRun(policy, _RULES[strategy][0](budget, s, extract_answer), s, capacity=64 * budget, verifier=ver)
    ended, prm = [], []
    offers = Offers(reqs, [1, 2, 2, 5])

    def done(gs):
        ended.extend(gs)
        if ver is not None:
            prm.extend(runner.scorer.spent(g.indices) for g in gs)

    def join(fits):
        def fit(p, sd, t):
            g = TraceGroup(list(p), Seeds(list(sd), len(p)), t)
            return g if fits(g) else None
        return offers(fit)

    runner.run(TraceGroup(reqs[0][0], Seeds(reqs[0][1], 2), 0), done=done, join=join)
    assert sorted(g.tag for g in ended) == [0, 1, 2, 3, 4]
    if ver is not None:
        assert runner.scorer.count == {} and runner.scorer.cands == [] and runner.scorer.session.rows == 0
        tokens, keys = runner.scorer.free()
        assert sum(t for t, _ in prm) == tokens and sum(k for _, k in prm) == keys and tokens > 0
    prefill, forward, keys = runner.totals
    assert sum(g.prefill for g in ended) == prefill
    assert sum(g.forward for g in ended) == forward
    assert sum(g.keys for g in ended) == keys
    assert runner.started == runner.spent == runner.plen == runner.seed_of == {}
    assert runner.rule.traces == runner.rule.settled == runner.rule.decided == {}
    assert runner.committed == runner.verifier_committed == 0
    assert policy.kv_ledger.blocks == 0 and verifier.kv_ledger.blocks == 0


@pytest.mark.parametrize("strategy,budget,s,capacity", [CASES[1] + (1,), CASES[3] + (4,)],
                         ids=["adaptive_consistency", "speculative_rejection"])
def test_many_small_requests_fill_the_pool_and_all_are_exact(policy, verifier, strategy, budget, s, capacity):
    """Twelve one-prompt requests offered at every look to a loop with room for 3-4 prompts' rows: they join as
    rows and sequence slots allow (a re-lay forks the whole batch beside the old one, parked rows included), never
    past the pool (speculative rejection: at checkpoints, or when nothing runs), and each answer is its run
    alone's."""
    reqs = [([PROMPTS[i]], request_seeds(400 + i, 1)) for i in range(12)]
    ver = scorer(strategy, verifier)
    got, began, held = serve(policy, strategy, reqs, budget, s, joins_at=[1] * 11, capacity=capacity, verifier=ver)
    assert sorted(got) == list(range(12)) and max(began.values()) > 1  # some waited for room
    for i, (prompts, seeds) in enumerate(reqs):
        same_decisions(got[i], run(strategy, policy, ver, prompts, budget=budget, settings=s, seed=seeds))
    assert held[-1] == 0
