"""Answer extraction for voting: the default extractor and the mapping of answers to ids.

Voting ops (``majority_vote``, ``weighted_vote``) work on integer answer ids per
row. A search driver extracts an answer string from each candidate's text with a
user-supplied function (default: :func:`extract_answer`) and turns each row's
strings into ids with :func:`answer_ids` (``None`` -> ``-1``, "no answer").
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch

_ANSWER_IS = re.compile(r"[Tt]he (?:final )?answer is[:\s]*([^\n]+)")


def _boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}``, with nested braces."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: no answer


def normalize_answer(ans: str) -> str:
    """Light normalisation so equal answers compare equal: spaces, ``$``, a trailing period,
    thousands separators in plain numbers, and ``+3`` / ``3.0`` style integers."""
    a = ans.strip().strip("$ ").rstrip(".").strip("$ ")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", a):
        a = a.replace(",", "")
    m = re.fullmatch(r"([-+]?)(\d+)(?:\.0+)?", a)
    if m:
        a = ("-" if m.group(1) == "-" and int(m.group(2)) != 0 else "") + str(int(m.group(2)))
    return a


def extract_answer(text: str) -> str | None:
    """The answer of a solution: the last ``\\boxed{X}``, else the last ``The answer is X``; ``None`` if neither."""
    boxed = _boxed(text)
    if boxed is not None:
        return normalize_answer(boxed) or None
    found = _ANSWER_IS.findall(text)
    if found:
        return normalize_answer(found[-1]) or None
    return None


def answer_ids(answers: Sequence[Sequence[str | None]], device=None) -> torch.Tensor:
    """``[B][N]`` answer strings (``None`` = no answer) -> ``[B, N]`` int64 ids, per row numbered by
    first occurrence; ``None`` -> ``-1``."""
    rows = []
    for row in answers:
        seen: dict[str, int] = {}
        rows.append([-1 if a is None else seen.setdefault(a, len(seen)) for a in row])
    width = max((len(r) for r in rows), default=0)
    if any(len(r) != width for r in rows):
        raise ValueError("answers must have the same number of candidates in every row")
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(rows), width)
