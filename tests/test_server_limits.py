"""`tts-kernels serve`'s limits, on a real server in a subprocess (127.0.0.1, a free port): the allow-list of
request fields (every other field refused, named), every ceiling a server flag sets (each hit by a request
while good requests are served beside it, answers exact), the body size limit, and the per-request compute
cap, enforced during the search (the request cancelled at the search's next host look, the others served)."""
import concurrent.futures
import json
import time

import pytest

from tts_kernels import bundled
from tts_kernels.apps.engine import request_seeds
from tts_kernels.apps.server import REQUEST_FIELDS, SERVER_ONLY, SETTING_FIELDS
from tts_kernels.bench.serving import ServerProcess as Server
from tts_kernels.search import STRATEGIES, Settings, run

MODEL = "tts-kernels-bundled"
PROMPTS = [p.prompt for p in bundled.test_problems(12)]
CAP = 300  # policy + verifier tokens per request
FLAGS = ("--max-budget", "8", "--max-budget-prompts", "12", "--max-tokens", "64", "--max-steps", "4",
         "--max-step-tokens", "16", "--max-lookahead", "1", "--max-sweeps", "2", "--max-revisions", "1",
         "--max-request-tokens", str(CAP), "--max-body-bytes", "4096", "--max-wait-ms", "20")
# The server lowers its defaults to its limits (num_iterations 8 -> 4, max_step_tokens 24 -> 16, max_new_tokens
# 96 -> 64): what an offline run must use to answer as it does.
SERVED = Settings(num_iterations=4, max_step_tokens=16, max_new_tokens=64)
GOOD = {"model": MODEL, "prompt": PROMPTS[9], "max_tokens": 48, "seed": 3, "budget": 2}


@pytest.fixture(scope="module")
def server():
    s = Server(*FLAGS)
    yield s
    assert s.stop()


@pytest.fixture(scope="module")
def models():
    return bundled.load_policy("small"), bundled.load_verifier("prm")


def offline(models, strategy, prompts, budget, seed, **settings):
    policy, verifier = models
    verifier = verifier if STRATEGIES[strategy].needs_verifier else None  # (as the server runs it)
    return run(strategy, policy, verifier, prompts, budget=budget, settings=SERVED.replace(**settings),
               seed=request_seeds(seed, len(prompts)))


def post(server, path, body):
    status, text = server.post_raw(path, body if isinstance(body, bytes) else json.dumps(body).encode())
    return status, json.loads(text)


def test_limits_are_listed_and_defaults_lowered_to_them(server):
    listed = server.get("/v1/strategies")
    assert listed["limits"] == {"max_budget": 8, "max_budget_prompts": 12, "max_tokens": 64, "max_steps": 4,
                                "max_step_tokens": 16, "max_lookahead": 1, "max_sweeps": 2, "max_revisions": 1,
                                "max_request_tokens": CAP, "max_body_bytes": 4096}
    assert listed["settings"] == SERVED.as_dict()
    assert listed["setting_fields"] == sorted(SETTING_FIELDS) and listed["request_fields"] == sorted(REQUEST_FIELDS)


def test_the_allow_list_names_settings_fields_only():
    fields = set(Settings.__dataclass_fields__)
    assert set(SETTING_FIELDS) <= fields and not set(SERVER_ONLY) & set(SETTING_FIELDS)
    assert set(SERVER_ONLY) <= fields


def test_every_field_outside_the_allow_list_is_refused(server):
    """Made-up names, near misses of real ones, the server-only settings, and every Settings field the allow-list
    does not name (a field added to Settings later is among them until someone adds it, with its ceiling), each
    sent with a valid value: refused by name, on every endpoint."""
    defaults = Settings().as_dict()
    outside = sorted(set(defaults) - set(SETTING_FIELDS) - {"stop"})
    names = {"foo": 1, "max_token": 10, "prompts": ["x"], "best_of_n": 2, "Temperature": 0.5, "extra_body": {}}
    names.update({name: defaults[name] for name in outside})
    for name, value in names.items():
        for path in ("/v1/completions", "/v1/chat/completions"):
            body = {"model": MODEL, name: value, "max_tokens": 8}
            body.update({"messages": [{"role": "user", "content": "1+1?"}]} if "chat" in path else {"prompt": "1+1?"})
            status, out = post(server, path, body)
            assert status == 400 and out["error"]["param"] == name, (name, out)
            expected = "invalid_value" if name in SERVER_ONLY else "unknown_field"
            assert out["error"]["code"] == expected, (name, out)
    for path, body in (("/v1/score", {"prompt": "1+1?", "completions": ["2"], "temperature": 0.5}),
                       ("/pooling", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                                    "content": "a"}], "dimensions": 4}),
                       ("/v1/completions", {"prompt": "1+1?", "stream_options": {"include_usage": True, "x": 1}})):
        status, out = post(server, path, {"model": MODEL, **body})
        assert status == 400 and out["error"]["code"] == "unknown_field", (path, out)
    # A completions request carries no chat messages, a chat request no prompt.
    status, out = post(server, "/v1/chat/completions", {"model": MODEL, "prompt": "x",
                                                         "messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and out["error"]["param"] == "prompt"


def _limit_hits():
    """(body, endpoint, status, param, what the message names): one request over each ceiling."""
    m = {"model": MODEL, "prompt": PROMPTS[0]}
    think = {"min_thinking_tokens": 0, "max_thinking_tokens": 65}
    return [
        ({**m, "budget": 9}, "/v1/completions", 400, "budget", "--max-budget"),
        ({**m, "n": 9}, "/v1/completions", 400, "n", "<= 8"),
        ({"model": MODEL, "prompt": PROMPTS[:4], "budget": 4}, "/v1/completions", 400, "budget",
         "--max-budget-prompts"),
        ({**m, "max_tokens": 65}, "/v1/completions", 400, "max_tokens", "--max-tokens"),
        ({**m, "max_new_tokens": 65}, "/v1/completions", 400, "max_new_tokens", "--max-tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "1+1?"}], "max_completion_tokens": 65},
         "/v1/chat/completions", 400, "max_completion_tokens", "--max-tokens"),
        ({**m, "strategy": "dvts", "budget": 4, "num_iterations": 5}, "/v1/completions", 400, "num_iterations",
         "--max-steps"),
        ({**m, "strategy": "dvts", "budget": 4, "max_step_tokens": 17}, "/v1/completions", 400, "max_step_tokens",
         "--max-step-tokens"),
        ({**m, "strategy": "prm_beam_search", "budget": 4, "lookahead": 2}, "/v1/completions", 400, "lookahead",
         "--max-lookahead"),
        ({**m, "strategy": "particle_gibbs", "budget": 4, "sweeps": 3}, "/v1/completions", 400, "sweeps",
         "--max-sweeps"),
        ({**m, "strategy": "revise", "budget": 4, "revisions": 2}, "/v1/completions", 400, "revisions",
         "--max-revisions"),
        ({**m, "beam_width": 9}, "/v1/completions", 400, "beam_width", "--max-budget"),
        ({**m, "reference_particles": 9}, "/v1/completions", 400, "reference_particles", "--max-budget"),
        ({**m, "thinking": think}, "/v1/completions", 400, "thinking", "--max-tokens"),
        ({**m, "sync_every": 65}, "/v1/completions", 400, "sync_every", "<= 64"),
        ({**m, "levels": 17}, "/v1/completions", 400, "levels", "<= 16"),
        ({**m, "step_delimiter": "-" * 17}, "/v1/completions", 400, "step_delimiter", "16 characters"),
        ({**m, "revision_prompt": "r" * 513}, "/v1/completions", 400, "revision_prompt", "512 characters"),
        ({**m, "stop": ["a", "b", "c", "d", "e"]}, "/v1/completions", 400, "stop", "at most 4"),
        ({**m, "stop": ["s" * 257]}, "/v1/completions", 400, "stop", "256 characters"),
        ({"model": MODEL, "prompt": PROMPTS[0] + "x" * 4000}, "/v1/completions", 413, "body", "--max-body-bytes"),
        # The compute cap: the prompt alone is over it (refused before the search), and a search that passes
        # it while running (cancelled at its next host look).
        ({"model": MODEL, "prompt": "word " * 300}, "/v1/completions", 413, "prompt", "--max-request-tokens"),
        ({**m, "budget": 8, "max_tokens": 48, "seed": 1, "strategy": "best_of_n"}, "/v1/completions", 413, None,
         "--max-request-tokens"),
        ({"model": MODEL, "prompt": PROMPTS[0], "completions": [PROMPTS[1]] * 12}, "/v1/score", 413, None,
         "--max-request-tokens"),
        ({"model": MODEL, "prompt": PROMPTS[0], "completions": ["a"] * 13}, "/v1/score", 400, "completions",
         "--max-budget-prompts"),
    ]


def test_every_limit_hit_while_good_requests_are_served(server, models):
    ref = offline(models, "best_of_n", [PROMPTS[9]], 2, 3, max_new_tokens=48)
    assert ref.compute.policy_tokens + ref.compute.prm_tokens < CAP  # the good request fits the cap
    items = [x for hit in _limit_hits() for x in (hit, (GOOD, "/v1/completions", 200, None, None))]

    def send(item):
        body, path, *_ = item
        return item, post(server, path, body)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, items))
    for (body, path, status, param, names), (got, out) in results:
        assert got == status, (path, status, out)
        if status == 200:
            assert out["predictions"] == ref.predictions and out["choices"][0]["text"] == ref.candidates[0][
                ref.chosen[0]].text
        else:
            err = out["error"]
            assert err["param"] == param and names in err["message"], (body if len(str(body)) < 300 else path, err)
            assert err["code"] in ("limit_exceeded", "compute_limit_exceeded", "body_too_large", "invalid_value")
    assert server.get("/health") == {"status": "ok", "queued": 0, "running": 0, "kv_blocks_in_use": 0}


def test_compute_cap_cancels_the_search_under_way(server, models):
    """Best-of-8 runs past the cap while it samples: its rows leave the batch at the next host look (the
    logged search ran fewer policy tokens than the whole search does, and scored no candidate), the request gets a
    413 naming the limit, and a request that fits runs beside it unharmed."""
    full = offline(models, "best_of_n", [PROMPTS[0]], 8, 1, max_new_tokens=48)
    assert full.compute.policy_tokens > CAP
    over = {"model": MODEL, "prompt": PROMPTS[0], "budget": 8, "max_tokens": 48, "seed": 1, "strategy": "best_of_n"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bad = pool.submit(post, server, "/v1/completions", over)
        good = pool.submit(post, server, "/v1/completions", GOOD)
        (status, out), (good_status, good_out) = bad.result(), good.result()
    assert status == 413 and out["error"]["code"] == "compute_limit_exceeded"
    assert "max_request_tokens" in out["error"]["message"] and "cancelled" in out["error"]["message"]
    assert good_status == 200
    assert good_out["usage"]["policy_tokens"] + good_out["usage"]["verifier_tokens"] <= CAP
    events = [json.loads(line) for line in server.output().splitlines() if line.startswith('{"event": "search"')]
    capped = [e for e in events if e["over_cap"] and e["budget"] == 8]
    prompt = len(models[0].encode(PROMPTS[0]))  # the verifier read the prompt and none of the candidates
    assert capped and all(e["policy_tokens"] < full.compute.policy_tokens and e["verifier_tokens"] <= prompt
                          and e["cancelled_prompts"] == 1 for e in capped)
    requests = [json.loads(line) for line in server.output().splitlines() if line.startswith('{"event": "request"')]
    assert any(r.get("limit") == "max_request_tokens" and r["during_search"] for r in requests)
    assert server.get("/health")["kv_blocks_in_use"] == 0


@pytest.mark.parametrize("strategy", ["prm_beam_search", "dvts", "particle_filtering", "rebase", "revise",
                                      "deepconf_offline", "speculative_rejection"])
def test_compute_cap_cancels_a_step_search_that_shares_its_call(server, models, strategy):
    """A search (a step search, revise, the early-stopping token loop) of 4 prompts past the cap while it runs, and
    a one-prompt request of the same strategy, budget and settings sent beside it (under continuous batching the
    two share one call): the first is cancelled at a look and gets a 413 naming the limit, the second is answered
    as offline, with its own usage."""
    full = offline(models, strategy, PROMPTS[:4], 2, 1, max_new_tokens=48)
    assert full.compute.policy_tokens > CAP
    ref = offline(models, strategy, [PROMPTS[9]], 2, 3, max_new_tokens=48)
    assert ref.compute.policy_tokens + ref.compute.prm_tokens < CAP
    over = {"model": MODEL, "prompt": PROMPTS[:4], "budget": 2, "max_tokens": 48, "seed": 1, "strategy": strategy}
    good = {**GOOD, "strategy": strategy}
    before = len(server.output().splitlines())
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bad = pool.submit(post, server, "/v1/completions", over)
        fine = pool.submit(post, server, "/v1/completions", good)
        (status, out), (good_status, good_out) = bad.result(), fine.result()
    assert status == 413 and out["error"]["code"] == "compute_limit_exceeded", out
    assert "max_request_tokens" in out["error"]["message"]
    assert good_status == 200 and good_out["predictions"] == ref.predictions
    assert good_out["usage"]["policy_tokens"] == ref.compute.policy_prefill_tokens + ref.compute.policy_generated_tokens
    deadline = time.time() + 30
    while True:  # (the call's log line comes once its search thread is done, just after the last answer)
        lines = [json.loads(x) for x in server.output().splitlines()[before:] if x.startswith('{"event": ')]
        searches = [e for e in lines if e["event"] == "search" and e["strategy"] == strategy]
        if searches or time.time() > deadline:
            break
        time.sleep(0.05)
    assert any(e["event"] == "request" and e["strategy"] == strategy and e.get("limit") == "max_request_tokens"
               and e["during_search"] for e in lines)
    assert len(searches) == 1 and searches[0]["continuous"] and searches[0]["requests"] == 2
    assert server.get("/health") == {"status": "ok", "queued": 0, "running": 0, "kv_blocks_in_use": 0}


KV_BLOCKS = 300  # each pool's size: a request of 2 prompts below fits it, one of 40 never does
SMALL = {"model": MODEL, "prompt": PROMPTS[:2], "budget": 4, "max_tokens": 96, "seed": 11}
LARGE = {**SMALL, "prompt": (PROMPTS * 4)[:40], "seed": 5}  # (the same budget and settings: it may join)


@pytest.fixture(scope="module")
def small_pools():
    s = Server("--kv-blocks", str(KV_BLOCKS), "--max-wait-ms", "0")
    yield s
    assert s.stop()


def _refused_large(out) -> None:
    err = out["error"]
    assert err["code"] == "invalid_value" and "--kv-blocks" in err["message"], err
    assert f"holds {KV_BLOCKS} in all" in err["message"], err


@pytest.mark.parametrize("strategy", ["best_of_n", "revise", "prm_beam_search", "deepconf", "speculative_rejection"])
def test_a_request_the_kv_pools_can_never_hold_is_refused(small_pools, models, strategy):
    """With ``--kv-blocks`` every KV pool has that size. A request whose worst case needs more blocks than a pool
    holds in all is refused with a 400 naming the flag, before any of it runs: alone (the first request of a
    call: no model ran for it) and sent while a call of its strategy runs (refused at that call's next look
    instead of waiting for it to end). The request running meanwhile is answered as offline, and no KV block is
    left held."""
    policy, verifier = models
    verifier = verifier if STRATEGIES[strategy].needs_verifier else None
    large = {**LARGE, "strategy": strategy}
    before = len(small_pools.output().splitlines())
    status, out = post(small_pools, "/v1/completions", large)
    assert status == 400, out
    _refused_large(out)
    deadline = time.time() + 30
    while True:  # its call's log line: it took no request, and the policy ran no token
        lines = [json.loads(x) for x in small_pools.output().splitlines()[before:] if x.startswith('{"event": "search"')]
        if lines or time.time() > deadline:
            break
        time.sleep(0.05)
    assert lines and lines[-1]["requests"] == 0 and lines[-1]["policy_tokens"] == 0, lines

    ref = run(strategy, policy, verifier, SMALL["prompt"], budget=4, settings=Settings(max_new_tokens=96),
              seed=request_seeds(SMALL["seed"], 2))
    good = {**SMALL, "strategy": strategy}
    for attempt in range(3):  # (until the large request arrives while the good one runs: nearly always at once)
        before = len(small_pools.output().splitlines())
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            fine = pool.submit(post, small_pools, "/v1/completions", good)
            deadline = time.time() + 30
            while small_pools.get("/health")["running"] == 0 and not fine.done() and time.time() < deadline:
                time.sleep(0.005)
            ran_beside = not fine.done()
            status, out = post(small_pools, "/v1/completions", large)
            good_status, good_out = fine.result()
        assert status == 400, out
        _refused_large(out)
        assert good_status == 200 and good_out["predictions"] == ref.predictions
        lines = [json.loads(x) for x in small_pools.output().splitlines()[before:] if x.startswith('{"event": "search"')]
        if ran_beside and not any(e["requests"] == 0 for e in lines):
            break  # refused by the running call (a call of its own would have logged one taking no request)
    else:
        pytest.fail("the large request never arrived while the good one ran")
    assert small_pools.get("/health") == {"status": "ok", "queued": 0, "running": 0, "kv_blocks_in_use": 0}
