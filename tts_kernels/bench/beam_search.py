"""End-to-end beam search: ``tts_kernels.search.beam_search`` against ``model.generate()``.

Model: a small randomly initialised Llama with the Llama-3 vocabulary (V = 128256), so
the LM head and the per-step work over ``[B*K, V]`` logits dominate, as they do for a
real model at small batch. Prompts are random, no EOS stop (every run makes exactly
``max_new_tokens`` steps). Both sides run in this process on the same inputs: a warm-up
each, then ``rounds`` rounds of ``iters`` calls alternating peer, ours, peer (with
scores); each side reports its best round's median (DESIGN.md: a busy 2-core machine
only ever slows a round down). The outputs are checked identical before any time is reported.

Peers: ``generate(num_beams=K, do_sample=False)`` returning sequences only (the peer at
its best: no per-step copy of the log-probs) and, as a second figure,
``generate(..., output_scores=True, return_dict_in_generate=True)``, which is what it
takes to get ``sequences_scores`` out of generate() (it keeps a ``[B*K, V]`` copy of
every step's log-probs).
"""
from __future__ import annotations

import statistics
import time
import warnings

import torch

from .. import _ext
from ..search import beam_search
from .timing import _sync


def make_model(vocab_size: int = 128256, hidden: int = 128, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def _ms(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def run(device="cpu", quick: bool = False, *, batch: int | None = None, prompt_len: int = 16, num_beams: int = 8,
        max_new_tokens: int | None = None, hidden: int = 128, vocab_size: int = 128256, rounds: int | None = None,
        iters: int = 2, model=None) -> dict:
    """Time beam_search against generate(); returns one benchmark row (the ``tts-kernels bench`` format).

    ``ratio`` is generate() (sequences only) / ours; ``ratio_vs_scores`` uses generate() with
    ``output_scores=True`` (the call that also returns ``sequences_scores``). Raises
    ``AssertionError`` if the outputs differ.
    """
    from transformers.utils import logging as hf_logging

    device = torch.device(device)
    B = batch or (2 if quick else 4)
    N = max_new_tokens or (16 if quick else 32)
    rounds = rounds or (2 if quick else 5)
    model = (model or make_model(vocab_size, hidden)).to(device)
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, V, (B, prompt_len), generator=gen).to(device)
    kw = dict(num_beams=num_beams, max_new_tokens=N, eos_token_id=None, pad_token_id=None)

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")

            def peer():
                return model.generate(input_ids, do_sample=False, **kw)

            def peer_scores():
                return model.generate(input_ids, do_sample=False, output_scores=True, return_dict_in_generate=True,
                                      **kw)

            def ours():
                return beam_search(model, input_ids, **kw)

            for fn in (peer, ours, peer_scores):  # warm-up
                fn()
            times = {"peer": [], "ours": [], "peer_scores": []}  # per round: the calls' ms
            outs = {}
            for _ in range(rounds):
                round_ms = {k: [] for k in times}
                for _ in range(iters):
                    for name, fn in (("peer", peer), ("ours", ours), ("peer_scores", peer_scores)):
                        ms, outs[name] = _ms(fn, device)
                        round_ms[name].append(ms)
                for k, ms_list in round_ms.items():
                    times[k].append(ms_list)
    finally:
        hf_logging.set_verbosity(verbosity)

    ours_out, ref = outs["ours"], outs["peer_scores"]
    if not (torch.equal(ours_out.sequences, ref.sequences) and torch.equal(ours_out.sequences, outs["peer"])):
        raise AssertionError("beam_search and generate() returned different sequences")
    if not torch.allclose(ours_out.sequences_scores, ref.sequences_scores, rtol=1e-5, atol=1e-5):
        raise AssertionError("beam_search and generate() returned different sequences_scores")
    # Best round's median per side: a noisy shared machine only ever makes a round slower.
    med = {k: min(statistics.median(r) for r in v) for k, v in times.items()}
    return {
        "op": "beam_search",
        "shape": f"B={B} K={num_beams} L={prompt_len} new={N} V={V} h={model.config.hidden_size}",
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(device),
        "peer": f"generate(num_beams={num_beams})",
        "peer_ms": med["peer"],
        "ours_ms": med["ours"],
        "ratio": med["peer"] / med["ours"],
        "peer_scores_ms": med["peer_scores"],
        "ratio_vs_scores": med["peer_scores"] / med["ours"],
        "gbs": None,
        "floor_pct": None,
        "identical": True,
        "compiled_kernels": bool(_ext.HAS_C),
        "rounds_ms": times,
    }


def profile(device="cpu", quick: bool = False, row_limit: int = 15, **kw) -> str:
    """torch.profiler table (self CPU time) of one beam_search call and one generate() call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    device = torch.device(device)
    B = kw.get("batch") or (2 if quick else 4)
    N = kw.get("max_new_tokens") or (16 if quick else 32)
    K = kw.get("num_beams", 8)
    model = make_model(kw.get("vocab_size", 128256), kw.get("hidden", 128)).to(device)
    ids = torch.randint(3, model.config.vocab_size, (B, kw.get("prompt_len", 16)),
                        generator=torch.Generator().manual_seed(1)).to(device)
    args = dict(num_beams=K, max_new_tokens=N, eos_token_id=None, pad_token_id=None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tables = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in (("ours: beam_search", lambda: beam_search(model, ids, **args)),
                         ("peer: generate", lambda: model.generate(ids, do_sample=False, **args))):
            fn()
            with tprofile(activities=acts) as prof:
                fn()
            tables.append(f"== {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                      row_limit=row_limit))
    return "\n".join(tables)
