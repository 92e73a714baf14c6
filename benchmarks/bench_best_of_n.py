"""Best-of-N end to end against generate(num_return_sequences=N) + a PRM forward per candidate.

    python benchmarks/bench_best_of_n.py [--quick] [--rounds R] [--n 16,64] [--device cuda]
"""
import argparse

from tts_kernels.apps.report import write_json
from tts_kernels.bench.best_of_n import run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--n", default="16,64")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args()
    rows = run(device=a.device, quick=a.quick, rounds=a.rounds, n_values=tuple(int(x) for x in a.n.split(",")))
    print(f"{'shape':58} {'peer ms':>9} {'ours ms':>9} {'ratio':>6}  tokens peer (policy/prm) -> ours")
    for r in rows:
        pt, ot = r["peer_tokens"], r["ours_tokens"]
        print(f"{r['shape']:58} {r['peer_ms']:9.0f} {r['ours_ms']:9.0f} {r['ratio']:6.2f}  "
              f"{pt['policy']}/{pt['prm']} -> {ot['policy']}/{ot['prm']}")
    write_json(a.json, rows)


if __name__ == "__main__":
    main()
