"""paged_attention against what transformers runs today for one decode step.

Peer: transformers' SDPA attention over a dense per-sequence cache
``[n, Hkv, T, D]`` (``DynamicCache``): ``scaled_dot_product_attention(q, k, v,
enable_gqa=True)``, the path ``sdpa_attention_forward`` takes when the mask is
None (no padding); it is several times faster on CPU than the older
``repeat_kv`` expansion, so it is the peer at its best. Ours: the same keys and
values in a paged pool (block size 16, blocks at random places of the pool).

Best-of-N: n sequences forked from one prompt; the dense peer holds n copies of
the prompt's K/V (as HF's expanded cache does), ours holds one, shared by the
block tables, and is timed without and with ``prefix_lens``.

Floor: every K/V byte the step needs, read once (for best-of-N the prompt
counted once); GB/s = floor bytes / our time, against the measured copy bandwidth.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.attention import paged_attention
from .timing import bench_row, compare, copy_bandwidth_gbs

BLOCK = 16
# (n, H, Hkv, D, T): beams over one context length each.
CPU_SHAPES = [(8, 32, 8, 64, 256), (8, 32, 8, 128, 1024), (8, 32, 8, 128, 2048)]
# (n, H, Hkv, D, prompt, own): best-of-N.
CPU_SHARED = [(64, 32, 8, 64, 1024, 64)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def to_paged(k_dense: list[torch.Tensor], v_dense: list[torch.Tensor], P: int, gen: torch.Generator,
             shared: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Pool + block tables holding the given per-sequence K/V ([Hkv, T_i, D] each).

    With ``shared = (k, v)`` ([Hkv, S, D], S a multiple of P) every sequence's
    first S tokens are those blocks, stored once; its own tokens follow.
    """
    Hkv, _, D = k_dense[0].shape
    own = [k.shape[1] for k in k_dense]
    S = 0 if shared is None else shared[0].shape[1]
    nshared = S // P
    nown = [(t + P - 1) // P for t in own]
    num_blocks = nshared + sum(nown)
    perm = torch.randperm(num_blocks, generator=gen)
    kc = torch.zeros(num_blocks, Hkv, P, D, dtype=k_dense[0].dtype)
    vc = torch.zeros_like(kc)

    def put(ids, k, v):
        T = k.shape[1]
        pad = len(ids) * P - T
        kb = F.pad(k, (0, 0, 0, pad)).view(Hkv, len(ids), P, D).transpose(0, 1)
        vb = F.pad(v, (0, 0, 0, pad)).view(Hkv, len(ids), P, D).transpose(0, 1)
        kc[ids] = kb
        vc[ids] = vb

    table = torch.full((len(k_dense), nshared + max(nown)), -1, dtype=torch.int32)
    shared_ids = perm[:nshared]
    if nshared:
        put(shared_ids, *shared)
    used = nshared
    for i, (k, v) in enumerate(zip(k_dense, v_dense)):
        ids = perm[used:used + nown[i]]
        used += nown[i]
        put(ids, k, v)
        table[i, :nshared] = shared_ids.int()
        table[i, nshared:nshared + nown[i]] = ids.int()
    lens = torch.tensor([S + t for t in own], dtype=torch.int32)
    return kc, vc, table, lens


def sdpa_peer(q4: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)


def _check(ours: torch.Tensor, peer: torch.Tensor, what: str) -> None:
    tol = 1e-4 if ours.dtype == torch.float32 else 3e-2
    if not torch.allclose(ours.float(), peer.float().reshape(ours.shape), rtol=tol, atol=tol):
        raise AssertionError(f"paged_attention disagrees with the dense SDPA peer at {what}")


def bench_case(n, H, Hkv, D, T, dtype, device="cpu", rounds=5, iters=10, copy_gbs=None) -> dict:
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(n, Hkv, T, D, generator=gen).to(dtype)
    v = torch.randn(n, Hkv, T, D, generator=gen).to(dtype)
    q = torch.randn(n, H, D, generator=gen).to(dtype)
    kc, vc, bt, lens = to_paged(list(k), list(v), BLOCK, gen)
    k, v, q, kc, vc, bt, lens = (t.to(device) for t in (k, v, q, kc, vc, bt, lens))
    q4 = q[:, :, None]
    ours = lambda: paged_attention(q, kc, vc, bt, lens)  # noqa: E731
    peer = lambda: sdpa_peer(q4, k, v)  # noqa: E731
    _check(ours(), peer(), (n, H, Hkv, D, T, dtype))
    res = compare(peer, ours, device=device, rounds=rounds, iters=iters)
    floor = 2 * k.numel() * k.element_size()
    copy_gbs = copy_gbs or copy_bandwidth_gbs(floor, device)
    return bench_row("paged_attention", f"n={n} H={H}/{Hkv} D={D} T={T}", dtype, device, "dense SDPA (GQA)",
                     res, floor, copy_gbs)


def bench_shared(n, H, Hkv, D, prompt, own, dtype, device="cpu", rounds=5, iters=10, copy_gbs=None) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    kp = torch.randn(Hkv, prompt, D, generator=gen).to(dtype)
    vp = torch.randn(Hkv, prompt, D, generator=gen).to(dtype)
    ko = torch.randn(n, Hkv, own, D, generator=gen).to(dtype)
    vo = torch.randn(n, Hkv, own, D, generator=gen).to(dtype)
    q = torch.randn(n, H, D, generator=gen).to(dtype)
    kc, vc, bt, lens = to_paged(list(ko), list(vo), BLOCK, gen, shared=(kp, vp))
    k = torch.cat([kp.expand(n, -1, -1, -1), ko], dim=2)  # the dense cache: n copies of the prompt
    v = torch.cat([vp.expand(n, -1, -1, -1), vo], dim=2)
    pre = torch.full((n,), prompt // BLOCK * BLOCK, dtype=torch.int32)
    k, v, q, kc, vc, bt, lens, pre = (t.to(device) for t in (k, v, q, kc, vc, bt, lens, pre))
    q4 = q[:, :, None]
    peer = lambda: sdpa_peer(q4, k, v)  # noqa: E731
    plain = lambda: paged_attention(q, kc, vc, bt, lens)  # noqa: E731
    shared = lambda: paged_attention(q, kc, vc, bt, lens, prefix_lens=pre)  # noqa: E731
    what = (n, H, Hkv, D, prompt, own, dtype)
    _check(plain(), peer(), what)
    _check(shared(), peer(), what)
    floor = 2 * (kp.numel() + ko.numel()) * kp.element_size()
    copy_gbs = copy_gbs or copy_bandwidth_gbs(floor, device)
    shape = f"best-of-N n={n} H={H}/{Hkv} D={D} prompt={prompt} own={own}"
    rows = []
    for name, fn in (("paged_attention", plain), ("paged_attention[prefix_lens]", shared)):
        res = compare(peer, fn, device=device, rounds=rounds, iters=iters)
        rows.append(bench_row(name, shape, dtype, device, "dense SDPA (GQA)", res, floor, copy_gbs))
    return rows


def run(device="cpu", shapes=None, shared_shapes=None, dtypes=("fp32", "bf16"), rounds=5, iters=10) -> list[dict]:
    device = torch.device(device)
    shapes = CPU_SHAPES if shapes is None else shapes
    shared_shapes = CPU_SHARED if shared_shapes is None else shared_shapes
    copy_gbs = copy_bandwidth_gbs(64 << 20, device)
    rows = []
    for name in dtypes:
        for s in shapes:
            rows.append(bench_case(*s, DTYPES[name], device, rounds, iters, copy_gbs))
        for s in shared_shapes:
            rows.extend(bench_shared(*s, DTYPES[name], device, rounds, iters, copy_gbs))
    return rows
