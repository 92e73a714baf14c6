"""What a search needs from a model backend: the policy and verifier protocols, as code.

Every search in :mod:`tts_kernels.search` talks to its models through these protocols
and nothing else, so a backend (the transformers adapters in :mod:`tts_kernels.models`,
a vLLM engine, a scripted fake in the tests) implements exactly this list. They are
structural (``typing.Protocol``): a backend does not import or subclass them;
``isinstance(obj, Policy)`` checks that the members exist (not their signatures: the
tests run every search on a scripted fake for that).

Rows. A session holds *rows*: sequences (a prompt and what was generated after it) with
their model state (a KV history). ``fork(rows)`` makes new row ``j`` continue old row
``rows[j]`` (repeats allowed; histories are shared, not copied); rows not named are
dropped. ``clone(rows)`` does the same into a second session over the same memory,
leaving this one unchanged (throw-away rollouts). Row indices are device ``LongTensor``\\ s.

Counters. ``tokens``, ``prefill_tokens`` and ``keys`` feed the exact compute accounting
(:mod:`~tts_kernels.search.accounting`): token positions run through the model, prompt
tokens prefilled, and keys attended summed over those tokens (may be a 0-dim device tensor
so that counting never syncs; it is read once when the search reports).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["Tokenizer", "Policy", "PolicySession", "Verifier", "VerifierSession", "StepScores"]


@runtime_checkable
class Tokenizer(Protocol):
    """The part of a transformers tokenizer the searches use: text of token ids."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = ...) -> list[str]: ...


@runtime_checkable
class PolicySession(Protocol):
    """Rows of sequences under a policy, with their next-token logits."""

    logits: torch.Tensor  # [rows, V] next-token logits of every row (any float dtype)
    tokens: int  # token positions run through the model so far (prefill + one per row per decode)
    prefill_tokens: int  # prompt tokens prefilled
    keys: torch.Tensor | int  # keys attended, summed over the tokens run (FLOP estimate)

    @property
    def rows(self) -> int: ...

    def fork(self, rows: torch.Tensor) -> None:
        """New row ``j`` continues row ``rows[j]``; ``logits`` follow."""

    def clone(self, rows: torch.Tensor) -> PolicySession:
        """A second session continuing ``rows`` of this one (unchanged); its counters start at 0."""

    def decode(self, tokens: torch.Tensor, active: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``tokens [rows]`` (one per row) and return the new ``logits``. Rows where
        ``active [rows]`` (bool, on the device) is False append nothing and keep their logits.
        ``rows [k]`` (int64, distinct; optional): only these rows run through the model, the
        others are left as they are (as if inactive), so finished rows cost nothing."""

    def free(self) -> None:
        """Release the rows' memory; the session is not used again."""

    # Optional (particle Gibbs needs it): def truncate(self, rows, lengths, tokens) -> None
    #     Roll rows [k] back to their first lengths [k] tokens; the logits become those after them
    #     (tokens [k]: each row's kept last token, to run again).
    #
    # Optional, for continuous batching (requests joining a running search; the server):
    #   def admit(self, prompt_ids: list[list[int]]) -> None
    #     Prefill new prompts into the running session: rows ``rows ..`` after the others, which are
    #     untouched; on an error nothing is added.
    #   pool -> (blocks, block_size, free sequence slots): what a search admitting prompts plans by.
    #   positions: [rows] int64, each row's next position (the step loop counts keys per row from it).
    #
    # Optional, for text-level engines (vLLM: tts_kernels.integrations.vllm) that sample whole
    # continuations rather than return logits per token; when present the searches call it instead
    # of sampling token by token with decode (``logits`` then only carries the rows, vocabulary
    # size and device):
    #   def generate(self, rows: list[int] | None, *, max_tokens, stop: list[str], temperature, top_p,
    #                top_k, min_p, logprobs: bool, seeds: list[int]) -> list[tuple[list[int], str, float]]
    #     Sample a continuation of each of ``rows`` (None: all) up to ``max_tokens``, ending at EOS or
    #     after a ``stop`` string, and append it to the row (EOS not appended). Returns per row: the
    #     token ids sampled (EOS included when it ended on one), the finish ("eos", "stop",
    #     "length") and the sampled tokens' summed log-probabilities (0.0 unless ``logprobs``).
    #     ``seeds``: one per row (tts_kernels.search.seeds.engine_seeds), for engines that can seed
    #     a request.


@runtime_checkable
class Policy(Protocol):
    """A causal LM that generates the candidates."""

    tokenizer: Tokenizer
    eos_token_ids: list[int]  # a sampled token among these ends the row (may be empty)
    model: nn.Module  # for the FLOP estimate: parameters, and ``.config`` layers / heads / head_dim

    @property
    def device(self) -> torch.device: ...

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt, as the model is to read it (special tokens included)."""

    def start(self, prompt_ids: list[list[int]], *, rows_hint: int, max_new_tokens: int) -> PolicySession:
        """Prefill every prompt once: a session with one row per prompt. ``rows_hint`` (rows the
        search will fork to) and ``max_new_tokens`` (tokens a row will add) size its memory."""


@runtime_checkable
class StepScores(Protocol):
    """Scores of whole candidates (:meth:`Verifier.score_steps`)."""

    step_scores: list  # [P][n][steps] floats
    aggregate: torch.Tensor  # [P * n] float32 aggregate per candidate, prompt-major
    tokens: int  # token positions the verifier ran
    keys: int  # keys attended, summed over those tokens


@runtime_checkable
class VerifierSession(Protocol):
    """Rows of candidates under a verifier, each with its running aggregate score."""

    aggregate: torch.Tensor  # [rows] float32 running aggregate (NaN before a row's first step)
    tokens: int
    keys: int

    @property
    def rows(self) -> int: ...

    def fork(self, rows: torch.Tensor) -> None:
        """New row ``j`` continues row ``rows[j]`` (history shared, aggregate copied)."""

    def clone(self, rows: torch.Tensor) -> VerifierSession:
        """A second session continuing ``rows`` of this one (unchanged); counters start at 0."""

    def add_steps(self, steps: list[list[str]]) -> torch.Tensor:
        """Append ``steps[r]`` (step texts, possibly none) to row ``r`` and score them: returns
        ``[rows, S]`` float32 step scores (NaN past a row's steps) and updates ``aggregate``."""

    def free(self) -> None: ...

    # Optional, for continuous batching of the step searches (tts_kernels.search.step_loop):
    #   def admit(self, prompts: list[str]) -> None: new prompts' rows after the others (nothing added
    #     on an error); pool -> (blocks, block_size, free sequence slots); blocks_for(prompts, rows) -> int:
    #     the KV blocks those prompts and ``rows`` rows grown from them may hold at most;
    #   last_rows: (tokens, keys) per row of the session's last forward, so compute is counted per prompt.


@runtime_checkable
class Verifier(Protocol):
    """A process reward model (or any step scorer): scores each step of a candidate."""

    flop_module: nn.Module  # what one scored token runs through (FLOP estimate)

    @property
    def device(self) -> torch.device: ...

    def start(self, prompts: list[str], *, agg: str, rows: int, max_new_tokens: int) -> VerifierSession:
        """A session with one row per prompt, prompts read once; ``agg`` folds step scores
        (``last``/``min``/``prod``/``mean``); ``rows`` and ``max_new_tokens`` size its memory."""

    def score_steps(self, prompts: list[str], steps: list[list[list[str]]], *, agg: str) -> StepScores:
        """Score whole candidates given as steps: ``steps[p][c]`` is candidate ``c`` of prompt
        ``p``, split into step texts by the search."""
