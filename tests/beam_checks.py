"""Shared checks for beam_topk backends (CPU, CUDA, Triton interpreter)."""
import math

import torch

from tts_kernels.reference import beam_topk_ref

# Tolerances per logits dtype. Every backend upcasts to float32 before any
# arithmetic, so the inputs are identical; what differs is the log-sum-exp: a sum
# of V terms in another order (per thread, then a tree merge on GPU) plus a
# polynomial or fast-math exp and log (a few ulp each). The error in log d stays
# at a few 1e-6 even at V = 2e5; scores are O(10-20), whose fp32 ulp is ~1e-6.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=2e-5),
    torch.float16: dict(rtol=1e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=1e-5, atol=2e-5),
}


def full_scores(logits, beam_scores, temperature=1.0):
    """float64 [B, K*V] scores, the ground truth for checking any selection."""
    B, K = beam_scores.shape
    x = logits.float() / temperature  # the op divides in float32, then NaN, +inf -> -inf
    x = torch.where(torch.isnan(x) | torch.isposinf(x), torch.full_like(x, -math.inf), x).double()
    lp = torch.log_softmax(x, -1)
    lp = torch.where(torch.isnan(lp), torch.full_like(lp, -math.inf), lp)
    return (lp + beam_scores.double().reshape(-1, 1)).reshape(B, -1)


def check_selection(out, logits, beam_scores, C, temperature=1.0, tol=None):
    """A valid top-C: shapes and dtypes, in range, distinct, scores equal to the
    chosen candidates' true scores and to the reference's, and the exact order
    of a stable descending sort (equal scores by lower flat index). Only
    near-ties (closer than the tolerance, not equal) may be ordered otherwise."""
    scores, parents, tokens = out
    tol = tol or TOL[logits.dtype]
    B, K = beam_scores.shape
    V = logits.shape[1]
    assert scores.shape == parents.shape == tokens.shape == (B, C)
    assert scores.dtype == torch.float32 and parents.dtype == tokens.dtype == torch.int64
    assert scores.device == logits.device
    assert not torch.isnan(scores).any(), "NaN score"
    assert int(parents.min()) >= 0 and int(parents.max()) < K, "parent out of range"
    assert int(tokens.min()) >= 0 and int(tokens.max()) < V, "token out of range"
    flat = parents * V + tokens
    for b in range(B):
        assert flat[b].unique().numel() == C, "candidates must be distinct"
    torch.testing.assert_close(scores, beam_topk_ref(logits, beam_scores, C, temperature)[0], **tol)
    s64 = full_scores(logits, beam_scores, temperature)
    chosen = s64.gather(1, flat)
    torch.testing.assert_close(scores.double(), chosen, **tol)
    expected = torch.sort(s64, dim=1, descending=True, stable=True).indices[:, :C]
    differ = flat != expected
    if differ.any():
        a, e = chosen[differ], s64.gather(1, expected)[differ]
        assert ((a - e).abs() < tol["atol"]).all() and (a != e).all(), (
            f"order differs beyond near-ties: got {flat[differ].tolist()} (scores {a.tolist()}), "
            f"expected {expected[differ].tolist()} (scores {e.tolist()})"
        )
