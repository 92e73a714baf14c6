"""Intervals for accuracies measured on a set of problems (the problems are the unit resampled)."""
from __future__ import annotations

import random


def bootstrap_ci(correct: list[bool], *, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``correct`` (problems resampled)."""
    rng = random.Random(seed)
    n = len(correct)
    means = sorted(sum(correct[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def paired_bootstrap_ci(a: list[bool], b: list[bool], *, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of ``mean(a) - mean(b)`` over the same problems (resampled together)."""
    if len(a) != len(b):
        raise ValueError(f"a and b must cover the same problems, got {len(a)} and {len(b)}")
    d = [int(x) - int(y) for x, y in zip(a, b)]
    return bootstrap_ci(d, rounds=rounds, seed=seed)
