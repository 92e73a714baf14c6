"""`tts-kernels serve` as users run it: a real server in a subprocess on a free localhost port, driven
by the official `openai` client. Answers are checked against search.run offline with the same seeds."""
import concurrent.futures
import json
import time

import openai
import pytest

from tts_kernels import bundled
from tts_kernels.apps.engine import request_seeds
from tts_kernels.bench.serving import ServerProcess as Server
from tts_kernels.search import STRATEGIES, Settings, run

MODEL = "tts-kernels-bundled"
MAX_TOKENS = 48
PROBLEMS = bundled.test_problems(40)
PROMPTS = [p.prompt for p in PROBLEMS]


@pytest.fixture(scope="module")
def server():
    s = Server("--max-wait-ms", "50", "--max-budget", "16")
    yield s
    assert s.stop()


@pytest.fixture(scope="module")
def models():
    return bundled.load_policy("small"), bundled.load_verifier("prm")  # what the server loads by default


def offline(models, strategy, prompts, budget, seed, **settings):
    policy, verifier = models
    s = Settings(max_new_tokens=MAX_TOKENS, **settings)
    return run(strategy, policy, verifier if STRATEGIES[strategy].needs_verifier else None, prompts, budget=budget,
               settings=s, seed=request_seeds(seed, len(prompts)))


def first_choice(res, p):
    """The candidate a response's first choice must be: the strategy's pick, else the best-scored one."""
    if res.chosen[p] is not None:
        return res.candidates[p][res.chosen[p]]
    scored = [c for c in res.candidates[p] if c.score == c.score]
    return max(scored, key=lambda c: c.score) if scored else res.candidates[p][0]


def kv_blocks(server) -> float:
    return server.metrics()[("tts_kv_blocks_in_use", ())]


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == [MODEL]
    assert server.get("/health") == {"status": "ok", "queued": 0, "running": 0, "kv_blocks_in_use": 0}
    listed = server.get("/v1/strategies")
    assert [s["id"] for s in listed["data"]] == list(STRATEGIES) and all(s["available"] for s in listed["data"])
    assert listed["max_budget"] == 16 and listed["settings"] == Settings().as_dict()


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_answers_as_search_run_does_offline(server, models, strategy):
    prompts = PROMPTS[:2]
    r = server.client().completions.create(model=MODEL, prompt=prompts, max_tokens=MAX_TOKENS, seed=17,
                                           extra_body={"strategy": strategy, "budget": 4})
    ref = offline(models, strategy, prompts, 4, 17)
    assert r.strategy == strategy and r.predictions == ref.predictions
    assert [c.index for c in r.choices] == [0, 1]  # n = 1: one choice per prompt, in prompt order
    for p, choice in enumerate(r.choices):
        best = first_choice(ref, p)
        assert choice.text == best.text and choice.answer == best.answer
    assert r.usage.prompt_tokens == sum(len(models[0].encode(p)) for p in prompts)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.flops > 0 and (r.usage.verifier_tokens > 0) == STRATEGIES[strategy].needs_verifier


def test_chat_streamed_and_not(server, models):
    client = server.client()
    msgs = [{"role": "user", "content": PROBLEMS[3].prompt.strip()}]
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=MAX_TOKENS, seed=5,
                                           extra_body={"strategy": "prm_beam_search", "budget": 4})
    # No chat template on the bundled tokenizer: the messages are rendered plainly, as the task's prompt.
    ref = offline(models, "prm_beam_search", [PROBLEMS[3].prompt], 4, 5)
    assert whole.choices[0].message.content == first_choice(ref, 0).text
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=MAX_TOKENS, seed=5,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"strategy": "prm_beam_search", "budget": 4}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_stream_is_openai_sse_ending_in_done(server):
    body = {"model": MODEL, "prompt": PROMPTS[4], "max_tokens": MAX_TOKENS, "seed": 9, "stream": True, "n": 2,
            "budget": 4}
    status, raw = server.post_raw("/v1/completions", json.dumps(body).encode())
    assert status == 200
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    whole = server.client().completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=MAX_TOKENS, seed=9, n=2,
                                               extra_body={"budget": 4})
    for choice in whole.choices:
        streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == choice.index)
        assert streamed == choice.text


def test_n_choices_ranked_and_candidates_returned(server, models):
    r = server.client().completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=MAX_TOKENS, seed=21, n=3,
                                           extra_body={"strategy": "best_of_n", "budget": 8, "return_candidates": True})
    ref = offline(models, "best_of_n", [PROMPTS[5]], 8, 21)
    cands = r.model_extra["candidates"][0]
    assert [c["text"] for c in cands] == [c.text for c in ref.candidates[0]]
    assert len(r.choices) == 3 and r.choices[0].text == first_choice(ref, 0).text
    scores = [c.score for c in r.choices]
    assert scores[0] == max(c["score"] for c in cands) and scores[1] >= scores[2]
    assert r.usage.search_tokens >= r.usage.completion_tokens


def test_seed_gives_the_same_answer_alone_and_among_31_others(server):
    def ask(prompt, seed):
        return server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=seed,
                                                  extra_body={"strategy": "weighted_best_of_n", "budget": 4})

    alone = ask(PROMPTS[7], 123)
    assert alone.usage.batch_prompts == 1
    shared = 0
    for attempt in range(3):  # the target must share a search call at least once (arrival times vary)
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            futs = [pool.submit(ask, PROMPTS[8 + i], 1000 * attempt + i) for i in range(31)]
            target = pool.submit(ask, PROMPTS[7], 123)
            others = [f.result() for f in futs]
        got = target.result()
        assert [c.text for c in got.choices] == [c.text for c in alone.choices]
        assert got.predictions == alone.predictions and all(o.choices for o in others)
        shared += got.usage.batch_prompts > 1
        if shared:
            break
    assert shared


def test_load_16_clients_64_requests_batched_and_exact(server, models):
    before = server.metrics()
    jobs = [(PROMPTS[i % len(PROMPTS)], 500 + i, "best_of_n" if i % 2 else "dvts") for i in range(64)]

    def ask(job):
        prompt, seed, strategy = job
        return server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, seed=seed,
                                                  extra_body={"strategy": strategy, "budget": 4})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    assert len(answers) == 64 and all(a.choices for a in answers)
    for (prompt, seed, strategy), a in zip(jobs, answers):
        ref = offline(models, strategy, [prompt], 4, seed)
        assert a.predictions == ref.predictions
        assert a.choices[0].text == first_choice(ref, 0).text
    after = server.metrics()
    calls = after[("tts_batch_requests_count", ())] - before[("tts_batch_requests_count", ())]
    merged = after[("tts_batch_requests_sum", ())] - before[("tts_batch_requests_sum", ())]
    assert merged == 64 and calls < 64  # the batcher merged requests: fewer search calls than requests
    assert max(a.usage.batch_requests for a in answers) > 1
    assert kv_blocks(server) == 0


BAD = [  # (body, status, param)
    ({"model": MODEL, "prompt": "x", "strategy": "no_such"}, 400, "strategy"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ({"model": MODEL, "prompt": "x", "budget": 0}, 400, "budget"),
    ({"model": MODEL, "prompt": "x", "budget": 17}, 400, "budget"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": ["ok", "  "]}, 400, "prompt"),
    ({"model": MODEL, "prompt": [1, 2, 3]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "temperature": 3.5}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "n": 4, "budget": 2}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "n": "two"}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "seed": 1.5}, 400, "seed"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "agg": "median"}, 400, "agg"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL, "prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"model": MODEL}, 400, "prompt"),
    ({"prompt": "x"}, 400, "model"),
    ([1, 2], 400, "body"),
]


def test_thinking_budget_field(server, models):
    """``thinking`` (ThinkingBudget's fields) reaches the search; reasoning tokens are reported."""
    budget = {"min_thinking_tokens": 20, "max_thinking_tokens": 30, "end": "#", "continuations": ["\n\n"],
              "answer_prefix": " "}
    prompts = PROMPTS[:2]
    r = server.client().completions.create(model=MODEL, prompt=prompts, max_tokens=MAX_TOKENS, seed=5,
                                           extra_body={"strategy": "majority", "budget": 2, "thinking": budget,
                                                       "return_candidates": True})
    ref = offline(models, "majority", prompts, 2, 5, thinking=budget)
    assert [c.text for c in r.choices] == [first_choice(ref, p).text for p in range(2)]
    assert r.usage.completion_tokens_details.reasoning_tokens == sum(
        first_choice(ref, p).thinking_tokens for p in range(2)) > 0
    assert [[c["thinking_tokens"] for c in cs] for cs in r.candidates] == [
        [c.thinking_tokens for c in cs] for cs in ref.candidates]
    status, text = server.post_raw("/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "x", "thinking": {"min_thinking_tokens": 9, "max_thinking_tokens": 3}}).encode())
    err = json.loads(text)["error"]
    assert status == 400 and err["param"] == "thinking" and "above max_thinking_tokens" in err["message"]


def test_bad_requests_interleaved_with_good_ones(server, models):
    good = {"model": MODEL, "prompt": PROMPTS[9], "max_tokens": MAX_TOKENS, "seed": 3, "budget": 4}
    ref = offline(models, "best_of_n", [PROMPTS[9]], 4, 3)

    def send(item):
        body, status, param = item
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return item, server.post_raw("/v1/completions", data)

    items = [x for bad in BAD for x in ((bad[0], bad[1], bad[2]), (good, 200, None))]
    items += [(b"{not json", 400, "body"), (good, 200, None)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, items))
    for (body, status, param), (got_status, text) in results:
        out = json.loads(text)
        assert got_status == status, (body, out)
        if status == 200:
            assert out["predictions"] == ref.predictions
        else:
            err = out["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, (body, err)
    # A search-time refusal (beam width does not divide the budget) fails alone, named, in a batch of good ones.
    odd = {"model": MODEL, "prompt": "x", "strategy": "prm_beam_search", "budget": 6, "beam_width": 4}
    status, text = server.post_raw("/v1/completions", json.dumps(odd).encode())
    assert status == 400 and "beam_width" in json.loads(text)["error"]["message"]
    assert kv_blocks(server) == 0 and server.get("/health")["status"] == "ok"


def test_client_that_disconnects_mid_search(server, models):
    slow = server.client(timeout=0.3)
    for _ in range(3):
        with pytest.raises(openai.APITimeoutError):
            slow.completions.create(model=MODEL, prompt=PROMPTS[:8], max_tokens=MAX_TOKENS, seed=1,
                                    extra_body={"strategy": "particle_filtering", "budget": 16})
    r = server.client().completions.create(model=MODEL, prompt=PROMPTS[10], max_tokens=MAX_TOKENS, seed=2,
                                           extra_body={"budget": 4})
    assert r.predictions == offline(models, "best_of_n", [PROMPTS[10]], 4, 2).predictions
    deadline = time.time() + 60
    while kv_blocks(server) != 0 or server.get("/health")["running"]:  # the abandoned searches finish and free
        assert time.time() < deadline
        time.sleep(0.2)
    m = server.metrics()
    assert m[("tts_requests_total", (("status", "cancelled"), ("strategy", "particle_filtering")))] == 3
    # The first of them was under way when its client left: its rows were dropped mid-search (the later ones may
    # have joined its call: continuous batching).
    searches = [json.loads(line) for line in server.output().splitlines() if line.startswith('{"event": "search"')]
    pf = [e["cancelled_prompts"] for e in searches if e["strategy"] == "particle_filtering"]
    assert pf and max(pf) >= 8, pf


def test_time_limit():
    s = Server("--request-timeout", "0.5", "--max-wait-ms", "5")
    try:
        with pytest.raises(openai.APIStatusError) as e:
            s.client().completions.create(model=MODEL, prompt=PROMPTS[:16], seed=1,
                                          extra_body={"strategy": "dvts", "budget": 16})
        assert e.value.status_code == 408 and "time limit" in e.value.message
        deadline = time.time() + 60
        while s.get("/health")["running"] or kv_blocks(s):  # the abandoned search ends and frees its rows
            assert time.time() < deadline
            time.sleep(0.1)
        r = s.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, seed=1,
                                          extra_body={"strategy": "greedy"})
        assert r.choices[0].text and s.metrics()[("tts_requests_total", (("status", "408"), ("strategy", "dvts")))] == 1
    finally:
        assert s.stop()


def test_graceful_shutdown_answers_the_request_under_way():
    s = Server()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(s.client(timeout=120).completions.create, model=MODEL, prompt=PROMPTS[:16], seed=1,
                          extra_body={"strategy": "best_of_n", "budget": 16})
        deadline = time.time() + 30
        while not s.get("/health")["running"]:  # SIGTERM once its search is under way
            assert time.time() < deadline and not fut.done()
            time.sleep(0.02)
        assert s.stop()
        r = fut.result()
    assert len(r.choices) == 16 and all(c.text for c in r.choices)
    assert "Waiting for connections to close" in s.output()


def test_request_seeds_are_fixed():
    # Clients reproduce served answers offline with these: they must never change silently.
    assert request_seeds(0, 2) == request_seeds(0, 3)[:2]
    assert len(set(request_seeds(7, 50))) == 50
    assert request_seeds(1, 1) != request_seeds(2, 1)
    assert all(-(2**63) <= s < 2**63 for s in request_seeds(-(2**63), 4) + request_seeds(2**63 - 1, 4))
