"""Calling a transformers causal LM the way ``generate()`` does, for the token-level searches.

:class:`HFDecoder` prefills a (left-padded) batch, forks rows, forwards one token per row
and reorders rows, over a transformers ``DynamicCache`` (reordered in place by
:func:`~tts_kernels.ops.kv_reorder_`) or a :class:`~tts_kernels.models.PagedCache` (forks and
reorders move no KV bytes). Positions and masks follow ``generate()``: positions from the
mask (``cumsum - 1``, 0 at pads, then +1 per step), an all-ones mask dropped.
:func:`~tts_kernels.search.beam_search` drives it; the search logic lives there, the model
plumbing here.

Paged mode only for the architectures the paged attention is known to be exact for
(:func:`~tts_kernels.models.hf_paged.paged_unsupported`): for any other, ``paged=True`` runs the
DynamicCache mode (the model's own attention, exactly as ``generate()``) and says so in one warning on
the ``"tts_kernels"`` logger, and :func:`switch_to_paged_attention` leaves the model's attention alone.
"""
from __future__ import annotations

import logging

import torch
from transformers import DynamicCache

from ..ops.kv import kv_reorder_
from .compat import cache_keyword, forward_params, returned_cache
from .hf_paged import ATTN_IMPLEMENTATION, PagedCache, paged_unsupported, use_paged_attention

log = logging.getLogger("tts_kernels")


class HFDecoder:
    """Calls the model the way generate() does for a plain decoder-only LM, one DynamicCache
    (or, ``paged=True``, one PagedCache with the model's attention set to ``"tts_paged"``; on an
    architecture the paged attention is not known exact for, the DynamicCache, logged once: ``self.paged``
    says which ran)."""

    def __init__(self, model, mask: torch.Tensor, max_new_tokens: int, paged: bool = False, block_size: int = 16,
                 num_beams: int = 1):
        params = forward_params(model)
        self.model = model
        self.cache_kw = cache_keyword(model, params)
        supports = getattr(model, "_supports_default_dynamic_cache", None)
        if supports is not None and not supports():
            raise TypeError(f"{type(model).__name__} keeps its own kind of cache, not a DynamicCache; "
                            "beam_search does not support it")
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        reason = paged_unsupported(model) if paged else None
        if reason is not None:
            log.warning("beam_search: the paged fast path is off for %s: %s; using a DynamicCache (the model's own "
                        "attention, as generate())", type(model).__name__, reason)
            paged = False
        self.paged = paged
        B, L = mask.shape
        if paged:
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
        self.cache = returned_cache(out, self.cache)
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
        self.cache = returned_cache(out, self.cache)
        return out.logits[:, -1, :]

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


def switch_to_paged_attention(model):
    """Switch ``model`` to the ``"tts_paged"`` attention; returns the function that switches it back.
    A model the paged attention is not known exact for is left as it is (``None``: :class:`HFDecoder`
    then runs it on a DynamicCache and logs why)."""
    before = getattr(model.config, "_attn_implementation", None)
    if before == ATTN_IMPLEMENTATION or paged_unsupported(model) is not None:
        return None
    use_paged_attention(model)
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        raise TypeError(f"{type(model).__name__} cannot switch to the 'tts_paged' attention (its attention does not "
                        "go through transformers' AttentionInterface); use cache='dense'")
    return lambda: model.set_attn_implementation(before)
