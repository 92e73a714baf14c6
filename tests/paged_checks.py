"""Shared inputs and tolerances for paged_attention backends (CPU, Triton interpreter)."""
import torch

# Tolerances per dtype. Every backend converts K, V and the query to float32
# and accumulates in float32; what differs from the reference is the order of
# the sums (tiles, online-softmax rescaling), a polynomial exp (~2e-7 relative)
# and the scale applied to q instead of to the scores: a few fp32 ulp on
# outputs that are convex combinations of O(1) values. 16-bit outputs are both
# rounded to the dtype at the end, so they may differ by one unit in the last
# place: 2**-8 relative for bfloat16, 2**-11 for float16 (plus a little for a
# value that sits on a rounding boundary), and an absolute floor for outputs
# near zero.
TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}


def make_case(n, H, Hkv, D, P, lens, dtype=torch.float32, *, spare_blocks=3, garbage="mixed", gen=None):
    """Random paged cache with every sequence's blocks at random places of the pool.

    Table entries past ceil(L / P) hold garbage the kernels must never read:
    -1, ids far out of range, or stale ids of other sequences' blocks.
    Returns (query, k_cache, v_cache, block_tables, seq_lens).
    """
    gen = gen or torch.Generator().manual_seed(0)
    need = [(L + P - 1) // P for L in lens]
    max_blocks = max(need + [1]) + 2
    num_blocks = sum(need) + spare_blocks
    k_cache = torch.randn(num_blocks, Hkv, P, D, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, Hkv, P, D, generator=gen).to(dtype)
    query = torch.randn(n, H, D, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.empty(n, max_blocks, dtype=torch.int32)
    used = 0
    for i, nb in enumerate(need):
        table[i, :nb] = perm[used:used + nb].int()
        used += nb
        rest = max_blocks - nb
        if garbage == "mixed":
            junk = torch.tensor([-1, 2**30, -(2**31)] * max_blocks, dtype=torch.int32)[:rest]
            stale = torch.randint(0, num_blocks, (rest,), generator=gen, dtype=torch.int32)
            table[i, nb:] = torch.where(torch.rand(rest, generator=gen) < 0.5, junk, stale)
        else:
            table[i, nb:] = garbage
    return query, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32)


def poison_past_length(k_cache, v_cache, table, lens):
    """NaN in every pool slot no row holds (past each row's length, and blocks no row uses): what an
    uninitialised pool may hold. A kernel that reads one, even to multiply it by zero, returns NaN."""
    P = k_cache.shape[2]
    live = torch.zeros(k_cache.shape[0], P, dtype=torch.bool)
    for i, L in enumerate(lens.tolist()):
        for pos in range(L):
            live[table[i, pos // P], pos % P] = True
    k, v = k_cache.clone(), v_cache.clone()
    k[~live[:, None, :, None].expand_as(k)] = float("nan")
    v[~live[:, None, :, None].expand_as(v)] = float("nan")
    return k, v


def make_shared_case(groups, H, Hkv, D, P, dtype=torch.float32, gen=None):
    """Best-of-N layout: ``groups`` is a list of (rows, prompt_len, own_lens) where
    the group's rows share the prompt's full blocks (copy-on-write forks: the
    partial last prompt block is copied into each row's own first block).

    Returns (query, k_cache, v_cache, block_tables, seq_lens, prefix_lens) with
    prefix_lens = the prompt rounded down to a multiple of P.
    """
    gen = gen or torch.Generator().manual_seed(0)
    rows, lens, pres = [], [], []
    next_block = 0
    for count, prompt, own in groups:
        shared = prompt // P
        prompt_blocks = list(range(next_block, next_block + shared))
        next_block += shared
        for r in range(count):
            L = prompt + own[r]
            nb = (L + P - 1) // P
            mine = list(range(next_block, next_block + nb - shared))
            next_block += nb - shared
            rows.append(prompt_blocks + mine)
            lens.append(L)
            pres.append(shared * P)
    num_blocks = next_block + 2
    max_blocks = max(len(r) for r in rows) + 1
    perm = torch.randperm(num_blocks, generator=gen).int()
    table = torch.full((len(rows), max_blocks), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        table[i, :len(r)] = perm[torch.tensor(r, dtype=torch.long)] if r else table[i, :0]
    k_cache = torch.randn(num_blocks, Hkv, P, D, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, Hkv, P, D, generator=gen).to(dtype)
    query = torch.randn(len(rows), H, D, generator=gen).to(dtype)
    return (query, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32),
            torch.tensor(pres, dtype=torch.int32))


def dense_attention(query, k_cache, v_cache, block_tables, seq_lens, scale=None, sliding_window=None):
    """Independent check of the reference: gather each sequence's K/V into dense
    [1, Hkv, L, D] tensors and run scaled_dot_product_attention with GQA, with the
    sliding-window mask written the transformers way (key kv visible iff kv > q - W)."""
    n, H, D = query.shape
    P = k_cache.shape[2]
    out = torch.zeros(n, H, D, dtype=torch.float64)
    for i in range(n):
        L = int(seq_lens[i])
        if L == 0:
            continue
        idx = [(int(block_tables[i, t // P]), t % P) for t in range(L)]
        k = torch.stack([k_cache[b, :, o] for b, o in idx], dim=1).double()[None]  # [1, Hkv, L, D]
        v = torch.stack([v_cache[b, :, o] for b, o in idx], dim=1).double()[None]
        q = query[i].double()[None, :, None]  # [1, H, 1, D]
        qpos = L - 1
        kv = torch.arange(L)
        mask = kv <= qpos
        if sliding_window is not None:
            mask &= kv > qpos - sliding_window
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[None, None, None], scale=scale, enable_gqa=True)
        out[i] = o[0, :, 0]
    return out
