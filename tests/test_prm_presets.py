"""PRM presets: each published PRM's own input format, scored incrementally, against a reference that
formats the text by hand as the model's card (or search-and-learn's reference code) says and runs one
plain transformers forward over it.

Models: random ones of the matching architecture; tokenizers trained here with the family's special
tokens and chat template (tts_kernels.bench.prm_presets). Steps: random splits with leading spaces,
newlines, separator characters, empty steps; added to a session a few at a time, with forks between.
"""
import random

import pytest
import torch

from tts_kernels.bench.prm_presets import model_for, random_text, tokenizer_for
from tts_kernels.models import HFPRM
from tts_kernels.models.prm_formats import PRESETS, detect_preset

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min)

TOL = 1e-5


@pytest.fixture(scope="module")
def built():
    """preset -> (tokenizer, model), built once."""
    out = {}
    for preset in PRESETS:
        tok = tokenizer_for(preset)
        out[preset] = (tok, model_for(preset, len(tok)))
    return out


# ---------------------------------------------------------------- references, written from the model cards

def _forward(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def _bodies(steps, delim):
    return [s[: -len(delim)] if s.endswith(delim) else s for s in steps]


def ref_math_shepherd(model, tok, question, steps, delim="\n\n"):
    # Card: input_for_prm = f"{question} {output}", " ки" after every step (search-and-learn puts it before the
    # step's "\n\n"); candidate tokens encode("+ -")[1:]; step_tag_id encode("ки")[-1]; score softmax(...)[0].
    output = "".join(b + " ки" + (delim if s.endswith(delim) else "") for b, s in zip(_bodies(steps, delim), steps))
    ids = tok(f"{question} {output}").input_ids
    good, bad = tok.encode("+ -")[1:]
    tag = tok.encode("ки")[-1]
    logits = _forward(model, ids)
    scores = logits[:, [good, bad]].softmax(-1)[:, 0]
    at = [i for i, t in enumerate(ids) if t == tag]
    assert len(at) == len(steps)
    return [float(scores[i]) for i in at]


def ref_rlhflow(model, tok, question, steps, delim="\n\n"):
    # search-and-learn RLHFFlow._score_batched: user turns question + " " + step 1, then each step; each
    # followed by an assistant "+"; a parallel conversation with "ки" marks where "+" is; the score of a
    # step is softmax(logits[+, -])[+] at the position before it.
    conv, conv2 = [], []
    for k, b in enumerate(_bodies(steps, delim)):
        text = question + " " + b if k == 0 else b
        conv += [{"role": "user", "content": text}, {"role": "assistant", "content": "+"}]
        conv2 += [{"role": "user", "content": text}, {"role": "assistant", "content": "ки"}]
    ids = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False).input_ids
    ids2 = tok(tok.apply_chat_template(conv2, tokenize=False), add_special_tokens=False).input_ids
    assert len(ids) == len(ids2)
    plus, minus = tok.encode("+")[-1], tok.encode("-")[-1]
    marker = tok("ки", add_special_tokens=False).input_ids
    assert len(marker) == 1
    scores = _forward(model, ids)[:, [plus, minus]].softmax(-1)[:, 0]
    at = [i for i in range(len(ids2) - 1) if ids2[i + 1] == marker[0]]
    assert len(at) == len(steps)
    return [float(scores[i]) for i in at]


QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def ref_qwen(model, tok, question, steps, delim="\n\n", system=QWEN_SYSTEM):
    # Card: system prompt, the query, the assistant turn "<extra_0>".join(steps) + "<extra_0>";
    # input_ids = tokenizer.encode(conversation_str); rewards softmax(logits)[:, 1] where ids == <extra_0>.
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question},
                {"role": "assistant", "content": "<extra_0>".join(_bodies(steps, delim)) + "<extra_0>"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids = tok.encode(text)
    sep = tok.encode("<extra_0>")[0]
    probs = _forward(model, ids).softmax(-1)[:, 1]
    return [float(probs[i]) for i, t in enumerate(ids) if t == sep]


def ref_skywork(model, tok, question, steps, delim="\n"):
    # Card (skywork-o1-prm-inference prepare_input): encode(bos + problem + "\n"), then per step (the response
    # split at "\n") encode(step) (nothing for an empty one) + the "\n" id; reward sigmoid(value) at those.
    response = "\n".join(_bodies(steps, delim))
    ids = tok.encode(tok.bos_token + question + "\n")
    nl = tok.encode("\n")[-1]
    flags = []
    for step in response.split("\n"):
        piece = (tok.encode(step) if step != "" else []) + [nl]
        ids += piece
        flags.append(len(ids) - 1)
    values = torch.sigmoid(_forward(model, ids)[:, 0])
    return [float(values[i]) for i in flags]


REFS = {"math-shepherd": ref_math_shepherd, "rlhflow": ref_rlhflow, "qwen2.5-math-prm": ref_qwen,
        "skywork-prm": ref_skywork}
DELIM = {"math-shepherd": "\n\n", "rlhflow": "\n\n", "qwen2.5-math-prm": "\n\n", "skywork-prm": "\n"}


def random_steps(rng, preset, n):
    """``n`` steps as a search hands them (delimiter at the end of all but maybe the last): leading spaces,
    newlines, the delimiter's characters, empty ones; never the literal tag the reference locates by id."""
    delim = DELIM[preset]
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.15:
            body = ""
        elif kind < 0.3:
            body = " " * rng.randint(1, 2) + random_text(rng, rng.randint(1, 4))
        elif kind < 0.4:
            body = "\n" + random_text(rng, 2)
        else:
            body = random_text(rng, rng.randint(1, 6))
        body = body.replace("ки", "k").replace("<extra_0>", "")
        if preset == "skywork-prm":
            body = body.replace("\n", " ")  # their reference splits a response at every newline
        else:
            body = body.replace(delim, "\n \n")  # a step holds the delimiter's characters, not the delimiter
        last = i == n - 1 and rng.random() < 0.5
        out.append(body if last else body + delim)
    return out


def question(rng, words):
    return random_text(rng, words).replace("ки", "k").replace("<extra_0>", "")


def _close(got, want):
    assert len(got) == len(want)
    assert max((abs(a - b) for a, b in zip(got, want)), default=0.0) <= TOL, (got, want)


# ---------------------------------------------------------------- incremental = whole text, one forward

@pytest.mark.parametrize("preset", PRESETS)
def test_score_steps_matches_the_card(built, preset):
    tok, model = built[preset]
    prm = HFPRM(model, tok, preset=preset, step_delimiter=DELIM[preset])
    rng = random.Random(hash(preset) % 1000)
    for trial in range(6):
        questions = [question(rng, rng.randint(3, 10)) for _ in range(2)]
        cands = [[random_steps(rng, preset, rng.randint(1, 6)) for _ in range(3)] for _ in questions]
        got = prm.score_steps(questions, cands)
        for q, cs, gs in zip(questions, cands, got.step_scores):
            for steps, g in zip(cs, gs):
                _close(g, REFS[preset](model, tok, q, steps, DELIM[preset]))


@pytest.mark.parametrize("preset", PRESETS)
def test_incremental_session_with_forks(built, preset):
    """Steps arrive a few at a time (some rows none), rows fork and clone between calls; each row's step
    scores equal the reference on its whole history, and the aggregate folds them ("min")."""
    tok, model = built[preset]
    prm = HFPRM(model, tok, preset=preset, step_delimiter=DELIM[preset])
    rng = random.Random(7 + len(preset))
    questions = [question(rng, 6) + " ", "Q: what is 2+2?"]  # the first ends in a space: its lead re-tokenizes
    sess = prm.start(questions, agg="min", rows=8, max_new_tokens=400)
    try:
        rows = [0, 0, 0, 1, 1]
        sess.fork(torch.tensor(rows))
        hist = [[] for _ in rows]
        scores = [[] for _ in rows]
        for it in range(5):
            new = [random_steps(rng, preset, rng.choice([0, 1, 1, 2])) for _ in rows]
            if it == 0:
                new[0] = ["\n" + random_text(rng, 2) + DELIM[preset], " lead space" + DELIM[preset]]
            for r in range(len(rows)):  # a step that ends without the delimiter is a last step
                if hist[r] and not hist[r][-1].endswith(DELIM[preset]):
                    new[r] = []
            out = sess.add_steps(new)
            for r, n in enumerate(new):
                scores[r] += out[r, : len(n)].tolist()
                hist[r] += n
                assert torch.isnan(out[r, len(n):]).all()
            pick = [rng.randrange(len(rows)) for _ in range(len(rows))]  # fork with repeats
            sess.fork(torch.tensor(pick))
            rows, hist, scores = [rows[p] for p in pick], [list(hist[p]) for p in pick], [list(scores[p]) for p in pick]
        other = sess.clone(torch.tensor([1, 0]))  # a clone continues on its own
        extra = [random_steps(rng, preset, 1) for _ in range(2)]
        if hist[1] and not hist[1][-1].endswith(DELIM[preset]):
            extra[0] = []
        if hist[0] and not hist[0][-1].endswith(DELIM[preset]):
            extra[1] = []
        got = other.add_steps(extra)
        for j, r in enumerate([1, 0]):
            want = REFS[preset](model, tok, questions[rows[r]], hist[r] + extra[j], DELIM[preset])
            _close(got[j, : len(extra[j])].tolist(), want[len(hist[r]):])
        other.free()
        for r in range(len(rows)):
            if hist[r]:
                want = REFS[preset](model, tok, questions[rows[r]], hist[r], DELIM[preset])
                _close(scores[r], want)
                assert abs(float(sess.aggregate[r]) - min(want)) <= TOL
            else:
                assert torch.isnan(sess.aggregate[r])
        if preset in ("rlhflow", "qwen2.5-math-prm"):  # byte-level BPE: the boundary cases above re-tokenized
            assert sess.rolled_back > 0  # (Metaspace splits at every space: Math-Shepherd's never merge here)
    finally:
        sess.free()
    assert prm.kv_ledger.blocks == 0


def test_qwen_prm_deep_head_and_system_prompt(built):
    """Qwen2ForProcessRewardModel's head layout (score = Linear, ReLU, Linear) and another system prompt."""
    tok, _ = built["qwen2.5-math-prm"]
    model = model_for("qwen2.5-math-prm", len(tok), seed=3, deep_head=True)
    prm = HFPRM(model, tok, preset="qwen2.5-math-prm", system_prompt="Be brief.")
    rng = random.Random(5)
    q = question(rng, 5)
    cands = [random_steps(rng, "qwen2.5-math-prm", 4) for _ in range(3)]
    got = prm.score_steps([q], [cands]).step_scores[0]
    for steps, g in zip(cands, got):
        _close(g, ref_qwen(model, tok, q, steps, system="Be brief."))


def test_score_splits_completions_for_every_preset(built):
    """HFPRM.score(prompts, completions) keeps working: the completion split by the step delimiter."""
    for preset in PRESETS:
        tok, model = built[preset]
        d = DELIM[preset]
        prm = HFPRM(model, tok, preset=preset, step_delimiter=d)
        comp = f"We add.{d}So 2 + 2 = 4.{d}The answer is 4"
        got = prm.score(["What is 2+2?"], [[comp]]).step_scores[0][0]
        _close(got, REFS[preset](model, tok, "What is 2+2?", [f"We add.{d}", f"So 2 + 2 = 4.{d}", "The answer is 4"],
                                 d))


def test_preset_in_a_search(built):
    """A step search with a preset verifier (the policy has another tokenizer): the candidates' scores are
    the verifier's own scores of their steps, whatever forks the search made."""
    from tiny_models import biased_policy_model, char_tokenizer
    from tts_kernels import search
    from tts_kernels.models import HFPolicy

    tok, model = built["qwen2.5-math-prm"]
    prm = HFPRM(model, tok, preset="qwen2.5-math-prm", step_delimiter="e")
    ctok = char_tokenizer()
    policy = HFPolicy(biased_policy_model(ctok), ctok)
    prompts = ["ab", "c d"]
    for strategy in ("prm_beam_search", "dvts"):
        res = search.run(strategy, policy, prm, prompts, budget=4, seed=1,
                         settings=search.Settings(step_delimiter="e", max_step_tokens=8, num_iterations=3,
                                                  max_new_tokens=12, beam_width=2, agg="last"))
        for p, cands in enumerate(res.candidates):
            for c in cands:
                want = prm.score_steps([prompts[p]], [[c.steps]]).step_scores[0][0]
                _close(list(c.step_scores), want)


# ---------------------------------------------------------------- detection and loading

def test_detect_from_config_and_tokenizer(built):
    import copy

    for preset in ("math-shepherd", "qwen2.5-math-prm", "skywork-prm"):
        tok, model = built[preset]
        cfg = copy.deepcopy(model.config)
        cfg.architectures = [type(model).__name__]
        assert detect_preset(cfg, tok) == preset
    tok, model = built["rlhflow"]
    cfg = copy.deepcopy(model.config)
    cfg.architectures = [type(model).__name__]
    with pytest.raises(ValueError, match="pass preset= one of"):  # a chat causal LM: any chat model, refused
        detect_preset(cfg, tok)
    assert detect_preset(cfg, tok, "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data") == "rlhflow"
    assert detect_preset(cfg, tok, "peiyi9979/math-shepherd-mistral-7b-prm") == "math-shepherd"
    assert detect_preset(cfg, tok, "Qwen/Qwen2.5-Math-PRM-7B") == "qwen2.5-math-prm"
    assert detect_preset(cfg, tok, "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B") == "skywork-prm"


def test_from_pretrained_folder_detects_and_logs(built, tmp_path, caplog):
    import logging

    for preset in ("qwen2.5-math-prm", "math-shepherd"):
        tok, model = built[preset]
        folder = tmp_path / preset.replace(".", "_")
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        with caplog.at_level(logging.INFO, logger="tts_kernels"):
            prm = HFPRM.from_pretrained(str(folder))
        assert prm.preset == preset
        assert f"preset {preset!r}" in caplog.text
        q, steps = "What is 1+1?", ["One plus one\n\n", "is 2"]
        _close(prm.score_steps([q], [[steps]]).step_scores[0][0], REFS[preset](prm.model, prm.tokenizer, q, steps))


# ---------------------------------------------------------------- bad input

def test_bad_input_names_the_model_and_what_is_missing(built):
    from transformers import LlamaForTokenClassification

    from tiny_models import char_tokenizer, tiny_llama

    ctok = char_tokenizer()
    classifier = tiny_llama(1, cls=LlamaForTokenClassification, num_labels=2)
    with pytest.raises(ValueError, match="<extra_0>"):  # a preset whose special token the tokenizer lacks
        HFPRM(classifier, ctok, preset="qwen2.5-math-prm")
    with pytest.raises(ValueError, match="no chat template"):
        HFPRM(tiny_llama(1), ctok, preset="rlhflow")
    with pytest.raises(ValueError, match="cannot tell which PRM format"):  # unknown model, no preset
        HFPRM.from_pretrained(tiny_llama(1), tokenizer=ctok)
    with pytest.raises(ValueError, match="preset must be one of"):
        HFPRM(classifier, ctok, preset="shepherd")
    with pytest.raises(ValueError, match="do not also pass"):
        HFPRM(classifier, ctok, preset="skywork-prm", head="value")
    tok, model = built["rlhflow"]
    blank = tokenizer_for("rlhflow")  # a template that renders the turns without their contents
    blank.chat_template = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|eot_id|>{% endfor %}"
    with pytest.raises(ValueError, match="without its content"):
        HFPRM(model, blank, preset="rlhflow")
    tok, model = built["math-shepherd"]
    prm = HFPRM(model, tok, preset="math-shepherd")
    sess = prm.start(["q"], rows=1)
    try:
        before = (list(sess._ids[0]), sess._lens[0], sess.tokens)
        with pytest.raises(ValueError, match="merged into a step's text"):  # the tag would not be a token
            _merge_tag(sess)
        assert (list(sess._ids[0]), sess._lens[0], sess.tokens) == before  # nothing changed
    finally:
        sess.free()


def _merge_tag(sess):
    """A format whose scored token merges with the step text: Math-Shepherd's tag glued to letters."""
    fmt = sess.prm.format
    orig = fmt.render

    def glued(q, steps):
        r = orig(q, steps)
        text = r.text.replace(" ки", "xки")
        return type(r)(text, r.spans)

    fmt.render = glued
    try:
        sess.add_steps([["abc\n\n"]])
    finally:
        fmt.render = orig


def test_eval_loads_a_preset_verifier(built, tmp_path):
    """eval --verifier prm --verifier-model FOLDER --verifier-preset auto: the folder read in its own format."""
    from tts_kernels import bundled
    from tts_kernels.apps.evaluate import _load_models
    from tts_kernels.search import Settings

    tok, model = built["qwen2.5-math-prm"]
    model.save_pretrained(tmp_path / "prm")
    tok.save_pretrained(tmp_path / "prm")
    _, prm = _load_models(bundled.path("policy-small"), tmp_path / "prm", "cpu", Settings(), "classifier", "auto")
    assert prm.preset == "qwen2.5-math-prm" and prm.step_delimiter == "\n\n"


@pytest.mark.parametrize("preset", PRESETS)
def test_admitted_prompts_score_as_the_card(built, preset):
    """Prompts admitted into a running session (continuous batching) score their steps as the reference does,
    the running rows are untouched, and ``last_rows`` counts every token the session ran."""
    tok, model = built[preset]
    prm = HFPRM(model, tok, preset=preset, step_delimiter=DELIM[preset])
    rng = random.Random(11 + len(preset))
    questions = [question(rng, 5), question(rng, 7) + " ", "Q: what is 3+4?"]
    sess = prm.start(questions[:1], agg="min", rows=8, max_new_tokens=400)
    try:
        sess.fork(torch.tensor([0, 0]))
        first = [random_steps(rng, preset, 2)[:1] for _ in range(2)]
        first = [[s if s.endswith(DELIM[preset]) else s + DELIM[preset] for s in f] for f in first]
        sess.add_steps(first)
        ran = sess.tokens
        sess.admit(questions[1:])
        assert sess.rows == 4 and sum(sess.last_rows[0]) == sess.tokens - ran
        new = [random_steps(rng, preset, 2) for _ in range(4)]
        before = sess.tokens
        out = sess.add_steps(new)
        assert sum(sess.last_rows[0]) == sess.tokens - before and len(sess.last_rows[1]) == 4
        hist = [first[0] + new[0], first[1] + new[1], new[2], new[3]]
        owner = [0, 0, 1, 2]
        for r in range(4):
            want = REFS[preset](model, tok, questions[owner[r]], hist[r], DELIM[preset])
            _close(out[r, : len(new[r])].tolist(), want[len(hist[r]) - len(new[r]):])
    finally:
        sess.free()
    assert prm.kv_ledger.blocks == 0
