"""The server's engine: requests that arrive together run as one search call per strategy.

A :class:`Job` is one request's search: its prompts, one seed per prompt, the strategy, the
budget and the :class:`~tts_kernels.search.Settings`. The :class:`Engine` collects jobs for up
to ``max_wait_ms`` after the first arrives (or until ``max_batch`` prompts are waiting),
groups them by (strategy, budget, settings), and runs each group as one
:func:`~tts_kernels.search.run` call on a single worker thread (the models are not
re-entrant), with ``seed=[one per prompt]``: every prompt draws under its own seed
(:mod:`~tts_kernels.search.seeds`), so a request gets the same answer alone or among others.
Strategies that pool their budget over the prompts of a call (``Strategy.pooled``) run each
request alone. While a call runs, new jobs queue and form the next batch.

A group whose call is refused (``ValueError``/``TypeError``: the drivers check every argument
before any model runs) is retried request by request, so one bad request fails alone. A job
cancelled before its call starts (its client went away, or its time ran out) is dropped; one
cancelled during its call has its prompts' rows dropped at the search's next host look
(:mod:`~tts_kernels.search.cancel`) and its result thrown away.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass, field

from ..search import STRATEGIES, Compute, SearchResult, Settings, run
from ..search.cancel import Cancellation, cancellation
from ..search.seeds import splitmix64

log = logging.getLogger("tts_kernels.serve")

def request_seeds(seed: int, prompts: int) -> list[int]:
    """The per-prompt seeds of a request with ``seed`` over ``prompts`` prompts (splitmix64 of the
    seed and the prompt's index in the request; signed 64-bit). What the server passes to
    :func:`~tts_kernels.search.run`; a client reproduces a served answer offline with it."""
    out = [splitmix64(seed * 0x9E3779B97F4A7C15 + i + 1) for i in range(prompts)]
    return [z - 2**64 if z >= 2**63 else z for z in out]


class BadRequest(ValueError):
    """A request the search refused (its message names the argument)."""


class Unavailable(RuntimeError):
    """The server is shutting down."""


@dataclass
class Job:
    """One request's search."""

    id: str
    prompts: list[str]
    seeds: list[int]
    strategy: str
    budget: int
    settings: Settings
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    future: asyncio.Future | None = None
    on_cancel: object = None  # set while its search call runs: drops its prompts' rows there

    def cancel(self) -> None:
        """Nobody waits for this job any more: dropped if not started, its rows dropped if running."""
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()

    @property
    def key(self):
        """Jobs with equal keys share one search call (a pooled strategy's job shares with none)."""
        if STRATEGIES[self.strategy].pooled:
            return ("pooled", self.id)
        return (self.strategy, self.budget, self.settings)


@dataclass
class Outcome:
    """A job's share of its search call: the call's result restricted to the job's prompts, and the
    whole call's size and compute (what ``usage`` splits by prompts)."""

    result: SearchResult
    batch_prompts: int
    batch_requests: int
    batch_compute: Compute
    queue_seconds: float
    search_seconds: float


def _slice(res: SearchResult, a: int, b: int) -> SearchResult:
    return dataclasses.replace(res, predictions=res.predictions[a:b], chosen=res.chosen[a:b],
                               candidates=res.candidates[a:b], prompt_info=res.prompt_info[a:b],
                               samples=res.budget * (b - a), info=dict(res.info))


class Engine:
    """Batches jobs into search calls on one worker thread (see the module docstring)."""

    def __init__(self, policy, verifier, *, max_batch: int = 32, max_wait_ms: float = 10.0, metrics=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.policy, self.verifier = policy, verifier
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.metrics = metrics
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tts-search")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self.running = 0  # jobs in the search call under way

    @property
    def queued(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Refuse new jobs, let the call under way finish, cancel the jobs still queued."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if job.future is not None and not job.future.done():
                job.future.set_exception(Unavailable("the server is shutting down; the request was not run"))
        self._pool.shutdown(wait=True)

    async def submit(self, job: Job) -> Outcome:
        """Queue ``job`` and wait for its outcome (cancel the awaiting task to give it up)."""
        if self._closing or self._queue is None:
            raise Unavailable("the server is shutting down")
        job.future = asyncio.get_running_loop().create_future()
        await self._queue.put(job)
        self._gauge()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancel()
            raise

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_length.set(self.queued)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while sum(len(j.prompts) for j in batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            self._gauge()
            groups: dict = {}
            for job in batch:
                if not job.cancelled and not job.future.done():
                    groups.setdefault(job.key, []).append(job)
            for jobs in groups.values():
                # At most max_batch prompts per call (a single larger request runs alone).
                part: list[Job] = []
                for job in jobs:
                    if part and sum(len(j.prompts) for j in part) + len(job.prompts) > self.max_batch:
                        await self._guarded(part)
                        part = []
                    part.append(job)
                await self._guarded(part)

    async def _guarded(self, jobs: list[Job]) -> None:
        # Whatever goes wrong in one call (a bug included) fails its requests, never the loop.
        try:
            await self._call(jobs)
        except Exception as exc:  # noqa: BLE001
            log.exception("search call failed")
            for job in jobs:
                if job.future is not None and not job.future.done():
                    job.future.set_exception(exc)

    async def _call(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.cancelled and not j.future.done()]
        if not jobs:
            return
        head = jobs[0]
        prompts = [p for j in jobs for p in j.prompts]
        seeds = [s for j in jobs for s in j.seeds]
        verifier = self.verifier if STRATEGIES[head.strategy].needs_verifier else None
        stop = Cancellation()
        a = 0
        for job in jobs:  # a job cancelled from now on has its prompts' rows dropped at the search's next look
            job.on_cancel = functools.partial(stop.cancel, range(a, a + len(job.prompts)))
            a += len(job.prompts)

        def call():
            with cancellation(stop):
                return run(head.strategy, self.policy, verifier, prompts, budget=head.budget, settings=head.settings,
                           seed=seeds)

        started = time.perf_counter()
        self.running = len(jobs)
        try:
            res = await asyncio.get_running_loop().run_in_executor(self._pool, call)
        except (ValueError, TypeError) as exc:
            res = exc
        except Exception as exc:  # noqa: BLE001 - the requests get a 500 naming it; the server goes on
            log.exception("search call failed")
            res = exc
        finally:
            self.running = 0
            for job in jobs:
                job.on_cancel = None
        if isinstance(res, (ValueError, TypeError)):
            if len(jobs) > 1:  # one request's bad argument (checked before any model runs): find it, run the others
                for job in jobs:
                    await self._call([job])
            elif not head.future.done():
                head.future.set_exception(BadRequest(str(res)))
            return
        if isinstance(res, Exception):
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(res)
            return
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.batch(head.strategy, len(jobs), len(prompts), res.compute, seconds)
        log.info(json.dumps({"event": "search", "strategy": head.strategy, "budget": head.budget,
                             "requests": len(jobs), "prompts": len(prompts), "seconds": round(seconds, 4),
                             "cancelled_prompts": len(stop.prompts),
                             "policy_tokens": res.compute.policy_prefill_tokens + res.compute.policy_generated_tokens,
                             "verifier_tokens": res.compute.prm_tokens}))
        a = 0
        for job in jobs:
            b = a + len(job.prompts)
            if not job.future.done():
                job.future.set_result(Outcome(_slice(res, a, b), len(prompts), len(jobs), res.compute,
                                              started - job.enqueued, seconds))
            a = b
