"""The tokenizer under the server's threads: request parsing and response building (threads off the event loop)
and the search thread (decoding, stop strings) share the policy's tokenizer, guarded by one lock
(tts_kernels.apps.engine.LockedTokenizer). Checked in process, and on a real server under concurrent load."""
import concurrent.futures
import json
import threading

import pytest
from tiny_models import char_tokenizer

from tts_kernels import bundled
from tts_kernels.apps.engine import LockedTokenizer, guard_tokenizers, request_seeds
from tts_kernels.apps.server import render_chat
from tts_kernels.bench.serving import ServerProcess as Server
from tts_kernels.search import Settings, run

MODEL = "tts-kernels-bundled"
PROBLEMS = bundled.test_problems(16)
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_locked_tokenizer_is_the_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    guard = LockedTokenizer(tok)
    ids = tok("hello world").input_ids
    assert guard("hello world").input_ids == ids and guard.decode(ids) == tok.decode(ids)
    assert guard.batch_decode([ids, ids[:3]]) == tok.batch_decode([ids, ids[:3]])
    assert len(guard) == len(tok) and guard.pad_token_id == tok.pad_token_id
    msgs = [{"role": "user", "content": "1+1?"}]
    assert render_chat(guard, msgs) == render_chat(tok, msgs)  # what the server's parser does with it
    guard.padding_side = "left"  # attributes set go to the tokenizer
    assert tok.padding_side == "left"


def test_a_call_holds_the_lock():
    seen = []

    class Probe:
        def decode(self, ids):
            other = threading.Thread(target=lambda: seen.append(guard.lock.acquire(blocking=False)))
            other.start()
            other.join()
            return "x"

    guard = LockedTokenizer(Probe())
    assert guard.decode([1]) == "x" and seen == [False]  # another thread could not take the lock meanwhile
    assert guard.lock.acquire(blocking=False)  # and it is free again after
    guard.lock.release()


def test_concurrent_parse_and_decode_match_serial():
    """Threads encoding (with truncation and padding, which change a fast tokenizer's state) and decoding at once
    through the guard get what one thread alone gets."""
    tok = bundled.load_tokenizer()
    guard = LockedTokenizer(tok)
    texts = [p.prompt for p in PROBLEMS]
    ids = [tok(t).input_ids for t in texts]
    jobs = [("trunc", 8 + i % 5) for i in range(40)] + [("pad", 160)] * 20 + [("decode", None)] * 40
    want = {}
    for kind, n in set(jobs):
        want[kind, n] = _use(tok, kind, n, texts, ids)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: (job, _use(guard, job[0], job[1], texts, ids)), jobs))
    for job, out in got:
        assert out == want[job], job


def _use(tok, kind, n, texts, ids):
    if kind == "trunc":
        return tok(texts, truncation=True, max_length=n).input_ids
    if kind == "pad":
        return tok(texts, padding="max_length", max_length=n).input_ids
    return tok.batch_decode(ids)


def test_guard_tokenizers_wraps_every_model_once():
    from types import SimpleNamespace

    tok = char_tokenizer()
    policy, verifier = SimpleNamespace(tokenizer=tok), SimpleNamespace(tokenizer=tok, format=SimpleNamespace(
        tokenizer=tok))
    other = SimpleNamespace(tokenizer=char_tokenizer())
    guard_tokenizers(policy, verifier, other, None)
    assert isinstance(policy.tokenizer, LockedTokenizer) and policy.tokenizer is verifier.tokenizer  # one lock
    assert verifier.format.tokenizer is verifier.tokenizer and other.tokenizer is not policy.tokenizer
    first = policy.tokenizer
    guard_tokenizers(policy, verifier)
    assert policy.tokenizer is first and first.inner is tok  # idempotent


@pytest.fixture(scope="module")
def server():
    s = Server("--max-wait-ms", "20")
    yield s
    assert s.stop()


def test_concurrent_parse_and_decode_under_load(server):
    """32 requests from 16 clients at once: chats (parsed and tokenized off the event loop), completions with stop
    strings (the search thread decodes every row at each host look), scoring requests (the verifier's tokenizer
    on the search thread). Every answer is the one a single-threaded offline run gives."""
    policy, verifier = bundled.load_policy("small"), bundled.load_verifier("prm")
    system = "You are a careful calculator. Work step by step."
    jobs = []
    for i, p in enumerate(PROBLEMS):
        if i % 3 == 0:
            jobs.append(("chat", p.prompt.strip(), 100 + i))
        elif i % 3 == 1:
            jobs.append(("stop", p.prompt, 200 + i))
        else:
            jobs.append(("score", p.prompt, 300 + i))
    jobs += [(kind, prompt, seed + 1000) for kind, prompt, seed in jobs if kind != "score"]

    def ask(job):
        kind, prompt, seed = job
        if kind == "score":
            body = {"model": MODEL, "prompt": prompt, "completions": [p.solution for p in PROBLEMS[:4]]}
            status, text = server.post_raw("/v1/score", json.dumps(body).encode())
            assert status == 200, text
            return json.loads(text)
        client = server.client(timeout=300)
        if kind == "chat":
            return client.chat.completions.create(
                model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                max_tokens=48, seed=seed, extra_body={"strategy": "best_of_n", "budget": 4})
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, seed=seed, stop=["= 1", "\n\nThe"],
                                         n=2, extra_body={"strategy": "best_of_n", "budget": 4})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    for (kind, prompt, seed), got in zip(jobs, answers):
        if kind == "score":
            ref = verifier.score([prompt], [[p.solution for p in PROBLEMS[:4]]])
            assert [d["step_scores"] for d in got["data"]] == ref.step_scores[0]
            continue
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        text = render_chat(policy.tokenizer, msgs) if kind == "chat" else prompt
        settings = Settings(max_new_tokens=48, stop=("= 1", "\n\nThe") if kind == "stop" else ())
        ref = run("best_of_n", policy, verifier, [text], budget=4, settings=settings, seed=request_seeds(seed, 1))
        first = ref.candidates[0][ref.chosen[0]].text
        assert (got.choices[0].message.content if kind == "chat" else got.choices[0].text) == first, (kind, seed)
        assert got.model_extra["predictions"] == ref.predictions
    assert server.get("/health") == {"status": "ok", "queued": 0, "running": 0, "kv_blocks_in_use": 0}
