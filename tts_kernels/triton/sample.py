"""``sample`` in Triton: one program per row, streaming the vocabulary in tiles.

Meaning (see :func:`tts_kernels.reference.sample_ref`)::

    x = logits.float() / T (NaN, +inf -> -inf);  m = max x;  e = exp(x - m)
    top-k : keep key(x) >= t_k,  t_k = max{t : #(key >= t) >= k}
    top-p : keep key(x) >= t_p,  t_p = min{t : G(t) < top_p * Z_k},
            G(t) = sum(e_u : key_u > t, key_u >= t_k),  Z_k = G(-inf)
    min-p : keep e >= min_p (the most probable tokens always kept)
    token = argmax over kept v of e_v / E_v,  E_v = -log u(seed, offset, r, v)
    logprob = (x_token - m) - log(sum of kept e)

``key`` is the float's bits made order-preserving as a signed int, so the
thresholds are searched over integers: each search pass reads the row once and
counts (top-k) or sums (top-p) against ``NPIV`` pivots at a time, narrowing the
key interval ``NPIV + 1``-fold, so about 8 passes pin a 32-bit key exactly. No
sort of the vocabulary, no data-dependent shapes, no host read: seeds, offsets
and every per-row parameter are loaded on the device.

Passes over a row: 1 (max and first argmax), then for top-k about 8, for top-p 1
(Z_k) plus about 8, then 1 (the race). Greedy and all -inf rows stop after the
first. The uniforms are ``tl.philox`` (Philox-4x32-10) on the counter
``(v >> 2, r, offset_lo, offset_hi)`` with key ``(seed_lo, seed_hi)``, word
``v & 3``: the same bits as the reference and the CPU kernel.

With ``stats`` (``sample(..., stats_k=k)``), ``_sample_stats_kernel`` runs the same
sampler body after the row's confidence statistics at temperature 1 (``_row_stats``:
the max, one pass of sums, the k-th largest by the same key search as top-k when
k < V, and the sum above it), in the same program, so the row is hot in cache when
the sampler reads it. ``_sample_kernel`` (no statistics) is unchanged.

On CPU tensors the kernel runs in the Triton interpreter, which must be switched
on (``TRITON_INTERPRET=1``) before this module is imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Streaming tile (max pass and race pass): 1024 fp32 = 8 per thread at 4 warps.
_TILE = 1024
# Search passes hold an [NPIV, STILE] comparison: 16 x 256 = 32 values per thread.
_STILE = 256
_NPIV = 16
# Key of -inf: every sanitised value's key is >= this.
_KEY_NEGINF = tl.constexpr(-2139095041)
_INT32_MAX = tl.constexpr(2147483647)


@triton.jit
def _order_key(x):
    """int64 key with key(a) < key(b) iff a < b for floats; -0.0 and +0.0 share one."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.int64)


@triton.jit
def _load_x(row_ptr, idx, V, T, APPLY_T: tl.constexpr):
    mask = idx < V
    x = tl.load(row_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
    if APPLY_T:
        # The op divides exactly (true division); plain `/` may lower to an approximate divide.
        x = tl.math.div_rn(x, T)
    # NaN and +inf (overflow garbage, also from x / T) are never a choice.
    return tl.where((x != x) | (x == float("inf")), float("-inf"), x), mask


@triton.jit
def _param(ptr, stride, value, r, FROM_PTR: tl.constexpr):
    if FROM_PTR:
        return tl.load(ptr + r * stride)
    else:
        return tl.to_tensor(value)  # an int 1 arrives as a constexpr (specialisation)


@triton.jit
def _uniform(seed, offset, r, idx):
    """u(seed, offset, r, v) for token indices ``idx``: 23-bit uniforms in (0, 1)."""
    c0 = (idx >> 2).to(tl.uint32)
    zero = c0 * 0
    c1 = zero + r.to(tl.uint32)
    c2 = zero + (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
    j = idx & 3
    w = tl.where(j == 0, w0, tl.where(j == 1, w1, tl.where(j == 2, w2, w3)))
    return (((w >> 9) << 1) | 1).to(tl.float32) * 5.9604644775390625e-08  # 2**-24


@triton.jit
def _key_value(key):
    """The float whose :func:`_order_key` is ``key`` (the map is its own inverse on the bits)."""
    b = key.to(tl.int32)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.float32, bitcast=True)


@triton.jit
def _log1p(a):
    """log(1 + a) for a >= 0 to a few ulp: log(u) * a / (u - 1) with u = 1 + a rounded (Goldberg)."""
    u = 1.0 + a
    return tl.where(u == 1.0, a, tl.log(u) * (a / (u - 1.0)))


@triton.jit
def _kth_key(row_ptr, V, k, T, key_m, piv_j, soffs, APPLY_T: tl.constexpr, STILE: tl.constexpr,
             NPIV: tl.constexpr):
    """The order key of the row's k-th largest value (of ``x / T`` with ``APPLY_T``; ``0 < k < V``): the
    largest t with #(key >= t) >= k, found by an NPIV-way search (invariant: lo passes, hi fails).
    Top-k in the sampler and the statistics' top-k mean share it."""
    lo = key_m * 0 + _KEY_NEGINF
    hi = key_m + 1
    while hi - lo > 1:
        piv = lo + ((hi - lo) * piv_j) // (NPIV + 1)
        cnt = tl.zeros([NPIV], tl.int64)
        for t in range(0, V, STILE):
            x, mask = _load_x(row_ptr, t + soffs, V, T, APPLY_T)
            ge = (_order_key(x)[None, :] >= piv[:, None]) & mask[None, :]
            cnt += tl.sum(ge.to(tl.int64), 1)
        ok = cnt >= k
        lo = tl.maximum(lo, tl.max(tl.where(ok, piv, lo), 0))
        hi = tl.minimum(hi, tl.min(tl.where(ok, hi, piv), 0))
    return lo


@triton.jit
def _row_stats(row_ptr, V, k, out_ptr, TILE: tl.constexpr, STILE: tl.constexpr, NPIV: tl.constexpr):
    """Confidence, entropy and self-certainty of one row at temperature 1 (``sample_stats_ref``)
    into ``out_ptr[0:3]``. With y = x - m and Z = sum exp(y), lp = y - log Z::

        confidence = log Z - mean(k largest y)   (k-th largest by the key search of top-k)
        entropy = log Z - sum(e * y) / Z,  self-certainty = log Z - log V - mean(y)

    log Z = log1p(Z - 1), Z - 1 summed without the maximum's e = 1 (precise near a point
    mass). Passes: the max, the sums, about 8 for the k-th largest when k < V, the top sum.
    """
    offs = tl.arange(0, TILE)
    soffs = tl.arange(0, STILE)
    piv_j = tl.arange(0, NPIV).to(tl.int64) + 1
    m = float("-inf")
    for t in range(0, V, TILE):
        x, mask = _load_x(row_ptr, t + offs, V, 1.0, False)
        m = tl.maximum(m, tl.max(x, 0))
    dead = m == float("-inf")
    ms = tl.where(dead, 0.0, m)
    zr = 0.0  # sum of e below the maximum (finite x)
    s = 0.0  # sum of e * y there
    sy = 0.0  # sum of y over the row (-inf when a logit is -inf)
    nmax = 0  # tokens at the maximum
    for t in range(0, V, TILE):
        x, mask = _load_x(row_ptr, t + offs, V, 1.0, False)
        y = x - ms
        rest = (x < m) & (x > float("-inf"))
        e = tl.where(rest, tl.exp(y), 0.0)
        zr += tl.sum(e, 0)
        s += tl.sum(tl.where(rest, e * y, 0.0), 0)
        sy += tl.sum(tl.where(mask, y, 0.0), 0)
        nmax += tl.sum(((x == m) & mask).to(tl.int32), 0)
    # The k-th largest key: largest t with #(key >= t) >= k (as top-k in the sampler).
    key_m = _order_key(m)
    t_k = key_m * 0 + _KEY_NEGINF
    if k < V:
        t_k = _kth_key(row_ptr, V, k, 1.0, key_m, piv_j, soffs, False, STILE, NPIV)
    # Sum of the k largest y: those above the k-th largest value, then copies of it.
    above = 0.0
    n_above = 0
    for t in range(0, V, TILE):
        x, mask = _load_x(row_ptr, t + offs, V, 1.0, False)
        gt = (_order_key(x) > t_k) & mask
        above += tl.sum(tl.where(gt, x - ms, 0.0), 0)
        n_above += tl.sum(gt.to(tl.int32), 0)
    rem = k - n_above
    top = above + tl.where(rem > 0, rem.to(tl.float32) * (_key_value(t_k) - ms), 0.0)
    logz = _log1p((nmax - 1).to(tl.float32) + zr)
    vf = tl.to_tensor(V).to(tl.float32)  # V == 1 arrives as a constexpr
    kf = tl.to_tensor(k).to(tl.float32)
    conf = logz - top / kf
    ent = logz - s / (nmax.to(tl.float32) + zr)
    sc = logz - tl.log(vf) - sy / vf
    tl.store(out_ptr, tl.where(dead, float("nan"), conf))
    tl.store(out_ptr + 1, tl.where(dead, float("nan"), ent))
    tl.store(out_ptr + 2, tl.where(dead, float("nan"), sc))


@triton.jit
def _sample_kernel(
    logits_ptr, row_stride, V,
    t_ptr, t_stride, t_val, k_ptr, k_stride, k_val, p_ptr, p_stride, p_val,
    mp_ptr, mp_stride, mp_val, s_ptr, s_stride, s_val, o_ptr, o_stride, o_val,
    st_ptr, tokens_ptr, logprobs_ptr,
    T_PTR: tl.constexpr, K_PTR: tl.constexpr, P_PTR: tl.constexpr, MP_PTR: tl.constexpr,
    S_PTR: tl.constexpr, O_PTR: tl.constexpr, ST_PTR: tl.constexpr,
    TILE: tl.constexpr, STILE: tl.constexpr, NPIV: tl.constexpr,
):
    _sample_row(
        tl.program_id(0), logits_ptr, row_stride, V,
        t_ptr, t_stride, t_val, k_ptr, k_stride, k_val, p_ptr, p_stride, p_val,
        mp_ptr, mp_stride, mp_val, s_ptr, s_stride, s_val, o_ptr, o_stride, o_val,
        st_ptr, tokens_ptr, logprobs_ptr, T_PTR, K_PTR, P_PTR, MP_PTR, S_PTR, O_PTR, ST_PTR, TILE, STILE, NPIV,
    )


@triton.jit
def _sample_stats_kernel(
    logits_ptr, row_stride, V,
    t_ptr, t_stride, t_val, k_ptr, k_stride, k_val, p_ptr, p_stride, p_val,
    mp_ptr, mp_stride, mp_val, s_ptr, s_stride, s_val, o_ptr, o_stride, o_val,
    st_ptr, tokens_ptr, logprobs_ptr, stats_ptr, stats_k,
    T_PTR: tl.constexpr, K_PTR: tl.constexpr, P_PTR: tl.constexpr, MP_PTR: tl.constexpr,
    S_PTR: tl.constexpr, O_PTR: tl.constexpr, ST_PTR: tl.constexpr,
    TILE: tl.constexpr, STILE: tl.constexpr, NPIV: tl.constexpr,
):
    """``_sample_kernel`` plus the row's statistics (``stats_ptr [R, 3]``, ``1 <= stats_k <= V``),
    in the same program: the row is read for them right before the sampler reads it."""
    r = tl.program_id(0)
    _row_stats(logits_ptr + r.to(tl.int64) * row_stride, V, stats_k, stats_ptr + r.to(tl.int64) * 3,
               TILE, STILE, NPIV)
    _sample_row(
        r, logits_ptr, row_stride, V,
        t_ptr, t_stride, t_val, k_ptr, k_stride, k_val, p_ptr, p_stride, p_val,
        mp_ptr, mp_stride, mp_val, s_ptr, s_stride, s_val, o_ptr, o_stride, o_val,
        st_ptr, tokens_ptr, logprobs_ptr, T_PTR, K_PTR, P_PTR, MP_PTR, S_PTR, O_PTR, ST_PTR, TILE, STILE, NPIV,
    )


@triton.jit
def _sample_row(
    r, logits_ptr, row_stride, V,
    t_ptr, t_stride, t_val, k_ptr, k_stride, k_val, p_ptr, p_stride, p_val,
    mp_ptr, mp_stride, mp_val, s_ptr, s_stride, s_val, o_ptr, o_stride, o_val,
    st_ptr, tokens_ptr, logprobs_ptr,
    T_PTR: tl.constexpr, K_PTR: tl.constexpr, P_PTR: tl.constexpr, MP_PTR: tl.constexpr,
    S_PTR: tl.constexpr, O_PTR: tl.constexpr, ST_PTR: tl.constexpr,
    TILE: tl.constexpr, STILE: tl.constexpr, NPIV: tl.constexpr,
):
    """Row ``r`` of the sampler (the body of both kernels)."""
    row_ptr = logits_ptr + r.to(tl.int64) * row_stride
    T = _param(t_ptr, t_stride, t_val, r, T_PTR).to(tl.float32)
    k = _param(k_ptr, k_stride, k_val, r, K_PTR).to(tl.int64)
    top_p = _param(p_ptr, p_stride, p_val, r, P_PTR).to(tl.float32)
    min_p = _param(mp_ptr, mp_stride, mp_val, r, MP_PTR).to(tl.float32)
    seed = _param(s_ptr, s_stride, s_val, r, S_PTR).to(tl.int64)
    offset = _param(o_ptr, o_stride, o_val, r, O_PTR).to(tl.int64)
    stream = _param(st_ptr, 1, r, r, ST_PTR).to(tl.int64)  # the row's place in the random stream
    greedy = (T > 0.0) == 0  # T <= 0 or NaN
    T = tl.where(greedy, 1.0, T)
    offs = tl.arange(0, TILE)
    soffs = tl.arange(0, STILE)
    piv_j = tl.arange(0, NPIV).to(tl.int64) + 1

    # Pass 1: max and its first index.
    m = float("-inf")
    arg = 0
    for t in range(0, V, TILE):
        x, mask = _load_x(row_ptr, t + offs, V, T, True)
        tm = tl.max(x, 0)
        ti = tl.min(tl.where(x == tm, t + offs, _INT32_MAX), 0)
        arg = tl.where(tm > m, ti, arg)
        m = tl.maximum(m, tm)
    dead = m == float("-inf")

    if greedy | dead:
        tl.store(tokens_ptr + r, tl.where(dead, 0, arg).to(tl.int64))
        tl.store(logprobs_ptr + r, tl.where(dead, float("-inf"), 0.0))
    else:
        key_m = _order_key(m)
        # top-k: largest t with #(key >= t) >= k; invariant: lo passes, hi fails.
        t_k = key_m * 0 + _KEY_NEGINF
        if (k > 0) & (k < V):
            t_k = _kth_key(row_ptr, V, k, T, key_m, piv_j, soffs, True, STILE, NPIV)
        # top-p on the top-k distribution: smallest t with G(t) < top_p * Z_k.
        t_p = t_k
        if top_p < 1.0:
            z_k = 0.0
            for t in range(0, V, TILE):
                x, mask = _load_x(row_ptr, t + offs, V, T, True)
                inside = (_order_key(x) >= t_k) & (x > float("-inf"))
                z_k += tl.sum(tl.where(inside, tl.exp(x - m), 0.0), 0)
            P = top_p * z_k
            hi = key_m  # G(key(m)) = 0 < P
            lo = t_k - 1  # G = Z_k >= P
            if (P > 0.0) == 0:
                lo = hi - 1  # top_p <= 0: only the most probable tokens
            while hi - lo > 1:
                piv = lo + ((hi - lo) * piv_j) // (NPIV + 1)
                g = tl.zeros([NPIV], tl.float32)
                for t in range(0, V, STILE):
                    x, mask = _load_x(row_ptr, t + soffs, V, T, True)
                    key = _order_key(x)
                    e = tl.exp(x - m)
                    inside = (key >= t_k) & (x > float("-inf"))
                    gt = (key[None, :] > piv[:, None]) & inside[None, :]
                    g += tl.sum(tl.where(gt, e[None, :], 0.0), 1)
                below = g < P
                hi = tl.minimum(hi, tl.min(tl.where(below, piv, hi), 0))
                lo = tl.maximum(lo, tl.max(tl.where(below, lo, piv), 0))
            t_p = hi
        thr = tl.maximum(t_k, t_p)
        min_p = tl.where(min_p > 0.0, min_p, float("-inf"))

        # The race: argmax of e / E over kept tokens, lowest index on ties.
        seed_u = seed.to(tl.uint64, bitcast=True)
        best = -1.0
        tok = 0
        x_tok = 0.0
        z = 0.0
        for t in range(0, V, TILE):
            idx = t + offs
            x, mask = _load_x(row_ptr, idx, V, T, True)
            e = tl.exp(x - m)
            keep = mask & (x > float("-inf")) & (_order_key(x) >= thr) & ((e >= min_p) | (x == m))
            E = -tl.log(_uniform(seed_u, offset, stream, idx))
            score = tl.where(keep, tl.math.div_rn(e, E), -1.0)
            z += tl.sum(tl.where(keep, e, 0.0), 0)
            tmax = tl.max(score, 0)
            ti = tl.min(tl.where(score == tmax, idx, _INT32_MAX), 0)
            xi = tl.max(tl.where(idx == ti, x, float("-inf")), 0)
            upd = tmax > best
            tok = tl.where(upd, ti, tok)
            x_tok = tl.where(upd, xi, x_tok)
            best = tl.maximum(best, tmax)
        tl.store(tokens_ptr + r, tok.to(tl.int64))
        tl.store(logprobs_ptr + r, (x_tok - m) - tl.log(z))


def _is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def sample_triton(logits, temperature, top_k, top_p, min_p, seed, offset,
                  temperatures=None, top_ks=None, top_ps=None, min_ps=None, seeds=None, offsets=None, streams=None,
                  stats_k=0, stats=None):
    """Triton ``sample`` with ``torch.ops.tts.sample``'s arguments (scalars, each
    overridden by its per-row tensor when given). Arguments are assumed valid
    (``tts_kernels.ops.sample`` checks them); tensors have the op's dtypes.
    ``stats`` (float32 ``[R, 3]``, optional) receives the statistics with ``stats_k``
    (``_sample_stats_kernel``: the same program per row, the statistics first)."""
    if logits.device.type != "cuda" and not _is_interpreted(_sample_kernel):
        raise RuntimeError(
            "the Triton sample kernel runs on CUDA tensors, or on CPU tensors when "
            "TRITON_INTERPRET=1 was set before tts_kernels.triton.sample was imported"
        )
    R, V = logits.shape
    if V >= 2**31 - _TILE:
        raise ValueError(f"V = {V} must be below 2**31 - {_TILE} for the Triton kernel (32-bit token offsets)")
    if V > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    row_stride = logits.stride(0) if R > 1 else V
    tokens = torch.empty(R, device=logits.device, dtype=torch.int64)
    logprobs = torch.empty(R, device=logits.device, dtype=torch.float32)
    if R == 0:
        return tokens, logprobs
    args, flags = [], []
    for value, t in ((float(temperature), temperatures), (int(top_k), top_ks), (float(top_p), top_ps),
                     (float(min_p), min_ps), (int(seed), seeds), (int(offset), offsets)):
        if t is None:
            args += [tokens, 0, value]
            flags.append(False)
        else:
            t = t.contiguous()
            args += [t, 0 if t.dim() == 0 else 1, value]
            flags.append(True)
    stream_arg = tokens if streams is None else streams.contiguous()
    consts = dict(T_PTR=flags[0], K_PTR=flags[1], P_PTR=flags[2], MP_PTR=flags[3], S_PTR=flags[4], O_PTR=flags[5],
                  ST_PTR=streams is not None, TILE=_TILE, STILE=_STILE, NPIV=_NPIV, num_warps=4,
                  enable_fp_fusion=False)
    if stats is None:
        _sample_kernel[(R,)](logits, row_stride, V, *args, stream_arg, tokens, logprobs, **consts)
    else:
        if stats.device != logits.device or stats.dtype != torch.float32 or tuple(stats.shape) != (R, 3) \
                or not stats.is_contiguous():
            raise ValueError("sample: stats must be a contiguous float32 [R, 3] tensor on the logits' device")
        k = max(1, min(int(stats_k), V))
        _sample_stats_kernel[(R,)](logits, row_stride, V, *args, stream_arg, tokens, logprobs, stats, k, **consts)
    return tokens, logprobs


@triton.jit
def _uniform_probe_kernel(out_ptr, seed, offset, V, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    idx = tl.arange(0, BLOCK)
    seed_u = tl.to_tensor(seed).to(tl.int64).to(tl.uint64, bitcast=True)
    u = _uniform(seed_u, tl.to_tensor(offset).to(tl.int64), r, idx)
    tl.store(out_ptr + r * V + idx, u, mask=idx < V)


def sample_uniforms_triton(seed: int, offset: int, rows: int, vocab: int, device) -> torch.Tensor:
    """The kernel's uniforms ``u[r, v]`` as a ``[rows, vocab]`` float32 tensor (for
    tests: they must equal :func:`tts_kernels.reference.sample_uniform_ref` bit for bit)."""
    out = torch.empty(rows, vocab, device=device, dtype=torch.float32)
    _uniform_probe_kernel[(rows,)](out, seed, offset, vocab, BLOCK=triton.next_power_of_2(vocab))
    return out
