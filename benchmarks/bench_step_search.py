"""PRM beam search and DVTS end to end against a search-and-learn-style loop.

    python benchmarks/bench_step_search.py [--quick] [--rounds R] [--n 16,64] [--prompts 8] [--json FILE]

Peer: ``benchmarks/step_search_baseline.py`` (prompts one at a time; every beam's full
history re-prefilled from scratch every iteration; the PRM re-scores full prefixes).
Ours: ``tts_kernels.search.prm_beam_search`` / ``dvts`` (all prompts batched, histories
forked on the paged KV cache, the PRM scores only new steps). Same models, same seed:
both draw the same samples at the same rows, so they make the same choices; this is
asserted (completed texts and finish reasons equal).

Models: the random Llama policy and token-classification PRM of
``tts_kernels.bench.best_of_n`` (32000-word vocabulary ``t4 .. t31999``; a step is a
run of words). A random policy samples nearly uniformly, so a delimiter word would
almost never occur: the policy's LM head gets a bias of ``DELIM_BIAS`` on the delimiter
word ``t31999`` (no other word contains that text), which makes it about one draw in
ten, so steps average ~10 words and some hit ``max_step_tokens`` (16).

The peer's time includes building a ``[rows, V]`` buffer and calling ``sample`` on it
once per prompt and token position (needed only to reproduce our samples; a real
engine samples one row per beam). That part is measured and subtracted: ``peer_ms``
is the peer at its best, ``peer_raw_ms`` the wall time.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from step_search_baseline import baseline_beam_search, baseline_dvts, counts  # noqa: E402

from tts_kernels.apps.report import write_json  # noqa: E402
from tts_kernels.bench.best_of_n import VOCAB, make_models, make_tokenizer  # noqa: E402

DELIM_ID = VOCAB - 1
DELIM_BIAS = math.log(VOCAB / 9)  # p(delimiter) ~ 1/10 under a near-uniform random policy


def _bias_delimiter(model) -> None:
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[DELIM_ID] = DELIM_BIAS
    model.lm_head = biased.to(head.weight.device)


def _candidates(res):
    """Completed candidates per prompt: ours return a SearchResult, the baseline its own record."""
    return res.candidates if hasattr(res, "candidates") else res.completed


def _key(res):
    return [[(c.text, c.finish) for c in cs] for cs in _candidates(res)]


def run(device="cpu", quick: bool = False, *, n_values=(16, 64), num_prompts: int = 8, prompt_len: int = 128,
        beam_width: int = 4, num_iterations: int = 3, max_step_tokens: int = 16, hidden: int = 256,
        layers: int = 4, rounds: int | None = None, temperature: float = 1.0, seed: int = 0,
        algorithms=("prm_beam_search", "dvts")) -> list[dict]:
    """One row per (algorithm, n): best-round ms of the peer and of ours, and the compute counts of each."""
    from transformers.utils import logging as hf_logging

    from tts_kernels.models.policy import HFPolicy
    from tts_kernels.models.prm import HFPRM
    from tts_kernels.search.step_search import dvts, prm_beam_search

    if quick:
        n_values, num_prompts, prompt_len, hidden, layers = (8,), 2, 32, 128, 2
    rounds = rounds or 1
    tok = make_tokenizer()
    policy_model, prm_model = make_models(hidden, layers)
    _bias_delimiter(policy_model)
    policy_model, prm_model = policy_model.to(device), prm_model.to(device)
    policy = HFPolicy(policy_model, tok, eos_token_ids=[2])
    prm = HFPRM(prm_model, tok, head="classifier")
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(4, VOCAB - 1, (num_prompts, prompt_len), generator=gen).tolist()
    prompts = [tok.decode(p) for p in prompt_ids]
    assert all(tok(t).input_ids == p for t, p in zip(prompts, prompt_ids))
    delimiter = tok.decode([DELIM_ID])
    fns = {"prm_beam_search": (baseline_beam_search, prm_beam_search), "dvts": (baseline_dvts, dvts)}
    rows = []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    dev = torch.device(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for algo in algorithms:
                peer_fn, ours_fn = fns[algo]
                for n in n_values:
                    kw = dict(n=n, beam_width=beam_width, num_iterations=num_iterations, step_delimiter=delimiter,
                              max_step_tokens=max_step_tokens, max_new_tokens=max_step_tokens,
                              temperature=temperature, seed=seed)
                    res = {}
                    # Warm-up: ours in full (cheap), the peer on one prompt with few beams.
                    ours_fn(policy, prm, prompts, **kw)
                    peer_fn(policy, prm, prompts[:1], **dict(kw, n=beam_width))
                    times = {"peer": [], "peer_raw": [], "ours": []}
                    for _ in range(rounds):
                        for name, fn in (("peer", peer_fn), ("ours", ours_fn)):
                            if dev.type == "cuda":
                                torch.cuda.synchronize(dev)
                            t0 = time.perf_counter()
                            res[name] = fn(policy, prm, prompts, **kw)
                            if dev.type == "cuda":
                                torch.cuda.synchronize(dev)
                            ms = (time.perf_counter() - t0) * 1e3
                            if name == "peer":
                                times["peer_raw"].append(ms)
                                ms -= counts(res[name].compute)["emulation_ms"]
                            times[name].append(ms)
                    same = _key(res["peer"]) == _key(res["ours"])
                    assert same, f"{algo} n={n}: the peer and ours made different choices"
                    steps = [len(c.steps) for cs in res["ours"].candidates for c in cs]
                    finishes = {}
                    for cs in res["ours"].candidates:
                        for c in cs:
                            finishes[c.finish] = finishes.get(c.finish, 0) + 1
                    peer_ms, ours_ms = min(times["peer"]), min(times["ours"])
                    rows.append({
                        "op": algo,
                        "shape": f"P={num_prompts} n={n} bw={beam_width} it={num_iterations} prompt={prompt_len} "
                                 f"step<={max_step_tokens} V={VOCAB} h={hidden} L={layers}",
                        "dtype": "float32", "device": str(device),
                        "peer": "search-and-learn-style loop (benchmarks/step_search_baseline.py)",
                        "peer_ms": peer_ms, "peer_raw_ms": min(times["peer_raw"]), "ours_ms": ours_ms,
                        "ratio": peer_ms / ours_ms, "gbs": None, "floor_pct": None,
                        "prompts_per_s": {"peer": num_prompts / peer_ms * 1e3, "ours": num_prompts / ours_ms * 1e3},
                        "same_choices": same,
                        "completed": len(steps), "mean_steps": statistics.mean(steps) if steps else 0.0,
                        "finishes": finishes,
                        "peer_compute": counts(res["peer"].compute), "ours_compute": counts(res["ours"].compute),
                        "rounds_ms": times,
                    })
    finally:
        hf_logging.set_verbosity(verbosity)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--n", default="16,64")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args()
    rows = run(device=a.device, quick=a.quick, rounds=a.rounds, num_prompts=a.prompts,
               n_values=tuple(int(x) for x in a.n.split(",")))
    print(f"{'op':16} {'shape':70} {'peer ms':>9} {'(raw)':>9} {'ours ms':>8} {'ratio':>6} "
          f"{'prompts/s peer':>14} {'ours':>7}  same")
    for r in rows:
        pps = r["prompts_per_s"]
        print(f"{r['op']:16} {r['shape']:70} {r['peer_ms']:9.0f} {r['peer_raw_ms']:9.0f} {r['ours_ms']:8.0f} "
              f"{r['ratio']:6.2f} {pps['peer']:14.2f} {pps['ours']:7.2f}  {r['same_choices']}")
    print("compute (policy prefill / generated / decode rows / prm tokens), peer -> ours; completions:")
    for r in rows:
        p, o = r["peer_compute"], r["ours_compute"]
        f = "policy_prefill_tokens", "policy_generated_tokens", "policy_decode_rows", "prm_tokens"
        print(f"  {r['op']:16} n={r['shape'].split('n=')[1].split()[0]:>3}: "
              f"{'/'.join(str(p.get(k, '-')) for k in f)} -> {'/'.join(str(o.get(k, '-')) for k in f)}; "
              f"{r['completed']} completed, mean {r['mean_steps']:.2f} steps, {r['finishes']}")
    write_json(a.json, rows)


if __name__ == "__main__":
    main()
