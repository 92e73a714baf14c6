"""Stateful random testing of PagedKVCache against a dense model of the same cache.

Hypothesis drives long random sequences of allocate / append steps (with
``start``, abandoned steps) / fork / reorder / free, plus calls that must be
refused (dead or unknown ids, duplicates, pool or slot exhaustion, too long).
After every call: each live sequence's keys and values at every layer equal the
dense model's; reference counts equal the number of live table entries naming
each block (nothing leaked or double counted); the free stack holds exactly the
blocks with no reference; free + used blocks = the pool. A refused call must
leave the whole device state bit-identical.

Run in both error modes: ``strict`` (raise at once, CPU default) and deferred
(the CUDA default: the refused call is masked on the device and reported by the
next syncing call), so the masked commit path is tested here too.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tts_kernels import _ext
from tts_kernels.cache import CacheError, PagedKVCache

L, H, D = 2, 2, 3


def snapshot(cache):
    # Everything but the trash entries (the extra block, table row, count and stack slot
    # that masked writes are routed to).
    s = cache._st
    n_free = int(s.n_free)
    return [x.clone() for x in (s.k_pool[:, :-1], s.v_pool[:, :-1], s.tables[:-1], s.held[:-1], s.lens[:-1],
                                s.pend[:-1], s.alive, s.refs, s.stack[:n_free], s.n_free)]


class Twin:
    """Drives a C++-backend cache and a tensor-op-backend cache with the same calls.

    Both must make the same decisions (same blocks taken and freed, same errors), so
    their whole state must stay identical, block ids included.
    """

    def __init__(self, *args, **kw):
        self.a = PagedKVCache(*args, backend="cpp", **kw)
        self.b = PagedKVCache(*args, backend="torch", **kw)

    def __getattr__(self, name):
        attr = getattr(self.a, name)
        if not callable(attr):
            return attr

        def both(*args, **kw):
            try:
                ra = attr(*args, **kw)
            except CacheError as e:
                with pytest.raises(CacheError):
                    getattr(self.b, name)(*args, **kw)
                self._same()
                raise e
            rb = getattr(self.b, name)(*args, **kw)
            if isinstance(ra, tuple):
                assert all(torch.equal(x, y) for x, y in zip(ra, rb))
            elif isinstance(ra, torch.Tensor):
                assert torch.equal(ra, rb)
            self._same()
            return ra
        return both

    def _same(self):
        for x, y in zip(snapshot(self.a), snapshot(self.b)):
            assert torch.equal(x, y), "the C++ and tensor-op backends diverged"
        assert self.a._free_slots == self.b._free_slots


class CacheMachine(RuleBasedStateMachine):
    strict = True
    make = PagedKVCache

    def __init__(self):
        super().__init__()
        self.P = None
        self.cache = None
        self.model = {}  # seq id -> [per-layer (k [H, T, D], v [H, T, D])]

    @initialize(P=st.sampled_from([1, 3, 4]), n=st.integers(1, 3))
    def make_cache(self, P, n):
        self.P = P
        self.cache = type(self).make(L, H, D, num_blocks=40, block_size=P, max_seqs=10, max_seq_len=40,
                                     strict=self.strict)
        self.allocate(n)

    def _refused(self, fn):
        """``fn`` must be refused (now, or at the next syncing call) and change nothing."""
        before = snapshot(self.cache)
        slots = list(self.cache._free_slots)
        with pytest.raises(CacheError):
            fn()
            self.cache.check()
        for a, b in zip(before, snapshot(self.cache)):
            assert torch.equal(a, b), "a refused call changed the cache"
        assert sorted(slots) == sorted(self.cache._free_slots)

    def _live(self):
        return sorted(self.model)

    # ---------------------------------------------------------------- rules
    @rule(n=st.integers(0, 3))
    def allocate(self, n):
        if n > len(self.cache._free_slots):
            self._refused(lambda: self.cache.allocate(n))
            return
        ids = self.cache.allocate(n)
        for i in ids.tolist():
            assert i not in self.model
            self.model[i] = [(torch.zeros(H, 0, D), torch.zeros(H, 0, D)) for _ in range(L)]

    @precondition(lambda self: self.model)
    @rule(data=st.data(), t=st.integers(1, 6), use_start=st.booleans(), abandon=st.integers(0, 4))
    def append_step(self, data, t, use_start, abandon):
        live = self._live()
        ids = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=len(live), unique=True))
        self._step(data, ids, t, use_start, abandon)

    def _step(self, data, ids, t, use_start, abandon):
        n = len(ids)
        start = torch.tensor(data.draw(st.lists(st.integers(0, t), min_size=n, max_size=n))) if use_start else None
        counts = [t - (int(start[i]) if use_start else 0) for i in range(n)]
        new_len = [self.model[s][0][0].shape[1] + c for s, c in zip(ids, counts)]
        idt = torch.tensor(ids)
        ks = [torch.randn(n, H, t, D) for _ in range(L)]
        vs = [torch.randn(n, H, t, D) for _ in range(L)]
        if max(new_len) > 40 or self._blocks_needed(ids, new_len) > self._free_blocks():
            self._refused(lambda: self.cache.append(0, idt, ks[0], vs[0], start=start))
            return
        expected_taken = self._blocks_needed(ids, new_len)
        free_before = self._free_blocks()
        layers = L if abandon else 1  # abandon == 0: stop after layer 0, then abort or restart
        for layer in range(layers):
            self.cache.append(layer, idt, ks[layer], vs[layer], start=start)
            k, v = self.cache.gather(layer, idt)
            for r, s in enumerate(ids):  # the written layer shows the new tokens already
                old = self.model[s][layer][0].shape[1]
                assert torch.equal(k[r, :, old:new_len[r]], ks[layer][r, :, t - counts[r]:])
        # Exactly the blocks the definition asks for: new ones, and one copy per shared block
        # touched unless all its holders are in this step.
        assert free_before - self._free_blocks() == expected_taken
        if layers < L:
            self.cache.abort_step()
            return
        for r, s in enumerate(ids):
            self.model[s] = [(torch.cat([self.model[s][la][0], ks[la][r, :, t - counts[r]:]], 1),
                              torch.cat([self.model[s][la][1], vs[la][r, :, t - counts[r]:]], 1)) for la in range(L)]

    @precondition(lambda self: self.model)
    @rule(data=st.data(), copies=st.integers(1, 3), t=st.integers(1, 3))
    def fork_then_step(self, data, copies, t):
        # Best-of-N / beam shape: fork a parent, then step the family (or part of it), so
        # shared partial tail blocks get written: the copy-on-write path.
        parent = data.draw(st.sampled_from(self._live()))
        if copies > len(self.cache._free_slots):
            return
        new = self.cache.fork(torch.tensor([parent] * copies))
        for c in new.tolist():
            self.model[c] = list(self.model[parent])
        family = [parent] + new.tolist()
        members = data.draw(st.lists(st.sampled_from(family), min_size=1, max_size=len(family), unique=True))
        self._step(data, members, t, use_start=False, abandon=1)

    def _free_blocks(self):
        return int(self.cache._st.n_free)

    def _blocks_needed(self, ids, new_len):
        # Exact count of the blocks a step takes, from the definition: a new block per
        # block index past what the sequence holds, and a copy per touched shared block
        # unless all its holders are in this step (then the last one keeps it).
        s = self.cache._st
        P = self.P
        need, holders = 0, {}
        touched_shared = []
        for seq, L1 in zip(ids, new_len):
            L0 = int(s.lens[seq])
            if L1 == L0:
                continue
            held = int(s.held[seq])
            for j in range(L0 // P, -(-L1 // P)):
                if j >= held:
                    need += 1
                else:
                    b = int(s.tables[seq, j])
                    if int(s.refs[b]) > 1:
                        touched_shared.append(b)
                        holders[b] = holders.get(b, 0) + 1
        for b in touched_shared:
            need += 1
        for b, h in holders.items():
            if int(s.refs[b]) == h:
                need -= 1
        return need

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def fork(self, data):
        parents = data.draw(st.lists(st.sampled_from(self._live()), min_size=0, max_size=4))
        if len(parents) > len(self.cache._free_slots):
            self._refused(lambda: self.cache.fork(torch.tensor(parents, dtype=torch.int64)))
            return
        new = self.cache.fork(torch.tensor(parents, dtype=torch.int64))
        for p, c in zip(parents, new.tolist()):
            self.model[c] = list(self.model[p])

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def reorder(self, data):
        live = self._live()
        ids = data.draw(st.lists(st.sampled_from(live), min_size=0, max_size=len(live), unique=True))
        parents = data.draw(st.lists(st.sampled_from(live), min_size=len(ids), max_size=len(ids)))
        self.cache.reorder(torch.tensor(ids, dtype=torch.int64), torch.tensor(parents, dtype=torch.int64))
        snap = {p: self.model[p] for p in parents}
        for i, p in zip(ids, parents):
            self.model[i] = list(snap[p])

    @precondition(lambda self: self.model)
    @rule(data=st.data(), then_step=st.booleans())
    def truncate(self, data, then_step):
        # Roll some sequences back (particle Gibbs restarting from a prefix), possibly right after a
        # fork, so kept partial tail blocks are shared: the next step must copy them, and the
        # sequences sharing them keep their tokens.
        live = self._live()
        if then_step and self.cache._free_slots:
            parent = data.draw(st.sampled_from(live))
            c = self.cache.fork(torch.tensor([parent])).item()
            self.model[c] = list(self.model[parent])
        live = self._live()
        ids = data.draw(st.lists(st.sampled_from(live), min_size=0, max_size=len(live), unique=True))
        lens = [data.draw(st.integers(0, self._len(s))) for s in ids]
        self.cache.truncate(torch.tensor(ids, dtype=torch.int64), torch.tensor(lens, dtype=torch.int64))
        for s, n in zip(ids, lens):
            self.model[s] = [(k[:, :n], v[:, :n]) for k, v in self.model[s]]
        if then_step and ids:
            self._step(data, ids, data.draw(st.integers(1, 4)), use_start=False, abandon=1)

    def _len(self, s):
        return self.model[s][0][0].shape[1]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data):
        ids = data.draw(st.lists(st.sampled_from(self._live()), min_size=0, max_size=3, unique=True))
        self.cache.free(torch.tensor(ids, dtype=torch.int64))
        for i in ids:
            del self.model[i]

    @precondition(lambda self: self.model)
    @rule(data=st.data(), kind=st.sampled_from(["too_long", "negative", "dead", "duplicate"]))
    def bad_truncate(self, data, kind):
        live = self._live()
        s = data.draw(st.sampled_from(live))
        ids, lens = [s], [self._len(s)]
        if kind == "too_long":
            lens = [self._len(s) + data.draw(st.integers(1, 3))]
        elif kind == "negative":
            lens = [-1]
        elif kind == "dead":
            dead = [i for i in range(10) if i not in self.model]
            if not dead:
                return
            ids = [dead[0]]
        else:
            ids, lens = [s, s], [0, 0]
        self._refused(lambda: self.cache.truncate(torch.tensor(ids), torch.tensor(lens)))

    @rule(data=st.data(), kind=st.sampled_from(["dead", "out_of_range", "duplicate"]),
          op=st.sampled_from(["append", "fork", "reorder", "free", "reorder_parent"]))
    def bad_ids(self, data, kind, op):
        dead = [i for i in range(10) if i not in self.model]
        live = self._live()
        if kind == "dead":
            if not dead:
                return
            bad = [data.draw(st.sampled_from(dead))] + live[:1]
        elif kind == "out_of_range":
            bad = [data.draw(st.sampled_from([-1, 10, 99]))] + live[:1]
        else:
            if not live or op in ("fork", "reorder_parent"):
                return  # repeats are allowed there
            bad = [live[0], live[0]]
        b = torch.tensor(bad, dtype=torch.int64)
        ok_ids = torch.tensor(live[: len(bad)] if len(live) >= len(bad) else bad, dtype=torch.int64)
        calls = {
            "append": lambda: self.cache.append(0, b, torch.randn(len(bad), H, 1, D), torch.randn(len(bad), H, 1, D)),
            "fork": lambda: self.cache.fork(b),
            "reorder": lambda: self.cache.reorder(b, b.clone()),
            "reorder_parent": lambda: self.cache.reorder(ok_ids, b) if len(live) >= len(bad) else self.cache.free(b),
            "free": lambda: self.cache.free(b),
        }
        self._refused(calls[op])

    # ---------------------------------------------------------------- invariants
    @invariant()
    def contents_equal_model(self):
        for layer in range(L):
            for s, layers in self.model.items():
                k, v = self.cache.gather(layer, torch.tensor([s]))
                assert torch.equal(k[0], layers[layer][0]) and torch.equal(v[0], layers[layer][1])

    @invariant()
    def blocks_conserved(self):
        s = self.cache._st
        NB = self.cache.num_blocks
        counts = torch.zeros(NB, dtype=torch.int64)
        for seq in self.model:
            held = int(s.held[seq])
            assert held >= -(-int(s.lens[seq]) // self.P)
            row = s.tables[seq, :held]
            assert (row >= 0).all() and len(set(row.tolist())) == held
            counts += torch.bincount(row, minlength=NB)
        assert torch.equal(s.refs[:NB], counts), "reference counts disagree with the block tables"
        n_free = int(s.n_free)
        on_stack = s.stack[:n_free].tolist()
        assert len(set(on_stack)) == n_free, "a block is on the free stack twice"
        assert sorted(on_stack) == sorted((counts == 0).nonzero().flatten().tolist())
        assert n_free + int((counts > 0).sum()) == NB
        assert not bool(s.alive[-1]) and sorted(self.model) == sorted(s.alive[:-1].nonzero().flatten().tolist())


class DeferredCacheMachine(CacheMachine):
    strict = False


class TwinCacheMachine(CacheMachine):
    make = Twin


FUZZ = settings(max_examples=50, stateful_step_count=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

TestPagedCacheStrict = CacheMachine.TestCase
TestPagedCacheStrict.settings = FUZZ
TestPagedCacheDeferred = DeferredCacheMachine.TestCase
TestPagedCacheDeferred.settings = FUZZ
TestPagedCacheCppMatchesTorch = pytest.mark.skipif(not _ext.HAS_C, reason="needs the compiled extension")(
    TwinCacheMachine.TestCase)
TestPagedCacheCppMatchesTorch.settings = FUZZ
