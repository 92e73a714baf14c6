"""Answer extraction for voting: the default extractor and the mapping of answers to ids.

Voting ops (``majority_vote``, ``weighted_vote``) work on integer answer ids per
row. A search driver extracts an answer string from each candidate's text with a
user-supplied function (default: :func:`extract_answer`) and turns each row's
strings into ids with :func:`answer_ids` (``None`` -> ``-1``, "no answer"), answers
with equal *vote keys* getting one id (``Settings.vote_key``):

* ``"normalized"`` (default): the answer string as extracted (:func:`normalize_answer` applied):
  right for any task, and for math when answers are written one way (integers);
* ``"math"``: the value ``math-verify`` reads (:func:`math_key`), so ``\\frac{1}{2}``, ``0.5``,
  ``1/2`` and ``\\boxed{\\dfrac12}`` vote together, and ``x+1`` with ``1+x``; an answer it cannot
  read keeps its string. Only for math: it reads ``abc`` as the product ``a*b*c`` (so ``cab`` votes with it).
"""
from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Sequence

import torch

_ANSWER_IS = re.compile(r"[Tt]he (?:final )?answer is[:\s]*([^\n]+)")


def boxed_answer(text: str) -> str | None:
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
    boxed = boxed_answer(text)
    if boxed is not None:
        return normalize_answer(boxed) or None
    found = _ANSWER_IS.findall(text)
    if found:
        return normalize_answer(found[-1]) or None
    return None


def math_parse(text, timeout_seconds: int | None = None) -> list:
    """``math-verify``'s parse of an answer (``[]`` when it reads nothing or fails; never raises).

    Bare answers (``\\frac{1}{2}``, ``x+1``: what extraction returns, what datasets store) are
    parsed as LaTeX math by wrapping them in ``$...$`` (as they are, ``math-verify`` looks for a
    number in them and reads ``x+1`` as ``1``); text with math delimiters or a ``\\boxed{}`` is
    parsed as is, and when the wrapped text gives nothing the text as is is tried too.
    ``timeout_seconds=None``: no timeout (``math-verify``'s uses signals: main thread only)."""
    import math_verify

    if text is None or isinstance(text, bool):
        return []
    text = str(text).strip()
    if not text:
        return []
    delimited = "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text
    for t in [text] if delimited else [f"${text}$", text]:
        try:
            got = math_verify.parse(t, parsing_timeout=timeout_seconds)
        except Exception:  # noqa: BLE001 - an answer it cannot read is not an error
            got = []
        if got:
            return got
    return []


@functools.lru_cache(maxsize=65536)
def math_key(answer: str) -> str:
    """The vote key of ``answer`` by value (module docstring): ``math-verify``'s reading, evaluated,
    numbers as exact rationals; the answer itself when it cannot be read. Cached per string."""
    # math-verify's timeout uses signals, which only the main thread may set (the server searches in another).
    got = math_parse(answer, 5 if threading.current_thread() is threading.main_thread() else None)
    if not got:
        return answer
    try:
        import sympy

        e = got[0]
        if isinstance(e, sympy.Basic):
            e = e.doit()
            if e.is_number:
                e = sympy.nsimplify(e, rational=True)
        return "math:" + str(e)
    except Exception:  # noqa: BLE001 - fall back to the string
        return answer


def vote_key(kind: str) -> Callable[[str], str] | None:
    """The key function of ``Settings.vote_key`` (``None``: the answer string itself)."""
    from .settings import VOTE_KEYS

    if kind not in VOTE_KEYS:
        raise ValueError(f"vote_key must be one of {VOTE_KEYS}, got {kind!r}")
    return math_key if kind == "math" else None


def answer_ids(answers: Sequence[Sequence[str | None]], device=None,
               key: Callable[[str], str] | None = None) -> torch.Tensor:
    """``[B][N]`` answer strings (``None`` = no answer) -> ``[B, N]`` int64 ids, per row numbered by
    first occurrence of their ``key`` (default: the string); ``None`` -> ``-1``."""
    rows = []
    for row in answers:
        seen: dict[str, int] = {}
        rows.append([-1 if a is None else seen.setdefault(a if key is None else key(a), len(seen)) for a in row])
    width = max((len(r) for r in rows), default=0)
    if any(len(r) != width for r in rows):
        raise ValueError("answers must have the same number of candidates in every row")
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(rows), width)
