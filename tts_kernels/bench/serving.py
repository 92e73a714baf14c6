"""Server throughput: ``tts-kernels serve`` in three modes, one server each: ``per_request`` (``--max-batch 1``:
one search call per request, what a proxy does, minus the proxy's own HTTP hop per candidate), ``batched``
(``--batching request``: whole requests that arrive together share a call; a request arriving while a call runs
waits for it to end) and ``admission`` (``--batching continuous``, the server's default: a request joins the running call
of its strategy and settings at its next host look; the sampling strategies).

For each strategy and number of concurrent clients, the clients (closed loop: each sends its next
request when the last is answered) work through the same ``requests`` prompts with the same seeds;
reported: problems and generated tokens per second (medians over ``rounds``), latency p50 / p99 over
every request of every round, and the mean prompts per search call. Both servers give the same answers
(seeded per request), which is checked.
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


class ServerProcess:
    """``tts-kernels serve`` in a subprocess on a free localhost port, its output in a temporary file."""

    def __init__(self, *args: str, startup_timeout: float = 120.0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")  # a pipe nobody reads would fill up
        self.proc = subprocess.Popen([sys.executable, "-m", "tts_kernels", "serve", "--port", str(self.port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.time() + startup_timeout
        while True:
            try:
                if self.get("/health")["status"] == "ok":
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                raise RuntimeError(f"server did not start:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kw)

    def get(self, path: str):
        import json

        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read().decode()
        return body if path == "/metrics" else json.loads(body)

    def post_raw(self, path: str, data: bytes) -> tuple[int, str]:
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> dict:
        """Every sample of ``GET /metrics``: ``{(name, sorted label items): value}``."""
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for fam in text_string_to_metric_families(self.get("/metrics")):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def stop(self) -> bool:
        """SIGTERM; True when the server shut down cleanly (uvicorn re-raises the signal once its graceful
        shutdown is complete, so the exit status is -SIGTERM)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return rc in (0, -signal.SIGTERM) and "Application shutdown complete" in self.output()


def _load(server: ServerProcess, prompts, strategy: str, budget: int, clients: int, max_tokens: int):
    """All ``prompts`` through ``clients`` closed-loop clients: (wall seconds, latencies, responses)."""
    model = server.client().models.list().data[0].id
    todo = list(enumerate(prompts))
    out = [None] * len(prompts)
    lat = [0.0] * len(prompts)

    def worker():
        client = server.client(timeout=600)
        while todo:
            try:
                i, prompt = todo.pop(0)
            except IndexError:
                return
            t = time.perf_counter()
            out[i] = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, seed=1000 + i,
                                               extra_body={"strategy": strategy, "budget": budget})
            lat[i] = time.perf_counter() - t

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    return time.perf_counter() - t0, lat, out


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


# mode -> (--max-batch, or None for the run's max_batch; --batching)
MODES = {"per_request": (1, "request"), "batched": (None, "request"), "admission": (None, "continuous")}


def run(*, requests: int = 32, strategies=("best_of_n", "dvts"), budget: int = 16, clients=(1, 4, 16),
        rounds: int = 3, max_tokens: int = 96, max_batch: int = 32, max_wait_ms: float = 10.0,
        modes=("per_request", "batched", "admission"), device: str = "cpu", dtype: str = "float32") -> list[dict]:
    from .. import bundled

    prompts = [p.prompt for p in bundled.test_problems(requests)]
    rows, answers = [], {}
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"modes: {mode!r} is not one of {sorted(MODES)}")
        batch, batching = MODES[mode]
        server = ServerProcess("--max-batch", str(batch or max_batch), "--batching", batching,
                               "--max-wait-ms", str(max_wait_ms), "--max-budget", str(budget),
                               "--device", device, "--dtype", dtype)
        try:
            _load(server, prompts[:2], strategies[0], budget, 1, max_tokens)  # warm-up
            for strategy in strategies:
                for c in clients:
                    walls, lats, tokens, calls = [], [], [], []
                    for _ in range(rounds):
                        before = server.metrics()
                        wall, lat, out = _load(server, prompts, strategy, budget, c, max_tokens)
                        after = server.metrics()
                        walls.append(wall)
                        lats += lat
                        key = ("tts_tokens_total", (("kind", "generated"),))
                        tokens.append(after[key] - before[key])
                        n_calls = after[("tts_batch_prompts_count", ())] - before[("tts_batch_prompts_count", ())]
                        calls.append(requests / max(n_calls, 1))
                        got = [r.predictions[0] for r in out]
                        ref = answers.setdefault((strategy, budget), got)
                        if got != ref:
                            bad = [(i, a, b) for i, (a, b) in enumerate(zip(ref, got)) if a != b]
                            raise AssertionError(f"{mode} {strategy} at {c} clients answered {len(bad)} requests "
                                                 f"differently (request, first mode's answer, this one's): {bad[:8]}")
                    wall = statistics.median(walls)
                    rows.append({"mode": mode, "strategy": strategy, "budget": budget, "clients": c, "device": device,
                                 "requests": requests, "rounds": rounds, "seconds": round(wall, 3),
                                 "problems_per_s": round(requests / wall, 2),
                                 "tokens_per_s": round(statistics.median(tokens) / wall, 1),
                                 "p50_s": round(_pct(lats, 0.5), 3), "p99_s": round(_pct(lats, 0.99), 3),
                                 "prompts_per_call": round(statistics.mean(calls), 2)})
                    print(rows[-1], flush=True)
        finally:
            server.stop()
    base = {(r["strategy"], r["clients"]): r["problems_per_s"] for r in rows if r["mode"] == "per_request"}
    for r in rows:
        b = base.get((r["strategy"], r["clients"]))
        r["vs_per_request"] = round(r["problems_per_s"] / b, 2) if b else None
    batched = {(r["strategy"], r["clients"]): r["problems_per_s"] for r in rows if r["mode"] == "batched"}
    for r in rows:
        b = batched.get((r["strategy"], r["clients"]))
        r["vs_batched"] = round(r["problems_per_s"] / b, 2) if b else None
    return rows
