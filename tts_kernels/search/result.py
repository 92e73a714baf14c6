"""One result type for every search (:class:`SearchResult`), its :class:`Candidate`, and the
selection rules a strategy picks its prediction with (:func:`select_candidates`).

Selection runs on the device over ``[P, width]`` score and answer-id tensors
(:func:`~tts_kernels.ops.select_best`, :func:`~tts_kernels.ops.majority_vote`,
:func:`~tts_kernels.ops.weighted_vote`), one call per rule for all prompts.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..ops.select import majority_vote, select_best, weighted_vote
from .accounting import Compute
from .answers import answer_ids
from .answers import vote_key as key_fn

SELECT_RULES = ("best", "majority", "weighted")
FINISH_REASONS = ("eos", "stop", "length", "empty", "final", "sibling", "aborted", "rejected")


@dataclass
class Candidate:
    """One finished candidate of a prompt.

    Attributes:
        text: the completion (the prompt not included).
        answer: what the extractor read from it (``None``: no answer stated).
        score: the verifier's aggregate score (NaN when nothing scored it).
        finish: why it ended: ``"eos"``, ``"stop"`` (a stop string), ``"length"`` (the token
            limit of a completion, or of a step with no delimiter), ``"empty"`` (an empty step),
            ``"final"`` (a step-level search's last iteration), ``"sibling"`` (an expansion a DVTS
            subtree did not choose at its last step, returned with ``return_siblings``), ``"aborted"``
            (stopped by its own token confidence, ``deepconf``), ``"rejected"`` (stopped by the verifier's
            score of the partial candidate, ``speculative_rejection``).
        steps: the step texts (``text`` split by the step delimiter; a step-level search's steps
            as generated); ``step_scores`` their verifier scores (empty when not scored).
        token_ids: the generated token ids (sampling strategies; ``None`` where not kept).
        thinking_tokens: of its tokens, those written while thinking (``Settings.thinking``; ``None``
            without a thinking budget).
        confidence: the early-stopping strategies' summary of its token statistics (``mean``,
            ``lowest_group``, ``tail`` confidence, mean ``entropy`` and ``self_certainty``;
            :mod:`~tts_kernels.search.early_stop`); ``token_confidence`` the confidence of each token.
            ``None`` where not computed.
    """

    text: str
    answer: str | None
    score: float = float("nan")
    finish: str = "length"
    steps: list[str] = field(default_factory=list)
    step_scores: list[float] = field(default_factory=list)
    token_ids: list[int] | None = None
    thinking_tokens: int | None = None
    confidence: dict | None = None
    token_confidence: list[float] | None = None


@dataclass
class SearchResult:
    """What every strategy returns, for ``P`` prompts.

    Attributes:
        strategy: the strategy's registered name (or the driver's name).
        budget: samples (or beams) per prompt asked for.
        predictions: ``[P]`` the strategy's answer per prompt (``None``: no answer).
        chosen: ``[P]`` index into ``candidates[p]`` of the candidate the prediction came from
            (``None`` when no candidate gave it).
        candidates: ``[P][*]`` every finished candidate per prompt, in the order the search
            produced them.
        compute: exact tokens and the FLOP estimate spent (:class:`~tts_kernels.search.Compute`).
        samples: samples (completions or beams) spent over all prompts.
        prompt_info: ``[P]`` strategy-specific details per prompt (``compute_optimal``: the
            estimated success probability ``p``, ``level``, ``strategy``, ``n``, ``pilot_answer``).
        info: strategy-specific run details (e.g. ``policy_forward_tokens``: token positions the
            policy ran, rows that finished but rode along until the next host look included).
    """

    strategy: str
    budget: int
    predictions: list[str | None]
    chosen: list[int | None]
    candidates: list[list[Candidate]]
    compute: Compute
    samples: int
    prompt_info: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.prompt_info:
            self.prompt_info = [{} for _ in self.predictions]

    @property
    def best(self) -> list[Candidate | None]:
        """The candidate each prediction came from (``None`` where there is none)."""
        return [None if i is None else cands[i] for i, cands in zip(self.chosen, self.candidates)]


def select_candidates(candidates: Sequence[Sequence[Candidate]], rule: str, device=None,
                      vote_key: str = "normalized") -> tuple[list, list]:
    """Pick one candidate per prompt by ``rule``: ``(chosen indices, answers)``, each ``[P]``.

    * ``"best"``: the best aggregate score (NaN ranks lowest; ties to the first);
    * ``"majority"``: the most frequent answer (ties to the answer seen first), its first candidate;
    * ``"weighted"``: the answer with the largest summed score, its first candidate.

    A prompt with no candidate, or (votes) no candidate with an answer, gets ``(None, None)``.
    ``vote_key``: what makes two answers one vote (``Settings.vote_key``).
    """
    if rule not in SELECT_RULES:
        raise ValueError(f"select must be one of {SELECT_RULES}, got {rule!r}")
    P = len(candidates)
    width = max((len(c) for c in candidates), default=0) or 1
    rows_s = [[c.score for c in cands] + [math.nan] * (width - len(cands)) for cands in candidates]
    rows_a = [[c.answer for c in cands] + [None] * (width - len(cands)) for cands in candidates]
    scores = torch.tensor(rows_s, dtype=torch.float32, device=device).reshape(P, width)
    if rule == "best":
        idx = select_best(scores).tolist()
        chosen = [i if i < len(candidates[p]) else None for p, i in enumerate(idx)]
    else:
        aids = answer_ids(rows_a, device=device, key=key_fn(vote_key))
        ans, idx = majority_vote(aids) if rule == "majority" else weighted_vote(aids, scores)
        chosen = [i if a >= 0 else None for a, i in zip(ans.tolist(), idx.tolist())]
    return chosen, [None if i is None else candidates[p][i].answer for p, i in enumerate(chosen)]
