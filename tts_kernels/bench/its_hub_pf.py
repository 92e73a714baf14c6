"""Particle filtering against its_hub's, the reference implementation (Red Hat AI's ``its_hub``), at equal
budget on the same models and problems.

its_hub runs one prompt at a time through its language-model interface: every step it sends each live
particle's whole text (prompt and steps so far) to the model, which prefills it again and samples the
next step up to the step delimiter; then it sends every particle's whole text to the PRM, which scores it
again from the start; resampling copies step strings. Here its interfaces are served by the same HF
models through a small local adapter (:class:`HFStepLM`: batched ``generate()`` with the delimiter as a
stop string, :class:`VerifierPRM`: the verifier's ``score`` on the whole text), so both sides spend their
time in the same forward passes; what differs is what each does around them. Ours runs all prompts in
one batch, keeps every history in the paged cache, forks it to resample, and scores only each new step.

its_hub (pinned in ``requirements-dev.txt``) is needed to run this module, not to import it.
"""
from __future__ import annotations

import asyncio
import random
import statistics
import time

import numpy as np
import torch

from ..search import Settings, run
from ..search.answers import extract_answer
from ..models.text import split_steps


def _its_hub():
    try:
        from its_hub.api import AbstractLanguageModel, AbstractProcessRewardModel
        from its_hub.core.algorithms.particle_gibbs import ParticleGibbs
        from its_hub.core.lms.step_generation import StepGeneration
    except ImportError as e:  # pragma: no cover - a bench/test dependency
        raise ImportError("the its_hub comparison needs its_hub (pip install its_hub==1.2.0)") from e
    return AbstractLanguageModel, AbstractProcessRewardModel, ParticleGibbs, StepGeneration


def adapters():
    """The adapter classes, built on its_hub's abstract bases (imported when asked for)."""
    AbstractLanguageModel, AbstractProcessRewardModel, _, _ = _its_hub()

    class HFStepLM(AbstractLanguageModel):
        """its_hub's language-model interface over an HF causal LM: the conversation's texts joined (the
        bundled models have no chat template), left-padded into one batch, ``generate()`` sampling up to
        ``max_new_tokens`` or the stop string; the stop string is cut off as an OpenAI server does."""

        def __init__(self, model, tokenizer, *, max_new_tokens: int, top_p: float = 1.0):
            self.model, self.tokenizer = model, tokenizer
            self.max_new_tokens, self.top_p = max_new_tokens, top_p
            self.calls = self.prefill_tokens = 0

        async def agenerate(self, messages, stop=None, max_completion_tokens=None, temperature=None,
                            include_stop_str_in_output=False, **kwargs):
            single = not isinstance(messages[0], list)
            batch = [messages] if single else messages
            texts = ["".join(m.content or "" for m in conv) for conv in batch]
            tok = self.tokenizer
            enc = [tok.encode(t) for t in texts]
            width = max(len(e) for e in enc)
            pad = tok.pad_token_id
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=self.model.device)
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=self.model.device)
            self.calls += 1
            self.prefill_tokens += sum(len(e) for e in enc)
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                      temperature=temperature or 1.0, top_p=self.top_p, top_k=0,
                                      max_new_tokens=max_completion_tokens or self.max_new_tokens,
                                      stop_strings=[stop] if stop else None, tokenizer=tok, pad_token_id=pad)
            replies = []
            for row in tok.batch_decode(out[:, width:], skip_special_tokens=True):
                if stop and stop in row:
                    row = row[: row.index(stop) + (len(stop) if include_stop_str_in_output else 0)]
                replies.append({"role": "assistant", "content": row})
            return replies[0] if single else replies

    class VerifierPRM(AbstractProcessRewardModel):
        """its_hub's PRM interface over one of our verifiers: each whole text split into steps and scored
        from the start (``score``, aggregate ``agg``), as its_hub asks of a PRM every step."""

        def __init__(self, verifier, *, delimiter: str, agg: str = "last"):
            self.verifier, self.delimiter, self.agg = verifier, delimiter, agg

        async def ascore(self, prompt_or_messages, steps):
            prompt = prompt_or_messages if isinstance(prompt_or_messages, str) else prompt_or_messages.to_prompt()
            texts = [steps] if isinstance(steps, str) else list(steps)
            got = self.verifier.score_steps([prompt], [[split_steps(t, self.delimiter) or [""] for t in texts]],
                                            agg=self.agg)
            scores = [min(max(float(x), 0.0), 1.0) for x in got.aggregate.tolist()]
            return scores[0] if isinstance(steps, str) else scores

        def score(self, prompt_or_messages, steps):
            return asyncio.run(self.ascore(prompt_or_messages, steps))

    return HFStepLM, VerifierPRM


def its_hub_particle_filter(policy, verifier, prompts, *, budget: int, settings: Settings, seed: int = 0,
                            answer_marker: str = "The answer is") -> tuple[list[str | None], dict]:
    """its_hub's particle filtering (``ParticleGibbs`` with one iteration: its ``ParticleFiltering`` class
    drops the ``resampling_method`` it is given), one prompt at a time as it runs. A particle stops when
    its step holds ``answer_marker`` (its_hub's ``stop_token``) or after ``settings.num_iterations`` steps."""
    _, _, ParticleGibbs, StepGeneration = _its_hub()
    HFStepLM, VerifierPRM = adapters()
    s = settings
    lm = HFStepLM(policy.model, policy.tokenizer, max_new_tokens=s.max_step_tokens, top_p=s.top_p)
    prm = VerifierPRM(verifier, delimiter=s.step_delimiter, agg=s.agg)
    # its_hub stops a particle once it holds max_steps steps before the new one: max_steps + 1 steps in all.
    sg = StepGeneration(max_steps=s.num_iterations - 1, step_token=s.step_delimiter, stop_token=answer_marker,
                        temperature=s.temperature)
    pf = ParticleGibbs(sg, prm, num_iterations=1, num_ref_particles=0, resampling_method=s.resampling,
                       final_response_selection="argmax")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    preds = []
    for prompt in prompts:
        reply = pf.infer(lm, prompt, budget)
        preds.append(extract_answer(reply["content"]))
    return preds, {"lm_calls": lm.calls, "lm_prefill_tokens": lm.prefill_tokens}


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / d
    return c - h, c + h


def compare(problems: int = 40, budget: int = 16, *, seed: int = 0, verifier_kind: str = "likelihood",
            device: str = "cpu", resampling: str = "systematic", rounds: int = 3) -> list[dict]:
    """Both particle filters on the first ``problems`` held-out bundled problems at ``budget`` particles,
    small policy, the demo's settings: accuracy (Wilson 95% interval) and the median seconds of ``rounds``
    runs each, after one warm-up run on two problems (the rounds use the same seed: the same answers)."""
    from .. import bundled
    from ..bundled import arith

    probs = bundled.test_problems(problems)
    prompts = [p.prompt for p in probs]
    policy = bundled.load_policy("small", device=device)
    verifier = bundled.load_verifier(verifier_kind, device=device)
    s = Settings(resampling=resampling)

    def ours(ps):
        return run("particle_filtering", policy, verifier, ps, budget=budget, settings=s, seed=seed).predictions, {}

    def theirs(ps):
        return its_hub_particle_filter(policy, verifier, ps, budget=budget, settings=s, seed=seed)

    rows = []
    for name, fn in (("tts-kernels particle_filtering", ours), ("its_hub ParticleGibbs(1 iteration)", theirs)):
        fn(prompts[:2])
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            preds, extra = fn(prompts)
            times.append(time.perf_counter() - t0)
        k = sum(arith.grade(pr, p) for pr, p in zip(preds, probs))
        lo, hi = _wilson(k, len(probs))
        rows.append({"impl": name, "problems": len(probs), "budget": budget, "resampling": resampling,
                     "accuracy": round(k / len(probs), 3), "correct": k, "ci95": f"{lo:.3f}-{hi:.3f}",
                     "seconds": round(statistics.median(times), 2), "runs": [round(t, 2) for t in times], **extra})
    rows[0]["speedup"] = round(rows[1]["seconds"] / rows[0]["seconds"], 2)
    return rows
