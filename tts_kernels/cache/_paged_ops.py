"""The bookkeeping of :class:`~tts_kernels.cache.PagedKVCache` as batched tensor ops.

Every function here works on whole batches of sequences with tensor ops on the
cache's device: no Python loop over sequences or blocks, and nothing read back to
the host on the commit path. Each mutating function runs in two phases:

1. *check*: compute, on the device, an error word (bit set per failed check) and
   everything the commit needs;
2. *commit*: write the new state with every scatter index routed to a trash slot
   when the error word is non-zero, so a failed call changes nothing.

Between the two the caller (``paged.py``) either reads the error word and raises
(``strict``: the CPU default, where a read costs nothing), or folds it into the
cache's deferred status and lets the commit run masked (CUDA: no host sync; the
error is raised at the next call that syncs anyway).

Trash slots: the block pools have one extra block (index ``num_blocks``), the
block table one extra row (``max_seqs``), the reference counts and the free
stack one extra entry each. Nothing ever reads them as data.

State (all on the device; ``NB`` blocks of ``P`` tokens, ``S`` sequence slots,
``MB`` table columns):

* ``k_pool, v_pool [L, NB+1, H, P, D]``;
* ``tables [S+1, MB]`` int64 block ids; entries ``j < held[s]`` are the blocks
  sequence ``s`` holds (one reference each), the rest are -1 or stale;
* ``held [S+1]`` blocks held; ``lens [S+1]`` committed token counts;
  ``pend [S+1]`` token counts including the step in progress;
* ``alive [S+1]`` bool; ``refs [NB+1]`` int64 reference counts (number of
  table entries, over all live sequences, that name the block);
* ``stack [NB+1]`` free block ids, ``stack[:n_free]`` valid; ``n_free`` 0-dim.

Invariants (tested by tests/test_paged_cache_fuzz.py): ``refs[b]`` equals the
number of live table entries naming ``b``; a block is on the free stack exactly
when ``refs[b] == 0``; ``held[s] >= ceil(lens[s] / P)``.
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

# Error bits. The messages (which name the argument) live in paged.py.
BAD_ID = 1          # id outside [0, max_seqs)
NOT_ALIVE = 2       # never allocated, or freed
DUPLICATE = 4       # an id listed twice where each must be written once
EXHAUSTED = 8       # not enough free blocks
TOO_LONG = 16       # a sequence would exceed max_seq_len
BAD_START = 32      # start outside [0, t]
BAD_LENGTH = 64     # a truncation length outside [0, the sequence's length]


@dataclass
class PagedState:
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    tables: torch.Tensor
    held: torch.Tensor
    lens: torch.Tensor
    pend: torch.Tensor
    alive: torch.Tensor
    refs: torch.Tensor
    stack: torch.Tensor
    n_free: torch.Tensor
    block_size: int

    @property
    def num_blocks(self) -> int:
        return self.refs.shape[0] - 1

    @property
    def max_seqs(self) -> int:
        return self.alive.shape[0] - 1

    @property
    def max_blocks(self) -> int:
        return self.tables.shape[1]


def _zeros(shape, dtype, dev: torch.device) -> torch.Tensor:
    """Zeros. On the CPU from an anonymous mapping, whose pages the OS zeroes when first touched:
    a pool sized for the worst case is mostly never touched, and ``torch.zeros`` would write all of
    it up front (0.15 s per pool in a 640-row particle filter)."""
    if dev.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=dev)
    n = math.prod(shape)
    if n == 0:
        return torch.zeros(shape, dtype=dtype)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


def new_state(num_layers, num_kv_heads, head_dim, num_blocks, block_size, max_seqs, max_blocks,
              dtype, device) -> PagedState:
    dev = torch.device(device)
    i64 = dict(dtype=torch.int64, device=dev)
    pool_shape = (num_layers, num_blocks + 1, num_kv_heads, block_size, head_dim)
    return PagedState(
        k_pool=_zeros(pool_shape, dtype, dev),
        v_pool=_zeros(pool_shape, dtype, dev),
        tables=torch.full((max_seqs + 1, max_blocks), -1, **i64),
        held=torch.zeros(max_seqs + 1, **i64),
        lens=torch.zeros(max_seqs + 1, **i64),
        pend=torch.zeros(max_seqs + 1, **i64),
        alive=torch.zeros(max_seqs + 1, dtype=torch.bool, device=dev),
        refs=torch.zeros(num_blocks + 1, **i64),
        # Popped from the top: block 0 is handed out first.
        stack=torch.cat([torch.arange(num_blocks - 1, -1, -1, **i64), torch.full((1,), -1, **i64)]),
        n_free=torch.tensor(num_blocks, **i64),
        block_size=block_size,
    )


def _bit(cond: torch.Tensor, bit: int) -> torch.Tensor:
    return torch.where(cond.any(), bit, 0)


def check_ids(st: PagedState, ids: torch.Tensor, *, distinct: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Error word for a list of sequence ids, and the ids clamped into range (safe to index with)."""
    S = st.max_seqs
    in_range = (ids >= 0) & (ids < S)
    safe = torch.where(in_range, ids, S)
    err = _bit(~in_range, BAD_ID) | _bit(in_range & ~st.alive[safe], NOT_ALIVE)
    if distinct and ids.numel() > 1:
        counts = torch.zeros(S + 1, dtype=torch.int64, device=ids.device).index_add_(0, safe, torch.ones_like(safe))
        err = err | _bit(counts[:S] > 1, DUPLICATE)
    return err, safe


def clean_trash(st: PagedState) -> None:
    """Reset the trash row/count after masked writes, so an id clamped to it reads as an empty sequence."""
    S, NB = st.max_seqs, st.num_blocks
    st.tables[S] = -1
    st.held[S] = 0
    st.lens[S] = 0
    st.pend[S] = 0
    st.alive[S] = False
    st.refs[NB] = 0


def _row_mask(held: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width, device=held.device) < held[:, None]


def _push_freed(st: PagedState, delta: torch.Tensor, ok: torch.Tensor) -> None:
    """Apply ``refs += delta`` (``ok`` only) and push the blocks that reached zero on the free stack."""
    NB = st.num_blocks
    delta = torch.where(ok, delta, 0)
    new_refs = st.refs + delta
    freed = (new_refs == 0) & (delta != 0)
    freed[NB] = False
    pos = st.n_free + torch.cumsum(freed, 0) - 1
    st.stack.index_put_((torch.where(freed, pos, NB),), torch.arange(NB + 1, device=delta.device))
    st.n_free += freed.sum()
    st.refs.copy_(new_refs)
    st.refs[NB] = 0


# --------------------------------------------------------------------------- allocate / free


def allocate(st: PagedState, ids: torch.Tensor) -> None:
    """Mark host-chosen free slots ``ids`` as live, empty sequences."""
    st.alive[ids] = True
    st.lens[ids] = 0
    st.pend[ids] = 0
    st.held[ids] = 0
    st.tables[ids] = -1


def free(st: PagedState, ids: torch.Tensor, ok: torch.Tensor) -> None:
    """Release every block reference of ``ids`` (checked, distinct, live) and mark them dead."""
    NB, S, MB = st.num_blocks, st.max_seqs, st.max_blocks
    rows = st.tables[ids]
    live = _row_mask(st.held[ids], MB)
    delta = torch.zeros(NB + 1, dtype=torch.int64, device=ids.device)
    delta.index_add_(0, torch.where(live, rows, NB).flatten(), torch.full_like(rows, -1).flatten())
    _push_freed(st, delta, ok)
    safe = torch.where(ok, ids, S)
    st.alive[safe] = False
    st.lens[safe] = 0
    st.pend[safe] = 0
    st.held[safe] = 0
    st.tables[safe] = -1


# --------------------------------------------------------------------------- fork / reorder


def fork(st: PagedState, parents: torch.Tensor, new_ids: torch.Tensor, ok: torch.Tensor) -> None:
    """``new_ids[i]`` becomes a sequence sharing all of ``parents[i]``'s blocks (no KV bytes move)."""
    NB, S, MB = st.num_blocks, st.max_seqs, st.max_blocks
    rows = st.tables[parents]
    held = st.held[parents]
    live = _row_mask(held, MB)
    delta = torch.zeros(NB + 1, dtype=torch.int64, device=parents.device)
    delta.index_add_(0, torch.where(live, rows, NB).flatten(), live.to(torch.int64).flatten())
    st.refs += torch.where(ok, delta, 0)
    st.refs[NB] = 0
    dst = torch.where(ok, new_ids, S)
    st.tables[dst] = rows
    st.held[dst] = held
    st.lens[dst] = st.lens[parents]
    st.pend[dst] = st.lens[parents]
    st.alive[dst] = True
    st.alive[S] = False


def truncate(st: PagedState, ids: torch.Tensor, lens: torch.Tensor, ok: torch.Tensor) -> None:
    """``ids[i]`` (checked, distinct, live) keeps its first ``lens[i]`` tokens (``0 <= lens[i] <=`` its
    length): the blocks past ``ceil(lens[i] / P)`` are released; a kept partial block that another
    sequence also holds stays shared, and the next append copies it first (copy-on-write)."""
    NB, S, MB, P = st.num_blocks, st.max_seqs, st.max_blocks, st.block_size
    lens = torch.minimum(lens.clamp(min=0), st.lens[ids])
    rows, held = st.tables[ids], st.held[ids]
    keep = torch.minimum((lens + P - 1) // P, held)
    drop = _row_mask(held, MB) & ~_row_mask(keep, MB)
    delta = torch.zeros(NB + 1, dtype=torch.int64, device=ids.device)
    delta.index_add_(0, torch.where(drop, rows, NB).flatten(), -drop.to(torch.int64).flatten())
    _push_freed(st, delta, ok)
    dst = torch.where(ok, ids, S)
    st.tables[dst] = torch.where(drop, -1, rows)
    st.held[dst] = keep
    st.lens[dst] = lens
    st.pend[dst] = lens


def reorder(st: PagedState, ids: torch.Tensor, parents: torch.Tensor, ok: torch.Tensor) -> None:
    """Beam step: ``ids[i]`` takes ``parents[i]``'s history as it was before the call."""
    NB, S, MB = st.num_blocks, st.max_seqs, st.max_blocks
    new_rows, new_held, new_lens = st.tables[parents], st.held[parents], st.lens[parents]  # snapshots
    old_rows, old_held = st.tables[ids], st.held[ids]
    new_live, old_live = _row_mask(new_held, MB), _row_mask(old_held, MB)
    delta = torch.zeros(NB + 1, dtype=torch.int64, device=ids.device)
    delta.index_add_(0, torch.where(new_live, new_rows, NB).flatten(), new_live.to(torch.int64).flatten())
    delta.index_add_(0, torch.where(old_live, old_rows, NB).flatten(), -old_live.to(torch.int64).flatten())
    _push_freed(st, delta, ok)
    dst = torch.where(ok, ids, S)
    st.tables[dst] = new_rows
    st.held[dst] = new_held
    st.lens[dst] = new_lens
    st.pend[dst] = new_lens


# --------------------------------------------------------------------------- append


@dataclass
class StepPlan:
    """What the first append of a step decided: where each new token goes, and the CoW copies
    (``copy_*`` are None when the C++ backend already made the copies)."""

    blk: torch.Tensor        # [n, t] destination block per new-token slot (trash block when masked)
    slot: torch.Tensor       # [n, t] destination slot within the block
    copy_src: torch.Tensor | None = None   # [c] blocks to copy from (copy-on-write), all layers
    copy_dst: torch.Tensor | None = None   # [c] their fresh private copies
    copy_mask: torch.Tensor | None = None  # [c] bool when copies are masked rather than compacted (CUDA)


def plan_step(st: PagedState, ids: torch.Tensor, t: int, start: torch.Tensor | None, max_seq_len: int,
              *, compact: bool) -> tuple[torch.Tensor, dict]:
    """Check phase of a step's first append. Returns (error word, everything the commit needs)."""
    P, NB, MB = st.block_size, st.num_blocks, st.max_blocks
    dev = ids.device
    n = ids.shape[0]
    err, ids = check_ids(st, ids, distinct=True)
    if start is None:
        start = torch.zeros(n, dtype=torch.int64, device=dev)
    else:
        start = start.to(torch.int64)
        err = err | _bit((start < 0) | (start > t), BAD_START)
        start = start.clamp(0, t)
    count = t - start
    L0 = st.lens[ids]
    L1 = L0 + count
    err = err | _bit(L1 > max_seq_len, TOO_LONG)
    need = (L1 + P - 1) // P
    held = st.held[ids]

    J = (t + P - 1) // P + 1  # a row's new tokens touch at most this many blocks
    j = (L0 // P)[:, None] + torch.arange(J, device=dev)  # [n, J] block index within the row
    touched = (count > 0)[:, None] & (j < need[:, None])
    existing = touched & (j < held[:, None])
    jc = j.clamp(max=MB - 1)
    b_old = torch.where(existing, st.tables[ids[:, None], jc], NB)
    shared = existing & (st.refs[b_old] > 1)
    # Copy-on-write: a row whose block is shared copies it, except that when every
    # holder of the block is in this call, the last of them keeps it (nobody else
    # can see it any more), so N forks of one parent make N-1 copies, not N.
    bo = torch.where(shared, b_old, NB).flatten()
    flat = torch.arange(n * J, device=dev)
    holders = torch.zeros(NB + 1, dtype=torch.int64, device=dev).index_add_(0, bo, torch.ones_like(bo))
    last = torch.full((NB + 1,), -1, dtype=torch.int64, device=dev).scatter_reduce_(0, bo, flat, "amax")
    keep = shared.flatten() & (st.refs[bo] == holders[bo]) & (flat == last[bo])
    copy = shared.flatten() & ~keep
    fresh = (touched & ~existing).flatten()
    take = copy | fresh
    k = take.sum()
    err = err | torch.where(k > st.n_free, EXHAUSTED, 0)

    rank = torch.cumsum(take, 0) - 1
    newb = torch.where(take, st.stack[(st.n_free - 1 - rank).clamp(0, NB)], NB)
    # New-token destinations: token s of row i goes to position L0 + s - start.
    s = torch.arange(t, device=dev)
    pos = L0[:, None] + s - start[:, None]
    valid = s >= start[:, None]
    jj = (pos.clamp(min=0) // P - (L0 // P)[:, None]).clamp(0, J - 1)  # which touched block
    blk_old = torch.where(existing, st.tables[ids[:, None], jc], NB)
    blk_row = torch.where(take.view(n, J), newb.view(n, J), blk_old)
    blk = torch.where(valid, blk_row.gather(1, jj), NB)
    plan = dict(ids=ids, j=jc, take=take.view(n, J), newb=newb.view(n, J), copy=copy, b_old=b_old.flatten(),
                k=k, need=need, held=held, L1=L1, blk=blk, slot=pos.clamp(min=0) % P, compact=compact)
    return err, plan


def commit_step(st: PagedState, plan: dict, ok: torch.Tensor) -> StepPlan:
    NB, S = st.num_blocks, st.max_seqs
    ids, take, newb, copy = plan["ids"], plan["take"], plan["newb"], plan["copy"]
    st.n_free -= torch.where(ok, plan["k"], 0)
    st.refs.index_put_((torch.where(ok & take, newb, NB).flatten(),), torch.ones_like(newb).flatten())
    st.refs.index_add_(0, torch.where(ok & copy, plan["b_old"], NB), torch.full_like(plan["b_old"], -1))
    st.refs[NB] = 0
    rows = torch.where(ok & take, ids[:, None].expand_as(take), S)
    st.tables.index_put_((rows, plan["j"]), newb)
    st.tables[S] = -1
    dst = torch.where(ok, ids, S)
    st.held[dst] = torch.maximum(plan["held"], plan["need"])
    st.pend.copy_(st.lens)
    st.pend[dst] = plan["L1"]
    src, cdst = plan["b_old"], newb.flatten()
    mask = ok & copy
    if plan["compact"]:
        sel = mask.nonzero().squeeze(1)  # host read: used on CPU only, where it costs nothing
        src, cdst, mask = src[sel], cdst[sel], None
    blk = torch.where(ok, plan["blk"], NB)
    return StepPlan(blk=blk, slot=plan["slot"], copy_src=src, copy_dst=cdst, copy_mask=mask)


def copy_blocks(st: PagedState, plan: StepPlan) -> None:
    """Copy-on-write: the shared blocks' contents into their new private copies, every layer, K and V."""
    if plan.copy_mask is None:
        if plan.copy_src.numel():
            for pool in (st.k_pool, st.v_pool):
                pool[:, plan.copy_dst] = pool[:, plan.copy_src]
        return
    masked_copy(st.k_pool, st.v_pool, plan.copy_src, plan.copy_dst, plan.copy_mask)


def _masked_copy_torch(k_pool, v_pool, src, dst, mask) -> None:
    # No host read: entries that need no copy copy the trash block onto itself (bytes wasted,
    # which is why CUDA uses the Triton kernel instead).
    NB = k_pool.shape[1] - 1
    src = torch.where(mask, src, NB)
    dst = torch.where(mask, dst, NB)
    for pool in (k_pool, v_pool):
        pool[:, dst] = pool[:, src]


def masked_copy(k_pool, v_pool, src, dst, mask) -> None:
    """Copy block ``src[c] -> dst[c]`` on every layer where ``mask[c]``, without reading ``mask`` on the host."""
    if k_pool.is_cuda:
        from ..triton.paged_cache import copy_blocks_triton

        copy_blocks_triton(k_pool, v_pool, src, dst, mask)
    else:
        _masked_copy_torch(k_pool, v_pool, src, dst, mask)


def write_tokens(st: PagedState, layer: int, plan: StepPlan, k: torch.Tensor, v: torch.Tensor) -> None:
    """Scatter ``k, v [n, H, t, D]`` of one layer into the slots the plan chose (masked ones to trash)."""
    for pool, x in ((st.k_pool, k), (st.v_pool, v)):
        # [NB+1, P, H, D] view: (block, slot) index pairs address one token's [H, D] row.
        pool[layer].transpose(1, 2).index_put_((plan.blk, plan.slot), x.permute(0, 2, 1, 3).to(pool.dtype))


def commit_lengths(st: PagedState) -> None:
    st.lens.copy_(st.pend)


# --------------------------------------------------------------------------- reads


def gather(st: PagedState, layer: int, ids: torch.Tensor, lens: torch.Tensor, T: int):
    """Dense ``[n, H, T, D]`` keys and values of ``ids`` at ``layer``; positions >= lens are zero."""
    P = st.block_size
    pos = torch.arange(T, device=ids.device)
    valid = pos < lens[:, None]
    col = (pos // P).clamp(max=st.max_blocks - 1)
    blk = torch.where(valid, st.tables[ids[:, None], col], st.num_blocks)
    out = []
    for pool in (st.k_pool, st.v_pool):
        x = pool[layer][blk, :, pos % P]  # [n, T, H, D]
        x = torch.where(valid[:, :, None, None], x, 0)
        out.append(x.permute(0, 2, 1, 3).contiguous())
    return out[0], out[1]
