"""The token-level beam search algorithm, over any decoder: ``generate()``'s bookkeeping, fused.

:func:`beams` (``num_beams > 1``) and :func:`greedy` (``num_beams = 1``) drive a *decoder* with
four methods: ``prefill(input_ids [B, L]) -> logits [B, V]``, ``fork(k)`` (``B`` rows ->
``B*k``, row ``b*k + j`` is beam ``j`` of item ``b``), ``step(tokens [B*K, 1], t) -> logits``
and ``reorder(flat_parents [B*K])`` (row ``i`` <- row ``flat_parents[i]``). Two exist:
:class:`~tts_kernels.models.hf_decoding.HFDecoder` (a transformers model, exactly as
``generate()`` calls it) and :class:`SessionDecoder` (any
:class:`~tts_kernels.search.protocols.Policy`). Why the results equal ``generate()``'s, and
why stopping late is safe: :mod:`tts_kernels.search.beam_search`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.beam import beam_topk
from ..ops.thinking import ThinkingState, thinking_logits, thinking_update

NEG = -1.0e9  # transformers' "impossible" score; kept bit-for-bit so rankings tie-break the same way


@dataclass
class BeamSearchOutput:
    """``sequences [B*R, L + n]`` int64 (prompt, as given, then the generated tokens, padded),
    ``sequences_scores [B*R]`` float32 (length-penalised log-probability; ``None`` for greedy
    search, ``num_beams=1``), ``beam_indices [B*R, n]`` int32 (flat beam ``b*K + j`` each token
    was generated from, ``-1`` past a sequence's end; ``None`` for greedy). ``R`` is
    ``num_return_sequences``; rows of one prompt are adjacent, best first."""

    sequences: torch.Tensor
    sequences_scores: torch.Tensor | None = None
    beam_indices: torch.Tensor | None = None


class SessionDecoder:
    """The decoder interface over a :class:`~tts_kernels.search.protocols.Policy`'s session.

    The prompt rows are unpadded (the mask's real tokens) and prefilled once; ``fork`` and
    ``reorder`` are session forks (shared histories, no copies); ``step`` decodes one token per
    row. Positions are each row's real-token count, as ``generate()`` computes them.
    """

    def __init__(self, policy, mask: torch.Tensor, max_new_tokens: int, num_beams: int = 1):
        self.policy, self.mask = policy, mask
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams
        self.session = None

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        keep = self.mask.bool().tolist()  # host: the prompts are host token lists for the session
        rows = [[t for t, k in zip(row, m) if k] for row, m in zip(input_ids.tolist(), keep)]
        self.session = self.policy.start(rows, rows_hint=len(rows) * self.num_beams,
                                         max_new_tokens=self.max_new_tokens)
        return self.session.logits

    def fork(self, k: int) -> None:
        B = self.session.rows
        self.session.fork(torch.arange(B, device=self.session.logits.device).repeat_interleave(k))

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        return self.session.decode(tokens.reshape(-1))

    def reorder(self, flat_parents: torch.Tensor) -> None:
        self.session.fork(flat_parents)

    def free(self) -> None:
        if self.session is not None:
            self.session.free()


def _as_fp32(logits: torch.Tensor) -> torch.Tensor:
    # generate() casts logits to float32 before log_softmax; beam_topk reads fp32/fp16/bf16 itself.
    return logits if logits.dtype in (torch.float32, torch.float16, torch.bfloat16) else logits.float()


def greedy(dec, input_ids, N, eos, pad, sync_every, think=None) -> BeamSearchOutput:
    """generate()'s greedy path (``_sample`` without sampling). ``think``: a thinking rule
    (:mod:`tts_kernels.ops.thinking`) applied to every row's logits."""
    B = input_ids.shape[0]
    dev = input_ids.device
    eos_t = torch.tensor(eos, device=dev) if eos is not None else None
    logits = dec.prefill(input_ids)
    state = ThinkingState.start(B, dev) if think is not None else None
    unfinished = torch.ones(B, dtype=torch.bool, device=dev)
    finished_at = torch.full((B,), N, dtype=torch.long, device=dev)  # step of each row's first EOS
    out = []
    for t in range(N):
        if think is not None:
            logits = thinking_logits(logits, state, think)
        nxt = logits.float().argmax(-1)  # generate() takes the argmax of the float32 logits
        if think is not None:
            state = thinking_update(state, nxt, think, active=unfinished)
        if eos_t is not None:
            nxt = torch.where(unfinished, nxt, pad)
            now = unfinished & torch.isin(nxt, eos_t)
            finished_at = torch.where(now, t, finished_at)
            unfinished = unfinished & ~now
        out.append(nxt)
        if t == N - 1 or (eos_t is not None and t % sync_every == sync_every - 1 and not bool(unfinished.any())):
            break
        logits = dec.step(nxt[:, None], t + 1)
    gen = torch.stack(out, dim=1)
    if eos_t is not None:
        # generate() stops after the step at which the last row finished.
        n = int(finished_at.max()) + 1 if not bool(unfinished.any()) else N
        gen = gen[:, :n]
    return BeamSearchOutput(sequences=torch.cat([input_ids, gen], dim=1))


def beams(dec, input_ids, K, N, eos, pad, lp, early_stopping, R, sync_every, think=None) -> BeamSearchOutput:
    """generate()'s beam search. ``think``: a thinking rule applied to every beam's logits; a beam's
    state follows it through the reorders."""
    B = input_ids.shape[0]
    dev = input_ids.device
    n_eos = len(eos) if eos is not None else 0
    C = max(2, 1 + n_eos) * K  # generate()'s beams_to_keep
    fill = (pad or eos[0]) if eos is not None else -1  # generate()'s output_fill_value, precedence included
    eos_t = torch.tensor(eos, device=dev) if eos is not None else None
    es_true = early_stopping is True
    never_long = early_stopping == "never" and lp > 0.0

    top_k_mask = torch.zeros(C, dtype=torch.bool, device=dev)
    top_k_mask[:K] = True
    all_hit = torch.ones(B, C, dtype=torch.bool, device=dev)
    base = (torch.arange(B, device=dev) * K)[:, None]  # row offset b*K of each beam
    # A candidate's id is step*C + rank; finished slots keep ids and are decoded at the end.
    cand_ids = torch.arange(N * C, device=dev).view(N, 1, C)

    run_scores = None
    fin_scores = torch.full((B, K), NEG, dtype=torch.float32, device=dev)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    fin_ids = torch.full((B, K), -1, dtype=torch.long, device=dev)
    unsat = torch.ones(B, 1, dtype=torch.bool, device=dev)
    cand_par, cand_tok, run_par_hist, run_tok_hist = [], [], [], []

    logits = _as_fp32(dec.prefill(input_ids))  # [B, V]: only beam 0 is live at step 0
    V = logits.shape[-1]
    if V >= C:
        # generate() gives beams 1.. a -1e9 start, so with V >= C the top C all come from beam 0, with
        # scores logp + 0.0: the same values and order as top-C of this row alone.
        first_scores = torch.zeros(B, 1, dtype=torch.float32, device=dev)
    else:
        logits = logits.repeat_interleave(K, dim=0)
        first_scores = torch.full((B, K), NEG, dtype=torch.float32, device=dev)
        first_scores[:, 0] = 0.0
    dec.fork(K)
    state = ThinkingState.start(logits.shape[0], dev) if think is not None else None

    for t in range(N):
        if think is not None:
            logits = thinking_logits(logits, state, think)
        scores, parents, tokens = beam_topk(logits, first_scores if t == 0 else run_scores, C)
        cand_par.append(parents)
        cand_tok.append(tokens)
        if t == N - 1:
            hit = all_hit  # max_length reached: every candidate stops
        elif eos_t is None:
            hit = None
        else:
            hit = (tokens == eos_t) if n_eos == 1 else torch.isin(tokens, eos_t)

        # Running beams: the best K candidates that did not stop (the same float ops as generate()).
        run_masked = scores if hit is None else torch.add(scores, hit, alpha=NEG)
        keep = torch.topk(run_masked, K).indices
        run_scores = run_masked.gather(1, keep)
        run_parents = parents.gather(1, keep)
        run_tokens = tokens.gather(1, keep)
        run_par_hist.append(run_parents)
        run_tok_hist.append(run_tokens)

        # Finished set: merge the candidates among the top K that stopped, penalties in generate()'s order.
        if hit is not None:
            cand = scores / ((t + 1) ** lp)
            if es_true:
                cand = torch.add(cand, fin_done.all(-1, keepdim=True), alpha=NEG)
            cand = torch.add(cand, ~unsat, alpha=NEG)
            did = hit & top_k_mask
            cand = torch.add(cand, ~did, alpha=NEG)
            merged = torch.cat((fin_scores, cand), dim=1)
            sel = torch.topk(merged, K).indices
            fin_scores = merged.gather(1, sel)
            fin_done = torch.cat((fin_done, did), dim=1).gather(1, sel)
            fin_ids = torch.cat((fin_ids, cand_ids[t].expand(B, C)), dim=1).gather(1, sel)
        # else (no EOS, not the last step): no candidate can finish. generate() still merges them, at
        # score <= -1e9, and a tie with an empty slot's -1e9 may park an unfinished candidate there; such
        # slots stay unfinished (-1e9) and the last step, where every top-K candidate finishes with a
        # real score, overwrites all of them, so skipping the merge changes nothing visible.
        if t == N - 1:
            break

        best_len = N if never_long else t + 1
        best_possible = run_scores[:, :1] / (best_len ** lp)
        worst = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True).values, NEG)
        unsat = unsat & (best_possible > worst).any(dim=-1, keepdim=True)
        if t % sync_every == sync_every - 1:
            stop = ~unsat.any()
            if es_true:
                stop = stop | fin_done.all()
            if bool(stop):
                break

        if think is not None:  # each running beam takes its parent's state, then its token
            src = (run_parents + base) if state.thought.shape[0] == B * K else \
                torch.arange(B, device=dev)[:, None].expand(B, K)
            state = thinking_update(state.select(src.reshape(-1)), run_tokens.reshape(-1), think)
        dec.reorder((run_parents + base).view(-1))
        logits = _as_fp32(dec.step(run_tokens.view(B * K, 1), t + 1))

    return _decode(input_ids, fin_scores, fin_ids, cand_par, cand_tok, run_par_hist, run_tok_hist, K, C, R, fill)


def _decode(input_ids, fin_scores, fin_ids, cand_par, cand_tok, run_par_hist, run_tok_hist, K, C, R, fill):
    """The R best finished hypotheses per prompt, rebuilt from back-pointers, laid out as generate() does."""
    B = input_ids.shape[0]
    dev = input_ids.device
    ids = fin_ids[:, :R]                            # [B, R]; -1 marks a slot that never held a candidate
    end = torch.where(ids >= 0, ids // C, -1)      # step of each hypothesis' last token
    rank = (ids % C).clamp(min=0)
    e_idx = end.clamp(min=0)
    b_idx = torch.arange(B, device=dev)[:, None].expand(B, R)
    last_par = torch.stack(cand_par)[e_idx, b_idx, rank]  # beam (of step e-1) the last token extends
    last_tok = torch.stack(cand_tok)[e_idx, b_idx, rank]
    run_par = torch.stack(run_par_hist)             # [steps, B, K]: running beam j of step s extends beam
    run_tok = torch.stack(run_tok_hist)             # run_par[s, b, j] of step s-1 with token run_tok[s, b, j]
    # generate() crops to the longest returned hypothesis (counted from its beam indices).
    n = int(end.max()) + 1
    base = (torch.arange(B, device=dev) * K)[:, None]
    seq = torch.full((B, R, n), fill, dtype=torch.long, device=dev)
    bidx = torch.full((B, R, n), -1, dtype=torch.int32, device=dev)
    beam = last_par                                 # where end > s: the path's running beam at step s
    for s in range(n - 1, -1, -1):
        at_end, before = end == s, end > s
        tok_s = run_tok[s].gather(1, beam)
        par_s = run_par[s].gather(1, beam)
        seq[:, :, s] = torch.where(at_end, last_tok, torch.where(before, tok_s, fill))
        bidx[:, :, s] = torch.where(at_end, last_par + base, torch.where(before, par_s + base, -1)).to(torch.int32)
        beam = torch.where(before, par_s, beam)
    prompt = input_ids.repeat_interleave(R, dim=0)
    return BeamSearchOutput(
        sequences=torch.cat([prompt, seq.view(B * R, n)], dim=1),
        sequences_scores=fin_scores[:, :R].reshape(B * R),
        beam_indices=bidx.view(B * R, n),
    )
