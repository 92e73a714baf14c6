"""PRM presets: incremental scoring (HFPRM sessions) against a full re-score per step (search-and-learn's way).

    python benchmarks/bench_prm_presets.py [--quick] [--steps 8 32] [--rounds R] [--device cuda] [--json PATH]
"""
import argparse

from tts_kernels.apps.report import write_json
from tts_kernels.bench.prm_presets import run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args()
    rows = run(device=a.device, quick=a.quick, steps=tuple(a.steps), rounds=a.rounds)
    print(f"{'preset':18} {'steps':>5} {'cands':>5} {'model':>9} {'peer ms':>9} {'ours ms':>9} {'ratio':>6} {'max diff':>9}")
    for r in rows:
        print(f"{r['preset']:18} {r['steps']:5d} {r['candidates']:5d} {'h%d x%d' % (r['hidden'], r['layers']):>9} "
              f"{r['peer_ms']:9.1f} {r['ours_ms']:9.1f} {r['ratio']:6.2f} {r['max_abs_diff']:9.1e}")
    write_json(a.json, rows)


if __name__ == "__main__":
    main()
