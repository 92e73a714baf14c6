"""Confidence statistics fused into sample: the C++ op with and without ``stats_k=20`` in one run,
and the overhead as a share of a decode step.

    python benchmarks/bench_sample_stats.py [--rows 16,64] [--no-decode] [--json out.json]

Rows: R = 16 and 64, V = the bundled vocabulary (415) and SmolLM2's (49152), temperature 0.8 (the
search default: the statistics, at temperature 1, read the row once more) and 1.0 (they reuse the
sampler's exponentials). Times are best-of-rounds medians, with and without timed alternately
(tts_kernels/bench/timing.py). The decode step is one ``PolicySession.decode`` of the bundled small
policy and of a SmolLM2-135M-shaped Llama (random weights) at the same number of rows.
"""
import argparse

import torch

from tts_kernels.apps.report import machine_info, write_json
from tts_kernels.bench.sample import STATS_K, run_stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="16,64")
    ap.add_argument("--temperatures", default="0.8,1.0")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-decode", action="store_true", help="op timings only (no model decode step)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: the default); 1 is steadier on a machine shared with other work")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_stats(tuple(int(r) for r in args.rows.split(",")),
                     tuple(float(t) for t in args.temperatures.split(",")), decode=not args.no_decode,
                     rounds=args.rounds, iters=args.iters)
    info = machine_info()
    print(f"sample (C++) with and without stats_k={STATS_K}; torch {info['torch']}, {info['threads']} threads")
    print("| model (V) | R | T | without ms | with ms | ratio | overhead ms | decode step ms | share of step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        step = "-" if r["decode_ms"] is None else f"{r['decode_ms']:.2f}"
        share = "-" if r["step_share_pct"] is None else f"{r['step_share_pct']:.2f}%"
        print(f"| {r['model']} ({r['V']}) | {r['R']} | {r['temperature']} | {r['without_ms']:.4f} | "
              f"{r['with_ms']:.4f} | {r['ratio']:.3f} | {r['overhead_ms']:.4f} | {step} | {share} |")
    write_json(args.json, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
