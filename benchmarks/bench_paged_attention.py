"""paged_attention vs transformers' dense SDPA decode attention, same inputs, same process.

    python benchmarks/bench_paged_attention.py [--device cuda] [--dtypes fp32,bf16] [--json out.json]
"""
import argparse

from tts_kernels.apps.report import print_table, write_json
from tts_kernels.bench.paged_attention import run

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = run(args.device, dtypes=tuple(args.dtypes.split(",")), rounds=args.rounds)
    print_table(rows)
    write_json(args.json, rows)
