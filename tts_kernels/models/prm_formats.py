"""How the published PRMs read a solution: each model's own input format, as a preset of :class:`HFPRM`.

A PRM read in a format it was not trained on is a bad verifier, so every preset renders a
question and its steps exactly as the model's card and reference code do, and says where its
score is read. The rules, and where each comes from:

``"math-shepherd"`` (peiyi9979/math-shepherd-mistral-7b-prm; its model card, and search-and-learn's
    ``MathShepherd`` in ``src/sal/models/reward_models.py``). A causal LM. The text is the question,
    a space, then the steps, each followed by the step tag ``" ки"`` placed before the step's
    delimiter (search-and-learn turns every ``"\\n\\n"`` into ``" ки\\n\\n"`` and tags the last step
    too). Tokenized whole, with the tokenizer's special tokens (BOS). A step scores
    ``softmax(logits[+, -])[+]`` at its tag token; the label tokens are the two tokens of
    ``"+ -"`` (the card's ``encode("+ -")[1:]``).
``"rlhflow"`` (RLHFlow/Llama3.1-8B-PRM-Deepseek-Data and -Mistral-Data; search-and-learn's default PRM
    (``RLHFFlow``), after RLHFlow's ``math-rm/prm_evaluate.py``). A causal LM read as a chat: every
    step is a user turn (the first one is ``question + " " + step``), every step's user turn is
    followed by an assistant turn whose content is ``"+"``, rendered with the tokenizer's own chat
    template and tokenized without adding special tokens (the template writes them). A step
    scores ``softmax(logits[+, -])[+]`` at the token before its assistant ``"+"`` (the position
    that predicts it); the label tokens are the last tokens of ``"+"`` and ``"-"``.
``"qwen2.5-math-prm"`` (Qwen/Qwen2.5-Math-PRM-7B; its model card). A 2-class token classifier read
    as a chat: system prompt (the card's step-by-step one unless ``system_prompt=`` is given), the
    question as the user turn, and the assistant turn holding the steps, each followed by the
    step separator ``"<extra_0>"`` (which replaces the step's delimiter, and follows the last step
    too). Tokenized whole with ``encode``'s defaults. A step scores ``softmax(logits)[1]`` at its
    separator. The card's model is ``Qwen2ForProcessRewardModel`` (``score``: Linear, ReLU,
    Linear; ``HFPRM.from_pretrained`` builds it from the checkpoint without the remote code:
    :mod:`.prm_heads`); a ``*ForTokenClassification`` with 2 labels reads the same way.
``"skywork-prm"`` (Skywork/Skywork-o1-Open-PRM-Qwen-2.5-*; the card's ``prepare_input`` in
    skywork-o1-prm-inference, used as is by search-and-learn's ``SkyworkO1``). A value head on a
    causal LM. Unlike the others the pieces are tokenized apart: ``encode(bos + question + "\\n")``,
    then per step ``encode(step)`` (empty step: no tokens) followed by the id of ``"\\n"``. A step
    scores ``sigmoid(value)`` at that newline. Their code splits a response at every ``"\\n"``;
    here a step is one of the search's steps (the PRM's ``step_delimiter`` removed), so set
    ``step_delimiter="\\n"`` to score every line as their code does. The value head is Skywork's
    ``v_head.summary`` (read from the checkpoint by ``HFPRM.from_pretrained``: :mod:`.prm_heads`),
    a 1-label ``*ForTokenClassification`` head, or ``head_module=``.

Every preset takes the steps as the searches give them (the delimiter kept at the end of every
step but the last) and strips one trailing ``step_delimiter`` from each to get the step's body.

Whole-text presets (all but Skywork) are tokenized as one string, as their reference code does,
so a step boundary can tokenize differently from the pieces (a step starting with a space after
a newline, merges across the boundary). :class:`~tts_kernels.models.prm.PRMSession` handles
that exactly: it re-renders and re-tokenizes a row's text, keeps the KV of the longest common
token prefix with what it holds, rolls the rest back, and runs only the tail. A score is read
only where the scored token lies inside the format's own text (a tag, a template's header), so
a merge that would swallow it is refused with an error, never scored silently wrong.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("tts_kernels")

PRESETS = ("math-shepherd", "rlhflow", "qwen2.5-math-prm", "skywork-prm")
QWEN_PRM_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
SHEPHERD_TAG = " ки"
QWEN_SEPARATOR = "<extra_0>"

# Markers that cannot occur in a chat template's own text: where a probe's contents land.
_M1, _M2, _A = "\u27e6tts-user-1\u27e7", "\u27e6tts-user-2\u27e7", "\u27e6tts-assistant\u27e7"


def _has_shepherd_tag(tokenizer) -> bool:
    ids = tokenizer(SHEPHERD_TAG, add_special_tokens=False).input_ids
    return bool(ids) and tokenizer.decode(ids[-1:]).strip() == "ки"


def _body(step: str, delimiter: str) -> tuple[str, str]:
    """``step`` less one trailing ``delimiter``, and that delimiter ('' when it had none)."""
    if step.endswith(delimiter):
        return step[: len(step) - len(delimiter)], delimiter
    return step, ""


@dataclass
class Rendered:
    """A row's whole text and, per step, the span ``(start, end)`` of characters its scored token
    must lie in and end at (the format's own text, never a step's)."""

    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)


class PRMFormat:
    """One preset's rules (see the module docstring). ``head``: ``"label_token"``, ``"classifier"`` or
    ``"value"``; ``labels``: the (good, bad) token ids of a label-token head; ``whole_text``: the row
    is tokenized as one string (else piecewise: :meth:`prompt_ids` and :meth:`step_ids`)."""

    name: str
    head: str
    whole_text = True
    add_special_tokens = True
    labels: tuple[int, int] | None = None
    tag_id: int | None = None  # the token every scored position must hold (None: any token inside the span)

    def __init__(self, tokenizer, step_delimiter: str, model_name: str):
        self.tokenizer, self.delimiter, self.model_name = tokenizer, step_delimiter, model_name

    def lead(self, question: str) -> str:
        """The text prefilled for a prompt: what every row of it most likely starts with (a longer
        or different start is rolled back to the common tokens)."""
        raise NotImplementedError

    def render(self, question: str, steps: list[str]) -> Rendered:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[str]]:
        """``(question, steps)`` whose rendering is ``text`` (up to its last scored token; what follows it, a
        template's closing text, does not change a causal model's scores): the inverse of :meth:`render`, for
        text written in the format by someone else (a vLLM pooling client). A ``ValueError`` saying why when
        ``text`` is not in the format."""
        raise ValueError(f"preset {self.name!r}: its text cannot be read back into a question and steps; send the "
                         "question and the steps apart")

    def _read_back(self, text: str, question: str, steps: list[str]) -> tuple[str, list[str]]:
        """``(question, steps)`` once their rendering is checked to be ``text``'s start."""
        if not steps:
            raise ValueError(f"preset {self.name!r}: the text has no scored step")
        if not text.startswith(self.render(question, steps).text):
            raise ValueError(f"preset {self.name!r}: the text is not in the format {self.model_name} reads "
                             "(rendering what was read from it does not give it back)")
        return question, steps

    def _steps(self, pieces: list[str]) -> list[str]:
        """Steps whose bodies are ``pieces`` (the delimiter after every one but the last, as a search gives them)."""
        return [p + self.delimiter for p in pieces[:-1]] + pieces[-1:]

    def _single(self, text: str, what: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"preset {self.name!r}: {what} {text!r} is not one token of {self.model_name}'s "
                             f"tokenizer (ids {ids})")
        return ids[0]


class MathShepherd(PRMFormat):
    name, head = "math-shepherd", "label_token"

    def __init__(self, tokenizer, step_delimiter, model_name):
        super().__init__(tokenizer, step_delimiter, model_name)
        ids = tokenizer("+ -", add_special_tokens=False).input_ids
        if len(ids) != 2:
            raise ValueError(f"preset 'math-shepherd': the labels '+ -' are {len(ids)} tokens of {model_name}'s "
                             f"tokenizer (ids {ids}); the format needs one token each")
        self.labels = (ids[0], ids[1])
        self.tag_id = tokenizer.encode("ки")[-1]  # the card's step_tag_id
        if not _has_shepherd_tag(tokenizer):
            raise ValueError(f"preset 'math-shepherd': the step tag {SHEPHERD_TAG!r} does not end in one 'ки' "
                             f"token of {model_name}'s tokenizer "
                             f"(ids {tokenizer(SHEPHERD_TAG, add_special_tokens=False).input_ids})")

    def lead(self, question):
        return question

    def parse(self, text):
        # question + " " + every step's body, tag and delimiter; what follows the last tag is not scored. Where
        # the question ends cannot be told from the text, nor does it matter (only the tags are scored, and the
        # text is tokenized whole): the question is read up to the first space.
        cut = text.find(" ")
        end = text.rfind(SHEPHERD_TAG)
        if cut < 0 or end < cut:
            raise ValueError(f"preset {self.name!r}: the text has no step tag {SHEPHERD_TAG!r} after its question")
        pieces = text[cut + 1: end].split(SHEPHERD_TAG)  # each but the first starts with its step's delimiter
        bodies, ends = [pieces[0]], []
        for p in pieces[1:]:
            d = self.delimiter if p.startswith(self.delimiter) else ""
            ends.append(d)
            bodies.append(p[len(d):])
        tail = text[end + len(SHEPHERD_TAG):]
        ends.append(self.delimiter if tail.startswith(self.delimiter) else "")
        return self._read_back(text, text[:cut], [b + d for b, d in zip(bodies, ends)])

    def render(self, question, steps):
        parts, spans, n = [question, " "], [], len(question) + 1
        for step in steps:
            body, delim = _body(step, self.delimiter)
            n += len(body)
            spans.append((n, n + len(SHEPHERD_TAG)))
            n += len(SHEPHERD_TAG) + len(delim)
            parts += [body, SHEPHERD_TAG, delim]
        return Rendered("".join(parts), spans)


def _render_chat(tokenizer, messages, model_name, preset) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"preset {preset!r} reads a chat, but {model_name}'s tokenizer has no chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    for m in messages:
        if m["content"].strip() and m["content"].strip() not in text:
            raise ValueError(f"preset {preset!r}: {model_name}'s chat template renders a {m['role']} turn "
                             f"without its content")
    return text


def _trims(tokenizer, make, model_name, preset) -> bool:
    """Whether the template strips a content's surrounding whitespace (Llama 3's ``| trim``)."""
    return f" {_M1} " not in _render_chat(tokenizer, make(f" {_M1} "), model_name, preset)


class RLHFlow(PRMFormat):
    name, head = "rlhflow", "label_token"
    add_special_tokens = False  # the template writes BOS; apply_chat_template tokenizes without adding more

    def __init__(self, tokenizer, step_delimiter, model_name):
        super().__init__(tokenizer, step_delimiter, model_name)
        plus = tokenizer("+", add_special_tokens=False).input_ids
        minus = tokenizer("-", add_special_tokens=False).input_ids
        if not plus or not minus:
            raise ValueError(f"preset 'rlhflow': '+' or '-' encodes to nothing with {model_name}'s tokenizer")
        self.labels = (plus[-1], minus[-1])

        def conv(*users, answer=_A):
            out = []
            for u in users:
                out += [{"role": "user", "content": u}, {"role": "assistant", "content": answer}]
            return out

        one = _render_chat(tokenizer, conv(_M1), model_name, self.name)
        two = _render_chat(tokenizer, conv(_M1, _M2), model_name, self.name)
        i = one.index(_M1)
        self.head_text, rest = one[:i], one[i + len(_M1):]
        j = rest.index(_A)
        self.mid, self.post = rest[:j], rest[j + len(_A):]  # user end + assistant header; assistant end
        turn = two[len(one):]
        if not two.startswith(one) or _M2 not in turn or turn[turn.index(_M2) + len(_M2):] != rest:
            raise ValueError(f"preset 'rlhflow': {model_name}'s chat template does not render the conversation "
                             f"turn by turn (a later turn changes the text before it)")
        self.pre = turn[: turn.index(_M2)]
        self.trim = _trims(tokenizer, lambda c: conv(c), model_name, self.name)
        _check_against_template(self, tokenizer,
                                lambda q, bodies: conv(*([q + " " + bodies[0]] + bodies[1:]), answer="+"))

    def _content(self, text):
        return text.strip() if self.trim else text

    def lead(self, question):
        return self.head_text + (question.lstrip() if self.trim else question)

    def render(self, question, steps):
        parts, spans, n = [], [], 0
        for k, step in enumerate(steps):
            body = _body(step, self.delimiter)[0]
            content = self._content(question + " " + body if k == 0 else body)
            piece = (self.head_text if k == 0 else self.pre) + content
            parts.append(piece)
            n += len(piece)
            spans.append((n, n + len(self.mid)))  # the token before "+" ends the assistant header
            parts += [self.mid, "+", self.post]
            n += len(self.mid) + 1 + len(self.post)
        if not steps:
            return Rendered(self.lead(question), [])
        return Rendered("".join(parts), spans)


class QwenMathPRM(PRMFormat):
    name, head = "qwen2.5-math-prm", "classifier"

    def __init__(self, tokenizer, step_delimiter, model_name, system_prompt=None):
        super().__init__(tokenizer, step_delimiter, model_name)
        self.tag_id = self._single(QWEN_SEPARATOR, "the step separator")
        self.system = QWEN_PRM_SYSTEM_PROMPT if system_prompt is None else system_prompt

        def conv(q, a=_A):
            return [{"role": "system", "content": self.system}, {"role": "user", "content": q},
                    {"role": "assistant", "content": a}]

        text = _render_chat(tokenizer, conv(_M1), model_name, self.name)
        i = text.index(_M1)
        self.before, rest = text[:i], text[i + len(_M1):]
        self.between = rest[: rest.index(_A)]
        self.trim = _trims(tokenizer, conv, model_name, self.name)
        _check_against_template(self, tokenizer, lambda q, bodies: conv(q, "".join(
            b + QWEN_SEPARATOR for b in bodies)), tail=True)

    def lead(self, question):
        return self.before + (question.strip() if self.trim else question) + self.between

    def parse(self, text):
        # system turn, question, the assistant turn's steps each followed by <extra_0>, the template's close.
        if not text.startswith(self.before):
            raise ValueError(f"preset {self.name!r}: the text does not open with {self.model_name}'s chat template "
                             f"and the system prompt this verifier was loaded with ({self.system!r})")
        rest = text[len(self.before):]
        cut, end = rest.find(self.between), rest.rfind(QWEN_SEPARATOR)
        if cut < 0 or end < cut + len(self.between):
            raise ValueError(f"preset {self.name!r}: the text has no assistant turn with a step separator "
                             f"{QWEN_SEPARATOR!r}")
        pieces = rest[cut + len(self.between): end].split(QWEN_SEPARATOR)
        return self._read_back(text, rest[:cut], self._steps(pieces))

    def render(self, question, steps):
        head = self.lead(question)
        content, spans = "", []
        for step in steps:
            content += _body(step, self.delimiter)[0]
            spans.append((len(content), len(content) + len(QWEN_SEPARATOR)))
            content += QWEN_SEPARATOR
        if self.trim:  # the content ends with the separator: only its start can lose whitespace
            cut = len(content) - len(content.lstrip())
            content, spans = content[cut:], [(a - cut, b - cut) for a, b in spans]
        return Rendered(head + content, [(a + len(head), b + len(head)) for a, b in spans])


class SkyworkPRM(PRMFormat):
    name, head = "skywork-prm", "value"
    whole_text = False

    def __init__(self, tokenizer, step_delimiter, model_name):
        super().__init__(tokenizer, step_delimiter, model_name)
        ids = tokenizer.encode("\n")
        if not ids:
            raise ValueError(f"preset 'skywork-prm': '\\n' encodes to nothing with {model_name}'s tokenizer")
        self.newline = ids[-1]

    def prompt_ids(self, question: str) -> list[int]:
        return self.tokenizer.encode((self.tokenizer.bos_token or "") + question + "\n")

    def step_ids(self, steps: list[str]) -> list[list[int]]:
        """Each step's tokens (its newline last, where it is scored)."""
        bodies = [_body(s, self.delimiter)[0] for s in steps]
        enc = self.tokenizer([b for b in bodies if b]).input_ids if any(bodies) else []
        it = iter(enc)
        return [(next(it) if b else []) + [self.newline] for b in bodies]


# preset -> the HFPRM head it reads with (what `serve`/`eval` report before loading a folder).
PRESET_HEADS = {f.name: f.head for f in (MathShepherd, RLHFlow, QwenMathPRM, SkyworkPRM)}


def _check_against_template(fmt, tokenizer, conversation, tail: bool = False) -> None:
    """The rendering must be the template's own text (up to where the last score is read when
    ``tail``: what follows it does not change a causal model's scores). Checked once, on a
    conversation whose contents carry leading and trailing spaces."""
    q, bodies = " What is 1 + 1? ", [" One plus one ", "is 2. ", "\n", "x"]
    want = tokenizer.apply_chat_template(conversation(q, bodies), tokenize=False, add_generation_prompt=False)
    got = fmt.render(q, [b + fmt.delimiter for b in bodies[:-1]] + bodies[-1:]).text
    if (not want.startswith(got)) if tail else want != got:
        raise ValueError(f"preset {fmt.name!r}: {fmt.model_name}'s chat template renders differently from the "
                         f"format's turn-by-turn text; this preset cannot read it")


def make_format(preset: str, tokenizer, step_delimiter: str, *, model_name: str = "the PRM",
                system_prompt: str | None = None) -> PRMFormat:
    """The :class:`PRMFormat` of ``preset`` for ``tokenizer`` (its special tokens and template checked)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if system_prompt is not None and preset != "qwen2.5-math-prm":
        raise ValueError(f"system_prompt is part of the 'qwen2.5-math-prm' format only, not {preset!r}")
    if preset in ("math-shepherd", "rlhflow", "qwen2.5-math-prm") and not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"preset {preset!r} needs a fast tokenizer (character offsets) for {model_name}")
    if preset == "qwen2.5-math-prm":
        return QwenMathPRM(tokenizer, step_delimiter, model_name, system_prompt)
    return {"math-shepherd": MathShepherd, "rlhflow": RLHFlow, "skywork-prm": SkyworkPRM}[preset](
        tokenizer, step_delimiter, model_name)


def detect_preset(config, tokenizer, name: str = "") -> str:
    """The preset of a PRM, from its name, architecture, label count and special tokens; an error naming
    the presets when none fits. The rules, in order:

    1. the name (``name`` or ``config._name_or_path``) mentions a published PRM: ``math-shepherd``,
       ``rlhflow``, ``qwen2.5-math-prm``, ``skywork`` with ``prm``;
    2. a ``*ForProcessRewardModel`` architecture (Qwen's), or a token classifier with 2 labels whose
       tokenizer has ``<extra_0>``: ``qwen2.5-math-prm``; a ``*ForPrmModel`` architecture (Skywork's
       ``Qwen2ForPrmModel``) or a token classifier with 1 label: ``skywork-prm``;
    3. a causal LM without a chat template whose tokenizer has the Math-Shepherd tag: ``math-shepherd``.
    """
    label = name or getattr(config, "_name_or_path", "") or ""
    low = label.lower()
    for key, preset in (("math-shepherd", "math-shepherd"), ("rlhflow", "rlhflow"),
                        ("qwen2.5-math-prm", "qwen2.5-math-prm")):
        if key in low:
            return preset
    if "skywork" in low and "prm" in low:
        return "skywork-prm"
    arch = list(getattr(config, "architectures", None) or [])
    labels = getattr(config, "num_labels", None)
    vocab = tokenizer.get_vocab()
    if any(a.endswith("ForProcessRewardModel") for a in arch):
        return "qwen2.5-math-prm"
    if any(a.endswith("ForPrmModel") for a in arch):
        return "skywork-prm"
    if any(a.endswith("ForTokenClassification") for a in arch):
        if labels == 2 and QWEN_SEPARATOR in vocab:
            return "qwen2.5-math-prm"
        if labels == 1:
            return "skywork-prm"
    if any(a.endswith("ForCausalLM") for a in arch) and not getattr(tokenizer, "chat_template", None):
        if _has_shepherd_tag(tokenizer):
            return "math-shepherd"
    raise ValueError(f"cannot tell which PRM format {label or 'the model'} reads (architectures {arch}, "
                     f"{labels} labels); pass preset= one of {PRESETS}, or use HFPRM(model, tokenizer, head=...) "
                     f"for a generic head")
