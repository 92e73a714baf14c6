"""Thinking budgets: the device rule's cost per decode step, and the bundled thinking policy's accuracy
against its thinking budget (``tts_kernels/bench/thinking.py``).

    python benchmarks/bench_thinking.py [--quick] [--problems 200] [--skip-curve] [--json PATH]
"""
import argparse

from tts_kernels.apps.report import write_json
from tts_kernels.bench.thinking import op_rows, thinking_curve


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--skip-curve", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    ops = op_rows(device=a.device, quick=a.quick)
    print(f"{'rows':>5} {'vocab':>7} {'sample ms':>10} {'+ rule ms':>10} {'overhead':>9}")
    for r in ops:
        print(f"{r['rows']:5d} {r['vocab']:7d} {r['plain_ms']:10.3f} {r['ruled_ms']:10.3f} {r['overhead']:8.2f}x")
    curve = [] if a.skip_curve else thinking_curve(problems=a.problems)
    if curve:
        print(f"\n{'run':24} {'accuracy':>9} {'95% interval':>15} {'tokens/problem':>15} {'thinking/problem':>17} {'s':>6}")
        for r in curve:
            lo, hi = r["ci95"]
            print(f"{r['run']:24} {r['accuracy']:9.3f} {f'[{lo:.3f}, {hi:.3f}]':>15} {r['tokens_per_problem']:15.1f} "
                  f"{r['thinking_per_problem']:17.1f} {r['seconds']:6.1f}")
    write_json(a.json, {"ops": ops, "curve": curve})


if __name__ == "__main__":
    main()
