"""The rows of a step-level search: one engine that ``prm_beam_search``, ``dvts``, the particle filters,
particle Gibbs and ``rebase`` are policies over.

A *row* is one growing completion of one prompt: a row of the policy session (its paged KV history and
next-token logits), the same row of the verifier session (its scored history and running aggregate), and
the row's fields in :class:`RowData`, where every per-row field is declared once: what a fork copies,
a drop removes and a reorder moves is that declaration, so a new field cannot be left behind.

:class:`StepRows` holds them all and gives the operations the searches are made of:

* :meth:`~StepRows.step`: every row that is not parked samples one step (up to the delimiter; to the
  end on the last iteration), the host looks once (the verifier needs the text) and the verifier scores
  the new steps; each row says why it finished, if it did;
* :meth:`~StepRows.fork`: the batch becomes the listed rows (repeats allowed: a row's copies share its
  history, no KV bytes move), the parked rows carried along after them;
* :meth:`~StepRows.drop`: rows leave the batch (the others keep their order and draw keys);
* :meth:`~StepRows.park` / :meth:`~StepRows.unpark`: parked rows do not sample (particle Gibbs's
  reference particles; each prompt's own row under ``keep_prompts``);
* :meth:`~StepRows.refill`: new rows of given prompts, started from the prompt (``keep_prompts``), each
  drawing as a new candidate of its prompt;
* :meth:`~StepRows.admit`: new prompts join running rows (prefilled into both sessions' pools, one row each
  after the others); with ``tally`` compute is also counted per prompt (:class:`PromptTally`), so a group of
  prompts that shared the batch reports its own (:meth:`~StepRows.compute` with ``prompts``);
* :meth:`~StepRows.roll_back`: rows go back to their first ``t`` steps (the policy row cut on the paged
  cache, ``PolicySession.truncate``; the verifier row re-scores what it no longer holds);
* :meth:`~StepRows.lookahead_scores`, :meth:`~StepRows.duplicates`, :meth:`~StepRows.candidate`,
  :meth:`~StepRows.compute`, :meth:`~StepRows.free`.

What is not the rows' business comes in as arguments: the draw keys (a
:class:`~tts_kernels.search.seeds.Seeds`) and the cancellation (a callable returning the prompts to drop
now, or ``None``; the public drivers pass :func:`~tts_kernels.search.cancel.cancelled`). Nothing here
reads ambient state.

Draw keys. Under one seed per prompt a row draws under its prompt's seed on its *stream*, its number
among its prompt's rows: :meth:`~StepRows.fork` numbers each prompt's new rows ``0, 1, ...`` in batch
order, :meth:`~StepRows.drop` keeps the numbers, :meth:`~StepRows.refill` gives each new row the next
number its prompt has not used. A prompt's draws therefore depend on its own rows only, whatever shares
the batch. Under a run seed a row draws on its batch position (the layout of earlier releases).
Offsets are per prompt: each step advances a prompt's by the token limit its rows used (``offset`` is the
first step's), so a prompt admitted mid-search draws as it does alone.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from ..ops.thinking import ThinkingState
from .accounting import Compute, count_flops
from .answers import boxed_answer
from .dedupe import RowHashes
from .result import Candidate
from .seeds import Seeds
from .settings import Settings
from .steps import DelimiterMatcher, sample_steps


@dataclass
class RowData:
    """Every per-row field of a step search, one entry per row (host lists), or one row per row (device
    state; ``None`` when the search does not track it). :meth:`take` is the one place rows are forked,
    reordered and dropped: it maps every field declared here."""

    owner: list[int]  # the prompt of each row
    stream: list[int]  # its draw stream: its number among its prompt's rows (see the module docstring)
    parked: list[bool]  # does not sample; forks carry it along
    texts: list[str]  # the completion so far, decoded
    ids: list[list[int]]  # the completion's token ids (EOS dropped)
    steps: list[list[str]]  # its steps' texts
    step_scores: list[list[float]]  # the verifier's score of each step (empty without a verifier)
    step_ntok: list[list[int]]  # tokens kept of each step
    scored: list[int]  # steps its verifier row holds (a parked row started with a completion: 0)
    thought: list[int]  # thinking tokens at the last host look (Settings.thinking; else 0)
    logprob_sum: torch.Tensor | None  # [rows] float32: its sampled tokens' log-probabilities summed
    logprob_count: torch.Tensor | None  # [rows] int64: and their number
    thinking: ThinkingState | None  # [rows] thinking-budget state (Settings.thinking)
    hashes: RowHashes | None  # [rows] rolling hashes of ids (duplicate filtering)

    def take(self, rows: list[int], idx: torch.Tensor) -> RowData:
        """Row ``j`` becomes row ``rows[j]`` (``idx``: the same on the device); lists are copied per row."""
        return RowData(**{f.name: _take(getattr(self, f.name), rows, idx) for f in fields(self)})

    def cat(self, other: RowData) -> RowData:
        """These rows, then ``other``'s (which tracks the same fields)."""
        return RowData(**{f.name: _cat(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})


def _take(value, rows: list[int], idx: torch.Tensor):
    if value is None:
        return None
    if isinstance(value, list):
        return [copy.copy(value[r]) for r in rows]  # a row's own lists (their items are immutable)
    if isinstance(value, torch.Tensor):
        return value.index_select(0, idx)
    return value.select(idx)  # per-row device state (ThinkingState, RowHashes)


def _cat(a, b):
    if a is None:
        return None
    if isinstance(a, list):
        return a + b
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    return a.cat(b)  # per-row device state (ThinkingState, RowHashes)


@dataclass
class PromptTally:
    """Compute per prompt (host lists, one entry per prompt): what a search whose prompts came in groups
    reports per group (:meth:`StepRows.compute` with ``prompts``). Policy ``forward`` counts every token
    position run for the prompt's rows (its prefill included), ``keys`` the keys attended over them."""

    prefill: list[int]
    generated: list[int]
    forward: list[int]
    keys: list[int]
    prm_tokens: list[int]
    prm_keys: list[int]
    thinking: list[int]

    def grow(self, k: int) -> None:
        for f in fields(self):
            getattr(self, f.name).extend([0] * k)

    def add(self, name: str, owners: Sequence[int], values: Sequence[int]) -> None:
        col = getattr(self, name)
        for p, v in zip(owners, values):
            col[p] += v


@dataclass
class History:
    """A row to start parked with its completion: the policy row holds the prompt and ``ids`` (prefilled),
    the verifier row the prompt only (``scored`` 0: :meth:`StepRows.roll_back` re-scores what it keeps)."""

    prompt: int
    ids: list[int]
    text: str
    steps: list[str]
    step_scores: list[float]
    step_ntok: list[int]


def _ranks(owner: Sequence[int]) -> list[int]:
    """Each row's number among the rows of its prompt, in order."""
    seen: dict[int, int] = {}
    out = []
    for p in owner:
        out.append(seen.get(p, 0))
        seen[p] = out[-1] + 1
    return out


class StepRows:
    """Rows of all prompts under the policy and the verifier (see the module docstring).

    ``policy``, ``verifier`` (``None``: steps are not scored): objects of the search protocols.
    ``prompts``: the prompt texts; the batch starts with one row per prompt (the prompt only), then one
    parked row per ``parked`` :class:`History`. ``settings``: the step settings (delimiter, limits,
    sampling, ``agg``, ``stop``, ``thinking``, ...). ``seeds``: the draw keys (an int or a per-prompt list
    is made a :class:`Seeds`). ``cancelled``: returns the prompts to drop now (``None``: none ever).
    ``capacity``: rows the sessions should expect at most. ``keep_prompts``: each prompt's own row stays
    parked at the end of the batch, for :meth:`refill` and for a :meth:`roll_back` past what a verifier
    row holds. ``track_logprobs``: sum each row's token log-probabilities. ``hash_rows``: keep rolling
    hashes for :meth:`duplicates`. ``offset``: the first step's draw offset. ``tally``: count compute per
    prompt too where the sessions count per row (a policy session of this package's decode loop, with
    ``positions``; a verifier session with ``last_rows``; else ``self.tally`` stays ``None``): :class:`PromptTally`, for :meth:`compute` over some
    prompts and for :meth:`admit`.
    """

    def __init__(self, policy, verifier, prompts: Sequence[str], settings: Settings, *,
                 seeds: Seeds | int | Sequence[int], cancelled: Callable[[], Collection[int]] | None = None,
                 capacity: int, parked: Sequence[History] = (), keep_prompts: bool = False,
                 track_logprobs: bool = False, hash_rows: bool = False, offset: int = 0, tally: bool = False):
        s = settings
        self.policy, self.prm_model = policy, verifier
        self.tok = policy.tokenizer
        self.eos = list(policy.eos_token_ids)
        self.eos_set = set(self.eos)
        self.sampling = dict(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p)
        self.seeds = Seeds.of(seeds, len(prompts))
        self.cancelled = cancelled
        self.sync_every = s.sync_every
        self.max_step_tokens, self.max_final_tokens = s.max_step_tokens, s.max_new_tokens
        self.stop, self.stop_at_answer = s.stop, s.stop_at_answer
        self.cap_ends = s.step_cap == "end"
        self.prompts = list(prompts)
        self.prompt_ids = [policy.encode(p) for p in prompts]
        self.P = P = len(prompts)
        if hash_rows and parked:
            raise ValueError("hash_rows: rows started with a completion are not hashed")
        if tally and parked:
            raise ValueError("tally: rows started with a completion are not counted per prompt")
        self.budget = s.max_step_tokens * max(s.num_iterations - 1, 0) + s.max_new_tokens  # tokens a row may add
        self.prm_budget = self.budget + 8 * s.num_iterations
        # Parked histories: their completion prefilled on the policy side (the verifier's row holds the prompt only).
        self.pol = policy.start(self.prompt_ids + [self.prompt_ids[h.prompt] + list(h.ids) for h in parked],
                                rows_hint=capacity, max_new_tokens=self.budget)
        self.prm = None if verifier is None else verifier.start(
            self.prompts + [self.prompts[h.prompt] for h in parked], agg=s.agg, rows=capacity,
            max_new_tokens=self.prm_budget)
        dev = self.device = self.pol.logits.device
        self.matcher = DelimiterMatcher(self.tok, s.step_delimiter, self.pol.logits.shape[1], device=dev)
        self.think_rule = None if s.thinking is None else s.thinking.rule(self.tok, self.eos, dev)
        self._track = (track_logprobs, hash_rows)
        self.keep_prompts = keep_prompts
        self.data = self._prompt_rows(range(P))
        if parked:
            self.data = self.data.cat(self._new_rows(
                [h.prompt for h in parked], parked=True, texts=[h.text for h in parked],
                ids=[list(h.ids) for h in parked], steps=[list(h.steps) for h in parked],
                step_scores=[list(h.step_scores) for h in parked], step_ntok=[list(h.step_ntok) for h in parked]))
        self.used = [0 if keep_prompts else 1] * P  # per prompt: streams its sampling rows have used (refill's next)
        self._offset0 = offset
        self.offsets = [offset] * P  # per prompt: its next step's first draw offset
        self.capacity = capacity
        self.tally = None
        counts_rows = hasattr(self.pol, "positions") and not hasattr(self.pol, "generate")  # (not a text-level engine)
        if tally and counts_rows and (self.prm is None or hasattr(self.prm, "last_rows")):
            self.tally = PromptTally(*([0] * P for _ in fields(PromptTally)))
            self._tally_prompts(range(P))
        self.generated = 0  # tokens sampled and kept
        self.thinking_generated = 0  # of those (and the rollouts'), written while thinking
        self.forward_rows = 0  # decode rows run (paused rows included)
        self.prm_extra = 0  # verifier tokens of lookahead rollouts
        self.keys_extra = self.prm_keys_extra = 0  # keys attended by the rollouts (FLOP estimate)

    def __len__(self) -> int:
        return len(self.data.owner)

    def _new_rows(self, owner: list[int], *, parked: bool, texts=None, ids=None, steps=None, step_scores=None,
                  step_ntok=None) -> RowData:
        """Fresh rows of prompts ``owner`` (one each; empty completions unless given)."""
        n, dev = len(owner), self.device
        empty = lambda: [[] for _ in range(n)]  # noqa: E731
        track_logprobs, hash_rows = self._track
        return RowData(
            owner=list(owner), stream=[0] * n, parked=[parked] * n, texts=texts or [""] * n, ids=ids or empty(),
            steps=steps or empty(), step_scores=step_scores or empty(), step_ntok=step_ntok or empty(),
            scored=[0] * n, thought=[0] * n,
            logprob_sum=torch.zeros(n, dtype=torch.float32, device=dev) if track_logprobs else None,
            logprob_count=torch.zeros(n, dtype=torch.long, device=dev) if track_logprobs else None,
            thinking=ThinkingState.start(n, dev) if self.think_rule is not None else None,
            hashes=RowHashes(n, dev) if hash_rows else None)

    def _prompt_rows(self, prompts) -> RowData:
        """One row per prompt (the prompt only; parked under ``keep_prompts``)."""
        return self._new_rows(list(prompts), parked=self.keep_prompts)

    def _tally_prompts(self, prompts) -> None:
        """A :class:`PromptTally`: the prefill of ``prompts`` (just started or admitted, in order)."""
        prompts = list(prompts)
        lens = [len(self.prompt_ids[p]) for p in prompts]
        t = self.tally
        t.add("prefill", prompts, lens)
        t.add("forward", prompts, lens)
        t.add("keys", prompts, [n * (n + 1) // 2 for n in lens])
        if self.prm is not None:  # the verifier's last call prefilled them, one row each
            self._tally_prm(prompts)

    def _tally_prm(self, owner: Sequence[int], session=None) -> None:
        """With a tally: add the verifier session's last call (per row: tokens, keys) to the prompts ``owner``
        of its rows."""
        if self.tally is not None:
            tokens, keys = (session or self.prm).last_rows
            self.tally.add("prm_tokens", owner, tokens)
            self.tally.add("prm_keys", owner, keys)

    @property
    def admits(self) -> bool:
        """Whether :meth:`admit` can take new prompts (sessions that prefill into their running pool, counted
        per prompt)."""
        return (self.tally is not None and hasattr(self.pol, "admit")
                and (self.prm is None or hasattr(self.prm, "admit")))

    def admit(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[int]:
        """New prompts (one seed each) join the rows: prefilled into the sessions' pools, one row each after
        the rows now (which are untouched), drawing as a fresh prompt's rows do. Returns their prompt
        indices. Needs :attr:`admits`, one seed per prompt, and no parked rows."""
        prompts = list(prompts)
        if not self.admits:
            raise TypeError("admit needs StepRows(tally=True) over sessions with admit (tts_kernels.search.protocols)")
        if not self.seeds.keyed or len(seeds) != len(prompts):
            raise ValueError("admit: the rows draw under one seed per prompt, and every new prompt needs its own")
        if self.parked_rows():
            raise ValueError("admit: rows are added after the running ones; parked rows would no longer come last")
        ids = [self.policy.encode(p) for p in prompts]
        running = torch.arange(len(self), dtype=torch.long, device=self.device)
        self.pol.admit(ids)
        if self.prm is not None:
            try:
                self.prm.admit(prompts)
            except BaseException:
                self.pol.fork(running)  # the policy rows just admitted leave: nothing changed
                raise
        first, k = self.P, len(prompts)
        self.prompts += prompts
        self.prompt_ids += ids
        self.P += k
        self.seeds = Seeds(self.seeds.per_prompt + list(seeds), self.P)
        self.used += [1] * k
        self.offsets += [self._offset0] * k
        self.tally.grow(k)
        new = list(range(first, first + k))
        self.data = self.data.cat(self._prompt_rows(new))
        self._tally_prompts(new)
        return new

    # ------------------------------------------------------------------ the batch: fork, drop, park, refill

    def _reindex(self, rows: list[int], stream: list[int], parked: list[bool]) -> None:
        """The batch becomes ``rows`` (row ``j`` continues row ``rows[j]``) with these streams and park flags."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.pol.fork(idx)
        if self.prm is not None:
            self.prm.fork(idx)
        self.data = self.data.take(rows, idx)
        self.data.stream, self.data.parked = stream, parked
        for p, k, off in zip(self.data.owner, stream, parked):
            if not off:
                self.used[p] = max(self.used[p], k + 1)

    def parked_rows(self) -> list[int]:
        return [r for r, off in enumerate(self.data.parked) if off]

    def fork(self, rows: Sequence[int]) -> None:
        """The batch becomes ``rows`` (new row ``j`` continues row ``rows[j]``; repeats allowed; histories
        shared, not copied), followed by every parked row, as it is. A copy is never parked (a parked row's
        copy is a live row starting from its history). Each prompt's new rows are numbered ``0, 1, ...``
        (their draw streams), so a fork of the same rows draws the same whatever else is in the batch."""
        carried = self.parked_rows()
        new = list(rows) + carried
        owner = [self.data.owner[r] for r in new]
        self._reindex(new, _ranks(owner), [False] * len(rows) + [True] * len(carried))

    def drop(self, rows: Collection[int]) -> None:
        """Rows ``rows`` leave the batch (their KV goes back to the pool); the others keep their order,
        streams and park flags."""
        gone = set(rows)
        keep = [r for r in range(len(self)) if r not in gone]
        self._reindex(keep, [self.data.stream[r] for r in keep], [self.data.parked[r] for r in keep])

    def park(self, rows: Collection[int]) -> None:
        """Rows ``rows`` stop sampling (:meth:`step` leaves them as they are; :meth:`fork` carries them)."""
        for r in rows:
            self.data.parked[r] = True

    def unpark(self, rows: Collection[int]) -> None:
        for r in rows:
            self.data.parked[r] = False

    def refill(self, prompts: Sequence[int]) -> list[int]:
        """One new row per entry of ``prompts`` (repeats: several), started from the prompt (needs
        ``keep_prompts``) and drawing as its prompt's next unused candidate number. The rows that sample
        keep their order, the new ones follow them, the parked rows come last. Returns the new rows' indices."""
        roots = {}
        for r in self.parked_rows():
            if self.data.owner[r] not in roots and not self.data.ids[r] and not self.data.steps[r]:
                roots[self.data.owner[r]] = r
        missing = sorted({p for p in prompts if p not in roots})
        if missing:
            raise ValueError(f"refill starts rows from their prompt's parked row: start StepRows with "
                             f"keep_prompts=True (no parked prompt row for prompts {missing})")
        live = [r for r in range(len(self)) if not self.data.parked[r]]
        parked = self.parked_rows()
        stream = [self.data.stream[r] for r in live]
        nxt = list(self.used)
        for p in prompts:
            stream.append(nxt[p])
            nxt[p] += 1
        new = live + [roots[p] for p in prompts] + parked
        self._reindex(new, stream + [self.data.stream[r] for r in parked],
                      [False] * (len(live) + len(prompts)) + [True] * len(parked))
        return list(range(len(live), len(live) + len(prompts)))

    def cancelled_prompts(self) -> frozenset[int]:
        """The prompts to drop now (the ``cancelled`` callable's answer; empty without one)."""
        return frozenset() if self.cancelled is None else frozenset(self.cancelled())

    # ------------------------------------------------------------------ roll back

    def roll_back(self, rows: Sequence[int], steps: int | Sequence[int]) -> None:
        """Rows ``rows`` (distinct) go back to their first ``steps`` steps (an int, or one per row).

        The policy row is cut on the paged cache (``PolicySession.truncate``: no KV bytes move; the kept
        last token runs again for the logits). The verifier row cannot be cut: a row whose verifier row
        holds at most ``t`` steps scores the ones it lacks (a parked row started with its completion holds
        none: it re-scores the ``t`` steps from the prompt, which makes its running state exact for every
        head); one that holds more starts again from its prompt's parked row (``keep_prompts``). Rows that
        track thinking state, log-probabilities or hashes cannot go back (those are not kept per step).
        """
        rows = list(rows)
        ts = [steps] * len(rows) if isinstance(steps, int) else list(steps)
        if len(ts) != len(rows) or len(set(rows)) != len(rows):
            raise ValueError("roll_back: distinct rows, and one step count per row")
        d = self.data
        if d.thinking is not None or d.logprob_sum is not None or d.hashes is not None:
            raise ValueError("roll_back: a row's thinking state, log-probabilities and hashes are not kept per step, "
                             "so rows that track them cannot go back")
        if not hasattr(self.pol, "truncate"):
            raise TypeError("roll_back needs a policy session with truncate(rows, lengths, tokens) "
                            "(tts_kernels.search.protocols)")
        for r, t in zip(rows, ts):
            if not 0 <= t <= len(d.steps[r]):
                raise ValueError(f"roll_back: row {r} has {len(d.steps[r])} steps, cannot keep {t}")
        reset = [r for r, t in zip(rows, ts) if self.prm is not None and d.scored[r] > t]
        if reset:
            roots = {d.owner[q]: q for q in self.parked_rows() if not d.ids[q] and not d.steps[q]}
            if any(d.owner[r] not in roots for r in reset):
                raise ValueError("roll_back: a verifier row holding more steps than it keeps starts again from its "
                                 "prompt's parked row: start StepRows with keep_prompts=True")
            src = list(range(len(self)))
            for r in reset:
                src[r] = roots[d.owner[r]]
                d.scored[r] = 0
                d.step_scores[r] = []
            self.prm.fork(torch.tensor(src, dtype=torch.long, device=self.device))
        lengths, tokens = [], []
        new_steps: list[list[str]] = [[] for _ in range(len(self))]
        for r, t in zip(rows, ts):
            keep = sum(d.step_ntok[r][:t])
            full = self.prompt_ids[d.owner[r]] + d.ids[r][:keep]
            lengths.append(len(full))
            tokens.append(full[-1])
            d.ids[r] = d.ids[r][:keep]
            d.steps[r], d.step_ntok[r] = d.steps[r][:t], d.step_ntok[r][:t]
            d.texts[r] = "".join(d.steps[r])
            if self.prm is None:
                d.step_scores[r] = []
            else:
                new_steps[r] = d.steps[r][d.scored[r]:]
                d.step_scores[r] = d.step_scores[r][:d.scored[r]]
        dev = self.device
        self.pol.truncate(torch.tensor(rows, device=dev), torch.tensor(lengths, device=dev),
                          torch.tensor(tokens, device=dev))
        self.forward_rows += len(rows)
        if self.tally is not None:  # the kept last token runs again, attending its row's kept tokens
            self.tally.add("forward", [d.owner[r] for r in rows], [1] * len(rows))
            self.tally.add("keys", [d.owner[r] for r in rows], lengths)
        if self.prm is not None and any(new_steps):
            scores = self.prm.add_steps(new_steps).tolist()
            self._tally_prm(d.owner)
            for r in rows:
                d.step_scores[r] = d.step_scores[r] + scores[r][: len(new_steps[r])]
                d.scored[r] = len(d.steps[r])

    # ------------------------------------------------------------------ a step

    def step(self, last: bool | Sequence[bool] | Mapping[int, bool],
             rows: list[int] | None = None) -> tuple[list[str], list[str | None]]:
        """Every row that is not parked (or only ``rows``) samples one step (to the end on the last
        iteration) and the verifier scores it. ``last``: whether this is the last iteration, for every
        prompt or per prompt (``last[p]``, read for the prompts with rows: prompts that joined at different
        iterations; :meth:`admit`).

        Returns the step texts and, per row, why it finished (``None``: it goes on; rows left out return
        an empty text and ``None``).
        """
        d = self.data
        if rows is None and any(d.parked):
            rows = [r for r in range(len(self)) if not d.parked[r]]
        present = set(d.owner)  # (only the prompts with rows: a long continuous search has seen many more)
        per_prompt = {p: bool(last) if isinstance(last, bool) else bool(last[p]) for p in present}
        row_last = [per_prompt[p] for p in d.owner]
        mixed = 0 < sum(row_last) < len(row_last)
        everyone = not mixed and all(row_last) and len(row_last) > 0
        dev = self.device
        final = torch.tensor(row_last, device=dev) if mixed else None
        limit = self.max_final_tokens if everyone else self.max_step_tokens
        offsets = [self.offsets[p] for p in d.owner]
        offset = offsets[0] if len(set(offsets)) == 1 else torch.tensor(offsets, dtype=torch.long, device=dev)
        only = None if rows is None else torch.tensor(rows, dtype=torch.long, device=dev)
        seed, stream = self.seeds.rows(torch.tensor(d.owner, dtype=torch.int64, device=dev),
                                       torch.tensor(d.stream, dtype=torch.int64, device=dev), dev)
        st = sample_steps(self.pol, max_tokens=limit, eos_ids=self.eos, matcher=None if everyone else self.matcher,
                          offset=offset, sync_every=self.sync_every,
                          logprobs=d.logprob_sum is not None, rows=only, seed=seed, stream=stream,
                          thinking=self._thinking(), final=final, final_tokens=self.max_final_tokens,
                          count_rows=self.tally is not None, **self.sampling)
        self._count_thinking(st)
        for p, fin in per_prompt.items():  # (a prompt without rows has ended: its offset no longer matters)
            self.offsets[p] += self.max_final_tokens if fin else self.max_step_tokens
        self.forward_rows += st.forward_rows
        if self.tally is not None:
            self.tally.add("forward", d.owner, st.row_forward.tolist())
            self.tally.add("keys", d.owner, st.row_keys.tolist())
        if d.logprob_sum is not None:
            d.logprob_sum = d.logprob_sum + st.logprob_sum
            d.logprob_count = d.logprob_count + st.counts
        if d.hashes is not None:  # the kept tokens (an EOS ends the step and is not kept)
            d.hashes.extend(st.tokens, st.counts - st.eos.to(st.counts.dtype))
        ids, texts = self._decode(st, d.ids, d.texts)  # one host look per step: the verifier needs the text
        eos, delim = st.eos.tolist(), st.delimited.tolist()
        skip = set() if rows is None else set(range(len(self))) - set(rows)
        finish = []
        for r, text in enumerate(texts):
            self.generated += len(ids[r])
            if self.tally is not None:
                self.tally.generated[d.owner[r]] += len(ids[r])
            if r in skip:
                finish.append(None)
            elif eos[r]:
                finish.append("eos")
            elif text == "":
                finish.append("empty")
            elif row_last[r]:
                finish.append("final")
            elif not delim[r] and self.cap_ends:
                finish.append("length")
            elif self._answered(d.texts[r] + text):
                finish.append("stop")
            else:
                finish.append(None)
        if self.prm is not None:
            scores = self.prm.add_steps([[t] if t else [] for t in texts])
            self._tally_prm(d.owner)
            first = scores[:, 0].tolist() if scores.shape[1] else [float("nan")] * len(self)
        else:
            first = None  # no verifier: steps are not scored
        for r, text in enumerate(texts):
            kept = [t for t in ids[r] if t not in self.eos_set]
            d.ids[r] += kept
            if text:
                d.texts[r] += text
                d.steps[r].append(text)
                d.step_ntok[r].append(len(kept))
                if first is not None:
                    d.step_scores[r].append(first[r])
                    d.scored[r] += 1
        return texts, finish

    def _thinking(self, state: ThinkingState | None = None):
        """``sample_steps``' thinking argument: the rule and the rows' state (``state``: a clone's)."""
        if self.think_rule is None:
            return None
        return self.think_rule, self.data.thinking if state is None else state

    def _count_thinking(self, st) -> None:
        """After a step of every row: the new state, and the thinking tokens it added (one host look)."""
        if self.think_rule is None:
            return
        self.data.thinking = st.thinking
        now = st.thinking.thought.tolist()
        self.thinking_generated += sum(now) - sum(self.data.thought)
        if self.tally is not None:
            self.tally.add("thinking", self.data.owner, [a - b for a, b in zip(now, self.data.thought)])
        self.data.thought = now

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

    # ------------------------------------------------------------------ reading the rows

    def duplicates(self, group: int, live: torch.Tensor) -> list[int]:
        """Live rows whose completion repeats an earlier live row's in their group of ``group`` rows: found
        by hash on the device, each confirmed on the host's token lists (a collision drops nothing)."""
        dup, first = self.data.hashes.duplicates(group, live)
        flagged = dup.nonzero().squeeze(1)
        pairs = zip(flagged.tolist(), first.index_select(0, flagged).tolist())
        return [r for r, j in pairs if self.data.ids[r] == self.data.ids[j]]

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
            base_ids, base_texts = [list(self.data.ids[r]) for r in live], [self.data.texts[r] for r in live]
            think = None if self.data.thinking is None else self.data.thinking.select(idx)
            owner = [self.data.owner[r] for r in live]
            tally = self.tally
            for _ in range(steps):
                st = sample_steps(pol, max_tokens=self.max_step_tokens, eos_ids=self.eos, matcher=self.matcher,
                                  temperature=0.0, seed=0, offset=0, sync_every=self.sync_every,
                                  thinking=self._thinking(think), count_rows=tally is not None)
                if think is not None:  # the rollouts' thinking tokens count, as their tokens do
                    grew = st.thinking.thought - think.thought
                    self.thinking_generated += int(grew.sum())
                    if tally is not None:
                        tally.add("thinking", owner, grew.tolist())
                    think = st.thinking
                self.forward_rows += st.forward_rows
                if tally is not None:
                    tally.add("forward", owner, st.row_forward.tolist())
                    tally.add("keys", owner, st.row_keys.tolist())
                ids, texts = self._decode(st, base_ids, base_texts)
                eos, delim = st.eos.tolist(), st.delimited.tolist()
                for j in range(len(live)):
                    if done[j]:
                        texts[j] = ""  # a finished rollout adds nothing more
                        continue
                    self.generated += len(ids[j])
                    if tally is not None:
                        tally.generated[owner[j]] += len(ids[j])
                    base_ids[j] += [t for t in ids[j] if t not in self.eos_set]
                    base_texts[j] += texts[j]
                    if eos[j] or not delim[j] or not texts[j]:
                        done[j] = True
                prm.add_steps([[t] if t else [] for t in texts])
                self._tally_prm(owner, session=prm)
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
        """Row ``r`` as a finished candidate with aggregate ``score`` (NaN when none of its steps was scored)."""
        d = self.data
        if not d.steps[r]:
            score = float("nan")  # nothing was scored (EOS first): never preferred (NaN ranks lowest)
        return Candidate(text=d.texts[r], answer=extract(d.texts[r]), score=score, finish=finish,
                         steps=list(d.steps[r]), step_scores=list(d.step_scores[r]),
                         thinking_tokens=None if self.think_rule is None else d.thought[r])

    def compute(self, prompts: Collection[int] | None = None) -> Compute:
        """Prompt tokens prefilled, tokens sampled (rollouts included), verifier tokens, and FLOPs of every
        forward row actually run (paused rows ride along in decode batches and are counted). ``prompts``:
        only theirs (needs ``tally``): what a group of prompts that shared the batch with others spent."""
        if prompts is not None:
            if self.tally is None:
                raise ValueError("compute(prompts): StepRows counts per prompt only with tally=True")
            t = self.tally
            total = lambda col: sum(col[p] for p in prompts)  # noqa: E731
            prm_tokens = total(t.prm_tokens)
            return Compute(policy_prefill_tokens=total(t.prefill), policy_generated_tokens=total(t.generated),
                           prm_tokens=prm_tokens,
                           policy_flops=count_flops(self.policy.model, total(t.forward), total(t.keys)),
                           prm_flops=0.0 if self.prm is None else count_flops(self.prm_model.flop_module, prm_tokens,
                                                                              total(t.prm_keys)),
                           thinking_tokens=total(t.thinking))
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


def _column(name: str) -> property:
    return property(lambda self: getattr(self.data, name), doc=f"Every row's ``{name}`` (:class:`RowData`).")


# Every RowData field reads as a column of the rows (``rows.owner[r]``, ``rows.step_scores[r]``); changes go
# through the operations above.
for _f in fields(RowData):
    setattr(StepRows, _f.name, _column(_f.name))
del _f
