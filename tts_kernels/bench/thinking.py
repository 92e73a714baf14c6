"""Thinking budgets: what the device rule costs in a decode step, and end to end.

Op level: one decode step's sampling (:func:`~tts_kernels.sample`) alone, against the same step with the
thinking rule around it (:func:`~tts_kernels.ops.thinking.thinking_logits` before, ``thinking_update``
after), over ``[R, V]`` logits with every row in the rule's busiest case (below the minimum: the stop
mass moved). The peer here is the step without the rule: the ratio is the rule's overhead.

Accuracy: the bundled thinking policy (``policy-think``) on held-out problems against a forced minimum of
thinking tokens, against majority voting at comparable total tokens, and the two combined
(:func:`thinking_curve`, with 95% bootstrap intervals); the demo prints the first part.
"""
from __future__ import annotations

import time

import torch

from ..ops.sample import sample
from ..ops.thinking import NO_LIMIT, ThinkingRule, ThinkingState, thinking_logits, thinking_update
from .stats import bootstrap_ci
from .timing import compare


def _rule(V: int, device) -> ThinkingRule:
    forced = torch.tensor([[5, 6, -1], [7, -1, -1], [3, 8, 9]], device=device)
    return ThinkingRule(forced=forced, lengths=torch.tensor([2, 1, 3], device=device),
                        marker=torch.tensor([3], device=device), eos=torch.tensor([2], device=device),
                        min_tokens=NO_LIMIT, max_tokens=NO_LIMIT)


def op_rows(device="cpu", quick=False, rounds=5) -> list[dict]:
    device = torch.device(device)
    shapes = [(16, 512), (64, 32000)] if quick else [(16, 512), (64, 32000), (256, 32000), (64, 152064)]
    out = []
    for R, V in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(R, V, generator=g, device=device)
        rule = _rule(V, device)
        state = ThinkingState.start(R, device)
        offset = torch.zeros((), dtype=torch.int64, device=device)

        def plain():
            return sample(logits, temperature=0.8, seed=0, offset=offset)

        def ruled():
            x = thinking_logits(logits, state, rule)
            tok, _ = sample(x, temperature=0.8, seed=0, offset=offset)
            return thinking_update(state, tok, rule)

        res = compare(plain, ruled, device=device, rounds=rounds, iters=10, warmup=3)
        out.append({"rows": R, "vocab": V, "plain_ms": res["peer_ms"], "ruled_ms": res["ours_ms"],
                    "overhead": res["ours_ms"] / res["peer_ms"]})
    return out


def thinking_curve(problems: int = 200, mins=(0, 32, 64, 128, 256), best_of=(1, 2, 4, 8), combined=((4, 64),),
                   temperature: float = 0.8, answer_tokens: int = 160, seed: int = 0, *, policy=None,
                   device="cpu", root=None) -> list[dict]:
    """policy-think on held-out problems: accuracy against a forced minimum of thinking tokens (greedy),
    against majority@N at temperature (no forcing) for comparable total tokens, and the two combined
    (majority@N with a forced minimum). Each row: accuracy, its 95% bootstrap interval, tokens per problem
    (thinking and all)."""
    from .. import bundled
    from ..bundled import arith
    from ..search import Settings, ThinkingBudget, run

    policy = policy or bundled.load_policy("think", device=device, root=root)
    probs = bundled.test_problems(problems)
    prompts = [arith.thinking_prompt(p) for p in probs]

    def one(label, n, m, temp):
        think = ThinkingBudget(min_thinking_tokens=m, end=arith.THINK_END, continuations=(arith.WAIT + "\n",))
        s = Settings(max_new_tokens=m + answer_tokens + 200, temperature=temp, thinking=think)
        t0 = time.perf_counter()
        res = run("majority", policy, None, prompts, budget=n, settings=s, seed=seed)
        ok = [arith.grade(a, p) for a, p in zip(res.predictions, probs)]
        lo, hi = bootstrap_ci(ok)
        return {"run": label, "n": n, "min_thinking": m, "temperature": temp, "accuracy": sum(ok) / len(ok),
                "ci95": (lo, hi), "tokens_per_problem": res.compute.policy_generated_tokens / len(probs),
                "thinking_per_problem": res.compute.thinking_tokens / len(probs),
                "seconds": time.perf_counter() - t0}

    rows = [one(f"greedy, min {m}", 1, m, 0.0) for m in mins]
    rows += [one(f"majority@{n}, min 0", n, 0, temperature) for n in best_of]
    rows += [one(f"majority@{n}, min {m}", n, m, temperature) for n, m in combined]
    return rows
