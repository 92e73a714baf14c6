"""`serve --verifier FOLDER` with a published-format PRM folder, and the step scoring endpoints, on real servers
in subprocesses: ``POST /v1/score`` equals ``HFPRM.score`` offline (the folder loaded as the preset it is), the
searches score with the preset, and ``POST /pooling`` answers vLLM's pooling shape for Qwen2.5-Math-PRM text
(per step ``[1 - p, p]``) as the model card's reference computes it.

The PRM folders are random models of the right architecture with tokenizers trained in
tts_kernels.bench.prm_presets (as tests/test_prm_presets.py makes them)."""
import json

import pytest
from test_prm_presets import ref_math_shepherd, ref_qwen

from tts_kernels import bundled
from tts_kernels.apps.engine import request_seeds
from tts_kernels.bench.prm_presets import model_for, tokenizer_for
from tts_kernels.bench.serving import ServerProcess as Server
from tts_kernels.models import HFPRM
from tts_kernels.models.text import split_steps
from tts_kernels.search import Settings, run

MODEL = "tts-kernels-bundled"
TOL = 1e-5  # a text read back from its rendering re-tokenizes from another prefill: float rounding apart
QUESTION = "What is 12 + 7?"
SOLUTIONS = ["12 + 7 = 19\n\nThe answer is 19", "12 + 7 = 18\n\nSo 18\n\nThe answer is 18", "19"]


def _folder(root, preset):
    tok = tokenizer_for(preset)
    folder = root / preset.replace(".", "_")
    model_for(preset, len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shepherd(tmp_path_factory):
    """A Math-Shepherd-style folder, its server (found by detection: no preset flag), its offline reading."""
    folder = _folder(tmp_path_factory.mktemp("prm"), "math-shepherd")
    s = Server("--verifier", str(folder), "--max-wait-ms", "20")
    yield s, HFPRM.from_pretrained(str(folder), "math-shepherd"), folder
    assert s.stop()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = _folder(tmp_path_factory.mktemp("prm"), "qwen2.5-math-prm")
    s = Server("--verifier", str(folder), "--verifier-preset", "qwen2.5-math-prm")
    yield s, HFPRM.from_pretrained(str(folder), "qwen2.5-math-prm")
    assert s.stop()


def post(server, path, body):
    status, text = server.post_raw(path, json.dumps(body).encode())
    return status, json.loads(text)


def test_score_equals_hfprm_score_offline(shepherd):
    server, prm, folder = shepherd
    assert "read as preset 'math-shepherd'" in server.output()
    for agg in ("last", "min"):
        status, out = post(server, "/v1/score", {"model": MODEL, "prompt": QUESTION, "completions": SOLUTIONS,
                                                 "agg": agg})
        assert status == 200, out
        ref = prm.score([QUESTION], [SOLUTIONS], agg=agg)
        assert [d["step_scores"] for d in out["data"]] == ref.step_scores[0]  # equal, not close
        assert [d["score"] for d in out["data"]] == ref.aggregate.tolist()
        assert [d["steps"] for d in out["data"]] == [split_steps(s, "\n\n") for s in SOLUTIONS]
        assert [(d["index"], d["prompt_index"], d["completion_index"]) for d in out["data"]] == [
            (0, 0, 0), (1, 0, 1), (2, 0, 2)]
        assert out["usage"]["verifier_tokens"] == ref.tokens and out["object"] == "list"
    # Several prompts at once, each with its candidates (the verifier's name is a model id too).
    prompts, comps = [QUESTION, "What is 3 + 4?"], [SOLUTIONS[:2], ["3 + 4 = 7\n\nThe answer is 7"]]
    status, out = post(server, "/v1/score", {"model": folder.name, "prompt": prompts, "completions": comps})
    ref = prm.score(prompts, comps)
    assert status == 200 and [d["step_scores"] for d in out["data"]] == [s for row in ref.step_scores for s in row]
    # The preset's step delimiter is part of its format: another separator is refused, named.
    status, out = post(server, "/v1/score", {"model": MODEL, "prompt": QUESTION, "completions": SOLUTIONS,
                                             "step_separator": "\n"})
    assert status == 400 and out["error"]["param"] == "step_separator"
    status, out = post(server, "/v1/score", {"model": MODEL, "prompt": QUESTION, "completions": "not a list"})
    assert status == 400 and out["error"]["param"] == "completions"


def test_searches_score_with_the_preset(shepherd):
    """A search on the server equals the same search offline with the folder read as its preset."""
    server, prm, _ = shepherd
    policy = bundled.load_policy("small")
    prompts = [p.prompt for p in bundled.test_problems(2)]
    for strategy in ("best_of_n", "prm_beam_search"):
        r = server.client().completions.create(model=MODEL, prompt=prompts, max_tokens=32, seed=4,
                                               extra_body={"strategy": strategy, "budget": 4,
                                                           "return_candidates": True})
        ref = run(strategy, policy, prm, prompts, budget=4, settings=Settings(max_new_tokens=32),
                  seed=request_seeds(4, 2))
        assert r.predictions == ref.predictions
        got = r.model_extra["candidates"]
        assert [[c["step_scores"] for c in cs] for cs in got] == [[c.step_scores for c in cs]
                                                                   for cs in ref.candidates]


def test_pooling_messages_and_input_on_math_shepherd(shepherd):
    server, prm, _ = shepherd
    steps = ["12 + 7 = 19\n\n", "The answer is 19"]
    want = prm.score_steps([QUESTION], [[steps]]).step_scores[0][0]
    msgs = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "".join(steps)}]
    status, out = post(server, "/pooling", {"model": MODEL, "messages": msgs})
    assert status == 200 and out["data"][0]["object"] == "pooling"
    assert out["data"][0]["data"] == [[1.0 - p, p] for p in want]
    # input: the text as the card writes it (tags before each delimiter), read back by the preset.
    text = prm.format.render(QUESTION, steps).text
    status, out = post(server, "/pooling", {"model": MODEL, "input": [text, text], "task": "token_classify"})
    card = ref_math_shepherd(prm.model, prm.tokenizer, QUESTION, steps)
    assert status == 200 and len(out["data"]) == 2 and out["data"][0]["data"] == out["data"][1]["data"]
    assert max(abs(a[1] - b) for a, b in zip(out["data"][0]["data"], card)) <= TOL
    status, out = post(server, "/pooling", {"model": MODEL, "input": "no tags here"})
    assert status == 400 and out["error"]["param"] == "input" and "step tag" in out["error"]["message"]


def test_pooling_qwen_prm_as_vllm_takes_it(qwen):
    """A vLLM client of Qwen2.5-Math-PRM sends the chat rendered by the model's template, every step followed by
    <extra_0> (or the messages themselves); per step it gets [P(bad), P(good)] at each separator."""
    server, prm = qwen
    tok = prm.tokenizer
    system = "Please reason step by step, and put your final answer within \\boxed{}."
    answers = [["12 + 7 = 19", "The answer is 19"], ["12 + 7 = 18", "So 18", "The answer is 18"]]
    convs = [[{"role": "system", "content": system}, {"role": "user", "content": QUESTION},
              {"role": "assistant", "content": "<extra_0>".join(a) + "<extra_0>"}] for a in answers]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=False) for c in convs]
    status, out = post(server, "/pooling", {"model": MODEL, "input": texts})
    assert status == 200, out
    for a, item in zip(answers, out["data"]):
        card = ref_qwen(prm.model, tok, QUESTION, [s + "\n\n" for s in a[:-1]] + a[-1:])
        assert len(item["data"]) == len(a)
        assert max(abs(p[1] - c) for p, c in zip(item["data"], card)) <= TOL
        assert all(abs(p[0] + p[1] - 1.0) < 1e-12 for p in item["data"])
    steps = [[s + "\n\n" for s in a[:-1]] + a[-1:] for a in answers]
    offline = prm.score_steps([QUESTION], [steps]).step_scores[0]
    for item, want in zip(out["data"], offline):
        assert max(abs(p[1] - w) for p, w in zip(item["data"], want)) <= TOL
    status, chat = post(server, "/pooling", {"model": MODEL, "messages": convs[0]})
    assert status == 200 and chat["data"][0]["data"] == out["data"][0]["data"]
    # Another system prompt than the one the PRM was loaded with is refused, not scored silently otherwise.
    other = [dict(convs[0][0], content="Be brief.")] + convs[0][1:]
    status, err = post(server, "/pooling", {"model": MODEL, "messages": other})
    assert status == 400 and "system prompt" in err["error"]["message"]
    # /v1/score reads the same model the same way.
    status, scored = post(server, "/v1/score", {"model": MODEL, "prompt": QUESTION,
                                                "completions": ["\n\n".join(a) for a in answers]})
    assert status == 200 and [d["step_scores"] for d in scored["data"]] == offline


def test_bad_pooling_requests(qwen):
    server, _ = qwen
    for body, param in (({"model": MODEL}, "input"),
                        ({"model": MODEL, "input": "x", "messages": []}, "input"),
                        ({"model": MODEL, "input": [1, 2]}, "input"),
                        ({"model": MODEL, "input": "x", "task": "embed"}, "task"),
                        ({"model": MODEL, "input": "<|im_start|>user\nq<|im_end|>"}, "input"),
                        ({"model": "other", "input": "x"}, "model")):
        status, out = post(server, "/pooling", body)
        assert status in (400, 404) and out["error"]["param"] == param, (body, out)
    assert json.loads(json.dumps(server.get("/health")))["kv_blocks_in_use"] == 0
