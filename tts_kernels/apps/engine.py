"""The server's engine: requests that arrive together run as one search call per strategy.

A :class:`Job` is one request's search: its prompts, one seed per prompt, the strategy, the
budget and the :class:`~tts_kernels.search.Settings`. The :class:`Engine` collects jobs for up
to ``max_wait_ms`` after the first arrives (or until ``max_batch`` prompts are waiting),
groups them by (strategy, budget, settings), and runs each group as one
:func:`~tts_kernels.search.run` call on a single worker thread (the models are not
re-entrant), with ``seed=[one per prompt]``: every prompt draws under its own seed
(:mod:`~tts_kernels.search.seeds`), so a request gets the same answer alone or among others.
Strategies that pool their budget over the prompts of a call (``Strategy.pooled``) run each
request alone. While a call runs, new jobs queue and form the next batch, except under continuous batching.

Continuous batching (``continuous=True``, ``serve --batching continuous``, the default). A strategy registered with ``continuous``
(the sampling strategies, ``revise``, the early-stopping ``deepconf``, ``deepconf_offline``,
``adaptive_consistency`` and ``speculative_rejection``, and the step searches ``prm_beam_search``, ``dvts``, ``particle_filtering``,
``entropic_particle_filtering`` and ``rebase``) runs as
:func:`~tts_kernels.search.run_continuous`: while its call runs, a new job with the call's key goes to the call's
waiting list (:class:`_OpenCall`), and the search thread takes it at its next host look (a sampling loop's
regular look, a step search's step boundary) when there is room (``max_batch`` prompts' rows at once, and the
KV pools), so it joins the search under way. Each job is resolved as its own rows end, with its own result and exact compute
(``Outcome.compute``). A job arriving while another job waits for the next call (or for its own call, later in
the batch under way), or while a scoring request (:meth:`Engine.run_exclusive`) waits for the search thread,
waits with it (the open call stops growing, so other strategies and the scoring endpoints are not starved);
a job still waiting when the call ends goes back to
the head of the queue. A call takes no new job once it has taken ``max_call_prompts`` prompts: under steady
load a call would otherwise never end, and the per-prompt state its search keeps (prompt ids, seeds, draw
offsets, counts: a few hundred bytes a prompt, and an index over all of them rebuilt at each admission) would
grow for as long as the server runs. It drains and the next call starts with what waits. A job's own entries
(its prompts' owner, its search state) are dropped as it is answered, so nothing of an answered request
outlives its answer.

A group whose call is refused (``ValueError``/``TypeError``: the drivers check every argument
before any model runs) is retried request by request, so one bad request fails alone. A job
cancelled before its call starts (its client went away, or its time ran out) is dropped; one
cancelled during its call has its prompts' rows dropped at the search's next host look
(:mod:`~tts_kernels.search.cancel`) and its result thrown away.

Streaming. A job with a ``listener`` (a streamed request) hears its search's progress
(:func:`~tts_kernels.search.cancel.progress`, installed for the call when any of its jobs listens): at
each host look the call's hook splits the event by job, so each request gets its own prompts' rows only,
in its own prompt indices. The listener runs on the search thread (the server's hands the event to the
event loop with ``call_soon_threadsafe``).

Compute cap. A job with ``token_cap`` (the server's ``--max-request-tokens``) may spend at most that many
policy and verifier token positions: its share, by prompts, of what its search call has run (the rule
``usage`` reports by), read at each of the search's host looks through the same cancellation (a
:class:`Cancellation` whose ``prompts`` also names the prompts of every job over its cap), so an
over-cap job's rows leave the batch at the next look and it fails with :class:`LimitExceeded`; the
others go on. Checked again on the call's exact compute when it ends (a strategy that never looks is
caught there). The spend is read from the sessions the search opens (:class:`Meter` wraps the models
for the call: transparent, so answers do not change).

Tokenizers. The event loop's threads (request parsing, response building) and the search thread share
the policy's tokenizer; :class:`LockedTokenizer` (installed by :func:`guard_tokenizers`) makes every use
of it hold one lock.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import threading
import time
from dataclasses import dataclass, field

from ..search import STRATEGIES, Compute, SearchResult, Settings, run, run_continuous
from ..search.cancel import Cancellation, cancellation, progress
from ..search.seeds import splitmix64
from ..search.validate import PoolTooSmall

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


class LimitExceeded(RuntimeError):
    """A job spent more than its compute cap (``spent`` token positions against ``cap``)."""

    def __init__(self, spent: int, cap: int, during: bool):
        self.spent, self.cap, self.during = spent, cap, during
        super().__init__(f"the request's search spent {'at least ' if during else ''}{spent} policy and verifier "
                         f"tokens, over this server's limit of {cap} per request (max_request_tokens, "
                         f"--max-request-tokens); it was {'cancelled' if during else 'refused'}")


class LockedTokenizer:
    """A tokenizer whose every use (a call, a method, an attribute read) holds one lock.

    A transformers fast tokenizer is one Rust object: a call that changes its truncation or padding state
    borrows it mutably, and another thread using it at that moment fails ("Already borrowed"). The
    server uses the policy's tokenizer from the threads that parse requests and build responses while
    the search thread decodes with it; wrapped in this, they take turns. Everything else is the
    tokenizer's own (``LockedTokenizer(tok).decode(ids) == tok.decode(ids)``)."""

    def __init__(self, tokenizer, lock=None):
        object.__setattr__(self, "inner", tokenizer)
        object.__setattr__(self, "lock", lock or threading.RLock())

    def __getattr__(self, name):
        with self.lock:
            value = getattr(self.inner, name)
        if callable(value) and not isinstance(value, type):
            lock = self.lock

            @functools.wraps(value)
            def locked(*args, **kwargs):
                with lock:
                    return value(*args, **kwargs)

            return locked
        return value

    def __setattr__(self, name, value):
        with self.lock:
            setattr(self.inner, name, value)

    def __call__(self, *args, **kwargs):
        with self.lock:
            return self.inner(*args, **kwargs)

    def __len__(self):
        with self.lock:
            return len(self.inner)

    def __repr__(self):
        return f"LockedTokenizer({self.inner!r})"


def guard_tokenizers(*models) -> None:
    """Every model's ``tokenizer`` (and a PRM format's, when it is the same object) wrapped in a
    :class:`LockedTokenizer`; models sharing a tokenizer share its lock. Idempotent."""
    wrapped: dict[int, LockedTokenizer] = {}
    for m in models:
        tok = getattr(m, "tokenizer", None)
        if tok is None or isinstance(tok, LockedTokenizer):
            if isinstance(tok, LockedTokenizer):
                wrapped[id(tok.inner)] = tok
            continue
        guard = wrapped.setdefault(id(tok), LockedTokenizer(tok))
        m.tokenizer = guard
        fmt = getattr(m, "format", None)
        if fmt is not None and getattr(fmt, "tokenizer", None) is tok:
            fmt.tokenizer = guard


class Meter:
    """Token positions run by the sessions a search opens, read at any moment (from the search's thread).

    :meth:`wrap` gives a model whose sessions (and their clones) are counted; a verifier's whole-candidate
    :meth:`score_steps` counts its tokens when it returns. The wrappers pass everything else through."""

    def __init__(self):
        self.sessions: list = []
        self.done = 0

    def tokens(self) -> int:
        return self.done + sum(int(s.tokens) for s in self.sessions)

    def wrap(self, model):
        return None if model is None else _Metered(model, self)

    def session(self, session):
        self.sessions.append(session)
        return _MeteredSession(session, self)

    def retire(self, session) -> None:
        """A freed session: its count kept, the session itself let go."""
        for i, s in enumerate(self.sessions):
            if s is session:
                self.done += int(self.sessions.pop(i).tokens)
                return


class _Passthrough:
    def __init__(self, inner, meter):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_meter", meter)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


class _Metered(_Passthrough):
    def start(self, *args, **kwargs):
        return self._meter.session(self._inner.start(*args, **kwargs))

    def score_steps(self, *args, **kwargs):
        out = self._inner.score_steps(*args, **kwargs)
        self._meter.done += int(out.tokens)
        return out


class _MeteredSession(_Passthrough):
    @property
    def rows(self):
        return self._inner.rows

    def clone(self, *args, **kwargs):
        return self._meter.session(self._inner.clone(*args, **kwargs))

    def free(self):
        self._inner.free()
        self._meter.retire(self._inner)


class _CappedCancellation(Cancellation):
    """The call's cancellation, plus the prompts of every job whose share of the spend passed its cap
    (decided when a search looks: :attr:`prompts`)."""

    def __init__(self, meter: Meter, spans: list, total: int):
        super().__init__()
        self.meter, self.spans, self.total = meter, spans, total
        self.over: dict[str, int] = {}  # job id -> its share when it passed its cap
        self._over_prompts: frozenset[int] = frozenset()

    @property
    def prompts(self) -> frozenset[int]:
        spent = None
        for job, a, b in self.spans:
            if job.token_cap and job.id not in self.over:
                spent = self.meter.tokens() if spent is None else spent
                share = spent * (b - a) / self.total
                if share > job.token_cap:
                    self.over[job.id] = int(share)
                    self._over_prompts = self._over_prompts | frozenset(range(a, b))
        return super().prompts | self._over_prompts


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
    token_cap: int | None = None  # policy + verifier token positions its search may spend (its share)
    listener: object = None  # streaming: called on the search thread with (kind, data), its own prompts' indices

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
        return (self.strategy, self.budget, self.settings, self.token_cap)


@dataclass
class Outcome:
    """A job's share of its search call: the call's result restricted to the job's prompts, and the
    whole call's size and compute (what ``usage`` splits by prompts), or the job's own ``compute`` when
    the call counted it per job (a continuous call: then ``batch_prompts`` / ``batch_requests`` are the
    call's prompts and requests when the job ended)."""

    result: SearchResult
    batch_prompts: int
    batch_requests: int
    batch_compute: Compute
    queue_seconds: float
    search_seconds: float
    compute: Compute | None = None  # the job's own compute, when the call counted it per job (continuous batching)


def _slice(res: SearchResult, a: int, b: int) -> SearchResult:
    return dataclasses.replace(res, predictions=res.predictions[a:b], chosen=res.chosen[a:b],
                               candidates=res.candidates[a:b], prompt_info=res.prompt_info[a:b],
                               samples=res.budget * (b - a), info=dict(res.info))


def _progress_hook(owner: dict):
    """The call's progress listener (:func:`~tts_kernels.search.cancel.progress`): each event goes to the
    listener of the job whose prompts it is about, in that job's own prompt indices; a job without a
    listener (or cancelled) gets nothing. ``owner``: prompt index -> (job, its first prompt's index), filled
    as jobs join. Runs on the search thread."""

    def hook(kind: str, data: dict) -> None:
        if kind == "tokens":
            per: dict = {}
            for (p, j), ids in zip(data["rows"], data["ids"]):
                job, a = owner.get(p, (None, 0))  # (none: answered already)
                if job is not None and job.listener is not None and not job.cancelled:
                    got = per.setdefault(job.id, (job, {"rows": [], "ids": []}))[1]
                    got["rows"].append((p - a, j))
                    got["ids"].append(ids)
            for job, got in per.values():
                job.listener(kind, got)
        elif "prompt" in data:
            job, a = owner.get(data["prompt"], (None, 0))
            if job is not None and job.listener is not None and not job.cancelled:
                job.listener(kind, {**data, "prompt": data["prompt"] - a})

    return hook


def _owners(spans: list) -> dict:
    return {p: (job, a) for job, a, b in spans for p in range(a, b)}


class _GroupCap(Cancellation):
    """A continuous call's cancellation, plus the prompts of every job whose own policy tokens so far passed
    its cap (its group counts them exactly: :class:`~tts_kernels.search.decode.SampleGroup`,
    :class:`~tts_kernels.search.step_loop.StepGroup`)."""

    def __init__(self):
        super().__init__()
        self.groups: list = []  # the capped jobs' groups running
        self.over: dict[str, int] = {}  # job id -> its policy tokens when it passed its cap
        self._over_prompts: frozenset[int] = frozenset()

    @property
    def prompts(self) -> frozenset[int]:
        for g in list(self.groups):
            job = g.tag
            if job.id not in self.over and g.forward > job.token_cap:
                self.over[job.id] = g.forward
                self._over_prompts = self._over_prompts | frozenset(range(g.first, g.first + len(g.prompts)))
        return super().prompts | self._over_prompts


class _OpenCall:
    """A continuous search call under way: jobs with its key offered to it wait here until its search
    thread takes them at a look (:meth:`take`). Closed when the search ends; what still waits then goes back
    to the engine's queue."""

    def __init__(self, key):
        self.key = key
        self.lock = threading.Lock()
        self.waiting: collections.deque = collections.deque()
        self.closed = False
        self.prompts = self.requests = 0  # taken so far
        self.policy_tokens = self.verifier_tokens = 0  # spent by the jobs resolved so far

    def offer(self, job: Job) -> bool:
        with self.lock:
            if self.closed:
                return False
            self.waiting.append(job)
            return True

    def take(self, fit, room: int, refuse) -> list:
        """The waiting jobs, in order, that fit (``fit(prompts, seeds, job)``: their group, or ``None``), of at
        most ``room`` prompts in all. A job that could never fit (``fit`` raised
        :class:`~tts_kernels.search.validate.PoolTooSmall`) leaves the queue: ``refuse(job, error)``."""
        out = []
        with self.lock:
            while self.waiting and not self.closed:
                job = self.waiting[0]
                if job.cancelled or job.future.done():
                    self.waiting.popleft()
                    continue
                if len(job.prompts) > room:
                    break
                try:
                    g = fit(job.prompts, job.seeds, job)
                except PoolTooSmall as exc:
                    self.waiting.popleft()
                    refuse(job, exc)
                    continue
                if g is None:
                    break
                self.waiting.popleft()
                out.append(g)
                room -= len(job.prompts)
        return out

    def close(self) -> list[Job]:
        with self.lock:
            self.closed = True
            rest = list(self.waiting)
            self.waiting.clear()
        return rest


class Engine:
    """Batches jobs into search calls on one worker thread (see the module docstring).

    ``continuous`` (default): a job whose strategy takes requests while it runs
    (:func:`~tts_kernels.search.run_continuous`) joins the call of its key under way at the call's next look,
    until the call has taken ``max_call_prompts`` prompts; ``False``: whole-request batching only (a job waits
    for the call under way to end)."""

    def __init__(self, policy, verifier, *, max_batch: int = 32, max_wait_ms: float = 10.0, metrics=None,
                 continuous: bool = True, max_call_prompts: int = 4096):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_call_prompts < 1:
            raise ValueError(f"max_call_prompts must be >= 1, got {max_call_prompts}")
        self.max_call_prompts = max_call_prompts
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.policy, self.verifier = policy, verifier
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.metrics = metrics
        self.continuous = bool(continuous)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tts-search")
        self._queue: asyncio.Queue | None = None
        self._pending: list[Job] = []  # jobs for the next call
        self._arrived: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._open: _OpenCall | None = None  # the continuous call under way
        self._exclusive = 0  # run_exclusive calls waiting for the search thread
        self._later: list[Job] = []  # the jobs of the batch under way whose calls come after the running one
        self._closing = False
        self.running = 0  # jobs in the search call under way

    @property
    def queued(self) -> int:
        waiting = 0 if self._open is None else len(self._open.waiting)
        return (0 if self._queue is None else self._queue.qsize()) + len(self._pending) + waiting + len(self._later)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._arrived = asyncio.Event()
        self._tasks = [asyncio.create_task(self._intake()), asyncio.create_task(self._runner())]

    async def stop(self) -> None:
        """Refuse new jobs, let the call under way finish (a continuous call takes no new jobs), cancel the
        jobs still queued."""
        self._closing = True
        rest = [] if self._open is None else self._open.close()
        for task in self._tasks:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            rest.append(self._queue.get_nowait())
        for job in rest + self._pending:
            if job.future is not None and not job.future.done():
                job.future.set_exception(Unavailable("the server is shutting down; the request was not run"))
        self._pending = []
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

    async def run_exclusive(self, fn, *args):
        """``fn(*args)`` on the search thread, between search calls (the models are not re-entrant): what the
        scoring endpoints run. Raises :class:`Unavailable` while shutting down."""
        if self._closing or self._queue is None:
            raise Unavailable("the server is shutting down")
        # Until it has run, the continuous call under way takes no new job (it would otherwise hold the search
        # thread for as long as compatible jobs keep coming): it drains, and this runs before the next call.
        self._exclusive += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))
        finally:
            self._exclusive -= 1

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_length.set(self.queued)

    def _joinable(self, job: Job) -> bool:
        """Whether ``job`` runs in a continuous call: its strategy takes requests while it runs, and the policy
        can prefill new prompts into a running session (``HFPolicy`` on the paged cache; not a text-level engine
        such as the vLLM backend, nor the dense fallback, whose calls batch whole requests)."""
        return (self.continuous and STRATEGIES[job.strategy].continuous is not None and job.key[0] != "pooled"
                and getattr(self.policy, "paged", False) is True)

    async def _intake(self) -> None:
        """Every arriving job: into the continuous call under way when it has the call's key (and no other job
        waits for the next call, nor a scoring request for the search thread: they would otherwise wait as long
        as compatible jobs keep coming), else into the next call's batch."""
        while True:
            job = await self._queue.get()
            call = self._open
            if (call is not None and not self._pending and not self._later and not self._exclusive
                    and job.key == call.key and call.offer(job)):
                self._gauge()
                continue
            self._pending.append(job)
            self._arrived.set()

    async def _runner(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.max_wait
            while sum(len(j.prompts) for j in self._pending) < self.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch, self._pending = self._pending, []
            self._gauge()
            groups: dict = {}
            for job in batch:
                if not job.cancelled and not job.future.done():
                    groups.setdefault(job.key, []).append(job)
            calls = list(groups.values())
            for k, jobs in enumerate(calls):
                self._later = [j for later in calls[k + 1:] for j in later]  # (a continuous call stops growing)
                if self._joinable(jobs[0]):  # one continuous call takes them all, up to max_batch prompts at once
                    await self._guarded(jobs)
                    continue
                # At most max_batch prompts per call (a single larger request runs alone).
                part: list[Job] = []
                for job in jobs:
                    if part and sum(len(j.prompts) for j in part) + len(job.prompts) > self.max_batch:
                        await self._guarded(part)
                        part = []
                    part.append(job)
                await self._guarded(part)
            self._later = []

    async def _guarded(self, jobs: list[Job]) -> None:
        # Whatever goes wrong in one call (a bug included) fails its requests, never the loop.
        try:
            if self._joinable(jobs[0]):
                await self._call_continuous(jobs)
            else:
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
        policy = self.policy
        spans, a = [], 0
        for job in jobs:
            spans.append((job, a, a + len(job.prompts)))
            a += len(job.prompts)
        if any(job.token_cap for job in jobs):  # the spend is read at every host look
            meter = Meter()
            policy, verifier = meter.wrap(policy), meter.wrap(verifier)
            stop = _CappedCancellation(meter, spans, len(prompts))
        else:
            stop = Cancellation()
        for job, a, b in spans:  # a job cancelled from now on has its prompts' rows dropped at the search's next look
            job.on_cancel = functools.partial(stop.cancel, range(a, b))

        hook = _progress_hook(_owners(spans)) if any(job.listener is not None for job in jobs) else None

        def call():
            with cancellation(stop), (progress(hook) if hook is not None else contextlib.nullcontext()):
                return run(head.strategy, policy, verifier, prompts, budget=head.budget, settings=head.settings,
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
                             "over_cap": sorted(getattr(stop, "over", {})),
                             "policy_tokens": res.compute.policy_prefill_tokens + res.compute.policy_generated_tokens,
                             "verifier_tokens": res.compute.prm_tokens}))
        spent = res.compute.policy_tokens + res.compute.prm_tokens
        over = getattr(stop, "over", {})
        for job, a, b in spans:
            if job.future.done():
                continue
            share = spent * (b - a) / len(prompts)  # what its usage reports
            if job.id in over or (job.token_cap and share > job.token_cap):
                job.future.set_exception(LimitExceeded(over.get(job.id, int(share)), job.token_cap,
                                                       during=job.id in over))
                continue
            job.future.set_result(Outcome(_slice(res, a, b), len(prompts), len(jobs), res.compute,
                                          started - job.enqueued, seconds))

    async def _call_continuous(self, jobs: list[Job]) -> None:
        """One continuous call (:func:`~tts_kernels.search.run_continuous`): ``jobs`` and every job of their key
        offered while it runs (:meth:`_intake`), at most ``max_batch`` prompts' rows at once; each job is
        resolved as its rows end, with its own result and compute."""
        jobs = [j for j in jobs if not j.cancelled and not j.future.done()]
        if not jobs:
            return
        head = jobs[0]
        loop = asyncio.get_running_loop()
        call = _OpenCall(head.key)
        for job in jobs[1:]:  # they join at the call's first look (or wait for room)
            call.offer(job)
        self._open = call
        verifier = self.verifier if STRATEGIES[head.strategy].needs_verifier else None
        stop = _GroupCap() if head.token_cap else Cancellation()
        owner: dict = {}
        hook = _ListeningHook(owner)
        started_at: dict[str, float] = {}
        taken: dict[str, Job] = {head.id: head}  # the jobs the search took, not answered yet (a failure fails them)

        def started(g) -> None:  # search thread
            job = g.tag
            a, b = g.first, g.first + len(g.prompts)
            for p in range(a, b):
                owner[p] = (job, a)
            hook.listeners += job.listener is not None
            job.on_cancel = functools.partial(stop.cancel, range(a, b))
            if job.cancelled:
                stop.cancel(range(a, b))
            if job.token_cap:
                stop.groups.append(g)
            call.prompts += b - a
            call.requests += 1
            loop.call_soon_threadsafe(self._joined)  # (the gauge changes on the event loop only)
            started_at[job.id] = time.perf_counter()

        def deliver(g, res) -> None:  # search thread
            job = g.tag
            for p in range(g.first, g.first + len(g.prompts)):  # (its progress events have all been sent)
                owner.pop(p, None)
            taken.pop(job.id, None)
            job.on_cancel = None
            hook.listeners -= job.listener is not None
            capped = getattr(stop, "groups", None)
            if capped is not None and g in capped:
                capped.remove(g)
            loop.call_soon_threadsafe(self._resolve, g, res, call, stop, started_at.pop(job.id), time.perf_counter())

        def refuse(job: Job, exc: PoolTooSmall) -> None:  # search thread
            loop.call_soon_threadsafe(self._refuse, job, exc)

        def join(fit) -> list:  # search thread
            groups = [] if self._closing else call.take(fit, self.max_call_prompts - call.prompts, refuse)
            taken.update((g.tag.id, g.tag) for g in groups)
            return groups

        def work():
            with cancellation(stop), progress(hook):
                run_continuous(head.strategy, self.policy, verifier, head.prompts, head.seeds, budget=head.budget,
                               settings=head.settings, tag=head, join=join, deliver=deliver, started=started,
                               capacity=self.max_batch)

        t0 = time.perf_counter()
        try:
            await loop.run_in_executor(self._pool, work)
            failure = None
        except Exception as exc:  # noqa: BLE001 - its requests get the error; the server goes on
            failure = exc
        finally:
            rest = call.close()  # what still waits goes back to the next call's batch, first in line
            self._open = None
            self._pending[:0] = rest
            if rest:
                self._arrived.set()
        await asyncio.sleep(0)  # the results the search thread handed over are set before the call is judged
        if failure is not None:
            # refused before any started (a first request whose worst case is more than a fixed pool holds
            # included: the loops check it before its rows start)
            bad = isinstance(failure, (ValueError, TypeError)) and not call.requests
            if not bad:
                log.error("continuous search call failed", exc_info=failure)
            for job in taken.values():
                if not job.future.done():
                    job.future.set_exception(BadRequest(str(failure)) if bad else failure)
            self.running = 0
        if self.metrics is not None:
            self.metrics.call(head.strategy, call.requests, call.prompts, time.perf_counter() - t0)
        log.info(json.dumps({"event": "search", "strategy": head.strategy, "budget": head.budget, "continuous": True,
                             "requests": call.requests, "prompts": call.prompts,
                             "seconds": round(time.perf_counter() - t0, 4), "cancelled_prompts": len(stop.prompts),
                             "over_cap": sorted(getattr(stop, "over", {})), "policy_tokens": call.policy_tokens,
                             "verifier_tokens": call.verifier_tokens}))

    def _joined(self) -> None:
        self.running += 1

    @staticmethod
    def _refuse(job: Job, exc: Exception) -> None:
        if not job.future.done():
            job.future.set_exception(BadRequest(str(exc)))

    def _resolve(self, g, res, call: _OpenCall, stop, started: float, ended: float) -> None:
        """A continuous call's job, done (event loop thread): its result, its limit, or its failure."""
        job = g.tag
        self.running = max(0, self.running - 1)
        if not isinstance(res, Exception):
            call.policy_tokens += res.compute.policy_prefill_tokens + res.compute.policy_generated_tokens
            call.verifier_tokens += res.compute.prm_tokens
            if self.metrics is not None:
                self.metrics.spent(res.compute)
        if job.future.done():
            return
        if isinstance(res, Exception):
            job.future.set_exception(BadRequest(str(res)) if isinstance(res, (ValueError, TypeError)) else res)
            return
        spent = res.compute.policy_tokens + res.compute.prm_tokens
        over = getattr(stop, "over", {})
        if job.id in over or (job.token_cap and spent > job.token_cap):
            job.future.set_exception(LimitExceeded(over.get(job.id, spent), job.token_cap, during=job.id in over))
            return
        job.future.set_result(Outcome(res, call.prompts, call.requests, res.compute, started - job.enqueued,
                                      ended - started, compute=res.compute))


class _ListeningHook:
    """A continuous call's progress listener: :func:`_progress_hook` over the jobs that have joined, listening
    (:func:`~tts_kernels.search.cancel.listening`) only while one of them streams, so the search builds no
    events for a call nobody streams."""

    def __init__(self, owner: dict):
        self.fn = _progress_hook(owner)
        self.listeners = 0

    @property
    def listening(self) -> bool:
        return self.listeners > 0

    def __call__(self, kind: str, data: dict) -> None:
        self.fn(kind, data)
