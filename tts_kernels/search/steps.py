"""Sampling one reasoning step per row, with the step end found on the device.

Step-level searches (PRM beam search, DVTS) let every row generate until its text
contains the step delimiter (``"\\n\\n"``), EOS, or a token limit. Tools built on an
inference server do this with stop strings checked on detokenized text on the host
every token. Here the check is a table lookup on the device:

:class:`DelimiterMatcher` precomputes, for every token ``v`` and every state ``s``
(how many characters of the delimiter the text so far ends with), the state after
appending ``v``'s text (Knuth-Morris-Pratt over the token's characters); state
``len(delimiter)`` means the delimiter has appeared. A decode step then does
``state = table[state, token]``: no detokenization and no host sync. A token whose
text continues past the delimiter (``"\\n\\nThe"``) ends the step with it (steps end on
token boundaries; the text is never cut inside a token).

Token texts are ``tokenizer.decode([v])``, i.e. each token decoded alone; for byte-level
BPE a token holding part of a multi-byte character decodes to U+FFFD, which never
matches an ASCII delimiter, so the table is exact for ASCII delimiters.

:func:`sample_steps` runs the decode loop for one step of every row: rows that
finished their step are paused in place (they append nothing and keep their logits;
see ``PolicySession.decode(active=...)``) and the host looks every ``sync_every``
tokens only to stop early when no row is still generating.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .._threads import in_search_pool
from ..ops.sample import sample
from ..ops.thinking import ThinkingRule, ThinkingState, thinking_logits, thinking_update
from .seeds import engine_seeds


def _kmp_failure(pat: str) -> list[int]:
    fail = [0] * len(pat)
    k = 0
    for i in range(1, len(pat)):
        while k and pat[i] != pat[k]:
            k = fail[k - 1]
        if pat[i] == pat[k]:
            k += 1
        fail[i] = k
    return fail


def _advance(state: int, text: str, pat: str, fail: list[int]) -> int:
    d = len(pat)
    for ch in text:
        while state and pat[state] != ch:
            state = fail[state - 1]
        if pat[state] == ch:
            state += 1
        if state == d:
            return d
    return state


@functools.lru_cache(maxsize=8)
def token_texts(tokenizer, vocab_size: int) -> tuple[str, ...]:
    """Every token decoded alone (cached per tokenizer: decoding a 128k vocabulary takes ~1 s)."""
    return tuple(tokenizer.decode([v]) for v in range(vocab_size))


@functools.lru_cache(maxsize=8)
def _table(token_texts: tuple[str, ...], delimiter: str) -> torch.Tensor:
    fail = _kmp_failure(delimiter)
    d = len(delimiter)
    rows = [[_advance(s, t, delimiter, fail) for t in token_texts] for s in range(d)]
    rows.append([d] * len(token_texts))  # matched stays matched
    return torch.tensor(rows, dtype=torch.int64)


class DelimiterMatcher:
    """Device table ``[len(delimiter) + 1, V]`` of delimiter-match states (see the module docstring)."""

    def __init__(self, tokenizer, delimiter: str, vocab_size: int, device=None):
        if not isinstance(delimiter, str) or not delimiter:
            raise ValueError("step_delimiter must be a non-empty string")
        texts = token_texts(tokenizer, vocab_size)
        self.delimiter = delimiter
        self.done = len(delimiter)
        self.table = _table(texts, delimiter).to(device)

    def start(self, rows: int) -> torch.Tensor:
        return torch.zeros(rows, dtype=torch.int64, device=self.table.device)

    def step(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[state, tokens]


@dataclass
class Steps:
    """One step of every row: ``tokens [rows, max]`` (-1 past the step), counts, and how each ended."""

    tokens: torch.Tensor
    counts: torch.Tensor  # [rows] tokens in the step (an EOS counts)
    eos: torch.Tensor  # [rows] bool: ended with EOS
    delimited: torch.Tensor  # [rows] bool: ended with the delimiter
    forward_rows: int  # rows run through the policy (paused rows riding along included)
    logprob_sum: torch.Tensor | None = None  # [rows] float32: the step's tokens' log-probabilities summed (if asked)
    thinking: ThinkingState | None = None  # the rows' thinking state after the step (when a rule was given)
    row_forward: torch.Tensor | None = None  # [rows] int64: decodes each row rode in (``count_rows``)
    row_keys: torch.Tensor | None = None  # [rows] int64: keys it attended over those (``count_rows``)


_NARROW = 0.75  # run only the rows still going once at most this share of them is


@torch.no_grad()
@in_search_pool
def sample_steps(session, *, max_tokens: int, eos_ids: list[int], matcher: DelimiterMatcher | None,
                 temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed: int | torch.Tensor = 0, offset: int = 0,
                 sync_every: int = 8, logprobs: bool = False, rows: torch.Tensor | None = None,
                 stream: torch.Tensor | None = None,
                 thinking: tuple[ThinkingRule, ThinkingState] | None = None,
                 final: torch.Tensor | None = None, final_tokens: int = 0, count_rows: bool = False) -> Steps:
    """Sample one step for every row of ``session`` (``matcher=None``: no delimiter, to EOS or ``max_tokens``).

    Random draws use offsets ``offset .. offset + max_tokens - 1`` (one per token position).
    The EOS token is not fed to the model (the row is finished); the delimiter's token is
    (the next step continues after it). ``logprobs``: also sum each row's sampled tokens'
    log-probabilities (``Steps.logprob_sum``). ``rows [k]`` (int64, distinct; optional): only these
    rows sample a step; the others are left as they are (particle Gibbs's parked reference rows).
    ``seed`` (an int or an int64 ``[rows]`` tensor) and ``stream`` (optional ``[rows]``) key the draws
    as in :func:`~tts_kernels.sample` (:mod:`~tts_kernels.search.seeds`). ``thinking``: a thinking
    budget's rule and the rows' state, applied to every token (:mod:`tts_kernels.ops.thinking`); the state
    after the step is ``Steps.thinking``.

    ``offset`` may be an int64 ``[rows]`` tensor (each row's own first offset), and ``final [rows]`` (bool,
    optional) marks rows on their last step: they sample to EOS or ``final_tokens`` without the delimiter,
    the others to the delimiter, EOS or ``max_tokens`` (rows of searches that joined a running batch at
    different steps; pass ``final`` only when some row is on its last step). ``count_rows``: also count,
    per row, the decodes it rode in and the keys it attended (``Steps.row_forward``, ``Steps.row_keys``;
    needs a session with ``positions``).
    """
    if hasattr(session, "generate"):
        if final is not None or count_rows:
            raise ValueError("a text-level engine (the vLLM backend) samples whole steps itself: per-row final steps "
                             "and per-row counts are this package's decode loop's")
        if thinking is not None:
            raise ValueError("Settings.thinking runs inside this package's decode loop; a text-level engine "
                             "(the vLLM backend) does not take it")  # a text-level engine (e.g. vLLM) samples whole steps itself
        return _engine_steps(session, max_tokens=max_tokens, matcher=matcher, temperature=temperature, top_p=top_p,
                             top_k=top_k, min_p=min_p, seed=seed, offset=offset, logprobs=logprobs, rows=rows,
                             stream=stream)
    R = session.rows
    dev = session.logits.device
    buf = torch.full((R, max_tokens), -1, dtype=torch.long, device=dev)
    active = torch.ones(R, dtype=torch.bool, device=dev)
    if rows is not None:
        rows = rows.to(dev)
        active = torch.zeros(R, dtype=torch.bool, device=dev).index_fill_(0, rows, True)
    eos_hit = torch.zeros(R, dtype=torch.bool, device=dev)
    delim = torch.zeros(R, dtype=torch.bool, device=dev)
    counts = torch.zeros(R, dtype=torch.long, device=dev)
    lp_sum = torch.zeros(R, dtype=torch.float32, device=dev) if logprobs else None
    state = matcher.start(R) if matcher is not None else None
    eos = torch.tensor(eos_ids or [-1], device=dev)
    seed_t = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64, device=dev)
    forward_rows = 0
    run = rows  # rows still going at the last look (None: all): only they run through the policy
    rule, think = thinking if thinking is not None else (None, None)
    limit = None
    if final is not None:  # per row: its token limit, and whether its step may end at the delimiter
        final = final.to(dev)
        limit = torch.where(final, final_tokens, max_tokens)
        max_tokens = max(max_tokens, final_tokens)  # (the caller passes ``final`` only when a row is final)
        buf = torch.full((R, max_tokens), -1, dtype=torch.long, device=dev)
    row_fwd = torch.zeros(R, dtype=torch.long, device=dev) if count_rows else None
    row_keys = torch.zeros(R, dtype=torch.long, device=dev) if count_rows else None
    for t in range(max_tokens):
        logits = session.logits if rule is None else thinking_logits(session.logits, think, rule)
        tok, lp = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed_t,
                        offset=offset + t, stream=stream)
        if rule is not None:
            think = thinking_update(think, tok, rule, active=active)
        buf[:, t] = torch.where(active, tok, -1)
        counts += active
        if logprobs:
            lp_sum += torch.where(active, lp, 0.0)
        is_eos = torch.isin(tok, eos) & active
        if matcher is not None:
            state = torch.where(active, matcher.step(state, tok), state)
            ends = (state == matcher.done) & active
            if final is not None:
                ends = ends & ~final
        else:
            ends = torch.zeros_like(active)
        feed = active & ~is_eos
        eos_hit |= is_eos
        delim |= ends & ~is_eos
        active = feed & ~ends
        if limit is not None:  # a row at its own limit feeds this token, then stops
            active = active & (limit > t + 1)
        # Rows ending their step now still feed its last token: their history must hold the whole step.
        if count_rows:
            ran = torch.ones(R, dtype=torch.bool, device=dev) if run is None else \
                torch.zeros(R, dtype=torch.bool, device=dev).index_fill_(0, run, True)
            row_fwd += ran
            row_keys += torch.where(ran, session.positions + 1, 0)
        if run is None:
            session.decode(tok, active=feed)
            forward_rows += R
        else:
            session.decode(tok, active=feed, rows=run)
            forward_rows += run.shape[0]
        if t == max_tokens - 1:
            break
        if (t + 1) % sync_every == 0:  # the host looks every sync_every tokens
            going = int(active.sum())
            if going == 0:
                break
            if going <= _NARROW * (R if run is None else run.shape[0]):  # leave the finished rows out of the batch from now on
                run = active.nonzero().squeeze(1)
    return Steps(tokens=buf, counts=counts, eos=eos_hit, delimited=delim, forward_rows=forward_rows,
                 logprob_sum=lp_sum, thinking=think, row_forward=row_fwd, row_keys=row_keys)


def _engine_steps(session, *, max_tokens, matcher, temperature, top_p, top_k, min_p, seed, offset, logprobs, rows,
                  stream) -> Steps:
    """:func:`sample_steps` through a session's ``generate`` (a text-level engine: the step ends at the
    delimiter as a stop string, at EOS or at ``max_tokens``; see :mod:`~tts_kernels.search.protocols`)."""
    R = session.rows
    dev = session.logits.device
    run = list(range(R)) if rows is None else rows.tolist()
    seeds = engine_seeds(seed, stream, offset, R)
    before = session.tokens
    outs = session.generate(run, max_tokens=max_tokens, stop=[] if matcher is None else [matcher.delimiter],
                            temperature=float(temperature), top_p=float(top_p), top_k=int(top_k), min_p=float(min_p),
                            logprobs=logprobs, seeds=[seeds[r] for r in run])
    buf = torch.full((R, max_tokens), -1, dtype=torch.long)
    counts = torch.zeros(R, dtype=torch.long)
    eos = torch.zeros(R, dtype=torch.bool)
    delim = torch.zeros(R, dtype=torch.bool)
    lp_sum = torch.zeros(R, dtype=torch.float32) if logprobs else None
    for r, (ids, finish, lp) in zip(run, outs):
        buf[r, : len(ids)] = torch.tensor(ids[:max_tokens], dtype=torch.long)
        counts[r] = len(ids)
        eos[r], delim[r] = finish == "eos", finish == "stop"
        if logprobs:
            lp_sum[r] = lp
    return Steps(tokens=buf.to(dev), counts=counts.to(dev), eos=eos.to(dev), delimited=delim.to(dev),
                 forward_rows=session.tokens - before, logprob_sum=None if lp_sum is None else lp_sum.to(dev))
