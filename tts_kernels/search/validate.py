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


class PoolTooSmall(ValueError):
    """A group of prompts whose worst case needs more KV blocks than the pool it would run in holds in all: a
    continuous loop refuses it (it could never be admitted, and run first it would exhaust the pool part way)."""

    def __init__(self, need: int, have: int, pool: str):
        self.need, self.have, self.pool = need, have, pool
        super().__init__(f"the request needs up to {need} KV blocks in the {pool}'s pool, which holds {have} in all "
                         f"(num_blocks; `tts-kernels serve --kv-blocks`): it cannot run there")


def fixed_pool(model) -> tuple[int, int] | None:
    """``(num_blocks, block_size)`` when every session of ``model`` gets a KV pool of that size (its
    ``num_blocks`` was given), else ``None`` (each session sizes its own pool for its first prompts and rows)."""
    blocks, size = getattr(model, "num_blocks", None), getattr(model, "block_size", None)
    return (blocks, size) if isinstance(blocks, int) and isinstance(size, int) else None


def check_pool(need: int, model, pool: str) -> None:
    """Raise :class:`PoolTooSmall` when ``need`` worst-case blocks exceed ``model``'s fixed pool (:func:`fixed_pool`;
    ``pool``: whose, for the message). A pool sized per session is not checked: a group that does not fit a running
    loop's waits until the loop ends, and its own session is sized for it."""
    fixed = fixed_pool(model)
    if fixed is not None and need > fixed[0]:
        raise PoolTooSmall(need, fixed[0], pool)


def check_pools(need: tuple[int, int], policy, verifier) -> None:
    """:func:`check_pool` for a group's worst case ``need`` (the policy's blocks, the verifier's) in the policy's
    pool and, with a ``verifier``, the verifier's."""
    check_pool(need[0], policy, "policy")
    if verifier is not None:
        check_pool(need[1], verifier, "verifier")
