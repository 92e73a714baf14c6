"""``PagedKVCache``: a block pool for keys and values with copy-on-write forks.

Search multiplies sequences. Best-of-N prefills a prompt once and forks it N
times; beam search replaces its K beams by K children of the best beams every
token. With a dense cache both copy history (transformers prefills the prompt K
times and ``index_select``s every layer's whole cache each step). Here history
lives in fixed-size blocks of ``block_size`` tokens shared by reference count:

* ``fork`` copies block-table rows and raises reference counts: no KV bytes move;
* ``reorder`` (the beam step) permutes block-table rows: no KV bytes move;
* ``truncate`` rolls a sequence back to a prefix (releases the blocks past it): no KV bytes move;
* ``append`` writes new tokens; a block that another sequence can still see is
  copied first (copy-on-write), so at most the one partial tail block per
  sequence is ever copied, and only when it is shared.

Everything (pools, block tables, lengths, reference counts, the free list) lives
on the cache's device and is updated by batched tensor ops; see
``_paged_ops.py``. The host keeps no per-token state: it knows which sequence
slots are in use (so ``allocate`` and ``fork`` can name new ids without asking
the device) and which step is in progress.

**The step rule.** ``append(layer, ...)`` calls come in steps. ``append(0, ids,
k, v)`` starts a step: it reserves the slots for the new tokens on every layer
(taking new blocks and copying shared tail blocks once, for all layers), then
writes layer 0. Layers ``1 .. num_layers-1`` must follow in order with the same
number of sequences and tokens (the same ``seq_ids`` and ``start``); the append
to the last layer advances the lengths. Between the two, ``lengths()`` still
returns the old lengths, while ``layer_view(l)`` / ``gather(l)`` of a layer
already written include the new tokens (what a model's attention at that layer
needs). ``fork``, ``reorder``, ``truncate`` and ``free`` are refused while a step is in
progress. A step that is never finished (a forward pass that raised) is
abandoned by the next ``append(0, ...)`` or by ``abort_step()``: the lengths
never advanced, so nothing it wrote is visible; any blocks it reserved stay
with their sequences and are reused by the next step.

**Errors.** Bad shapes, dtypes and devices raise ``ValueError``/``TypeError``
before anything happens. Checks on the *values* of id tensors (unknown or freed
ids, duplicates, pool exhausted, too long) run on the device inside the op. On
CPU (``strict=True``, the default there) they raise at once, before any state
changes. On CUDA (``strict=False`` by default, so that ``append``, ``fork`` and
``reorder`` never sync) a failed call changes nothing and is reported by the
next call that reads the device anyway (``allocate``, ``free``, ``lengths``,
``gather``, ``num_free_blocks``, ``check()``). Either way the cache stays fully
usable after an error.
"""
from __future__ import annotations

import math

import torch

from .. import _ext
from ..ops._validate import check_tensor
from . import _paged_ops as ops

_OP_NAMES = ("append", "fork", "reorder", "free", "truncate")

_MESSAGES = {
    ops.BAD_ID: "{arg} contains an id outside [0, max_seqs={S})",
    ops.NOT_ALIVE: "{arg} names a sequence that was never allocated or was freed",
    ops.DUPLICATE: "{arg} lists the same sequence more than once",
    ops.EXHAUSTED: "block pool exhausted: the step needs more blocks than are free; free sequences or "
                   "build the cache with more num_blocks",
    ops.TOO_LONG: "a sequence would exceed max_seq_len={T}",
    ops.BAD_START: "start values must be in [0, t]",
    ops.BAD_LENGTH: "{arg} must be in [0, the sequence's length]: a sequence can only be cut shorter",
}


class CacheError(ValueError):
    """A ``PagedKVCache`` call was refused (nothing was changed)."""


class PagedKVCache:
    """Paged keys and values for ``num_layers`` layers, with copy-on-write forks.

    Args:
        num_layers, num_kv_heads, head_dim: the model's KV geometry.
        num_blocks: blocks in the pool; each holds ``block_size`` tokens of every layer.
        block_size: tokens per block (16 by default, like vLLM).
        max_seqs: sequence slots (default 1024). Ids are ``0 .. max_seqs-1``.
        max_seq_len: longest sequence (default ``min(num_blocks * block_size, 16384)``);
            sets the width of the block table.
        dtype, device: of the pools.
        strict: raise value errors at once (reads the device). Default: True on CPU, False on CUDA.
        backend: ``"cpp"`` (CPU C++ kernels, csrc/cpu/paged_cache.cpp; the CPU default when the
            extension is built) or ``"torch"`` (batched tensor ops, ``_paged_ops.py``: any device,
            no host sync when not strict; the CUDA default). Both make identical decisions.

    Attributes ``k_pool``/``v_pool`` are ``[num_layers, num_blocks + 1, H, P, D]``
    (the last block is a write sink for masked writes, never handed out).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, num_blocks: int,
                 block_size: int = 16, max_seqs: int = 1024, max_seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device="cpu", strict: bool | None = None,
                 backend: str = "auto"):
        for name, val in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("num_blocks", num_blocks), ("block_size", block_size), ("max_seqs", max_seqs)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if max_seq_len is None:
            max_seq_len = min(num_blocks * block_size, 16384)
        if not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.max_seqs, self.max_seq_len = block_size, max_seqs, max_seq_len
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = torch.device(device)
        self.strict = (self.device.type == "cpu") if strict is None else bool(strict)
        if backend not in ("auto", "cpp", "torch"):
            raise ValueError(f"backend must be 'auto', 'cpp' or 'torch', got {backend!r}")
        if backend == "auto":
            backend = "cpp" if self.device.type == "cpu" and _ext.HAS_C and self.strict else "torch"
        if backend == "cpp" and (self.device.type != "cpu" or not _ext.HAS_C or not self.strict):
            raise ValueError("backend='cpp' needs the compiled extension, a CPU cache and strict=True")
        self.backend = backend
        self._st = ops.new_state(num_layers, num_kv_heads, head_dim, num_blocks, block_size, max_seqs,
                                 math.ceil(max_seq_len / block_size), dtype, self.device)
        self._free_slots = list(range(max_seqs - 1, -1, -1))  # host: which sequence slots are unused
        self._step = None  # host: the step in progress (see the step rule)
        # host: an upper bound on every sequence's length (pending tokens included), so views need
        # only the table columns that can be in use: ceil(bound / block_size) of max_blocks.
        self._len_bound = 0
        st = self._st
        self._state_list = [st.tables, st.held, st.lens, st.pend, st.alive, st.refs, st.stack, st.n_free]
        # Deferred error word (non-strict mode): op index * 256 + bits of the first failed call.
        self._status = torch.zeros((), dtype=torch.int64, device=self.device)

    # ------------------------------------------------------------------ views
    @property
    def k_pool(self) -> torch.Tensor:
        return self._st.k_pool

    @property
    def v_pool(self) -> torch.Tensor:
        return self._st.v_pool

    @property
    def block_tables(self) -> torch.Tensor:
        """``[max_seqs, max_blocks]`` int64 table of every slot (entries past a sequence's blocks are stale)."""
        return self._st.tables[:-1]

    @property
    def num_free_blocks(self) -> int:
        self.check()
        return int(self._st.n_free)

    @property
    def num_live_seqs(self) -> int:
        return self.max_seqs - len(self._free_slots)

    def lengths(self, seq_ids: torch.Tensor) -> torch.Tensor:
        """Committed lengths of ``seq_ids`` (int64)."""
        ids = self._ids("seq_ids", seq_ids)
        self._check_values(ops.check_ids(self._st, ids, distinct=False)[0], "lengths", "seq_ids")
        return self._st.lens[ids].clone()

    def _visible_lens(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        st = self._st
        if self._step is not None and layer < self._step["next_layer"]:
            return st.pend[ids]
        return st.lens[ids]

    def layer_view(self, layer: int, seq_ids: torch.Tensor):
        """``(k_cache, v_cache, block_tables, seq_lens)`` of ``layer`` for the attention op.

        ``k_cache, v_cache [num_blocks + 1, H, P, D]`` are views of the pools;
        ``block_tables [n, w]`` int32, ``w <= max_blocks`` the columns any sequence can be using
        (from a host-side bound on the lengths: every append adds its ``t``); ``seq_lens [n]``
        int32 are the lengths this layer holds now (including a step in progress once this
        layer's part of it is written). No host sync.
        """
        self._layer("layer", layer)
        ids = self._ids("seq_ids", seq_ids)
        st = self._st
        if self._step is not None and self._step.get("tables_for") is ids:
            tables = self._step["tables"]
        else:
            width = max(1, min(st.max_blocks, -(-self._len_bound // self.block_size)))
            tables = st.tables[ids.clamp(0, self.max_seqs), :width].to(torch.int32)
            if self._step is not None and ids is self._step["ids_arg"]:
                self._step["tables_for"], self._step["tables"] = ids, tables
        lens = self._visible_lens(layer, ids.clamp(0, self.max_seqs)).to(torch.int32)
        return st.k_pool[layer], st.v_pool[layer], tables, lens

    def gather(self, layer: int, seq_ids: torch.Tensor):
        """Dense ``(k, v)``, each ``[n, H, T, D]`` with ``T`` the longest visible length; zero past each length.

        For tests and for attention paths without paged support. Reads the lengths (host sync).
        """
        self._layer("layer", layer)
        ids = self._ids("seq_ids", seq_ids)
        self._check_values(ops.check_ids(self._st, ids, distinct=False)[0], "gather", "seq_ids")
        lens = self._visible_lens(layer, ids)
        T = int(lens.max()) if ids.numel() else 0
        return ops.gather(self._st, layer, ids, lens, T)

    # ------------------------------------------------------------------ lifecycle
    def allocate(self, n: int) -> torch.Tensor:
        """``n`` new empty sequences; returns their ids (int64, on the cache device)."""
        self.check()
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        ids = self._take_slots(n, "allocate")
        ops.allocate(self._st, ids)
        return ids

    def free(self, seq_ids: torch.Tensor) -> None:
        """Free sequences; blocks nobody else holds go back to the pool. Reads ``seq_ids`` (host sync)."""
        self._no_step("free")
        ids = self._ids("seq_ids", seq_ids)
        self.check()
        if self.backend == "cpp":
            self._raise_if(torch.ops.tts.paged_free_(self._state_list, ids), "free", "seq_ids")
        else:
            err, _ = ops.check_ids(self._st, ids, distinct=True)
            self._raise_if(int(err), "free", "seq_ids")
            ops.free(self._st, ids, torch.ones((), dtype=torch.bool, device=self.device))
            ops.clean_trash(self._st)
        self._free_slots.extend(ids.tolist())

    def fork(self, parent_ids: torch.Tensor) -> torch.Tensor:
        """New sequences sharing all of their parent's blocks; ``parent_ids`` may repeat (best-of-N)."""
        self._no_step("fork")
        parents = self._ids("parent_ids", parent_ids)
        if parents.shape[0] > len(self._free_slots):
            self._take_slots(parents.shape[0], "fork")  # raises: not enough sequence slots
        if self.backend == "cpp":
            new_ids = self._take_slots(parents.shape[0], "fork")
            err = torch.ops.tts.paged_fork_(self._state_list, parents, new_ids)
            if err:
                self._free_slots.extend(new_ids.tolist()[::-1])
                self._raise_if(err, "fork", "parent_ids")
            return new_ids
        err, parents = ops.check_ids(self._st, parents, distinct=False)
        ok = self._gate(err, "fork", "parent_ids")
        new_ids = self._take_slots(parents.shape[0], "fork")
        ops.fork(self._st, parents, new_ids, ok)
        ops.clean_trash(self._st)
        return new_ids

    def reorder(self, seq_ids: torch.Tensor, parent_ids: torch.Tensor) -> None:
        """The beam step: afterwards ``seq_ids[i]`` holds ``parent_ids[i]``'s history as it was before.

        A parent may be taken by several sequences or by none; ``seq_ids`` must be distinct.
        Only block-table rows and reference counts change; a shared tail block is
        copied lazily, by the next ``append``.
        """
        self._no_step("reorder")
        ids = self._ids("seq_ids", seq_ids)
        parents = self._ids("parent_ids", parent_ids)
        if parents.shape != ids.shape:
            raise ValueError(f"parent_ids has shape {tuple(parents.shape)}, seq_ids {tuple(ids.shape)}; "
                             "they must match")
        if self.backend == "cpp":
            err = torch.ops.tts.paged_reorder_(self._state_list, ids, parents)
            self._raise_if(err & 255, "reorder", "seq_ids")
            self._raise_if(err >> 8, "reorder", "parent_ids")
            return
        err_i, ids = ops.check_ids(self._st, ids, distinct=True)
        err_p, parents = ops.check_ids(self._st, parents, distinct=False)
        ok = self._gate(err_i, "reorder", "seq_ids", also=(err_p, "parent_ids"))
        ops.reorder(self._st, ids, parents, ok)
        ops.clean_trash(self._st)

    def append(self, layer: int, seq_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               start: torch.Tensor | None = None) -> None:
        """Write ``k, v [n, H, t, D]`` of ``layer`` at the end of each sequence (see the step rule).

        ``start [n]`` (optional, integer): row ``i`` writes only tokens ``start[i]:t``
        (a left-padded prefill stores its real tokens only).
        """
        self._layer("layer", layer)
        ids = self._ids("seq_ids", seq_ids)
        n = ids.shape[0]
        H, D = self.num_kv_heads, self.head_dim
        for name, x in (("k", k), ("v", v)):
            check_tensor(name, x, ndim=4)
            if x.shape[0] != n or x.shape[1] != H or x.shape[3] != D:
                raise ValueError(f"{name} must have shape [n={n}, num_kv_heads={H}, t, head_dim={D}], "
                                 f"got {tuple(x.shape)}")
            if not x.dtype.is_floating_point:
                raise TypeError(f"{name} must be floating point, got {x.dtype}")
            if x.device != self.device:
                raise ValueError(f"{name} is on {x.device}, the cache on {self.device}")
        if v.shape != k.shape:
            raise ValueError(f"v has shape {tuple(v.shape)}, k {tuple(k.shape)}; they must match")
        t = k.shape[2]
        if start is not None:
            check_tensor("start", start, ndim=1)
            if start.shape[0] != n or start.dtype.is_floating_point or start.dtype == torch.bool:
                raise ValueError(f"start must be an integer tensor of shape [{n}], got {start.dtype} "
                                 f"{tuple(start.shape)}")
            if start.device != self.device:
                raise ValueError(f"start is on {start.device}, the cache on {self.device}")
        if layer == 0:
            self._len_bound = min(self.max_seq_len, self._len_bound + t)
        if layer == 0 and self.backend == "cpp":
            blk, slot, err = torch.ops.tts.paged_begin_step_(self._state_list, self._st.k_pool, self._st.v_pool,
                                                             ids, start, t, self.max_seq_len)
            self._raise_if(err, "append", "seq_ids")
            step = ops.StepPlan(blk=blk, slot=slot)
            self._step = dict(plan=step, n=n, t=t, next_layer=0, ids_arg=seq_ids, start=start)
        elif layer == 0:
            err, plan = ops.plan_step(self._st, ids, t, start, self.max_seq_len, compact=self.strict)
            ok = self._gate(err, "append", "seq_ids")
            step = ops.commit_step(self._st, plan, ok)
            ops.copy_blocks(self._st, step)
            ops.clean_trash(self._st)
            self._step = dict(plan=step, n=n, t=t, next_layer=0, ids_arg=seq_ids, start=start)
        else:
            s = self._step
            if s is None or layer != s["next_layer"]:
                expected = "0 (no step in progress)" if s is None else str(s["next_layer"])
                raise ValueError(f"layer {layer} appended out of order: the next append must be to layer {expected}")
            if n != s["n"] or t != s["t"] or (start is None) != (s["start"] is None):
                raise ValueError(f"append to layer {layer} must list the same {s['n']} sequences with the same "
                                 f"t={s['t']} and start as layer 0 of this step; got n={n}, t={t}")
        ops.write_tokens(self._st, layer, self._step["plan"], k, v)
        self._step["next_layer"] = layer + 1
        if layer == self.num_layers - 1:
            ops.commit_lengths(self._st)
            self._step = None

    def truncate(self, seq_ids: torch.Tensor, lengths: torch.Tensor) -> None:
        """Roll sequences back: ``seq_ids[i]`` keeps its first ``lengths[i]`` tokens (``0 <=
        lengths[i] <=`` its length; ``seq_ids`` distinct).

        The blocks past the kept ones are released (to the pool when nobody else holds them); a kept
        partial tail block that another sequence still sees stays shared, and the next ``append``
        copies it before writing (copy-on-write), so forks of the sequence keep their tokens. With
        ``fork`` this rolls a copy of a finished sequence back to an earlier step (particle Gibbs
        restarting from a reference trajectory's prefix). Only table rows, lengths and reference
        counts change: no KV bytes move.
        """
        self._no_step("truncate")
        ids = self._ids("seq_ids", seq_ids)
        lens = self._ids("lengths", lengths)
        if lens.shape != ids.shape:
            raise ValueError(f"lengths has shape {tuple(lens.shape)}, seq_ids {tuple(ids.shape)}; they must match")
        err_i, ids = ops.check_ids(self._st, ids, distinct=True)
        err_l = ops._bit((lens < 0) | (lens > self._st.lens[ids]), ops.BAD_LENGTH)
        ok = self._gate(err_i, "truncate", "seq_ids", also=(err_l, "lengths"))
        ops.truncate(self._st, ids, lens, ok)
        ops.clean_trash(self._st)

    def abort_step(self) -> None:
        """Abandon a step in progress (its tokens never become visible)."""
        if self._step is not None:
            self._st.pend.copy_(self._st.lens)
            self._step = None

    # ------------------------------------------------------------------ errors
    def check(self) -> None:
        """Raise the deferred error of a refused ``append``/``fork``/``reorder`` (non-strict mode), if any."""
        if self.strict:
            return
        word = int(self._status)
        if word:
            self._status.zero_()
            # A refused append left a (masked, invisible) step open on the host: drop it.
            self.abort_step()
            # A refused fork left its new slots unused on the device: resynchronise the host's view.
            alive = self._st.alive[:-1].cpu()
            self._free_slots = [i for i in range(self.max_seqs - 1, -1, -1) if not alive[i]]
            op = _OP_NAMES[word >> 8]
            self._raise_if(word & 255, op, "the ids", deferred=True)

    def _gate(self, err, op: str, arg: str, also=None) -> torch.Tensor:
        """Strict: raise now if ``err`` (and ``also``) flag anything. Otherwise record it; return the commit gate."""
        if self.strict:
            self._raise_if(int(err), op, arg)
            if also is not None:
                self._raise_if(int(also[0]), op, also[1])
            return torch.ones((), dtype=torch.bool, device=self.device)
        if also is not None:
            err = err | also[0]
        word = _OP_NAMES.index(op) * 256 + err
        self._status.copy_(torch.where((self._status == 0) & (err != 0), word, self._status))
        return err == 0

    def _raise_if(self, bits: int, op: str, arg: str, deferred: bool = False) -> None:
        if not bits:
            return
        msgs = [m.format(arg=arg, S=self.max_seqs, T=self.max_seq_len) for b, m in _MESSAGES.items() if bits & b]
        when = " (reported late: the call was refused on the device and changed nothing)" if deferred else ""
        raise CacheError(f"PagedKVCache.{op}: " + "; ".join(msgs) + when)

    def _check_values(self, err, op: str, arg: str) -> None:
        self.check()
        self._raise_if(int(err), op, arg)

    # ------------------------------------------------------------------ argument checks
    def _ids(self, name: str, ids) -> torch.Tensor:
        check_tensor(name, ids, ndim=1)
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an int64 or int32 tensor, got {ids.dtype}")
        if ids.device != self.device:
            raise ValueError(f"{name} is on {ids.device}, the cache on {self.device}")
        return ids.to(torch.int64)

    def _layer(self, name: str, layer) -> None:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise ValueError(f"{name} must be an int in [0, {self.num_layers}), got {layer!r}")

    def _no_step(self, op: str) -> None:
        if self._step is not None:
            raise CacheError(f"PagedKVCache.{op}: a step is in progress (layers 0..{self._step['next_layer'] - 1} "
                             f"of {self.num_layers} appended); finish it or call abort_step() first")

    def _take_slots(self, n: int, op: str) -> torch.Tensor:
        if n > len(self._free_slots):
            raise CacheError(f"PagedKVCache.{op}: {n} new sequences requested but only {len(self._free_slots)} "
                             f"of max_seqs={self.max_seqs} slots are free")
        taken = self._free_slots[len(self._free_slots) - n:][::-1]
        del self._free_slots[len(self._free_slots) - n:]
        ids = torch.tensor(taken, dtype=torch.int64)
        if self.device.type == "cuda":
            # From pinned memory, asynchronously: fork must not wait for the device.
            return ids.pin_memory().to(self.device, non_blocking=True)
        return ids.to(self.device)
