"""``beam_topk`` in Triton: one read of the logits, split over the vocabulary.

Meaning (see :func:`tts_kernels.reference.beam_topk_ref`)::

    x = logits.float() / T                       # then NaN, +inf -> -inf; true division
    s[r, v] = ((x[r, v] - m[r]) - log(d[r])) + beam_scores[r]
    m[r] = max_v x[r, v],  d[r] = sum_v exp(x[r, v] - m[r])
    top C of s viewed as [B, K*V], sorted descending, ties by lower flat index

Shapes: ``logits [R=B*K, V]`` (fp32/fp16/bf16, last dim contiguous, any row
stride), ``beam_scores [B, K]`` fp32 -> ``scores [B, C]`` fp32, ``parents``,
``tokens [B, C]`` int64.

Two launches:

1. ``_beam_partial_kernel``, grid ``(R, S)``: program ``(r, s)`` streams its
   chunk of row ``r`` once, keeping the chunk's online max / sum-exp and its top
   ``C`` scaled logits (with token indices). A per-row constant cannot change
   the order inside a row, so the row's top C by scaled logit are its top C by
   final score; softmax is applied to the survivors only.
2. ``_beam_merge_kernel``, grid ``(B,)``: merges the ``S`` partial (m, d) pairs
   of each row into its log-sum-exp, scores the ``K*S*C`` survivors of the
   item, and keeps the top C across beams.

Both keep a top list as packed int64 *keys*: the high 32 bits are the float's
bits made order-preserving as a signed int, the low 32 bits are ``2**32-1-index``.
So ``max(key)`` is "highest value, then lowest index" — the tie rule of the op —
every comparison is one integer compare, and the value and the index come back
exactly from the key. The list is kept unordered (see ``_update_top``) and
sorted once, at the end of stage 2.

``C`` up to ``_MAX_FAST_C`` takes that path. Larger ``C`` (up to ``K*V``) uses
a generic path: stage 1 without the top list, a kernel that writes every score,
and a stable descending ``torch.sort`` (ties by lower flat index again).

On CPU tensors the kernels run in the Triton interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before this module is imported: the
choice between compiled and interpreted kernels is made when they are decorated.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Top-list capacity for the fused path. The list is a register tensor of int64
# keys and the stage-1 tile must be at least this long (tl.topk needs
# TILE >= CP), so this is also the largest tile: 1024 keys are 8 KB, 16
# registers per thread at 4 warps, next to the same again for the tile's keys.
_MAX_FAST_C = 1024
# Vocabulary tile of stage 1: 1024 elements = 4 KB of fp32 per iteration, i.e.
# 8 elements (two 16-byte loads) per thread at 4 warps: enough bytes in flight
# per program, while the int64 key tile built from it (8 KB) still fits in
# registers next to the top list.
_BLOCK_V = 1024
# A split shorter than this spends more on its partial record and launch slot
# than on reading: two tiles is the least work worth a program.
_MIN_CHUNK = 2 * _BLOCK_V
# Stage 2 merges K*S*CP keys per item in one program; bound S*CP so that the
# small second launch stays small next to the memory-bound first one.
_MAX_KEYS_PER_ROW = 8192
_MAX_SPLITS = 64
# Launches pass enable_fp_fusion=False: every operation rounds separately, as
# the op's formula is written, whatever Triton's (changing) default is.

# Programs per SM wanted in stage 1: a memory-bound stream needs several
# resident programs per SM to cover DRAM latency.
_PROGRAMS_PER_SM = 4
# Without a GPU (interpreter) pretend to have a few SMs, so that the tests cross
# the split/merge path with more than one split per row.
_INTERPRETER_SMS = 4

# Keys beating the current top list that are inserted one by one rather than
# by a tile sort (see _update_top): a bitonic top-16 of a 1024-wide tile is about
# 40 compare-exchange passes over it, about what 16 single insertions (one max
# reduction each) cost. Lists this short never sort a tile.
_INSERT_MAX = tl.constexpr(16)

# int64 key below every real key: real keys have high word >= the key of -inf
# (NaN is mapped to -inf before keying), which is far above INT32_MIN.
_SENTINEL = tl.constexpr(-(2**63))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ----------------------------------------------------------------------------- keys


@triton.jit
def _order_key(v, idx):
    """int64 key: orders by float value, then by *lower* index (idx < 2**32)."""
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 and +0.0 are equal scores: one key
    b = v.to(tl.int32, bitcast=True)
    # Negative floats order backwards as ints: flip their magnitude bits.
    b = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
    low = 4294967295 - idx.to(tl.int64)
    return (b.to(tl.int64) << 32) | low


@triton.jit
def _key_value(key):
    b = (key >> 32).to(tl.int32)
    b = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _key_index(key):
    return 4294967295 - (key & 4294967295)


@triton.jit
def _insert_top(best, keys, CP: tl.constexpr):
    """Insert the keys of the tile that beat the list, one at a time, largest first.

    Each step is one reduction over the tile (its max) and two over the CP-long
    list (its minimum and where it is); the max replaces the minimum. It stops
    when the tile's max no longer beats the list's minimum, so it runs at most
    min(CP, keys above the minimum) times.
    """
    c = tl.arange(0, CP)
    q = tl.max(keys, 0)
    mn = tl.min(best, 0)
    while q > mn:
        pos = tl.min(tl.where(best == mn, c, CP), 0)
        best = tl.where(c == pos, q, best)
        keys = tl.where(keys == q, _SENTINEL, keys)
        q = tl.max(keys, 0)
        mn = tl.min(best, 0)
    return best


@triton.jit
def _update_top(best, keys, CP: tl.constexpr):
    """Top CP of ``best`` ([CP], unordered) union ``keys`` ([TILE] >= CP), unordered.

    Once the list has filled, a tile of random logits rarely holds a key that
    beats it (over a whole row about CP * ln(V / CP) insertions are expected), so
    one-at-a-time insertion is the common case. A tile with many winners (the
    first tiles) and a long list (CP > _INSERT_MAX) takes a bitonic top-CP of the
    tile instead, merged with the list sorted the other way: the element-wise
    max of a descending and an ascending run is exactly the top CP of the union.
    """
    if CP <= _INSERT_MAX:
        best = _insert_top(best, keys, CP)
    else:
        n_above = tl.sum((keys > tl.min(best, 0)).to(tl.int32), 0)
        if n_above > _INSERT_MAX:
            best = tl.maximum(tl.topk(keys, CP), tl.sort(best))
        else:
            best = _insert_top(best, keys, CP)
    return best


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _beam_partial_kernel(
    logits_ptr, row_stride, V, chunk, temperature, beam_ptr,
    part_m_ptr, part_d_ptr, part_key_ptr, S,
    APPLY_T: tl.constexpr, WITH_TOPK: tl.constexpr, CP: tl.constexpr, TILE: tl.constexpr,
):
    """Stage 1, program (row, split): m, d and top-CP keys of x[row, chunk]."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    # A row whose beam score is infinite (a finished beam at -inf) has one score
    # for every token: ties, which go by index, not by logit. Key its tokens
    # with the value 0 then, so the lowest indices survive; stage 2 still gets
    # +-inf from 0 + the beam score.
    bs = tl.load(beam_ptr + row)
    flat_row = (bs == float("inf")) | (bs == float("-inf"))
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    offs = tl.arange(0, TILE)
    # [1]-shaped running values: loop-carried scalars with a fixed type.
    m = tl.full([1], float("-inf"), tl.float32)
    d = tl.zeros([1], tl.float32)
    best = tl.full([CP], _SENTINEL, tl.int64)
    for t in range(start, end, TILE):
        idx = t + offs
        mask = idx < end
        x = tl.load(row_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
        if APPLY_T:
            # The op is defined with a true division; plain `/` may lower to an
            # approximate divide on GPU.
            x = tl.math.div_rn(x, temperature)
        # NaN and +inf (overflow garbage, also from x / T) are never a choice.
        x = tl.where((x != x) | (x == float("inf")), float("-inf"), x)
        m_new = tl.maximum(m, tl.max(x, 0))
        # While everything seen is -inf, d stays 0 (and exp(-inf - -inf) = NaN
        # must not appear): shift by 0 instead.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
        m = m_new
        if WITH_TOPK:
            keys = tl.where(mask, _order_key(tl.where(flat_row, 0.0, x), idx), _SENTINEL)
            best = _update_top(best, keys, CP)
    rec = row * S + split
    one = tl.arange(0, 1)
    tl.store(part_m_ptr + rec + one, m)
    tl.store(part_d_ptr + rec + one, d)
    if WITH_TOPK:
        tl.store(part_key_ptr + rec.to(tl.int64) * CP + tl.arange(0, CP), best)


@triton.jit
def _row_lse(part_m_ptr, part_d_ptr, r, S, SP: tl.constexpr):
    """Merge the S partial (m, d) of row r into (m, shift, log d), each [1].

    ``shift`` is m, or 0 for an all -inf row (m = -inf, d = 0), so that callers
    can subtract it without forming -inf - -inf = NaN; they test ``m`` for that
    row and give -inf scores.
    """
    s = tl.arange(0, SP)
    pm = tl.load(part_m_ptr + r * S + s, mask=s < S, other=float("-inf"))
    pd = tl.load(part_d_ptr + r * S + s, mask=s < S, other=0.0)
    m = tl.max(pm, 0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    d = tl.sum(pd * tl.exp(pm - shift), 0)
    logd = tl.log(tl.where(d > 0.0, d, 1.0))
    one = tl.zeros([1], tl.float32)
    return m + one, shift + one, logd + one


@triton.jit
def _beam_merge_kernel(
    part_m_ptr, part_d_ptr, part_key_ptr, beam_ptr,
    scores_ptr, parents_ptr, tokens_ptr,
    K, V, S, C,
    CP: tl.constexpr, SP: tl.constexpr, TILE: tl.constexpr,
):
    """Stage 2, program b: top C over the K*S*CP survivors of batch item b."""
    b = tl.program_id(0)
    n = S * CP  # survivors per row
    offs = tl.arange(0, TILE)
    best = tl.full([CP], _SENTINEL, tl.int64)
    for j in range(0, K):
        r = b * K + j
        m, shift, logd = _row_lse(part_m_ptr, part_d_ptr, r, S, SP)
        bs = tl.load(beam_ptr + r)
        for t in range(0, n, TILE):
            i = t + offs
            mask = i < n
            k = tl.load(part_key_ptr + r.to(tl.int64) * n + i, mask=mask, other=_SENTINEL)
            valid = mask & (k != _SENTINEL)
            v = _key_value(k)
            tok = _key_index(k)
            s = ((v - shift) - logd) + bs
            # An all -inf row: every candidate is -inf (not -inf - -inf = NaN).
            s = tl.where(m == float("-inf"), float("-inf"), s)
            keys = tl.where(valid, _order_key(s, j * V + tok), _SENTINEL)
            best = _update_top(best, keys, CP)
    if CP > 1:
        best = tl.sort(best, descending=True)
    c = tl.arange(0, CP)
    out = b.to(tl.int64) * C + c
    flat = _key_index(best)
    tl.store(scores_ptr + out, _key_value(best), mask=c < C)
    tl.store(parents_ptr + out, flat // V, mask=c < C)
    tl.store(tokens_ptr + out, flat % V, mask=c < C)


@triton.jit
def _beam_scores_kernel(
    logits_ptr, row_stride, V, temperature, part_m_ptr, part_d_ptr, beam_ptr, out_ptr, S,
    APPLY_T: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr,
):
    """Generic path: every score s[row, v] into out [R, V] (fp32)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    m, shift, logd = _row_lse(part_m_ptr, part_d_ptr, row, S, SP)
    bs = tl.load(beam_ptr + row)
    x = tl.load(logits_ptr + row.to(tl.int64) * row_stride + offs, mask=mask, other=float("-inf"))
    x = x.to(tl.float32)
    if APPLY_T:
        x = tl.math.div_rn(x, temperature)
    x = tl.where((x != x) | (x == float("inf")), float("-inf"), x)
    s = ((x - shift) - logd) + bs
    s = tl.where(m == float("-inf"), float("-inf"), s)
    s = tl.where(s == 0.0, 0.0, s)  # one zero, so the stable sort sees a tie
    tl.store(out_ptr + row.to(tl.int64) * V + offs, s, mask=mask)


# ----------------------------------------------------------------------------- host side


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _plan_splits(rows: int, V: int, CP: int, device: torch.device) -> int:
    """Vocabulary splits per row: enough programs to fill the GPU when rows are few."""
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = _INTERPRETER_SMS
    want = -(-_PROGRAMS_PER_SM * sms // rows)
    cap = min(_MAX_SPLITS, max(1, V // _MIN_CHUNK), max(1, _MAX_KEYS_PER_ROW // CP))
    return max(1, min(want, cap))


def _is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def beam_topk_triton(
    logits: torch.Tensor,
    beam_scores: torch.Tensor,
    C: int,
    temperature: float = 1.0,
    *,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton ``beam_topk``. Arguments are assumed valid (``tts_kernels.ops.beam``
    checks them); ``num_splits`` overrides the vocabulary split count (tests)."""
    if logits.device.type != "cuda" and not _is_interpreted(_beam_partial_kernel):
        raise RuntimeError(
            "the Triton beam_topk kernels run on CUDA tensors, or on CPU tensors when "
            "TRITON_INTERPRET=1 was set before tts_kernels.triton.beam_topk was imported"
        )
    R, V = logits.shape
    B, K = beam_scores.shape
    if K * V >= 2**32:
        raise ValueError(f"K*V = {K * V} must be below 2**32 (flat candidate indices are 32-bit)")
    if V > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    row_stride = logits.stride(0) if R > 1 else V
    beam_scores = beam_scores.contiguous()
    dev = logits.device
    temperature = float(temperature)
    apply_t = temperature != 1.0

    CP = _next_pow2(C)
    fast = CP <= _MAX_FAST_C
    S = num_splits or _plan_splits(R, V, CP if fast else 1, dev)
    S = max(1, min(S, V))
    # Stage-1 tile: at least CP (tl.topk needs TILE >= CP), at most _BLOCK_V,
    # and no wider than the chunk (tiny vocabularies get tiny tiles).
    tile = max(CP if fast else 1, min(_BLOCK_V, _next_pow2(-(-V // S))))
    chunk = -(-(-(-V // S)) // tile) * tile  # ceil(V/S) rounded up to a tile multiple
    S = -(-V // chunk)  # no empty splits after rounding
    SP = _next_pow2(S)

    part_m = torch.empty(R * S, device=dev, dtype=torch.float32)
    part_d = torch.empty(R * S, device=dev, dtype=torch.float32)
    part_key = torch.empty(R * S * CP if fast else 1, device=dev, dtype=torch.int64)
    warps1 = 4 if tile >= 512 else (2 if tile >= 128 else 1)
    _beam_partial_kernel[(R, S)](
        logits, row_stride, V, chunk, temperature, beam_scores, part_m, part_d, part_key, S,
        APPLY_T=apply_t, WITH_TOPK=fast, CP=CP if fast else 1, TILE=tile,
        num_warps=warps1, enable_fp_fusion=False,
    )

    if fast:
        scores = torch.empty(B, C, device=dev, dtype=torch.float32)
        parents = torch.empty(B, C, device=dev, dtype=torch.int64)
        tokens = torch.empty(B, C, device=dev, dtype=torch.int64)
        n = S * CP
        tile2 = _next_pow2(n) if n <= max(CP, _BLOCK_V) else max(CP, _BLOCK_V)
        _beam_merge_kernel[(B,)](
            part_m, part_d, part_key, beam_scores, scores, parents, tokens,
            K, V, S, C, CP=CP, SP=SP, TILE=tile2, num_warps=4, enable_fp_fusion=False,
        )
        return scores, parents, tokens

    # Generic path (C > _MAX_FAST_C): write all R*V scores, then a stable sort,
    # whose order for equal scores is the flat index order the op promises.
    full = torch.empty(R, V, device=dev, dtype=torch.float32)
    block = min(_BLOCK_V, _next_pow2(V))
    _beam_scores_kernel[(R, triton.cdiv(V, block))](
        logits, row_stride, V, temperature, part_m, part_d, beam_scores, full, S,
        APPLY_T=apply_t, SP=SP, BLOCK=block, num_warps=4, enable_fp_fusion=False,
    )
    vals, flat = torch.sort(full.view(B, K * V), dim=1, descending=True, stable=True)
    flat = flat[:, :C]
    return vals[:, :C].contiguous(), torch.div(flat, V, rounding_mode="floor"), flat % V
