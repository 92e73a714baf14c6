"""Decode throughput alone and beside a busy process: does the search survive a shared CPU?

The workload is what a search spends its time on: ``sample_completions`` (best-of-N's decode
loop) of the bundled small policy, ``prompts`` held-out problems x ``n`` samples. Each
measurement runs in a fresh child process (thread settings such as ``OMP_WAIT_POLICY`` are
read once, when OpenMP starts), timed after one warm-up call; the busy neighbour is another
process spinning on one core (``while True: pass``), started before the child and stopped
after it. Rounds alternate alone / busy, and the median of the rounds is reported, with the
slowdown ratio busy / alone.

``configs`` name child settings: ``default`` (what a user gets: ``import tts_kernels`` and
go), plus variants that set environment variables or thread counts, to see where the time goes.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

# Each config: the environment of the child and the thread count it sets after import (None: leave it).
CONFIGS = {
    "default": ({}, None),
    "fixed pool": ({"TTS_KERNELS_THREADS": "fixed"}, None),
    "threads=1": ({}, 1),
    "threads=2": ({}, 2),
    "omp-passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
}

_CHILD = r"""
import json, sys, time, torch
import tts_kernels
from tts_kernels import bundled
from tts_kernels.search import sample_completions
threads, prompts, n, tokens = json.loads(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
policy = bundled.load_policy("small")
texts = [p.prompt for p in bundled.test_problems(prompts)]
kw = dict(max_new_tokens=tokens, temperature=0.8, seed=0)
sample_completions(policy, texts, n, **kw)  # warm-up
t0 = time.perf_counter()
_, ids, _, _ = sample_completions(policy, texts, n, **kw)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "tokens": sum(len(x) for row in ids for x in row),
                  "threads": torch.get_num_threads()}))
"""


def _child(env: dict, threads, prompts: int, n: int, tokens: int) -> dict:
    # What a user gets unless the config says otherwise: no inherited thread settings.
    full = {k: v for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "TTS_KERNELS_THREADS")}
    full.update(env)
    res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([threads, prompts, n, tokens])],
                         capture_output=True, text=True, env=full, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"contention child failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run(configs=("default",), *, prompts: int = 40, n: int = 16, tokens: int = 96, rounds: int = 3) -> list[dict]:
    """One row per config: median seconds and tokens/s alone and beside one busy process, and the ratio."""
    rows = []
    for name in configs:
        env, threads = CONFIGS[name]
        alone, busy = [], []
        for _ in range(rounds):
            alone.append(_child(env, threads, prompts, n, tokens))
            hog = _busy()
            try:
                time.sleep(0.2)  # the neighbour is running before we start
                busy.append(_child(env, threads, prompts, n, tokens))
            finally:
                hog.kill()
                hog.wait()
        a = statistics.median(r["seconds"] for r in alone)
        b = statistics.median(r["seconds"] for r in busy)
        toks = alone[0]["tokens"]
        rows.append({"config": name, "threads": alone[0]["threads"], "workload": f"{prompts} prompts x {n} samples, "
                     f"{tokens} new tokens max ({toks} generated)", "alone_s": a, "busy_s": b, "slowdown": b / a,
                     "alone_tok_s": toks / a, "busy_tok_s": toks / b,
                     "rounds_s": {"alone": [r["seconds"] for r in alone], "busy": [r["seconds"] for r in busy]}})
    return rows
