"""A quick self-check against the tools people use: token beam search with the fused
kernels on a small randomly initialised Llama (dense and paged KV cache), checked token
for token against ``transformers`` ``generate()``, timed against it; best-of-N with a
PRM against the transformers recipe; plus a few op benchmarks.

    tts-kernels check [--quick] [--out DIR]
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import HAS_C
from ..bench import beam_topk as bt
from ..bench import best_of_n as bon
from ..bench import kv_reorder as kv
from ..bench.beam_search import make_model
from ..search import beam_search
from .report import machine_info, print_table, write_json


def main(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"tts-kernels check  (compiled kernels: {HAS_C}, threads: {torch.get_num_threads()})")
    model = make_model(vocab_size=32000)
    gen = torch.Generator().manual_seed(1)
    B, T, K, new = (2, 12, 4, 16) if args.quick else (4, 16, 8, 32)
    input_ids = torch.randint(3, model.config.vocab_size, (B, T), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # a left-padded prompt
    input_ids[1, :3] = 0
    kw = dict(num_beams=K, max_new_tokens=new, attention_mask=attention_mask, eos_token_id=2, pad_token_id=0,
              num_return_sequences=2)
    with torch.inference_mode():
        t0 = time.perf_counter()
        ours = beam_search(model, input_ids, **kw)
        t_ours = time.perf_counter() - t0
        paged = beam_search(model, input_ids, cache="paged", **kw)
        t0 = time.perf_counter()
        ref = model.generate(input_ids, do_sample=False, output_scores=True, return_dict_in_generate=True, **kw)
        t_ref = time.perf_counter() - t0
    same = torch.equal(ours.sequences, ref.sequences)
    close = torch.allclose(ours.sequences_scores, ref.sequences_scores, rtol=1e-5, atol=1e-5)
    same_paged = torch.equal(paged.sequences, ref.sequences) and torch.allclose(
        paged.sequences_scores, ref.sequences_scores, rtol=1e-5, atol=1e-5)
    print(f"\nbeam search, random Llama (V={model.config.vocab_size}), B={B} prompts, num_beams={K}, "
          f"{new} new tokens, 2 returned per prompt")
    for i in range(ours.sequences.shape[0]):
        toks = ours.sequences[i, T:].tolist()
        print(f"  seq {i}: score {ours.sequences_scores[i].item():+.4f}  tokens {toks[:12]}{' ...' if len(toks) > 12 else ''}")
    print(f"  identical to transformers generate(): sequences {same}, scores {close}; "
          f"on the paged KV cache: {same_paged}")
    print(f"  time (first call, cold): ours {t_ours * 1e3:.1f} ms, generate() {t_ref * 1e3:.1f} ms")
    rows = bt.run("cpu", shapes=bt.CPU_SHAPES[:1] if args.quick else bt.CPU_SHAPES[1:2], dtypes=("fp32",),
                  rounds=3)
    rows += kv.run("cpu", rounds=3)
    bon_rows = bon.run("cpu", n_values=(16,), prompt_len=128, max_new_tokens=16, hidden=128, layers=2, rounds=1)
    for r in bon_rows:
        print(f"\nbest-of-N with a PRM ({r['shape']}): {r['peer_ms']:.0f} ms the transformers way "
              f"(generate(num_return_sequences) + PRM per candidate), {r['ours_ms']:.0f} ms ours "
              f"({r['ratio']:.1f}x); policy/PRM tokens {r['peer_tokens']['policy']}/{r['peer_tokens']['prm']} "
              f"-> {r['ours_tokens']['policy']}/{r['ours_tokens']['prm']}")
    rows += bon_rows
    print("\nop benchmarks (CPU, ratio = peer / ours; full set: `tts-kernels bench`):")
    print_table(rows)
    write_json(out / "check.json", {"machine": machine_info(), "beam_search_identical": same and close,
                                    "paged_beam_search_identical": same_paged,
                                    "beam_search_ms": {"ours": t_ours * 1e3, "generate": t_ref * 1e3}, "ops": rows})
    print(f"\nwrote {out / 'check.json'}")
    return 0 if (same and close and same_paged) else 1
