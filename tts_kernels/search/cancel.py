"""Dropping prompts from a search under way: the server's clients that go away.

A :class:`Cancellation` is a thread-safe set of prompt indices (into the prompts of the run).
Inside ``with cancellation(c):`` every built-in driver looks at it where it already looks at the
host (every ``sync_every`` tokens while sampling; after each step of a step-level search or a
particle filter) and stops growing the rows of the prompts in it: they are dropped from the
batch there, so they cost nothing from then on and their KV blocks go back to the pool. Their
results are whatever had finished (to be thrown away); the other prompts' results do not change
when their seeds are per prompt (:mod:`~tts_kernels.search.seeds`).

A strategy that ignores it (a user's) simply runs to the end. A strategy that runs searches over
some of its prompts (``compute_optimal``), or over prompts of its own made from them (``revise``:
one per chain), runs each inside :func:`sub_run`, so the sub-search sees the cancelled prompts by
its own indices. Scopes are per thread (``contextvars``): set it in
the thread that runs the search.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterable, Sequence

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("tts_kernels_cancellation", default=None)


class Cancellation:
    """Prompt indices whose rows a running search should drop (add with :meth:`cancel`, from any thread)."""

    def __init__(self):
        self._prompts: frozenset[int] = frozenset()
        self._lock = threading.Lock()

    def cancel(self, prompts: Iterable[int]) -> None:
        with self._lock:
            self._prompts = self._prompts | frozenset(int(p) for p in prompts)

    @property
    def prompts(self) -> frozenset[int]:
        return self._prompts


@contextlib.contextmanager
def cancellation(c: Cancellation):
    """Searches run inside this block (in this thread) drop the prompts ``c`` holds."""
    token = _CURRENT.set(c)
    try:
        yield c
    finally:
        _CURRENT.reset(token)


class _SubRun:
    """The enclosing run's cancellation seen by a search over ``prompts`` of it (by their new indices;
    a prompt may appear several times, e.g. once per chain of a sequential search)."""

    def __init__(self, parent, prompts: Sequence[int]):
        self.parent = parent
        self.position: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            self.position.setdefault(p, []).append(i)

    @property
    def prompts(self) -> frozenset[int]:
        return frozenset(i for p in self.parent.prompts for i in self.position.get(p, ()))


@contextlib.contextmanager
def sub_run(prompts: Sequence[int]):
    """Searches run inside this block are over ``prompts`` (indices into the enclosing run's prompts,
    repeats allowed): their :func:`cancelled` maps the enclosing cancellation to their own indices."""
    parent = _CURRENT.get()
    if parent is None:
        yield
        return
    token = _CURRENT.set(_SubRun(parent, prompts))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def cancelled() -> frozenset[int]:
    """The prompts to drop now (empty outside a :func:`cancellation` block)."""
    c = _CURRENT.get()
    return frozenset() if c is None else c.prompts
