"""Copy-on-write block copies of ``PagedKVCache`` on CUDA, without a host read.

The tensor-op backend (``cache/_paged_ops.py``) decides on the device which
shared blocks a step must copy; the number of copies is data, so a torch
indexing op would either read it back (a sync) or copy every candidate. This
kernel gets the candidate list with its mask and copies only the masked-in
blocks: grid ``(candidates, layers)``, a program whose mask entry is false
returns at once, so the bytes moved are exactly the copies needed.

Meaning: for each candidate ``c`` with ``mask[c]``, and every layer ``l``::

    k_pool[l, dst[c]] = k_pool[l, src[c]];  v_pool[l, dst[c]] = v_pool[l, src[c]]

Pools ``[L, NB+1, H, P, D]`` contiguous; ``src, dst [C]`` int64; ``mask [C]`` bool.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per iteration: 4 KB of fp32 (2 KB of bf16) per program step, i.e. 8
# fp32 elements per thread at 4 warps: two 16-byte loads in flight per thread.
_CHUNK = 1024


@triton.jit
def _copy_blocks_kernel(k_ptr, v_ptr, src_ptr, dst_ptr, mask_ptr, layer_stride, block_elems,
                        CHUNK: tl.constexpr):
    c = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    if tl.load(mask_ptr + c) != 0:
        src = tl.load(src_ptr + c)
        dst = tl.load(dst_ptr + c)
        base = layer * layer_stride
        for off in range(0, block_elems, CHUNK):
            idx = off + tl.arange(0, CHUNK)
            m = idx < block_elems
            x = tl.load(k_ptr + base + src * block_elems + idx, mask=m)
            tl.store(k_ptr + base + dst * block_elems + idx, x, mask=m)
            y = tl.load(v_ptr + base + src * block_elems + idx, mask=m)
            tl.store(v_ptr + base + dst * block_elems + idx, y, mask=m)


def copy_blocks_triton(k_pool: torch.Tensor, v_pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                       mask: torch.Tensor) -> None:
    """Copy block ``src[c]`` to ``dst[c]`` on every layer of both pools where ``mask[c]``."""
    C = src.shape[0]
    if C == 0:
        return
    L = k_pool.shape[0]
    assert k_pool.is_contiguous() and v_pool.is_contiguous() and k_pool.shape == v_pool.shape
    block_elems = k_pool[0, 0].numel()
    _copy_blocks_kernel[(C, L)](k_pool, v_pool, src.contiguous(), dst.contiguous(),
                                mask.to(torch.int8).contiguous(), k_pool.stride(0), block_elems, CHUNK=_CHUNK)
