"""Streaming that follows the search (``stream=true``): a real server in a subprocess, the `openai` client with
``stream=True``. The streamed text of each choice equals the non-streamed response's with the same seed; sampling
streams tokens as the search samples them, step searches stream their steps, usage comes last."""
import concurrent.futures
import time

import pytest

from tts_kernels import bundled
from tts_kernels.apps.server import _pieces
from tts_kernels.bench.serving import ServerProcess as Server

MODEL = "tts-kernels-bundled"
PROMPTS = [p.prompt for p in bundled.test_problems(12)]


@pytest.fixture(scope="module")
def server():
    s = Server("--max-wait-ms", "50", "--max-budget", "16")
    yield s
    assert s.stop()


def stream(server, prompt, **kw):
    """(chunks, arrival time of each, seconds to the whole stream)."""
    t0 = time.perf_counter()
    chunks, times = [], []
    for c in server.client().completions.create(model=MODEL, prompt=prompt, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        chunks.append(c)
        times.append(time.perf_counter() - t0)
    return chunks, times


def texts(chunks) -> dict[int, str]:
    out: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            out[ch.index] = out.get(ch.index, "") + (ch.text or "")
    return out


def check_usage(chunks, whole):
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_greedy_streams_tokens_as_they_are_sampled(server):
    kw = dict(max_tokens=128, seed=3, extra_body={"strategy": "greedy", "sync_every": 1})
    whole = server.client().completions.create(model=MODEL, prompt=PROMPTS[0], **kw)
    chunks, times = stream(server, PROMPTS[0], **kw)
    assert texts(chunks) == {0: whole.choices[0].text}
    content = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].text]
    finish = next(i for i, c in enumerate(chunks) if c.choices and c.choices[0].finish_reason)
    # Live: one delta per host look (every token here), not the finished text replayed in steps.
    before = [i for i in content if i < finish]
    assert len(before) > len(_pieces(whole.choices[0].text, "\n\n")) + 5
    assert times[content[0]] < times[finish]
    last = chunks[finish].choices[0]
    assert last.finish_reason == whole.choices[0].finish_reason and last.model_extra["rank"] == 0
    check_usage(chunks, whole)


def test_majority_streams_every_candidate_as_a_choice(server):
    kw = dict(max_tokens=64, seed=11, n=3, extra_body={"strategy": "majority", "budget": 3})
    whole = server.client().completions.create(model=MODEL, prompt=PROMPTS[1], **kw)
    chunks, _ = stream(server, PROMPTS[1], **kw)
    got = texts(chunks)
    assert sorted(got) == [0, 1, 2]
    rank = {ch.index: ch.model_extra["rank"] for c in chunks for ch in c.choices if ch.finish_reason}
    assert sorted(rank.values()) == [0, 1, 2]
    for i, text in got.items():  # streamed choice i is candidate i; its rank is its place in the response
        assert text == whole.choices[rank[i]].text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 3
    check_usage(chunks, whole)


def test_prm_beam_search_streams_steps_then_the_answer(server):
    kw = dict(max_tokens=48, seed=5, extra_body={"strategy": "prm_beam_search", "budget": 4})
    whole = server.client().completions.create(model=MODEL, prompt=PROMPTS[2], **kw)
    chunks, _ = stream(server, PROMPTS[2], **kw)
    steps = [c.model_extra["tts_step"] for c in chunks if c.model_extra.get("tts_step")]
    assert steps and [s["index"] for s in steps] == list(range(len(steps)))
    assert all(s["prompt"] == 0 and s["text"] for s in steps)
    first_choice = next(i for i, c in enumerate(chunks) if c.choices)
    assert all(i < first_choice for i, c in enumerate(chunks) if c.model_extra.get("tts_step"))
    assert texts(chunks) == {0: whole.choices[0].text}
    check_usage(chunks, whole)


def test_batched_streams_each_get_their_own_rows(server):
    """Requests streamed at once (sharing search calls) each get their own prompts' rows only."""
    def one(i):
        kw = dict(max_tokens=48, seed=100 + i, n=2, extra_body={"strategy": "majority", "budget": 2})
        return stream(server, [PROMPTS[3 + i], PROMPTS[4 + i]], **kw)[0], kw

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        runs = list(pool.map(one, range(6)))
    shared = 0
    for i, (chunks, kw) in enumerate(runs):
        whole = server.client().completions.create(model=MODEL, prompt=[PROMPTS[3 + i], PROMPTS[4 + i]], **kw)
        got = texts(chunks)
        assert sorted(got) == [0, 1, 2, 3]
        rank = {ch.index: ch.model_extra["rank"] for c in chunks for ch in c.choices if ch.finish_reason}
        for idx, text in got.items():
            assert text == whole.choices[(idx // 2) * 2 + rank[idx]].text
        shared += chunks[-1].usage.model_extra["batch_prompts"] > 2
    assert shared


@pytest.mark.parametrize("strategy", ["prm_beam_search", "dvts"])
def test_step_searches_streamed_at_once_each_get_their_own_steps(server, strategy):
    """Step-search requests streamed at once (joining one continuous call at step boundaries) each get their own
    prompts' steps only, in their own prompt indices, and the answer the request gets unstreamed."""
    def one(i):
        kw = dict(max_tokens=48, seed=200 + i, extra_body={"strategy": strategy, "budget": 4})
        return stream(server, [PROMPTS[5 + i], PROMPTS[6 + i]], **kw)[0], kw

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(one, range(4)))
    shared = 0
    for i, (chunks, kw) in enumerate(runs):
        steps = [c.model_extra["tts_step"] for c in chunks if c.model_extra.get("tts_step")]
        assert steps and {s["prompt"] for s in steps} == {0, 1}
        for p in (0, 1):
            assert [s["index"] for s in steps if s["prompt"] == p] == list(range(sum(s["prompt"] == p for s in steps)))
        whole = server.client().completions.create(model=MODEL, prompt=[PROMPTS[5 + i], PROMPTS[6 + i]], **kw)
        assert texts(chunks) == {0: whole.choices[0].text, 1: whole.choices[1].text}
        shared += chunks[-1].usage.model_extra["batch_prompts"] > 2
    assert shared  # (they shared a call)


def test_client_that_leaves_mid_stream_frees_everything(server):
    for _ in range(3):
        with server.client().completions.create(model=MODEL, prompt=PROMPTS[:8], max_tokens=128, seed=1, n=16,
                                                stream=True, extra_body={"strategy": "majority", "budget": 16,
                                                                         "sync_every": 1}) as s:
            next(iter(s))  # the first chunk, then the connection closes
    deadline = time.time() + 30
    while time.time() < deadline:
        health = server.get("/health")
        if health["running"] == 0 and health["kv_blocks_in_use"] == 0:
            break
        time.sleep(0.1)
    assert health == {"status": "ok", "queued": 0, "running": 0, "kv_blocks_in_use": 0}
    after = server.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=32, seed=2)
    assert after.choices[0].text is not None
