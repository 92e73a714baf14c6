"""Fused sample (top-p) vs eager sort-based top-p sampling as transformers runs it, same inputs, same process.

    python benchmarks/bench_sample.py [--device cuda] [--json out.json]
"""
import argparse

from tts_kernels.apps.report import print_table, write_json
from tts_kernels.bench.sample import run

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", default="auto", help="comma list: auto,cpp,triton,reference")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = run(args.device, dtypes=tuple(args.dtypes.split(",")), backends=tuple(args.backends.split(",")),
               rounds=args.rounds)
    print_table(rows)
    write_json(args.json, rows)
