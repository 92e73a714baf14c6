"""Particle resampling on the device against the per-prompt Python loop (its_hub's way).

    python benchmarks/bench_resample.py [--device cuda]
"""
import argparse

from tts_kernels.apps.report import print_table
from tts_kernels.bench.resample import run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    print_table(run(device=ap.parse_args().device))


if __name__ == "__main__":
    main()
