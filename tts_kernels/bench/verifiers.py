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
from collections import Counter, defaultdict

import torch

from ..bundled import arith
from ..search.answers import extract_answer


def sample_pool(policy, problems, n: int, *, temperature: float = 0.8, seed: int = 0, max_new_tokens: int = 96,
                chunk: int = 50) -> list[list[str]]:
    """``n`` sampled solution texts per problem."""
    from ..search.best_of_n import sample_completions

    out = []
    for i in range(0, len(problems), chunk):
        part = problems[i: i + chunk]
        texts, _, _, _ = sample_completions(policy, [p.prompt for p in part], n, max_new_tokens=max_new_tokens,
                                            temperature=temperature, seed=seed + i)
        out += texts
    return out


@torch.no_grad()
def score_pool(verifier, problems, pool, *, chunk: int = 25) -> list[list[float]]:
    """The verifier's aggregate (``last``) for every text of the pool."""
    out = []
    for i in range(0, len(problems), chunk):
        scored = verifier.score([p.prompt for p in problems[i: i + chunk]], pool[i: i + chunk], agg="last")
        agg = scored.aggregate.view(-1, len(pool[0])).nan_to_num(0.0)
        out += agg.tolist()
    return out


def _pick_best(scores, k):
    return max(range(k), key=lambda j: (scores[j], -j))


def _weighted(answers, scores, k):
    tot = defaultdict(float)
    for a, s in zip(answers[:k], scores[:k]):
        if a is not None:
            tot[a] += s
    return max(tot, key=tot.get) if tot else None


def _majority(answers, k):
    c = Counter(a for a in answers[:k] if a is not None)
    return c.most_common(1)[0][0] if c else None


def quality(problems, pool, scores, ks=(4, 16)) -> dict:
    """Pair ordering, best-of-k and weighted-k of one verifier's ``scores`` of ``pool``."""
    pairs = ordered = 0.0
    best = {k: 0 for k in ks}
    weighted = {k: 0 for k in ks}
    for p, texts, sc in zip(problems, pool, scores):
        answers = [extract_answer(t) for t in texts]
        right = [arith.grade(a, p) for a in answers]
        rs = [s for s, r in zip(sc, right) if r]
        ws = [s for s, r in zip(sc, right) if not r]
        for r in rs:
            for w in ws:
                pairs += 1
                ordered += 1.0 if r > w else 0.5 if r == w else 0.0
        for k in ks:
            best[k] += right[_pick_best(sc, k)]
            weighted[k] += arith.grade(_weighted(answers, sc, k), p)
    P = len(problems)
    return {"pair_ordering": ordered / max(pairs, 1), "pairs": int(pairs),
            **{f"best_of_{k}": best[k] / P for k in ks}, **{f"weighted_{k}": weighted[k] / P for k in ks}}


def baselines(problems, pool, ks=(4, 16)) -> dict:
    """Verifier-free figures of the pool: single-sample accuracy, majority@k, pass@k."""
    P = len(problems)
    out = {"single": sum(arith.grade(extract_answer(t), p) for p, ts in zip(problems, pool) for t in ts)
           / (P * len(pool[0]))}
    for k in ks:
        ans = [[extract_answer(t) for t in ts[:k]] for ts in pool]
        out[f"majority_{k}"] = sum(arith.grade(_majority(a, k), p) for a, p in zip(ans, problems)) / P
        out[f"pass_{k}"] = sum(any(arith.grade(x, p) for x in a) for a, p in zip(ans, problems)) / P
    return out


def run(*, problems: int = 200, samples: int = 16, seed: int = 77, verifiers=("prm", "likelihood"), root=None) -> dict:
    """The pool on ``problems`` held-out problems (test split, ``seed``; not the demo's problems) and every
    verifier's figures on it."""
    from .. import bundled

    probs = bundled.test_problems(problems, seed=seed)
    t0 = time.perf_counter()
    pool = sample_pool(bundled.load_policy("small", root=root), probs, samples, seed=0)
    out = {"problems": problems, "samples": samples, "seed": seed, "sample_seconds": time.perf_counter() - t0,
           "baselines": baselines(probs, pool, ks=(4, samples)), "verifiers": {}}
    for kind in verifiers:
        t0 = time.perf_counter()
        sc = score_pool(bundled.load_verifier(kind, root=root), probs, pool)
        out["verifiers"][kind] = dict(quality(probs, pool, sc, ks=(4, samples)), seconds=time.perf_counter() - t0)
    return out
