"""A search-and-learn-style PRM beam search and DVTS: the peer of ``tts_kernels.search.step_search``.

What huggingface/search-and-learn does, written plainly with transformers:

* prompts run one at a time;
* every iteration, every beam's full history (prompt + all previous steps) is run
  through the policy again from scratch (a fresh ``DynamicCache`` prefill), then the
  step is generated token by token on that cache, one beam at a time;
* the PRM re-scores every beam's full prefix (prompt + every step) in one forward from
  scratch each iteration, and the aggregate is recomputed from all the step scores;
* the step end is checked on the host after every token.

Same choices given the same samples: the baseline draws its tokens with
``tts_kernels.sample`` with the same seed and offsets as ours *and the same row index*:
``sample``'s randomness for row ``r`` is a function of (seed, offset, r, token), so each
beam's logits are put at the row that beam occupies in our batch (a ``[rows, V]``
buffer, ``-inf`` elsewhere: such rows cost a max scan only) and that row's token is
taken. The layout is a deterministic function of the algorithm, tracked here:

* beam search: rows come in blocks of ``n`` per live prompt (prompts in order); a
  prompt is live at iteration ``k`` if it kept a survivor at every earlier iteration;
* DVTS: rows come in blocks of ``beam_width`` per live subtree (prompts, then subtrees,
  in order).

Prompts run one at a time, so prompt ``p`` knows the live counts of prompts ``< p`` at
each iteration from their (finished) runs. The beams of a prompt generate in lock step
only so that one ``sample`` call per token position serves them all; each beam still has
its own cache and its own forward. The time of that emulation (building the buffer and
sampling) is reported as ``compute["emulation_ms"]``, so a benchmark can leave it out.

The policy is re-prefilled from token ids (prompt ids + every sampled token kept), not
from re-tokenized text: the same number of tokens as re-tokenizing, and exact for a
tokenizer whose decode does not round-trip per step (a word-level tokenizer joins steps
without a space). The delimiter test is that of ``steps.DelimiterMatcher``: the
delimiter occurs in the concatenation of the step's tokens each decoded alone.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from tts_kernels import sample
from tts_kernels.ops.prm import init_aggregate, prm_score
from tts_kernels.models.compat import ForwardArgs
from tts_kernels.search import Candidate
from tts_kernels.search.answers import extract_answer


@dataclass
class BaselineResult:
    """Every prompt's completed candidates, in completion order, and the answers picked from them
    three ways (plain Python, as search-and-learn does): best score, majority, weighted vote."""

    completed: list[list[Candidate]]
    best: list[Candidate | None]
    best_answer: list[str | None]
    majority: list[str | None]
    weighted: list[str | None]
    compute: dict


def _select(completed: list[list[Candidate]]):
    """Best aggregate (NaN lowest, ties to the first), majority and weighted answers (NaN weighs 0;
    ties to the answer seen first; candidates without an answer do not vote), per prompt."""
    best, best_answer, majority, weighted = [], [], [], []
    for cands in completed:
        top = None
        for c in cands:
            if top is None or _key(c.score) > _key(top.score):
                top = c
        best.append(top)
        best_answer.append(top.answer if top else None)
        for out, weigh in ((majority, lambda c: 1.0), (weighted, lambda c: 0.0 if c.score != c.score else c.score)):
            total: dict[str, float] = {}
            for c in cands:
                if c.answer is not None:
                    total[c.answer] = total.get(c.answer, 0.0) + weigh(c)
            # max() keeps the first of equal totals, and dicts keep first-seen order.
            out.append(max(total, key=total.get) if total else None)
    return best, best_answer, majority, weighted


def counts(compute) -> dict:
    """A result's ``compute`` as a plain dict (ours returns a ``Compute`` record, the baseline a dict)."""
    import dataclasses

    return dataclasses.asdict(compute) if dataclasses.is_dataclass(compute) else dict(compute)


def _key(x: float) -> float:
    return float("-inf") if x != x else x  # NaN ranks as -inf (as in the ops)


class _Beam:
    __slots__ = ("ids", "steps", "step_scores", "score", "plen")

    def __init__(self, ids, steps=(), step_scores=(), score=float("nan"), plen=None):
        self.ids, self.steps, self.step_scores, self.score = list(ids), list(steps), list(step_scores), score
        self.plen = len(self.ids) if plen is None else plen  # prompt tokens at the head of ids

    def copy(self) -> "_Beam":
        return _Beam(self.ids, self.steps, self.step_scores, self.score, self.plen)


class _Baseline:
    def __init__(self, policy, prm, *, agg, seed, temperature, top_p, top_k, step_delimiter):
        self.policy, self.prm = policy, prm
        self.model, self.tok = policy.model, policy.tokenizer
        self.fwd = ForwardArgs(self.model)
        self.eos = set(policy.eos_token_ids)
        self.agg, self.seed = agg, seed
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
        self.delim = step_delimiter
        self.V = None
        self.piece: dict[int, str] = {}
        self.counts = dict(policy_prefill_tokens=0, policy_generated_tokens=0, policy_decode_rows=0, prm_tokens=0)
        self.emulation = 0.0

    def _text(self, v: int) -> str:
        t = self.piece.get(v)
        if t is None:
            t = self.piece[v] = self.tok.decode([v])
        return t

    def generate(self, beams: list[_Beam], rows: list[int], *, offset: int, limit: int, last: bool):
        """One step for each beam (beam ``b`` sits at our row ``rows[b]``); returns (texts, finish)."""
        dev = self.policy.device
        caches, logits = [], []
        for b in beams:  # re-prefill every beam's full history from scratch
            c = DynamicCache(config=self.model.config)
            out = self.model(**self.fwd(c, input_ids=torch.tensor([b.ids], device=dev), use_cache=True,
                                        logits_to_keep=1))
            self.counts["policy_prefill_tokens"] += len(b.ids)
            caches.append(c)
            logits.append(out.logits[0, -1])
        B = len(beams)
        new = [[] for _ in range(B)]
        seen = [""] * B  # the step's tokens decoded one by one (what DelimiterMatcher reads)
        active, eos_hit, delim = [True] * B, [False] * B, [False] * B
        height = max(rows) + 1 if rows else 0
        for t in range(limit):
            live = [b for b in range(B) if active[b]]
            if not live:
                break
            t0 = time.perf_counter()
            if self.V is None:
                self.V = logits[0].shape[0]
            buf = torch.full((height, self.V), float("-inf"), device=dev, dtype=logits[0].dtype)
            for b in live:
                buf[rows[b]] = logits[b]
            tok = sample(buf, seed=self.seed, offset=offset + t, **self.sampling)[0].tolist()
            self.emulation += time.perf_counter() - t0
            for b in live:
                v = tok[rows[b]]
                new[b].append(v)
                self.counts["policy_generated_tokens"] += 1
                if v in self.eos:
                    eos_hit[b], active[b] = True, False
                    continue
                if not last:
                    seen[b] += self._text(v)
                    if self.delim in seen[b]:
                        delim[b], active[b] = True, False
                if active[b] and t < limit - 1:  # feed it only if the step goes on
                    out = self.model(**self.fwd(caches[b], input_ids=torch.tensor([[v]], device=dev), use_cache=True))
                    self.counts["policy_decode_rows"] += 1
                    logits[b] = out.logits[0, -1]
        texts, finish = [], []
        for b, beam in enumerate(beams):
            ids = [v for v in new[b] if v not in self.eos]
            prev = "".join(beam.steps)  # the step's text: what it adds to the decoded completion
            full = self.tok.decode(beam.ids[beam.plen:] + ids, skip_special_tokens=True)
            text = full[len(prev):] if full.startswith(prev) else self.tok.decode(ids, skip_special_tokens=True)
            texts.append(text)
            if eos_hit[b]:
                finish.append("eos")
            elif text == "":
                finish.append("empty")
            elif last:
                finish.append("final")
            elif not delim[b]:
                finish.append("length")
            else:
                finish.append(None)
            beam.ids += ids
            if text:
                beam.steps.append(text)
        return texts, finish

    def score(self, prompt_ids: list[int], beam: _Beam) -> None:
        """Re-score the full prefix (prompt + every step) from scratch; recompute the aggregate."""
        dev = self.prm.device
        ids, ends = self.prm.encode_steps(beam.steps)
        ids = prompt_ids + ids
        self.counts["prm_tokens"] += len(ids)
        if not ends:
            beam.step_scores, beam.score = [], init_aggregate(1, self.agg)[0].item()
            return
        hidden = self.prm.base(input_ids=torch.tensor([ids], device=dev)).last_hidden_state
        pos = torch.tensor([[len(prompt_ids) + e for e in ends]], device=dev)
        a, c = init_aggregate(1, self.agg, device=dev)
        scores, a, _ = prm_score(hidden, pos, self.prm.weight, self.prm.bias, aggregate=a, count=c, agg=self.agg,
                                 positive_class=self.prm.positive_class)
        beam.step_scores, beam.score = scores[0].tolist(), a.item()

    def candidate(self, beam: _Beam, finish: str, extract) -> Candidate:
        text = "".join(beam.steps)
        return Candidate(text=text, answer=extract(text), score=beam.score, finish=finish, steps=list(beam.steps),
                         step_scores=list(beam.step_scores))

    def compute(self) -> dict:
        return dict(self.counts, emulation_ms=self.emulation * 1e3)


def _setup(policy, prm, prompts, n, beam_width, num_iterations, max_step_tokens, max_new_tokens, kw):
    for name, v in (("n", n), ("beam_width", beam_width), ("num_iterations", num_iterations),
                    ("max_step_tokens", max_step_tokens), ("max_new_tokens", max_new_tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if n % beam_width:
        raise ValueError(f"n ({n}) must be a multiple of beam_width ({beam_width})")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    return _Baseline(policy, prm, **kw)


def _offsets(num_iterations, max_step_tokens, max_new_tokens):
    """Offset and token limit of each iteration (ours: the offset grows by each step's limit)."""
    out, off = [], 0
    for it in range(num_iterations):
        limit = max_new_tokens if it == num_iterations - 1 else max_step_tokens
        out.append((off, limit))
        off += limit
    return out


@torch.no_grad()
def baseline_beam_search(policy, prm, prompts: Sequence[str], *, n: int, beam_width: int = 4, num_iterations: int = 8,
                         step_delimiter: str = "\n\n", max_step_tokens: int = 24, max_new_tokens: int = 96,
                         lookahead: int = 0, agg: str = "last", temperature: float = 0.8, top_p: float = 1.0,
                         top_k: int = 0, seed: int = 0, extract: Callable[[str], str | None] = extract_answer,
                         sync_every: int = 8) -> BaselineResult:
    """Search-and-learn-style PRM beam search (see the module docstring); the arguments are ours
    (``tts_kernels.search.Settings`` names and defaults), the answers picked by its own code."""
    if lookahead:
        raise NotImplementedError("lookahead > 0 is not implemented")
    s = _setup(policy, prm, prompts, n, beam_width, num_iterations, max_step_tokens, max_new_tokens,
               dict(agg=agg, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k,
                    step_delimiter=step_delimiter))
    keep = n // beam_width
    plan = _offsets(num_iterations, max_step_tokens, max_new_tokens)
    live_iters: list[int] = []  # per finished prompt: the iterations at which it was live
    completed: list[list[Candidate]] = []
    for prompt in prompts:
        p = len(live_iters)
        prompt_ids = policy.encode(prompt)
        prm_ids = prm.encode_prompt(prompt)
        beams = [_Beam(prompt_ids) for _ in range(n)]
        done: list[Candidate] = []
        it_live = 0
        for it, (offset, limit) in enumerate(plan):
            last = it == num_iterations - 1
            it_live = it + 1
            base = n * sum(1 for q in range(p) if live_iters[q] > it)  # our rows of this prompt
            _, finish = s.generate(beams, [base + j for j in range(n)], offset=offset, limit=limit, last=last)
            for b in beams:
                s.score(prm_ids, b)
            for b, f in zip(beams, finish):
                if f is not None:
                    done.append(s.candidate(b, f, extract))
            if last:
                break
            live = [j for j in range(n) if finish[j] is None]
            live.sort(key=lambda j: (-_key(beams[j].score), j))
            survivors = live[:keep]
            if not survivors:
                break
            beams = [beams[survivors[i % len(survivors)]].copy() for i in range(n)]
        live_iters.append(it_live)
        completed.append(done)
    return BaselineResult(completed, *_select(completed), compute=s.compute())


@torch.no_grad()
def baseline_dvts(policy, prm, prompts: Sequence[str], *, n: int, beam_width: int = 4, num_iterations: int = 8,
                  step_delimiter: str = "\n\n", max_step_tokens: int = 24, max_new_tokens: int = 96,
                  agg: str = "last", temperature: float = 0.8, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                  extract: Callable[[str], str | None] = extract_answer, sync_every: int = 8) -> BaselineResult:
    """Search-and-learn-style DVTS (see the module docstring); arguments as :func:`baseline_beam_search`."""
    s = _setup(policy, prm, prompts, n, beam_width, num_iterations, max_step_tokens, max_new_tokens,
               dict(agg=agg, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k,
                    step_delimiter=step_delimiter))
    subtrees = n // beam_width
    plan = _offsets(num_iterations, max_step_tokens, max_new_tokens)
    live_counts: list[list[int]] = []  # per finished prompt: live subtrees at each iteration
    completed: list[list[Candidate]] = []
    for prompt in prompts:
        prompt_ids = policy.encode(prompt)
        prm_ids = prm.encode_prompt(prompt)
        trees = [_Beam(prompt_ids) for _ in range(subtrees)]  # each live subtree's chosen history
        done: list[Candidate] = []
        counts = []
        for it, (offset, limit) in enumerate(plan):
            if not trees:
                break
            last = it == num_iterations - 1
            counts.append(len(trees))
            before = sum(c[it] for c in live_counts if len(c) > it)  # live subtrees of earlier prompts
            beams = [t.copy() for t in trees for _ in range(beam_width)]
            rows = [(before + i) * beam_width + j for i in range(len(trees)) for j in range(beam_width)]
            _, finish = s.generate(beams, rows, offset=offset, limit=limit, last=last)
            for b in beams:
                s.score(prm_ids, b)
            nxt = []
            for i in range(len(trees)):
                group = range(i * beam_width, (i + 1) * beam_width)
                best = max(group, key=lambda j: (_key(beams[j].score), -j))  # ties to the first
                if finish[best] is not None:
                    done.append(s.candidate(beams[best], finish[best], extract))
                else:
                    nxt.append(beams[best])
            trees = nxt
        live_counts.append(counts)
        completed.append(done)
    return BaselineResult(completed, *_select(completed), compute=s.compute())
