"""Triton copy-on-write block copy of PagedKVCache, in the Triton interpreter (CPU tensors).

Runs in a child process started with ``TRITON_INTERPRET=1`` (see
tests/test_triton_beam_topk.py for why). The child checks the kernel against
plain indexing on random pools and masks (fp32, odd block geometry, repeated
sources, an empty mask), then runs a deferred-mode (CUDA-style, no host read)
cache whose copy-on-write goes through the kernel: fork one parent four times
mid-block, step every child, and compare every sequence with what was written.
"""
from __future__ import annotations

import os
import sys



def _child() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch

    from tts_kernels.cache import PagedKVCache
    from tts_kernels.cache import _paged_ops as ops
    from tts_kernels.triton import paged_cache as tpc

    from child_process import record, report

    results = {"_interpreted": type(tpc._copy_blocks_kernel).__name__ == "InterpretedFunction"}

    def kernel_vs_indexing():
        torch.manual_seed(0)
        for L, NB, H, P, D, C in [(2, 9, 3, 5, 7, 6), (1, 4, 1, 1, 1, 3), (3, 23, 2, 16, 40, 10)]:
            k, v = torch.randn(L, NB + 1, H, P, D), torch.randn(L, NB + 1, H, P, D)
            # As in the cache: sources are shared blocks (may repeat), destinations are distinct
            # blocks fresh from the free list, never a source.
            perm = torch.randperm(NB)
            dst = perm[:C]
            src = perm[C:][torch.randint(0, NB - C, (C,))]
            mask = torch.rand(C) < 0.5
            ek, ev = k.clone(), v.clone()
            sel = mask.nonzero().flatten()
            ek[:, dst[sel]] = k[:, src[sel]]
            ev[:, dst[sel]] = v[:, src[sel]]
            tpc.copy_blocks_triton(k, v, src, dst, mask)
            assert torch.equal(k, ek) and torch.equal(v, ev), (L, NB, H, P, D, C)
        k0 = k.clone()
        tpc.copy_blocks_triton(k, v, src, dst, torch.zeros(C, dtype=torch.bool))
        assert torch.equal(k, k0)

    def deferred_cache_cow():
        torch.manual_seed(1)
        ops.masked_copy = tpc.copy_blocks_triton  # what CUDA tensors take
        L, H, D, P = 2, 2, 3, 4
        c = PagedKVCache(L, H, D, num_blocks=16, block_size=P, strict=False)
        assert c.backend == "torch"
        a = c.allocate(1)
        hist = [(torch.randn(1, H, 6, D), torch.randn(1, H, 6, D)) for _ in range(L)]
        for layer in range(L):
            c.append(layer, a, *hist[layer])
        kids = c.fork(a.repeat(4))
        ids = torch.cat([kids, a])
        new = [(torch.randn(5, H, 3, D), torch.randn(5, H, 3, D)) for _ in range(L)]
        free_before = c.num_free_blocks
        for layer in range(L):
            c.append(layer, ids, *new[layer])
        # 5 holders of the shared tail block, all in the step: 4 copies + the last keeps it,
        # plus one fresh block each for tokens 8..8 (6 + 3 = 9 tokens > 2 blocks of 4).
        assert free_before - c.num_free_blocks == 4 + 5, (free_before, c.num_free_blocks)
        for layer in range(L):
            k, v = c.gather(layer, ids)
            for r in range(5):
                assert torch.equal(k[r, :, :6], hist[layer][0][0]) and torch.equal(k[r, :, 6:], new[layer][0][r])
                assert torch.equal(v[r, :, :6], hist[layer][1][0]) and torch.equal(v[r, :, 6:], new[layer][1][r])

    record(results, "kernel_vs_indexing", kernel_vs_indexing)
    record(results, "deferred_cache_cow", deferred_cache_cow)
    report(results)


if __name__ == "__main__":
    _child()
    sys.exit(0)


import pytest  # noqa: E402

pytest.importorskip("triton")

from child_process import compile_for_hopper  # noqa: E402

def test_kernel_is_interpreted(child_results):
    assert child_results["_interpreted"]


@pytest.mark.parametrize("name", ["kernel_vs_indexing", "deferred_cache_cow"])
def test_case(child_results, name):
    assert child_results[name]["verdict"] == "ok", child_results[name]["verdict"]


@pytest.mark.parametrize("dt", ["fp32", "bf16", "fp16"])
def test_kernel_compiles_for_hopper(dt):
    """The interpreter skips Triton's compiler; compile the kernel to sm_90 cubin without a GPU."""
    from tts_kernels.triton import paged_cache as tpc

    sig = dict(k_ptr=f"*{dt}", v_ptr=f"*{dt}", src_ptr="*i64", dst_ptr="*i64", mask_ptr="*i8",
               layer_stride="i64", block_elems="i32", CHUNK="constexpr")
    kernel = compile_for_hopper(tpc._copy_blocks_kernel, sig, {"CHUNK": tpc._CHUNK}, num_warps=4)
    assert "cubin" in kernel.asm
