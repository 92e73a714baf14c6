"""The keys of a search's random draws: one seed for the whole run, or one seed per prompt.

Every draw (a token, a resampling uniform) comes from the counter-based generator of
:func:`~tts_kernels.sample` under a key ``(seed, stream, offset)``. A search is given either

* ``seed=int`` (the run's seed): every row draws under that seed, its stream being its
  position in the batch. A result is a pure function of all the arguments together, and a
  prompt's candidates change when other prompts join the run; or
* ``seed=[s_0, ..., s_{P-1}]`` (one per prompt, what the server passes): a row of prompt ``p``
  draws under ``s_p``, its stream being its place *among prompt p's rows* (candidate, beam or
  particle number), and a prompt's resampling draws under ``s_p`` on stream 0. A prompt's draws
  then depend on its own seed and data only: the same prompt with the same seed gets the same
  candidates alone or batched with any others (up to the models' floating-point batch
  invariance). Offsets (token position, iteration) are shared by all rows of a run and do not
  depend on the other prompts.

Strategies whose budget is spent across the prompts of a call (``compute_optimal``) depend on
their batch-mates by design, whatever the seeds.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_seed(seed, prompts: int):
    """``seed`` as given when valid: an int, or a list of ``prompts`` ints (64-bit); errors name ``seed``."""
    if _is_int(seed):
        if not _INT64_MIN <= seed <= _INT64_MAX:
            raise ValueError(f"seed must be a 64-bit integer, got {seed}")
        return seed
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
        raise TypeError(f"seed must be an int or a list of one int per prompt, got {type(seed).__name__}")
    if len(seed) != prompts:
        raise ValueError(f"seed must hold one int per prompt: got {len(seed)} for {prompts} prompts")
    bad = [i for i, v in enumerate(seed) if not _is_int(v) or not _INT64_MIN <= v <= _INT64_MAX]
    if bad:
        raise TypeError(f"seed[{bad[0]}] must be a 64-bit int, got {seed[bad[0]]!r}")
    return list(seed)


class Seeds:
    """A run's draw keys (see the module docstring): ``Seeds(seed, prompts)``."""

    def __init__(self, seed, prompts: int):
        seed = check_seed(seed, prompts)
        self.per_prompt: list[int] | None = None if _is_int(seed) else seed
        self.seed: int = seed if _is_int(seed) else 0
        self._dev: dict = {}

    @classmethod
    def of(cls, seed, prompts: int) -> Seeds:
        """``seed`` as :class:`Seeds` (already one: as it is)."""
        return seed if isinstance(seed, Seeds) else cls(seed, prompts)

    @property
    def keyed(self) -> bool:
        """One seed per prompt."""
        return self.per_prompt is not None

    def shift(self, k: int) -> Seeds:
        """Every seed plus ``k`` (another, independent set of draws)."""
        if self.keyed:
            return Seeds([(s + k + 2**63) % 2**64 - 2**63 for s in self.per_prompt], len(self.per_prompt))
        return Seeds(self.seed + k, 1)

    def take(self, prompts: Sequence[int]) -> Seeds:
        """The keys of a sub-run over ``prompts`` (indices into this run's prompts)."""
        if not self.keyed:
            return self
        return Seeds([self.per_prompt[i] for i in prompts], len(prompts))

    def _table(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._dev:
            self._dev[key] = torch.tensor(self.per_prompt, dtype=torch.int64, device=device)
        return self._dev[key]

    def rows(self, prompt: torch.Tensor, slot: torch.Tensor, device):
        """``(seed, stream)`` for :func:`~tts_kernels.sample` over rows of prompts ``prompt [R]`` in
        places ``slot [R]`` among their prompt's rows (device tensors). A run seed: ``(seed, None)``."""
        if not self.keyed:
            return torch.tensor(self.seed, dtype=torch.int64, device=device), None
        return self._table(device).index_select(0, prompt), slot

    def rows_of(self, owner: Sequence[int], device):
        """:meth:`rows` for rows given by their prompts (a host list; a row's slot is its place among
        the rows of its prompt, in order)."""
        if not self.keyed:
            return self.rows(None, None, device)
        seen: dict[int, int] = {}
        slot = []
        for p in owner:
            slot.append(seen.get(p, 0))
            seen[p] = slot[-1] + 1
        return self.rows(torch.tensor(owner, dtype=torch.int64, device=device),
                         torch.tensor(slot, dtype=torch.int64, device=device), device)

    def prompts(self, device, which: Sequence[int] | None = None):
        """``(seed, stream)`` for per-prompt draws (:func:`~tts_kernels.ops.resample`, one row per prompt): of
        every prompt, or of the prompts ``which`` (in that order), each drawing what it draws wherever its row
        sits (its own key, stream 0; a run seed: its own prompt index as the stream)."""
        if which is None:
            if not self.keyed:
                return self.seed, None
            table = self._table(device)
            return table, torch.zeros_like(table)
        idx = torch.tensor(list(which), dtype=torch.int64, device=device)
        if not self.keyed:
            return self.seed, idx
        table = self._table(device).index_select(0, idx)
        return table, torch.zeros_like(table)


_MASK64 = 2**64 - 1


def splitmix64(z: int) -> int:
    """SplitMix64's output function of ``z`` (taken mod ``2**64``): a well-mixed unsigned 64-bit int."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def engine_seeds(seed, stream, offset: int, rows: int) -> list[int]:
    """One 63-bit seed per row for an engine that takes a seed per request (a text-level backend's
    ``generate``): a hash of the row's key ``(seed, stream, offset)`` as :func:`~tts_kernels.sample`
    would use it (``seed`` an int or ``[rows]`` tensor; ``stream`` ``[rows]`` or ``None``: the row index)."""
    seeds = seed.tolist() if isinstance(seed, torch.Tensor) and seed.dim() else [int(seed)] * rows
    streams = list(range(rows)) if stream is None else stream.tolist()
    return [splitmix64(s * 0x9E3779B97F4A7C15 + t * 0xBF58476D1CE4E5B9 + offset) >> 1 for s, t in zip(seeds, streams)]
