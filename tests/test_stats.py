"""Bootstrap intervals over problems (tts_kernels.bench.stats): what the demo prints beside every accuracy."""
import random

import pytest

from tts_kernels.bench.stats import bootstrap_ci, paired_bootstrap_ci


def test_bootstrap_interval_holds_the_mean_and_shrinks_with_more_problems():
    rng = random.Random(0)
    small = [rng.random() < 0.4 for _ in range(50)]
    big = [rng.random() < 0.4 for _ in range(2000)]
    for xs in (small, big):
        lo, hi = bootstrap_ci(xs)
        assert lo <= sum(xs) / len(xs) <= hi
    assert (bootstrap_ci(big)[1] - bootstrap_ci(big)[0]) < (bootstrap_ci(small)[1] - bootstrap_ci(small)[0]) / 3
    # Close to the normal approximation for a proportion: half-width ~ 1.96 sqrt(p(1-p)/n).
    lo, hi = bootstrap_ci(big)
    assert abs((hi - lo) / 2 - 1.96 * (0.4 * 0.6 / 2000) ** 0.5) < 0.005
    assert bootstrap_ci([True] * 10) == (1.0, 1.0) and bootstrap_ci([False] * 10) == (0.0, 0.0)


def test_paired_interval():
    rng = random.Random(1)
    a = [rng.random() < 0.5 for _ in range(400)]
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0)  # the same outcomes: no difference at all
    b = [x or rng.random() < 0.3 for x in a]  # b is right wherever a is, and more
    lo, hi = paired_bootstrap_ci(b, a)
    assert 0 < lo <= (sum(b) - sum(a)) / 400 <= hi
    with pytest.raises(ValueError, match="same problems"):
        paired_bootstrap_ci(a, a[:-1])
