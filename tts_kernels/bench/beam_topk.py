"""beam_topk against the eager sequence transformers runs each beam step.

Peer (transformers ``_beam_search``): ``logits.to(float32, copy=True)``,
``log_softmax``, add the running beam scores, view ``[B, K*V]``, ``topk(C)``,
then ``// V`` and ``% V`` for parents and tokens. Ours: one ``beam_topk`` call.
Floor: the logits read once; bandwidth is reported against the measured copy
bandwidth of the same device.
"""
from __future__ import annotations

import torch

from ..ops.beam import beam_topk
from .timing import bench_row, compare, copy_bandwidth_gbs

CPU_SHAPES = [(8, 8, 32000), (8, 8, 128256), (32, 4, 152064)]
CUDA_SHAPES = CPU_SHAPES + [(32, 8, 152064)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def eager_beam_step(logits: torch.Tensor, beam_scores: torch.Tensor, C: int):
    B, K = beam_scores.shape
    V = logits.shape[-1]
    logp = torch.nn.functional.log_softmax(logits.to(copy=True, dtype=torch.float32), dim=-1)
    logp = logp.view(B, K, V) + beam_scores[:, :, None]
    scores, idx = torch.topk(logp.reshape(B, K * V), C)
    return scores, idx // V, idx % V


def bench_case(B: int, K: int, V: int, dtype: torch.dtype, device="cpu", backend="auto", rounds=5, iters=10,
               copy_gbs: float | None = None) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(B * K, V, generator=gen) * 3).to(device=device, dtype=dtype)
    beam_scores = (-torch.rand(B, K, generator=gen) * 5).to(device)
    C = 2 * K
    ours = lambda: beam_topk(logits, beam_scores, C, backend=backend)  # noqa: E731
    peer = lambda: eager_beam_step(logits, beam_scores, C)  # noqa: E731
    a, b = ours(), peer()
    if not torch.allclose(a[0], b[0], rtol=1e-5, atol=1e-5):
        raise AssertionError(f"beam_topk disagrees with the eager peer at {(B, K, V, dtype)}")
    res = compare(peer, ours, device=device, rounds=rounds, iters=iters)
    nbytes = logits.numel() * logits.element_size()
    copy_gbs = copy_gbs if copy_gbs is not None else copy_bandwidth_gbs(nbytes, device)
    op = "beam_topk" + ("" if backend == "auto" else f"[{backend}]")
    return bench_row(op, f"B={B} K={K} V={V}", dtype, device, "eager log_softmax+add+topk", res, nbytes, copy_gbs)


def run(device="cpu", shapes=None, dtypes=("fp32", "bf16"), backends=("auto",), rounds=5, iters=10) -> list[dict]:
    device = torch.device(device)
    shapes = shapes or (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    copy_gbs = copy_bandwidth_gbs(max(B * K * V for B, K, V in shapes) * 4, device)
    rows = []
    for B, K, V in shapes:
        for name in dtypes:
            for backend in backends:
                rows.append(bench_case(B, K, V, DTYPES[name], device, backend, rounds, iters, copy_gbs))
    return rows
