"""`tts-kernels serve` throughput under closed-loop clients, in one run: one search call per request
(per_request), whole-request batching (batched) and continuous batching, requests joining the running call
at its next host look (admission), at 16 and 64 clients, on the bundled models; problems/s, generated
tokens/s, latency p50/p99, requests per call, and the ratio to per_request and to batched
(tts_kernels.bench.serving).

    python benchmarks/bench_server.py [--requests 128] [--budget 16] [--rounds 3] [--clients 16,64]
        [--strategies best_of_n] [--modes per_request,batched,admission] [--max-batch 32] [--device cpu]
        [--dtype float32] [--json out.json]
"""
import argparse

from tts_kernels.apps.report import write_json
from tts_kernels.bench.serving import run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--clients", default="16,64")
    ap.add_argument("--strategies", default="best_of_n")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-wait-ms", type=float, default=10.0, help="the batched server's collection window")
    ap.add_argument("--max-batch", type=int, default=32, help="the batched and admission servers' --max-batch")
    ap.add_argument("--modes", default="per_request,batched,admission")
    ap.add_argument("--device", default="cpu", help="the servers' --device (cuda: the GPU check)")
    ap.add_argument("--dtype", default="float32", help="the servers' --dtype")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = run(requests=a.requests, budget=a.budget, clients=[int(c) for c in a.clients.split(",")],
               strategies=a.strategies.split(","), rounds=a.rounds, max_tokens=a.max_tokens,
               max_wait_ms=a.max_wait_ms, modes=a.modes.split(","), max_batch=a.max_batch,
               device=a.device, dtype=a.dtype)
    print(f"{'mode':12} {'strategy':10} {'clients':>7} {'problems/s':>10} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7} "
          f"{'prompts/call':>12} {'x per-request':>13} {'x batched':>9}")
    for r in rows:
        print(f"{r['mode']:12} {r['strategy']:10} {r['clients']:>7} {r['problems_per_s']:>10} {r['tokens_per_s']:>9} "
              f"{r['p50_s']:>7} {r['p99_s']:>7} {r['prompts_per_call']:>12} {str(r['vs_per_request']):>13} "
              f"{str(r['vs_batched']):>9}")
    write_json(a.json, rows)


if __name__ == "__main__":
    main()
