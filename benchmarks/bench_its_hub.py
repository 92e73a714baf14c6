"""Particle filtering, ours against its_hub's (one prompt at a time through its LM and PRM interfaces,
served by the same bundled HF models): accuracy with Wilson intervals and seconds at equal budget.

    python benchmarks/bench_its_hub.py [--problems 40] [--budget 16] [--resampling systematic] [--json out.json]
"""
import argparse

from tts_kernels.apps.report import write_json
from tts_kernels.bench.its_hub_pf import compare


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=40)
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resampling", default="systematic", choices=["systematic", "multinomial"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = compare(a.problems, a.budget, seed=a.seed, device=a.device, resampling=a.resampling,
                   rounds=a.rounds)
    for r in rows:
        print(r)
    write_json(a.json, rows)


if __name__ == "__main__":
    main()
