"""How well a verifier judges the bundled small policy's own samples (the yardstick for the bundled PRM).

One pool: ``n`` samples per held-out problem from policy-small (temperature 0.8, the demo's setting), drawn
once and scored by every verifier, so verifiers differ only in how they rank the same texts. Per verifier:

* **pair ordering**: over every (right answer, wrong answer) pair of samples of one problem, the share where
  the right one scores higher (ties count half): the within-problem ranking best-of-N relies on;
* **best-of-k**: accuracy of the highest-scoring of the first ``k`` samples (aggregate ``last``);
* **weighted-k**: accuracy of the answer with the largest summed score among the first ``k``;

and, verifier-free: single-sample accuracy, majority@k and pass@k (any of the first ``k`` right).
"""
from __future__ import annotations

import time

import torch

from ..bundled import arith
from ..search.answers import extract_answer
from ..search.result import Candidate, select_candidates


@torch.no_grad()
def score_pool(verifier, problems, pool, *, chunk: int = 25) -> list[list[float]]:
    """The verifier's aggregate (``last``) for every text of the pool."""
    out = []
    for i in range(0, len(problems), chunk):
        scored = verifier.score([p.prompt for p in problems[i: i + chunk]], pool[i: i + chunk], agg="last")
        agg = scored.aggregate.view(-1, len(pool[0])).nan_to_num(0.0)
        out += agg.tolist()
    return out


def _accuracy(problems, pool, scores, k: int, rule: str) -> float:
    """Accuracy of ``select_candidates``'s ``rule`` over each problem's first ``k`` samples."""
    cands = [[Candidate(t, extract_answer(t), s) for t, s in zip(ts[:k], sc[:k])] for ts, sc in zip(pool, scores)]
    _, answers = select_candidates(cands, rule)
    return sum(arith.grade(a, p) for a, p in zip(answers, problems)) / len(problems)


def quality(problems, pool, scores, ks=(4, 16)) -> dict:
    """Pair ordering, best-of-k and weighted-k of one verifier's ``scores`` of ``pool``."""
    pairs = ordered = 0.0
    for p, texts, sc in zip(problems, pool, scores):
        right = [arith.grade(extract_answer(t), p) for t in texts]
        for r in (s for s, ok in zip(sc, right) if ok):
            for w in (s for s, ok in zip(sc, right) if not ok):
                pairs += 1
                ordered += 1.0 if r > w else 0.5 if r == w else 0.0
    return {"pair_ordering": ordered / max(pairs, 1), "pairs": int(pairs),
            **{f"best_of_{k}": _accuracy(problems, pool, scores, k, "best") for k in ks},
            **{f"weighted_{k}": _accuracy(problems, pool, scores, k, "weighted") for k in ks}}


def baselines(problems, pool, ks=(4, 16)) -> dict:
    """Verifier-free figures of the pool: single-sample accuracy, majority@k, pass@k."""
    P = len(problems)
    out = {"single": sum(arith.grade(extract_answer(t), p) for p, ts in zip(problems, pool) for t in ts)
           / (P * len(pool[0]))}
    unscored = [[float("nan")] * len(ts) for ts in pool]
    for k in ks:
        out[f"majority_{k}"] = _accuracy(problems, pool, unscored, k, "majority")
        out[f"pass_{k}"] = sum(any(arith.grade(extract_answer(t), p) for t in ts[:k]) for ts, p in zip(pool, problems)) / P
    return out


def run(*, problems: int = 200, samples: int = 16, seed: int = 77, verifiers=("prm", "likelihood"), root=None) -> dict:
    """The pool on ``problems`` held-out problems (test split, ``seed``; not the demo's problems) and every
    verifier's figures on it."""
    from .. import bundled

    probs = bundled.test_problems(problems, seed=seed)
    t0 = time.perf_counter()
    pool = bundled.sample_texts(bundled.load_policy("small", root=root), probs, samples, temperature=0.8, seed=0,
                                chunk=50)
    out = {"problems": problems, "samples": samples, "seed": seed, "sample_seconds": time.perf_counter() - t0,
           "baselines": baselines(probs, pool, ks=(4, samples)), "verifiers": {}}
    for kind in verifiers:
        t0 = time.perf_counter()
        sc = score_pool(bundled.load_verifier(kind, root=root), probs, pool)
        out["verifiers"][kind] = dict(quality(probs, pool, sc, ks=(4, samples)), seconds=time.perf_counter() - t0)
    return out
