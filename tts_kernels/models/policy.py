"""``HFPolicy``: a transformers causal LM as the policy of a search, on the paged KV cache.

The search drivers talk to a policy through a small protocol, so any object with
the same methods works:

* ``policy.tokenizer`` (``__call__``/``decode`` like a transformers tokenizer),
  ``policy.eos_token_ids`` (list of ints), ``policy.device``;
* ``policy.start(prompt_ids: list[list[int]], *, rows_hint, max_new_tokens) -> session``:
  prefill every prompt once;
* ``session.logits`` — ``[rows, V]`` next-token logits of every row;
* ``session.fork(rows)`` — new row ``j`` continues row ``rows[j]`` (device LongTensor,
  repeats allowed; histories are shared, not copied);
* ``session.decode(tokens)`` — append one token per row (``[rows]`` device LongTensor),
  update ``session.logits``;
* ``session.free()``.

``HFPolicy`` implements it over a :class:`~tts_kernels.models.PagedCache`: prompts are
left-padded and prefilled in one forward that stores only real tokens and computes
logits for the last position only; forks share blocks; a decode step keeps each row's
position on the device (no sync). That is the fast path, for the architectures it is known to be
exact for (:data:`~tts_kernels.models.hf_paged.PAGED_ARCHITECTURES`); any other decoder runs on
:class:`~tts_kernels.models.fallback.DenseSession` (its own forward and attention on a
``DynamicCache``, as ``generate()``), chosen once per policy (``policy.paged``) and logged once.
"""
from __future__ import annotations

import contextlib
import copy
import logging

import torch

from .compat import ForwardArgs
from .fallback import DenseSession, dense_cache_layers, dense_forward_args, left_pad
from .hf_paged import KVLedger, PagedCache, paged_unsupported, use_paged_attention

log = logging.getLogger("tts_kernels")


def eos_ids(config, tokenizer) -> list[int]:
    """The token ids that end a completion: ``config.eos_token_id`` (a generation config's or a model
    config's; an id or a list), else the tokenizer's EOS; ``[]`` when neither has one."""
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


# A step-by-step system prompt for math (search-and-learn's recipe uses one like it): steps apart, a boxed answer.
MATH_SYSTEM_PROMPT = ("Solve the math problem step by step. Keep each step short and end it with a blank line. "
                      "Write the final answer as $\\boxed{answer}$.")
# End-of-turn markers of common chat templates: a completion ends at the one the tokenizer has.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _check_template(tokenizer, system_prompt) -> None:
    """A chat template that exists and renders the turns it is given (errors name what is missing)."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"chat_template=True but the tokenizer of {name!r} has no chat template")
    probe = "\u2063probe\u2063"
    turns = ([{"role": "system", "content": system_prompt + probe}] if system_prompt else [])
    text = tokenizer.apply_chat_template(turns + [{"role": "user", "content": probe}], tokenize=False,
                                         add_generation_prompt=True)
    if text.count(probe) != len(turns) + 1:
        raise ValueError(f"the chat template of {name!r} renders without the content of the turns it is given "
                         f"(the system prompt or the user's prompt is missing from {text!r})")


class HFPolicy:
    """A transformers causal LM (switched to ``"tts_paged"`` attention) with its tokenizer.

    ``block_size``: tokens per KV block. ``num_blocks``: pool size (default: sized per
    session from the prompts, the number of rows and ``max_new_tokens``).
    ``eos_token_ids``: default from the model's generation config, else the tokenizer.
    ``chat_template``: render each prompt as a user turn (after ``system_prompt``, when given; e.g.
    :data:`MATH_SYSTEM_PROMPT`) with the tokenizer's chat template, the assistant's turn opened; the
    template's end-of-turn token (one of :data:`END_OF_TURN` the tokenizer has) then also ends a
    completion. Off by default: prompts are read as they are (what a server's completions endpoint
    and a chat endpoint that renders its own messages need).
    ``paged``: ``None`` (default) runs the paged fast path when the architecture is known to be exact on
    it (:func:`~tts_kernels.models.hf_paged.paged_unsupported`) and otherwise the dense fallback
    (:class:`~tts_kernels.models.fallback.DenseSession`: the model's own attention on a ``DynamicCache``;
    one warning on the ``"tts_kernels"`` logger says why); ``True`` requires the fast path (a
    ``ValueError`` naming the architecture when it is not known exact); ``False`` forces the fallback.
    The choice is ``policy.paged``. On the fallback the model's attention implementation is left as it
    is and ``kv_ledger`` counts the sessions with 0 blocks (they hold no pool).
    """

    def __init__(self, model, tokenizer, *, block_size: int = 16, num_blocks: int | None = None,
                 eos_token_ids: list[int] | None = None, chat_template: bool = False,
                 system_prompt: str | None = None, paged: bool | None = None):
        if paged not in (None, True, False):
            raise TypeError(f"paged must be None, True or False, got {paged!r}")
        if system_prompt is not None and not chat_template:
            raise ValueError("system_prompt needs chat_template=True (it is a turn of the chat)")
        if chat_template:
            _check_template(tokenizer, system_prompt)
        reason = paged_unsupported(model)
        if paged and reason is not None:
            raise ValueError(f"paged=True, but the paged fast path is not known to be exact here: {reason}")
        self.paged = reason is None if paged is None else bool(paged)
        if self.paged:
            self.model = use_paged_attention(model)
            self.forward_args = ForwardArgs(model)  # the cache keyword this transformers version declares
        else:  # the model's own attention, on a DynamicCache (fallback.DenseSession)
            self.model = model
            self.forward_args = dense_forward_args(model)
            self.dense_layers = dense_cache_layers(model)
            if reason is not None:
                log.warning("HFPolicy: the paged fast path is off for %s: %s; running the model's own forward on a "
                            "DynamicCache instead (exact, slower: forks copy the KV history)",
                            getattr(model.config, "_name_or_path", "") or type(model).__name__, reason)
            else:
                log.info("HFPolicy: paged=False: running %s on a DynamicCache (the dense fallback)",
                         type(model).__name__)
        self.tokenizer = tokenizer
        self.block_size, self.num_blocks = block_size, num_blocks
        self.chat_template, self.system_prompt = bool(chat_template), system_prompt
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids is not None else eos_ids(
            getattr(model, "generation_config", None), tokenizer)
        if chat_template and eos_token_ids is None:
            vocab = tokenizer.get_vocab()
            self.eos_token_ids += [vocab[t] for t in END_OF_TURN if t in vocab and vocab[t] not in self.eos_token_ids]
        self.kv_ledger = KVLedger()  # KV blocks held by this policy's open sessions

    @classmethod
    def from_pretrained(cls, path, *, gguf_file: str | None = None, dtype: torch.dtype = torch.float32, device=None,
                        model_kwargs: dict | None = None, **kwargs) -> "HFPolicy":
        """The causal LM at ``path`` with its tokenizer: a transformers folder or hub id, or a GGUF file
        (``path`` ending in ``.gguf``, or a folder with ``gguf_file=``), dequantized to ``dtype``
        (:mod:`.loading`). ``model_kwargs`` go to ``from_pretrained``; ``kwargs`` to :class:`HFPolicy`
        (``chat_template``, ``system_prompt``, pool sizes)."""
        from .loading import load_model, load_tokenizer

        model = load_model(path, gguf_file=gguf_file, dtype=dtype, device=device, **(model_kwargs or {}))
        return cls(model, load_tokenizer(path, gguf_file=gguf_file), **kwargs)

    def render(self, prompt: str) -> str:
        """The text the model reads for ``prompt`` (the chat rendering when ``chat_template``)."""
        if not self.chat_template:
            return prompt
        turns = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        return self.tokenizer.apply_chat_template(turns + [{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompt: str) -> list[int]:
        if self.chat_template:  # the template writes its own special tokens (BOS included)
            return self.tokenizer(self.render(prompt), add_special_tokens=False).input_ids
        return self.tokenizer(prompt).input_ids

    def start(self, prompt_ids: list[list[int]], *, rows_hint: int | None = None,
              max_new_tokens: int = 0) -> "PolicySession | DenseSession":
        session = PolicySession if self.paged else DenseSession
        return session(self, prompt_ids, rows_hint or len(prompt_ids), max_new_tokens)


class PolicySession:
    """Rows of sequences under a policy: their paged history, positions and next-token logits."""

    def __init__(self, policy: HFPolicy, prompt_ids: list[list[int]], rows_hint: int, max_new_tokens: int):
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt must have at least one token")
        self.policy = policy
        dev = policy.device
        P = len(prompt_ids)
        t = max(len(p) for p in prompt_ids)
        B = policy.block_size
        # Prompts once, then at most one partial + the new tokens' blocks per row.
        blocks = policy.num_blocks or (P * (t // B + 1) + rows_hint * (max_new_tokens // B + 2) + 8)
        self.cache = PagedCache(policy.model, batch_size=P, num_blocks=blocks, block_size=B,
                                max_seqs=max(2 * rows_hint + P, 16))
        self.logits, self.positions = self._prefill(self.cache, prompt_ids)  # next position of each row (device)
        self.prefill_tokens = int(sum(len(p) for p in prompt_ids))  # prompt tokens prefilled
        self.tokens = self.prefill_tokens  # tokens run through the model (decode rows added later)
        # Keys attended, summed over those tokens (for the FLOP estimate): causal prefill, then
        # one more key per row per decode (a device tensor: no sync; read when reporting).
        self.keys = torch.tensor(sum(len(p) * (len(p) + 1) // 2 for p in prompt_ids), device=dev)
        policy.kv_ledger.hold(self, blocks)

    def _prefill(self, cache: PagedCache, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``prompt_ids`` (left-padded, one forward) into ``cache``'s rows: ``(last logits, next positions)``."""
        policy = self.policy
        ids, mask = left_pad(prompt_ids, policy.tokenizer.pad_token_id or 0, policy.device)
        cache.set_attention_mask(mask)
        pos = cache.position_ids(ids.shape[1])
        cache.set_attention_mask(mask)
        with torch.no_grad():
            out = policy.model(**policy.forward_args(cache, input_ids=ids, position_ids=pos, use_cache=True,
                                                     optional={"logits_to_keep": 1}))
        return out.logits[:, -1], mask.sum(1)

    @property
    def rows(self) -> int:
        return self.cache.batch_size

    @property
    def pool(self) -> tuple[int, int, int]:
        """``(blocks, block_size, free sequence slots)`` of the session's KV pool: what a caller that
        admits prompts into it (:meth:`admit`) plans by."""
        kv = self.cache.kv
        return kv.num_blocks, kv.block_size, kv.max_seqs - kv.num_live_seqs

    def admit(self, prompt_ids: list[list[int]]) -> None:
        """Prefill new prompts into this session's pool (one forward over just them, as :meth:`HFPolicy.start`
        prefills): they become rows ``rows .. rows + len(prompt_ids) - 1``, after the rows running now, which
        are untouched. What a search that takes new requests at its host looks calls (continuous batching).
        The pool must have room (:attr:`pool`); on an error nothing is added."""
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt must have at least one token")
        sub = PagedCache(self.policy.model, batch_size=len(prompt_ids), kv=self.cache.kv)
        try:
            logits, positions = self._prefill(sub, prompt_ids)
        except BaseException:
            sub.free()
            raise
        self.cache.adopt(sub)
        self.logits = torch.cat([self.logits, logits.to(self.logits.dtype)])
        self.positions = torch.cat([self.positions, positions.to(self.positions.dtype)])
        n = int(sum(len(p) for p in prompt_ids))
        self.prefill_tokens += n
        self.tokens += n
        self.keys = self.keys + sum(len(p) * (len(p) + 1) // 2 for p in prompt_ids)

    def clone(self, rows: torch.Tensor) -> "PolicySession":
        """A second session over the same KV pool continuing ``rows`` of this one (which is unchanged),
        e.g. for throw-away rollouts. Its ``tokens`` count starts at 0."""
        rows = rows.to(self.logits.device)
        other = copy.copy(self)
        other.cache = self.cache.spawn(rows)
        other.logits = self.logits.index_select(0, rows)
        other.positions = self.positions.index_select(0, rows)
        other.tokens = other.prefill_tokens = 0
        other.keys = torch.zeros((), dtype=torch.long, device=self.logits.device)
        return other

    def fork(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.logits.device)
        self.cache.fork(rows)
        self.logits = self.logits.index_select(0, rows)
        self.positions = self.positions.index_select(0, rows)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, active: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``tokens [rows]`` and compute the next logits.

        ``active [rows]`` bool (optional, on the device): rows where it is False append
        nothing and keep their logits and position (they still ride along in the batch:
        pausing them needs no host sync).
        ``rows [k]`` int64 (optional, distinct row indices): run just these rows through the
        model; the others append nothing and keep their logits (a caller that has looked at
        which rows are still going leaves the finished ones out of the batch).
        """
        if rows is None:  # the whole batch: no index ops on the hot path
            tok, pos, act = tokens, self.positions, active
        else:
            rows = rows.to(self.logits.device)
            tok, pos = tokens.index_select(0, rows), self.positions.index_select(0, rows)
            act = None if active is None else active.index_select(0, rows)
        self.keys = self.keys + (pos + 1).sum()
        with contextlib.nullcontext() if rows is None else self.cache.only(rows):
            if act is not None:
                self.cache.set_attention_mask(act.to(torch.long)[:, None])
            out = self.policy.model(**self.policy.forward_args(self.cache, input_ids=tok[:, None],
                                                               position_ids=pos[:, None], use_cache=True))
        logits = out.logits[:, -1]
        if act is None:
            new_pos, new_logits = pos + 1, logits
        else:
            old = self.logits if rows is None else self.logits.index_select(0, rows)
            new_pos, new_logits = pos + act, torch.where(act[:, None], logits, old)
        if rows is None:
            self.positions, self.logits = new_pos, new_logits
        else:
            self.positions = self.positions.index_copy(0, rows, new_pos)
            self.logits = self.logits.index_copy(0, rows, new_logits.to(self.logits.dtype))
        self.tokens += tok.shape[0]
        return self.logits

    @torch.no_grad()
    def truncate(self, rows: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor) -> None:
        """Roll ``rows [k]`` (distinct) back to their first ``lengths [k]`` tokens (``1 <= lengths <=``
        the row's length). The logits become those after the kept tokens: the cache is cut one token
        shorter and the kept last token (``tokens [k]``, which the caller knows) runs again. Only
        these ``k`` rows run through the model."""
        dev = self.logits.device
        rows, lengths, tokens = rows.to(dev), lengths.to(dev), tokens.to(dev)
        self.cache.truncate(rows, lengths - 1)
        self.positions = self.positions.index_copy(0, rows, (lengths - 1).to(self.positions.dtype))
        full = torch.zeros(self.rows, dtype=torch.long, device=dev).index_copy(0, rows, tokens)
        self.decode(full, rows=rows)

    def release(self, rows: torch.Tensor) -> None:
        """Rows where the bool mask ``rows [rows]`` is True give their KV blocks back to the pool now (a
        masked truncate to length 0 on the device: no host sync). They must not run as active rows again
        (an early-stopped candidate: the caller pauses it and drops it from the batch at its next look)."""
        lens = self.cache.lengths()
        self.cache.truncate(torch.arange(self.rows, device=lens.device), torch.where(rows.to(lens.device), 0, lens))

    def free(self) -> None:
        self.cache.free()
        self.policy.kv_ledger.release(self)
