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

import math
import warnings
from collections.abc import Sequence

import torch

from .._threads import in_search_pool
from ..ops._validate import check_int
from .beam_steps import BeamSearchOutput, SessionDecoder, beams, greedy
from .thinking import ThinkingBudget


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


# ----------------------------------------------------------------------------- validation

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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


def _special_tokens(model, eos_token_id, pad_token_id, policy=None) -> tuple[list[int] | None, int | None]:
    gc = getattr(model, "generation_config", None)
    if eos_token_id is FROM_MODEL:
        eos_token_id = getattr(gc, "eos_token_id", None) if policy is None else (list(policy.eos_token_ids) or None)
    if pad_token_id is FROM_MODEL:
        pad_token_id = getattr(gc, "pad_token_id", None)
        if policy is not None and pad_token_id is None:
            pad_token_id = getattr(policy.tokenizer, "pad_token_id", None)
    eos = _token_ids("eos_token_id", eos_token_id)
    if pad_token_id is not None:
        if isinstance(pad_token_id, torch.Tensor) and pad_token_id.numel() == 1 and not pad_token_id.is_floating_point():
            pad_token_id = int(pad_token_id)
        if not _is_int(pad_token_id):
            raise TypeError(f"pad_token_id must be an int or None, got {type(pad_token_id).__name__}")
    elif eos is not None:
        pad_token_id = eos[0]  # generate(): "pad_token_id = eos_token_id[0]" when unset
    return eos, pad_token_id


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
    if model is not None:
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers causal LM (nn.Module with .config) or a search Policy, "
                            f"got {type(model).__name__}")
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
    check_int("num_beams", num_beams, minimum=1)
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_int("num_return_sequences", num_return_sequences, minimum=1)
    check_int("sync_every", sync_every, minimum=1)
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
    thinking=None,
    tokenizer=None,
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
    restored after it; for the architectures in :data:`~tts_kernels.models.hf_paged.PAGED_ARCHITECTURES`,
    any other model runs on the ``DynamicCache``, logged once). The result is the same either way.

    ``model`` may also be a :class:`~tts_kernels.search.protocols.Policy` (an
    :class:`~tts_kernels.models.HFPolicy`, or any backend): the search then runs on the policy's
    own sessions (prompt rows prefilled unpadded, forks and beam reorders as session forks;
    ``cache`` and ``block_size`` do not apply). ``eos_token_id`` then defaults to
    ``policy.eos_token_ids`` and ``pad_token_id`` to the model's or the tokenizer's.

    ``thinking``: a :class:`~tts_kernels.search.thinking.ThinkingBudget` applied to every beam's logits
    on the device (the result is then no longer ``generate()``'s); its texts are encoded with
    ``tokenizer`` (default: the policy's).

    Returns :class:`BeamSearchOutput` with the ``num_return_sequences`` best hypotheses per
    prompt, best first. ``num_beams=1`` runs greedy search, like ``generate()``.
    """
    policy = None if isinstance(model, torch.nn.Module) or not hasattr(model, "start") else model
    hf_model = policy.model if policy is not None else model
    _validate(None if policy is not None else model, input_ids, attention_mask, num_beams, max_new_tokens,
              length_penalty, early_stopping, num_return_sequences, sync_every)
    eos, pad = _special_tokens(hf_model, eos_token_id, pad_token_id, policy)
    _warn_ignored_config(hf_model)
    device = policy.device if policy is not None else _model_device(model)
    if device is not None and input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
    if cache not in ("dense", "paged"):
        raise ValueError(f"cache must be 'dense' or 'paged', got {cache!r}")
    check_int("block_size", block_size, minimum=1)
    mask = _prepare_mask(input_ids, attention_mask, eos, pad)
    think = None
    if thinking is not None:
        tokenizer = tokenizer if tokenizer is not None else getattr(policy, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("thinking needs tokenizer= (the model is not a policy with a tokenizer)")
        think = ThinkingBudget.of(thinking).rule(tokenizer, eos or [], input_ids.device)
    if policy is not None:
        dec = SessionDecoder(policy, mask, max_new_tokens, num_beams=num_beams)
        with torch.no_grad():
            try:
                return _search(dec, input_ids, num_beams, max_new_tokens, eos, pad, length_penalty, early_stopping,
                               num_return_sequences, sync_every, think)
            finally:
                dec.free()
    from ..models.hf_decoding import HFDecoder, switch_to_paged_attention

    paged = cache == "paged"
    restore = switch_to_paged_attention(model) if paged else None
    try:
        with torch.no_grad():
            dec = HFDecoder(model, mask, max_new_tokens, paged=paged, block_size=block_size, num_beams=num_beams)
            try:
                return _search(dec, input_ids, num_beams, max_new_tokens, eos, pad, length_penalty, early_stopping,
                               num_return_sequences, sync_every, think)
            finally:
                if dec.paged:  # the paged mode ran (an architecture off the fast path ran on a DynamicCache)
                    dec.cache.free()
    finally:
        if restore is not None:
            restore()


@in_search_pool
def _search(dec, input_ids, num_beams, max_new_tokens, eos, pad, length_penalty, early_stopping,
            num_return_sequences, sync_every, think=None) -> BeamSearchOutput:
    if num_beams == 1:
        return greedy(dec, input_ids, max_new_tokens, eos, pad, sync_every, think)
    return beams(dec, input_ids, num_beams, max_new_tokens, eos, pad, float(length_penalty), early_stopping,
                 num_return_sequences, sync_every, think)


def _model_device(model) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


