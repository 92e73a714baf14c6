"""``kv_reorder_``: in-place beam reorder of dense KV caches, all layers in one call."""
from __future__ import annotations

from typing import Sequence

import torch

from . import _dispatch
from ._validate import check_same_device, check_tensor


def kv_reorder_(caches: Sequence[torch.Tensor], parents: torch.Tensor, *, backend: str = "auto") -> None:
    """Reorder every tensor in ``caches`` along dim 0 in place: ``cache[i] <- cache[parents[i]]``.

    ``caches``: tensors of shape ``[N, ...]`` on one device (e.g. every layer's keys
    and values of a ``transformers`` ``DynamicCache``); ``parents [N]`` int64 with
    values in ``0..N-1``. Only rows with ``parents[i] != i`` are copied, so a beam
    step where most beams keep their own history moves little memory (the eager
    peer, ``index_select`` per layer, copies the whole cache). All tensors are
    checked before any is written. On CPU the values of ``parents`` are checked
    too; on CUDA that would need a host sync, so out-of-range values are the
    caller's responsibility there.
    """
    if isinstance(caches, torch.Tensor) or not isinstance(caches, (list, tuple)):
        raise TypeError("caches must be a list or tuple of tensors")
    check_tensor("parents", parents, ndim=1, dtypes=(torch.int64,))
    n = parents.shape[0]
    for i, c in enumerate(caches):
        check_tensor(f"caches[{i}]", c)
        if c.dim() < 1 or c.shape[0] != n:
            raise ValueError(f"caches[{i}] has shape {tuple(c.shape)}; dim 0 must equal len(parents) = {n}")
        check_same_device(parents=parents, **{f"caches[{i}]": c})
    # Under torch.compile the values are not known while tracing; the CPU kernel
    # checks them again itself before writing anything.
    if parents.device.type == "cpu" and n > 0 and not torch.compiler.is_compiling():
        lo, hi = int(parents.min()), int(parents.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"parents values must be in [0, {n - 1}], got range [{lo}, {hi}]")
    device_type = parents.device.type
    choice = _dispatch.resolve("kv_reorder_", device_type, backend)
    if caches:
        _dispatch.run("kv_reorder_", device_type, choice, list(caches), parents)
