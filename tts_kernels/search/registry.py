"""The strategy registry: :data:`STRATEGIES`, :class:`Strategy` and :func:`register_strategy`.

Its own small module, below every driver, so a search that runs *other* registered strategies
(``compute_optimal`` runs each prompt's chosen one) can look them up without importing
:mod:`~tts_kernels.search.strategies`, which registers the built-ins and imports those drivers
(a cycle). :mod:`~tts_kernels.search.strategies` re-exports these names and holds :func:`run`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..ops._validate import check_int
from .result import SELECT_RULES, SearchResult

__all__ = ["STRATEGIES", "Strategy", "StrategyFn", "GroupFn", "register_strategy", "lookup", "check_strategy"]

StrategyFn = Callable[..., SearchResult]
# fn(policy, verifier, prompts, *, budget, settings, seed, extract) -> SearchResult
GroupFn = Callable[..., dict]
# group(names, policy, verifier, prompts, *, budget, settings, seed, extract) -> {name: SearchResult}


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: its function, whether it needs a verifier, (optionally) a group
    function that runs several strategies of one family on shared work (:func:`run_together`), and
    whether it pools its budget over the prompts of a call (``pooled``: a prompt's result then
    depends on the other prompts, so the server runs each request of it alone). ``select``: the
    rule (``"best"``, ``"majority"``, ``"weighted"``) by which it picks a prompt's answer from its
    candidates, when it is one of :func:`~tts_kernels.search.select_candidates`' rules (``None``:
    it picks otherwise); ``compute_optimal`` applies it to the pilot's and the search's candidates
    together. ``token_loop``: it needs this package's token-by-token decode loop (per-token statistics,
    rows stopped mid-completion), so a text-level engine (the vLLM backend) is refused. ``continuous``: it
    takes new requests while it runs (:func:`~tts_kernels.search.strategies.run_continuous`; the server's
    continuous batching), with this function:
    ``continuous(policy, verifier, prompts, seeds, *, tag, budget, settings, extract, join, deliver, started,
    capacity)`` (see :func:`~tts_kernels.search.best_of_n.serve_sampling`)."""

    name: str
    fn: StrategyFn
    needs_verifier: bool = True
    description: str = ""
    group: GroupFn | None = None
    pooled: bool = False
    select: str | None = None
    token_loop: bool = False
    continuous: Callable[..., None] | None = None


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str, fn: StrategyFn, *, needs_verifier: bool = True, description: str = "",
                      group: GroupFn | None = None, pooled: bool = False, select: str | None = None,
                      token_loop: bool = False, continuous: Callable[..., None] | None = None,
                      replace: bool = False) -> Strategy:
    """Register ``fn`` as strategy ``name``: ``fn(policy, verifier, prompts, *, budget, settings, seed,
    extract) -> SearchResult`` (``prompts`` a checked list, ``settings`` a :class:`Settings`).

    ``needs_verifier``: :func:`run` refuses ``verifier=None`` for it. ``group``: strategies sharing
    one ``group`` function run together in :func:`run_together`. ``pooled``: the budget is spent
    across the prompts of a call (their results depend on each other). ``select``: the rule it picks
    its answer by, if it is one of ``"best"``, ``"majority"``, ``"weighted"``. ``token_loop``: it runs
    only on a backend that decodes token by token (not the vLLM backend). ``continuous``: how it runs with
    requests joining (:class:`Strategy`). Registering a taken
    name is an error unless ``replace=True``. Returns the :class:`Strategy`.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be an identifier-like string (letters, digits, _), got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if select is not None and select not in SELECT_RULES:
        raise ValueError(f"select must be None or one of {SELECT_RULES}, got {select!r}")
    if name in STRATEGIES and not replace:
        raise ValueError(f"strategy {name!r} is already registered (pass replace=True to replace it)")
    entry = Strategy(name, fn, bool(needs_verifier), description, group, bool(pooled), select, bool(token_loop),
                     continuous)
    STRATEGIES[name] = entry
    return entry


def lookup(name, what: str = "strategy") -> Strategy:
    """The registered strategy ``name``, or a ``ValueError`` naming it (``what``: the argument it came from)."""
    entry = STRATEGIES.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"{what} {name!r} is not a registered strategy (registered: {sorted(STRATEGIES)})")
    return entry


def check_strategy(strategy: str, verifier, budget) -> Strategy:
    """What :func:`run` checks before a strategy runs: the name, the budget, the verifier it needs."""
    entry = STRATEGIES.get(strategy) if isinstance(strategy, str) else None
    if entry is None:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    check_int("budget", budget, minimum=1)
    if entry.needs_verifier and verifier is None:
        raise ValueError(f"strategy {strategy!r} needs a verifier (got verifier=None)")
    return entry
