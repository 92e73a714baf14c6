"""Decode throughput alone and beside a busy process (best-of-N sampling, bundled policy).

    python benchmarks/bench_contention.py [--configs default,fixed pool,threads=1] [--rounds 3] [--quick] [--json PATH]

``default`` is what a user gets (the pool shrinks to the CPUs others leave free); ``fixed pool``
keeps torch's pool as it is (TTS_KERNELS_THREADS=fixed): the behaviour before that was added.
"""
import argparse

from tts_kernels.apps.report import write_json
from tts_kernels.bench.contention import CONFIGS, run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="default,fixed pool", help=f"comma list from {', '.join(CONFIGS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 prompts x 4 samples, 32 tokens, 1 round")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args()
    kw = dict(prompts=4, n=4, tokens=32, rounds=1) if a.quick else dict(rounds=a.rounds)
    rows = run([c.strip() for c in a.configs.split(",")], **kw)
    print(f"{rows[0]['workload']}; median of {kw['rounds']} round(s)")
    print(f"{'config':26} {'alone s':>8} {'busy s':>8} {'slowdown':>9} {'alone tok/s':>12} {'busy tok/s':>11}")
    for r in rows:
        print(f"{r['config']:26} {r['alone_s']:8.2f} {r['busy_s']:8.2f} {r['slowdown']:8.2f}x "
              f"{r['alone_tok_s']:12.0f} {r['busy_tok_s']:11.0f}")
    write_json(a.json, rows)


if __name__ == "__main__":
    main()
