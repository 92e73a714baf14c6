"""Shared checks for sample backends: exact filtered probabilities, chi-square, draws."""
import math

import torch

# Settings (temperature, top_k, top_p, min_p) for the distribution tests. The
# logits below keep every filter boundary far from rounding (no cumulative mass
# within 1e-3 of a top_p, no ratio within 1e-3 of a min_p).
SETTINGS = [
    (1.0, 0, 1.0, 0.0),
    (0.7, 0, 1.0, 0.0),
    (1.0, 3, 1.0, 0.0),
    (1.0, 0, 0.8, 0.0),
    (1.3, 0, 1.0, 0.2),
    (0.8, 5, 0.9, 0.05),
    (2.0, 4, 0.5, 0.0),
]
LOGITS = [2.0, 1.5, 1.0, 0.4, 0.0, -0.5, -1.0, -2.5, 3.1, 0.9]


def exact_probs(logits_row: torch.Tensor, T: float, k: int, p: float, min_p: float) -> torch.Tensor:
    """float64 probabilities of the filtered distribution, written from the op's
    definition with plain loops (an independent check of the reference too)."""
    x = (logits_row.float() / T).double().tolist()
    V = len(x)
    keep = [math.isfinite(v) for v in x]
    if 0 < k < V:
        kth = sorted(x, reverse=True)[k - 1]
        keep = [kp and v >= kth for kp, v in zip(keep, x, strict=True)]
    m = max(x)
    e = [math.exp(v - m) if kp else 0.0 for v, kp in zip(x, keep, strict=True)]
    if p < 1:
        z = sum(e)
        above = [sum(e[u] for u in range(V) if keep[u] and x[u] > x[v]) for v in range(V)]
        keep = [kp and (above[v] < p * z or x[v] == m) for v, kp in enumerate(keep)]
    if min_p > 0:
        keep = [kp and (math.exp(x[v] - m) >= min_p) for v, kp in enumerate(keep)]
    q = torch.tensor([math.exp(x[v] - m) if keep[v] else 0.0 for v in range(V)], dtype=torch.float64)
    return q / q.sum()


def chi2_pvalue(stat: float, dof: int) -> float:
    """Upper tail of chi-square by the Wilson-Hilferty cube-root normal approximation
    (no scipy here; accurate to a few percent in the tail for dof >= 3, plenty
    for a 1e-4 threshold)."""
    if dof <= 0:
        return 1.0
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def chi2_test(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int, float]:
    """Pearson chi-square of counts against probs over the kept tokens, pooling
    cells with expected count < 5 into one. Returns (statistic, dof, p-value)."""
    n = float(counts.sum())
    exp = probs * n
    big = exp >= 5
    obs_cells = counts[big].double().tolist()
    exp_cells = exp[big].tolist()
    small_exp = float(exp[~big & (probs > 0)].sum())
    if small_exp > 0:
        obs_cells.append(float(counts[~big & (probs > 0)].sum()))
        exp_cells.append(small_exp)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs_cells, exp_cells, strict=True))
    dof = len(exp_cells) - 1
    return stat, dof, chi2_pvalue(stat, dof)


def draw_counts(sample_fn, setting, rows=2000, offsets=range(10)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw rows * len(offsets) tokens of the LOGITS row under one setting.

    Rows are independent draws (the row index is part of the counter), and so are
    offsets. Returns (counts [V], tokens, logprobs)."""
    T, k, p, mp = setting
    logits = torch.tensor(LOGITS).repeat(rows, 1)
    toks, lps = [], []
    for off in offsets:
        t, lp = sample_fn(logits, temperature=T, top_k=k, top_p=p, min_p=mp, seed=20261128, offset=off)
        toks.append(t)
        lps.append(lp)
    tokens = torch.cat(toks)
    return torch.bincount(tokens, minlength=len(LOGITS)), tokens, torch.cat(lps)
