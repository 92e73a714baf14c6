"""`tts-kernels serve`'s continuous batching, on a real server in a subprocess (127.0.0.1, a free port) driven by
the `openai` client: a request that arrives while a search of its strategy and settings runs joins that search
at its next host look and gets the answer `search.run` gives it offline with its seed; 64 clients x 4 requests
are all answered, exactly, with nothing left queued, running or holding KV blocks; `--batching request` keeps
whole-request batching."""
import concurrent.futures
import json
import threading
import time

import pytest

from tts_kernels import bundled
from tts_kernels.apps.engine import request_seeds
from tts_kernels.bench.serving import ServerProcess as Server
from tts_kernels.search import STRATEGIES, Settings, run

MODEL = "tts-kernels-bundled"
PROMPTS = [p.prompt for p in bundled.test_problems(64)]


@pytest.fixture(scope="module")
def server():
    s = Server("--max-wait-ms", "0", "--max-budget", "16", "--max-batch", "32", "--batching", "continuous")
    yield s
    assert s.stop()


@pytest.fixture(scope="module")
def models():
    return bundled.load_policy("small"), bundled.load_verifier("prm")


def offline(models, strategy, prompts, budget, seed, max_tokens):
    policy, verifier = models
    return run(strategy, policy, verifier if STRATEGIES[strategy].needs_verifier else None, prompts, budget=budget,
               settings=Settings(max_new_tokens=max_tokens), seed=request_seeds(seed, len(prompts)))


def searches(server, after: int | None = None) -> list[dict]:
    """The logged search calls; with ``after``: waits (up to 30 s) until there are more than ``after`` (a call's
    line comes once its search thread is done, just after its last answer)."""
    deadline = time.time() + 30
    while True:
        got = [json.loads(line) for line in server.output().splitlines() if line.startswith('{"event": "search"')]
        if after is None or len(got) > after or time.time() > deadline:
            return got
        time.sleep(0.05)


def test_a_request_arriving_mid_search_joins_it_and_answers_as_offline(server, models):
    """A long request (8 prompts x 16 candidates, every candidate streamed) streams; once its first tokens arrive
    its search is under way,
    and a second request is sent: it joins that search (one logged call holds both) and its answer is the
    offline one for its seed."""
    client = server.client(timeout=120)
    late_prompt, late_seed = PROMPTS[20], 77
    for attempt in range(3):  # the late request must arrive before the long one ends (it nearly always does)
        n_before = len(searches(server))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stream = client.completions.create(model=MODEL, prompt=PROMPTS[:8], max_tokens=96, seed=5 + attempt, n=16,
                                               stream=True, extra_body={"strategy": "best_of_n", "budget": 16})
            chunks = iter(stream)
            next(chunks)  # the long search has sampled its first tokens
            late = pool.submit(client.completions.create, model=MODEL, prompt=late_prompt, max_tokens=96,
                               seed=late_seed, extra_body={"strategy": "best_of_n", "budget": 16})
            rest = list(chunks)
            got = late.result()
        assert rest
        calls = searches(server, n_before)[n_before:]
        if len(calls) == 1 and calls[0]["requests"] == 2:
            break
    assert len(calls) == 1 and calls[0]["continuous"] and calls[0]["requests"] == 2 and calls[0]["prompts"] == 9
    ref = offline(models, "best_of_n", [late_prompt], 16, late_seed, 96)
    assert got.predictions == ref.predictions
    assert got.choices[0].text == ref.candidates[0][ref.chosen[0]].text
    # its usage is its own exact compute, not a share of the call's
    assert got.usage.policy_tokens == ref.compute.policy_prefill_tokens + ref.compute.policy_generated_tokens
    assert got.usage.verifier_tokens == ref.compute.prm_tokens
    assert server.get("/health") == {"status": "ok", "queued": 0, "running": 0, "kv_blocks_in_use": 0}


@pytest.mark.parametrize("strategy", ["prm_beam_search", "dvts", "particle_filtering", "rebase"])
def test_a_step_search_request_arriving_mid_search_joins_it_at_a_step_boundary(server, models, strategy):
    """The same for the step searches: a long search streams its steps; a request sent once the first step has
    arrived joins it at a step boundary (one logged call holds both), and its answer and usage are offline's."""
    client = server.client(timeout=120)
    late_prompt, late_seed = PROMPTS[21], 78
    for attempt in range(3):
        n_before = len(searches(server))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stream = client.completions.create(model=MODEL, prompt=PROMPTS[:8], max_tokens=96, seed=6 + attempt,
                                               stream=True, extra_body={"strategy": strategy, "budget": 16})
            chunks = iter(stream)
            next(chunks)  # the long search has sampled and scored its first step
            late = pool.submit(client.completions.create, model=MODEL, prompt=late_prompt, max_tokens=96,
                               seed=late_seed, extra_body={"strategy": strategy, "budget": 16})
            rest = list(chunks)
            got = late.result()
        assert rest
        calls = searches(server, n_before)[n_before:]
        if len(calls) == 1 and calls[0]["requests"] == 2:
            break
    assert len(calls) == 1 and calls[0]["continuous"] and calls[0]["requests"] == 2 and calls[0]["prompts"] == 9
    ref = offline(models, strategy, [late_prompt], 16, late_seed, 96)
    assert got.predictions == ref.predictions
    assert got.choices[0].text == ref.candidates[0][ref.chosen[0]].text
    assert got.usage.policy_tokens == ref.compute.policy_prefill_tokens + ref.compute.policy_generated_tokens
    assert got.usage.verifier_tokens == ref.compute.prm_tokens
    assert server.get("/health") == {"status": "ok", "queued": 0, "running": 0, "kv_blocks_in_use": 0}


def join_a_running_call(server, strategy, budget, seed, late_prompt, late_seed):
    """A long request (8 prompts) of ``strategy``; once ``/health`` shows it running, a one-prompt request of the same
    strategy and budget is sent. Retried up to three times until the late one arrives before the long one ends
    (it nearly always does); then one logged call held both. Returns the late request's answer."""
    client = server.client(timeout=120)
    body = {"strategy": strategy, "budget": budget}
    for attempt in range(3):
        n_before = len(searches(server))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            long = pool.submit(client.completions.create, model=MODEL, prompt=PROMPTS[:8], max_tokens=96,
                               seed=seed + attempt, extra_body=body)
            deadline = time.time() + 30
            while server.get("/health")["running"] == 0 and time.time() < deadline:
                time.sleep(0.01)
            late = pool.submit(client.completions.create, model=MODEL, prompt=late_prompt, max_tokens=96,
                               seed=late_seed, extra_body=body)
            got = late.result()
            assert long.result().choices
        calls = searches(server, n_before)[n_before:]
        if len(calls) == 1 and calls[0]["requests"] == 2:
            break
    assert len(calls) == 1 and calls[0]["continuous"] and calls[0]["requests"] == 2 and calls[0]["prompts"] == 9
    return got


def test_a_revise_request_arriving_mid_search_joins_it(server, models):
    """revise: a request sent while a long one runs (its first round has started) joins that call (its rounds are
    groups of the running decode loop) and its answer and usage are offline's for its seed."""
    late_prompt, late_seed = PROMPTS[22], 79
    got = join_a_running_call(server, "revise", 8, 7, late_prompt, late_seed)
    ref = offline(models, "revise", [late_prompt], 8, late_seed, 96)
    assert got.predictions == ref.predictions
    if ref.chosen[0] is not None:
        assert got.choices[0].text == ref.candidates[0][ref.chosen[0]].text
    assert got.usage.policy_tokens == ref.compute.policy_prefill_tokens + ref.compute.policy_generated_tokens
    assert server.get("/health") == {"status": "ok", "queued": 0, "running": 0, "kv_blocks_in_use": 0}


@pytest.mark.parametrize("strategy", ["deepconf_offline", "adaptive_consistency", "speculative_rejection"])
def test_an_early_stopping_request_arriving_mid_search_joins_it(server, models, strategy):
    """The early-stopping token loop: a request sent while a long one runs joins that call at a host look (speculative
    rejection: a checkpoint), and its answer is offline's for its seed. Its usage is its own: offline's for
    deepconf_offline and speculative rejection (every candidate runs as alone); for adaptive consistency at least
    what its decision needed (the prompt and its deciding candidates), the candidates past the decision counting
    the tokens they ran before the next look."""
    late_prompt, late_seed = PROMPTS[23], 80
    got = join_a_running_call(server, strategy, 16, 8, late_prompt, late_seed)
    ref = offline(models, strategy, [late_prompt], 16, late_seed, 96)
    assert got.predictions == ref.predictions
    assert got.choices[0].text == ref.candidates[0][ref.chosen[0]].text
    used = ref.compute.policy_prefill_tokens + ref.compute.policy_generated_tokens
    if strategy != "adaptive_consistency":
        assert got.usage.policy_tokens == used
        assert got.usage.verifier_tokens == ref.compute.prm_tokens
    else:
        assert got.usage.policy_tokens >= ref.compute.policy_prefill_tokens + sum(
            len(c.token_ids) for c in ref.candidates[0])
    assert server.get("/health") == {"status": "ok", "queued": 0, "running": 0, "kv_blocks_in_use": 0}


def test_64_clients_4_requests_each(server, models):
    """256 requests from 64 closed-loop clients, best_of_n and majority mixed: every one answered, exactly
    (checked against offline runs for every fourth), and afterwards nothing queued, running or holding KV."""
    before = server.metrics()
    jobs = [(PROMPTS[i % len(PROMPTS)], 900 + i, "best_of_n" if i % 3 else "majority") for i in range(256)]

    def client_work(c):
        client = server.client(timeout=300)
        out = []
        for k in range(4):
            prompt, seed, strategy = jobs[4 * c + k]
            out.append(client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, seed=seed,
                                                 extra_body={"strategy": strategy, "budget": 4}))
        return out

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        answers = [a for got in pool.map(client_work, range(64)) for a in got]
    wall = time.perf_counter() - t0
    assert len(answers) == 256 and all(a.choices and a.choices[0].text is not None for a in answers)
    for i in range(0, 256, 4):
        prompt, seed, strategy = jobs[i]
        ref = offline(models, strategy, [prompt], 4, seed, 32)
        assert answers[i].predictions == ref.predictions, i
        if ref.chosen[0] is not None:  # (a majority vote with no answer picks no candidate)
            assert answers[i].choices[0].text == ref.candidates[0][ref.chosen[0]].text, i
    after = server.metrics()
    ok = sum(after.get(("tts_requests_total", (("status", "200"), ("strategy", s))), 0)
             - before.get(("tts_requests_total", (("status", "200"), ("strategy", s))), 0) for s in ("best_of_n", "majority"))
    assert ok == 256
    calls = after[("tts_batch_requests_count", ())] - before[("tts_batch_requests_count", ())]
    assert calls < 256 / 4, (calls, wall)  # requests joined running calls
    assert server.get("/health") == {"status": "ok", "queued": 0, "running": 0, "kv_blocks_in_use": 0}


def test_request_batching_flag_keeps_whole_request_calls(models):
    s = Server("--max-wait-ms", "0", "--batching", "request")
    try:
        client = s.client(timeout=120)
        got = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=32, seed=9,
                                        extra_body={"strategy": "best_of_n", "budget": 4})
        ref = offline(models, "best_of_n", [PROMPTS[3]], 4, 9, 32)
        assert got.predictions == ref.predictions
        assert all(not e.get("continuous") for e in searches(s)) and searches(s)
    finally:
        assert s.stop()


def test_a_call_takes_no_new_request_past_max_call_prompts(models):
    """`--max-call-prompts 3`: a continuous call stops taking requests once it has taken 3 prompts, drains, and
    the next call takes what waits; 8 concurrent one-prompt requests are all answered as offline, in calls of
    at most 3 prompts, and nothing is left queued, running or holding KV."""
    s = Server("--max-wait-ms", "0", "--max-batch", "32", "--max-call-prompts", "3")
    try:
        def one(i):
            return s.client(timeout=120).completions.create(
                model=MODEL, prompt=PROMPTS[30 + i], max_tokens=48, seed=400 + i,
                extra_body={"strategy": "best_of_n", "budget": 4})

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(one, range(8)))
        for i, answer in enumerate(got):
            assert answer.predictions == offline(models, "best_of_n", [PROMPTS[30 + i]], 4, 400 + i, 48).predictions
        calls = searches(s)
        while sum(c["prompts"] for c in calls) < 8:  # (a call's line comes just after its last answer)
            calls = searches(s, len(calls))
        assert sum(c["prompts"] for c in calls) == 8 and len(calls) >= 3
        assert all(c["continuous"] and c["prompts"] <= 3 for c in calls), calls
        assert s.get("/health") == {"status": "ok", "queued": 0, "running": 0, "kv_blocks_in_use": 0}
    finally:
        assert s.stop()


def test_every_strategy_at_once_in_a_small_pool(models):
    """Every registered strategy at once, from 12 closed-loop clients, into a server with a small fixed KV pool
    (`--kv-blocks 160`) and 4 prompts a call: one or two prompts a request, budgets 2 and 4, some streamed, some
    abandoned by their client mid-search. Every request that was waited for is answered, as offline (streamed:
    the same answer), and afterwards nothing is queued, running or holding KV."""
    import openai

    names = sorted(STRATEGIES)
    jobs = []
    for i in range(3 * len(names)):
        strategy, k = names[i % len(names)], 1 + (i % 3 == 1)
        prompts = [PROMPTS[(5 * i + j) % len(PROMPTS)] for j in range(k)]
        streams = i % 5 == 0 and k == 1 and STRATEGIES[strategy].continuous is not None
        jobs.append((strategy, prompts, 2 + 2 * (i % 2), 24 + 8 * (i % 3 == 0), 600 + i,
                     "stream" if streams else "abandon" if i % 7 == 3 else "wait"))
    s = Server("--kv-blocks", "160", "--max-batch", "4", "--max-wait-ms", "2", "--max-budget", "16")
    try:
        got = {}

        def client_work(c):
            for i in range(c, len(jobs), 12):
                strategy, prompts, budget, max_tokens, seed, how = jobs[i]
                client = s.client(timeout=0.3 if how == "abandon" else 300)
                kw = dict(model=MODEL, prompt=prompts if len(prompts) > 1 else prompts[0], max_tokens=max_tokens,
                          seed=seed, extra_body={"strategy": strategy, "budget": budget})
                try:
                    if how == "stream":
                        chunks = list(client.completions.create(stream=True, **kw))
                        got[i] = "".join(ch.text for c in chunks for ch in c.choices if ch.index == 0)
                    else:
                        got[i] = client.completions.create(**kw)
                except openai.APITimeoutError:
                    assert how == "abandon"

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            for f in [pool.submit(client_work, c) for c in range(12)]:
                f.result()
        deadline = time.time() + 60
        while s.get("/health") != {"status": "ok", "queued": 0, "running": 0, "kv_blocks_in_use": 0}:
            assert time.time() < deadline, s.get("/health")  # (the abandoned requests' rows leave at their next look)
            time.sleep(0.1)
        policy, verifier = models
        for i, (strategy, prompts, budget, max_tokens, seed, how) in enumerate(jobs):
            if how == "abandon":
                continue
            ref = run(strategy, policy, verifier if STRATEGIES[strategy].needs_verifier else None, prompts,
                      budget=budget, settings=Settings(max_new_tokens=max_tokens), seed=request_seeds(seed, len(prompts)))
            text = None if ref.chosen[0] is None else ref.candidates[0][ref.chosen[0]].text
            if how == "stream":  # (choice 0 streamed: the chosen candidate's text; a vote with no answer picks none)
                assert text is None or got[i] == text, (i, strategy)
                continue
            assert got[i].predictions == ref.predictions, (i, strategy)
            if text is not None:
                assert got[i].choices[0].text == text, (i, strategy)
    finally:
        assert s.stop()


def test_a_call_that_compatible_requests_keep_feeding_lets_others_through(server, models):
    """Twelve clients keep sending best_of_n requests (one continuous call could take them for ever): a `/v1/score`
    request and a majority request sent meanwhile are each answered within seconds while that load goes on (the
    open call stops taking new requests, drains, and they run before the next call). Before, both waited until
    the load stopped."""
    stop, end = threading.Event(), time.time() + 30  # (the load stops by itself after 30 s)
    answered = []

    def load(c):
        client, i = server.client(timeout=120), c
        while not stop.is_set() and time.time() < end:
            client.completions.create(model=MODEL, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=48, seed=1000 + i,
                                      extra_body={"strategy": "best_of_n", "budget": 8})
            answered.append(i)
            i += 12

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        clients = [pool.submit(load, c) for c in range(12)]
        try:
            while len(answered) < 24 and time.time() < end:  # the load is under way
                time.sleep(0.02)
            t = time.perf_counter()
            status, body = server.post_raw("/v1/score", json.dumps({
                "model": MODEL, "prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5\n\nThe answer is 5"]}).encode())
            score_s = time.perf_counter() - t
            t = time.perf_counter()
            other = server.client(timeout=120).completions.create(
                model=MODEL, prompt=PROMPTS[40], max_tokens=32, seed=41, extra_body={"strategy": "majority", "budget": 4})
            other_s = time.perf_counter() - t
            still = len(answered)
            while len(answered) < still + 4 and time.time() < end:  # and the load went on
                time.sleep(0.02)
            went_on = len(answered) >= still + 4
        finally:
            stop.set()
            for f in clients:
                f.result()
    assert status == 200 and len(json.loads(body)["data"]) == 1, body
    assert other.predictions == offline(models, "majority", [PROMPTS[40]], 4, 41, 32).predictions
    assert score_s < 10 and other_s < 10, (score_s, other_s)
    assert went_on
    assert server.get("/health") == {"status": "ok", "queued": 0, "running": 0, "kv_blocks_in_use": 0}
