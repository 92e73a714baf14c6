"""The server's Prometheus metrics (``GET /metrics``), on a registry of its own.

* ``tts_requests_total{strategy, status}``: requests answered (status ``200``, an error status, or
  ``cancelled`` when the client went away);
* ``tts_queue_length``: requests waiting for a search call; ``tts_running_requests``: in the call
  under way;
* ``tts_batch_requests`` / ``tts_batch_prompts``: histograms of requests and prompts per search call;
* ``tts_tokens_total{kind}``: ``prompt`` (policy prefill), ``generated`` (policy) and ``verifier``
  tokens run, exact, from each call's :class:`~tts_kernels.search.Compute`;
  ``tts_flops_total{model}``: the FLOP estimate of the policy and the verifier;
* ``tts_kv_blocks_in_use``: KV blocks held by the models' open sessions (0 when idle: a leak shows);
* ``tts_request_seconds`` and ``tts_search_seconds{strategy}``: latency histograms.
"""
from __future__ import annotations

_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, policy, verifier):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.ledgers = [m.kv_ledger for m in (policy, verifier) if m is not None and hasattr(m, "kv_ledger")]
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tts_requests", "requests answered, by strategy and status", ["strategy", "status"],
                                registry=r)
        self.queue_length = Gauge("tts_queue_length", "requests waiting for a search call", registry=r)
        self.running = Gauge("tts_running_requests", "requests in the search call under way", registry=r)
        self.batch_requests = Histogram("tts_batch_requests", "requests per search call", buckets=_BUCKETS,
                                        registry=r)
        self.batch_prompts = Histogram("tts_batch_prompts", "prompts per search call", buckets=_BUCKETS, registry=r)
        self.tokens = Counter("tts_tokens", "tokens run through the models, by kind", ["kind"], registry=r)
        self.flops = Counter("tts_flops", "FLOP estimate of the searches, by model", ["model"], registry=r)
        kv = Gauge("tts_kv_blocks_in_use", "KV blocks held by the models' open sessions", registry=r)
        kv.set_function(self.kv_blocks)
        self.request_seconds = Histogram("tts_request_seconds", "request latency (arrival to answer)",
                                         buckets=_SECONDS, registry=r)
        self.search_seconds = Histogram("tts_search_seconds", "search call duration", ["strategy"], buckets=_SECONDS,
                                        registry=r)

    def kv_blocks(self) -> int:
        return sum(ledger.blocks for ledger in self.ledgers)

    def batch(self, strategy: str, requests: int, prompts: int, compute, seconds: float) -> None:
        """Record one search call and its compute."""
        self.call(strategy, requests, prompts, seconds)
        self.spent(compute)

    def call(self, strategy: str, requests: int, prompts: int, seconds: float) -> None:
        """Record one search call's size and duration (a continuous call: every request that joined it)."""
        self.batch_requests.observe(requests)
        self.batch_prompts.observe(prompts)
        self.search_seconds.labels(strategy=strategy).observe(seconds)

    def spent(self, compute) -> None:
        """Add a search's compute (a call's, or one request's in a continuous call) to the token and FLOP counters."""
        self.tokens.labels(kind="prompt").inc(compute.policy_prefill_tokens)
        self.tokens.labels(kind="generated").inc(compute.policy_generated_tokens)
        self.tokens.labels(kind="verifier").inc(compute.prm_tokens)
        self.flops.labels(model="policy").inc(compute.policy_flops)
        self.flops.labels(model="verifier").inc(compute.prm_flops)

    def request_done(self, strategy: str, seconds: float) -> None:
        self.requests.labels(strategy=strategy, status="200").inc()
        self.request_seconds.observe(seconds)

    def render(self, engine) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.queue_length.set(engine.queued)
        self.running.set(engine.running)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
