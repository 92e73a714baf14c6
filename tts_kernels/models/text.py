"""How a completion's text becomes steps: one rule for the verifiers and every search.

Imports nothing heavy (no transformers), so the search layer uses it freely.
"""
from __future__ import annotations


def split_steps(text: str, delimiter: str = "\n\n") -> list[str]:
    """Steps of a completion: the pieces between delimiters, the delimiter kept at the end of
    each step but the last; pieces that are only whitespace are dropped."""
    if not isinstance(delimiter, str) or not delimiter:
        raise ValueError(f"delimiter must be a non-empty string, got {delimiter!r}")
    parts = text.split(delimiter)
    steps = [p + delimiter for p in parts[:-1]] + [parts[-1]]
    return [s for s in steps if s.strip()]


def cut_at_stop(text: str, stop) -> str | None:
    """``text`` up to and including the earliest of the ``stop`` strings in it (ties: the smaller string);
    ``None`` when none occurs. The sampling strategies end a completion there."""
    hits = [(text.find(x), x) for x in stop if x in text]
    if not hits:
        return None
    pos, x = min(hits)
    return text[: pos + len(x)]
