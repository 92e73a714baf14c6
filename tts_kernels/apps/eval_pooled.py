"""Strategies that pool their budget, spent over a whole ``tts-kernels eval`` run, resumably.

A pooled strategy (``Strategy.pooled``: ``compute_optimal``, ``adaptive_best_of_n``) spends
``budget * P`` samples over the ``P`` prompts it is given. Run per chunk, it would allocate within
each chunk of ``--chunk-size`` problems; one whose registered function is a
:class:`~tts_kernels.search.compute_optimal.OptimalStrategy` (its moves callable apart) is run
*run-wide* instead, in three steps that keep eval's guarantees (a 1-rank run, an N-rank run and a
killed-and-resumed one give the same records):

1. **Pilots** (stage ``"pilot"`` of the part files, :mod:`~tts_kernels.apps.eval_parts`): chunk by
   chunk, dealt over the ranks, resumable like any chunk. One pilot record per (problem, strategy,
   budget): the pilot's size, its candidates' answers and scores, its pick, its features
   (:func:`~tts_kernels.search.compute_optimal.pilot_features`) and the chunk's pilot compute. Strategies
   and budgets with the same pilot size share one pilot run (same samples: the draws depend on the
   problem's seed only), each record carrying the whole pilot's compute (the strategy spent it).
2. **One allocation per (strategy, budget)** over every problem of the run, computed from the pilot
   records read back from the part files (never from memory), in dataset order: a pure function of
   the records, so every rank and every resumed run computes the same one. Rank 0 computes it and
   hands it to the others. (``--pooled-allocation chunk``: one per chunk instead, from the same pilots,
   so the two differ in the allocation's scope alone.)
3. **Searches** (stage ``"final"``, with the other strategies' work of the chunk): each problem runs its
   allocated strategy and samples; its candidates are its pilot's (from its record) followed by its
   search's, and its record's compute is the chunk's pilot compute plus its searches'.

Seeds: problem ``i`` draws under :func:`problem_seed` ``(S, i)`` (per-prompt seeds: a problem's pilot
and search do not depend on which chunk mates or rank it has), the search under that seed plus one.
The table: a fitted :class:`~tts_kernels.search.compute_optimal.OptimalTable` (``--optimal-table``),
whose bytes' sha256 is part of the run's config, as is how each pooled strategy allocates.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time

import torch

from ..search import STRATEGIES, Compute, SearchResult
from ..search.answers import vote_key
from ..search.compute_optimal import Allocation, OptimalStrategy, pilot_features
from ..search.result import Candidate
from .eval_parts import PILOT

__all__ = ["run_wide", "problem_seed", "pilot_chunk", "plan", "search_chunk"]


def run_wide(strategies) -> list[str]:
    """The strategies of ``strategies`` whose budget eval spends over the whole run."""
    return [s for s in strategies if STRATEGIES[s].pooled and isinstance(STRATEGIES[s].fn, OptimalStrategy)]


def problem_seed(seed: int, index: int) -> int:
    """The sampling seed of problem ``index`` (its place in the dataset) for the run-wide strategies of a
    run with ``--seed seed``."""
    return int.from_bytes(hashlib.sha256(f"tts-eval/{seed}/problem/{index}".encode()).digest()[:4],
                          "little") & 0x7FFFFFFF


def _score(s):
    return None if s is None or s != s else float(s)


def _compute(cc: dict) -> Compute:
    return Compute(**{f.name: cc[f.name] for f in dataclasses.fields(Compute) if f.name in cc})


def pilot_chunk(c: int, probs, strategies, budgets, policy, prm, settings, seed: int, table):
    """The pilot records (stage ``"pilot"``) of chunk ``c`` for the run-wide ``strategies``, and its commit line."""
    prompts = [p.prompt for p in probs]
    seeds = [problem_seed(seed, p.index) for p in probs]
    key = vote_key(settings.vote_key)
    P, records, seconds, pilots = len(probs), [], {}, {}
    got = {}
    for b in budgets:
        t0 = time.perf_counter()
        for s in strategies:
            fn = STRATEGIES[s].fn
            n = fn.pilot_n(b, table, settings)
            if n not in pilots:  # same size, same draws: one pilot run
                pilots[n] = fn.pilot(policy, prm, prompts, budget=b, table=table, settings=settings, seed=seeds)
            got[(s, b)] = (n, pilots[n])
        seconds[str(b)] = round(time.perf_counter() - t0, 4)
    for i, p in enumerate(probs):
        for s in strategies:
            for b in budgets:
                n, res = got[(s, b)]
                comp = dataclasses.asdict(res.compute)
                feats = pilot_features([res.candidates[i]], key)[0].tolist()
                records.append({"stage": PILOT, "id": p.id, "index": p.index, "chunk": c, "strategy": s, "budget": b,
                                "pilot_n": n, "prediction": res.predictions[i],
                                "answers": [x.answer for x in res.candidates[i]],
                                "scores": [_score(x.score) for x in res.candidates[i]], "features": feats,
                                "chunk_compute": {**comp, "samples": res.samples, "problems": P}})
    return records, {"chunk_done": c, "stage": PILOT, "problems": P, "records": len(records), "seconds": seconds}


def plan(pilot_units: dict, n_chunks: int, strategies, budgets, settings, table, scope: str = "run") -> dict:
    """From every chunk's pilot records (``{chunk: records}``, as :func:`~tts_kernels.apps.eval_parts.scan`
    read them): ``{"pilots": {(strategy, budget): {chunk: records}}, "alloc": {(strategy, budget):
    Allocation over every problem, in dataset order}}``. ``scope``: ``"run"``, one allocation over every
    problem; ``"chunk"``, one per chunk over its problems (the same pilots and seeds: what allocating over
    the whole run changes, alone)."""
    pilots: dict = {(s, b): {} for s in strategies for b in budgets}
    for c in range(n_chunks):
        for rec in pilot_units[c]:
            pilots[(rec["strategy"], rec["budget"])].setdefault(c, []).append(rec)
    alloc = {}
    for (s, b), by_chunk in pilots.items():
        groups = [[r for c in range(n_chunks) for r in by_chunk[c]]] if scope == "run" else \
            [by_chunk[c] for c in range(n_chunks)]
        parts = []
        for recs in groups:
            recs = sorted(recs, key=lambda r: r["index"])
            features = torch.tensor([r["features"] for r in recs], dtype=torch.float64).reshape(len(recs), 3)
            parts.append(STRATEGIES[s].fn.allocate(features, budget=b, table=table, settings=settings))
        alloc[(s, b)] = Allocation(b, parts[0].pilot_n, *([x for a in parts for x in getattr(a, k)]
                                                          for k in ("p", "level", "strategy", "beam_width", "n")))
    return {"pilots": pilots, "alloc": alloc}


def _pilot_result(recs: list[dict], budget: int) -> SearchResult:
    """The chunk's pilot as a :class:`SearchResult`, from its records (in the chunk's problem order)."""
    cc = recs[0]["chunk_compute"]
    cands = [[Candidate("", a, float("nan") if sc is None else sc) for a, sc in zip(r["answers"], r["scores"])]
             for r in recs]
    return SearchResult(strategy="pilot", budget=budget, predictions=[r["prediction"] for r in recs],
                        chosen=[None] * len(recs), candidates=cands, compute=_compute(cc), samples=cc["samples"])


def search_chunk(probs, strategy: str, budget: int, policy, prm, settings, seed: int, planned: dict, c: int
                 ) -> SearchResult:
    """Step 3 for chunk ``c`` (problems ``probs``): the run-wide ``strategy``'s searches at ``budget``."""
    recs = planned["pilots"][(strategy, budget)][c]
    by_index = {r["index"]: r for r in recs}
    recs = [by_index[p.index] for p in probs]
    alloc = planned["alloc"][(strategy, budget)].take([p.index for p in probs])
    return STRATEGIES[strategy].fn.search(policy, prm, [p.prompt for p in probs], _pilot_result(recs, budget), alloc,
                                         settings=settings, seed=[problem_seed(seed, p.index) for p in probs])
