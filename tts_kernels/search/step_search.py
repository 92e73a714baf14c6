"""Step-level searches guided by a PRM: ``prm_beam_search`` and ``dvts``.

Semantics follow huggingface/search-and-learn (Snell et al., arXiv 2408.03314), read
for their meaning only; the waste is removed:

* all prompts run together in one batch (there: one prompt at a time);
* a beam's history stays in the paged KV cache and is forked, never re-prefilled
  (there: every beam's full text is resubmitted to the engine each step);
* the PRM keeps its own forked cache and scores only each new step (there: every
  full prefix is re-scored each step);
* a step ends on the device (``steps.DelimiterMatcher``), and selection runs on the
  device (``topk_per_group`` / ``select_best``); the host looks once per step to
  detokenize the new steps (the PRM needs their text) and rebuild the batch.

Differences, on purpose: a step ends at the end of the token that completes the
delimiter (never inside a token); and with ``lookahead`` the rolled-out steps are
greedy, as there. A step's text is what it adds to the decoded completion
(``decode(completion + step)`` minus ``decode(completion)``), so tokenizers whose
decode depends on context (SentencePiece's leading spaces) give the same text as
decoding the whole completion.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._threads import in_search_pool
from ..ops._validate import check_int
from ..ops.select import select_best, topk_per_group
from ..ops.thinking import ThinkingState
from .accounting import Compute, count_flops
from .answers import boxed_answer, extract_answer
from .cancel import cancelled
from .dedupe import RowHashes
from .result import SELECT_RULES, Candidate, SearchResult, select_candidates
from .seeds import Seeds
from .settings import Settings, resolve
from .steps import DelimiterMatcher, sample_steps
from .validate import check_prompts


class _Search:
    """Rows (beams) of all prompts under the policy and the PRM, with their host-side texts."""

    def __init__(self, policy, prm, prompts, s: Settings, *, seed: int, rows: int, track_logprobs: bool = False,
                 extra: Sequence[tuple[int, list[int]]] = (), hash_rows: bool = False):
        self.policy, self.prm_model = policy, prm
        self.tok = policy.tokenizer
        self.eos = list(policy.eos_token_ids)
        self.eos_set = set(self.eos)
        self.sampling = dict(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p)
        self.keys = Seeds.of(seed, len(prompts))
        self.sync_every = s.sync_every
        self.max_step_tokens, self.max_final_tokens = s.max_step_tokens, s.max_new_tokens
        self.stop, self.stop_at_answer = s.stop, s.stop_at_answer
        self.cap_ends = s.step_cap == "end"
        prompt_ids = [policy.encode(p) for p in prompts]
        self.prompt_ids = prompt_ids
        budget = s.max_step_tokens * max(s.num_iterations - 1, 0) + s.max_new_tokens
        # extra: rows (prompt index, completion token ids) started after the prompts, their completion
        # prefilled on the policy side (the verifier's row holds the prompt only).
        self.pol = policy.start(prompt_ids + [prompt_ids[p] + list(c) for p, c in extra], rows_hint=rows,
                                max_new_tokens=budget)
        self.prm = None if prm is None else prm.start(list(prompts) + [prompts[p] for p, _ in extra], agg=s.agg,
                                                      rows=rows, max_new_tokens=budget + 8 * s.num_iterations)
        V = self.pol.logits.shape[1]
        # Per row (track_logprobs): sum and count of its sampled tokens' log-probabilities.
        self.track_logprobs = track_logprobs
        if track_logprobs:
            dev = self.pol.logits.device
            self.lp_sum = torch.zeros(len(prompts), dtype=torch.float32, device=dev)
            self.lp_count = torch.zeros(len(prompts), dtype=torch.long, device=dev)
        self.matcher = DelimiterMatcher(self.tok, s.step_delimiter, V, device=self.pol.logits.device)
        self.P = len(prompts)
        n0 = self.P + len(extra)
        if hash_rows and extra:
            raise ValueError("hash_rows: rows started with a completion are not hashed")
        # Rolling hashes of the rows' token ids (filter_duplicates), on the device.
        self.hashes = RowHashes(n0, self.pol.logits.device) if hash_rows else None
        self.owner = list(range(self.P)) + [p for p, _ in extra]  # prompt of each row
        self.texts = [""] * n0
        self.ids: list[list[int]] = [[] for _ in range(self.P)] + [list(c) for _, c in extra]  # (EOS dropped)
        self.steps: list[list[str]] = [[] for _ in range(n0)]
        self.step_scores: list[list[float]] = [[] for _ in range(n0)]
        self.step_ntok: list[list[int]] = [[] for _ in range(n0)]  # kept tokens of each step
        # Thinking budget (Settings.thinking): the rule, each row's state on the device, its thinking
        # tokens on the host (read at the step's host look) and the thinking tokens generated in all.
        dev = self.pol.logits.device
        self.think_rule = None if s.thinking is None else s.thinking.rule(self.tok, self.eos, dev)
        self.think = ThinkingState.start(n0, dev) if self.think_rule is not None else None
        self.thought = [0] * n0
        self.thinking_generated = 0
        self.offset = 0
        self.generated = 0  # tokens sampled and kept
        self.forward_rows = 0  # decode rows run (paused rows included)
        self.prm_extra = 0  # PRM tokens of lookahead rollouts
        self.keys_extra = self.prm_keys_extra = 0  # keys attended by the rollouts (FLOP estimate)

    @property
    def rows(self) -> int:
        return len(self.owner)

    def fork(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, dtype=torch.long, device=self.pol.logits.device)
        self.pol.fork(idx)
        if self.prm is not None:
            self.prm.fork(idx)
        if self.track_logprobs:
            self.lp_sum, self.lp_count = self.lp_sum.index_select(0, idx), self.lp_count.index_select(0, idx)
        if self.hashes is not None:
            self.hashes.fork(idx)
        if self.think is not None:
            self.think = self.think.select(idx)
        for name in ("owner", "texts", "ids", "steps", "step_scores", "step_ntok", "thought"):
            old = getattr(self, name)
            setattr(self, name, [list(old[r]) if isinstance(old[r], list) else old[r] for r in rows])

    def step(self, last: bool, rows: list[int] | None = None) -> tuple[list[str], list[str | None]]:
        """Every row (or only ``rows``) samples one step (to the end on the last iteration) and the PRM
        scores it.

        Returns the step texts and, per row, why it finished (``None``: it goes on; rows left out
        return an empty text and ``None``).
        """
        limit = self.max_final_tokens if last else self.max_step_tokens
        dev = self.pol.logits.device
        only = None if rows is None else torch.tensor(rows, dtype=torch.long, device=dev)
        seed, stream = self.keys.rows_of(self.owner, dev)  # a row's key: (its prompt's seed, its place there)
        st = sample_steps(self.pol, max_tokens=limit, eos_ids=self.eos, matcher=None if last else self.matcher,
                          offset=self.offset, sync_every=self.sync_every, logprobs=self.track_logprobs,
                          rows=only, seed=seed, stream=stream, thinking=self._thinking(), **self.sampling)
        self._count_thinking(st)
        self.offset += limit
        self.forward_rows += st.forward_rows
        if self.track_logprobs:
            self.lp_sum = self.lp_sum + st.logprob_sum
            self.lp_count = self.lp_count + st.counts
        if self.hashes is not None:  # the kept tokens (an EOS ends the step and is not kept)
            self.hashes.extend(st.tokens, st.counts - st.eos.to(st.counts.dtype))
        ids, texts = self._decode(st, self.ids, self.texts)  # one host look per step: the PRM needs the text
        eos, delim = st.eos.tolist(), st.delimited.tolist()
        skip = set() if rows is None else set(range(self.rows)) - set(rows)
        finish = []
        for r, text in enumerate(texts):
            self.generated += len(ids[r])
            if r in skip:
                finish.append(None)
            elif eos[r]:
                finish.append("eos")
            elif text == "":
                finish.append("empty")
            elif last:
                finish.append("final")
            elif not delim[r] and self.cap_ends:
                finish.append("length")
            elif self._answered(self.texts[r] + text):
                finish.append("stop")
            else:
                finish.append(None)
        if self.prm is not None:
            scores = self.prm.add_steps([[t] if t else [] for t in texts])
            first = scores[:, 0].tolist() if scores.shape[1] else [float("nan")] * self.rows
        else:
            first = None  # no verifier: steps are not scored
        for r, text in enumerate(texts):
            kept = [t for t in ids[r] if t not in self.eos_set]
            self.ids[r] += kept
            if text:
                self.texts[r] += text
                self.steps[r].append(text)
                self.step_ntok[r].append(len(kept))
                if first is not None:
                    self.step_scores[r].append(first[r])
        return texts, finish

    def _thinking(self, state: ThinkingState | None = None):
        """``sample_steps``' thinking argument: the rule and the rows' state (``state``: a clone's)."""
        if self.think_rule is None:
            return None
        return self.think_rule, self.think if state is None else state

    def _count_thinking(self, st) -> None:
        """After a step of every row: the new state, and the thinking tokens it added (one host look)."""
        if self.think_rule is None:
            return
        self.think = st.thinking
        now = self.think.thought.tolist()
        self.thinking_generated += sum(now) - sum(self.thought)
        self.thought = now

    def duplicates(self, group: int, live: torch.Tensor) -> list[int]:
        """Live rows whose completion repeats an earlier live row's in their group of ``group`` rows: found
        by hash on the device, each confirmed on the host's token lists (a collision drops nothing)."""
        dup, first = self.hashes.duplicates(group, live)
        flagged = dup.nonzero().squeeze(1)
        pairs = zip(flagged.tolist(), first.index_select(0, flagged).tolist())
        return [r for r, j in pairs if self.ids[r] == self.ids[j]]

    def _answered(self, text: str) -> bool:
        """The completion is done though it goes on: a stop string is in it, or (``stop_at_answer``)
        its ``\\boxed{...}`` is closed."""
        return any(x in text for x in self.stop) or (self.stop_at_answer and boxed_answer(text) is not None)

    def _decode(self, st, base_ids: list[list[int]], base_texts: list[str]) -> tuple[list[list[int]], list[str]]:
        """Each row's step tokens, and the text the step adds to the row's decoded completion
        (``base_ids`` / ``base_texts``: the completion so far)."""
        toks = st.tokens.tolist()
        ids = [[t for t in row if t >= 0] for row in toks]
        texts = []
        for j, row in enumerate(ids):
            kept = [t for t in row if t not in self.eos_set]
            full = self.tok.decode(base_ids[j] + kept, skip_special_tokens=True)
            prev = base_texts[j]
            texts.append(full[len(prev):] if full.startswith(prev) else self.tok.decode(kept, skip_special_tokens=True))
        return ids, texts

    def lookahead_scores(self, finish: list[str | None], steps: int) -> torch.Tensor:
        """Aggregate scores after rolling each unfinished row out ``steps`` more greedy steps.

        The rollouts run on clones of the rows (sharing their cached history; the rows
        themselves are untouched) and are thrown away; only their scores are kept.
        """
        scores = self.prm.aggregate.clone()
        live = [r for r, f in enumerate(finish) if f is None]
        if not live:
            return scores
        idx = torch.tensor(live, dtype=torch.long, device=scores.device)
        pol, prm = self.pol.clone(idx), self.prm.clone(idx)
        try:
            done = [False] * len(live)
            base_ids, base_texts = [list(self.ids[r]) for r in live], [self.texts[r] for r in live]
            think = None if self.think is None else self.think.select(idx)
            for _ in range(steps):
                st = sample_steps(pol, max_tokens=self.max_step_tokens, eos_ids=self.eos, matcher=self.matcher,
                                  temperature=0.0, seed=0, offset=0, sync_every=self.sync_every,
                                  thinking=self._thinking(think))
                if think is not None:  # the rollouts' thinking tokens count, as their tokens do
                    self.thinking_generated += int((st.thinking.thought - think.thought).sum())
                    think = st.thinking
                self.forward_rows += st.forward_rows
                ids, texts = self._decode(st, base_ids, base_texts)
                eos, delim = st.eos.tolist(), st.delimited.tolist()
                for j in range(len(live)):
                    if done[j]:
                        texts[j] = ""  # a finished rollout adds nothing more
                        continue
                    self.generated += len(ids[j])
                    base_ids[j] += [t for t in ids[j] if t not in self.eos_set]
                    base_texts[j] += texts[j]
                    if eos[j] or not delim[j] or not texts[j]:
                        done[j] = True
                prm.add_steps([[t] if t else [] for t in texts])
                if all(done):
                    break
            scores[idx] = prm.aggregate
            self.prm_extra += prm.tokens
            self.keys_extra += int(pol.keys)
            self.prm_keys_extra += prm.keys
        finally:
            pol.free()
            prm.free()
        return scores

    def candidate(self, r: int, score: float, finish: str, extract) -> Candidate:
        if not self.steps[r]:
            score = float("nan")  # nothing was scored (EOS first): never preferred (NaN ranks lowest)
        return Candidate(text=self.texts[r], answer=extract(self.texts[r]), score=score, finish=finish,
                         steps=list(self.steps[r]), step_scores=list(self.step_scores[r]),
                         thinking_tokens=None if self.think_rule is None else self.thought[r])

    def compute(self) -> Compute:
        """Prompt tokens prefilled, tokens sampled (rollouts included), PRM tokens, and FLOPs of every
        forward row actually run (paused rows ride along in decode batches and are counted)."""
        policy_flops = count_flops(self.policy.model, self.pol.prefill_tokens + self.forward_rows,
                                   int(self.pol.keys) + self.keys_extra)
        if self.prm is None:
            prm_tokens, prm_flops = 0, 0.0
        else:
            prm_tokens = self.prm.tokens + self.prm_extra
            prm_flops = count_flops(self.prm_model.flop_module, prm_tokens, self.prm.keys + self.prm_keys_extra)
        return Compute(policy_prefill_tokens=self.pol.prefill_tokens, policy_generated_tokens=self.generated,
                       prm_tokens=prm_tokens, policy_flops=policy_flops, prm_flops=prm_flops,
                       thinking_tokens=self.thinking_generated)

    def free(self) -> None:
        self.pol.free()
        if self.prm is not None:
            self.prm.free()


def _check(name: str, verifier, prompts, n: int, select: str, s: Settings) -> list[str]:
    if verifier is None:
        raise ValueError(f"{name} needs a verifier (it scores every step)")
    prompts = check_prompts(prompts)
    check_int("n", n, minimum=1)
    if n % s.beam_width:
        raise ValueError(f"n ({n}) must be a multiple of beam_width ({s.beam_width})")
    if select not in SELECT_RULES:
        raise ValueError(f"select must be one of {SELECT_RULES}, got {select!r}")
    return prompts


@in_search_pool
def _run(policy, prm, prompts, *, n: int, s: Settings, seed: int, choose,
         hash_rows: bool = False) -> tuple[list[list[Candidate]], Compute]:
    """The loop both searches share: ``n`` rows per prompt; each iteration every row samples one
    step and the PRM scores it; ``choose(search, finish, last, completed)`` records finished rows and
    returns the rows to continue with (host list of row indices, forked for the next iteration)."""
    search = _Search(policy, prm, prompts, s, seed=seed, rows=len(prompts) * n, hash_rows=hash_rows)
    completed: list[list[Candidate]] = [[] for _ in range(search.P)]
    try:
        search.fork([p for p in range(search.P) for _ in range(n)])
        for it in range(s.num_iterations):
            last = it == s.num_iterations - 1
            _, finish = search.step(last)
            rows = choose(search, finish, last, completed)
            gone = cancelled()
            if gone:  # prompts nobody waits for any more: their rows are not continued
                rows = [r for r in rows if search.owner[r] not in gone]
            if last or not rows:
                break
            search.fork(rows)
        compute = search.compute()
    finally:
        search.free()
    return completed, compute


def _result(name: str, n: int, completed, compute: Compute, select: str, device, vote_key: str) -> SearchResult:
    chosen, answers = select_candidates(completed, select, device, vote_key)
    return SearchResult(strategy=name, budget=n, predictions=answers, chosen=chosen, candidates=completed,
                        compute=compute, samples=n * len(completed))


@torch.no_grad()
def prm_beam_search(policy, verifier, prompts: Sequence[str], *, n: int, select: str = "best",
                    settings: Settings | None = None, seed: int | Sequence[int] = 0,
                    extract: Callable[[str], str | None] = extract_answer, **overrides) -> SearchResult:
    """Step-level beam search with a verifier (search-and-learn semantics; see the module docstring).

    ``n`` beams per prompt; each iteration every beam samples one step (up to and including
    ``step_delimiter``); beams that end (EOS, no delimiter within ``max_step_tokens`` unless
    ``step_cap="continue"``, an empty step, a step holding a ``stop`` string, or with
    ``stop_at_answer`` a closed ``\\boxed{}``) are completed; the others are scored by the verifier
    on their new step and the best ``n // beam_width`` per prompt by aggregate score survive and are
    duplicated (in turn) back to ``n`` beams; on the last of ``num_iterations`` iterations beams generate to
    the end (up to ``max_new_tokens``). With ``lookahead > 0`` the ranking score is that of each
    beam rolled out ``lookahead`` more greedy steps (not kept). With ``filter_duplicates`` a beam whose
    token ids repeat another live beam's of its prompt is not ranked (:mod:`~tts_kernels.search.dedupe`:
    hashed on the device, confirmed exactly). The prediction is picked from
    the completed beams by ``select`` (default ``"best"``: the best aggregate score).
    Settings read: ``beam_width``, ``num_iterations``, ``step_delimiter``, ``max_step_tokens``,
    ``max_new_tokens``, ``lookahead``, ``agg``, ``temperature``, ``top_p``, ``top_k``, ``min_p``,
    ``sync_every`` (``settings`` and keyword ``overrides``, as :func:`~tts_kernels.search.best_of_n`).
    """
    s = resolve(settings, overrides)
    prompts = _check("prm_beam_search", verifier, prompts, n, select, s)
    lookahead = s.lookahead
    keep = n // s.beam_width

    def choose(search, finish, last, completed):
        agg_scores = search.prm.aggregate
        agg_h = agg_scores.tolist()
        for r, f in enumerate(finish):
            if f is not None:
                completed[search.owner[r]].append(search.candidate(r, agg_h[r], f, extract))
        if last:
            return []
        # Rows come in blocks of n per live prompt: the best `keep` unfinished rows of each,
        # ranked by their aggregate, or by that of their greedy rollout with lookahead.
        rank = search.lookahead_scores(finish, lookahead) if lookahead else agg_scores
        live = torch.tensor([f is None for f in finish], device=agg_scores.device)
        if s.filter_duplicates:  # a beam whose text repeats another's is not a second survivor
            repeats = search.duplicates(n, live)
            if repeats:
                live[torch.tensor(repeats, device=live.device)] = False
        values, idx = topk_per_group(torch.where(live, rank, float("-inf")).view(-1, n), keep)
        values, idx = values.tolist(), idx.tolist()
        rows = []
        for g in range(len(idx)):
            survivors = [g * n + j for v, j in zip(values[g], idx[g]) if v > float("-inf")]
            if survivors:  # duplicated in turn back to n beams
                rows += [survivors[i % len(survivors)] for i in range(n)]
        return rows

    completed, compute = _run(policy, verifier, prompts, n=n, s=s, seed=seed, choose=choose,
                              hash_rows=s.filter_duplicates)
    return _result("prm_beam_search", n, completed, compute, select, policy.device, s.vote_key)


@torch.no_grad()
def dvts(policy, verifier, prompts: Sequence[str], *, n: int, select: str = "weighted",
         settings: Settings | None = None, seed: int | Sequence[int] = 0,
         extract: Callable[[str], str | None] = extract_answer,
         **overrides) -> SearchResult:
    """Diverse verifier tree search: ``n // beam_width`` independent subtrees per prompt.

    Each iteration every live subtree samples ``beam_width`` candidate next steps, the verifier
    scores them, and the subtree continues with the best one (by aggregate score, ties to
    the first); a subtree ends when its chosen step ends with EOS, is empty, has no
    delimiter within ``max_step_tokens``, completes the answer (``stop``, ``stop_at_answer``, as
    :func:`prm_beam_search`), or on the last iteration (which generates to the end). Every
    subtree's final candidate is returned; the prediction is picked by ``select``
    (default ``"weighted"``: the answer with the largest summed score). Settings as
    :func:`prm_beam_search`; with ``lookahead > 0`` a subtree picks the expansion whose greedy rollout of
    ``lookahead`` more steps scores best (the rollouts are thrown away; a candidate keeps its own score).
    With ``return_siblings`` a subtree also returns the expansions it did not pick at its last step
    (search-and-learn's output pool: ``n`` candidates per prompt), and ``select`` picks among all of them.
    """
    s = resolve(settings, overrides)
    prompts = _check("dvts", verifier, prompts, n, select, s)
    beam_width = s.beam_width

    lookahead, siblings = s.lookahead, s.return_siblings

    def choose(search, finish, last, completed):
        agg_scores = search.prm.aggregate
        # Each subtree keeps its best expansion by aggregate, or by its greedy rollout's with lookahead.
        rank = search.lookahead_scores(finish, lookahead) if lookahead and not last else agg_scores
        best = select_best(rank.view(-1, beam_width)).tolist()  # per subtree, on the device
        agg_h = agg_scores.tolist()
        rows = []
        for g, b in enumerate(best):
            r = g * beam_width + b
            if finish[r] is not None:
                # The subtree ends: its pick, or with return_siblings every expansion of this last step.
                for q in range(g * beam_width, (g + 1) * beam_width) if siblings else (r,):
                    completed[search.owner[q]].append(search.candidate(q, agg_h[q], finish[q] or "sibling", extract))
            else:
                rows += [r] * beam_width
        return rows

    completed, compute = _run(policy, verifier, prompts, n=n, s=s, seed=seed, choose=choose)
    return _result("dvts", n, completed, compute, select, policy.device, s.vote_key)
