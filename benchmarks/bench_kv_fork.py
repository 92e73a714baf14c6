"""KV fork and beam reorder: PagedKVCache against transformers' DynamicCache, same process.

    python benchmarks/bench_kv_fork.py [--quick] [--rounds 5] [--json out.json]

(a) one beam-search step's cache update (K=8 beams, 8 layers, 8 KV heads, head_dim 64,
T = 256, 1024, 2048, fp32): PagedKVCache.reorder + one-token append on every layer vs
DynamicCache.reorder_cache (index_select of every layer) + update; (b) best-of-64 set-up on
a small random Llama: prefill once + fork 64 vs prefill 64 copies. Prints time, bytes
written and the ratios. The loops are ``tts_kernels.bench.kv_fork`` (also run by
``tts-kernels bench``).
"""
import argparse

from tts_kernels.apps.report import machine_info, print_table, write_json
from tts_kernels.bench.kv_fork import run

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--json", help="write the result rows here")
    args = ap.parse_args()
    rows = run(args.device, args.quick, rounds=args.rounds)
    print_table(rows)
    for r in rows:
        extra = f", blocks taken per step {r['blocks_per_step']} (<= {r['max_blocks_per_step']})" \
            if "blocks_per_step" in r else ""
        print(f"{r['op']} {r['shape']}: time ratio {r['ratio']:.1f}x; bytes written peer "
              f"{r['peer_bytes'] / 1e6:.2f} MB, ours {r['ours_bytes'] / 1e6:.3f} MB, ratio {r['bytes_ratio']:.0f}x{extra}")
    write_json(args.json, {"machine": machine_info(), "rows": rows})
