"""``tts-kernels serve``: an OpenAI-compatible server whose completions are test-time searches.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both
with ``stream=true``: server-sent events in OpenAI's chunk format, ending ``data: [DONE]``),
``GET /v1/strategies`` (what a request may ask for), ``GET /health``, ``GET /metrics``
(Prometheus text). Built on FastAPI and uvicorn; the searches run in the
:class:`~tts_kernels.apps.engine.Engine`, which batches the requests that arrive
together into one search call per strategy.

Request fields: exactly those of :data:`REQUEST_FIELDS` and :data:`SETTING_FIELDS` (the allow-list, each
field next to its ceiling); any other is refused, naming it. Standard: ``model``, ``prompt`` (a string or a
list of strings) or ``messages``, ``max_tokens`` (the ``max_new_tokens`` setting; ``max_completion_tokens``
too), ``temperature``, ``top_p``, ``n`` (choices returned per prompt, ranked: the strategy's pick first,
then the other candidates by verifier score), ``stop``, ``seed``, ``user``, ``stream``, ``stream_options``.
Search fields (top-level, what the OpenAI client sends with ``extra_body=``): ``strategy``
(any registered name; default ``best_of_n`` when ``budget > 1``, else one sample:
``majority`` of one, or ``greedy`` at temperature 0), ``budget`` (samples, beams or particles
per prompt; default ``n``), ``return_candidates`` (every candidate's text, answer, score and
finish reason in the response), and the :class:`~tts_kernels.search.Settings` fields the allow-list names.
The allow-list is explicit: a ``Settings`` field added later is refused (400, ``unknown_field``) until it
is added to :data:`SETTING_FIELDS` with its ceiling.

Limits (server flags, :data:`LIMITS`): ceilings on ``budget`` and ``n``, budget x prompts, ``max_tokens``,
``num_iterations``, ``max_step_tokens``, ``lookahead``, ``sweeps``, ``revisions``, the request body's size
(413), and a compute cap, ``--max-request-tokens``: the policy and verifier token positions a request's
search may spend, enforced while it runs (:mod:`~tts_kernels.apps.engine`: the request is cancelled at
the search's next host look, 413 naming the limit, and the requests sharing its call go on).

Scoring: ``POST /v1/score`` (a prompt and candidate solutions in, one verifier score per step out; the
prompt is prefilled once and forked per candidate, :meth:`~tts_kernels.models.HFPRM.score_steps`) and
``POST /pooling`` (vLLM's pooling shape, ``{"model", "input"}`` or ``{"model", "messages"}``: per step the
probabilities ``[1 - p, p]``, as vLLM's token classification returns them for Qwen2.5-Math-PRM).

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

Streaming (``stream=true``): events while the search runs, fed by its progress at its host looks
(:func:`~tts_kernels.search.cancel.progress`; :class:`LiveStream`). Sampling strategies (``greedy``,
``majority``, ``best_of_n``, ``weighted_best_of_n``) with ``n == budget`` stream every candidate's tokens
as they are sampled, choice ``p * n + j`` being candidate ``j`` of prompt ``p``, its last chunk naming its
``rank`` (its place in the non-streamed response; 0: the strategy's pick; greedy: the only one). Step
searches (``prm_beam_search``, ``dvts``, the particle methods, ``rebase``) stream each step of each prompt's best row as an extension
event ``{"choices": [], "tts_step": {"prompt", "index", "text", "score"}}``. The choices the stream has
not sent yet (every choice of the other strategies, and of sampling with ``n < budget``) come when the
search ends, in steps; then each finish reason (with ``answer``, ``score``), usage when
``stream_options.include_usage``, ``[DONE]``. A failure after the first event is an ``error`` event.

Errors: an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``: 400 for a
bad or unknown field or one over its ceiling (named in ``param``), 404 for an unknown model, 408 when a
request runs past ``--request-timeout``, 413 for a body over ``--max-body-bytes`` or a search over
``--max-request-tokens``, 503 while shutting down, 500 for a failed search.
"""

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..search import STRATEGIES, Settings
from .engine import BadRequest, Engine, Job, LimitExceeded, Outcome, Unavailable, guard_tokenizers, request_seeds
from .options import DEFAULT_VERIFIER

log = logging.getLogger("tts_kernels.serve")

DEFAULT_MODEL = "tts-kernels-bundled"
FINISH = {"eos": "stop", "stop": "stop", "empty": "stop", "length": "length", "final": "length", "sibling": "length",
          "aborted": "length", "rejected": "length"}  # (cut short by their confidence / by the verifier)
# OpenAI fields this server does not implement: refused when set, rather than silently ignored (their neutral
# values, which some clients always send, pass).
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "best_of", "logit_bias", "tools", "tool_choice",
               "functions", "function_call", "response_format", "frequency_penalty", "presence_penalty",
               "parallel_tool_calls", "store", "metadata", "service_tier", "modalities", "reasoning_effort")
# Search settings that are the server's configuration, never a client's: optimal_table (a path on the server)
# and max_rows (the server's memory bound). Refused by name.
SERVER_ONLY = ("optimal_table", "max_rows")

# ----------------------------------------------------------------------------- limits and the allow-list

# The server's limits: ServerConfig attribute -> (default, what it bounds). Each is a flag of `serve`
# (--max-budget, --max-budget-prompts, ...); 0 turns --max-request-tokens off.
LIMITS = {
    "max_budget": (64, "largest budget (samples, beams or particles per prompt) and n a request may ask for"),
    "max_budget_prompts": (256, "largest budget x prompts of a request (its samples in all)"),
    "max_tokens": (4096, "largest max_tokens (max_new_tokens) of a request, and of its thinking budget"),
    "max_steps": (64, "largest num_iterations (steps of a step-level search)"),
    "max_step_tokens": (2048, "largest max_step_tokens"),
    "max_lookahead": (4, "largest lookahead (greedy steps rolled out per beam)"),
    "max_sweeps": (16, "largest sweeps (particle Gibbs passes)"),
    "max_revisions": (8, "largest revisions (sequential revision rounds per chain)"),
    "max_request_tokens": (0, "compute cap: policy and verifier token positions one request's search may spend, "
                              "enforced while it runs (its share, by prompts, of its batch's); 0: none"),
    "max_body_bytes": (1 << 20, "largest request body, in bytes"),
}


@dataclass(frozen=True)
class Cap:
    """A field's ceiling: ``bound`` is a number, or the name of a :data:`LIMITS` entry (a server flag); it bounds
    the field's value (``of="value"``: an int), its length (``"chars"``: a string; ``"items"``: a list, each
    string in it at most ``item_chars``), or a ``thinking`` budget's token counts (``"thinking"``)."""

    bound: int | str
    of: str = "value"
    item_chars: int = 256


# The allow-list: every field a request may carry, each with its ceiling (None: its value is checked where it is
# read, or by Settings). A field not named here is refused with a 400 naming it. SETTING_FIELDS are
# tts_kernels.search.Settings fields a request sets by name: a Settings field added later is refused until it is
# added here, with its ceiling (its cost to the server decides whether it is public at all).
REQUEST_FIELDS: dict[str, Cap | None] = {
    "model": None, "prompt": None, "messages": None, "user": None, "seed": None, "stream": None,
    "stream_options": None, "n": Cap("max_budget"), "budget": Cap("max_budget"), "strategy": None,
    "return_candidates": None, "max_tokens": Cap("max_tokens"), "max_completion_tokens": Cap("max_tokens"),
    "stop": Cap(4, "items"), **{name: None for name in UNSUPPORTED},
}
SETTING_FIELDS: dict[str, Cap | None] = {
    "temperature": None, "top_p": None, "top_k": None, "min_p": None,
    "max_new_tokens": Cap("max_tokens"), "max_step_tokens": Cap("max_step_tokens"), "step_cap": None,
    "num_iterations": Cap("max_steps"), "beam_width": Cap("max_budget"), "agg": None,
    "step_delimiter": Cap(16, "chars"), "lookahead": Cap("max_lookahead"), "filter_duplicates": None,
    "return_siblings": None, "sync_every": Cap(64), "stop_at_answer": None, "levels": Cap(16),
    "resampling": None, "ess_threshold": None, "particle_weight": None, "particle_select": None,
    "weight_temperature": None, "entropic": None, "entropy_target": None, "keep_best": None,
    "sweeps": Cap("max_sweeps"), "reference_particles": Cap("max_budget"), "anneal_below": None,
    "early_phase": None, "vote_key": None, "thinking": Cap("max_tokens", "thinking"),
    "revisions": Cap("max_revisions"), "revision_prompt": Cap(512, "chars"),
    # the early-stopping strategies (search/early_stop.py) and rebase: their cost is bounded by the budget and
    # max_tokens already; confidence_k by the top-k the sampling op computes per token
    "confidence_k": Cap(64), "confidence_window": Cap("max_tokens"), "deepconf_warmup": Cap("max_budget"),
    "deepconf_keep": None, "consensus": None, "stop_confidence": None, "parallel_samples": Cap("max_budget"),
    "checkpoint_tokens": Cap("max_tokens"), "rejection_rate": None, "rebase_temperature": None,
}
# Search settings a request may set (the Settings names in the allow-list; `stop` is read as OpenAI's field).
_SETTINGS = set(SETTING_FIELDS) | {"stop"}


def _flag(attr: str) -> str:
    return "--" + attr.replace("_", "-")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param, code="invalid_value")


def _limit(param: str, message: str) -> APIError:
    return APIError(400, message, param, code="limit_exceeded")


class ServerConfig:
    """What ``serve`` was started with: the model's name, the limits a request is checked against (:data:`LIMITS`,
    by name), the time limit and the default settings. A default over a limit is lowered to it (and logged), so
    a request that does not set a field never fails its ceiling."""

    def __init__(self, *, model_name: str = DEFAULT_MODEL, request_timeout: float = 300.0,
                 defaults: Settings | None = None, verifier_name: str | None = None, **limits):
        bad = sorted(set(limits) - set(LIMITS))
        if bad:
            raise TypeError(f"unknown limit(s) {bad}; limits: {sorted(LIMITS)}")
        self.model_name, self.request_timeout, self.verifier_name = model_name, request_timeout, verifier_name
        for name, (default, _) in LIMITS.items():
            value = limits.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_request_tokens"
                                                                                else 1):
                raise ValueError(f"{_flag(name)} must be an integer >= 1 (--max-request-tokens: >= 0), got {value!r}")
            setattr(self, name, value)
        defaults = defaults or Settings()
        lowered = {}
        for name, cap in SETTING_FIELDS.items():
            if cap is not None and cap.of == "value" and isinstance(getattr(defaults, name), int):
                bound = self.bound(cap)
                if getattr(defaults, name) > bound:
                    lowered[name] = bound
        if lowered:
            log.info(json.dumps({"event": "defaults_lowered_to_limits", **lowered}))
            defaults = defaults.replace(**lowered)
        self.defaults = defaults

    def bound(self, cap: Cap) -> int:
        return getattr(self, cap.bound) if isinstance(cap.bound, str) else cap.bound

    def limits(self) -> dict:
        return {name: getattr(self, name) for name in LIMITS}

    @property
    def token_cap(self) -> int | None:
        return self.max_request_tokens or None


def check_fields(body: dict, cfg: ServerConfig, allowed: dict) -> None:
    """Every field of ``body`` is in ``allowed`` (name -> :class:`Cap` or None) and within its ceiling;
    else an :class:`APIError` naming the first that is not (the server-only settings by their own rule)."""
    for name in body:
        if name in SERVER_ONLY:
            raise _bad(name, f"{name} is set by the server, not by a request")
        if name not in allowed:
            raise APIError(400, f"unknown field {name!r}: this server does not accept it (the request fields and "
                                "search settings it accepts are listed by GET /v1/strategies)", name,
                           code="unknown_field")
    for name, cap in allowed.items():
        value = body.get(name)
        if cap is None or value is None:
            continue
        bound = cfg.bound(cap)
        why = "this server's limit" + (f" ({_flag(cap.bound)})" if isinstance(cap.bound, str) else "")
        if cap.of == "value" and isinstance(value, int) and not isinstance(value, bool) and value > bound:
            raise _limit(name, f"{name} must be <= {bound}, {why}; got {value}")
        if cap.of == "chars" and isinstance(value, str) and len(value) > bound:
            raise _limit(name, f"{name} must be at most {bound} characters, {why}; got {len(value)}")
        if cap.of == "items":
            items = [value] if isinstance(value, str) else value
            if isinstance(items, list) and len(items) > bound:
                raise _limit(name, f"{name} must be a string or a list of at most {bound} of them; got {len(items)}")
            if isinstance(items, list) and any(isinstance(x, str) and len(x) > cap.item_chars for x in items):
                raise _limit(name, f"each of {name} must be at most {cap.item_chars} characters")
        if cap.of == "thinking" and isinstance(value, dict):
            for key in ("min_thinking_tokens", "max_thinking_tokens"):
                v = value.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and v > bound:
                    raise _limit(name, f"{name}.{key} must be <= {bound}, {why}; got {v}")
            for key in ("end", "answer_prefix"):
                if isinstance(value.get(key), str) and len(value[key]) > 256:
                    raise _limit(name, f"{name}.{key} must be at most 256 characters")
            cont = value.get("continuations")
            if isinstance(cont, (list, tuple)) and (len(cont) > 8 or any(isinstance(c, str) and len(c) > 256
                                                                          for c in cont)):
                raise _limit(name, f"{name}.continuations must be at most 8 strings of at most 256 characters")


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
    check_fields(body, cfg, {k: v for k, v in {**REQUEST_FIELDS, **SETTING_FIELDS}.items()
                             if k != ("prompt" if chat else "messages")})
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
    if budget * len(prompts) > cfg.max_budget_prompts:
        raise _limit("budget", f"budget x prompts must be <= {cfg.max_budget_prompts}, this server's limit "
                               f"(--max-budget-prompts); got {budget} x {len(prompts)}")
    overrides = {name: value for name, value in body.items() if name in _SETTINGS}  # (stop: checked below)
    for name in ("max_tokens", "max_completion_tokens"):  # OpenAI's names of max_new_tokens
        if body.get(name) is not None:
            value = _int(body, name, minimum=1)
            if overrides.get("max_new_tokens", value) != value:
                raise _bad(name, f"{name} ({value}) and max_new_tokens ({overrides['max_new_tokens']}) disagree")
            overrides["max_new_tokens"] = value
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
    prompt_tokens = sum(len(i) for i in ids)
    if cfg.token_cap is not None and prompt_tokens > cfg.token_cap:
        raise APIError(413, f"the prompts alone are {prompt_tokens} tokens, over this server's limit of "
                            f"{cfg.token_cap} policy and verifier tokens per request (max_request_tokens, "
                            "--max-request-tokens)", "messages" if chat else "prompt", code="compute_limit_exceeded")
    context = getattr(getattr(policy.model, "config", None), "max_position_embeddings", None)
    if context is not None and max(len(i) for i in ids) + settings.max_new_tokens > context:
        raise _bad("max_tokens", f"the longest prompt ({max(len(i) for i in ids)} tokens) plus max_tokens "
                                 f"({settings.max_new_tokens}) exceeds the model's context of {context} tokens")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _bad("stream_options", "stream_options must be an object")
    if set(stream_options) - {"include_usage"}:
        raise APIError(400, f"unknown field(s) {sorted(set(stream_options) - {'include_usage'})} in stream_options",
                       "stream_options", code="unknown_field")
    job = Job(id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], prompts=prompts,
              seeds=request_seeds(seed, len(prompts)), strategy=strategy, budget=budget, settings=settings,
              token_cap=cfg.token_cap)
    opts = {"n": n, "stream": _bool(body, "stream"), "usage_in_stream": _bool(stream_options, "include_usage"),
            "return_candidates": _bool(body, "return_candidates"), "seed": seed, "user": user,
            "prompt_tokens": prompt_tokens, "chat": chat}
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
    # The request's own compute when the call counted it per request (continuous batching), else its share.
    share = 1.0 if out.compute is not None else len(job.prompts) / out.batch_prompts
    bc = out.compute if out.compute is not None else out.batch_compute
    usage = {"prompt_tokens": opts["prompt_tokens"], "completion_tokens": completion_tokens,
             "total_tokens": opts["prompt_tokens"] + completion_tokens, "search_tokens": search_tokens,
             "policy_tokens": round(bc.policy_tokens * share), "verifier_tokens": round(bc.prm_tokens * share),
             "flops": bc.total_flops * share,
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


# Strategies whose candidates are the sampling loop's rows (streamed token by token as choices when every
# candidate is a choice: n == budget).
SAMPLING = frozenset({"greedy", "majority", "best_of_n", "weighted_best_of_n"})


def _chunk_head(job: Job, cfg: ServerConfig, opts: dict) -> dict:
    return {"id": job.id, "object": "chat.completion.chunk" if opts["chat"] else "text_completion",
            "created": int(time.time()), "model": cfg.model_name, "system_fingerprint": f"seed-{opts['seed']}"}


class LiveStream:
    """One streamed request's events while its search runs (:meth:`update`, fed by the search's progress)
    and when it ends (:meth:`finish`, from the response body).

    Sampling strategies with ``n == budget`` stream every candidate as it is sampled: choice ``p * n + j``
    is candidate ``j`` of prompt ``p`` (sampling order), its text sent as it grows (decoded at each host
    look; what may still change -- an incomplete character, the last character, text past a stop
    string -- is held back), the rest and its finish reason at the end, with ``rank``: its place among the
    prompt's choices in the non-streamed response (0: the strategy's pick). Step searches send each
    step of each prompt's best row as ``{"choices": [], "tts_step": {"prompt", "index", "text",
    "score"}}``, and the choices (ranked, as the non-streamed response) when the search ends."""

    def __init__(self, job: Job, opts: dict, cfg: ServerConfig, policy):
        self.job, self.opts, self.policy = job, opts, policy
        self.chat = opts["chat"]
        self.head = _chunk_head(job, cfg, opts)
        self.by_candidate = job.strategy in SAMPLING and opts["n"] == job.budget
        self.eos = set(policy.eos_token_ids)
        self.stop = list(job.settings.stop or ())
        self.ids: dict = {}  # (prompt, candidate) -> its token ids so far
        self.ended: set = set()  # (prompt, candidate) whose EOS was sampled
        self.sent: dict = {}  # choice index -> text sent
        self.opened: set = set()  # chat: choices whose role was sent

    def event(self, choices, **more) -> str:
        return "data: " + json.dumps({**self.head, "choices": choices, **more}) + "\n\n"

    def _delta(self, index: int, text: str) -> list[str]:
        out = []
        if self.chat and index not in self.opened:
            self.opened.add(index)
            out.append(self.event([{"index": index, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None, "logprobs": None}]))
        if text:
            self.sent[index] = self.sent.get(index, "") + text
            out.append(self.event([{"index": index, "delta": {"content": text}, "finish_reason": None,
                                    "logprobs": None} if self.chat else
                                   {"index": index, "text": text, "finish_reason": None, "logprobs": None}]))
        return out

    def _settled(self, ids: list[int]) -> str:
        """The part of a candidate's text that its end cannot change."""
        text = self.policy.tokenizer.decode(ids, skip_special_tokens=True)
        hits = [(text.find(s), s) for s in self.stop if s in text]
        if hits:  # as sample_completions cuts it (its end may be longer, never shorter)
            pos, s = min(hits)
            return text[: pos + len(s)]
        return text.rstrip("\ufffd")[:-1]

    def update(self, kind: str, data: dict) -> list[str]:
        """The events of one progress report (runs off the event loop: it decodes)."""
        if kind == "step":
            step = {k: data[k] for k in ("prompt", "index", "text", "score")}
            return [self.event([], tts_step=step)]
        if kind != "tokens" or not self.by_candidate:
            return []
        out = []
        for (p, j), new in zip(data["rows"], data["ids"]):
            key = (p, j)
            if key in self.ended:
                continue
            ids = self.ids.setdefault(key, [])
            for t in new:
                if t < 0:
                    break
                if t in self.eos:
                    self.ended.add(key)
                    break
                ids.append(t)
            index = p * self.opts["n"] + j
            text = self._settled(ids)
            done = self.sent.get(index, "")
            if len(text) > len(done) and text.startswith(done):
                out += self._delta(index, text[len(done):])
        return out

    def finish(self, body: dict, result) -> list[str]:
        """The closing events: each choice's rest and finish reason, usage when asked, ``[DONE]``."""
        out = []
        n = self.opts["n"]
        if self.by_candidate:  # (stream index: candidate order, rank among the prompt's choices, body choice)
            by_index = {ch["index"]: ch for ch in body["choices"]}
            order = sorted((p * n + i, k, by_index[p * n + k]) for p in range(len(self.job.prompts))
                           for k, i in enumerate(_ranked(result, p)[:n]))
        else:
            order = [(ch["index"], None, ch) for ch in body["choices"]]
        for index, rank, ch in order:
            text = ch["message"]["content"] if self.chat else ch["text"]
            done = self.sent.get(index, "")
            if not text.startswith(done):  # cannot be taken back: logged (the rule above should prevent it)
                log.warning(json.dumps({"event": "stream_mismatch", "id": self.job.id, "choice": index}))
                done = ""
            rest = text[len(done):]
            pieces = _pieces(rest, self.job.settings.step_delimiter) if rest else []
            for piece in pieces or [""]:
                out += self._delta(index, piece)
            last = {"index": index, "finish_reason": ch["finish_reason"], "logprobs": None, "answer": ch["answer"],
                    "score": ch["score"], **({"rank": rank} if rank is not None else {})}
            out.append(self.event([{**last, "delta": {}} if self.chat else {**last, "text": ""}]))
        if self.opts["usage_in_stream"]:
            out.append(self.event([], usage=body["usage"]))
        out.append("data: [DONE]\n\n")
        return out

    def error(self, exc: APIError) -> list[str]:
        return ["data: " + json.dumps(exc.body()) + "\n\n", "data: [DONE]\n\n"]


# ----------------------------------------------------------------------------- step scoring

# The fields of POST /v1/score and POST /pooling (each endpoint's allow-list).
SCORE_FIELDS: dict[str, Cap | None] = {"model": None, "prompt": None, "completions": None,
                                       "step_separator": Cap(16, "chars"), "agg": None, "user": None}
POOLING_FIELDS: dict[str, Cap | None] = {"model": None, "input": None, "messages": None, "user": None,
                                         "task": None, "encoding_format": None}
POOLING_TASKS = (None, "token_classify", "reward")  # vLLM's names for per-step (token) scores


@dataclass
class ScoreJob:
    """What a scoring request asks the verifier: ``steps[p][c]``, the steps of candidate ``c`` of prompt ``p``
    (:meth:`~tts_kernels.models.HFPRM.score_steps`), and where each answer item comes from."""

    prompts: list[str]
    steps: list[list[list[str]]]
    agg: str = "last"
    items: list[tuple[int, int]] | None = None  # pooling: input i -> (prompt, candidate)
    user: str | None = None


def _scoring_model(body, cfg: ServerConfig) -> None:
    if not isinstance(body, dict):
        raise _bad("body", "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "model is required (a string); see GET /v1/models")
    if model not in (cfg.model_name, cfg.verifier_name):
        served = repr(cfg.model_name) + (f" (its verifier: {cfg.verifier_name!r})" if cfg.verifier_name else "")
        raise APIError(404, f"The model {model!r} does not exist; this server serves {served}", "model",
                       code="model_not_found")


def _user(body):
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", "user must be a string")
    return user


def _no_verifier(verifier) -> None:
    if verifier is None:
        raise APIError(400, "this server runs without a verifier (--verifier none): nothing scores steps", None,
                       code="no_verifier")


def parse_score(body, *, cfg: ServerConfig, verifier) -> ScoreJob:
    """``POST /v1/score``: ``prompt`` (a string, or a list of them) and ``completions`` (its candidate solutions:
    a list of strings, or one such list per prompt), each split into steps at ``step_separator`` (default: the
    verifier's step delimiter; the separator stays at the end of every step but the last, as the searches split
    them), ``agg`` (``last``, ``min``, ``prod``, ``mean``: how a candidate's step scores fold into its score)."""
    from ..models.text import split_steps
    from ..search.settings import AGGREGATES

    _scoring_model(body, cfg)
    check_fields(body, cfg, SCORE_FIELDS)
    _no_verifier(verifier)
    prompt, comps = body.get("prompt"), body.get("completions")
    if isinstance(prompt, str):
        prompts, comps = [prompt], [comps]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
        if not isinstance(comps, list) or len(comps) != len(prompts):
            raise _bad("completions", "with a list of prompts, completions must be one list of strings per prompt")
    else:
        raise _bad("prompt", "prompt must be a non-empty string or a non-empty list of strings")
    if any(not p.strip() for p in prompts):
        raise _bad("prompt", "prompt must not be empty")
    if not all(isinstance(cs, list) and cs and all(isinstance(c, str) for c in cs) for cs in comps):
        raise _bad("completions", "completions must be a non-empty list of strings (per prompt)")
    if sum(len(cs) for cs in comps) > cfg.max_budget_prompts:
        raise _limit("completions", f"at most {cfg.max_budget_prompts} completions per request, this server's limit "
                                    f"(--max-budget-prompts); got {sum(len(cs) for cs in comps)}")
    delimiter = getattr(verifier, "step_delimiter", cfg.defaults.step_delimiter)
    sep = body.get("step_separator", delimiter)
    if not isinstance(sep, str) or not sep:
        raise _bad("step_separator", "step_separator must be a non-empty string")
    if getattr(verifier, "format", None) is not None and sep != delimiter:
        raise _bad("step_separator", f"the verifier reads the {verifier.preset!r} format, whose steps end with "
                                     f"{delimiter!r}; step_separator must be that")
    agg = body.get("agg", "last")
    if agg not in AGGREGATES:
        raise _bad("agg", f"agg must be one of {AGGREGATES}, got {agg!r}")
    return ScoreJob(list(prompts), [[split_steps(c, sep) for c in cs] for cs in comps], agg, user=_user(body))


def parse_pooling(body, *, cfg: ServerConfig, verifier) -> ScoreJob:
    """``POST /pooling`` (vLLM's pooling request): ``input``, a string or a list of them, each the whole text
    the PRM reads (its preset's rendering, e.g. Qwen2.5-Math-PRM's chat with ``<extra_0>`` after every step:
    read back into question and steps by the preset, :meth:`~tts_kernels.models.prm_formats.PRMFormat.parse`),
    or ``messages`` (a chat: an optional system turn, the question as the user turn, the solution as the
    assistant turn; a preset with a chat template (Qwen2.5-Math-PRM) renders it with the template and reads
    it back as ``input``, so the solution carries its tags (``<extra_0>`` after every step), as vLLM takes it;
    otherwise the solution's steps are split at the verifier's step delimiter). Inputs with the same question
    share its prefill."""
    from ..models.text import split_steps

    _scoring_model(body, cfg)
    check_fields(body, cfg, POOLING_FIELDS)
    _no_verifier(verifier)
    if body.get("task") not in POOLING_TASKS:
        raise _bad("task", f"task must be one of {[t for t in POOLING_TASKS if t]} (per-step scores), "
                           f"got {body.get('task')!r}")
    if body.get("encoding_format") not in (None, "float"):
        raise _bad("encoding_format", "encoding_format must be 'float'")
    if ("input" in body) == ("messages" in body):
        raise _bad("input", "give input (the text the PRM reads) or messages (a chat), one of them")
    fmt = getattr(verifier, "format", None)
    delimiter = getattr(verifier, "step_delimiter", cfg.defaults.step_delimiter)
    pairs: list[tuple[str, list[str]]] = []
    if "input" in body:
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise _bad("input", "input must be a non-empty string or a non-empty list of strings (token ids are "
                                "not supported)")
        if fmt is None or not hasattr(fmt, "parse"):
            raise _bad("input", f"this verifier ({getattr(verifier, 'preset', None) or 'a generic head'}) has no "
                                "text format to read input in; send messages, or use POST /v1/score")
        for i, text in enumerate(texts):
            try:
                pairs.append(fmt.parse(text))
            except ValueError as exc:
                raise _bad("input", f"input[{i}]: {exc}") from None
    else:
        msgs = body["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in msgs):
            raise _bad("messages", "messages must be a list of {role, content} objects with text content")
        roles = [m.get("role") for m in msgs]
        if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
            raise _bad("messages", f"messages must be [system,] user (the question), assistant (the solution); "
                                   f"got roles {roles}")
        template = getattr(getattr(verifier, "tokenizer", None), "chat_template", None)
        if fmt is not None and hasattr(fmt, "parse") and template:  # vLLM's way: the chat rendered, then read
            text = verifier.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
            try:
                pairs.append(fmt.parse(text))
            except ValueError as exc:
                raise _bad("messages", f"messages: {exc}") from None
        elif roles[0] == "system":
            raise _bad("messages", "this verifier reads no system turn")
        else:  # the solution's steps at the step delimiter; a preset adds its own tags
            pairs.append((msgs[-2]["content"], split_steps(msgs[-1]["content"], delimiter)))
    if len(pairs) > cfg.max_budget_prompts:
        raise _limit("input", f"at most {cfg.max_budget_prompts} inputs per request, this server's limit "
                              f"(--max-budget-prompts); got {len(pairs)}")
    prompts: list[str] = []
    steps_of: list[list[list[str]]] = []
    items = []
    for q, st in pairs:
        if q not in prompts:
            prompts.append(q)
            steps_of.append([])
        p = prompts.index(q)
        items.append((p, len(steps_of[p])))
        steps_of[p].append(st)
    return ScoreJob(prompts, steps_of, "last", items, user=_user(body))


def score_job(verifier, job: ScoreJob, cap: int | None):
    """Run on the search thread: the verifier's scores of ``job`` (one :meth:`score_steps` call: each prompt
    prefilled once and forked per candidate). With a compute cap, refused before any model runs when the texts
    alone are over it (their token count by the verifier's tokenizer), and after, on the exact count."""
    if cap is not None and getattr(verifier, "tokenizer", None) is not None:
        texts = list(job.prompts) + [st for cs in job.steps for c in cs for st in c]
        n = sum(len(x) for x in verifier.tokenizer(texts, add_special_tokens=False).input_ids)
        if n > cap:
            raise LimitExceeded(n, cap, during=False)
    out = verifier.score_steps(job.prompts, job.steps, agg=job.agg)
    if cap is not None and out.tokens > cap:
        raise LimitExceeded(int(out.tokens), cap, during=False)
    return out


def score_body(job: ScoreJob, out, model: str) -> dict:
    """``POST /v1/score``'s answer: one item per candidate, prompt-major."""
    data, k = [], 0
    agg = out.aggregate.tolist()
    for p, cs in enumerate(job.steps):
        for c, steps in enumerate(cs):
            data.append({"index": k, "object": "score", "prompt_index": p, "completion_index": c, "steps": steps,
                         "step_scores": [_score(x) for x in out.step_scores[p][c]], "score": _score(agg[k])})
            k += 1
    tokens = int(out.tokens)
    return {"id": "score-" + uuid.uuid4().hex[:24], "object": "list", "created": int(time.time()), "model": model,
            "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "verifier_tokens": tokens}}


def pooling_body(job: ScoreJob, out, model: str) -> dict:
    """``POST /pooling``'s answer, vLLM's shape: per input, per step ``[1 - p, p]`` (p: the step's score)."""
    data = []
    for i, (p, c) in enumerate(job.items):
        data.append({"index": i, "object": "pooling",
                     "data": [[1.0 - x, x] for x in (float(v) for v in out.step_scores[p][c])]})
    tokens = int(out.tokens)
    return {"id": "pool-" + uuid.uuid4().hex[:24], "object": "list", "created": int(time.time()), "model": model,
            "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}


# ----------------------------------------------------------------------------- the app

def create_app(policy, verifier, cfg: ServerConfig | None = None, *, max_batch: int = 32, max_wait_ms: float = 10.0,
               continuous: bool = True, max_call_prompts: int = 4096):
    """The FastAPI app serving ``policy`` (and ``verifier``, may be ``None``) under ``cfg``; ``continuous``:
    requests join a running search call of their strategy (else whole requests are batched), up to
    ``max_call_prompts`` prompts a call."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    from .metrics import Metrics

    cfg = cfg or ServerConfig()
    guard_tokenizers(policy, verifier)  # shared by the request threads and the search thread: one lock each
    metrics = Metrics(policy, verifier)
    engine = Engine(policy, verifier, max_batch=max_batch, max_wait_ms=max_wait_ms, metrics=metrics,
                    continuous=continuous, max_call_prompts=max_call_prompts)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await engine.start()
        log.info(json.dumps({"event": "start", "model": cfg.model_name, "strategies": sorted(STRATEGIES),
                             "max_batch": max_batch, "max_wait_ms": max_wait_ms, "continuous": continuous}))
        yield
        await engine.stop()
        log.info(json.dumps({"event": "stop"}))

    app = FastAPI(title="tts-kernels", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, cfg

    def error(exc: APIError, strategy="-") -> JSONResponse:
        metrics.requests.labels(strategy=strategy, status=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    async def read_json(request: Request):
        """The body as JSON, at most ``--max-body-bytes`` of it read (413 past that)."""
        limit = cfg.max_body_bytes
        too_large = APIError(413, f"the request body is over this server's limit of {limit} bytes (--max-body-bytes)",
                             "body", code="body_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_large
        try:
            return json.loads(bytes(data))
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise _bad("body", "the request body is not valid JSON") from None

    def compute_limit(exc: LimitExceeded) -> APIError:
        return APIError(413, str(exc), None, code="compute_limit_exceeded")

    async def complete(request: Request, chat: bool):
        t0 = time.perf_counter()
        try:
            body = await read_json(request)
            # Off the event loop: parsing tokenizes (the tokenizer's lock may be held by the search thread).
            job, opts = await asyncio.to_thread(parse, body, chat=chat, cfg=cfg, policy=policy,
                                                has_verifier=verifier is not None)
        except APIError as exc:
            return error(exc)
        live = events = first = None
        if opts["stream"]:  # the search's progress, from its thread to this loop: one queue per request
            loop = asyncio.get_running_loop()
            events = asyncio.Queue()
            live = LiveStream(job, opts, cfg, policy)
            job.listener = lambda kind, data: loop.call_soon_threadsafe(events.put_nowait, (kind, data))
            first = asyncio.ensure_future(events.get())
        task = asyncio.ensure_future(engine.submit(job))

        async def gone():
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)

        watch = asyncio.ensure_future(gone())
        try:  # until the search ends, or (streaming) its first progress: errors before it are plain responses
            done, _ = await asyncio.wait({task, watch} | ({first} if first else set()), timeout=cfg.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        early = []  # the progress events taken off the queue already
        if first is not None:
            first.cancel()
            if first.done() and not first.cancelled():
                early.append(first.result())
        if early and task not in done:
            return StreamingResponse(stream_live(live, events, early, task, job, opts, t0),
                                     media_type="text/event-stream")
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
        except LimitExceeded as exc:
            log.info(json.dumps({"event": "request", "id": job.id, "strategy": job.strategy, "status": 413,
                                 "limit": "max_request_tokens", "spent": exc.spent, "during_search": exc.during}))
            return error(compute_limit(exc), job.strategy)
        except BadRequest as exc:
            return error(_bad(None, str(exc)), job.strategy)
        except Unavailable as exc:
            return error(APIError(503, str(exc), None, "unavailable", "shutting_down"), job.strategy)
        except Exception as exc:  # noqa: BLE001
            return error(APIError(500, f"the search failed: {type(exc).__name__}: {exc}", None, "server_error"),
                         job.strategy)
        resp = await asyncio.to_thread(build, job, out, opts, cfg, policy)
        metrics.request_done(job.strategy, time.perf_counter() - t0)
        log.info(json.dumps({"event": "request", "id": job.id, "strategy": job.strategy, "budget": job.budget,
                             "prompts": len(job.prompts), "status": 200, "user": opts["user"],
                             "batch_prompts": out.batch_prompts, "queue_s": round(out.queue_seconds, 4),
                             "search_s": round(out.search_seconds, 4), "seconds": round(time.perf_counter() - t0, 4)}))
        if opts["stream"]:  # the search ended before any progress came out: its progress, then its end
            while not events.empty():
                early.append(events.get_nowait())

            async def replay():
                for kind, data in early:
                    for e in await asyncio.to_thread(live.update, kind, data):
                        yield e
                for e in await asyncio.to_thread(live.finish, resp, out.result):
                    yield e

            return StreamingResponse(replay(), media_type="text/event-stream")
        return JSONResponse(resp)

    async def stream_live(live: LiveStream, events: asyncio.Queue, early: list, task, job: Job, opts: dict,
                          t0: float):
        """The events of a search under way: its progress as it comes, then its end (a failure after the
        stream began is an ``error`` event). A client that goes away cancels the job (its rows are dropped)."""
        deadline = t0 + cfg.request_timeout
        try:
            for kind, data in early:
                for e in await asyncio.to_thread(live.update, kind, data):
                    yield e
            while True:
                get = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({get, task}, timeout=max(0.0, deadline - time.perf_counter()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if get.done() and not get.cancelled():
                        done = done | {get}
                if get in done:
                    kind, data = get.result()
                    for e in await asyncio.to_thread(live.update, kind, data):
                        yield e
                    continue
                break
            if not task.done():
                task.cancel()
                job.cancel()
                log.info(json.dumps({"event": "request", "id": job.id, "strategy": job.strategy, "status": "408",
                                     "stream": True, "seconds": round(time.perf_counter() - t0, 4)}))
                metrics.requests.labels(strategy=job.strategy, status="408").inc()
                for e in live.error(APIError(408, f"the request ran past the server's time limit of "
                                                  f"{cfg.request_timeout} s and was cancelled", None, "timeout",
                                             "timeout")):
                    yield e
                return
            while not events.empty():
                for e in await asyncio.to_thread(live.update, *events.get_nowait()):
                    yield e
            try:
                out = task.result()
            except LimitExceeded as exc:
                err = compute_limit(exc)
            except BadRequest as exc:
                err = _bad(None, str(exc))
            except Unavailable as exc:
                err = APIError(503, str(exc), None, "unavailable", "shutting_down")
            except Exception as exc:  # noqa: BLE001
                err = APIError(500, f"the search failed: {type(exc).__name__}: {exc}", None, "server_error")
            else:
                err = None
            if err is not None:
                metrics.requests.labels(strategy=job.strategy, status=str(err.status)).inc()
                for e in live.error(err):
                    yield e
                return
            resp = await asyncio.to_thread(build, job, out, opts, cfg, policy)
            metrics.request_done(job.strategy, time.perf_counter() - t0)
            log.info(json.dumps({"event": "request", "id": job.id, "strategy": job.strategy, "budget": job.budget,
                                 "prompts": len(job.prompts), "status": 200, "stream": True, "user": opts["user"],
                                 "batch_prompts": out.batch_prompts, "queue_s": round(out.queue_seconds, 4),
                                 "search_s": round(out.search_seconds, 4),
                                 "seconds": round(time.perf_counter() - t0, 4)}))
            for e in await asyncio.to_thread(live.finish, resp, out.result):
                yield e
        finally:  # the client went away (or the stream failed): nobody waits for the search any more
            if not task.done():
                task.cancel()
                job.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    async def scoring(request: Request, kind: str):
        t0 = time.perf_counter()
        try:
            body = await read_json(request)
            reader = parse_pooling if kind == "pooling" else parse_score
            job = await asyncio.to_thread(reader, body, cfg=cfg, verifier=verifier)
        except APIError as exc:
            return error(exc, kind)
        try:
            out = await asyncio.wait_for(engine.run_exclusive(score_job, verifier, job, cfg.token_cap),
                                         cfg.request_timeout)
        except LimitExceeded as exc:
            return error(compute_limit(exc), kind)
        except Unavailable as exc:
            return error(APIError(503, str(exc), None, "unavailable", "shutting_down"), kind)
        except asyncio.TimeoutError:
            return error(APIError(408, f"the request ran past the server's time limit of {cfg.request_timeout} s",
                                  None, "timeout", "timeout"), kind)
        except (ValueError, TypeError) as exc:  # the verifier refused the texts (named in the message)
            return error(_bad(None, str(exc)), kind)
        except Exception as exc:  # noqa: BLE001
            log.exception("scoring failed")
            return error(APIError(500, f"scoring failed: {type(exc).__name__}: {exc}", None, "server_error"), kind)
        model = body["model"]
        resp = pooling_body(job, out, model) if kind == "pooling" else score_body(job, out, model)
        metrics.requests.labels(strategy=kind, status="200").inc()
        metrics.tokens.labels(kind="verifier").inc(int(out.tokens))
        log.info(json.dumps({"event": "request", "id": resp["id"], "strategy": kind, "status": 200,
                             "user": job.user, "prompts": len(job.prompts),
                             "candidates": sum(len(cs) for cs in job.steps), "verifier_tokens": int(out.tokens),
                             "seconds": round(time.perf_counter() - t0, 4)}))
        return JSONResponse(resp)

    @app.post("/v1/score")
    async def score(request: Request):
        """Step scores of candidate solutions (:func:`parse_score`, :func:`score_body`)."""
        return await scoring(request, "score")

    @app.post("/pooling")
    async def pooling(request: Request):
        """vLLM's pooling shape for a PRM (:func:`parse_pooling`, :func:`pooling_body`)."""
        return await scoring(request, "pooling")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "tts-kernels"}]}

    @app.get("/v1/strategies")
    async def strategies():
        """What a request may ask for: the registered strategies, the default settings, the limits, the fields."""
        return {"object": "list", "max_budget": cfg.max_budget, "settings": cfg.defaults.as_dict(),
                "limits": cfg.limits(), "request_fields": sorted(REQUEST_FIELDS),
                "setting_fields": sorted(SETTING_FIELDS),
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

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(ap) -> None:
    from ..models.prm import HEADS
    from ..models.prm_formats import PRESETS

    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--policy", default=None,
                    help="policy model: a transformers folder, hub id or .gguf file (default: the bundled "
                         "policy-small)")
    ap.add_argument("--backend", default="hf", choices=("hf", "vllm"),
                    help="what generates: the transformers model on this package's paged cache (hf), or a vLLM "
                         "engine (vllm: needs vLLM installed, e.g. .venv-vllm from make test-vllm)")
    ap.add_argument("--verifier", default=DEFAULT_VERIFIER,
                    help=f"'prm' or 'likelihood' (the bundled verifiers, as in demo; default {DEFAULT_VERIFIER!r}), "
                         "'none', or a PRM: a transformers folder, hub id or .gguf file (read in its published "
                         "format when one is detected, else by its config's generic head)")
    ap.add_argument("--verifier-preset", default=None, choices=("auto",) + PRESETS,
                    help="read --verifier as this published PRM format (auto: detect it, or fail)")
    ap.add_argument("--verifier-head", default=None, choices=HEADS,
                    help="read --verifier with this generic HFPRM head instead of a preset")
    ap.add_argument("--model-name", default=None, help=f"the model id clients ask for (default {DEFAULT_MODEL!r}, "
                                                       "or the policy folder's name)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    ap.add_argument("--max-batch", type=int, default=32,
                    help="prompts per search call (running at once, with continuous batching; 1: no batching)")
    ap.add_argument("--batching", default="continuous", choices=("continuous", "request"),
                    help="continuous (default): a request joins the running search call of its strategy and "
                         "settings at its next host look (greedy, majority, best_of_n, weighted_best_of_n, revise, deepconf, "
                         "deepconf_offline, adaptive_consistency, speculative_rejection) or step "
                         "boundary (prm_beam_search, dvts, particle_filtering, entropic_particle_filtering, rebase); "
                         "request: whole requests are batched, a request waits "
                         "for the call under way to end")
    ap.add_argument("--max-call-prompts", type=int, default=4096,
                    help="continuous batching: a call takes no new request once it has taken this many prompts; it "
                         "drains and the next call starts (bounds the per-prompt state a call keeps)")
    ap.add_argument("--max-wait-ms", type=float, default=10.0, help="how long the first request waits for others")
    for name, (default, what) in LIMITS.items():
        ap.add_argument(_flag(name), type=int, default=default, help=f"{what} (default {default})")
    ap.add_argument("--kv-blocks", type=int, default=None,
                    help="KV blocks per session pool (default: sized per search from its rows and lengths; "
                         "the hf backend's policy and the verifier)")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request is cancelled")
    ap.add_argument("--graceful-timeout", type=float, default=30.0,
                    help="seconds a shutdown waits for requests under way before cancelling them")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def _name(source: str) -> str:
    return Path(source).stem if source.lower().endswith(".gguf") else Path(source).name


def load_models(args):
    """(policy, verifier or None, model name, verifier name or None) for the command's model options, through
    the one loader of every command (:func:`tts_kernels.bundled.policy_from` / ``verifier_from``)."""
    from .. import bundled

    policy = bundled.policy_from(args.policy, device=args.device, dtype=args.dtype, backend=args.backend)
    name = DEFAULT_MODEL if args.policy is None else _name(args.policy)
    verifier = bundled.verifier_from(args.verifier, preset=args.verifier_preset, head=args.verifier_head,
                                     step_delimiter=Settings().step_delimiter, device=args.device, dtype=args.dtype)
    for m in (policy, verifier):
        if m is not None and args.kv_blocks is not None and hasattr(m, "num_blocks"):
            m.num_blocks = args.kv_blocks
    verifier_name = None if args.verifier in bundled.VERIFIERS + ("none",) else _name(args.verifier)
    return policy, verifier, args.model_name or name, verifier_name


def main(args) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(message)s")
    if args.max_batch < 1 or args.max_wait_ms < 0 or args.request_timeout <= 0 or args.max_call_prompts < 1:
        raise SystemExit("--max-batch must be >= 1, --max-wait-ms >= 0, --request-timeout > 0, "
                         "--max-call-prompts >= 1")
    if args.kv_blocks is not None and args.kv_blocks < 1:
        raise SystemExit("--kv-blocks must be >= 1")
    if args.verifier_preset and args.verifier_head:
        raise SystemExit("--verifier-preset reads a published format, --verifier-head a generic head: one of them")
    try:  # the limits checked before the models load
        cfg = ServerConfig(request_timeout=args.request_timeout, **{k: getattr(args, k) for k in LIMITS})
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    policy, verifier, cfg.model_name, cfg.verifier_name = load_models(args)
    app = create_app(policy, verifier, cfg, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                     continuous=args.batching == "continuous", max_call_prompts=args.max_call_prompts)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0
