"""``HFPRM``: a transformers model as a process reward model, scoring steps incrementally.

A PRM scores each reasoning step of a candidate solution. Three families are in use
and all are supported (``head=``):

* ``"label_token"`` — a causal LM that predicts a good/bad label token after a step tag
  (Math-Shepherd, RLHFlow): score = softmax over the two label logits, the good one.
  Only the two LM-head rows are applied (:func:`~tts_kernels.ops.prm.label_token_head`):
  the full-vocabulary logits are never computed.
* ``"classifier"`` — a two-class token classifier read at step separators
  (Qwen2.5-Math-PRM style; transformers ``*ForTokenClassification`` with 2 labels):
  softmax, class ``positive_class``.
* ``"value"`` — a scalar head (Skywork style; ``*ForTokenClassification`` with 1 label):
  sigmoid.

And one verifier that is not a trained PRM head (``head="likelihood"``): a causal LM's own
likelihood of the text, e.g. a stronger policy reading a weaker one's steps. A step scores
``exp(f)`` of the log-probabilities of every solution token up to its end (``reduce``:
``"min"`` token, ``"mean"`` = geometric-mean token probability, ``"sum"`` = prefix
probability; :func:`~tts_kernels.ops.prm.prefix_likelihood`), so like a Math-Shepherd label
a step's score covers its whole prefix. The prompt's tokens are not scored.

Published PRMs load natively, without ``trust_remote_code`` (:meth:`HFPRM.from_pretrained`, the
format detected): Math-Shepherd and RLHFlow as the causal LMs they are, token classifiers as
themselves, and Qwen2.5-Math-PRM (``Qwen2ForProcessRewardModel``) and Skywork-o1-Open-PRM
(``Qwen2ForPrmModel``), whose classes are remote code, as transformers' Qwen2 body with the head
read from their checkpoint (:mod:`.prm_heads`).

Incremental scoring: a :class:`PRMSession` prefills each prompt once into the PRM's own
paged KV cache, forks it per candidate (no KV bytes move), and each
:meth:`PRMSession.add_steps` call runs only the new steps' tokens through the model
(one batched chunk forward on top of each candidate's cached history), gathers the
hidden states at the step ends and folds the scores into each candidate's running
aggregate with the fused :func:`~tts_kernels.ops.prm.prm_score` — never a re-read of
the whole prefix. Search drivers fork and reorder the session's rows with their beams.

How text becomes tokens: the prompt is tokenized once (with special tokens); each step
is tokenized on its own and followed by ``step_tag`` when one is set (its last token is
where the step is scored), else scored at the step's own last token. Steps are the
pieces of a completion split on ``step_delimiter`` (:func:`~tts_kernels.models.text.split_steps`),
which stays at the end of every step but the last. The searches split text themselves, with
``Settings.step_delimiter``, and hand the verifier steps (:meth:`HFPRM.score_steps`,
:meth:`PRMSession.add_steps`); ``step_delimiter`` here serves :meth:`HFPRM.score`.
"""
from __future__ import annotations

import bisect
import contextlib
import copy
import logging
import os
from dataclasses import dataclass

import torch

from ..ops.prm import (LIKELIHOOD_REDUCES, fold_step_scores, init_aggregate, init_likelihood_state, label_token_head,
                       prefix_likelihood, prm_score)
from .compat import ForwardArgs
from .hf_paged import KVLedger, PagedCache, require_paged, use_paged_attention
from .prm_formats import PRESET_HEADS, PRESETS, detect_preset, make_format
from .text import split_steps

log = logging.getLogger("tts_kernels")

HEADS = ("label_token", "classifier", "value", "likelihood")


def _model_name(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", "") or type(model).__name__


def _token_id(tokenizer, token: str, name: str) -> int:
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"{name} {token!r} must be a single token of the PRM's tokenizer, got ids {ids}")
    return ids[0]


class HFPRM:
    """A transformers model as a PRM.

    Args:
        model: a causal LM (``head="label_token"`` or ``"likelihood"``) or a
            ``*ForTokenClassification`` model with 2 labels (``"classifier"``) or 1 label
            (``"value"``). It is switched to the ``"tts_paged"`` attention (runs as sdpa without a
            paged cache).
        tokenizer: its tokenizer.
        head: ``"label_token"``, ``"classifier"``, ``"value"`` or ``"likelihood"``.
        step_delimiter: splits completions into steps in :meth:`score` (the searches pass steps
            split by their own ``Settings.step_delimiter``).
        step_tag: text appended after every step, scored at its last token (e.g. Math-Shepherd's
            ``" ки"``, Qwen-PRM's ``"<extra_0>"``); ``None``: score each step's last token.
        good_token, bad_token: label tokens of a label-token PRM (single tokens).
        positive_class: the class whose probability is the score (2-class heads).
        reduce: ``head="likelihood"`` only: ``"min"``, ``"mean"`` or ``"sum"`` of the token
            log-probabilities of the prefix (see the module docstring). The LM head is applied
            as a plain linear layer (no logit soft-capping or scaling).
        num_blocks, block_size: the PRM's paged KV pool (default: sized per session).
    """

    def __init__(self, model, tokenizer, *, head: str | None = None, preset: str | None = None,
                 step_delimiter: str = "\n\n", step_tag: str | None = None, good_token: str | None = None,
                 bad_token: str | None = None, positive_class: int = 1, reduce: str = "min",
                 system_prompt: str | None = None, head_module: torch.nn.Module | None = None,
                 num_blocks: int | None = None, block_size: int = 16):
        if not isinstance(step_delimiter, str) or not step_delimiter:
            raise ValueError(f"step_delimiter must be a non-empty string, got {step_delimiter!r}")
        self.format = None
        if preset is not None:
            clash = [n for n, v in (("head", head), ("step_tag", step_tag), ("good_token", good_token),
                                    ("bad_token", bad_token)) if v is not None]
            if clash:
                raise ValueError(f"preset={preset!r} sets the format; do not also pass {clash}")
            self.format = make_format(preset, tokenizer, step_delimiter, model_name=_model_name(model),
                                      system_prompt=system_prompt)
            head = self.format.head
        elif system_prompt is not None:
            raise ValueError("system_prompt belongs to a preset's format (preset='qwen2.5-math-prm')")
        head = "classifier" if head is None else head
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if reduce not in LIKELIHOOD_REDUCES:
            raise ValueError(f"reduce must be one of {LIKELIHOOD_REDUCES}, got {reduce!r}")
        if head == "likelihood" and step_tag is not None:
            raise ValueError("step_tag has no meaning for head='likelihood' (the tag's own tokens would be scored)")
        require_paged(model, "HFPRM (incremental scoring)")  # a ValueError naming the architecture
        self.model = use_paged_attention(model)
        self.tokenizer = tokenizer
        self.head_kind = head
        self.preset = preset
        self.step_delimiter = step_delimiter
        self.step_tag = step_tag
        self.positive_class = positive_class
        self.reduce = reduce
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_ledger = KVLedger()  # KV blocks held by this PRM's open sessions
        self.base = model.base_model
        self.forward_args = ForwardArgs(self.base)  # the cache keyword this transformers version declares
        self.pre_head = None  # layers of a deeper head before its last Linear (Qwen2ForProcessRewardModel)
        if head == "label_token":
            lm_head = model.get_output_embeddings()
            if lm_head is None:
                raise ValueError("head='label_token' needs a causal LM with an output embedding (lm_head)")
            if self.format is not None:
                good, bad = self.format.labels
            else:
                if good_token is None or bad_token is None:
                    raise ValueError("a label_token PRM needs good_token and bad_token")
                good, bad = _token_id(tokenizer, good_token, "good_token"), _token_id(tokenizer, bad_token, "bad_token")
            self.weight, self.bias, self.positive_class = label_token_head(lm_head.weight, good, bad), None, 1
        elif head == "likelihood":
            lm_head = model.get_output_embeddings()
            if not isinstance(lm_head, torch.nn.Linear):
                raise ValueError("head='likelihood' needs a causal LM with an output embedding (lm_head)")
            self.weight, self.bias = lm_head.weight, lm_head.bias
        else:
            score = head_module
            if score is None:
                score = getattr(model, "score", None) or getattr(model, "classifier", None)
            if isinstance(score, torch.nn.Sequential) and len(score) > 1 and isinstance(score[-1], torch.nn.Linear):
                self.pre_head, score = score[:-1], score[-1]
            if not isinstance(score, torch.nn.Linear):
                raise ValueError(f"head={head!r} needs a `score` head (a Linear, or a Sequential ending in one: a "
                                 f"*ForTokenClassification model) or head_module=; {_model_name(model)} has none")
            want = 2 if head == "classifier" else 1
            if score.out_features != want:
                raise ValueError(f"head={head!r} needs {want} output(s), the model's head has {score.out_features}")
            self.weight, self.bias = score.weight, score.bias
        if self.positive_class not in (0, 1):
            raise ValueError(f"positive_class must be 0 or 1, got {positive_class!r}")
        self._tag_ids = [] if step_tag is None else tokenizer(step_tag, add_special_tokens=False).input_ids

    @classmethod
    def from_pretrained(cls, path_or_model, preset: str | None = None, *, tokenizer=None,
                        dtype: torch.dtype | None = None, device=None, model_kwargs: dict | None = None,
                        gguf_file: str | None = None, **kwargs) -> "HFPRM":
        """A published PRM in its own format, loaded natively (no ``trust_remote_code``).

        ``path_or_model`` is a folder or hub id, a ``.gguf`` file, or a loaded model (then ``tokenizer`` is
        required).
        ``preset=None`` detects the format (:func:`~tts_kernels.models.prm_formats.detect_preset`) and
        logs the choice. What a folder loads as, by preset:

        * ``math-shepherd``, ``rlhflow``: the causal LM (``AutoModelForCausalLM``).
        * ``qwen2.5-math-prm``, ``skywork-prm``: a ``*ForTokenClassification`` checkpoint as itself;
          otherwise the published layouts (Qwen/Qwen2.5-Math-PRM-*'s ``Qwen2ForProcessRewardModel``,
          Skywork-o1-Open-PRM's ``Qwen2ForPrmModel``): the body with transformers' own class for the
          config's ``model_type`` (``AutoModel``: Qwen2Model; the folder's ``auto_map`` is not followed)
          and the head from the checkpoint's ``score.0/score.2`` or ``v_head.summary`` weights
          (:mod:`.prm_heads`; safetensors or ``pytorch_model.bin``, sharded or not). A checkpoint with
          neither is refused, naming what was looked for. ``head_module=`` (a head of your own) or
          ``model_kwargs={"trust_remote_code": True}`` (the folder's own class) skip that reading.

        ``dtype`` (default float32) and ``device`` place the model; ``model_kwargs`` go to the
        transformers ``from_pretrained`` calls (config and model). ``gguf_file``: a GGUF file in the
        folder or repository, passed to the config, tokenizer and model loads (transformers
        dequantizes it); it holds a transformers body, so it suits the causal-LM presets, and a head
        preset's head still comes from safetensors/``.bin`` weights beside it or ``head_module=``.
        ``kwargs`` go to :class:`HFPRM` (``step_delimiter``, ``system_prompt``, ``head_module``, pool sizes)."""
        from .loading import load_config, load_model, load_tokenizer, split_gguf
        from .prm_heads import HUB_KWARGS, ScoredModel, read_head

        if isinstance(path_or_model, os.PathLike):
            path_or_model = str(path_or_model)
        name = path_or_model if isinstance(path_or_model, str) else _model_name(path_or_model)
        model_kwargs = dict(model_kwargs or {})
        if isinstance(path_or_model, str):  # a path ending in .gguf is a GGUF file (models.loading)
            path_or_model, gguf_file = split_gguf(path_or_model, gguf_file)
            config = load_config(path_or_model, gguf_file=gguf_file, **model_kwargs)
            tokenizer = tokenizer or load_tokenizer(path_or_model, gguf_file=gguf_file)
        else:
            if tokenizer is None:
                raise ValueError("HFPRM.from_pretrained(model) needs tokenizer= when given a loaded model")
            config = path_or_model.config
        if preset is None:
            preset = detect_preset(config, tokenizer, name)
            log.info("HFPRM: %s read as preset %r (detected; pass preset= to choose)", name, preset)
        elif preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        model = path_or_model
        if isinstance(path_or_model, str):
            from transformers import AutoModel, AutoModelForCausalLM, AutoModelForTokenClassification

            arch = list(getattr(config, "architectures", None) or [])
            head_preset = preset in ("qwen2.5-math-prm", "skywork-prm")
            head = None
            if head_preset and any(a.endswith("ForTokenClassification") for a in arch):
                auto = AutoModelForTokenClassification
            elif head_preset and "head_module" not in kwargs and not model_kwargs.get("trust_remote_code"):
                # Read (and checked) before the body loads: a folder without a head fails at once.
                head = read_head(path_or_model, config.get_text_config().hidden_size,
                                 {k: v for k, v in model_kwargs.items() if k in HUB_KWARGS})
                auto = AutoModel
            else:
                auto = AutoModel if preset == "qwen2.5-math-prm" else AutoModelForCausalLM
            model = load_model(path_or_model, gguf_file=gguf_file, auto=auto, dtype=dtype or torch.float32,
                               **model_kwargs)
            if head is not None:
                model = ScoredModel(model, head)
            if device is not None:
                model = model.to(device)
            model.eval()
        return cls(model, tokenizer, preset=preset, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def flop_module(self) -> torch.nn.Module:
        """What one scored token runs through, for FLOP accounting: the transformer, plus the full LM
        head for ``"likelihood"`` (a label-token head applies only two of its rows: not counted)."""
        return self.model if self.head_kind == "likelihood" else self.base

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids prefilled for ``prompt`` (a preset's lead text: :mod:`.prm_formats`)."""
        fmt = self.format
        if fmt is None:
            return self.tokenizer(prompt).input_ids
        if not fmt.whole_text:
            return fmt.prompt_ids(prompt)
        return self.tokenizer(fmt.lead(prompt), add_special_tokens=fmt.add_special_tokens).input_ids

    def encode_steps(self, steps: list[str]) -> tuple[list[int], list[int]]:
        """Token ids of ``steps`` (each followed by the step tag) and the index of each step's scored token."""
        return self.encode_many([steps])[0]

    def encode_many(self, steps: list[list[str]]) -> list[tuple[list[int], list[int]]]:
        """:meth:`encode_steps` of every row, the texts tokenized in one batch call. Not for a whole-text
        preset, whose steps have no tokens of their own (the row's text is tokenized whole)."""
        fmt = self.format
        if fmt is not None and fmt.whole_text:
            raise ValueError(f"preset {self.preset!r} tokenizes a row's whole text; its steps have no tokens apart")
        flat = [s for row in steps for s in row]
        if fmt is not None:
            toks = iter(fmt.step_ids(flat))
        else:
            toks = iter([t + self._tag_ids for t in self.tokenizer(flat, add_special_tokens=False).input_ids]
                        if flat else [])
        out = []
        for row in steps:
            ids, ends = [], []
            for _ in row:
                ids += next(toks)
                ends.append(len(ids) - 1)
            out.append((ids, ends))
        return out

    def step_overhead(self) -> int:
        """Tokens a whole-text preset adds around one step (tags, chat turns); 0 otherwise. Sizes pools."""
        fmt = self.format
        if fmt is None or not fmt.whole_text:
            return len(self._tag_ids) + (1 if fmt is not None else 0)
        if not hasattr(self, "_overhead"):
            tok = self.tokenizer
            n = len(tok(fmt.render("q", ["x" + self.step_delimiter, "x"]).text,
                        add_special_tokens=fmt.add_special_tokens).input_ids)
            lead = len(tok(fmt.lead("q"), add_special_tokens=fmt.add_special_tokens).input_ids)
            self._overhead = max(0, (n - lead) // 2)
        return self._overhead

    def start(self, prompts: list[str], *, agg: str = "last", rows: int | None = None,
              max_new_tokens: int = 256) -> "PRMSession":
        """A session with one row per prompt, the prompts prefilled once.

        ``rows`` (default: the prompts) and ``max_new_tokens`` (step tokens a row will add in
        all) size the KV pool when ``num_blocks`` was not given.
        """
        if self.format is not None:  # a format's tags and turns, for steps of about 4 tokens
            max_new_tokens += self.step_overhead() * (max_new_tokens // 4 + 1)
        return PRMSession(self, [self.encode_prompt(p) for p in prompts], agg, rows or len(prompts), max_new_tokens,
                          questions=list(prompts))

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[list[str]], *, agg: str = "last") -> "PRMScores":
        """Score every completion of every prompt, split into steps by ``step_delimiter``
        (:meth:`score_steps`)."""
        if len(completions) != len(prompts):
            raise ValueError(f"completions has {len(completions)} rows, prompts {len(prompts)}")
        return self.score_steps(prompts, [[split_steps(c, self.step_delimiter) for c in cs] for cs in completions],
                                agg=agg)

    @torch.no_grad()
    def score_steps(self, prompts: list[str], steps: list[list[list[str]]], *, agg: str = "last") -> "PRMScores":
        """Score whole candidates given as steps (``steps[p][c]``: the step texts of candidate ``c``
        of prompt ``p``): prompts prefilled once, forked per candidate, all candidates' steps in one
        chunk forward."""
        if len(steps) != len(prompts):
            raise ValueError(f"steps has {len(steps)} rows, prompts {len(prompts)}")
        flat = [st for cs in steps for st in cs]
        if self.format is not None and self.format.whole_text:  # a candidate's whole text bounds what it adds
            fmt = self.format
            qs = [q for q, cs in zip(prompts, steps) for _ in cs]
            texts = [fmt.render(q, st).text for q, st in zip(qs, flat)]
            whole = self.tokenizer(texts, add_special_tokens=fmt.add_special_tokens).input_ids if flat else []
            longest = max((len(w) for w in whole), default=0)
        else:
            longest = max((len(ids) for ids, _ in self.encode_many(flat)), default=0)
        session = self.start(prompts, agg=agg, rows=len(flat), max_new_tokens=longest)
        try:
            rows = torch.tensor([i for i, cs in enumerate(steps) for _ in cs], dtype=torch.long)
            session.fork(rows.to(self.device))
            step_scores = session.add_steps(flat)
            scores = [[float(x) for x in row[: len(st)]] for row, st in zip(step_scores.tolist(), flat)]
            out, i = [], 0
            for cs in steps:
                out.append(scores[i: i + len(cs)])
                i += len(cs)
            return PRMScores(step_scores=out, aggregate=session.aggregate.clone(), tokens=session.tokens,
                             keys=session.keys)
        finally:
            session.free()


# ----------------------------------------------------------------------------- the one verifier loader

def verifier_plan(source, *, preset: str | None = None, head: str | None = None, tokenizer=None, config=None,
                  gguf_file: str | None = None) -> tuple[str | None, str]:
    """``(preset or None, head)``: how :func:`load_verifier` reads ``source`` (a folder, hub id or ``.gguf``
    file), without loading its weights.

    * ``head`` given (one of HFPRM's heads): that generic head, no preset;
    * ``preset`` a name of :data:`~tts_kernels.models.prm_formats.PRESETS`: that published format;
    * ``preset="auto"``: the format detected (:func:`~tts_kernels.models.prm_formats.detect_preset`), an
      error naming the presets when none fits;
    * neither: the detected format when one fits, else the generic head of the config
      (:func:`~tts_kernels.models.loading.generic_head`)."""
    from .loading import generic_head, load_config, load_tokenizer, split_gguf

    if head is not None and preset is not None:
        raise ValueError(f"pass a preset ({preset!r}, the published format) or a head ({head!r}, a generic one), "
                         "not both")
    if head is not None:
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        return None, head
    if preset is not None and preset != "auto":
        if preset not in PRESETS:
            raise ValueError(f"preset must be 'auto' or one of {PRESETS}, got {preset!r}")
        return preset, PRESET_HEADS[preset]
    path, gguf_file = split_gguf(source, gguf_file)
    config = config or load_config(path, gguf_file=gguf_file)
    tokenizer = tokenizer or load_tokenizer(path, gguf_file=gguf_file)
    try:
        found = detect_preset(config, tokenizer, str(source))
    except ValueError:
        if preset == "auto":
            raise
        return None, "likelihood" if gguf_file else generic_head(config)
    return found, PRESET_HEADS[found]


def load_verifier(source, *, preset: str | None = None, head: str | None = None, reduce: str = "min",
                  step_delimiter: str = "\n\n", device="cpu", dtype=torch.float32, gguf_file=None,
                  model_kwargs: dict | None = None, **kwargs):
    """The verifier at ``source`` (a transformers folder, a hub id or a ``.gguf`` file), as every command and the
    bundled loaders load one, read as :func:`verifier_plan` says: a published format (``preset``) through
    :meth:`~tts_kernels.models.HFPRM.from_pretrained`, or a generic head (``head``: ``"likelihood"`` and
    ``"label_token"`` load a causal LM, ``"classifier"`` and ``"value"`` a token classifier; ``reduce`` is the
    likelihood's). The choice is logged. Names (the bundled verifiers, ``"none"``) are resolved above this
    layer, by :func:`tts_kernels.bundled.verifier_from`; the folder is read with :mod:`.loading`.

    ``step_delimiter`` splits completions in :meth:`HFPRM.score`; ``kwargs`` go to :class:`HFPRM` (a label-token
    head's ``good_token``/``bad_token``, ``system_prompt``, pool sizes)."""
    from .loading import load_config, load_model, load_tokenizer, split_gguf, torch_dtype

    dtype = torch_dtype(dtype)
    model_kwargs = dict(model_kwargs or {})
    path, gguf_file = split_gguf(str(source), gguf_file)
    tokenizer = load_tokenizer(path, gguf_file=gguf_file)
    config = load_config(path, gguf_file=gguf_file, **model_kwargs) if head is None else None
    preset, head = verifier_plan(str(source), preset=preset, head=head, tokenizer=tokenizer, config=config,
                                 gguf_file=gguf_file if not str(source).lower().endswith(".gguf") else None)
    log.info("verifier %s read as %s", source, f"preset {preset!r}" if preset else f"generic head {head!r}")
    if preset is not None:
        return HFPRM.from_pretrained(path, preset, tokenizer=tokenizer, dtype=dtype, device=device,
                                     gguf_file=gguf_file, model_kwargs=model_kwargs, step_delimiter=step_delimiter,
                                     **kwargs)
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    auto = AutoModelForCausalLM if head in ("likelihood", "label_token") else AutoModelForTokenClassification
    model = load_model(path, gguf_file=gguf_file, auto=auto, dtype=dtype, device=device, **model_kwargs)
    if head == "likelihood":
        kwargs["reduce"] = reduce
    return HFPRM(model, tokenizer, head=head, step_delimiter=step_delimiter, **kwargs)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


FORWARD_COST = 256  # a forward's fixed cost on CPU, in padded row-tokens (bundled PRM, 2 cores)


def length_buckets(lengths: list[int], *, max_buckets: int = 4, forward_cost: int | None = None) -> list[list[int]]:
    """Rows grouped for separate forwards, each padded to its longest row: the split of the rows sorted
    by length into at most ``max_buckets`` runs that minimises padded row-tokens plus ``forward_cost``
    per forward (exact, by dynamic programming over the distinct lengths). Rows of length 0 ride
    with the shortest group. One group (all rows, in order) when splitting does not pay.
    ``forward_cost`` defaults to :data:`FORWARD_COST`."""
    forward_cost = FORWARD_COST if forward_cost is None else forward_cost
    R = len(lengths)
    distinct = sorted(set(lengths))
    if R == 0 or len(distinct) == 1:
        return [list(range(R))]
    count = [sum(1 for n in lengths if n == d) for d in distinct]
    K = len(distinct)
    below = [0] * (K + 1)  # rows with one of the first i distinct lengths
    for i, c in enumerate(count):
        below[i + 1] = below[i] + c
    INF = float("inf")
    # best[k][i]: cheapest cost of the first i distinct lengths in k groups; cut[k][i]: where the last starts
    best = [[INF] * (K + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (K + 1) for _ in range(max_buckets + 1)]
    best[0][0] = 0
    for k in range(1, max_buckets + 1):
        for i in range(1, K + 1):
            for j in range(i):  # the last group holds distinct lengths j..i-1, padded to distinct[i-1]
                c = best[k - 1][j] + (below[i] - below[j]) * distinct[i - 1] + forward_cost
                if c < best[k][i]:
                    best[k][i], cut[k][i] = c, j
    k = min(range(1, max_buckets + 1), key=lambda k: best[k][K])
    if k == 1:
        return [list(range(R))]
    bounds, i = [], K
    while k > 0:
        j = cut[k][i]
        bounds.append((distinct[j], distinct[i - 1]))
        i, k = j, k - 1
    return [[r for r, n in enumerate(lengths) if lo <= n <= hi] for lo, hi in reversed(bounds)]


@dataclass
class PRMScores:
    step_scores: list  # [P][n][steps] floats
    aggregate: torch.Tensor  # [total candidates] float32, in prompt-major order
    tokens: int  # tokens the PRM processed
    keys: int = 0  # keys attended, summed over those tokens (attention part of the FLOP estimate)


class PRMSession:
    """Rows of candidates under a PRM: each row holds its cached history and running aggregate."""

    def __init__(self, prm: HFPRM, prompt_ids: list[list[int]], agg: str, rows: int, max_new_tokens: int,
                 questions: list[str] | None = None):
        self.prm = prm
        dev = prm.device
        P = len(prompt_ids)
        longest = max((len(p) for p in prompt_ids), default=0)
        B = prm.block_size
        # The prompts once, then per row at most one copied partial block plus its new tokens.
        blocks = prm.num_blocks or (P * (longest // B + 1) + rows * (max_new_tokens // B + 2) + 8)
        self.cache = PagedCache(prm.model, batch_size=P, num_blocks=blocks, block_size=B,
                                max_seqs=max(2 * rows + P, 16))
        self.agg = agg
        self.aggregate, self.count = init_aggregate(P, agg, device=dev)
        self.likelihood = prm.head_kind == "likelihood"
        if self.likelihood:  # running token log-prob state, and each row's last hidden state (predicts its next token)
            self.lik_state = init_likelihood_state(P, device=dev)
            self.last_hidden = torch.zeros(P, prm.weight.shape[1], device=dev, dtype=prm.weight.dtype)
        self.tokens = 0
        self.keys = 0  # keys attended, summed over the tokens run (for the FLOP estimate)
        self._lens = [0] * P  # host: tokens cached per row (known from what was sent)
        # A whole-text preset's rows on the host: question, steps so far, the token ids cached (the text's
        # tokenization so far) and the position of the last scored token (-1: none).
        self.whole_text = prm.format is not None and prm.format.whole_text
        if self.whole_text:
            if questions is None or len(questions) != P:
                raise ValueError("a whole-text preset's session needs the questions (one per prompt)")
            self._q, self._steps = list(questions), [[] for _ in range(P)]
            self._ids, self._scored = [list(p) for p in prompt_ids], [-1] * P
        self.rolled_back = 0  # tokens dropped from the cache to be run again (a whole-text boundary re-tokenized)
        self.row_budget = max_new_tokens  # tokens a row may add (sizes the pool; :meth:`blocks_for`)
        self.last_rows: tuple[list[int], list[int]] = ([], [])  # the last forward's tokens and keys, per row
        self._forward(prompt_ids, None)
        prm.kv_ledger.hold(self, blocks)

    _HOST_ROWS = ("_lens", "_q", "_steps", "_ids", "_scored")

    def _host_rows(self, rows: list[int]) -> dict:
        """The host-side row lists re-indexed by ``rows``."""
        names = self._HOST_ROWS if self.whole_text else ("_lens",)
        return {n: [getattr(self, n)[r] for r in rows] for n in names}

    @property
    def rows(self) -> int:
        return self.cache.batch_size

    @property
    def pool(self) -> tuple[int, int, int]:
        """``(blocks, block_size, free sequence slots)`` of the session's KV pool (what :meth:`admit` plans by)."""
        kv = self.cache.kv
        return kv.num_blocks, kv.block_size, kv.max_seqs - kv.num_live_seqs

    def blocks_for(self, prompts: list[str], rows: int) -> int:
        """KV blocks that ``prompts`` and ``rows`` rows grown from them may hold at most (each row its tokens'
        blocks, a partial block copied on write and one of rounding), as the pool was sized."""
        B = self.cache.kv.block_size
        return (sum(-(-len(self.prm.encode_prompt(p)) // B) for p in prompts)
                + rows * (self.row_budget // B + 2))

    @torch.no_grad()
    def admit(self, prompts: list[str]) -> None:
        """Prefill new prompts into this session's pool (one forward over just them, as :meth:`HFPRM.start`
        does): they become rows ``rows .. rows + len(prompts) - 1``, after the rows now, which are untouched.
        What a search that takes new requests at its host looks calls (continuous batching). On an error
        nothing is added."""
        if not prompts:
            raise ValueError("admit: no prompts")
        prm, dev = self.prm, self.aggregate.device
        ids = [prm.encode_prompt(p) for p in prompts]
        k = len(ids)
        new = copy.copy(self)  # the new rows alone, over the same pool
        new.cache = PagedCache(prm.model, batch_size=k, kv=self.cache.kv)
        new.aggregate, new.count = init_aggregate(k, self.agg, device=dev)
        if self.likelihood:
            new.lik_state = init_likelihood_state(k, device=dev)
            new.last_hidden = torch.zeros(k, prm.weight.shape[1], device=dev, dtype=prm.weight.dtype)
        new.tokens = new.keys = 0
        new._lens = [0] * k
        if self.whole_text:
            new._q, new._steps = list(prompts), [[] for _ in range(k)]
            new._ids, new._scored = [list(p) for p in ids], [-1] * k
        try:
            new._forward(ids, None)
        except BaseException:
            new.cache.free()
            raise
        self.cache.adopt(new.cache)
        self.aggregate, self.count = torch.cat([self.aggregate, new.aggregate]), torch.cat([self.count, new.count])
        if self.likelihood:
            self.lik_state = tuple(torch.cat([a, b]) for a, b in zip(self.lik_state, new.lik_state))
            self.last_hidden = torch.cat([self.last_hidden, new.last_hidden])
        for name in self._HOST_ROWS if self.whole_text else ("_lens",):
            setattr(self, name, getattr(self, name) + getattr(new, name))
        self.tokens += new.tokens
        self.keys += new.keys
        self.last_rows = new.last_rows

    def clone(self, rows: torch.Tensor) -> "PRMSession":
        """A second session over the same KV pool continuing ``rows`` of this one (unchanged);
        its ``tokens`` count starts at 0."""
        rows = rows.to(self.aggregate.device)
        other = copy.copy(self)
        other.cache = self.cache.spawn(rows)
        other.aggregate = self.aggregate.index_select(0, rows)
        other.count = self.count.index_select(0, rows)
        if self.likelihood:
            other.lik_state = tuple(t.index_select(0, rows) for t in self.lik_state)
            other.last_hidden = self.last_hidden.index_select(0, rows)
        other.tokens = other.keys = 0
        other.__dict__.update(self._host_rows(rows.tolist()))
        return other

    def fork(self, rows: torch.Tensor) -> None:
        """New row ``j`` continues row ``rows[j]`` (history shared, aggregate copied)."""
        rows = rows.to(self.aggregate.device)
        self.cache.fork(rows)
        self.__dict__.update(self._host_rows(rows.tolist()))
        self.aggregate = self.aggregate.index_select(0, rows)
        self.count = self.count.index_select(0, rows)
        if self.likelihood:
            self.lik_state = tuple(t.index_select(0, rows) for t in self.lik_state)
            self.last_hidden = self.last_hidden.index_select(0, rows)

    @torch.no_grad()
    def add_steps(self, steps: list[list[str]]) -> torch.Tensor:
        """Append ``steps[r]`` (a list of step texts, possibly empty) to row ``r`` and score them.

        Returns ``[rows, S]`` float32 step scores (NaN past a row's steps); the running
        ``aggregate`` and ``count`` are updated.
        """
        if len(steps) != self.rows:
            raise ValueError(f"steps has {len(steps)} rows, the session {self.rows}")
        if self.whole_text:
            return self._add_whole(steps)
        enc = self.prm.encode_many(steps)
        return self._forward([e[0] for e in enc], [e[1] for e in enc])

    def _add_whole(self, steps: list[list[str]]) -> torch.Tensor:
        """A whole-text preset's step: each row with new steps is rendered and tokenized whole; its cache
        keeps the longest token prefix it shares with that, the rest is rolled back and the tail run. The
        rows are checked before anything changes: a merge that moves a scored token is an error."""
        fmt, tok = self.prm.format, self.prm.tokenizer
        todo = [r for r, new in enumerate(steps) if new]
        rendered = [fmt.render(self._q[r], self._steps[r] + list(steps[r])) for r in todo]
        enc = tok([x.text for x in rendered], add_special_tokens=fmt.add_special_tokens,
                  return_offsets_mapping=True) if todo else None
        new_ids: list[list[int]] = [[] for _ in steps]
        ends: list[list[int]] = [[] for _ in steps]
        keep, plans = {}, []
        for i, r in enumerate(todo):
            ids, offsets = enc.input_ids[i], enc.offset_mapping[i]
            token_ends = [e for _, e in offsets]
            pos = []
            for a, b in rendered[i].spans[len(self._steps[r]):]:
                j = bisect.bisect_right(token_ends, b) - 1
                if j < 0 or token_ends[j] != b or offsets[j][0] < a or fmt.tag_id not in (None, ids[j]):
                    raise ValueError(f"preset {fmt.name!r} ({fmt.model_name}): row {r}'s text tokenizes with its "
                                     f"scored token merged into a step's text (characters {a}..{b} of "
                                     f"{rendered[i].text[max(0, a - 20): b + 20]!r}); it cannot be scored")
                pos.append(j)
            k = _common_prefix(self._ids[r], ids)
            if k <= self._scored[r]:
                raise ValueError(f"preset {fmt.name!r} ({fmt.model_name}): row {r}'s new steps re-tokenize its "
                                 f"scored text (token {k}, at or before the last scored token {self._scored[r]})")
            k = min([k] + pos)  # a scored token's hidden state is needed: it is run again if already cached
            keep[r] = k
            new_ids[r], ends[r] = ids[k:], [p - k for p in pos]
            plans.append((r, ids, pos))
        cut = [r for r in todo if keep[r] < self._lens[r]]
        if cut:
            dev = self.aggregate.device
            self.cache.truncate(torch.tensor(cut, dtype=torch.long, device=dev),
                                torch.tensor([keep[r] for r in cut], dtype=torch.long, device=dev))
            for r in cut:
                self.rolled_back += self._lens[r] - keep[r]
                self._lens[r], self._ids[r] = keep[r], self._ids[r][: keep[r]]
        out = self._forward(new_ids, ends)
        for r, ids, pos in plans:
            self._ids[r], self._steps[r] = ids, self._steps[r] + list(steps[r])
            self._scored[r] = pos[-1] if pos else self._scored[r]
        return out

    def _forward(self, ids: list[list[int]], ends: list[list[int]] | None) -> torch.Tensor:
        """Run every row's new tokens: rows of similar length together (:func:`length_buckets`), so a
        batch of short steps is not padded to its longest one."""
        lengths = [len(x) for x in ids]
        self.last_rows = (lengths, [n * self._lens[r] + n * (n + 1) // 2 for r, n in enumerate(lengths)])
        run = [r for r, n in enumerate(lengths) if n]  # rows with nothing new are left out
        groups = [[run[i] for i in g] for g in length_buckets([lengths[r] for r in run])] if run else []
        if len(groups) == 1 and len(groups[0]) == len(ids):
            return self._forward_batch(ids, ends)
        S = max((len(e) for e in ends), default=0) if ends is not None else 0
        out = torch.full((len(ids), S), float("nan"), device=self.aggregate.device)
        for g in groups:
            rows = torch.tensor(g, dtype=torch.long, device=self.aggregate.device)
            with self._only(g, rows):
                got = self._forward_batch([ids[r] for r in g], None if ends is None else [ends[r] for r in g])
            out[rows, : got.shape[1]] = got
        return out

    @contextlib.contextmanager
    def _only(self, g: list[int], rows: torch.Tensor):
        """Within the block the session is just rows ``g`` (their cache rows and running state);
        the state they end with is written back to the full rows on exit."""
        names = ["aggregate", "count"] + (["last_hidden"] if self.likelihood else [])
        full = {n: getattr(self, n) for n in names}
        full_lik = self.lik_state if self.likelihood else None
        full_lens = self._lens
        for n in names:
            setattr(self, n, full[n].index_select(0, rows))
        if self.likelihood:
            self.lik_state = tuple(t.index_select(0, rows) for t in full_lik)
        self._lens = [full_lens[r] for r in g]
        try:
            with self.cache.only(rows):
                yield
            for n in names:
                full[n] = full[n].index_copy(0, rows, getattr(self, n))
            if self.likelihood:
                full_lik = tuple(f.index_copy(0, rows, t) for f, t in zip(full_lik, self.lik_state))
            for r, n in zip(g, self._lens):
                full_lens[r] = n
        finally:
            for n in names:
                setattr(self, n, full[n])
            if self.likelihood:
                self.lik_state = full_lik
            self._lens = full_lens

    def _forward_batch(self, ids: list[list[int]], ends: list[list[int]] | None) -> torch.Tensor:
        dev = self.aggregate.device
        R = len(ids)
        t = max((len(x) for x in ids), default=0)
        S = max((len(e) for e in ends), default=0) if ends is not None else 0
        if t == 0:
            return torch.full((R, S), float("nan"), device=dev)
        pad = self.prm.tokenizer.pad_token_id or 0
        batch = torch.full((R, t), pad, dtype=torch.long)
        mask = torch.zeros(R, t, dtype=torch.long)
        positions = torch.full((R, max(S, 1)), -1, dtype=torch.long)
        for r, x in enumerate(ids):  # host-side packing of token lists: no device data involved
            off = t - len(x)
            if x:
                batch[r, off:] = torch.tensor(x)
                mask[r, off:] = 1
            if ends is not None and ends[r]:
                positions[r, : len(ends[r])] = torch.tensor(ends[r]) + off
        batch, mask, positions = batch.to(dev), mask.to(dev), positions.to(dev)
        self.cache.set_attention_mask(mask)
        pos_ids = self.cache.position_ids(t)
        self.cache.set_attention_mask(mask)  # position_ids() does not consume it; update() does
        args = self.prm.forward_args(self.cache, input_ids=batch, position_ids=pos_ids, use_cache=True)
        out = self.prm.base(**args)
        self.tokens += sum(len(x) for x in ids)
        for r, x in enumerate(ids):
            self.keys += len(x) * self._lens[r] + len(x) * (len(x) + 1) // 2
            self._lens[r] += len(x)
        hidden = out.last_hidden_state
        if self.likelihood:
            return self._likelihood(hidden, batch, mask, ids, positions, S, scored=ends is not None)
        if ends is None:
            return torch.empty(R, 0, device=dev)
        if self.prm.pre_head is not None:  # a deeper head: its first layers on the step ends only
            valid = positions >= 0
            at = torch.where(valid, positions, 0)
            hidden = self.prm.pre_head(hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1])))
            positions = torch.where(valid, torch.arange(positions.shape[1], device=dev), -1)
        scores, self.aggregate, self.count = prm_score(
            hidden, positions, self.prm.weight, self.prm.bias, aggregate=self.aggregate, count=self.count,
            agg=self.agg, positive_class=self.prm.positive_class)
        return scores[:, :S]

    def _likelihood(self, hidden, batch, mask, ids, positions, S, *, scored: bool) -> torch.Tensor:
        """Log-probability of every new token (predicted by the hidden state before it: the row's
        last one for its first new token), folded by :func:`prefix_likelihood`. The prompt prefill
        (``scored=False``) only records each row's last hidden state."""
        R, t = batch.shape
        dev = hidden.device
        nonempty = torch.tensor([len(x) > 0 for x in ids], device=dev)
        if scored:
            first = torch.tensor([t - len(x) for x in ids], device=dev)  # left padding: a row's first new token
            shifted = torch.cat([hidden[:, :1], hidden[:, :-1]], 1)
            is_first = torch.arange(t, device=dev)[None, :] == first[:, None]
            pred = torch.where(is_first[..., None], self.last_hidden[:, None, :].to(hidden.dtype), shifted)
            W, b = self.prm.weight, self.prm.bias
            lp = torch.empty(R, t, device=dev)
            step = max(1, (1 << 24) // max(1, t * W.shape[0]))  # rows per chunk: at most ~16M logits at once
            for r0 in range(0, R, step):
                z = torch.nn.functional.linear(pred[r0: r0 + step].to(W.dtype), W, b).float()
                lp[r0: r0 + step] = z.gather(-1, batch[r0: r0 + step, :, None]).squeeze(-1) - z.logsumexp(-1)
            lp = torch.where(mask.bool(), lp, float("nan"))
            scores, self.lik_state = prefix_likelihood(lp, positions, self.lik_state, reduce=self.prm.reduce)
            valid = (positions >= 0) & (positions < t)
            self.aggregate, self.count = fold_step_scores(scores, valid, self.aggregate, self.count, self.agg)
        self.last_hidden = torch.where(nonempty[:, None], hidden[:, -1].to(self.last_hidden.dtype), self.last_hidden)
        return scores[:, :S] if scored else torch.empty(R, 0, device=dev)

    def free(self) -> None:
        self.cache.free()
        self.prm.kv_ledger.release(self)
