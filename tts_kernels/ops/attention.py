"""``paged_attention``: decode attention of one new token per sequence over a paged KV cache.

Validation happens here and never reads device data on CUDA (so it never
syncs); the call then goes to ``torch.ops.tts.paged_attention``: the C++ kernel
on CPU, the Triton kernel registered for CUDA (``_dispatch.py``).
"""
from __future__ import annotations

import math

import torch

from . import _dispatch
from ._validate import check_same_device, check_tensor

KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = _dispatch.OPS["paged_attention"].backends


def _validate(query, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, prefix_lens) -> float:
    check_tensor("query", query, ndim=3, dtypes=KV_DTYPES)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=KV_DTYPES)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=KV_DTYPES)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,))
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,))
    tensors = dict(query=query, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens)
    if prefix_lens is not None:
        check_tensor("prefix_lens", prefix_lens, ndim=1, dtypes=(torch.int32,))
        tensors["prefix_lens"] = prefix_lens
    check_same_device(**tensors)
    if k_cache.dtype != query.dtype or v_cache.dtype != query.dtype:
        raise TypeError(
            f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must have the dtype of query ({query.dtype})"
        )
    n, H, D = query.shape
    _, Hkv, P, Dk = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous [num_blocks, num_kv_heads, block_size, head_dim] "
                         "tensors (e.g. pool[layer] of the paged pool); a copy would defeat the point")
    if H < 1 or D < 1:
        raise ValueError(f"query must have shape [n, num_heads, head_dim] with num_heads, head_dim >= 1, "
                         f"got {tuple(query.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"query num_heads = {H} must be a multiple of k_cache num_kv_heads = {Hkv}")
    if Dk != D:
        raise ValueError(f"k_cache head_dim = {Dk} must equal query head_dim = {D}")
    if P < 1:
        raise ValueError(f"k_cache block_size (dim 2) must be >= 1, got shape {tuple(k_cache.shape)}")
    if block_tables.shape[0] != n:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows but query has n = {n}")
    if seq_lens.shape[0] != n:
        raise ValueError(f"seq_lens has {seq_lens.shape[0]} entries but query has n = {n}")
    if prefix_lens is not None and prefix_lens.shape[0] != n:
        raise ValueError(f"prefix_lens has {prefix_lens.shape[0]} entries but query has n = {n}")
    if scale is None:
        scale = D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
            raise TypeError(f"sliding_window must be an int or None, got {type(sliding_window).__name__}")
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    return float(scale)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    prefix_lens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode attention over a paged KV cache (one query token per sequence).

    Shapes: ``query [n, H, D]``; ``k_cache``, ``v_cache [num_blocks, Hkv, P, D]``
    contiguous (one layer of the paged pool; ``P`` = block size); same dtype as
    ``query`` (float32, float16 or bfloat16); ``H`` a multiple of ``Hkv`` (query
    head ``h`` reads kv head ``h // (H // Hkv)``); ``block_tables [n, max_blocks]``
    int32 (position ``t`` of sequence ``i`` is ``k_cache[block_tables[i, t // P], :, t % P]``;
    entries past ``ceil(seq_lens[i] / P)`` are never read and may hold anything);
    ``seq_lens [n]`` int32, the cached tokens of each sequence including the one
    being decoded. Returns ``out [n, H, D]`` in ``query.dtype``::

        out[i, h] = softmax_t(scale * <query[i, h], K_i[t]>) @ V_i[t],  t in [lo_i, L_i)

    with ``L_i = seq_lens[i]``, ``lo_i = max(0, L_i - sliding_window)`` (``0``
    without a window; the newest token's mask in transformers' Mistral/Qwen2
    sliding-window attention), ``scale`` default ``D ** -0.5``, accumulation in
    float32, and zeros for an empty range (``L_i = 0``).

    ``prefix_lens [n]`` int32 (optional): shared-prefix (cascade) attention for
    best-of-N, where many sequences fork from one prompt. Sequence ``i``'s first
    ``p_i = min(prefix_lens[i], seq_lens[i])`` tokens are its prefix (normally the
    prompt length rounded down to a multiple of ``P``: the full blocks forks
    share). A *group* is a maximal run of consecutive rows with equal ``p_i > 0``
    and equal first ``ceil(p_i / P)`` block-table entries; a backend reads a
    group's prefix blocks once for all the group's queries, runs each sequence's
    own tokens separately, and merges the two softmax states by log-sum-exp. The
    result is the same with or without ``prefix_lens`` (up to rounding); a row
    that matches no neighbour simply takes the plain path. A best-of-N driver
    passes the prompt length for every row (rows of one prompt adjacent), with
    no host sync. Negative values are an error (checked on CPU; on CUDA they are
    taken as 0, as checking would need a sync).
    It does not pay on CPU: measured on 2 cores (``benchmarks/RESULTS.md``), n=64
    sequences sharing a 1024-token prompt plus 64 own tokens take about 1.2x
    *longer* with ``prefix_lens`` (fp32 6.7 ms plain, 8.1 ms shared; bf16 8.3
    vs 8.6 ms). A kv head's prompt (256 KB at D=64 fp32) stays in L2/L3 between
    the sequences that read it, so sharing saves little memory traffic, while
    the dot products and exps, which dominate on CPU, are the same. The CPU
    path stays correct and tested; pass ``prefix_lens`` on CUDA. There (Triton)
    the group's prefix pass tiles the queries of up to ``64 // next_pow2(H // Hkv)``
    sequences into one ``tl.dot``, reading each shared K/V row once per chunk
    instead of once per sequence; with HBM-bound decode attention that should
    cut the step roughly in proportion to the bytes (about 10x fewer K/V bytes
    at that shape), but it has not been measured on a GPU yet.

    On CPU the needed block ids and the lengths are checked (``ValueError``); on
    CUDA that would need a host sync, so they are the caller's responsibility.

    ``backend``: ``"auto"`` (CPU: the C++ kernel; CUDA: Triton; the reference where
    those are missing, logged once), ``"reference"``, ``"cpp"`` (CPU only) or
    ``"triton"`` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``);
    ``TTS_KERNELS_BACKEND`` replaces ``"auto"`` (``tts_kernels/ops/_dispatch.py``).
    """
    scale = _validate(query, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, prefix_lens)
    return _dispatch.call("paged_attention", query.device.type, backend, query, k_cache, v_cache, block_tables,
                          seq_lens, scale, sliding_window, prefix_lens)
