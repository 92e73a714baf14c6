"""Plain-PyTorch meaning of every op: the specification and the test oracle.

Every backend (CPU C++, CUDA C++, Triton) is tested against these functions.
They favour clarity over speed and compute in float32.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def beam_topk_ref(
    logits: torch.Tensor,
    beam_scores: torch.Tensor,
    num_candidates: int | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One beam-search expansion step.

    Shapes: ``logits [B*K, V]`` (float32/float16/bfloat16; row ``b*K + j`` is
    beam ``j`` of batch item ``b``), ``beam_scores [B, K]`` float32.

    Formula::

        s = log_softmax(logits.float() / temperature, -1) + beam_scores.reshape(-1, 1)
        s = s.view(B, K * V)
        scores, flat = topk(s, C)            # C = num_candidates, default 2*K, sorted descending
        parents, tokens = flat // V, flat % V

    NaN and +inf values of ``logits / temperature`` are treated as -inf (never
    selected: they come from overflow, not from a model's preference). A row
    whose logits are all -inf (or NaN) yields -inf for all of its candidates,
    never NaN.
    Returns ``scores [B, C]`` float32, ``parents [B, C]`` int64, ``tokens [B, C]`` int64.
    """
    B, K = beam_scores.shape
    V = logits.shape[-1]
    C = 2 * K if num_candidates is None else int(num_candidates)
    x = logits.float() / temperature
    # NaN and +inf (after scaling) are garbage (overflow), never a choice: -inf.
    x = torch.where(torch.isnan(x) | torch.isposinf(x), torch.full_like(x, float("-inf")), x)
    logp = torch.log_softmax(x, dim=-1)
    # log_softmax of an all -inf row is NaN (-inf - -inf); the op's meaning is -inf.
    logp = torch.where(torch.isnan(logp), torch.full_like(logp, float("-inf")), logp)
    s = (logp + beam_scores.float().reshape(-1, 1)).reshape(B, K * V)
    scores, flat = torch.topk(s, C, dim=-1, largest=True, sorted=True)
    return scores, torch.div(flat, V, rounding_mode="floor"), flat % V


def kv_reorder_ref(caches: Sequence[torch.Tensor], parents: torch.Tensor) -> None:
    """In-place beam reorder of dense KV caches.

    Each tensor in ``caches`` has the beam/sequence dimension first (``[N, ...]``);
    ``parents [N]`` int64. Afterwards ``cache[i]`` holds what ``cache[parents[i]]``
    held before the call, for every tensor in ``caches``. Rows with
    ``parents[i] == i`` are left untouched.
    """
    for c in caches:
        c.copy_(c.index_select(0, parents.to(c.device)))


def paged_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    sliding_window: int | None = None,
    prefix_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of one new query token per sequence over a paged KV cache.

    Shapes: ``query [n, H, D]``; ``k_cache``, ``v_cache [num_blocks, Hkv, P, D]``
    (``P`` = block size, ``H`` a multiple of ``Hkv``); ``block_tables [n, max_blocks]``
    int32; ``seq_lens [n]`` int32. Token position ``t`` of sequence ``i`` lives at
    ``k_cache[block_tables[i, t // P], :, t % P, :]``; table entries past
    ``ceil(seq_lens[i] / P)`` are never read.

    Formula, for sequence ``i``, query head ``h`` and its kv head ``g = h // (H // Hkv)``,
    with ``L = seq_lens[i]`` and the attended positions
    ``t in [lo, L)``, ``lo = max(0, L - sliding_window)`` (``0`` without a window)::

        s[t]   = scale * <query[i, h], K_i[t, g]>          # scale defaults to D ** -0.5
        out[i, h] = sum_t softmax(s)[t] * V_i[t, g]         # zeros when L == 0

    computed in float32, returned in ``query.dtype`` as ``[n, H, D]``.
    ``prefix_lens`` only tells a backend which reads it may share between
    sequences; it never changes the result, so it is ignored here.
    """
    n, H, D = query.shape
    Hkv, P = k_cache.shape[1], k_cache.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    out = torch.zeros(n, H, D, dtype=torch.float32, device=query.device)
    for i in range(n):
        L = int(seq_lens[i])
        lo = 0 if sliding_window is None else max(0, L - int(sliding_window))
        if L <= lo:
            continue
        pos = torch.arange(lo, L, device=query.device)
        blocks = block_tables[i].long()[pos // P]
        # Advanced indices around a slice put the token dim first: [T, Hkv, D].
        k = k_cache[blocks, :, pos % P, :].float().transpose(0, 1).repeat_interleave(H // Hkv, dim=0)
        v = v_cache[blocks, :, pos % P, :].float().transpose(0, 1).repeat_interleave(H // Hkv, dim=0)
        s = torch.einsum("hd,htd->ht", query[i].float(), k) * scale
        out[i] = torch.einsum("ht,htd->hd", torch.softmax(s, dim=-1), v)
    return out.to(query.dtype)


# ----------------------------------------------------------------------------- selection and voting


def _score_key(x: float) -> float:
    return float("-inf") if math.isnan(x) else x


def select_best_ref(scores: torch.Tensor) -> torch.Tensor:
    """Index of each row's highest score; ties -> first; NaN ranks as -inf. ``[B, N] -> [B]``."""
    out = []
    for row in scores.double().tolist():
        best = 0
        for j, x in enumerate(row):
            if _score_key(x) > _score_key(row[best]):
                best = j
        out.append(best)
    return torch.tensor(out, dtype=torch.int64)


def weighted_vote_ref(answer_ids: torch.Tensor, scores: torch.Tensor | None = None):
    """Per row: the answer id (-1 = none, never wins unless all are -1) with the largest total
    weight (each candidate weighs its score, NaN as 0, or 1 when ``scores`` is None); ties -> the
    answer that occurs first. Returns ``(answer [B], index of its first occurrence [B])``."""
    answers, index = [], []
    rows = answer_ids.tolist()
    weights = [[1.0] * len(r) for r in rows] if scores is None else scores.double().tolist()
    for a_row, w_row in zip(rows, weights):
        total, first = {}, {}
        for j, (a, w) in enumerate(zip(a_row, w_row)):
            if a == -1:
                continue
            total[a] = total.get(a, 0.0) + (0.0 if math.isnan(w) else w)
            first.setdefault(a, j)
        if not total:
            answers.append(-1)
            index.append(0)
            continue
        best = min(total, key=lambda a: (-total[a], first[a]))
        answers.append(best)
        index.append(first[best])
    return torch.tensor(answers, dtype=torch.int64), torch.tensor(index, dtype=torch.int64)


def majority_vote_ref(answer_ids: torch.Tensor):
    """:func:`weighted_vote_ref` with every candidate weighing 1."""
    return weighted_vote_ref(answer_ids, None)


def topk_per_group_ref(scores: torch.Tensor, k: int):
    """Per row, the ``k`` highest scores best first, ties by lower index, NaN as -inf."""
    idx = []
    for row in scores.double().tolist():
        order = sorted(range(len(row)), key=lambda j: (-_score_key(row[j]), j))
        idx.append(order[:k])
    index = torch.tensor(idx, dtype=torch.int64).reshape(scores.shape[0], k)
    values = torch.where(torch.isnan(scores), float("-inf"), scores).gather(1, index)
    return values, index


# ----------------------------------------------------------------------------- PRM scoring


def prm_score_ref(x, positions, weight=None, bias=None, *, aggregate, count, agg="last", positive_class=1):
    """Plain-loop meaning of :func:`tts_kernels.ops.prm.prm_score` (see its docstring): per row, the
    head at each valid step end, the 2-way softmax (class ``positive_class``) or sigmoid, and the fold
    of those scores, in order, into the running ``aggregate``/``count``."""
    n, S = positions.shape
    scores = torch.full((n, S), float("nan"))
    new_agg, new_count = aggregate.clone().float(), count.clone()
    for i in range(n):
        acc, c = float(aggregate[i]), int(count[i])
        for s in range(S):
            t = int(positions[i, s])
            if t < 0 or t >= x.shape[1]:
                continue
            z = x[i, t].double()
            if weight is not None:
                z = weight.double() @ z
            if bias is not None:
                z = z + bias.double()
            p = float(torch.sigmoid(z[0])) if z.shape[0] == 1 else float(torch.softmax(z, 0)[positive_class])
            scores[i, s] = p
            if agg == "last":
                acc = p
            elif agg == "min":
                acc = min(acc, p)
            elif agg == "prod":
                acc = acc * p
            else:
                acc = (acc * c + p) / (c + 1)
            c += 1
        new_agg[i], new_count[i] = acc, c
    return scores, new_agg, new_count


# ----------------------------------------------------------------------------- sampling

# Philox-4x32-10 (Salmon et al., SC'11): the round multipliers and the key increments.
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def prefix_likelihood_ref(token_logp, positions, state, *, reduce="min"):
    """Plain-loop meaning of :func:`tts_kernels.ops.prm.prefix_likelihood`: per row, walk the tokens,
    keep every log-probability seen; at a step end score ``exp(min | mean | sum)`` of them."""
    run_min, run_sum, run_count = state
    n, T = token_logp.shape
    scores = torch.full(positions.shape, float("nan"))
    new = ([], [], [])
    for i in range(n):
        seen_min, seen_sum, seen_n = float(run_min[i]), float(run_sum[i]), int(run_count[i])
        at = {}
        for t in range(T):
            v = float(token_logp[i, t])
            if not math.isnan(v):
                seen_min, seen_sum, seen_n = min(seen_min, v), seen_sum + v, seen_n + 1
            at[t] = (seen_min, seen_sum, seen_n)
        for s, e in enumerate(positions[i].tolist()):
            if 0 <= e < T:
                m, tot, c = at[e]
                f = {"min": m, "sum": tot, "mean": tot / max(c, 1)}[reduce]
                scores[i, s] = math.exp(min(f, 0.0))
        for lst, v in zip(new, (seen_min, seen_sum, seen_n)):
            lst.append(v)
    return scores, (torch.tensor(new[0], dtype=torch.float32), torch.tensor(new[1], dtype=torch.float32),
                    torch.tensor(new[2], dtype=torch.int64))


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``a * b`` for a 32-bit constant ``a`` and int64 ``b`` in [0, 2**32).

    The 64-bit product would overflow int64, so ``a`` is split into 16-bit halves:
    every partial product stays below 2**48.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_hi, p_lo = b * a_hi, b * a_lo  # a*b = p_hi * 2**16 + p_lo
    mid = p_hi + (p_lo >> 16)
    hi = mid >> 16
    lo = ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi, lo


def philox4x32_ref(ctr: Sequence[torch.Tensor], key: Sequence[torch.Tensor], rounds: int = 10):
    """Philox-4x32 on int64 tensors holding 32-bit words (broadcasting); returns the 4 output words."""
    c0, c1, c2, c3 = (c & _MASK32 for c in ctr)
    k0, k1 = (k & _MASK32 for k in key)
    for _ in range(rounds):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def sample_uniform_ref(seed, offset, rows: int, vocab: int, device=None, stream=None) -> torch.Tensor:
    """The uniforms ``u[r, v]`` of :func:`sample_ref`, float32 ``[rows, vocab]``.

    ``seed``, ``offset``: Python ints or int64 tensors (0-dim or ``[rows]``), read
    as 64-bit two's complement; ``stream``: an int64 ``[rows]`` tensor in ``[0, 2**32)``
    (default: the row indices ``0 .. rows-1``). For row ``r``, ``s = stream[r]``, and token ``v``::

        w = Philox4x32_10(counter = (v >> 2, s, offset_lo32, offset_hi32),
                          key = (seed_lo32, seed_hi32))[v & 3]
        u = (2 * (w >> 9) + 1) * 2**-24          # exact in float32, in (0, 1)

    A pure function of (seed, offset, r, v): no state, the same on every device
    and backend, bit for bit (the CPU kernel and the Triton kernel compute the same
    words; ``tl.philox`` is this Philox). Each counter yields four words, used by
    four consecutive tokens.
    """
    def as_col(a):
        a = torch.as_tensor(a, dtype=torch.int64, device=device)
        return a.reshape(-1, 1) if a.dim() else a  # [R] -> [R, 1] to broadcast over tokens

    seed, offset = as_col(seed), as_col(offset)
    if stream is None:
        r = torch.arange(rows, dtype=torch.int64, device=device).reshape(-1, 1)
    else:
        r = torch.as_tensor(stream, dtype=torch.int64, device=device).reshape(-1, 1)
    v = torch.arange(vocab, dtype=torch.int64, device=device).reshape(1, -1)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    words = philox4x32_ref(
        (v >> 2, r + zero, offset + zero, (offset >> 32) + zero),
        (seed + zero, (seed >> 32) + zero),
    )
    w = torch.stack(torch.broadcast_tensors(*words), dim=-1)  # [rows, vocab, 4]
    w = w.gather(-1, (v & 3).expand(rows, vocab).unsqueeze(-1)).squeeze(-1)
    return ((w >> 9) * 2 + 1).to(torch.float32) * 2.0**-24


def _per_row(a, rows: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A per-row parameter (number, 0-dim or [rows] tensor) as a [rows] tensor of ``dtype``."""
    t = torch.as_tensor(a, device=device).to(dtype)
    return t.expand(rows) if t.dim() == 0 else t


def sample_ref(
    logits: torch.Tensor,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    seed=0,
    offset=0,
    stream=None,
    stats_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row, with temperature, top-k, top-p and min-p filters.

    Shapes: ``logits [R, V]`` (float32/float16/bfloat16). Each of ``temperature``,
    ``top_k``, ``top_p``, ``min_p``, ``seed``, ``offset`` is a Python number or a
    tensor (0-dim or ``[R]``; per-row values); ``stream`` (optional int64 ``[R]``) is each
    row's place in the random stream instead of its row index (:func:`sample_uniform_ref`).
    Returns ``tokens [R]`` int64 and ``logprobs [R]`` float32.

    Meaning, per row (every comparison is on values, so ties are kept together and
    no sort order matters; filters in transformers' order, each on the
    distribution the previous one left, renormalised)::

        x = logits.float() / T              # float32 true division; then NaN, +inf -> -inf
        m = max(x);  e = exp(x - m)          # unnormalised probabilities
        top-k  (0 < k < V):  keep x_v >= (k-th largest x)
        top-p  (top_p < 1):  keep v iff  sum(e_u : u kept, x_u > x_v) < top_p * sum(e_u : u kept)
        min-p  (min_p > 0):  keep e_v >= min_p                    # p_v >= min_p * p_max
        the most probable tokens (x_v == m) are always kept; -inf tokens never
        q_v = e_v / Z over the kept set K,  Z = sum(e_v : v in K)
        token    = argmax_{v in K} e_v / E_v,  E_v = -log(u[r, v])   (ties: lowest index)
        logprob  = log q_token = (x_token - m) - log(Z)

    The choice is an exponential race (``e_v / E_v`` with ``E_v ~ Exp(1)`` picks
    ``v`` with probability ``q_v``), with the counter-based uniforms of
    :func:`sample_uniform_ref`: the same (logits, parameters, seed, offset) give
    the same tokens on every run, and a loop that advances ``offset`` (a device
    tensor) never syncs. ``u`` has 23 random bits, so ``E_v >= 2**-24``: a token
    whose probability is below ~1e-8 of the most likely kept token's can
    practically not win (a bias of at most ~1e-8 * V in total probability).

    Special rows: ``T == 0`` (any ``T <= 0`` or NaN in a tensor) is greedy:
    ``argmax x`` (lowest index on ties), logprob 0 (a point mass). A row with no
    finite logit (all -inf, NaN or +inf) gives token 0 and logprob -inf. In
    tensors, ``top_k <= 0`` or ``>= V`` and ``top_p >= 1`` switch a filter off,
    ``top_p <= 0`` or ``min_p >= 1`` keep just the most probable tokens.

    Differences from transformers' warpers: only at exact ties (transformers'
    top-k and top-p cut inside a group of equal logits by sort position; here a
    group is kept or dropped whole). Between backends: the uniforms are bit
    identical, but exp, log and sums differ in the last bits, so a token can
    differ only where two candidates' ``e_v / E_v`` agree to a few ulp, or a
    token's cumulative mass lies within rounding of ``top_p`` (both ~1e-6 events
    per row). Masses for top-p are accumulated in float64 here.

    ``stats_k >= 1`` also returns ``stats [R, 3]`` float32: :func:`sample_stats_ref`
    with ``k = stats_k`` (the full distribution at temperature 1, whatever the
    filters; the draw does not depend on it).
    """
    if stats_k:
        tokens, logprobs = sample_ref(logits, temperature, top_k, top_p, min_p, seed, offset, stream)
        return tokens, logprobs, sample_stats_ref(logits, stats_k)
    R, V = logits.shape
    dev = logits.device
    T = _per_row(temperature, R, torch.float32, dev)
    k = _per_row(top_k, R, torch.int64, dev)
    p_top = _per_row(top_p, R, torch.float64, dev)
    p_min = _per_row(min_p, R, torch.float32, dev)
    greedy = ~(T > 0)
    x = logits.float() / torch.where(greedy, torch.ones_like(T), T).unsqueeze(1)
    # NaN and +inf (after scaling) are overflow garbage, never a choice: -inf.
    x = torch.where(torch.isnan(x) | torch.isposinf(x), torch.full_like(x, float("-inf")), x)
    m = x.max(dim=1, keepdim=True).values
    dead = torch.isneginf(m).squeeze(1)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(x - m_safe)
    is_max = (x == m) & ~torch.isneginf(x)

    # top-k: every token at least as large as the k-th largest value.
    k_eff = torch.where((k > 0) & (k < V), k, torch.full_like(k, V))
    desc = torch.sort(x, dim=1, descending=True).values
    keep = x >= desc.gather(1, (k_eff - 1).unsqueeze(1))

    # top-p on the top-k distribution: mass of strictly more probable kept tokens.
    e_k = torch.where(keep, e, torch.zeros_like(e)).double()
    order = torch.sort(x, dim=1, descending=True)
    cum = torch.cumsum(e_k.gather(1, order.indices), dim=1)
    cum_excl = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)
    ascending = order.values.flip(1).contiguous()
    n_greater = V - torch.searchsorted(ascending, x.contiguous(), right=True)  # tokens with x_u > x_v
    mass_above = cum_excl.gather(1, n_greater)
    z_k = e_k.sum(dim=1, keepdim=True)
    keep_p = (mass_above < p_top.unsqueeze(1) * z_k) | ~(p_top < 1).unsqueeze(1)
    keep &= keep_p

    # min-p: p_v >= min_p * p_max, i.e. e_v >= min_p (the ratio does not depend on Z).
    keep &= (e >= p_min.unsqueeze(1)) | ~(p_min > 0).unsqueeze(1)
    keep = (keep | is_max) & ~torch.isneginf(x)

    u = sample_uniform_ref(seed, offset, R, V, dev, stream)
    race = torch.where(keep, e / -torch.log(u), torch.full_like(e, -1.0))
    tokens = race.argmax(dim=1)  # first maximum: the lowest index on ties
    z = torch.where(keep, e, torch.zeros_like(e)).sum(dim=1)
    logprobs = (x.gather(1, tokens.unsqueeze(1)).squeeze(1) - m_safe.squeeze(1)) - torch.log(z)

    tokens = torch.where(greedy, x.argmax(dim=1), tokens)
    logprobs = torch.where(greedy, torch.zeros_like(logprobs), logprobs)
    tokens = torch.where(dead, torch.zeros_like(tokens), tokens)
    logprobs = torch.where(dead, torch.full_like(logprobs, float("-inf")), logprobs)
    return tokens, logprobs


def sample_stats_ref(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Confidence statistics of each row's full distribution at temperature 1: float32 ``[R, 3]``.

    With ``x = logits.float()`` (NaN and +inf -> -inf, as in :func:`sample_ref`) and
    ``lp = log_softmax(x, -1)`` over the whole vocabulary (no temperature, no filter)::

        stats[:, 0] = -mean(top-k of lp),  k = min(k, V)   # token confidence (DeepConf, Fu et al. 2025)
        stats[:, 1] = -sum(p * lp),  p = exp(lp)           # entropy; p == 0 terms count 0
        stats[:, 2] = -log(V) - mean(lp)                    # self-certainty, KL(uniform || p) (Kang et al. 2025)

    Larger confidence and self-certainty mean a more peaked distribution; all
    three are >= 0. Rows with -inf logits: self-certainty is +inf (p puts no mass
    where the uniform distribution does), and so is the confidence when fewer than
    ``k`` logits are finite (a -inf among the top k); the entropy stays finite. A
    row with no finite logit gives NaN in all three.

    Computed in float64 here (unlike the other references): near a point mass the
    statistics are tiny differences (log Z = log(1 + small)) that float32's
    log_softmax rounds away; the kernels get them by summing Z - 1 apart.
    """
    R, V = logits.shape
    k = max(1, min(int(k), V))
    x = logits.double()
    x = torch.where(torch.isnan(x) | torch.isposinf(x), torch.full_like(x, float("-inf")), x)
    dead = torch.isneginf(x.max(dim=1).values)
    lp = torch.log_softmax(x, dim=1)
    p = lp.exp()
    conf = -lp.topk(k, dim=1).values.mean(dim=1)
    ent = -torch.where(p > 0, p * lp, torch.zeros_like(lp)).sum(dim=1)
    sc = -math.log(V) - lp.mean(dim=1)
    stats = torch.stack([conf, ent, sc], dim=1)
    return torch.where(dead.unsqueeze(1), torch.full_like(stats, float("nan")), stats).float()


def sample_op_ref(logits, temperature, top_k, top_p, min_p, seed, offset, temperatures, top_ks, top_ps, min_ps,
                  seeds, offsets, streams=None, stats_k=0, stats=None):
    """``torch.ops.tts.sample``'s argument layout (scalars, each overridden by its
    per-row tensor when given) on top of :func:`sample_ref`. ``stats`` (optional
    float32 ``[R, 3]``, written in place) receives :func:`sample_stats_ref` with ``stats_k``."""
    def pick(scalar, tensor):
        return scalar if tensor is None else tensor

    if stats is not None:
        stats.copy_(sample_stats_ref(logits, stats_k))
    return sample_ref(logits, pick(temperature, temperatures), pick(top_k, top_ks), pick(top_p, top_ps),
                      pick(min_p, min_ps), pick(seed, seeds), pick(offset, offsets), streams)


class SlidingWindowRef:
    """Plain-Python meaning of :class:`tts_kernels.ops.confidence.SlidingWindow` (lists, one per row).

    ``mean``: the mean of the last ``min(count, window)`` values pushed (NaN before the first);
    ``lowest``: the smallest ``mean`` after any push that left ``count >= window`` (NaN means
    skipped; +inf until the first full window).
    """

    def __init__(self, rows: int, window: int):
        self.window = window
        self.values = [[] for _ in range(rows)]
        self.lowest = [math.inf] * rows

    def push(self, values, active) -> None:
        for r, (v, a) in enumerate(zip(values, active)):
            if not a:
                continue
            self.values[r].append(float(v))
            m = self.mean[r]
            if len(self.values[r]) >= self.window and not math.isnan(m):
                self.lowest[r] = min(self.lowest[r], m)

    @property
    def count(self) -> list[int]:
        return [len(v) for v in self.values]

    @property
    def mean(self) -> list[float]:
        out = []
        for vals in self.values:
            last = vals[-self.window:]
            out.append(sum(last) / len(last) if last else math.nan)
        return out

    def select(self, idx) -> "SlidingWindowRef":
        new = SlidingWindowRef(0, self.window)
        new.values = [list(self.values[int(i)]) for i in idx]
        new.lowest = [self.lowest[int(i)] for i in idx]
        return new


# ----------------------------------------------------------------------------- particle resampling


def _normalized_ref(log_weights: torch.Tensor, temperature: float = 1.0) -> list[list[float]]:
    """Each row's ``softmax(log_weights / temperature)`` as Python floats (a row of -inf/NaN only: uniform)."""
    out = []
    for row in log_weights.double().tolist():
        x = [float("-inf") if v != v else v / temperature for v in row]
        top = max(x)
        if top == float("-inf"):
            out.append([1.0 / len(x)] * len(x))
            continue
        e = [math.exp(v - top) for v in x]
        s = sum(e)
        out.append([v / s for v in e])
    return out


def ess_ref(log_weights: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``1 / sum w_i^2`` per row of the normalised weights."""
    return torch.tensor([1.0 / sum(w * w for w in row) for row in _normalized_ref(log_weights, temperature)],
                        dtype=torch.float64)


def normalized_entropy_ref(log_weights: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``-sum w log w / log N`` per row (1 when ``N = 1``)."""
    out = []
    for row in _normalized_ref(log_weights, temperature):
        n = len(row)
        out.append(1.0 if n == 1 else -sum(w * math.log(w) for w in row if w > 0) / math.log(n))
    return torch.tensor(out, dtype=torch.float64)


def resample_ref(log_weights: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF resampling: for each row and each position ``x`` in ``(0, 1)`` (``positions [P, K]``),
    the first slot ``i`` whose cumulative weight ``w_0 + ... + w_i`` exceeds ``x``. Systematic
    resampling passes ``x_k = (u + k) / N``; multinomial passes ``N`` sorted uniforms."""
    out = []
    for w, xs in zip(_normalized_ref(log_weights), positions.double().tolist()):
        total = sum(w)
        picks = []
        for x in xs:
            acc, pick = 0.0, len(w) - 1
            for i, wi in enumerate(w):
                acc += wi
                if acc / total > x:
                    pick = i
                    break
            picks.append(pick)
        out.append(picks)
    return torch.tensor(out, dtype=torch.int64)


def thinking_ref(logits: torch.Tensor, state: dict, forced: list[list[int]], marker: list[int], eos: list[int],
                 min_tokens: int, max_tokens: int | None):
    """One decode step of a thinking budget for one row, in plain Python (``ops.thinking``'s meaning).

    ``logits [V]``; ``state``: a dict with ``thought``, ``answering``, ``fseq``, ``fpos``, ``injections``,
    ``mpos`` (ints); ``forced``: the continuations' ids then the end sequence's (marker + answer prefix).
    Returns ``(logits', update)`` where ``update(token) -> new state dict``."""
    W, M = len(forced) - 1, len(marker)
    x = logits.double().clone()
    s = dict(state)
    limit = float("inf") if max_tokens is None else max_tokens
    thinking, forcing = s["answering"] == 0, s["fpos"] >= 0
    at_max = thinking and not forcing and s["thought"] >= limit
    below = thinking and not forcing and not at_max and s["thought"] < min_tokens
    if forcing or at_max:
        allowed = forced[W][0] if at_max else forced[s["fseq"]][s["fpos"]]
        keep = x[allowed].item()
        x[:] = float("-inf")
        x[allowed] = keep if keep == keep else float("-inf")
    elif below:
        c = forced[s["injections"] % W][0]
        stops = set(eos) | ({marker[-1]} if s["mpos"] == M - 1 else set())
        stops.discard(c)
        vals = [x[c].item()] + [x[t].item() for t in stops]
        top = max(vals)
        if top != float("-inf"):
            x[c] = top + math.log(sum(math.exp(v - top) for v in vals))
        for t in stops:
            x[t] = float("-inf")

    def update(token: int) -> dict:
        n = dict(s)
        if not thinking and not forcing:
            return n
        if thinking:
            n["thought"] += 1
        if forcing:
            n["fpos"] += 1
            if s["fseq"] == W and n["fpos"] == M:
                n["answering"] = 1
        elif at_max:
            n["fseq"], n["fpos"] = W, 1
            if M == 1:
                n["answering"] = 1
        elif below and token == forced[s["injections"] % W][0]:
            n["injections"] += 1
            n["fseq"], n["fpos"] = s["injections"] % W, 1
        else:
            n["mpos"] = s["mpos"] + 1 if token == marker[s["mpos"]] else int(token == marker[0])
            if n["mpos"] == M:
                n["answering"], n["mpos"] = 1, 0
            return n
        n["mpos"] = 0
        if n["fpos"] >= len(forced[n["fseq"]]):
            n["fpos"] = -1
        return n

    return x.to(logits.dtype), update
