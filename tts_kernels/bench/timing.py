"""Timing that is fair to the peer.

CPU: both functions are warmed up, then timed alternately (peer, ours, peer,
ours, ...) for several rounds; each round gives a median per call, and the best
round's median is reported for each side. Large temporaries make eager PyTorch
bimodal on small machines (page faults on fresh buffers), so one run proves
nothing. CUDA: the median of ``triton.testing.do_bench`` when Triton is present,
else CUDA events, again alternating.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=10, rep=max(20, iters * 2), return_mode="median"))
        except ImportError:
            start = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            end = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            for i in range(iters):
                start[i].record()
                fn()
                end[i].record()
            torch.cuda.synchronize(device)
            return statistics.median(s.elapsed_time(e) for s, e in zip(start, end))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def compare(peer: Callable[[], object], ours: Callable[[], object], *, device="cpu", rounds: int = 5,
            iters: int = 10, warmup: int = 3) -> dict:
    """Best-of-rounds median milliseconds per call for ``peer`` and ``ours``."""
    device = torch.device(device)
    for _ in range(warmup):
        peer()
        ours()
    _sync(device)
    peer_ms, ours_ms = [], []
    for _ in range(rounds):
        peer_ms.append(_median_ms(peer, iters, device))
        ours_ms.append(_median_ms(ours, iters, device))
    p, o = min(peer_ms), min(ours_ms)
    return {"peer_ms": p, "ours_ms": o, "ratio": p / o, "peer_rounds_ms": peer_ms, "ours_rounds_ms": ours_ms}


def copy_bandwidth_gbs(nbytes: int, device="cpu", rounds: int = 5, iters: int = 10) -> float:
    """Measured copy bandwidth (bytes read + written per second) on a buffer of ``nbytes``."""
    device = torch.device(device)
    src = torch.empty(max(1, nbytes // 4), dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    for _ in range(3):
        fn()
    _sync(device)
    best = min(_median_ms(fn, iters, device) for _ in range(rounds))
    return 2 * src.numel() * 4 / (best * 1e-3) / 1e9


def bench_row(op: str, shape: str, dtype: torch.dtype, device, peer: str, res: dict, floor_bytes: int,
              copy_gbs: float) -> dict:
    """One table row: times from :func:`compare`, bandwidth of ``floor_bytes`` against ``copy_gbs``."""
    gbs = floor_bytes / (res["ours_ms"] * 1e-3) / 1e9
    return {
        "op": op,
        "shape": shape,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "peer": peer,
        "peer_ms": res["peer_ms"],
        "ours_ms": res["ours_ms"],
        "ratio": res["ratio"],
        "gbs": gbs,
        "floor_pct": 100.0 * gbs / copy_gbs,
        "copy_gbs": copy_gbs,
    }
