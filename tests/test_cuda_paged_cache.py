"""PagedKVCache on CUDA (tensor-op bookkeeping, Triton copy-on-write) against the CPU cache.

Both backends make the same decisions, so the same calls must leave identical
state (block ids included) and contents. Also checks that append/fork/reorder
never synchronise with the host in the default (deferred-error) CUDA mode.
"""
import pytest
import torch

from tts_kernels.cache import CacheError, PagedKVCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

L, H, D, P = 3, 4, 64, 16


def _pair(dtype):
    kw = dict(num_blocks=256, block_size=P, max_seqs=64, max_seq_len=1024, dtype=dtype)
    return PagedKVCache(L, H, D, device="cpu", **kw), PagedKVCache(L, H, D, device="cuda", **kw)


def _same(cpu, gpu):
    a, b = cpu._st, gpu._st
    n_free = int(a.n_free)
    assert int(b.n_free) == n_free
    for x, y in [(a.tables[:-1], b.tables[:-1]), (a.held[:-1], b.held[:-1]), (a.lens[:-1], b.lens[:-1]),
                 (a.refs[:-1], b.refs[:-1]), (a.alive[:-1], b.alive[:-1]), (a.stack[:n_free], b.stack[:n_free])]:
        assert torch.equal(x, y.cpu())
    assert torch.equal(a.k_pool[:, :-1], b.k_pool[:, :-1].cpu())
    assert torch.equal(a.v_pool[:, :-1], b.v_pool[:, :-1].cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_cache_matches_cpu_cache(dtype):
    torch.manual_seed(0)
    cpu, gpu = _pair(dtype)
    assert gpu.backend == "torch" and not gpu.strict

    def both(fn):
        ra, rb = fn(cpu, "cpu"), fn(gpu, "cuda")
        if isinstance(ra, torch.Tensor):
            assert torch.equal(ra, rb.cpu())
        return ra

    def step(ids, t, start=None):
        for layer in range(L):
            k, v = torch.randn(len(ids), H, t, D, dtype=dtype), torch.randn(len(ids), H, t, D, dtype=dtype)
            both(lambda c, d: c.append(layer, ids.to(d), k.to(d), v.to(d),
                                       start=None if start is None else start.to(d)))

    root = both(lambda c, d: c.allocate(3))
    step(root, 37, start=torch.tensor([0, 5, 36]))
    kids = both(lambda c, d: c.fork(root.to(d).repeat_interleave(4)))
    for i in range(20):
        step(kids, 1)
        par = kids[torch.randint(0, 12, (12,))]
        both(lambda c, d: c.reorder(kids.to(d), par.to(d)))
        _same(cpu, gpu)
    both(lambda c, d: c.free(root.to(d)))
    step(kids, 19)
    _same(cpu, gpu)
    for layer in range(L):
        a, b = cpu.gather(layer, kids), gpu.gather(layer, kids.cuda())
        assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())


def test_cuda_step_does_not_sync():
    _, gpu = _pair(torch.bfloat16)
    ids = gpu.allocate(8)
    kv = torch.randn(8, H, 1, D, device="cuda", dtype=torch.bfloat16)
    for layer in range(L):
        gpu.append(layer, ids, kv, kv)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        par = ids.flip(0)
        gpu.reorder(ids, par)
        kids = gpu.fork(ids[:2])
        for layer in range(L):
            gpu.append(layer, ids, kv, kv)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert gpu.lengths(ids).tolist() == [2] * 8 and kids.numel() == 2


def test_cuda_refused_call_reported_late():
    _, gpu = _pair(torch.float32)
    ids = gpu.allocate(2)
    gpu.reorder(ids, torch.tensor([0, 50], device="cuda"))
    with pytest.raises(CacheError, match="reported late"):
        gpu.check()
