"""The correct path for a decoder the paged attention is not known to be exact for: ``DenseSession``.

:class:`~tts_kernels.models.HFPolicy` runs a model whose architecture is not in
:data:`~tts_kernels.models.hf_paged.PAGED_ARCHITECTURES` (or with ``paged=False``) here: the model's own
forward and its own attention implementation, on a transformers ``DynamicCache``, with a left-padded
attention mask and ``generate()``'s positions (``cumsum(mask) - 1``). Greedy decoding of a padded batch is
then ``generate(do_sample=False)`` token for token. It is slower than the paged path: forks copy the
KV history (``index_select`` on every layer's tensors) and paused rows still run through the model.

Layout. Every row stays *left-packed*: its ``n`` real tokens are the last ``n`` of the cache's ``T``
columns and the columns before them are masked out, so the attention mask is a function of the rows'
lengths alone and a sliding window over cache columns is a window over real tokens (as in a left-padded
``generate()`` batch). A decode appends one column to every row; a row that appends nothing (not
``active``, or not among ``rows``) has that column rotated to its front (one gather per layer), and
:meth:`DenseSession.truncate` rotates a row's cut tokens to its front the same way before the kept last
token runs again. Sliding-window layers keep their whole history here (not transformers' last
``window - 1`` keys): the mask applies the window, and a roll-back still finds the keys it needs.

Attention-only decoders: a model whose cache has other state (linear attention, recurrent layers:
state a pad token would change and a roll-back could not undo) is refused at construction.
"""
from __future__ import annotations

import copy

import torch

from .compat import ForwardArgs, returned_cache


def left_pad(prompt_ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``, both ``[P, longest]`` int64 on ``device``: the prompts left-padded with ``pad``, mask 0 at
    pads (host-side packing of token lists, one copy to the device each)."""
    t = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), t), pad, dtype=torch.long)
    mask = torch.zeros(len(prompt_ids), t, dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    return ids.to(device), mask.to(device)


def dense_cache_layers(model) -> int:
    """The number of KV layers a ``DynamicCache`` of ``model`` has; refuses a cache with non-KV state."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        raise TypeError(f"{type(model).__name__} keeps its own kind of cache, not a DynamicCache; the dense "
                        "fallback cannot run it")
    layers = DynamicCache(config=model.config).layers
    odd = sorted({type(layer).__name__ for layer in layers
                  if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)})
    if odd:
        raise TypeError(f"{type(model).__name__}'s cache has {odd} layers (state other than keys and values): the "
                        "dense fallback cannot pause rows or roll them back exactly on it")
    if not layers:
        raise TypeError(f"{type(model).__name__}'s config declares no cache layers")
    return len(layers)


def _new_cache(num_layers: int):
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    cache.layers = [DynamicLayer() for _ in range(num_layers)]
    return cache


class DenseSession:
    """Rows of sequences under a policy on a transformers ``DynamicCache`` (the fallback
    :class:`~tts_kernels.search.protocols.PolicySession`; see the module docstring).

    ``policy`` needs ``model``, ``forward_args`` (a :class:`~tts_kernels.models.compat.ForwardArgs`
    whose model declares ``attention_mask``), ``tokenizer`` (its ``pad_token_id``), ``device``,
    ``kv_ledger`` and ``dense_layers`` (:func:`dense_cache_layers`). Counters count what runs: every
    row of the batch runs in every decode (paused rows too), ``keys`` counts each row's real keys.
    The ledger: a session holds 0 pool blocks (it has no pool); it still counts in ``kv_ledger.sessions``
    from its start to its ``free()``.
    """

    def __init__(self, policy, prompt_ids: list[list[int]], rows_hint: int = 0, max_new_tokens: int = 0):
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt must have at least one token")
        self.policy = policy
        dev = policy.device
        ids, mask = left_pad(prompt_ids, policy.tokenizer.pad_token_id or 0, dev)
        self.cache = _new_cache(policy.dense_layers)
        self.width = ids.shape[1]  # cache columns T (host int)
        self.positions = mask.sum(1)  # real tokens of each row = its next position (device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            out = policy.model(**policy.forward_args(self.cache, input_ids=ids, attention_mask=mask, use_cache=True,
                                                     optional={"position_ids": pos, "logits_to_keep": 1}))
        self.cache = returned_cache(out, self.cache)
        self.logits = out.logits[:, -1]
        self.prefill_tokens = int(sum(len(p) for p in prompt_ids))
        self.tokens = self.prefill_tokens
        self.keys = torch.tensor(sum(len(p) * (len(p) + 1) // 2 for p in prompt_ids), device=dev)
        policy.kv_ledger.hold(self, 0)

    @property
    def rows(self) -> int:
        return int(self.logits.shape[0])

    def _mask(self, width: int, lengths: torch.Tensor) -> torch.Tensor:
        return (torch.arange(width, device=lengths.device)[None] >= (width - lengths)[:, None]).to(torch.long)

    def _select(self, rows: torch.Tensor):
        """A new cache whose row ``j`` is a copy of row ``rows[j]`` of this one."""
        cache = copy.copy(self.cache)
        cache.layers = []
        for layer in self.cache.layers:
            new = copy.copy(layer)
            if getattr(layer, "is_initialized", True) and layer.keys is not None and layer.keys.numel():
                new.keys, new.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
            cache.layers.append(new)
        return cache

    def _rotate(self, shift: torch.Tensor) -> None:
        """Row ``r``'s columns move right by ``shift[r]`` (mod T): the last ``shift[r]`` wrap to its front."""
        T = self.width
        idx = (torch.arange(T, device=shift.device)[None] - shift[:, None]) % T  # [R, T]
        for layer in self.cache.layers:
            k, v = layer.keys, layer.values
            g = idx[:, None, :, None].expand(k.shape[0], k.shape[1], T, k.shape[3])
            layer.keys = torch.gather(k, 2, g)
            layer.values = torch.gather(v, 2, g if v.shape == k.shape else
                                        idx[:, None, :, None].expand(v.shape[0], v.shape[1], T, v.shape[3]))

    def clone(self, rows: torch.Tensor) -> "DenseSession":
        """A second session continuing ``rows`` of this one (which is unchanged); its KV rows are copies.
        Its counters start at 0."""
        rows = rows.to(self.logits.device)
        other = copy.copy(self)
        other.cache = self._select(rows)
        other.logits = self.logits.index_select(0, rows)
        other.positions = self.positions.index_select(0, rows)
        other.tokens = other.prefill_tokens = 0
        other.keys = torch.zeros((), dtype=torch.long, device=self.logits.device)
        return other  # like a paged clone, it holds nothing in the ledger

    def fork(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.logits.device)
        self.cache = self._select(rows)
        self.logits = self.logits.index_select(0, rows)
        self.positions = self.positions.index_select(0, rows)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, active: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``tokens [rows]`` and compute the next logits. Rows not ``active`` and, with ``rows``,
        rows not named append nothing and keep their logits and position; every row still runs through
        the model (a dense cache grows by one column for all rows)."""
        dev = self.logits.device
        act = active
        if rows is not None:
            named = torch.zeros(self.rows, dtype=torch.bool, device=dev).index_fill_(0, rows.to(dev), True)
            act = named if act is None else (act & named)
        n, T = self.positions, self.width
        mask = self._mask(T + 1, n + 1)
        if act is not None:
            mask[:, T] = act.to(torch.long)
        self.keys = self.keys + (n + 1).sum()
        out = self.policy.model(**self.policy.forward_args(
            self.cache, input_ids=tokens[:, None], attention_mask=mask, use_cache=True,
            optional={"position_ids": n[:, None]}))
        self.cache = returned_cache(out, self.cache)
        self.width = T + 1
        logits = out.logits[:, -1]
        self.tokens += int(tokens.shape[0])
        if act is None:
            self.positions, self.logits = n + 1, logits
        else:
            self._rotate((~act).to(torch.long))  # a paused row's new (masked) column goes to its front
            self.positions = n + act.to(n.dtype)
            self.logits = torch.where(act[:, None], logits.to(self.logits.dtype), self.logits)
        return self.logits

    @torch.no_grad()
    def truncate(self, rows: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor) -> None:
        """Roll ``rows [k]`` (distinct) back to their first ``lengths [k]`` tokens (``1 <= lengths <=`` the
        row's length): the cut tokens and the kept last one rotate to the row's front (masked out), and
        the kept last token (``tokens [k]``) runs again for the logits after it."""
        dev = self.logits.device
        rows, lengths, tokens = rows.to(dev), lengths.to(dev), tokens.to(dev)
        kept = self.positions.index_copy(0, rows, (lengths - 1).to(self.positions.dtype))
        self._rotate(self.positions - kept)
        self.positions = kept
        full = torch.zeros(self.rows, dtype=torch.long, device=dev).index_copy(0, rows, tokens.to(torch.long))
        self.decode(full, rows=rows)

    def free(self) -> None:
        self.cache = None
        self.policy.kv_ledger.release(self)


def dense_forward_args(model) -> ForwardArgs:
    """:class:`ForwardArgs` of a model the fallback runs: it must declare ``attention_mask`` (padded rows)."""
    args = ForwardArgs(model)
    if "attention_mask" not in args.params:
        raise TypeError(f"{args.model_name} declares no attention_mask; the dense fallback needs one for padded rows")
    return args
