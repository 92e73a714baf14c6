"""Particle resampling (``ops.resample``) against the per-prompt Python loop particle-filter code runs today.

Peer (what its_hub's particle filtering does, one prompt at a time): read the prompt's log-weights to
the host, softmax them in Python, then ``random.choices(range(N), weights, k=N)`` (multinomial) or a
loop over ``N`` evenly spaced positions with one uniform (systematic). Ours: one ``resample`` call over
``[P, N]`` log-weights on the device, indices left there (the fork reads them). Floor: the
log-weights read once.
"""
from __future__ import annotations

import math
import random

import torch

from ..ops.resample import resample
from .timing import bench_row, compare, copy_bandwidth_gbs

SHAPES = [(40, 16), (40, 64), (200, 256)]


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(x - top) for x in row]
    s = sum(e)
    return [x / s for x in e]


def python_resample(log_weights: torch.Tensor, method: str, rng: random.Random) -> list[list[int]]:
    out = []
    for row in log_weights.tolist():
        w = _softmax(row)
        N = len(w)
        if method == "multinomial":
            out.append(rng.choices(range(N), weights=w, k=N))
            continue
        u, picks, acc, i = rng.random(), [], w[0], 0
        for k in range(N):
            pos = (u + k) / N
            while pos > acc and i < N - 1:
                i += 1
                acc += w[i]
            picks.append(i)
        out.append(picks)
    return out


def run(device="cpu", shapes=SHAPES, methods=("systematic", "multinomial"), rounds=5, iters=10) -> list[dict]:
    device = torch.device(device)
    copy_gbs = copy_bandwidth_gbs(max(P * N for P, N in shapes) * 8, device)
    rows = []
    for P, N in shapes:
        lw = torch.randn(P, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device) * 2
        for method in methods:
            rng = random.Random(0)
            res = compare(lambda: python_resample(lw, method, rng), lambda: resample(lw, method=method, seed=0),
                          device=device, rounds=rounds, iters=iters)
            rows.append(bench_row(f"resample[{method}]", f"P={P} N={N}", torch.float64, device,
                                  "per-prompt Python softmax + random.choices / systematic loop (its_hub)", res,
                                  P * N * 8, copy_gbs))
    return rows
