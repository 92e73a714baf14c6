"""Token-level beam search over a ``transformers`` causal LM, identical to ``generate()``.

``beam_search(model, input_ids, num_beams=K, max_new_tokens=N, ...)`` returns what
``model.generate(input_ids, num_beams=K, max_new_tokens=N, do_sample=False,
output_scores=True, return_dict_in_generate=True, ...)`` returns (same sequences,
same padding, same ``sequences_scores`` and ``beam_indices``), but:

* the prompt is prefilled once per batch item (``generate()`` prefills it ``K``
  times), then the KV cache is forked to ``B*K`` rows;
* each step is one ``beam_topk`` call (log-softmax, cumulative score and top-C over
  all beams, one read of the logits) instead of eager passes over ``[B*K, V]``;
* finished/running bookkeeping is a handful of ops on ``[B, 2K]``-sized tensors, and
  sequences are rebuilt from back-pointers at the end instead of gathering whole
  sequences every step;
* the KV cache of every layer is reordered with one ``kv_reorder_`` call, which
  copies only rows whose parent changed; with ``cache="paged"`` the keys and values live in a
  :class:`~tts_kernels.cache.PagedKVCache` (through :mod:`tts_kernels.models.hf_paged`): the
  fork to ``B*K`` rows shares the prompt's blocks and a beam step permutes block-table rows,
  so no history is copied at all;
* the host looks at the stop condition every ``sync_every`` steps only.

Why stopping late is safe (``sync_every > 1``): ``generate()`` stops after the first
step at which (a) no batch item can still improve its finished set, or (b) with
``early_stopping=True`` every finished set is full, or (c) every candidate hit a
stopping criterion. (a) and (b) are monotone: ``is_early_stop_heuristic_unsatisfied``
is and-accumulated, and a full finished set stays full. Once they hold for a batch
item, each new finished candidate there gets a ``-1e9`` penalty, so it scores at most
``-1e9``, while every slot then holds a finished hypothesis scoring far above that
(a set counts as full or unimprovable only once all its slots are finished); the
merged top-K keeps the old slots. (c) needs all ``C = max(2, 1 + n_eos) * K``
candidates to hit, but at most ``n_eos`` per beam can be EOS, so it happens only at
``max_new_tokens``, where the loop ends anyway. The running beams keep changing, but
the output is read from the finished set only. The tests check this against
``generate()`` with ``sync_every`` from 1 to 100.

Exactness: the same float32 operations as ``generate()``, in the same order, so the
scores agree bit for bit when the logits do. Two things can move the last bits: the
prompt is prefilled at batch ``B`` rather than ``B*K``, and CPU matmul kernels round
differently for different row counts (MKL here: counts that are not a multiple of 4),
so prefill logits and KV cache may differ by an ulp; and the compiled ``beam_topk``
may round its log-softmax differently from ``torch.log_softmax``. Sequences agreed in
thousands of random float32 comparisons; scores agree to ~1e-6. Candidates that tie
exactly are ordered by flat index in ``beam_topk`` and arbitrarily by ``torch.topk``
in ``generate()``: rare with float32 logits, common with bf16/fp16 ones, where two
equal-score beams may then be swapped (or a different one of them kept).

``num_beams=1`` is greedy search, as in ``generate()`` (which then returns no
``sequences_scores``): the argmax token per row, EOS rows padded.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..ops.beam import beam_topk
from ..ops.kv import kv_reorder_

NEG = -1.0e9  # transformers' "impossible" score; kept bit-for-bit so rankings tie-break the same way


class _FromModel:
    """Default marker: take the value from ``model.generation_config``, as ``generate()`` does when the
    argument is not passed. (``None`` means *none*, as it does when passed to ``generate()``.)"""

    def __repr__(self) -> str:
        return "FROM_MODEL"


FROM_MODEL = _FromModel()

# generation_config fields under which generate() would add a logits processor or stopping
# criterion that this driver does not implement (generate() uses the model's values when the
# caller does not pass them).
_IGNORED_CONFIG = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
    "min_new_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None, "renormalize_logits": False,
    "guidance_scale": None, "watermarking_config": None, "max_time": None, "stop_strings": None,
    "cache_implementation": None, "prefill_chunk_size": None,
}


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


# ----------------------------------------------------------------------------- validation

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_int(name: str, value, lo: int) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


def _token_ids(name: str, value) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dim() > 1:
            raise TypeError(f"{name} must be an int, a list of ints or a 0/1-D integer tensor")
        value = value.tolist()
    ids = [value] if _is_int(value) else value
    if not isinstance(ids, (list, tuple)) or not ids or not all(_is_int(i) for i in ids):
        raise TypeError(f"{name} must be an int or a non-empty list of ints, got {value!r}")
    if any(i < 0 for i in ids):
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    return list(ids)


def _special_tokens(model, eos_token_id, pad_token_id) -> tuple[list[int] | None, int | None]:
    gc = getattr(model, "generation_config", None)
    if eos_token_id is FROM_MODEL:
        eos_token_id = getattr(gc, "eos_token_id", None)
    if pad_token_id is FROM_MODEL:
        pad_token_id = getattr(gc, "pad_token_id", None)
    eos = _token_ids("eos_token_id", eos_token_id)
    if pad_token_id is not None:
        if isinstance(pad_token_id, torch.Tensor) and pad_token_id.numel() == 1 and not pad_token_id.is_floating_point():
            pad_token_id = int(pad_token_id)
        if not _is_int(pad_token_id):
            raise TypeError(f"pad_token_id must be an int or None, got {type(pad_token_id).__name__}")
    elif eos is not None:
        pad_token_id = eos[0]  # generate(): "pad_token_id = eos_token_id[0]" when unset
    return eos, pad_token_id


def _forward_params(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _warn_ignored_config(model) -> None:
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    odd = {k: getattr(gc, k) for k, d in _IGNORED_CONFIG.items()
           if getattr(gc, k, d) is not None and getattr(gc, k, d) != d}
    if getattr(gc, "use_cache", True) is False:
        odd["use_cache"] = False
    if odd:
        warnings.warn(
            f"model.generation_config sets {odd}; generate() applies these (unless overridden), beam_search "
            "ignores them, so its results can differ from generate()'s.", UserWarning, stacklevel=3)


def _validate(model, input_ids, attention_mask, num_beams, max_new_tokens, length_penalty, early_stopping,
              num_return_sequences, sync_every) -> None:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers causal LM (nn.Module with .config), got {type(model).__name__}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("model must be a decoder-only causal LM; encoder-decoder models are not supported")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        raise ValueError(f"input_ids must be a 2-D int64 (long) tensor [batch, length], got shape "
                         f"{tuple(input_ids.shape)} dtype {input_ids.dtype}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have at least one row and one column, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if attention_mask.dtype.is_floating_point or attention_mask.is_complex():
            raise TypeError(f"attention_mask must be an integer or bool tensor, got {attention_mask.dtype}")
        if attention_mask.device != input_ids.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids is on {input_ids.device}")
    _check_int("num_beams", num_beams, 1)
    _check_int("max_new_tokens", max_new_tokens, 1)
    _check_int("num_return_sequences", num_return_sequences, 1)
    _check_int("sync_every", sync_every, 1)
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise TypeError(f"length_penalty must be a float, got {type(length_penalty).__name__}")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be finite, got {length_penalty}")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")


def _prepare_mask(input_ids, attention_mask, eos, pad) -> torch.Tensor:
    """The 2-D mask generate() uses: the caller's, else inferred from pad tokens (when pad is not an EOS id)."""
    if attention_mask is None:
        if pad is not None and (eos is None or pad not in eos) and bool((input_ids == pad).any()):
            attention_mask = (input_ids != pad).long()
        else:
            attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.to(torch.long)
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask values must be 0 or 1")
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("attention_mask shows right padding; decoder-only generation needs left-padded prompts "
                         "(every row's last position attended)")
    return attention_mask  # the model gets the caller's dtype, as from generate()


# ----------------------------------------------------------------------------- model plumbing

class _Decoder:
    """Calls the model the way generate() does for a plain decoder-only LM, one DynamicCache
    (or, ``paged=True``, one PagedCache with the model's attention set to ``"tts_paged"``)."""

    def __init__(self, model, mask: torch.Tensor, max_new_tokens: int, paged: bool = False, block_size: int = 16,
                 num_beams: int = 1):
        from transformers import DynamicCache

        params = _forward_params(model)
        self.model = model
        if "cache" in params:
            self.cache_kw = "cache"
        elif "past_key_values" in params:
            self.cache_kw = "past_key_values"
        else:
            raise TypeError(f"{type(model).__name__}.forward takes no KV cache argument ('cache' or "
                            "'past_key_values'); beam_search needs a model with a transformers Cache")
        supports = getattr(model, "_supports_default_dynamic_cache", None)
        if supports is not None and not supports():
            raise TypeError(f"{type(model).__name__} keeps its own kind of cache, not a DynamicCache; "
                            "beam_search does not support it")
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        self.paged = paged
        B, L = mask.shape
        if paged:
            from ..models.hf_paged import PagedCache

            # Room for every beam's full sequence (an upper bound: blocks shared by beams count once),
            # plus one copy-on-write tail per beam; the B prompt rows live beside their B*K forks briefly.
            per_seq = -(-(L + max_new_tokens) // block_size)
            self.cache = PagedCache(model, batch_size=B, num_blocks=B * num_beams * (per_seq + 1) + B * per_seq,
                                    block_size=block_size, max_seqs=B * (num_beams + 1),
                                    max_seq_len=L + max_new_tokens)
        else:
            self.cache = DynamicCache(config=cfg)
        self.extra = {"use_cache": True}
        if "logits_to_keep" in params:
            self.extra["logits_to_keep"] = 1
        # generate(): positions from the mask (cumsum - 1, 0 at pads), then +1 per step.
        self.use_pos = "position_ids" in params
        pos = mask.long().cumsum(-1) - 1
        self.pos = pos.masked_fill(mask == 0, 0)
        # generate() drops an all-ones mask (the model then builds a plain causal mask).
        self.use_mask = "attention_mask" in params and not bool(mask.all())
        if paged and self.use_mask:
            self.cache.set_attention_mask(mask)  # pads are never stored, so no mask is passed to the model
            self.use_mask = False
        self.mask = None
        if self.use_mask:
            self.mask = torch.ones(B, L + max_new_tokens, dtype=mask.dtype, device=mask.device)
            self.mask[:, :L] = mask  # generated positions are always attended
        self.L = L

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        kw = dict(self.extra)
        if self.use_pos:
            kw["position_ids"] = self.pos
        if self.use_mask:
            kw["attention_mask"] = self.mask[:, : self.L]
        out = self.model(input_ids=input_ids, return_dict=True, **{self.cache_kw: self.cache}, **kw)
        self._adopt(out)
        return out.logits[:, -1, :]

    def fork(self, k: int) -> None:
        """B rows -> B*k rows (row b*k + j is beam j of item b), cache and the per-row inputs."""
        self.cache.batch_repeat_interleave(k)  # PagedCache: shares the prompt's blocks, copies nothing
        self.pos = self.pos[:, -1:].repeat_interleave(k, dim=0)
        if self.use_mask:
            self.mask = self.mask.repeat_interleave(k, dim=0)

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Forward the token chosen at step ``t-1`` for every row; returns the logits for step ``t``."""
        kw = dict(self.extra)
        if self.use_pos:
            kw["position_ids"] = self.pos[:, -1:] + t
        if self.use_mask:
            kw["attention_mask"] = self.mask[:, : self.L + t]
        out = self.model(input_ids=tokens, return_dict=True, **{self.cache_kw: self.cache}, **kw)
        self._adopt(out)
        return out.logits[:, -1, :]

    def _adopt(self, out) -> None:
        new = out.get("cache", None) if hasattr(out, "get") else None
        if new is None and hasattr(out, "get"):
            new = out.get("past_key_values", None)
        if new is not None:
            self.cache = new

    def reorder(self, flat_parents: torch.Tensor) -> None:
        """cache[i] <- cache[flat_parents[i]] for every layer: one kv_reorder_ call over all plain K/V tensors;
        layers with other state (linear attention, quantised, ...) use their own reorder_cache.
        PagedCache: one block-table permutation, no KV bytes move."""
        if self.paged:
            self.cache.reorder(flat_parents)
            return
        tensors, seen = [], set()
        for layer in getattr(self.cache, "layers", []):
            if type(layer).reorder_cache is not _plain_reorder():
                layer.reorder_cache(flat_parents)
                continue
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if t is None or t.numel() == 0:
                    continue
                key = (t.data_ptr(), tuple(t.shape), t.stride())
                if key not in seen:  # a tensor shared by two layers must move once
                    seen.add(key)
                    tensors.append(t)
        if tensors:
            kv_reorder_(tensors, flat_parents)


def _plain_reorder():
    from transformers.cache_utils import CacheLayerMixin

    return CacheLayerMixin.reorder_cache


def _as_fp32(logits: torch.Tensor) -> torch.Tensor:
    # generate() casts logits to float32 before log_softmax; beam_topk reads fp32/fp16/bf16 itself.
    return logits if logits.dtype in (torch.float32, torch.float16, torch.bfloat16) else logits.float()


# ----------------------------------------------------------------------------- the searches

def beam_search(
    model,
    input_ids: torch.Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = FROM_MODEL,
    pad_token_id: int | None = FROM_MODEL,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    sync_every: int = 4,
    cache: str = "dense",
    block_size: int = 16,
) -> BeamSearchOutput:
    """Beam search identical to ``model.generate(..., num_beams=num_beams, do_sample=False)``.

    ``model``: a ``transformers`` decoder-only causal LM. ``input_ids [B, L]`` int64 on the
    model's device, left-padded when rows differ in length, with ``attention_mask [B, L]``
    (0 at pads; inferred from ``pad_token_id`` when omitted, as generate() does).
    ``eos_token_id`` (int or list) and ``pad_token_id`` default to ``model.generation_config``'s;
    pass ``None`` for none, exactly as with ``generate()``. ``length_penalty``: finished scores
    are ``sum logprob / n ** length_penalty`` (``n`` generated tokens, EOS included).
    ``early_stopping``: ``True`` stops when ``num_beams`` hypotheses are finished, ``False``
    uses transformers' heuristic, ``"never"`` the canonical bound. ``sync_every``: the host
    reads the stop condition every this many steps (the result does not depend on it).
    ``cache``: ``"dense"`` (a transformers ``DynamicCache``, reordered in place by ``kv_reorder_``)
    or ``"paged"`` (a :class:`~tts_kernels.models.PagedCache` of ``block_size``-token blocks: forks
    and beam steps copy no history; the model's attention is ``"tts_paged"`` for the call and is
    restored after it; supported: models whose attention goes through transformers' attention
    interface, e.g. Llama, Qwen2, Mistral, GPT-2). The result is the same either way.

    Returns :class:`BeamSearchOutput` with the ``num_return_sequences`` best hypotheses per
    prompt, best first. ``num_beams=1`` runs greedy search, like ``generate()``.
    """
    _validate(model, input_ids, attention_mask, num_beams, max_new_tokens, length_penalty, early_stopping,
              num_return_sequences, sync_every)
    eos, pad = _special_tokens(model, eos_token_id, pad_token_id)
    _warn_ignored_config(model)
    device = _model_device(model)
    if device is not None and input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
    if cache not in ("dense", "paged"):
        raise ValueError(f"cache must be 'dense' or 'paged', got {cache!r}")
    _check_int("block_size", block_size, 1)
    mask = _prepare_mask(input_ids, attention_mask, eos, pad)
    paged = cache == "paged"
    restore = _use_paged_attention(model) if paged else None
    try:
        with torch.no_grad():
            dec = _Decoder(model, mask, max_new_tokens, paged=paged, block_size=block_size, num_beams=num_beams)
            try:
                if num_beams == 1:
                    return _greedy(dec, input_ids, max_new_tokens, eos, pad, sync_every)
                return _beams(dec, input_ids, num_beams, max_new_tokens, eos, pad, float(length_penalty),
                              early_stopping, num_return_sequences, sync_every)
            finally:
                if paged:
                    dec.cache.free()
    finally:
        if restore is not None:
            restore()


def _use_paged_attention(model):
    """Switch ``model`` to the ``"tts_paged"`` attention; returns the function that switches it back."""
    from ..models.hf_paged import ATTN_IMPLEMENTATION, use_paged_attention

    before = getattr(model.config, "_attn_implementation", None)
    if before == ATTN_IMPLEMENTATION:
        return None
    use_paged_attention(model)
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        raise TypeError(f"{type(model).__name__} cannot switch to the 'tts_paged' attention (its attention does not "
                        "go through transformers' AttentionInterface); use cache='dense'")
    return lambda: model.set_attn_implementation(before)


def _model_device(model) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def _greedy(dec: _Decoder, input_ids, N, eos, pad, sync_every) -> BeamSearchOutput:
    """generate()'s greedy path (``_sample`` without sampling)."""
    B = input_ids.shape[0]
    dev = input_ids.device
    eos_t = torch.tensor(eos, device=dev) if eos is not None else None
    logits = dec.prefill(input_ids)
    unfinished = torch.ones(B, dtype=torch.bool, device=dev)
    finished_at = torch.full((B,), N, dtype=torch.long, device=dev)  # step of each row's first EOS
    out = []
    for t in range(N):
        nxt = logits.float().argmax(-1)  # generate() takes the argmax of the float32 logits
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


def _beams(dec: _Decoder, input_ids, K, N, eos, pad, lp, early_stopping, R, sync_every) -> BeamSearchOutput:
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

    for t in range(N):
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
