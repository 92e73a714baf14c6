"""``ThinkingBudget``: how long a reasoning policy thinks, as a setting (``Settings(thinking=...)``).

The rule itself runs on the device inside every decode loop (:mod:`tts_kernels.ops.thinking`: budget
forcing as a logits transform plus a per-row state); this module turns the text-level setting into
that rule's token ids for a policy's tokenizer, once per search.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.thinking import NO_LIMIT, ThinkingRule


@dataclass(frozen=True)
class ThinkingBudget:
    """Budget forcing for a model that thinks before it answers (s1, Muennighoff et al. 2025).

    Attributes:
        min_thinking_tokens: below this many thinking tokens, an attempt to stop thinking (the end
            marker, or EOS) becomes a continuation instead.
        max_thinking_tokens: at this many, the end marker and then ``answer_prefix`` are forced
            (``None``: no maximum).
        end: the end-of-thinking marker: a token of the vocabulary (``"</think>"``) or text the
            tokenizer encodes.
        continuations: what is written instead of stopping early, used in rotation (``"Wait"``).
        answer_prefix: text forced after the marker when the maximum ends the thinking.

    Every row starts thinking (the prompt opens the thinking span, as reasoning models' templates do).
    """

    min_thinking_tokens: int = 0
    max_thinking_tokens: int | None = None
    end: str = "</think>"
    continuations: tuple[str, ...] = ("Wait",)
    answer_prefix: str = ""

    def __post_init__(self):
        for name in ("min_thinking_tokens", "max_thinking_tokens"):
            v = getattr(self, name)
            if v is None and name == "max_thinking_tokens":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Settings.thinking.{name} must be an int >= 0, got {v!r}")
        if self.max_thinking_tokens is not None and self.min_thinking_tokens > self.max_thinking_tokens:
            raise ValueError(f"Settings.thinking.min_thinking_tokens ({self.min_thinking_tokens}) is above "
                             f"max_thinking_tokens ({self.max_thinking_tokens})")
        if not isinstance(self.end, str) or not self.end:
            raise ValueError(f"Settings.thinking.end must be a non-empty string, got {self.end!r}")
        conts = self.continuations
        if isinstance(conts, str) or not isinstance(conts, (tuple, list)) or not all(
                isinstance(c, str) and c for c in conts):
            raise ValueError(f"Settings.thinking.continuations must be a list of non-empty strings, got {conts!r}")
        if self.min_thinking_tokens > 0 and not conts:
            raise ValueError("Settings.thinking.continuations is empty but min_thinking_tokens > 0 needs one")
        if not isinstance(self.answer_prefix, str):
            raise ValueError(f"Settings.thinking.answer_prefix must be a string, got {self.answer_prefix!r}")
        object.__setattr__(self, "continuations", tuple(conts))

    @classmethod
    def of(cls, value) -> ThinkingBudget | None:
        """``None``, a ``ThinkingBudget``, or its fields as a dict (a server request, a config file)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            names = set(cls.__dataclass_fields__)
            bad = sorted(set(value) - names)
            if bad:
                raise ValueError(f"Settings.thinking: unknown field(s) {bad}; fields: {sorted(names)}")
            return cls(**value)
        raise TypeError(f"Settings.thinking must be a ThinkingBudget, a dict of its fields or None, "
                        f"got {type(value).__name__}")

    def rule(self, tokenizer, eos_ids, device=None) -> ThinkingRule:
        """The rule in ``tokenizer``'s ids (every text checked to encode to something)."""
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}

        def ids(text: str, what: str, empty_ok: bool = False) -> list[int]:
            if text in vocab:
                return [vocab[text]]
            if not text:
                out = []
            elif callable(tokenizer):  # a transformers tokenizer
                out = tokenizer(text, add_special_tokens=False).input_ids
            else:  # a backend's own (tts_kernels.search.protocols): its encode
                out = tokenizer.encode(text)
            if not out and not empty_ok:
                raise ValueError(f"Settings.thinking.{what} {text!r} is not a token of the policy's vocabulary and "
                                 f"encodes to no tokens")
            return list(out)

        marker = ids(self.end, "end")
        seqs = [ids(c, "continuations") for c in self.continuations]
        seqs.append(marker + ids(self.answer_prefix, "answer_prefix", empty_ok=True))
        L = max(len(s) for s in seqs)
        forced = torch.full((len(seqs), L), -1, dtype=torch.int64)
        for i, s in enumerate(seqs):
            forced[i, : len(s)] = torch.tensor(s)
        return ThinkingRule(forced=forced.to(device), lengths=torch.tensor([len(s) for s in seqs], device=device),
                            marker=torch.tensor(marker, device=device),
                            eos=torch.tensor(sorted(set(eos_ids)), dtype=torch.int64, device=device),
                            min_tokens=self.min_thinking_tokens,
                            max_tokens=NO_LIMIT if self.max_thinking_tokens is None else self.max_thinking_tokens)

    def as_dict(self) -> dict:
        return {"min_thinking_tokens": self.min_thinking_tokens, "max_thinking_tokens": self.max_thinking_tokens,
                "end": self.end, "continuations": list(self.continuations), "answer_prefix": self.answer_prefix}
