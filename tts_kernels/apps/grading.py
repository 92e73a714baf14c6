"""Graders for ``tts-kernels eval``: is an extracted answer right?

A grader is any callable ``grader(prediction, gold) -> bool``: ``prediction`` is the
answer a strategy extracted from a completion (a string, or ``None`` when the
completion stated no answer), ``gold`` is the dataset's answer (a string or a number).
A grader never raises on malformed text: a prediction it cannot read is wrong.

* :class:`IntegerGrader` — exact integer compare (the bundled arithmetic task):
  ``" 42 "``, ``"+42"`` and ``"42.0"`` are 42; anything else that is not an integer is wrong.
* :class:`MathVerifyGrader` — ``math-verify`` (``parse`` then ``verify``) for math datasets:
  ``\\frac{1}{2}`` equals ``0.5``, ``\\sqrt{4}`` equals ``2``, ``x+1`` equals ``1+x``.

:func:`get_grader` picks one by name (the ``--grader`` flag): ``"integer"``,
``"math-verify"``, ``"auto"`` (integer when every gold answer is an integer, else
math-verify; needs the gold answers), or ``"module:function"`` for a grader of your own
(imported, then called as above).
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable

from ..search.answers import math_parse

__all__ = ["Grader", "IntegerGrader", "MathVerifyGrader", "get_grader", "as_integer", "GRADERS"]

Grader = Callable[[object, object], bool]
GRADERS = ("auto", "integer", "math-verify")

_INT = re.compile(r"[-+]?\d+(?:\.0*)?")


def as_integer(value) -> int | None:
    """``value`` as an int when it is one (``7``, ``"7"``, ``" -7 "``, ``"+7"``, ``"7.0"``, ``7.0``), else ``None``."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        if _INT.fullmatch(text):
            return int(text.split(".")[0])
    return None


class IntegerGrader:
    """Right iff both sides are the same integer (see :func:`as_integer`)."""

    name = "integer"

    def __call__(self, prediction, gold) -> bool:
        p, g = as_integer(prediction), as_integer(gold)
        return p is not None and g is not None and p == g


class MathVerifyGrader:
    """Right iff ``math_verify.verify(parse(gold), parse(prediction))``.

    Answers are parsed as :func:`~tts_kernels.search.answers.math_parse` does (bare answers as
    LaTeX math, in ``$...$``). An empty parse, ``None`` or any error in ``math-verify`` counts as
    wrong (never raises)."""

    name = "math-verify"

    def __init__(self, float_rounding: int = 6, timeout_seconds: int = 5):
        try:
            import math_verify
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("the math-verify grader needs `pip install math-verify`") from exc
        self._mv = math_verify
        self.float_rounding = float_rounding
        self.timeout_seconds = timeout_seconds

    def parse(self, text) -> list:
        """``math-verify`` parse of an answer (``[]`` when it reads nothing):
        :func:`~tts_kernels.search.answers.math_parse`."""
        return math_parse(text, self.timeout_seconds)

    def __call__(self, prediction, gold) -> bool:
        p = self.parse(prediction)
        g = self.parse(gold)
        if not p or not g:
            return False
        try:
            return bool(self._mv.verify(g, p, float_rounding=self.float_rounding,
                                        timeout_seconds=self.timeout_seconds))
        except Exception:  # noqa: BLE001 - see the class docstring
            return False


def get_grader(name: str = "auto", golds: Iterable | None = None) -> Grader:
    """A grader by name (module docstring); ``"auto"`` looks at ``golds``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"grader must be one of {GRADERS} or 'module:function', got {name!r}")
    if name == "auto":
        if golds is None:
            raise ValueError("grader 'auto' needs the gold answers to choose")
        golds = list(golds)
        name = "integer" if golds and all(as_integer(g) is not None for g in golds) else "math-verify"
    if name == "integer":
        return IntegerGrader()
    if name == "math-verify":
        return MathVerifyGrader()
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load grader {name!r}: {exc}") from exc
        if not callable(fn):
            raise ValueError(f"grader {name!r} is not callable")
        return fn
    raise ValueError(f"grader must be one of {GRADERS} or 'module:function', got {name!r}")


def grader_name(grader: Grader) -> str:
    """A grader's name for configs and summaries: ``.name``, else ``module:qualname``."""
    qualname = getattr(grader, "__qualname__", type(grader).__name__)
    return getattr(grader, "name", None) or f"{getattr(grader, '__module__', '?')}:{qualname}"
