"""The vLLM backend (tts_kernels.integrations.vllm): the bundled policy generating through a vllm.LLM engine,
every strategy running on it with the verifier on this package's ops, and greedy searches giving the texts
the transformers-backed searches give. Runs where vLLM is installed (`make test-vllm`: .venv-vllm)."""
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process (2 cores: fastest)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
vllm = pytest.importorskip("vllm")

from tts_kernels import bundled  # noqa: E402
from tts_kernels.search import STRATEGIES, Settings, run  # noqa: E402

pytestmark = pytest.mark.vllm

PROMPTS = [p.prompt for p in bundled.test_problems(3)]
S = Settings(max_new_tokens=64)


@pytest.fixture(scope="module")
def models():
    from tts_kernels.integrations.vllm import VLLMPolicy

    policy = VLLMPolicy(bundled.path("policy-small"), max_model_len=256)
    return policy, bundled.load_policy("small"), bundled.load_verifier("likelihood")


def test_bundled_policy_generates_through_vllm(models):
    vpol, hpol, _ = models
    ids = vpol.encode(PROMPTS[0])
    assert ids == hpol.encode(PROMPTS[0])
    assert vpol.seeded is False  # vLLM's CPU backend refuses per-request seeds
    session = vpol.start([ids], rows_hint=1, max_new_tokens=64)
    (out, finish, _), = session.generate(None, max_tokens=64, stop=[], temperature=0.0, top_p=1.0, top_k=0,
                                         min_p=0.0, logprobs=False, seeds=[0])
    assert finish == "eos" and out[-1] in vpol.eos_token_ids
    assert session.ids[0] == ids + out[:-1]  # the history grew by the completion, EOS not appended
    ref = run("greedy", hpol, None, PROMPTS[:1], budget=1, settings=S)
    assert vpol.tokenizer.decode(out[:-1], skip_special_tokens=True) == ref.candidates[0][0].text


@pytest.mark.parametrize("strategy", sorted(s for s in STRATEGIES if not STRATEGIES[s].token_loop))
def test_every_strategy_runs_on_vllm(models, strategy):
    vpol, _, verifier = models
    res = run(strategy, vpol, verifier if STRATEGIES[strategy].needs_verifier else None, PROMPTS[:2], budget=4,
              settings=S, seed=[1, 2])
    assert len(res.candidates) == 2 and all(res.candidates[p] for p in range(2))
    assert all(c.text for row in res.candidates for c in row if c.finish != "empty")
    prompt_tokens = sum(len(vpol.encode(p)) for p in PROMPTS[:2])
    # Each prompt once; the pooled strategies' sub-searches, particle Gibbs's second sweep and revise's revisions
    # (each re-reads its chain's history) read them again.
    assert res.compute.policy_prefill_tokens == prompt_tokens or (
        (STRATEGIES[strategy].pooled or strategy in ("particle_gibbs", "revise"))
        and res.compute.policy_prefill_tokens > prompt_tokens)
    assert res.compute.policy_generated_tokens > 0 and res.compute.policy_flops > 0


@pytest.mark.parametrize("strategy", sorted(s for s in STRATEGIES if STRATEGIES[s].token_loop))
def test_token_loop_strategies_refuse_vllm(models, strategy):
    # They stop rows mid-completion on per-token statistics, which vLLM's whole-completion generate() cannot.
    vpol, _, verifier = models
    assert strategy in ("deepconf", "deepconf_offline", "adaptive_consistency", "speculative_rejection")
    with pytest.raises(ValueError, match="text-level engine"):
        run(strategy, vpol, verifier if STRATEGIES[strategy].needs_verifier else None, PROMPTS[:2], budget=4,
            settings=S, seed=[1, 2])


@pytest.mark.parametrize("strategy", ["best_of_n", "prm_beam_search", "dvts", "particle_filtering",
                                      "particle_gibbs"])
def test_greedy_search_on_vllm_matches_transformers(models, strategy):
    vpol, hpol, verifier = models
    s = S.replace(temperature=0.0)
    got = run(strategy, vpol, verifier, PROMPTS, budget=4, settings=s, seed=[1, 2, 3])
    ref = run(strategy, hpol, verifier, PROMPTS, budget=4, settings=s, seed=[1, 2, 3])
    assert [[c.text for c in row] for row in got.candidates] == [[c.text for c in row] for row in ref.candidates]
    assert got.predictions == ref.predictions


def test_token_beam_search_is_refused_clearly(models):
    vpol = models[0]
    session = vpol.start([vpol.encode(PROMPTS[0])])
    with pytest.raises(NotImplementedError, match="generate"):
        session.decode(None)


def test_server_with_the_vllm_backend(models):
    from tts_kernels.bench.serving import ServerProcess

    _, hpol, verifier = models
    s = ServerProcess("--backend", "vllm", startup_timeout=300)
    try:
        client = s.client(timeout=300)
        r = client.completions.create(model="tts-kernels-bundled", prompt=PROMPTS[0], max_tokens=64, temperature=0,
                                      extra_body={"strategy": "greedy"})
        assert r.choices[0].text == run("greedy", hpol, None, PROMPTS[:1], budget=1, settings=S).candidates[0][0].text
        r = client.completions.create(model="tts-kernels-bundled", prompt=PROMPTS[:2], max_tokens=64, seed=3,
                                      extra_body={"strategy": "dvts", "budget": 4})
        assert len(r.choices) == 2 and r.usage.verifier_tokens > 0
    finally:
        assert s.stop()
