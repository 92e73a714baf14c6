"""The vLLM backend against the transformers backend, and vLLM's own beam search against ours.

* ``search``: the same strategy at the same budget on the same prompts, the policy generating through
  :class:`~tts_kernels.integrations.vllm.VLLMPolicy` (a ``vllm.LLM``) and through
  :class:`~tts_kernels.models.HFPolicy` (this package's paged cache and fused sampling); the verifier
  is the same (the bundled likelihood verifier). Seconds (median of ``rounds``) and generated tokens
  per second; the two give different samples (different random streams), so accuracy is not compared.
* ``beam``: token-level beam search, ``vllm.LLM.beam_search`` against this package's ``beam_search``
  on the paged cache (:func:`~tts_kernels.search.beam_search`), same prompts, width and length. vLLM's
  beam search is not transformers' (its length penalty divides by prompt + generated length and it
  keeps an EOS from any of the 2K candidates), so the texts are compared and the share that differs
  is reported rather than asserted.

Run in the vLLM environment: ``make bench-vllm`` (``benchmarks/bench_vllm.py``).
"""
from __future__ import annotations

import statistics
import time

import torch


def _median_seconds(fn, rounds: int):
    out, times = None, []
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def run(*, problems: int = 16, budget: int = 16, strategies=("best_of_n", "dvts"), rounds: int = 3,
        beam_prompts: int = 8, beam_width: int = 4, beam_tokens: int = 64) -> list[dict]:
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import BeamSearchParams

    from .. import bundled
    from ..integrations.vllm import VLLMPolicy
    from ..search import Settings, beam_search
    from ..search import run as search_run

    prompts = [p.prompt for p in bundled.test_problems(problems)]
    vpol = VLLMPolicy(bundled.path("policy-small"), max_model_len=256)
    hpol = bundled.load_policy("small")
    verifier = bundled.load_verifier("likelihood")
    s = Settings()
    rows = []
    for strategy in strategies:
        got = {}
        for name, pol in (("vllm", vpol), ("hf", hpol)):
            search_run(strategy, pol, verifier, prompts[:2], budget=budget, settings=s, seed=0)  # warm-up
            sec, res = _median_seconds(lambda: search_run(strategy, pol, verifier, prompts, budget=budget,
                                                          settings=s, seed=0), rounds)
            got[name] = sec
            rows.append({"bench": "search", "strategy": strategy, "budget": budget, "problems": problems,
                         "backend": name, "seconds": round(sec, 3),
                         "generated_tokens_per_s": round(res.compute.policy_generated_tokens / sec, 1),
                         "policy_tokens": res.compute.policy_prefill_tokens + res.compute.policy_generated_tokens})
            print(rows[-1], flush=True)
        rows[-1]["vllm_s_over_hf_s"] = round(got["vllm"] / got["hf"], 2)

    # Token-level beam search.
    tok = hpol.tokenizer
    ids = [hpol.encode(p) for p in prompts[:beam_prompts]]
    width = max(len(i) for i in ids)
    pad = tok.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    kw = dict(num_beams=beam_width, max_new_tokens=beam_tokens, attention_mask=mask)
    beam_search(hpol.model, input_ids, **kw)
    ours_s, ours = _median_seconds(lambda: beam_search(hpol.model, input_ids, **kw), rounds)
    params = BeamSearchParams(beam_width=beam_width, max_tokens=beam_tokens)
    vprompts = [TokensPrompt(prompt_token_ids=i) for i in ids]
    vpol.llm.beam_search(vprompts, params)
    theirs_s, theirs = _median_seconds(lambda: vpol.llm.beam_search(vprompts, params), rounds)
    ours_text = [tok.decode(seq[width:], skip_special_tokens=True) for seq in ours.sequences.tolist()]
    theirs_text = [tok.decode(o.sequences[0].tokens[len(i):], skip_special_tokens=True) for o, i in zip(theirs, ids)]
    differ = sum(a.strip() != b.strip() for a, b in zip(ours_text, theirs_text))
    rows.append({"bench": "beam", "prompts": beam_prompts, "beam_width": beam_width, "max_new_tokens": beam_tokens,
                 "ours_s": round(ours_s, 3), "vllm_beam_search_s": round(theirs_s, 3),
                 "vllm_over_ours": round(theirs_s / ours_s, 2), "texts_differ": f"{differ}/{beam_prompts}"})
    print(rows[-1], flush=True)
    return rows
