"""Particle-filter resampling over ``[P, N]`` log-weights: ESS, entropy, annealing, systematic and
multinomial resampling. Batched device ops (no host read, no loop over rows); the meaning of each
is a plain loop in :mod:`tts_kernels.reference` (``*_ref``), and the tests compare the two.

Weights are given as log-weights (any real numbers, ``-inf`` for a slot that must never be drawn):
the normalised weights are ``softmax(log_weights / temperature)`` per row. Randomness is the
package's counter-based Philox (:func:`~tts_kernels.reference.sample_uniform_ref`, the uniforms
of :func:`~tts_kernels.sample`): a pure function of ``(seed, offset, row, k)``, so a resample is
reproducible and the same on every device.
"""
from __future__ import annotations

import math

import torch

from ..reference import sample_uniform_ref
from ._validate import check_int, check_tensor

RESAMPLERS = ("systematic", "multinomial")
_FLOATS = (torch.float32, torch.float64)


def _weights(log_weights: torch.Tensor, temperature=1.0) -> torch.Tensor:
    check_tensor("log_weights", log_weights, ndim=2, dtypes=_FLOATS)
    if log_weights.shape[1] < 1:
        raise ValueError(f"log_weights must have at least one column, got shape {tuple(log_weights.shape)}")
    t = temperature if isinstance(temperature, torch.Tensor) else torch.tensor(float(temperature))
    t = t.to(log_weights.device, torch.float64)
    lw = log_weights.double() / (t[:, None] if t.dim() else t)
    # A row of -inf only (or NaN) would give NaN weights: it is read as uniform instead.
    lw = torch.where(torch.isnan(lw), float("-inf"), lw)
    dead = torch.isinf(lw).all(1, keepdim=True) & (lw < 0).all(1, keepdim=True)
    lw = torch.where(dead, 0.0, lw)
    return torch.softmax(lw, dim=1)


def normalized_weights(log_weights: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``softmax(log_weights / temperature)`` per row, float64 (``temperature``: a number or ``[P]``)."""
    return _weights(log_weights, temperature)


def ess(log_weights: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Effective sample size ``1 / sum_i w_i^2`` of each row's normalised weights, ``[P]`` float64 in ``[1, N]``."""
    w = _weights(log_weights, temperature)
    return 1.0 / (w * w).sum(1)


def normalized_entropy(log_weights: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``H(w) / log N`` of each row's normalised weights, ``[P]`` float64 in ``[0, 1]`` (1 for ``N = 1``)."""
    w = _weights(log_weights, temperature)
    N = w.shape[1]
    if N == 1:
        return torch.ones(w.shape[0], dtype=torch.float64, device=w.device)
    h = -(torch.where(w > 0, w * torch.log(w), 0.0)).sum(1)
    return h / math.log(N)


def entropic_temperature(log_weights: torch.Tensor, target: float, *, max_temperature: float = 1e4,
                         iterations: int = 40) -> torch.Tensor:
    """Per row, the smallest temperature ``T >= 1`` at which ``normalized_entropy(log_weights, T) >= target``
    (``T = 1`` where it already is; ``max_temperature`` where even that does not reach it).

    The entropy of ``softmax(x / T)`` rises with ``T`` (towards uniform), so ``T`` is found by
    bisection on ``log T`` over ``[0, log max_temperature]``, ``iterations`` halvings for all rows
    at once: ``T`` to a relative error of ``max_temperature ** 2**-iterations``.
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target must be in [0, 1], got {target}")
    if not max_temperature >= 1.0:
        raise ValueError(f"max_temperature must be >= 1, got {max_temperature}")
    P = log_weights.shape[0]
    dev = log_weights.device
    ok1 = normalized_entropy(log_weights, 1.0) >= target
    lo = torch.zeros(P, dtype=torch.float64, device=dev)
    hi = torch.full((P,), math.log(max_temperature), dtype=torch.float64, device=dev)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        reached = normalized_entropy(log_weights, torch.exp(mid)) >= target
        hi = torch.where(reached, mid, hi)
        lo = torch.where(reached, lo, mid)
    return torch.where(ok1, 1.0, torch.exp(hi))


def uniforms(seed: int | torch.Tensor, offset: int | torch.Tensor, rows: int, k: int, device=None,
             stream: torch.Tensor | None = None) -> torch.Tensor:
    """``[rows, k]`` float64 uniforms in ``(0, 1)`` from the counter-based generator (exact float32 values);
    ``seed`` per row or shared, ``stream [rows]`` each row's stream (default: its index), as in ``sample``."""
    return sample_uniform_ref(seed, offset, rows, k, device=device, stream=stream).double()


def resample(log_weights: torch.Tensor, *, method: str = "systematic", seed: int | torch.Tensor = 0,
             offset: int | torch.Tensor = 0, temperature: float | torch.Tensor = 1.0,
             num_samples: int | None = None, stream: torch.Tensor | None = None) -> torch.Tensor:
    """Draw ``K = num_samples`` (default ``N``) particle indices per row in proportion to
    ``softmax(log_weights / temperature)``: ``[P, K]`` int64, sorted within each row.

    * ``"systematic"``: one uniform ``u`` per row, positions ``(u + k) / K`` for ``k = 0..K-1``,
      index = the slot whose cumulative-weight interval holds the position. Slot ``i`` is drawn
      ``floor(K w_i)`` or ``ceil(K w_i)`` times: the lowest-variance choice.
    * ``"multinomial"``: ``K`` independent draws (inverse CDF of ``K`` uniforms), sorted.

    A slot of weight 0 (log-weight ``-inf``) is never drawn. (Particle Gibbs draws ``N - R`` free
    particles from ``N`` slots, ``R`` of them its reference particles.)

    Randomness: row ``p``'s uniforms are keyed by ``(seed, stream[p], offset)`` (``seed`` an int or a
    ``[P]`` tensor; ``stream [P]`` default the row index), so a row keyed by its own seed draws the same
    wherever it sits.
    """
    if method not in RESAMPLERS:
        raise ValueError(f"method must be one of {RESAMPLERS}, got {method!r}")
    w = _weights(log_weights, temperature)
    P, N = w.shape
    K = N if num_samples is None else check_int("num_samples", num_samples, minimum=0)
    dev = w.device
    cdf = w.cumsum(1)
    cdf = cdf / cdf[:, -1:]  # exactly 1 at the end, whatever the rounding of the sum
    if method == "systematic":
        u = uniforms(seed, offset, P, 1, device=dev, stream=stream)
        pos = (u + torch.arange(K, device=dev, dtype=torch.float64)) / max(K, 1)
    else:
        pos = uniforms(seed, offset, P, K, device=dev, stream=stream).sort(1).values
    return torch.searchsorted(cdf, pos, right=True).clamp(max=N - 1)
