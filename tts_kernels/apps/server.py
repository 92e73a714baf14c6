"""``tts-kernels serve``: an OpenAI-compatible server whose completions are test-time searches.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both
with ``stream=true``: server-sent events in OpenAI's chunk format, ending ``data: [DONE]``),
``GET /v1/strategies`` (what a request may ask for), ``GET /health``, ``GET /metrics``
(Prometheus text). Built on FastAPI and uvicorn; the searches run in the
:class:`~tts_kernels.apps.engine.Engine`, which batches the requests that arrive
together into one search call per strategy.

Request fields. Standard: ``model``, ``prompt`` (a string or a list of strings) or
``messages``, ``max_tokens`` (the ``max_new_tokens`` setting), ``temperature``, ``top_p``,
``n`` (choices returned per prompt, ranked: the strategy's pick first, then the other
candidates by verifier score), ``stop``, ``seed``, ``user``, ``stream``, ``stream_options``.
Search fields (top-level, what the OpenAI client sends with ``extra_body=``): ``strategy``
(any registered name; default ``best_of_n`` when ``budget > 1``, else one sample:
``majority`` of one, or ``greedy`` at temperature 0), ``budget`` (samples, beams or particles
per prompt; default ``n``), ``return_candidates`` (every candidate's text, answer, score and
finish reason in the response), and any :class:`~tts_kernels.search.Settings` field by name.

Seeds: a request's prompts draw under seeds derived from its ``seed``
(:func:`~tts_kernels.apps.engine.request_seeds`; a random one when absent), so the same request
with the same seed gets the same answer alone or batched with others; the response's
``system_fingerprint`` carries the seed used.

``usage``: ``prompt_tokens`` (the request's prompts as the policy reads them),
``completion_tokens`` (the returned choices' tokens), ``total_tokens``; and, for the search
behind it, ``search_tokens`` (every candidate's tokens), ``verifier_tokens`` and ``flops`` (the
request's share, by prompts, of the exact compute of the search call it ran in, whose size is
``batch_prompts``); with a ``thinking`` budget (a request field: ``ThinkingBudget``'s fields),
``completion_tokens_details.reasoning_tokens`` (the returned choices' thinking tokens).

Streaming: a search picks its answer at the end, so the events start when the search ends
(each choice's text in steps, then its finish reason, then usage when asked).

Errors: an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``: 400 for a
bad field (named in ``param``), 404 for an unknown model, 408 when a request runs past
``--request-timeout``, 503 while shutting down, 500 for a failed search.
"""

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
import uuid
from pathlib import Path

from ..search import STRATEGIES, Settings
from .engine import BadRequest, Engine, Job, Outcome, Unavailable, request_seeds
from .options import DEFAULT_VERIFIER

log = logging.getLogger("tts_kernels.serve")

DEFAULT_MODEL = "tts-kernels-bundled"
FINISH = {"eos": "stop", "stop": "stop", "empty": "stop", "length": "length", "final": "length", "sibling": "length"}
# OpenAI fields this server does not implement: refused when set, rather than silently ignored.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "best_of", "logit_bias", "tools", "tool_choice",
               "functions", "function_call", "response_format", "frequency_penalty", "presence_penalty")
# Search settings a request may set. Not optimal_table: a path on the server is the server's configuration,
# never a client's to choose (a request naming it is refused).
SERVER_ONLY = ("optimal_table",)
_SETTINGS = {f for f in Settings.__dataclass_fields__} - set(SERVER_ONLY)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param, code="invalid_value")


class ServerConfig:
    """What ``serve`` was started with (the limits a request is checked against)."""

    def __init__(self, *, model_name: str = DEFAULT_MODEL, max_budget: int = 64, request_timeout: float = 300.0,
                 defaults: Settings | None = None):
        self.model_name, self.max_budget, self.request_timeout = model_name, max_budget, request_timeout
        self.defaults = defaults or Settings()


# ----------------------------------------------------------------------------- request parsing

def _int(body, name, default=None, minimum=None, maximum=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"{name} must be an integer, got {type(v).__name__}")
    if minimum is not None and v < minimum:
        raise _bad(name, f"{name} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise _bad(name, f"{name} must be <= {maximum}, got {v}")
    return v


def _bool(body, name, default=False):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"{name} must be a boolean, got {type(v).__name__}")
    return v


def render_chat(tokenizer, messages) -> str:
    """The prompt text of a chat: the tokenizer's chat template when it has one (with the assistant's
    turn opened), else plainly: the messages' contents, each followed by a blank line."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object with a string role")
        if m["role"] not in ("system", "user", "assistant", "developer"):
            raise _bad(f"messages[{i}].role", f"messages[{i}].role must be system, developer, user or assistant, "
                                              f"got {m['role']!r}")
        if not isinstance(m.get("content"), str):
            raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string (text only)")
    if not any(m["content"].strip() for m in messages):
        raise _bad("messages", "messages hold no text")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = ""
    for m in messages:
        c = m["content"]
        text += c if c.endswith("\n\n") else c.rstrip("\n") + "\n\n"
    return text


def parse(body, *, chat: bool, cfg: ServerConfig, policy, has_verifier: bool) -> tuple[Job, dict]:
    """A request body -> (the search :class:`Job`, response options). Raises :class:`APIError` naming
    the field; nothing is queued or allocated before this returns."""
    if not isinstance(body, dict):
        raise _bad("body", "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "model is required (a string); see GET /v1/models")
    if model != cfg.model_name:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {cfg.model_name!r}", "model",
                       code="model_not_found")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, 0, [], {}):
            raise _bad(name, f"{name} is not supported by this server" +
                       ("; ask for budget=N (samples per prompt) and strategy=..." if name == "best_of" else ""))
    if chat:
        prompts = [render_chat(policy.tokenizer, body.get("messages"))]
    else:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise _bad("prompt", "prompt must be a non-empty string or a non-empty list of strings (token ids are "
                                 "not supported)")
        if any(not p.strip() for p in prompts):
            raise _bad("prompt", "prompt must not be empty")
    n = _int(body, "n", 1, minimum=1, maximum=cfg.max_budget)
    budget = _int(body, "budget", n, minimum=1, maximum=cfg.max_budget)
    if n > budget:
        raise _bad("n", f"n ({n}) must be <= budget ({budget}): choices come from the search's candidates")
    for name in SERVER_ONLY:
        if body.get(name) is not None:
            raise _bad(name, f"{name} is set by the server, not by a request")
    overrides = {name: value for name, value in body.items() if name in _SETTINGS}  # (stop: checked below)
    if body.get("max_tokens") is not None:
        overrides["max_new_tokens"] = _int(body, "max_tokens", minimum=1)
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise _bad("stop", "stop must be a non-empty string or a list of at most 4 of them")
        overrides["stop"] = tuple(stop)
    if "temperature" in overrides and overrides["temperature"] is not None:
        t = overrides["temperature"]
        if isinstance(t, (int, float)) and not isinstance(t, bool) and not 0 <= t <= 2:
            raise _bad("temperature", f"temperature must be in [0, 2], got {t}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = cfg.defaults.replace(**overrides)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        param = next((k for k in overrides if f"Settings.{k} " in msg or f"Settings.{k}." in msg), None)
        raise _bad("max_tokens" if param == "max_new_tokens" else param, msg) from None
    strategy = body.get("strategy")
    if strategy is None:
        strategy = ("best_of_n" if has_verifier else "majority") if budget > 1 else (
            "greedy" if settings.temperature == 0 else "majority")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise _bad("strategy", f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    if STRATEGIES[strategy].needs_verifier and not has_verifier:
        raise _bad("strategy", f"strategy {strategy!r} needs a verifier; this server runs without one")
    if strategy == "greedy" and n > 1:
        raise _bad("n", "strategy 'greedy' makes one completion per prompt: n must be 1")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(63)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
        raise _bad("seed", "seed must be a 64-bit integer")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", "user must be a string")
    # max_tokens is what a completion may add at most (a step-level search's steps before its last one
    # may add more: max_step_tokens each; past the context those rows run on extrapolated positions).
    ids = [policy.encode(p) for p in prompts]
    context = getattr(getattr(policy.model, "config", None), "max_position_embeddings", None)
    if context is not None and max(len(i) for i in ids) + settings.max_new_tokens > context:
        raise _bad("max_tokens", f"the longest prompt ({max(len(i) for i in ids)} tokens) plus max_tokens "
                                 f"({settings.max_new_tokens}) exceeds the model's context of {context} tokens")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _bad("stream_options", "stream_options must be an object")
    job = Job(id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], prompts=prompts,
              seeds=request_seeds(seed, len(prompts)), strategy=strategy, budget=budget, settings=settings)
    opts = {"n": n, "stream": _bool(body, "stream"), "usage_in_stream": _bool(stream_options, "include_usage"),
            "return_candidates": _bool(body, "return_candidates"), "seed": seed, "user": user,
            "prompt_tokens": sum(len(i) for i in ids), "chat": chat}
    return job, opts


# ----------------------------------------------------------------------------- responses

def _ranked(result, p: int) -> list[int]:
    """Candidates of prompt ``p``: the strategy's pick first, then by score (NaN last), then in order."""
    cands = result.candidates[p]
    first = result.chosen[p]
    rest = [i for i in range(len(cands)) if i != first]
    rest.sort(key=lambda i: (cands[i].score != cands[i].score, -(cands[i].score if cands[i].score == cands[i].score
                                                                   else 0.0)))
    return ([first] if first is not None else []) + rest


def _tokens(policy, cand) -> int:
    if cand.token_ids is not None:
        return len(cand.token_ids)
    return len(policy.tokenizer(cand.text, add_special_tokens=False).input_ids) if cand.text else 0


def _score(x: float):
    return None if x != x else float(x)


def build(job: Job, out: Outcome, opts: dict, cfg: ServerConfig, policy) -> dict:
    """The OpenAI response body (``text_completion`` or ``chat.completion``) of a finished job."""
    res, n = out.result, opts["n"]
    choices, completion_tokens, search_tokens, cands_out = [], 0, 0, []
    thinking = job.settings.thinking is not None
    thinking_tokens = 0
    for p in range(len(job.prompts)):
        order = _ranked(res, p)[:n]
        for k, i in enumerate(order):
            c = res.candidates[p][i]
            t = _tokens(policy, c)
            completion_tokens += t
            thinking_tokens += c.thinking_tokens or 0
            extra = {"answer": c.answer, "score": _score(c.score)}
            if opts["chat"]:
                choices.append({"index": p * n + k, "message": {"role": "assistant", "content": c.text},
                                "finish_reason": FINISH.get(c.finish, "stop"), "logprobs": None, **extra})
            else:
                choices.append({"index": p * n + k, "text": c.text, "finish_reason": FINISH.get(c.finish, "stop"),
                                "logprobs": None, **extra})
        search_tokens += sum(_tokens(policy, c) for c in res.candidates[p])
        if opts["return_candidates"]:
            cands_out.append([{"text": c.text, "answer": c.answer, "score": _score(c.score), "finish": c.finish,
                               "steps": c.steps, "step_scores": [_score(s) for s in c.step_scores],
                               **({"thinking_tokens": c.thinking_tokens} if thinking else {})}
                              for c in res.candidates[p]])
    share = len(job.prompts) / out.batch_prompts
    bc = out.batch_compute
    usage = {"prompt_tokens": opts["prompt_tokens"], "completion_tokens": completion_tokens,
             "total_tokens": opts["prompt_tokens"] + completion_tokens, "search_tokens": search_tokens,
             "verifier_tokens": round(bc.prm_tokens * share), "flops": bc.total_flops * share,
             "batch_prompts": out.batch_prompts, "batch_requests": out.batch_requests}
    if thinking:  # of completion_tokens, those the returned choices wrote while thinking
        usage["completion_tokens_details"] = {"reasoning_tokens": thinking_tokens}
    body = {"id": job.id, "object": "chat.completion" if opts["chat"] else "text_completion",
            "created": int(time.time()), "model": cfg.model_name, "system_fingerprint": f"seed-{opts['seed']}",
            "choices": choices, "usage": usage, "strategy": job.strategy, "budget": job.budget,
            "predictions": res.predictions}
    if opts["return_candidates"]:
        body["candidates"] = cands_out
    return body


def _pieces(text: str, delimiter: str) -> list[str]:
    """``text`` cut after each delimiter (the pieces join back to it exactly)."""
    parts = text.split(delimiter)
    return [p + delimiter for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def stream_events(body: dict, opts: dict, delimiter: str):
    """The server-sent events of a finished response: each choice's text in steps, its finish reason,
    usage when asked, then ``[DONE]``."""
    chat = opts["chat"]
    head = {"id": body["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": body["created"], "model": body["model"], "system_fingerprint": body["system_fingerprint"]}

    def event(choices, **more):
        return "data: " + json.dumps({**head, "choices": choices, **more}) + "\n\n"

    for ch in body["choices"]:
        i = ch["index"]
        text = ch["message"]["content"] if chat else ch["text"]
        if chat:
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                          "logprobs": None}])
        for piece in _pieces(text, delimiter):
            if chat:
                yield event([{"index": i, "delta": {"content": piece}, "finish_reason": None, "logprobs": None}])
            else:
                yield event([{"index": i, "text": piece, "finish_reason": None, "logprobs": None}])
        last = {"index": i, "finish_reason": ch["finish_reason"], "logprobs": None, "answer": ch["answer"],
                "score": ch["score"]}
        yield event([{**last, "delta": {}} if chat else {**last, "text": ""}])
    if opts["usage_in_stream"]:
        yield event([], usage=body["usage"])
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- the app

def create_app(policy, verifier, cfg: ServerConfig | None = None, *, max_batch: int = 32, max_wait_ms: float = 10.0):
    """The FastAPI app serving ``policy`` (and ``verifier``, may be ``None``) under ``cfg``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    from .metrics import Metrics

    cfg = cfg or ServerConfig()
    metrics = Metrics(policy, verifier)
    engine = Engine(policy, verifier, max_batch=max_batch, max_wait_ms=max_wait_ms, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await engine.start()
        log.info(json.dumps({"event": "start", "model": cfg.model_name, "strategies": sorted(STRATEGIES),
                             "max_batch": max_batch, "max_wait_ms": max_wait_ms}))
        yield
        await engine.stop()
        log.info(json.dumps({"event": "stop"}))

    app = FastAPI(title="tts-kernels", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, cfg

    def error(exc: APIError, strategy="-") -> JSONResponse:
        metrics.requests.labels(strategy=strategy, status=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    async def complete(request: Request, chat: bool):
        t0 = time.perf_counter()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            return error(_bad("body", "the request body is not valid JSON"))
        try:
            job, opts = parse(body, chat=chat, cfg=cfg, policy=policy, has_verifier=verifier is not None)
        except APIError as exc:
            return error(exc)
        task = asyncio.ensure_future(engine.submit(job))

        async def gone():
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)

        watch = asyncio.ensure_future(gone())
        try:
            done, _ = await asyncio.wait({task, watch}, timeout=cfg.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if task not in done:
            task.cancel()
            job.cancel()
            status = "cancelled" if watch in done else "408"
            log.info(json.dumps({"event": "request", "id": job.id, "strategy": job.strategy, "status": status,
                                 "user": opts["user"], "seconds": round(time.perf_counter() - t0, 4)}))
            if watch in done:  # nobody to answer
                metrics.requests.labels(strategy=job.strategy, status="cancelled").inc()
                return JSONResponse({}, status_code=499)
            return error(APIError(408, f"the request ran past the server's time limit of {cfg.request_timeout} s "
                                       "and was cancelled", None, "timeout", "timeout"), job.strategy)
        try:
            out = task.result()
        except BadRequest as exc:
            return error(_bad(None, str(exc)), job.strategy)
        except Unavailable as exc:
            return error(APIError(503, str(exc), None, "unavailable", "shutting_down"), job.strategy)
        except Exception as exc:  # noqa: BLE001
            return error(APIError(500, f"the search failed: {type(exc).__name__}: {exc}", None, "server_error"),
                         job.strategy)
        resp = build(job, out, opts, cfg, policy)
        metrics.request_done(job.strategy, time.perf_counter() - t0)
        log.info(json.dumps({"event": "request", "id": job.id, "strategy": job.strategy, "budget": job.budget,
                             "prompts": len(job.prompts), "status": 200, "user": opts["user"],
                             "batch_prompts": out.batch_prompts, "queue_s": round(out.queue_seconds, 4),
                             "search_s": round(out.search_seconds, 4), "seconds": round(time.perf_counter() - t0, 4)}))
        if opts["stream"]:
            return StreamingResponse(stream_events(resp, opts, job.settings.step_delimiter),
                                     media_type="text/event-stream")
        return JSONResponse(resp)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "tts-kernels"}]}

    @app.get("/v1/strategies")
    async def strategies():
        """What a request may ask for: the registered strategies, the default settings, the budget cap."""
        return {"object": "list", "max_budget": cfg.max_budget, "settings": cfg.defaults.as_dict(),
                "data": [{"id": name, "description": e.description, "needs_verifier": e.needs_verifier,
                          "pooled": e.pooled, "available": verifier is not None or not e.needs_verifier}
                         for name, e in STRATEGIES.items()]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": engine.queued, "running": engine.running,
                "kv_blocks_in_use": metrics.kv_blocks()}

    @app.get("/metrics")
    async def prometheus():
        text, media = metrics.render(engine)
        return PlainTextResponse(text, media_type=media)

    return app


# ----------------------------------------------------------------------------- the command

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
HEADS = ("classifier", "label_token", "value_head", "likelihood")


def add_arguments(ap) -> None:
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--policy", default=None,
                    help="policy model: a transformers folder or a .gguf file (default: the bundled policy-small)")
    ap.add_argument("--backend", default="hf", choices=("hf", "vllm"),
                    help="what generates: the transformers model on this package's paged cache (hf), or a vLLM "
                         "engine (vllm: needs vLLM installed, e.g. .venv-vllm from make test-vllm)")
    ap.add_argument("--verifier", default=DEFAULT_VERIFIER,
                    help=f"'prm' or 'likelihood' (the bundled verifiers, as in demo; default {DEFAULT_VERIFIER!r}), "
                         "'none', or a PRM model folder")
    ap.add_argument("--verifier-head", default="classifier", choices=HEADS,
                    help="how a verifier folder's model scores a step (tts_kernels.models.HFPRM head)")
    ap.add_argument("--model-name", default=None, help=f"the model id clients ask for (default {DEFAULT_MODEL!r}, "
                                                       "or the policy folder's name)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--max-batch", type=int, default=32, help="prompts per search call (1: no batching)")
    ap.add_argument("--max-wait-ms", type=float, default=10.0, help="how long the first request waits for others")
    ap.add_argument("--max-budget", type=int, default=64, help="largest budget (and n) a request may ask for")
    ap.add_argument("--kv-blocks", type=int, default=None,
                    help="KV blocks per session pool (default: sized per search from its rows and lengths; "
                         "the hf backend's policy and the verifier)")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request is cancelled")
    ap.add_argument("--graceful-timeout", type=float, default=30.0,
                    help="seconds a shutdown waits for requests under way before cancelling them")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def load_models(args):
    """(policy, verifier or None, model name) for the command's model options."""
    import torch

    from .. import bundled

    dtype = getattr(torch, DTYPES[args.dtype])
    if args.backend == "vllm":
        from ..integrations.vllm import VLLMPolicy

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        folder = args.policy or bundled.path("policy-small")
        policy = VLLMPolicy(folder, dtype=args.dtype)
        name = DEFAULT_MODEL if args.policy is None else Path(args.policy).name
    elif args.policy is None:
        policy, name = bundled.load_policy("small", device=args.device, dtype=dtype), DEFAULT_MODEL
    else:  # a folder, hub id or .gguf file
        from ..models import HFPolicy

        policy = HFPolicy.from_pretrained(args.policy, dtype=dtype, device=args.device)
        name = Path(args.policy).stem if args.policy.lower().endswith(".gguf") else Path(args.policy).name
    if args.verifier == "none":
        verifier = None
    elif args.verifier in bundled.VERIFIERS:
        verifier = bundled.load_verifier(args.verifier, device=args.device, dtype=dtype)
    else:  # a folder, hub id or .gguf file
        from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

        from ..models import HFPRM
        from ..models.loading import load_model, load_tokenizer

        auto = AutoModelForCausalLM if args.verifier_head in ("likelihood", "label_token") else \
            AutoModelForTokenClassification
        m = load_model(args.verifier, auto=auto, dtype=dtype, device=args.device)
        verifier = HFPRM(m, load_tokenizer(args.verifier), head=args.verifier_head)
    for m in (policy, verifier):
        if m is not None and args.kv_blocks is not None and hasattr(m, "num_blocks"):
            m.num_blocks = args.kv_blocks
    return policy, verifier, args.model_name or name


def main(args) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(message)s")
    if args.max_batch < 1 or args.max_budget < 1 or args.max_wait_ms < 0 or args.request_timeout <= 0:
        raise SystemExit("--max-batch and --max-budget must be >= 1, --max-wait-ms >= 0, --request-timeout > 0")
    if args.kv_blocks is not None and args.kv_blocks < 1:
        raise SystemExit("--kv-blocks must be >= 1")
    policy, verifier, name = load_models(args)
    cfg = ServerConfig(model_name=name, max_budget=args.max_budget, request_timeout=args.request_timeout)
    app = create_app(policy, verifier, cfg, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0
