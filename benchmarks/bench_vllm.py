"""The vLLM backend: a strategy at a budget through vLLM against the transformers backend, and vllm.LLM.beam_search
against this package's beam_search (tts_kernels.bench.vllm_backend). Needs vLLM: `make bench-vllm`.

    python benchmarks/bench_vllm.py [--problems 16] [--budget 16] [--rounds 3] [--json out.json]
"""
import argparse
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def main():
    from tts_kernels.apps.report import write_json
    from tts_kernels.bench.vllm_backend import run

    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--strategies", default="best_of_n,dvts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = run(problems=a.problems, budget=a.budget, strategies=a.strategies.split(","), rounds=a.rounds)
    write_json(a.json, rows)


if __name__ == "__main__":  # vLLM starts its engine from here (the guard it requires)
    main()
