"""transformers causal LMs with their keys and values in a :class:`~tts_kernels.cache.PagedKVCache`.

Two public extension points of ``transformers`` do the work, so no model code is patched:

* :class:`PagedCache`, a ``transformers.Cache``: maps the batch rows of a forward pass to
  paged sequence ids (``seq_ids``, a device LongTensor) and appends each layer's new keys
  and values to the pool in ``update``. Forking rows (best-of-N), reordering them (a beam
  step) and freeing them touch block tables and reference counts only: no history is
  copied (the one shared partial tail block is copied on the next append, copy-on-write).
* the attention function ``"tts_paged"`` (registered with ``transformers.AttentionInterface``
  and, for the dense mask, ``AttentionMaskInterface``): with a :class:`PagedCache` it reads
  the history from the pool; with any other cache (``generate()``'s DynamicCache) it *is*
  transformers' ``sdpa`` attention, so the same model runs both ways.

Attention on the pool:

* one new token per row (decode): ``paged_attention`` through the block tables, no dense
  copy of the history (until that op lands in ``tts_kernels.ops``, a dense gather + sdpa
  stands in, in :func:`_decode_attention` only);
* several new tokens (prefill, or a chunk on top of history): the rows are gathered
  densely and attended with an explicit causal mask built from the rows' lengths.

Padding: only real tokens are stored. Before a left-padded forward, tell the cache which
tokens are pads with :meth:`PagedCache.set_attention_mask`; they are skipped when appending
(``PagedKVCache.append(start=...)``) and never attended. Each row's keys are then exactly its
real tokens, so masks come from lengths alone, the sliding window (Mistral, Qwen2 with
``use_sliding_window``) counts real tokens as the dense model's does, and no attention mask is
needed when decoding. Positions: :meth:`PagedCache.position_ids` gives what ``generate()``
uses (real-token index: ``cumsum(mask) - 1``).

Which models: the paged path is exact only where the model's attention goes through transformers'
attention interface with the keys ``PagedCache.update`` returned, and computes nothing the pool
does not know (no logit soft-capping, no attention sinks, causal). :data:`PAGED_ARCHITECTURES` lists
the model types tested exact against ``generate()`` (``tests/test_architectures.py``);
:func:`paged_unsupported` says why a model is not one of them, and ``HFPolicy`` / the token beam
search then run the model's own forward on a ``DynamicCache`` (``HFPRM`` refuses it). As a last guard,
a layer whose attention does not go through ``"tts_paged"`` after it appended to a ``PagedCache``
(remote code with its own attention) makes the next append raise.

Usage::

    model = use_paged_attention(model)               # model.set_attn_implementation("tts_paged")
    cache = PagedCache(model, batch_size=1, num_blocks=256)
    cache.set_attention_mask(mask)                   # only when the prompt batch is padded
    fwd = ForwardArgs(model)                         # the cache keyword of this transformers version
    out = model(**fwd(cache, input_ids=ids, position_ids=cache.position_ids(ids.shape[1]), use_cache=True))
    cache.repeat_interleave(8)                       # 8 children per row: no KV bytes move
    ...
    cache.reorder(parents)                           # beam step: row i <- row parents[i]
    cache.free()
"""
from __future__ import annotations

import contextlib
import copy
import threading

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..cache import PagedKVCache
from ..ops.attention import KV_DTYPES, paged_attention
from .compat import ForwardArgs

ATTN_IMPLEMENTATION = "tts_paged"

# The cache whose update() ran last on this thread, the layer and the key tensor it returned:
# the model passes that exact tensor on to the attention function, which is how the attention
# function knows the keys live in a pool (transformers hands it no cache argument).
_ACTIVE = threading.local()


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


# Model types (``config.model_type``) whose every layer the paged path runs exactly as transformers'
# sdpa attention does, checked against generate() (greedy through HFPolicy, beam_search K=4) in
# tests/test_architectures.py: Llama, Mistral and Qwen2 (sliding windows per layer), Qwen3 (q/k norms),
# Gemma 3 text (sliding and full layers from layer_types, q/k norms, scaled embeddings,
# query_pre_attn_scalar, a rope base per layer type) and GPT-2 (learned positions).
PAGED_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2"})


def paged_unsupported(model_or_config) -> str | None:
    """Why the paged fast path is not known to be exact for this model, or ``None`` when it is.

    Exact means: ``config.model_type`` is in :data:`PAGED_ARCHITECTURES` and the config turns on nothing
    the paged attention does not compute (attention logit soft-capping, bidirectional attention)."""
    config = getattr(model_or_config, "config", model_or_config)
    kind = getattr(config, "model_type", None) or "?"
    name = type(model_or_config).__name__ if isinstance(model_or_config, torch.nn.Module) else type(config).__name__
    if kind not in PAGED_ARCHITECTURES:
        return (f"model type {kind!r} ({name}) is not one the paged attention is tested exact for "
                f"(supported: {', '.join(sorted(PAGED_ARCHITECTURES))})")
    cfg = _text_config(config)
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        return (f"{name} (model type {kind!r}) sets attn_logit_softcapping={cfg.attn_logit_softcapping}: the paged "
                "attention does not soft-cap attention logits")
    if getattr(cfg, "use_bidirectional_attention", False):
        return f"{name} (model type {kind!r}) sets use_bidirectional_attention: the paged attention is causal"
    return None


def require_paged(model, who: str) -> None:
    """Raise a ``ValueError`` naming the architecture when ``who`` cannot run ``model`` on the paged cache."""
    reason = paged_unsupported(model)
    if reason is not None:
        raise ValueError(f"{who} needs the paged KV cache and it is not known to be exact here: {reason}")


class KVLedger:
    """The KV blocks a model's open sessions hold: a session's pool counts from the end of its start to
    its ``free()`` (clones share their parent's pool and hold nothing). What a server reports as blocks
    in use; it must be 0 when no search runs. Thread-safe (a metrics scrape reads it mid-search)."""

    def __init__(self):
        self._held: dict[int, int] = {}
        self._lock = threading.Lock()

    def hold(self, owner, blocks: int) -> None:
        with self._lock:
            self._held[id(owner)] = int(blocks)

    def release(self, owner) -> None:
        with self._lock:
            self._held.pop(id(owner), None)

    @property
    def blocks(self) -> int:
        with self._lock:
            return sum(self._held.values())

    @property
    def sessions(self) -> int:
        with self._lock:
            return len(self._held)


class PagedCache(Cache):
    """A ``transformers.Cache`` over a :class:`~tts_kernels.cache.PagedKVCache`.

    ``model_or_config``: the model (dtype and device are taken from its parameters) or its
    config. ``batch_size`` rows are allocated at once; row ``i`` is paged sequence
    ``seq_ids[i]``. ``num_blocks``, ``block_size``, ``max_seqs``, ``max_seq_len`` size the
    pool (see ``PagedKVCache``); ``kv`` reuses an existing pool instead (several caches, e.g.
    a policy's prompts of different batches, may share one).

    ``get_seq_length()`` is the number of token positions the forwards so far covered,
    padding included: what a ``DynamicCache`` reports for the same calls, kept on the host
    so that no call reads the device. Per-row real lengths: :meth:`lengths`.
    """

    def __init__(self, model_or_config, *, batch_size: int = 1, num_blocks: int | None = None, block_size: int = 16,
                 max_seqs: int | None = None, max_seq_len: int | None = None, dtype: torch.dtype | None = None,
                 device=None, kv=None):
        super().__init__(layers=[])
        config = getattr(model_or_config, "config", model_or_config)
        if isinstance(model_or_config, torch.nn.Module):
            p = next(model_or_config.parameters(), None)
            if p is not None:
                dtype = dtype or p.dtype
                device = device if device is not None else p.device
        cfg = _text_config(config)
        self.num_layers = int(cfg.num_hidden_layers)
        heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None) or [
            "sliding_attention" if window is not None else "full_attention"] * self.num_layers
        self._sliding = [t == "sliding_attention" for t in types]
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if kv is None:
            if num_blocks is None:
                raise ValueError("num_blocks is required unless an existing pool is passed as kv")
            sizes = {k: v for k, v in (("max_seqs", max_seqs), ("max_seq_len", max_seq_len)) if v is not None}
            kv = PagedKVCache(self.num_layers, self.num_kv_heads, self.head_dim, num_blocks=num_blocks,
                              block_size=block_size, dtype=dtype or torch.float32,
                              device=device if device is not None else "cpu", **sizes)
        else:
            shape = tuple(kv.k_pool.shape)
            if (shape[0], shape[2], shape[4]) != (self.num_layers, self.num_kv_heads, self.head_dim):
                raise ValueError(f"kv pool shape {shape} does not fit the model: layers {self.num_layers}, "
                                 f"kv heads {self.num_kv_heads}, head_dim {self.head_dim}")
        self.kv = kv
        self.seq_ids = kv.allocate(batch_size)
        self._seen = 0            # token positions covered so far, padding included (host int)
        self._mask = None         # 2-D mask for the next forward (set_attention_mask)
        self._start = None        # [B] pads skipped at the head of the forward in progress
        self._repeated = None     # (tables, t, tables repeated t times) of the chunk forward in progress

    # ------------------------------------------------------------------ rows for the search drivers

    @property
    def batch_size(self) -> int:
        return int(self.seq_ids.shape[0])

    def lengths(self) -> torch.Tensor:
        """Real (stored) tokens per row, ``[B]`` int64 on the cache device."""
        return self.kv.lengths(self.seq_ids)

    def fork(self, rows: torch.Tensor) -> None:
        """Re-batch: new row ``j`` continues old row ``rows[j]`` (any count, repeats allowed).

        Shares the parents' blocks (copy-on-write) and frees the old rows' references: no
        KV bytes move. ``rows``: int64 device tensor; nothing is read on the host.
        """
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.seq_ids.device)
        self._settle()
        new = self.kv.fork(self.seq_ids.index_select(0, rows))
        self.kv.free(self.seq_ids)
        self.seq_ids = new

    def spawn(self, rows: torch.Tensor) -> "PagedCache":
        """A new cache over the same pool whose row ``j`` continues this cache's row ``rows[j]``;
        this cache is unchanged (histories shared, copy-on-write). Free it when done."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.seq_ids.device)
        self._settle()
        other = copy.copy(self)
        other.seq_ids = self.kv.fork(self.seq_ids.index_select(0, rows))
        other._mask = other._start = other._repeated = None
        return other

    def adopt(self, other: "PagedCache") -> None:
        """Append ``other``'s rows (a cache over the same pool, e.g. new prompts prefilled into it) after this
        cache's rows; ``other`` is left empty. No KV bytes move."""
        if other.kv is not self.kv:
            raise ValueError("adopt: the other cache must share this cache's pool (PagedCache(..., kv=cache.kv))")
        self._settle()
        other._settle()
        self.seq_ids = torch.cat([self.seq_ids, other.seq_ids])
        other.seq_ids = other.seq_ids[:0]

    def truncate(self, rows: torch.Tensor, lengths: torch.Tensor) -> None:
        """Roll ``rows`` (distinct) back to their first ``lengths`` tokens (``PagedKVCache.truncate``)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.seq_ids.device)
        self._settle()
        self.kv.truncate(self.seq_ids.index_select(0, rows), torch.as_tensor(lengths, device=self.seq_ids.device))

    @contextlib.contextmanager
    def only(self, rows: torch.Tensor):
        """Within the block, the cache is just ``rows`` (int64 device indices, distinct): a forward
        appends to those rows' histories and leaves the others untouched (a decode that skips the
        rows that have finished). The batch is restored on exit, also when the forward raised."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.seq_ids.device)
        full, mask = self.seq_ids, self._mask
        self.seq_ids = full.index_select(0, rows)
        self._mask = None if mask is None else mask.index_select(0, rows)
        try:
            yield self
        except BaseException:
            self._settle()
            raise
        finally:
            self.seq_ids = full
            self._mask = None

    def repeat_interleave(self, k: int) -> None:
        """Row ``b`` becomes rows ``b*k .. b*k+k-1`` (beams or samples of one prompt)."""
        self.fork(torch.arange(self.batch_size, device=self.seq_ids.device).repeat_interleave(k))

    def reorder(self, parents: torch.Tensor) -> None:
        """Beam step: row ``i`` takes row ``parents[i]``'s history (block-table rows move, no KV bytes)."""
        parents = torch.as_tensor(parents, dtype=torch.long, device=self.seq_ids.device)
        self._settle()
        self.kv.reorder(self.seq_ids, self.seq_ids.index_select(0, parents))

    def free(self) -> None:
        """Return every row's blocks to the pool; the cache is then empty (batch size 0)."""
        self._settle()
        if self.seq_ids.numel():
            self.kv.free(self.seq_ids)
        self.seq_ids = self.seq_ids[:0]

    def _settle(self) -> None:
        # A forward pass that raised between its layer-0 and last-layer appends leaves a step open;
        # its tokens never became visible, so abandoning it is all that is needed (no-op otherwise).
        self.kv.abort_step()
        cur = getattr(_ACTIVE, "cur", None)
        if cur is not None and cur[0] is self:
            _ACTIVE.cur = None

    # transformers' names for the same things (generate()-style code calls these)
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.reorder(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.fork(indices)

    # ------------------------------------------------------------------ inputs of the next forward

    def set_attention_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Mark pads for the next forward only: its last ``t`` columns (``t`` new tokens per row),
        0 = pad. Pads must come first in each row (left padding); they are neither stored nor
        attended. ``None`` clears it."""
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != self.batch_size:
                raise ValueError(f"attention_mask must be [batch={self.batch_size}, length], "
                                 f"got {tuple(attention_mask.shape)}")
            attention_mask = attention_mask.to(self.seq_ids.device)
        self._mask = attention_mask

    def _pads(self, t: int) -> torch.Tensor | None:
        if self._mask is None:
            return None
        if self._mask.shape[1] < t:
            raise ValueError(f"attention_mask covers {self._mask.shape[1]} positions, the forward has {t}")
        return (self._mask[:, -t:] == 0).sum(-1)

    def position_ids(self, t: int) -> torch.Tensor:
        """``[B, t]`` positions of the next forward's tokens, as ``generate()`` numbers them:
        each row's real tokens continue from its length; pads get 0. (Reads the lengths, which
        syncs on CUDA; a decode loop can instead keep its positions, +1 per step.)"""
        ar = torch.arange(t, device=self.seq_ids.device)
        pos = self.lengths()[:, None] + ar
        pads = self._pads(t)
        if pads is None:
            return pos
        return (pos - pads[:, None]).clamp(min=0)

    # ------------------------------------------------------------------ transformers Cache protocol

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        B, _, t, _ = key_states.shape
        if B != self.batch_size:
            raise ValueError(f"the forward has batch {B} but the cache has {self.batch_size} rows")
        prev = getattr(_ACTIVE, "cur", None)
        if prev is not None and prev[0] is self:
            # The last layer that appended here never attended through "tts_paged" (its attention read the
            # returned keys, which are only the new tokens): that model's output was wrong. Refuse to go on.
            _ACTIVE.cur = None
            raise RuntimeError(f"layer {prev[1]} of the model attended without the 'tts_paged' attention after "
                               "appending to a PagedCache; this model cannot run on the paged cache")
        if layer_idx == 0:
            self._start = self._pads(t)
            self._mask = None
            self._repeated = None
        self.kv.append(layer_idx, self.seq_ids, key_states, value_states, start=self._start)
        if layer_idx == self.num_layers - 1:
            self._seen += t
        _ACTIVE.cur = (self, layer_idx, key_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        # The dense-equivalent sizes, so the (unused) mask transformers builds has the usual shape.
        return self._seen + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def __len__(self) -> int:
        return self.num_layers

    @property
    def is_sliding(self) -> list[bool]:
        return list(self._sliding)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return True

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PagedCache cannot crop; fork the rows you want to keep instead")

    def reset(self) -> None:
        raise NotImplementedError("PagedCache cannot reset; free() it and make a new one")

    def __repr__(self) -> str:
        return (f"PagedCache(rows={self.batch_size}, layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, seen={self._seen})")


# ---------------------------------------------------------------------- attention


def _decode_attention(cache: PagedCache, layer: int, query: torch.Tensor, scale: float,
                      window: int | None) -> torch.Tensor:
    """One query per row (the newest token) over the row's pool history: ``query [n, Hq, D]`` ->
    ``[n, Hq, D]``. ``paged_attention`` reads the blocks in place; the dense fallback (for float64,
    which it does not take) gathers the rows."""
    if query.dtype in KV_DTYPES:
        k_cache, v_cache, tables, lens = cache.kv.layer_view(layer, cache.seq_ids)
        return paged_attention(query, k_cache, v_cache, tables, lens, scale=scale, sliding_window=window)
    k, v = cache.kv.gather(layer, cache.seq_ids)
    L = cache.kv.layer_view(layer, cache.seq_ids)[3].to(torch.long)[:, None]  # the new token is the last one
    kidx = torch.arange(k.shape[2], device=k.device)
    ok = kidx < L
    if window is not None:
        ok = ok & (kidx >= L - window)
    out = F.scaled_dot_product_attention(query[:, :, None], k, v, attn_mask=ok[:, None, None, :], scale=scale,
                                         enable_gqa=True)
    return out[:, :, 0]


def _chunk_attention(cache: PagedCache, layer: int, query: torch.Tensor, scale: float,
                     window: int | None) -> torch.Tensor:
    """``t`` new tokens per row on top of each row's history: ``query [n, Hq, t, D]`` -> same.

    Row ``i`` had ``before[i]`` tokens and stored ``t - start[i]`` new ones (its first
    ``start[i]`` were pads). Real query ``j`` sits at position ``p = before[i] + j - start[i]``
    and sees keys ``k <= p`` (and ``k > p - window``); a pad query sees key 0 only, to stay
    finite (its output is never used).

    In a paged dtype every query is one decode query over its row's blocks read in place
    (``paged_attention`` with the row's table repeated ``t`` times and length ``p + 1``), so the
    history is never gathered; float64 gathers it and runs SDPA under the same mask."""
    n, Hq, t, D = query.shape
    dev = query.device
    start = cache._start if cache._start is not None else torch.zeros(n, dtype=torch.long, device=dev)
    # Lengths this layer holds now (the new tokens included) less the new real tokens; from the layer
    # view, not PagedKVCache.lengths(), which reads the device on CUDA.
    k_cache, v_cache, tables, held = cache.kv.layer_view(layer, cache.seq_ids)
    before = held.to(torch.long) - (t - start)
    j = torch.arange(t, device=dev)
    p = before[:, None] + j - start[:, None]                         # [n, t]
    if query.dtype in KV_DTYPES:
        lens = torch.where(j < start[:, None], 1, p + 1).reshape(-1).to(torch.int32)
        memo = cache._repeated  # every layer of one forward has the same tables: repeat them once
        if memo is None or memo[0] is not tables or memo[1] != t:
            memo = cache._repeated = (tables, t, tables.repeat_interleave(t, dim=0))
        out = paged_attention(query.transpose(1, 2).reshape(n * t, Hq, D), k_cache, v_cache, memo[2], lens,
                              scale=scale, sliding_window=window)
        return out.reshape(n, t, Hq, D).transpose(1, 2)
    k, v = cache.kv.gather(layer, cache.seq_ids)
    kidx = torch.arange(k.shape[2], device=dev)
    ok = kidx <= p[..., None]                                        # [n, t, T]
    if window is not None:
        ok = ok & (kidx > p[..., None] - window)
    pad_q = (j < start[:, None])[..., None]
    ok = torch.where(pad_q, kidx == 0, ok)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=ok[:, None], scale=scale, enable_gqa=True)


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            sliding_window=None, softcap=None, s_aux=None, **kwargs):
    """The ``"tts_paged"`` attention function (transformers' attention-interface signature).

    ``query [B, Hq, t, D]``; returns ``([B, t, Hq, D], None)``. With a :class:`PagedCache`
    the keys and values come from its pool and ``attention_mask`` is ignored (the cache knows
    every row's real tokens); otherwise this is transformers' ``sdpa`` attention."""
    cur = getattr(_ACTIVE, "cur", None)
    if cur is not None and cur[2] is not key and cur[1] == getattr(module, "layer_idx", None):
        # The keys PagedCache.update returned hold only the new tokens; a model that changes them
        # before attending would silently attend to those alone.
        _ACTIVE.cur = None
        raise RuntimeError(f"{type(module).__name__} passed attention other keys than PagedCache.update "
                           "returned; this model cannot run on the paged cache")
    if cur is None or cur[2] is not key:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, softcap=softcap, s_aux=s_aux, **kwargs)
    _ACTIVE.cur = None
    cache, layer = cur[0], cur[1]
    if softcap is not None or s_aux is not None:
        raise NotImplementedError("tts_paged attention does not support logit soft-capping or attention sinks")
    if dropout and module.training:
        raise NotImplementedError("tts_paged attention is for inference; dropout is not supported")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    # One token per row. A row whose token is a pad (start = 1: a search driver pausing rows
    # without a sync) stored nothing; its query attends its unchanged history and is ignored.
    if query.shape[2] == 1:
        out = _decode_attention(cache, layer, query[:, :, 0], scale, sliding_window)[:, None]
    else:
        out = _chunk_attention(cache, layer, query, scale, sliding_window).transpose(1, 2)
    return out.contiguous(), None


def _paged_mask(*args, **kwargs):
    # The dense mask is only used when the cache is not a PagedCache (then this is sdpa's); a
    # PagedCache needs none, and without padding or a long window transformers builds none here.
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register ``"tts_paged"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _paged_mask)


def use_paged_attention(model):
    """Set ``model`` (a transformers causal LM) to the ``"tts_paged"`` attention; returns it.

    The model then attends from a :class:`PagedCache` when given one as its cache (``cache=``, or
    ``past_key_values=`` before transformers 5.20: :class:`~tts_kernels.models.compat.ForwardArgs`),
    and runs exactly as with ``attn_implementation="sdpa"`` otherwise
    (``generate()``, no cache). Also works at load time after :func:`register`:
    ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="tts_paged")``.
    """
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


register()
