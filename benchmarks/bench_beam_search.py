"""End-to-end beam search: tts_kernels beam_search vs transformers generate(), same process.

    python benchmarks/bench_beam_search.py [--quick] [--batch 4] [--new 32] [--rounds 5] [--iters 2] [--json out.json] [--profile]

A small random Llama with V = 128256, num_beams=8, no EOS stop; outputs are checked
identical before the medians are printed. The timing loop is
``tts_kernels.bench.beam_search.run`` (also used by ``tts-kernels bench``).
"""
import argparse

from tts_kernels.apps.report import machine_info, print_table, write_json
from tts_kernels.bench.beam_search import profile, run

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--beams", type=int, default=8)
    ap.add_argument("--new", type=int, help="max_new_tokens")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--json", help="write the result row here")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table of each side")
    args = ap.parse_args()
    kw = dict(batch=args.batch, prompt_len=args.prompt_len, num_beams=args.beams, max_new_tokens=args.new,
              hidden=args.hidden, vocab_size=args.vocab)
    row = run(args.device, args.quick, rounds=args.rounds, iters=args.iters, **kw)
    print_table([row])
    print(f"generate() with output_scores=True: {row['peer_scores_ms']:.1f} ms "
          f"(ratio {row['ratio_vs_scores']:.2f}); compiled kernels: {row['compiled_kernels']}")
    if args.profile:
        print(profile(args.device, args.quick, **kw))
    write_json(args.json, {"machine": machine_info(), "row": row})
