"""Argument checks shared by the search drivers (run before any model state is created); integers:
:func:`tts_kernels.ops._validate.check_int`."""
from __future__ import annotations

from collections.abc import Sequence

from .result import SELECT_RULES


def check_prompts(prompts) -> list[str]:
    """``prompts`` as a list: a non-empty sequence of strings (a bare string is refused)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {type(prompts).__name__}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings; prompts[{bad[0]}] is {type(prompts[bad[0]]).__name__}")
    return list(prompts)


def check_select(select: str, verifier) -> None:
    """``select`` is one of :data:`~tts_kernels.search.result.SELECT_RULES`; only ``"majority"`` runs without a
    verifier."""
    if select not in SELECT_RULES:
        raise ValueError(f"select must be one of {SELECT_RULES}, got {select!r}")
    if select != "majority" and verifier is None:
        raise ValueError(f"select={select!r} needs a verifier (only 'majority' runs without one)")
