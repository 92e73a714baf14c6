"""How well each bundled verifier judges the small policy's own samples (``tts_kernels/bench/verifiers.py``):
pair ordering, best-of-k and weighted-k against majority@k and pass@k on one shared pool of samples.

    python benchmarks/bench_verifiers.py [--problems 200] [--samples 16] [--seed 77] [--json PATH]
"""
import argparse

from tts_kernels.apps.report import write_json
from tts_kernels.bench.verifiers import run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=77, help="held-out problems' seed (test split; the demo uses 1234)")
    ap.add_argument("--verifiers", default="prm,likelihood")
    ap.add_argument("--models", default=None, help="folder with the bundled models (default: the package's)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    got = run(problems=a.problems, samples=a.samples, seed=a.seed, verifiers=tuple(a.verifiers.split(",")),
              root=a.models)
    k = a.samples
    b = got["baselines"]
    print(f"{a.problems} held-out problems (seed {a.seed}), {k} samples each from policy-small at T=0.8 "
          f"({got['sample_seconds']:.0f} s)")
    print(f"single sample {b['single']:.3f}  majority@4 {b['majority_4']:.3f}  majority@{k} {b[f'majority_{k}']:.3f}  "
          f"pass@4 {b['pass_4']:.3f}  pass@{k} {b[f'pass_{k}']:.3f}")
    print(f"{'verifier':12} {'pair ordering':>14} {'best-of-4':>10} {f'best-of-{k}':>11} {'weighted-4':>11} "
          f"{f'weighted-{k}':>12} {'s':>5}")
    for name, v in got["verifiers"].items():
        print(f"{name:12} {v['pair_ordering']:14.3f} {v['best_of_4']:10.3f} {v[f'best_of_{k}']:11.3f} "
              f"{v['weighted_4']:11.3f} {v[f'weighted_{k}']:12.3f} {v['seconds']:5.1f}")
    write_json(a.json, got)


if __name__ == "__main__":
    main()
