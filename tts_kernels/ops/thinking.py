"""Thinking budgets on the device: s1-style budget forcing as a logits rule with a small per-row state.

A reasoning model thinks, writes an end-of-thinking marker (``</think>``), then answers. Budget forcing
(Muennighoff et al. 2025, "s1: Simple test-time scaling") controls how long it thinks: below a minimum,
the model's attempt to stop becomes a continuation word ("Wait") and it thinks on; at a maximum, the
marker (then an answer prefix) is forced. Here that is two tensor functions called around the sampler in
every decode step, for all rows at once, with no host look:

``thinking_logits(logits, state, rule)`` (before sampling), per row:

* forcing a sequence (a continuation, or the end sequence) -> only its next token is allowed;
* thinking, ``thought >= max_tokens`` -> only the end sequence's first token is allowed;
* thinking, ``thought < min_tokens`` -> the probability of stopping moves to the current continuation's
  first token: ``logit[c] <- logsumexp(logit[c], logit[stop...])``, ``logit[stop] <- -inf``, where the
  stop tokens are the EOS ids and the marker's token that would complete it (its last token once the
  others were just written; the only one for a one-token marker). Continuations rotate: the row's
  ``injections`` count picks ``continuations[injections % W]``;
* otherwise (thinking between the bounds, or answering) the logits are unchanged.

``thinking_update(state, tokens, rule)`` (after sampling, with the tokens the rows took):

* forcing: the sequence advances; the end sequence's marker part done -> the row answers;
* thinking: ``thought += 1``; the max reached -> the end sequence starts being forced; below the min,
  the continuation's first token -> an injection (counted; a longer continuation is forced on);
  else the marker is matched token by token, and completing it ends the thinking;
* answering: nothing.

Every token written while thinking counts in ``thought`` (injected ones and the marker included); the
answer prefix counts as answer. Rows are independent and a state row follows its sequence through forks
(:meth:`ThinkingState.select`). The plain per-row meaning is :func:`tts_kernels.reference.thinking_ref`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

NO_LIMIT = 2**62


@dataclass
class ThinkingRule:
    """A thinking budget in token ids, on a device.

    ``forced [W + 1, L]`` (int64, -1 padded): rows ``0..W-1`` the continuations, row ``W`` the end
    sequence (marker, then answer prefix); ``lengths [W + 1]``; ``marker [M]`` the marker's ids;
    ``eos [E]``; ``min_tokens``, ``max_tokens`` (:data:`NO_LIMIT`: none)."""

    forced: torch.Tensor
    lengths: torch.Tensor
    marker: torch.Tensor
    eos: torch.Tensor
    min_tokens: int
    max_tokens: int

    @property
    def continuations(self) -> int:
        return self.forced.shape[0] - 1

    def to(self, device) -> ThinkingRule:
        return ThinkingRule(self.forced.to(device), self.lengths.to(device), self.marker.to(device),
                            self.eos.to(device), self.min_tokens, self.max_tokens)


@dataclass
class ThinkingState:
    """Per row (int64 ``[R]``): ``thought`` tokens written while thinking, ``answering`` (0/1),
    ``fseq`` / ``fpos`` the forced sequence and the position in it (``fpos`` -1: none),
    ``injections`` continuations started, ``mpos`` marker tokens matched so far."""

    thought: torch.Tensor
    answering: torch.Tensor
    fseq: torch.Tensor
    fpos: torch.Tensor
    injections: torch.Tensor
    mpos: torch.Tensor

    @classmethod
    def start(cls, rows: int, device=None) -> ThinkingState:
        z = torch.zeros(rows, dtype=torch.int64, device=device)
        return cls(z, z.clone(), z.clone(), torch.full_like(z, -1), z.clone(), z.clone())

    def select(self, rows: torch.Tensor) -> ThinkingState:
        """Row ``j`` becomes row ``rows[j]`` (forks, reorders, dropping rows)."""
        return ThinkingState(*(getattr(self, f.name).index_select(0, rows) for f in fields(self)))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def cat(self, other: ThinkingState) -> ThinkingState:
        """These rows, then ``other``'s."""
        return ThinkingState(*(torch.cat([a, b]) for a, b in zip(self.tensors(), other.tensors())))


def _check(logits_or_tokens: torch.Tensor, state: ThinkingState, name: str) -> None:
    R = logits_or_tokens.shape[0]
    for f in fields(state):
        t = getattr(state, f.name)
        if t.shape != (R,):
            raise ValueError(f"state.{f.name} has shape {tuple(t.shape)}, {name} has {R} rows")


def thinking_logits(logits: torch.Tensor, state: ThinkingState, rule: ThinkingRule) -> torch.Tensor:
    """The logits of every row under the rule (a new tensor, ``logits``' dtype); see the module docstring."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    _check(logits, state, "logits")
    R, V = logits.shape
    dev = logits.device
    W, M = rule.continuations, rule.marker.shape[0]
    thinking = state.answering == 0
    forcing = state.fpos >= 0
    at_max = thinking & ~forcing & (state.thought >= rule.max_tokens)
    below = thinking & ~forcing & ~at_max & (state.thought < rule.min_tokens)
    # The one allowed token of forced rows: the forced sequence's next one, or the end sequence's first.
    seq = torch.where(at_max, W, state.fseq)
    pos = torch.where(at_max, 0, state.fpos.clamp(min=0))
    one = rule.forced[seq, pos.clamp(max=rule.forced.shape[1] - 1)]
    only = forcing | at_max
    x = logits.float()  # no copy for float32 logits
    neg = float("-inf")
    # Forced rows: -inf everywhere (one pass over [R, V], the only one), then their one token back.
    out = x.masked_fill(only[:, None], neg)
    keep = x.gather(1, one[:, None])[:, 0]
    out.scatter_(1, one[:, None], torch.where(only, keep.nan_to_num(nan=neg), out.gather(1, one[:, None])[:, 0])
                 [:, None])
    if W:
        # Below the minimum: the stop tokens' mass moves to the continuation's first token. Only [R, E + 1]
        # entries are read and written: the EOS ids and the marker token that would complete it.
        E = rule.eos.shape[0]
        cont = rule.forced[(state.injections % W), 0]
        completing = rule.marker[state.mpos.clamp(max=M - 1)]
        idx = torch.cat([rule.eos[None, :].expand(R, E), completing[:, None]], 1)            # [R, E + 1]
        comp_is_eos = (completing[:, None] == rule.eos[None, :]).any(1) if E else torch.zeros_like(below)
        is_stop = torch.cat([torch.ones(R, E, dtype=torch.bool, device=dev),
                             ((state.mpos == M - 1) | comp_is_eos)[:, None]], 1) & (idx != cont[:, None])
        vals = out.gather(1, idx)
        counted = is_stop.clone()
        counted[:, E] &= ~comp_is_eos  # a completing token that is also an EOS id is counted once
        mass = torch.where(counted & below[:, None], vals, neg)
        c_logit = out.gather(1, cont[:, None])[:, 0]
        merged = torch.logsumexp(torch.cat([c_logit[:, None], mass], 1), 1)
        out.scatter_(1, idx, torch.where(is_stop & below[:, None], neg, vals))
        out.scatter_(1, cont[:, None], torch.where(below, merged, c_logit)[:, None])
    return out.to(logits.dtype)


def thinking_update(state: ThinkingState, tokens: torch.Tensor, rule: ThinkingRule,
                    active: torch.Tensor | None = None) -> ThinkingState:
    """The state after each row took ``tokens [R]`` (rows where ``active`` is False are unchanged)."""
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be [rows], got shape {tuple(tokens.shape)}")
    _check(tokens, state, "tokens")
    W, M = rule.continuations, rule.marker.shape[0]
    tokens = tokens.to(torch.int64)
    thinking = state.answering == 0
    forcing = state.fpos >= 0
    at_max = thinking & ~forcing & (state.thought >= rule.max_tokens)
    below = thinking & ~forcing & ~at_max & (state.thought < rule.min_tokens)
    thought = state.thought + thinking.long()
    # Forced rows advance; the end sequence's marker written -> answering.
    fpos = torch.where(forcing, state.fpos + 1, state.fpos)
    fseq = state.fseq
    answering = state.answering | (forcing & (fseq == W) & (fpos == M)).long()
    # The max reached: the end sequence starts (its first token was forced by thinking_logits).
    fseq = torch.where(at_max, W, fseq)
    fpos = torch.where(at_max, 1, fpos)
    answering = answering | (at_max & (M == 1)).long()
    # Below the min, the continuation's first token starts an injection.
    k = (state.injections % max(W, 1)).clamp(max=max(W - 1, 0))
    inject = below & (tokens == rule.forced[k, 0]) if W else torch.zeros_like(below)
    injections = state.injections + inject.long()
    fseq = torch.where(inject, k, fseq)
    fpos = torch.where(inject, 1, fpos)
    # A forced sequence that is done stops forcing.
    fpos = torch.where((fpos >= 0) & (fpos >= rule.lengths[fseq]), -1, fpos)
    # Free thinking: match the marker token by token; completing it ends the thinking.
    free = thinking & ~forcing & ~at_max & ~inject
    nxt = rule.marker[state.mpos.clamp(max=M - 1)]
    matched = torch.where(tokens == nxt, state.mpos + 1, (tokens == rule.marker[0]).long())
    mpos = torch.where(free, matched, torch.zeros_like(state.mpos))
    done = free & (mpos == M)
    answering = answering | done.long()
    mpos = torch.where(done, 0, mpos)
    new = ThinkingState(thought, answering, fseq, fpos, injections, mpos)
    if active is None:
        return new
    return ThinkingState(*(torch.where(active, a, b) for a, b in zip(new.tensors(), state.tensors())))
