"""PagedKVCache: the step rule, forks without copies, copy-on-write, views, and bad input.

(Long random sequences of operations are in test_paged_cache_fuzz.py.)
"""
import pytest
import torch

from tts_kernels import _ext
from tts_kernels.cache import CacheError, PagedKVCache

L, H, D, P = 3, 2, 5, 4
BACKENDS = ["torch"] + (["cpp"] if _ext.HAS_C else [])


def make(backend="torch", **kw):
    kw.setdefault("num_blocks", 32)
    kw.setdefault("block_size", P)
    return PagedKVCache(L, H, D, backend=backend, **kw)


def step(cache, ids, t, start=None, dtype=torch.float32):
    kv = [(torch.randn(len(ids), H, t, D, dtype=dtype), torch.randn(len(ids), H, t, D, dtype=dtype)) for _ in range(L)]
    for layer, (k, v) in enumerate(kv):
        cache.append(layer, ids, k, v, start=start)
    return kv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prefill_then_decode_roundtrip(backend, dtype):
    c = make(backend, dtype=dtype)
    ids = c.allocate(3)
    a = step(c, ids, 7, dtype=dtype)
    b = step(c, ids, 1, dtype=dtype)
    assert c.lengths(ids).tolist() == [8, 8, 8]
    for layer in range(L):
        k, v = c.gather(layer, ids)
        assert k.dtype == dtype and k.shape == (3, H, 8, D)
        assert torch.equal(k, torch.cat([a[layer][0], b[layer][0]], 2))
        assert torch.equal(v, torch.cat([a[layer][1], b[layer][1]], 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_rule_lengths_advance_after_last_layer(backend):
    c = make(backend)
    ids = c.allocate(2)
    step(c, ids, 5)
    k, v = torch.randn(2, H, 2, D), torch.randn(2, H, 2, D)
    c.append(0, ids, k, v)
    assert c.lengths(ids).tolist() == [5, 5]  # not yet: layers 1.. are unwritten
    assert c.layer_view(0, ids)[3].tolist() == [7, 7]  # layer 0 already holds them
    assert c.layer_view(1, ids)[3].tolist() == [5, 5]
    assert c.gather(0, ids)[0].shape[2] == 7 and c.gather(1, ids)[0].shape[2] == 5
    with pytest.raises(ValueError, match="out of order"):
        c.append(2, ids, k, v)
    with pytest.raises(ValueError, match="same 2 sequences"):
        c.append(1, ids, k[:, :, :1], v[:, :, :1])
    with pytest.raises(CacheError, match="step is in progress"):
        c.fork(ids)
    with pytest.raises(CacheError, match="step is in progress"):
        c.reorder(ids, ids)
    with pytest.raises(CacheError, match="step is in progress"):
        c.free(ids)
    c.append(1, ids, k, v)
    c.append(2, ids, k, v)
    assert c.lengths(ids).tolist() == [7, 7]


@pytest.mark.parametrize("backend", BACKENDS)
def test_abandoned_step_is_invisible_and_blocks_are_reused(backend):
    c = make(backend)
    ids = c.allocate(1)
    kv = step(c, ids, 3)
    c.append(0, ids, torch.randn(1, H, 6, D), torch.randn(1, H, 6, D))  # reserves 2 more blocks
    c.abort_step()
    assert c.lengths(ids).tolist() == [3]
    assert torch.equal(c.gather(0, ids)[0], kv[0][0])
    free = c.num_free_blocks
    step(c, ids, 6)  # reuses the reserved blocks
    assert c.num_free_blocks == free
    c.free(ids)
    assert c.num_free_blocks == 32


@pytest.mark.parametrize("backend", BACKENDS)
def test_best_of_n_fork_shares_everything_and_copies_one_tail_per_child(backend):
    c = make(backend, num_blocks=64)
    root = c.allocate(1)
    prompt = step(c, root, 10)  # 2 full blocks + a partial one (2 of 4 slots)
    used = 64 - c.num_free_blocks
    assert used == 3
    kids = c.fork(root.repeat(8))
    assert c.num_free_blocks == 64 - used, "fork must not take blocks"
    c.free(root)  # the root's blocks stay: the children hold them
    assert c.num_free_blocks == 64 - used
    new = step(c, kids, 1)
    # 8 holders of the shared partial block, all in the step: 7 copies and the last keeps it.
    assert 64 - c.num_free_blocks == used + 7
    for layer in range(L):
        k, _ = c.gather(layer, kids)
        for r in range(8):
            assert torch.equal(k[r, :, :10], prompt[layer][0][0])
            assert torch.equal(k[r, :, 10], new[layer][0][r, :, 0])
    tables = c.block_tables[kids]
    assert (tables[:, :2] == tables[0, :2]).all(), "full prompt blocks stay shared"
    assert len(set(tables[:, 2].tolist())) == 8, "each child owns its tail block"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fork_then_parent_writes_sibling_unchanged(backend):
    c = make(backend)
    a = c.allocate(1)
    hist = step(c, a, 5)
    (b,) = c.fork(a).tolist()
    b = torch.tensor([b])
    step(c, a, 2)  # a's tail block is shared with b: copied before it is written
    for layer in range(L):
        assert torch.equal(c.gather(layer, b)[0], hist[layer][0])
        assert torch.equal(c.gather(layer, b)[1], hist[layer][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reorder_moves_no_kv_bytes_and_is_a_snapshot(backend):
    c = make(backend, num_blocks=64)
    ids = c.allocate(4)
    hist = step(c, ids, 6)
    pool_before = c.k_pool.clone()
    free_before = c.num_free_blocks
    parents = torch.tensor([2, 0, 0, 3])  # ids 0..3 take 2, 0, 0, 3 (1 dropped; 0 read after being overwritten)
    c.reorder(ids, ids[parents])
    assert torch.equal(c.k_pool, pool_before), "reorder must not move KV bytes"
    # Sequence 1's blocks are dropped (2 blocks: 6 tokens at P=4).
    assert c.num_free_blocks == free_before + 2
    for layer in range(L):
        k, _ = c.gather(layer, ids)
        for i, p in enumerate(parents.tolist()):
            assert torch.equal(k[i], hist[layer][0][p])
    # Ids 1 and 2 now share the old sequence 0's blocks (id 0 took 2's, which nobody else
    # holds). The next step copies that shared tail once: two holders, both stepping, so
    # the last keeps it.
    free = c.num_free_blocks
    step(c, ids, 1)
    assert free - c.num_free_blocks == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_start_skips_left_padding(backend):
    c = make(backend)
    ids = c.allocate(3)
    kv = step(c, ids, 5, start=torch.tensor([0, 2, 5]))
    assert c.lengths(ids).tolist() == [5, 3, 0]
    k, _ = c.gather(0, ids)
    assert torch.equal(k[1, :, :3], kv[0][0][1, :, 2:])
    assert (k[2] == 0).all() and (k[1, :, 3:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_change_nothing(backend):
    c = make(backend, num_blocks=4, max_seqs=4, max_seq_len=12)
    ids = c.allocate(2)
    step(c, ids, 3)
    snap = [x.clone() for x in c._state_list] + [c.k_pool[:, :-1].clone()]

    def unchanged():
        for a, b in zip(snap, [x for x in c._state_list] + [c.k_pool[:, :-1]]):
            assert torch.equal(a, b)

    big = torch.randn(2, H, 9, D)
    with pytest.raises(CacheError, match="max_seq_len=12"):
        c.append(0, ids, big.repeat(1, 1, 2, 1)[:, :, :10], big.repeat(1, 1, 2, 1)[:, :, :10])
    unchanged()
    with pytest.raises(CacheError, match="exhausted"):
        c.append(0, ids, big, big)  # needs 2 x 2 new blocks + 0, only 2 free
    unchanged()
    with pytest.raises(CacheError, match="never allocated or was freed"):
        c.fork(torch.tensor([3]))
    with pytest.raises(CacheError, match="outside"):
        c.reorder(ids, torch.tensor([0, 7]))
    with pytest.raises(CacheError, match="more than once"):
        c.reorder(torch.tensor([0, 0]), ids)
    with pytest.raises(CacheError, match="more than once"):
        c.free(torch.tensor([1, 1]))
    unchanged()
    c.free(ids[:1])
    with pytest.raises(CacheError, match="never allocated or was freed"):
        c.free(ids[:1])  # double free
    with pytest.raises(CacheError, match="slots are free"):
        c.allocate(4)
    with pytest.raises(CacheError, match="start values"):
        c.append(0, ids[1:], torch.randn(1, H, 2, D), torch.randn(1, H, 2, D), start=torch.tensor([3]))
    step(c, ids[1:], 2)  # still usable
    assert c.lengths(ids[1:]).tolist() == [5]


def test_bad_arguments_name_the_argument():
    c = make()
    ids = c.allocate(2)
    k = torch.randn(2, H, 1, D)
    with pytest.raises(ValueError, match="num_blocks"):
        PagedKVCache(1, 1, 1, num_blocks=0)
    with pytest.raises(TypeError, match="dtype"):
        PagedKVCache(1, 1, 1, num_blocks=4, dtype=torch.int32)
    with pytest.raises(ValueError, match="backend"):
        PagedKVCache(1, 1, 1, num_blocks=4, backend="cuda")
    with pytest.raises(TypeError, match="seq_ids"):
        c.append(0, ids.float(), k, k)
    with pytest.raises(ValueError, match="seq_ids must have 1"):
        c.append(0, ids[None], k, k)
    with pytest.raises(ValueError, match=r"k must have shape \[n=2, num_kv_heads=2"):
        c.append(0, ids, torch.randn(2, H + 1, 1, D), k)
    with pytest.raises(ValueError, match="v has shape"):
        c.append(0, ids, k, torch.randn(2, H, 2, D))
    with pytest.raises(TypeError, match="k must be floating"):
        c.append(0, ids, k.long(), k.long())
    with pytest.raises(ValueError, match="layer must be an int in"):
        c.append(L, ids, k, k)
    with pytest.raises(ValueError, match="parent_ids has shape"):
        c.reorder(ids, ids[:1])
    with pytest.raises(ValueError, match="start must be an integer"):
        c.append(0, ids, k, k, start=torch.zeros(2))
    with pytest.raises(ValueError, match="n must be"):
        c.allocate(-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncate_rolls_a_fork_back_and_the_original_keeps_its_tokens(backend):
    # Particle Gibbs: fork a finished sequence, roll the copy back to a step boundary inside a block,
    # continue it; the original's tokens are untouched (the shared tail block is copied on write).
    c = make(backend)
    ids = c.allocate(1)
    kv = step(c, ids, 11)  # 3 blocks of P=4: 4 + 4 + 3
    free0 = c.num_free_blocks
    copy = c.fork(ids)
    c.truncate(copy, torch.tensor([6]))  # keeps blocks 0 and 1 (1 partially): block 2 stays with the original
    assert c.lengths(copy).tolist() == [6] and c.num_free_blocks == free0
    new = step(c, copy, 3)
    assert c.num_free_blocks == free0 - 2  # a copy of the shared partial block, and one fresh block
    for layer in range(L):
        k, _ = c.gather(layer, ids)
        assert torch.equal(k, kv[layer][0])
        k, _ = c.gather(layer, copy)
        assert torch.equal(k, torch.cat([kv[layer][0][:, :, :6], new[layer][0]], 2))
    c.truncate(copy, torch.tensor([0]))  # back to empty: its own blocks return to the pool
    c.free(ids)
    assert c.num_free_blocks == 32


def test_truncate_bad_input_names_the_argument_and_changes_nothing():
    c = make()
    ids = c.allocate(2)
    step(c, ids, 5)
    with pytest.raises(ValueError, match="lengths has shape"):
        c.truncate(ids, torch.tensor([1]))
    with pytest.raises(TypeError, match="lengths must be an int64"):
        c.truncate(ids, torch.tensor([1.0, 2.0]))
    before = [x.clone() for x in c._state_list]
    with pytest.raises(CacheError, match=r"lengths must be in \[0, the sequence's length\]"):
        c.truncate(ids, torch.tensor([3, 6]))
    with pytest.raises(CacheError, match="seq_ids lists the same sequence"):
        c.truncate(ids[[0, 0]], torch.tensor([1, 1]))
    assert all(torch.equal(a, b) for a, b in zip(before, c._state_list))
    c.append(0, ids, torch.randn(2, H, 1, D), torch.randn(2, H, 1, D))
    with pytest.raises(CacheError, match="truncate: a step is in progress"):
        c.truncate(ids, torch.tensor([1, 1]))


def test_deferred_mode_reports_late_and_changes_nothing():
    c = make("torch", strict=False)
    ids = c.allocate(2)
    step(c, ids, 3)
    lens = c._st.lens.clone()
    c.reorder(ids, torch.tensor([0, 9]))  # 9 is free: refused on the device, no raise yet
    with pytest.raises(CacheError, match="reported late"):
        c.check()
    assert torch.equal(c._st.lens, lens)
    c.fork(torch.tensor([5]))  # refused; its new slot is given back when reported
    with pytest.raises(CacheError, match="reported late"):
        c.lengths(ids)
    assert c.num_live_seqs == 2
    step(c, ids, 1)
    assert c.lengths(ids).tolist() == [4, 4]
