"""Likelihood verifier (HFPRM head="likelihood") against a full forward + log_softmax per candidate.

    python benchmarks/bench_likelihood.py [--quick] [--rounds R] [--device cuda] [--json PATH]
"""
import argparse

from tts_kernels.apps.report import write_json
from tts_kernels.bench.likelihood import run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args()
    rows = run(device=a.device, quick=a.quick, rounds=a.rounds)
    print(f"{'shape':58} {'peer ms':>9} {'ours ms':>9} {'ratio':>6}  tokens peer -> ours")
    for r in rows:
        print(f"{r['shape']:58} {r['peer_ms']:9.1f} {r['ours_ms']:9.1f} {r['ratio']:6.2f}  "
              f"{r['peer_tokens']} -> {r['ours_tokens']}")
    write_json(a.json, rows)


if __name__ == "__main__":
    main()
