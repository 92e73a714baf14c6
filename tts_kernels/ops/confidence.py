"""Sliding windows over per-token statistics, kept on the device (DeepConf's group confidence).

``sample(..., stats_k=k)`` returns each row's token confidence (and entropy, self-certainty)
with its token; a decode loop pushes one value per row per step into a :class:`SlidingWindow`
and reads the window mean (DeepConf's *group confidence*, Fu et al. 2025) and its running
minimum (*lowest group confidence*, the early-stop and filtering signal) without a host sync::

    win = SlidingWindow.start(rows, window=2048, device=logits.device)
    for step in ...:
        tokens, logprobs, stats = sample(logits, seed=seed, offset=step, stats_k=20)
        win.push(stats[:, 0], active)          # rows that did not decode keep their window
        ...
    stop = win.lowest < threshold              # device bool [R]; read it when the loop reads anything

Every method is a few device ops on ``[R]`` or ``[R, window]`` tensors; nothing reads a value on
the host. The plain-Python meaning is :class:`tts_kernels.reference.SlidingWindowRef`.
"""
from __future__ import annotations

import torch

from ._validate import check_tensor


class SlidingWindow:
    """The last ``window`` values pushed per row, their mean and the lowest full-window mean.

    State (all on one device): ``values [R, window]`` float32 ring buffer (row ``r``'s ``i``-th
    push lands in slot ``i % window``; slots never written hold 0), ``count [R]`` int64,
    ``mean [R]`` and ``lowest [R]`` float32. Build one with :meth:`start`.
    """

    __slots__ = ("window", "values", "_count", "_mean", "_lowest")

    def __init__(self, window: int, values: torch.Tensor, count: torch.Tensor, mean: torch.Tensor,
                 lowest: torch.Tensor):
        self.window = window
        self.values = values
        self._count = count
        self._mean = mean
        self._lowest = lowest

    @classmethod
    def start(cls, rows: int, window: int, device=None) -> "SlidingWindow":
        """An empty window of ``window`` values for each of ``rows`` rows on ``device``."""
        for name, v, low in (("rows", rows, 0), ("window", window, 1)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < low:
                raise ValueError(f"{name} must be >= {low}, got {v}")
        f32 = dict(dtype=torch.float32, device=device)
        return cls(window, torch.zeros((rows, window), **f32), torch.zeros(rows, dtype=torch.int64, device=device),
                   torch.full((rows,), float("nan"), **f32), torch.full((rows,), float("inf"), **f32))

    @property
    def rows(self) -> int:
        return self.values.shape[0]

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def count(self) -> torch.Tensor:
        """``[R]`` int64: values pushed so far per row."""
        return self._count

    @property
    def mean(self) -> torch.Tensor:
        """``[R]`` float32: mean of the last ``min(count, window)`` values pushed; NaN where none was.
        A NaN or inf value pushed makes the mean NaN or inf while it is in the window."""
        return self._mean

    @property
    def lowest(self) -> torch.Tensor:
        """``[R]`` float32: the smallest :attr:`mean` after any push that left ``count >= window``
        (DeepConf's lowest group confidence); +inf until the row's first full window. NaN means
        are skipped."""
        return self._lowest

    def push(self, values: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Append ``values [R]`` (float, cast to float32) to the rows where ``active [R]`` (bool,
        default all) is True; the other rows are unchanged. Updates this window in place."""
        R = self.rows
        check_tensor("values", values, ndim=1)
        if values.shape[0] != R or values.device != self.device:
            raise ValueError(f"values must be [R] = [{R}] on {self.device}, got {tuple(values.shape)} on "
                             f"{values.device}")
        if not values.dtype.is_floating_point:
            raise TypeError(f"values must be a floating-point tensor, got {values.dtype}")
        if active is not None:
            check_tensor("active", active, ndim=1)
            if active.dtype != torch.bool or active.shape[0] != R or active.device != self.device:
                raise ValueError(f"active must be a bool [R] = [{R}] tensor on {self.device}, got {active.dtype} "
                                 f"{tuple(active.shape)} on {active.device}")
        W = self.window
        slot = (self._count % W).unsqueeze(1)
        v = values.to(torch.float32).unsqueeze(1)
        if active is not None:
            v = torch.where(active.unsqueeze(1), v, self.values.gather(1, slot))
        self.values.scatter_(1, slot, v)
        count = self._count + (1 if active is None else active.to(torch.int64))
        # Recomputed from the buffer (not a running sum): exact to float32 summation, and a
        # non-finite value stops counting once it leaves the window.
        mean = self.values.sum(dim=1) / count.clamp(min=1, max=W).to(torch.float32)
        mean = torch.where(count > 0, mean, torch.full_like(mean, float("nan")))
        full = count >= W
        if active is not None:
            mean = torch.where(active, mean, self._mean)
            full = full & active
        self._lowest = torch.where(full, torch.fmin(self._lowest, mean), self._lowest)
        self._count, self._mean = count, mean

    def select(self, idx: torch.Tensor) -> "SlidingWindow":
        """A new window whose row ``i`` is a copy of this one's row ``idx[i]`` (forked or compacted
        rows: ``idx`` int ``[R']`` on the window's device, repeats allowed)."""
        idx = torch.as_tensor(idx, device=self.device)
        if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be a 1-D int64/int32 tensor, got {idx.dtype} {tuple(idx.shape)}")
        return SlidingWindow(self.window, self.values.index_select(0, idx), self._count.index_select(0, idx),
                             self._mean.index_select(0, idx), self._lowest.index_select(0, idx))

    def grow(self, rows: int) -> "SlidingWindow":
        """A new window: this one's rows, then ``rows`` empty ones (new rows joining a batch)."""
        more = SlidingWindow.start(rows, self.window, self.device)
        return SlidingWindow(self.window, *(torch.cat([a, b]) for a, b in (
            (self.values, more.values), (self._count, more._count), (self._mean, more._mean),
            (self._lowest, more._lowest))))

    def __repr__(self) -> str:
        return f"SlidingWindow(rows={self.rows}, window={self.window}, device={self.device})"
