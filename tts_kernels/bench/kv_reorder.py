"""kv_reorder_ against transformers' cache reorder (``index_select`` of every layer's K and V).

The cache is a DynamicCache-like list of ``[B*K, H, T, D]`` tensors. Parents
follow a typical beam step: each beam keeps its own history with probability
1/2, otherwise takes a random beam of the same batch item. Floor: the changed
rows read and written once.
"""
from __future__ import annotations

import torch

from ..ops.kv import kv_reorder_
from .timing import bench_row, compare, copy_bandwidth_gbs


def beam_parents(B: int, K: int, keep: float, gen: torch.Generator) -> torch.Tensor:
    own = torch.arange(B * K)
    other = torch.randint(0, K, (B, K), generator=gen) + torch.arange(B).view(-1, 1) * K
    keep_mask = torch.rand(B * K, generator=gen) < keep
    return torch.where(keep_mask, own, other.reshape(-1))


def bench_case(B=4, K=8, layers=8, heads=8, T=256, D=64, dtype=torch.float32, device="cpu", rounds=5, iters=10,
               copy_gbs=None) -> dict:
    gen = torch.Generator().manual_seed(0)
    device = torch.device(device)
    caches = [torch.randn(B * K, heads, T, D, generator=gen).to(device=device, dtype=dtype) for _ in range(2 * layers)]
    parents = beam_parents(B, K, 0.5, gen).to(device)
    holder = {"c": caches}

    def peer():  # what DynamicCache.reorder_cache does: a new tensor per layer and kind
        holder["c"] = [c.index_select(0, parents) for c in holder["c"]]

    ours = lambda: kv_reorder_(caches, parents)  # noqa: E731
    res = compare(peer, ours, device=device, rounds=rounds, iters=iters)
    changed = int((parents != torch.arange(B * K, device=device)).sum())
    row_bytes = heads * T * D * caches[0].element_size()
    moved = 2 * changed * row_bytes * len(caches)
    copy_gbs = copy_gbs or copy_bandwidth_gbs(sum(c.numel() * c.element_size() for c in caches) // 4, device)
    shape = f"L={layers} N={B * K} H={heads} T={T} D={D} changed={changed}"
    return bench_row("kv_reorder_", shape, dtype, device, "index_select per layer", res, moved, copy_gbs)


def run(device="cpu", rounds=5, iters=10) -> list[dict]:
    return [bench_case(device=device, rounds=rounds, iters=iters)]
