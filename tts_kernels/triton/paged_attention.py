"""``paged_attention`` in Triton: decode attention over a paged KV cache.

Meaning (see :func:`tts_kernels.reference.paged_attention_ref`)::

    out[i, h] = softmax_t(scale * <q[i, h], K_i[t, g]>) @ V_i[t, g],   t in [lo_i, L_i)
    g = h // (H // Hkv),  K_i[t] = k_cache[block_tables[i, t // P], :, t % P, :]

Shapes: ``query [n, H, D]``, ``k_cache``/``v_cache [num_blocks, Hkv, P, D]``
contiguous, ``block_tables [n, max_blocks]`` int32, ``seq_lens [n]`` int32.

``_paged_attn_kernel``, grid ``(n, Hkv)``: program ``(i, g)`` loads the GQA
group's ``H // Hkv`` query heads as one tile ``[GQ_PAD, D_PAD]`` and streams the
sequence's positions in tiles of ``BLOCK_N`` tokens, gathering each token's row
through the block table (any block size, also 1 or 5), so every K/V row is read
once per kv head. Scores and ``p @ V`` are ``tl.dot`` s; an online softmax
(running max, running sum, unnormalised accumulator) is kept per head.

Shared prefix (``prefix_lens``): groups of consecutive rows with the same
prefix (see :func:`tts_kernels.paged_attention`) are found on the device with a
few tensor ops (no host sync). ``_prefix_attn_kernel``, grid ``(n, Hkv)``: the
program of each chunk leader (a group's first row, then every
``rows_per_chunk``-th) loads the queries of up to ``rows_per_chunk`` sequences
of its group as one ``[rows * GQ_PAD, D_PAD]`` tile and runs them over the
prefix positions, reading each shared K/V row once per chunk instead of once per
sequence; it writes the partial softmax states. ``_paged_attn_kernel`` then
starts from that state and continues over the sequence's own positions, which
is the log-sum-exp merge of the two partial results.

Not done: split-K over positions for long sequences with few rows (a program
per (sequence, kv head) leaves SMs idle when n * Hkv is small).

On CPU tensors the kernels run in the Triton interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before this module is imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens per tile: 64 rows of D = 128 is 16 KB of bf16 per K and V tile, which
# with a query tile of up to 64 rows fits in registers / shared memory at 4 warps.
_BLOCK_N = 64
# Query rows per prefix chunk (rows of the tile = sequences * GQ_PAD): 64 rows
# keeps the accumulator [64, D] fp32 at 64 registers per thread for D = 128.
_PREFIX_ROWS = 64


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@triton.jit
def _tile_scores(q, k_ptr, v_ptr, table_ptr, pos, pos_ok, kvh, Hkv, P, D, d, dmask, scale, IEEE: tl.constexpr):
    """Gather the K/V rows of positions ``pos`` and return (scale * q @ K^T, V)."""
    blk = tl.load(table_ptr + pos // P, mask=pos_ok, other=0).to(tl.int64)
    row = ((blk * Hkv + kvh) * P + pos % P) * D
    m2 = pos_ok[:, None] & dmask[None, :]
    k = tl.load(k_ptr + row[:, None] + d[None, :], mask=m2, other=0.0)
    v = tl.load(v_ptr + row[:, None] + d[None, :], mask=m2, other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s * scale, v


@triton.jit
def _online_update(m, l, acc, s, valid, v, IEEE: tl.constexpr):
    """One tile of the online softmax; rows with nothing valid so far stay (-inf, 0, 0)."""
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # never -inf - -inf
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc


@triton.jit
def _paged_attn_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, bt_stride, lens_ptr, pre_ptr, st_m_ptr, st_l_ptr, st_acc_ptr, out_ptr,
    scale, window, H, Hkv, P, D,
    GQ: tl.constexpr, GQ_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (i, kvh): heads kvh*GQ .. kvh*GQ+GQ-1 of sequence i over [max(pre_i, lo_i), L_i)."""
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    L = tl.load(lens_ptr + i)
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(L - window, 0)
    g = tl.arange(0, GQ_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < GQ
    dmask = d < D
    rows = i.to(tl.int64) * H + kvh * GQ + g
    q = tl.load(q_ptr + rows[:, None] * D + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    if HAS_PREFIX:
        start = tl.maximum(start, tl.load(pre_ptr + i))
        m = tl.load(st_m_ptr + rows, mask=gmask, other=float("-inf"))
        l = tl.load(st_l_ptr + rows, mask=gmask, other=0.0)
        acc = tl.load(st_acc_ptr + rows[:, None] * D_PAD + d[None, :], mask=gmask[:, None], other=0.0)
    else:
        m = tl.full([GQ_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GQ_PAD], tl.float32)
        acc = tl.zeros([GQ_PAD, D_PAD], tl.float32)
    table = bt_ptr + i.to(tl.int64) * bt_stride
    offs = tl.arange(0, BLOCK_N)
    for t0 in range(start, L, BLOCK_N):
        pos = t0 + offs
        ok = pos < L
        s, v = _tile_scores(q, k_ptr, v_ptr, table, pos, ok, kvh, Hkv, P, D, d, dmask, scale, IEEE)
        m, l, acc = _online_update(m, l, acc, s, ok[None, :], v, IEEE)
    out = acc / tl.where(l > 0.0, l, 1.0)[:, None]  # an empty range gives zeros
    tl.store(out_ptr + rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _prefix_attn_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, bt_stride, lens_ptr, pre_ptr, cnt_ptr, st_m_ptr, st_l_ptr, st_acc_ptr,
    scale, window, H, Hkv, P, D,
    GQ: tl.constexpr, GQ_PAD: tl.constexpr, ROWS: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (i, kvh): if row i leads a chunk of cnt_i rows of one group, run their
    queries over the group's prefix [0, pre_i) and store the partial softmax states."""
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    cnt = tl.load(cnt_ptr + i)
    if cnt > 0:
        pre = tl.load(pre_ptr + i)
        r = tl.arange(0, ROWS * GQ_PAD)
        seq = i + r // GQ_PAD
        g = r % GQ_PAD
        rmask = (r // GQ_PAD < cnt) & (g < GQ)
        d = tl.arange(0, D_PAD)
        dmask = d < D
        rows = seq.to(tl.int64) * H + kvh * GQ + g
        q = tl.load(q_ptr + rows[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        lo = tl.zeros([ROWS * GQ_PAD], tl.int32)
        if HAS_WINDOW:
            L = tl.load(lens_ptr + seq, mask=rmask, other=0)
            lo = tl.maximum(L - window, 0)
        begin = tl.min(tl.where(rmask, lo, pre), 0)
        m = tl.full([ROWS * GQ_PAD], float("-inf"), tl.float32)
        l = tl.zeros([ROWS * GQ_PAD], tl.float32)
        acc = tl.zeros([ROWS * GQ_PAD, D_PAD], tl.float32)
        table = bt_ptr + i.to(tl.int64) * bt_stride  # the group's prefix entries are the same in every row
        offs = tl.arange(0, BLOCK_N)
        for t0 in range(begin, pre, BLOCK_N):
            pos = t0 + offs
            ok = pos < pre
            s, v = _tile_scores(q, k_ptr, v_ptr, table, pos, ok, kvh, Hkv, P, D, d, dmask, scale, IEEE)
            valid = ok[None, :] & (pos[None, :] >= lo[:, None])
            m, l, acc = _online_update(m, l, acc, s, valid, v, IEEE)
        tl.store(st_m_ptr + rows, m, mask=rmask)
        tl.store(st_l_ptr + rows, l, mask=rmask)
        tl.store(st_acc_ptr + rows[:, None] * D_PAD + d[None, :], acc, mask=rmask[:, None])


def _prefix_plan(block_tables, seq_lens, prefix_lens, P: int, rows_per_chunk: int):
    """Device tensors (no host sync): per row its group prefix length (0 outside a
    group of >= 2 rows) and, for chunk leaders, the chunk's row count (else 0)."""
    n, MB = block_tables.shape
    dev = block_tables.device
    L = seq_lens.long()
    pre = torch.minimum(prefix_lens.long().clamp(min=0), L)
    idx = torch.arange(n, device=dev)
    nb = (pre + P - 1) // P
    need = torch.arange(MB, device=dev)[None, :] < nb[1:, None]
    same_ids = ((block_tables[1:] == block_tables[:-1]) | ~need).all(dim=1)
    same = same_ids & (pre[1:] == pre[:-1]) & (pre[1:] > 0)
    start = torch.cat([torch.ones(1, dtype=torch.bool, device=dev), ~same])
    gid = torch.cumsum(start.long(), 0) - 1
    gstart = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), 0).values
    gsize = torch.zeros(n, dtype=torch.long, device=dev).scatter_add_(0, gid, torch.ones_like(gid))[gid]
    rank = idx - gstart
    shared = gsize >= 2
    lead = shared & (rank % rows_per_chunk == 0)
    cnt = torch.where(lead, torch.clamp(gsize - rank, max=rows_per_chunk), torch.zeros_like(rank))
    return torch.where(shared, pre, torch.zeros_like(pre)).int(), cnt.int()


def _is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def paged_attention_triton(query, k_cache, v_cache, block_tables, seq_lens, scale: float,
                           sliding_window: int | None = None, prefix_lens: torch.Tensor | None = None):
    """Triton ``paged_attention``. Arguments are assumed valid (``tts_kernels.ops.attention``
    checks them)."""
    if query.device.type != "cuda" and not _is_interpreted(_paged_attn_kernel):
        raise RuntimeError(
            "the Triton paged_attention kernels run on CUDA tensors, or on CPU tensors when "
            "TRITON_INTERPRET=1 was set before tts_kernels.triton.paged_attention was imported"
        )
    n, H, D = query.shape
    Hkv, P = k_cache.shape[1], k_cache.shape[2]
    GQ = H // Hkv
    # tl.dot needs every tile dimension >= 16.
    GQ_PAD = max(16, _next_pow2(GQ))
    D_PAD = max(16, _next_pow2(D))
    query = query.contiguous()
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    out = torch.empty_like(query)
    if n == 0:
        return out
    bt_stride = block_tables.stride(0)
    # fp32 dots in IEEE fp32 (tf32 would round the inputs to 10 bits); 16-bit
    # caches use the native tensor-core dot with fp32 accumulation.
    ieee = query.dtype == torch.float32
    has_window = sliding_window is not None
    window = int(sliding_window) if has_window else 0
    # FMA contraction is welcome here (no exactness promised beyond fp32 rounding).
    launch = dict(num_warps=4, enable_fp_fusion=True)
    common = dict(GQ=GQ, D_PAD=D_PAD, BLOCK_N=_BLOCK_N, HAS_WINDOW=has_window, IEEE=ieee)
    if prefix_lens is None:
        dummy = seq_lens
        _paged_attn_kernel[(n, Hkv)](
            query, k_cache, v_cache, block_tables, bt_stride, seq_lens, dummy, dummy, dummy, dummy, out,
            scale, window, H, Hkv, P, D, GQ_PAD=GQ_PAD, HAS_PREFIX=False, **common, **launch,
        )
        return out
    gq_pad = _next_pow2(GQ)
    rows = max(1, _PREFIX_ROWS // gq_pad)
    rows = max(rows, -(-16 // gq_pad))  # the chunk tile needs >= 16 rows for tl.dot
    pre, cnt = _prefix_plan(block_tables, seq_lens, prefix_lens, P, rows)
    st_m = torch.full((n * H,), float("-inf"), device=query.device, dtype=torch.float32)
    st_l = torch.zeros(n * H, device=query.device, dtype=torch.float32)
    st_acc = torch.zeros(n * H, D_PAD, device=query.device, dtype=torch.float32)
    _prefix_attn_kernel[(n, Hkv)](
        query, k_cache, v_cache, block_tables, bt_stride, seq_lens, pre, cnt, st_m, st_l, st_acc,
        scale, window, H, Hkv, P, D, GQ_PAD=gq_pad, ROWS=rows, **common, **launch,
    )
    _paged_attn_kernel[(n, Hkv)](
        query, k_cache, v_cache, block_tables, bt_stride, seq_lens, pre, st_m, st_l, st_acc, out,
        scale, window, H, Hkv, P, D, GQ_PAD=GQ_PAD, HAS_PREFIX=True, **common, **launch,
    )
    return out
