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

Progress. Beside cancellation, ``with progress(fn):`` installs a listener that the built-in drivers
call at the same host looks, never elsewhere (so listening adds no host sync): the sampling loop
(:func:`~tts_kernels.search.best_of_n.sample_completions`) calls ``fn("tokens", {"rows": [(prompt,
candidate), ...], "ids": [[token ids sampled since the last look], ...]})`` every ``sync_every`` tokens,
and the step searches (``prm_beam_search``, ``dvts``) call ``fn("step", {"prompt", "index", "text",
"score"})`` once per step for each prompt's best row (the one whose newest step scored highest).
``fn`` runs on the search thread: it must be quick (the server hands the event to its event loop).
:func:`report` is a no-op when nobody listens, and drivers test :func:`listening` before they build
an event. Inside :func:`sub_run` nobody listens (a sub-search's indices are not the run's).
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterable, Sequence

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("tts_kernels_cancellation", default=None)
_PROGRESS: contextvars.ContextVar = contextvars.ContextVar("tts_kernels_progress", default=None)


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
        self.map(0, prompts)

    def map(self, first: int, prompts: Sequence[int]) -> None:
        """The search's prompts ``first, first + 1, ...`` are the enclosing run's ``prompts`` (a search whose
        prompts come as it runs: :func:`sub_run`)."""
        for i, p in enumerate(prompts):
            self.position.setdefault(p, []).append(first + i)

    def forget(self, prompts: Iterable[int]) -> None:
        """The enclosing run's ``prompts`` are done with: their mappings go."""
        for p in prompts:
            self.position.pop(p, None)

    @property
    def enclosing(self) -> frozenset[int]:
        """The enclosing run's cancelled prompts (by its own indices)."""
        return frozenset() if self.parent is None else self.parent.prompts

    @property
    def prompts(self) -> frozenset[int]:
        return frozenset(i for p in self.enclosing for i in self.position.get(p, ()))


@contextlib.contextmanager
def sub_run(prompts: Sequence[int] = ()):
    """Searches run inside this block are over ``prompts`` (indices into the enclosing run's prompts,
    repeats allowed): their :func:`cancelled` maps the enclosing cancellation to their own indices. Yields the
    mapping: a search whose prompts come as it runs (the server's continuous ``revise``: each round of each
    request is a new group of the decode loop) adds them with its ``map(first, prompts)``, and reads the
    enclosing run's own cancelled prompts as its ``enclosing``."""
    parent = _CURRENT.get()
    sub = _SubRun(parent, prompts)
    quiet = _PROGRESS.set(None)  # a sub-search's events would carry its own indices: nobody listens there
    token = None if parent is None else _CURRENT.set(sub)
    try:
        yield sub
    finally:
        if token is not None:
            _CURRENT.reset(token)
        _PROGRESS.reset(quiet)


def cancelled() -> frozenset[int]:
    """The prompts to drop now (empty outside a :func:`cancellation` block)."""
    c = _CURRENT.get()
    return frozenset() if c is None else c.prompts


@contextlib.contextmanager
def progress(fn: Callable[[str, dict], None]):
    """Searches run inside this block (in this thread) call ``fn(kind, data)`` at their host looks
    (see the module docstring)."""
    token = _PROGRESS.set(fn)
    try:
        yield fn
    finally:
        _PROGRESS.reset(token)


def listening() -> bool:
    """Someone listens to progress here (a driver builds an event only then). A listener with a ``listening``
    attribute says so itself (one installed for a whole server call, listening only while a client streams)."""
    fn = _PROGRESS.get()
    return fn is not None and bool(getattr(fn, "listening", True))


def report(kind: str, data: dict) -> None:
    """Hand an event to the listener (a no-op when nobody listens)."""
    fn = _PROGRESS.get()
    if fn is not None:
        fn(kind, data)
