"""Duplicate beams, found on the device (``Settings.filter_duplicates``).

Each row carries a rolling hash of its completion's token ids (two polynomial hashes modulo
primes below ``2**31``, so every product fits in int64), updated from a whole step's token buffer
at once: ``h <- h * B**c + sum_t (tok_t + 1) * B**(c - 1 - t)`` for the ``c`` tokens of the step.
:meth:`RowHashes.duplicates` marks, per group of rows (a prompt's beams), every live row whose hash
equals an earlier live row's, and which row that is; a search confirms each mark on the host's
token lists, so a hash collision never drops a beam (duplicates are the rows compared, nothing else).
"""
from __future__ import annotations

import copy

import torch

_MODS = (2**31 - 1, 2**31 - 19)
_BASES = (1_000_003, 911_382_323)


class RowHashes:
    """``[rows, 2]`` int64 rolling hashes of the rows' token ids (all start empty)."""

    def __init__(self, rows: int, device):
        self.h = torch.zeros(rows, 2, dtype=torch.int64, device=device)
        self.mod = torch.tensor(_MODS, dtype=torch.int64, device=device)
        self._pw = torch.ones(1, 2, dtype=torch.int64, device=device)

    def _powers(self, n: int) -> torch.Tensor:
        """``[n + 1, 2]``: ``B**k mod p`` for ``k = 0 .. n``."""
        if self._pw.shape[0] <= n:  # grown to at least twice its length, so rarely
            pw = [[1, 1]]
            for _ in range(max(n, 2 * self._pw.shape[0])):
                pw.append([pw[-1][i] * _BASES[i] % _MODS[i] for i in range(2)])
            self._pw = torch.tensor(pw, dtype=torch.int64, device=self.h.device)
        return self._pw

    def extend(self, tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """Append each row's first ``counts [rows]`` tokens of ``tokens [rows, T]`` (ids >= 0)."""
        T = tokens.shape[1]
        pw = self._powers(T)
        t = torch.arange(T, device=tokens.device)
        c = counts.to(torch.int64)[:, None]
        valid = t[None, :] < c
        e = (c - 1 - t[None, :]).clamp(min=0)  # [R, T]
        tok = (tokens.clamp(min=0) + 1)[:, :, None] % self.mod  # [R, T, 2]
        term = tok * pw[e] % self.mod * valid[:, :, None]
        step = term.sum(1) % self.mod  # [R, 2]
        self.h = (self.h * pw[counts.to(torch.int64)] % self.mod + step) % self.mod

    def fork(self, idx: torch.Tensor) -> None:
        self.h = self.h.index_select(0, idx)

    def select(self, idx: torch.Tensor) -> RowHashes:
        """A copy whose row ``j`` is row ``idx[j]`` of this one (forks, reorders, dropping rows)."""
        out = copy.copy(self)
        out.h = self.h.index_select(0, idx)
        return out

    def cat(self, other: RowHashes) -> RowHashes:
        """These rows, then ``other``'s."""
        out = copy.copy(self)
        out.h = torch.cat([self.h, other.h])
        return out

    def duplicates(self, group: int, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows in consecutive groups of ``group``: ``(dup [rows] bool, first [rows] int64)``: a live row
        whose hash equals that of an earlier live row of its group, and the index of the first such row."""
        key = (self.h[:, 0] << 31 | self.h[:, 1]).view(-1, group)
        alive = live.view(-1, group)
        earlier = torch.ones(group, group, dtype=torch.bool, device=key.device).tril(-1)  # [i, j]: j < i
        same = (key[:, :, None] == key[:, None, :]) & earlier & alive[:, None, :]
        dup = same.any(-1) & alive
        first = same.to(torch.int8).argmax(-1) + torch.arange(0, key.numel(), group, device=key.device)[:, None]
        return dup.view(-1), first.view(-1)
