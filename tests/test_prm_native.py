"""Published PRM checkpoints loaded natively (HFPRM.from_pretrained(folder), no trust_remote_code).

Each folder is written here as the published one is laid out (tiny random weights, a tokenizer with the
family's special tokens and chat template): Qwen/Qwen2.5-Math-PRM-7B (config ``Qwen2ForProcessRewardModel``
with Qwen's ``auto_map``, sharded safetensors ``model.*`` + ``score.0/score.2``), Skywork-o1-Open-PRM
(config ``Qwen2ForPrmModel``, ``model.*`` + ``lm_head`` + ``v_head.summary``, as the published
``pytorch_model.bin`` and as safetensors) and Math-Shepherd (a plain ``MistralForCausalLM``). The
folders' paths say nothing (not even the test's name), so the preset is detected from the config and
tokenizer. The reference is the model card's text (tests/test_prm_presets.py) through a plain
transformers forward of the body, the head applied by hand from the raw weights written.
"""
import json
import random
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from test_prm_presets import question, random_steps, ref_math_shepherd, ref_qwen, ref_skywork
from tts_kernels.bench.prm_presets import model_for, tokenizer_for
from tts_kernels.models import HFPRM
from tts_kernels.models.prm_heads import ScoredModel

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min)

TOL = 1e-5
QWEN_AUTO_MAP = {"AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
                 "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"}
SKYWORK_AUTO_MAP = {"AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
                    "AutoModel": "modeling_qwen2_rm.Qwen2ForPrmModel"}


@pytest.fixture(autouse=True)
def no_remote_code(monkeypatch):
    """Remote code is never fetched or run (the folders hold none either)."""
    import transformers.dynamic_module_utils as dyn

    def refuse(*args, **kwargs):
        raise AssertionError("remote code was asked for")

    monkeypatch.setattr(dyn, "get_class_from_dynamic_module", refuse)


def write_folder(folder, tok, config: dict, tensors: dict, *, weights="model.safetensors", shards=1):
    """A checkpoint folder: config.json as given, the tensors in ``weights`` (``shards`` > 1: split,
    with the .index.json transformers writes), the tokenizer."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    names = sorted(tensors)
    if shards == 1:
        files = {weights: names}
    else:
        stem, ext = weights.rsplit(".", 1)
        files = {f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}": names[i::shards] for i in range(shards)}
        index = {"metadata": {}, "weight_map": {n: f for f, ns in files.items() for n in ns}}
        (folder / f"{weights}.index.json").write_text(json.dumps(index))
    for f, ns in files.items():
        part = {n: tensors[n].contiguous() for n in ns}
        if f.endswith(".safetensors"):
            save_file(part, str(folder / f), metadata={"format": "pt"})
        else:
            torch.save(part, folder / f)
    tok.save_pretrained(folder)
    return str(folder)


def published_config(model, architectures, auto_map=None, **fields):
    """The model's config as the published config.json has it (architectures, auto_map; no label fields)."""
    config = model.config.to_dict()
    for key in ("id2label", "label2id", "num_labels", "problem_type", "_name_or_path"):
        config.pop(key, None)
    config.update(architectures=architectures, **fields)
    if auto_map:
        config["auto_map"] = auto_map
    return config


def by_hand(body, linears):
    """A plain transformers forward of ``body`` (sdpa, no cache), then the head by hand: ``h @ W.T + b`` per
    ``(W, b)``, a ReLU between. Called as the references call a model: ``.logits``."""
    def run(input_ids):
        with torch.no_grad():
            h = body(input_ids=input_ids).last_hidden_state
        for k, (w, b) in enumerate(linears):
            h = h @ w.T + b
            h = h.relu() if k < len(linears) - 1 else h
        return SimpleNamespace(logits=h)
    return run


def check_scores(prm, folder, ref, model, delim, seed):
    """Candidates of random steps: each step's score equals the card's reference (the folder's tokenizer
    loaded as the card loads it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    rng = random.Random(seed)
    preset = prm.preset
    questions = ["What is 1+1?", question(rng, 6)]
    cands = [[["One plus one" + delim, "is 2"], random_steps(rng, preset, 4)],
             [random_steps(rng, preset, rng.randint(1, 5)) for _ in range(3)]]
    got = prm.score_steps(questions, cands).step_scores
    for q, cs, gs in zip(questions, cands, got):
        for steps, g in zip(cs, gs):
            want = ref(model, tok, q, steps, delim)
            assert len(g) == len(want) == len(steps)
            assert max(abs(a - b) for a, b in zip(g, want)) <= TOL, (g, want)


# ---------------------------------------------------------------- the published layouts

def test_qwen_process_reward_folder_loads_natively(tmp_path_factory, caplog, recwarn):
    """Qwen2ForProcessRewardModel's folder (auto_map to its remote code, 4 safetensors shards with an
    index): the body is transformers' Qwen2Model, the head Linear-ReLU-Linear from score.0/score.2."""
    import logging

    tok = tokenizer_for("qwen2.5-math-prm")
    src = model_for("qwen2.5-math-prm", len(tok), seed=1, deep_head=True)  # model.* and score.{0,2}.*: Qwen's names
    tensors = dict(src.state_dict())
    assert sorted(n for n in tensors if not n.startswith("model.")) == [
        "score.0.bias", "score.0.weight", "score.2.bias", "score.2.weight"]
    config = published_config(src, ["Qwen2ForProcessRewardModel"], QWEN_AUTO_MAP, sliding_window=131072,
                              use_sliding_window=False)
    folder = write_folder(tmp_path_factory.mktemp("ckpt") / "a", tok, config, tensors, shards=4)
    with caplog.at_level(logging.INFO):
        prm = HFPRM.from_pretrained(folder)
    assert prm.preset == "qwen2.5-math-prm" and prm.head_kind == "classifier"
    assert isinstance(prm.model, ScoredModel) and type(prm.base).__name__ == "Qwen2Model"
    assert prm.pre_head is not None and prm.weight.shape == (2, 32)
    assert "trust_remote_code" not in caplog.text
    assert not [w for w in recwarn if "remote" in str(w.message)]
    head = [(tensors["score.0.weight"], tensors["score.0.bias"]), (tensors["score.2.weight"], tensors["score.2.bias"])]
    check_scores(prm, folder, ref_qwen, by_hand(src.model, head), "\n\n", seed=2)
    ids = torch.tensor([prm.tokenizer.encode("1 + 1 = 2<extra_0>")])
    torch.testing.assert_close(prm.model(ids), by_hand(src.model, head)(input_ids=ids).logits)  # per token, as Qwen's


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors"])
def test_skywork_value_head_folder_loads_natively(tmp_path_factory, weights):
    """Qwen2ForPrmModel's folder (Skywork publishes pytorch_model.bin): a Qwen2 causal LM's weights with
    v_head.summary beside them; the value head is built from those, lm_head is not loaded."""
    tok = tokenizer_for("skywork-prm")
    src = model_for("skywork-prm", len(tok), seed=4)  # a 1-label classifier: its body and a Linear(h, 1)
    tensors = {n: t for n, t in src.state_dict().items() if n.startswith("model.")}
    w, b = src.score.weight.detach(), src.score.bias.detach()
    tensors.update({"v_head.summary.weight": w, "v_head.summary.bias": b,
                    "lm_head.weight": torch.randn(len(tok), 32)})
    config = published_config(src, ["Qwen2ForPrmModel"], SKYWORK_AUTO_MAP)
    folder = write_folder(tmp_path_factory.mktemp("ckpt") / "a", tok, config, tensors, weights=weights)
    prm = HFPRM.from_pretrained(folder, step_delimiter="\n")
    assert prm.preset == "skywork-prm" and prm.head_kind == "value" and prm.pre_head is None
    assert isinstance(prm.model, ScoredModel) and type(prm.base).__name__ == "Qwen2Model"
    assert not any("lm_head" in n for n, _ in prm.model.named_parameters())
    check_scores(prm, folder, ref_skywork, by_hand(src.model, [(w, b)]), "\n", seed=5)


def test_math_shepherd_folder_loads_as_its_causal_lm(tmp_path_factory):
    """peiyi9979/math-shepherd-mistral-7b-prm is a plain MistralForCausalLM: detected from its tokenizer (the
    ' ки' tag, no chat template), the labels '+'/'-' read from its LM head at each tag."""
    tok = tokenizer_for("math-shepherd")
    src = model_for("math-shepherd", len(tok), seed=6)
    tensors = dict(src.state_dict())
    config = published_config(src, ["MistralForCausalLM"], sliding_window=4096)
    folder = write_folder(tmp_path_factory.mktemp("ckpt") / "a", tok, config, tensors)
    prm = HFPRM.from_pretrained(folder)
    assert prm.preset == "math-shepherd" and prm.head_kind == "label_token"
    assert type(prm.model).__name__ == "MistralForCausalLM"
    check_scores(prm, folder, ref_math_shepherd, src, "\n\n", seed=7)


# ---------------------------------------------------------------- refused folders

def _qwen_folder(tmp_path, name, edit):
    """Qwen's PRM folder with its tensors changed by ``edit(tensors)``."""
    tok = tokenizer_for("qwen2.5-math-prm")
    src = model_for("qwen2.5-math-prm", len(tok), deep_head=True)
    tensors = dict(src.state_dict())
    edit(tensors)
    config = published_config(src, ["Qwen2ForProcessRewardModel"], QWEN_AUTO_MAP)
    return write_folder(tmp_path / name, tok, config, tensors)


def test_folder_without_a_known_head_is_refused(tmp_path):
    def no_head(t):
        for n in [n for n in t if n.startswith("score.")]:
            del t[n]
        t["lm_head.weight"] = torch.zeros(t["model.embed_tokens.weight"].shape)

    folder = _qwen_folder(tmp_path, "nohead", no_head)
    with pytest.raises(ValueError, match=r"no PRM head in its weights: looked for score\.0\.weight .*"
                                         r"v_head\.summary\.weight .*its weights are lm_head\.\*, model\.\*"):
        HFPRM.from_pretrained(folder)
    with pytest.raises(ValueError, match="no PRM head"):  # the preset named: the same
        HFPRM.from_pretrained(folder, preset="skywork-prm")
    folder = _qwen_folder(tmp_path, "half", lambda t: (t.pop("score.2.weight"), t.pop("score.2.bias")))
    with pytest.raises(ValueError, match=r"has score\.0\.weight but not score\.2\.weight, score\.2\.bias"):
        HFPRM.from_pretrained(folder)
    tok = tokenizer_for("qwen2.5-math-prm")
    (tmp_path / "empty").mkdir()
    tok.save_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(
        published_config(model_for("qwen2.5-math-prm", len(tok)), ["Qwen2ForProcessRewardModel"])))
    with pytest.raises(ValueError, match=r"no weights to read a PRM head from .*pytorch_model\.bin"):
        HFPRM.from_pretrained(str(tmp_path / "empty"))


def test_head_of_the_wrong_shape_is_refused(tmp_path):
    def three_labels(t):
        t["score.2.weight"], t["score.2.bias"] = torch.zeros(3, 32), torch.zeros(3)

    folder = _qwen_folder(tmp_path, "three", three_labels)
    with pytest.raises(ValueError, match=r"score\.2\.weight has shape \(3, 32\); Qwen2ForProcessRewardModel's "
                                         r"score .* needs \(2, 32\)"):
        HFPRM.from_pretrained(folder)

    def wide(t):
        t["score.0.weight"] = torch.zeros(32, 48)

    with pytest.raises(ValueError, match=r"score\.0\.weight has shape \(32, 48\).* on hidden size 32 needs \(32, 32\)"):
        HFPRM.from_pretrained(_qwen_folder(tmp_path, "wide", wide))


def test_value_head_under_the_classifier_preset_is_refused(tmp_path):
    """Skywork's 1-output head read as Qwen's 2-class format: refused by the head check, not scored."""
    tok = tokenizer_for("qwen2.5-math-prm")
    src = model_for("skywork-prm", len(tok))
    tensors = {n: t for n, t in src.state_dict().items() if n.startswith("model.")}
    tensors.update({"v_head.summary.weight": src.score.weight, "v_head.summary.bias": src.score.bias})
    folder = write_folder(tmp_path / "ckpt", tok, published_config(src, ["Qwen2ForPrmModel"]), tensors)
    with pytest.raises(ValueError, match=r"head='classifier' needs 2 output\(s\), the model's head has 1"):
        HFPRM.from_pretrained(folder, preset="qwen2.5-math-prm")
