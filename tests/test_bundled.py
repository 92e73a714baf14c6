"""The bundled models: the tokenizer round trip, the folders load with plain from_pretrained, the
policies and the PRM behave as the search drivers expect, and the training script runs."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tts_kernels import bundled
from tts_kernels.bundled import arith
from tts_kernels.bundled.train import policy_example, verifier_example
from tts_kernels.models import split_steps
from tts_kernels.search import best_of_n

pytestmark = pytest.mark.models  # also run under the lowest supported transformers (make test-min)

TEXTS = ["Ava has 12 pens. Ava buys 7 more.\n\n", "12 + 7 = 19\n\n19 - 5 = 14\n\nThe answer is 14",
         "  odd   spacing\tand unicode: é ∑ 😀 {}\\boxed{3}\n", "1234567890", ""]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(bundled.path("policy-small"))


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    with_bos = tok(text).input_ids
    assert with_bos[0] == tok.bos_token_id and with_bos[1:] == ids


def test_tokenizer_shape(tok):
    # Digits are one token each and a blank line is one token: the step delimiter never hides
    # inside a longer token, and arithmetic is digit by digit.
    for d in "0123456789":
        assert len(tok(d, add_special_tokens=False).input_ids) == 1
    assert tok.convert_ids_to_tokens(tok("12 = 19\n\nThe", add_special_tokens=False).input_ids)[-2] == "ĊĊ"
    assert [len(tok(x, add_special_tokens=False).input_ids) for x in ("123", " 45")] == [3, 3]
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    for name in bundled.NAMES:  # every folder carries the same tokenizer (policy-think: plus its two markers)
        vocab = AutoTokenizer.from_pretrained(bundled.path(name)).get_vocab()
        extra = {"<think>": len(tok), arith.THINK_END: len(tok) + 1} if name == "policy-think" else {}
        assert vocab == {**tok.get_vocab(), **extra}


def test_folders_load_with_from_pretrained():
    total = 0
    for name in bundled.NAMES:
        p = bundled.path(name)
        total += (p / "model.safetensors").stat().st_size
        info = json.loads((p / "training.json").read_text())
        assert info["seed"] == 0 and info["seconds"] > 0
        model = AutoModelForCausalLM.from_pretrained(p)  # the PRM too: a causal LM read as a likelihood verifier
        assert model.config.model_type == "llama"
        assert bundled.verifier_head(p) == "likelihood"
    assert total < 16e6  # a few MB in all (bfloat16 weights)
    small = AutoModelForCausalLM.from_pretrained(bundled.path("policy-small"))
    large = AutoModelForCausalLM.from_pretrained(bundled.path("policy-large"))
    assert large.config.num_hidden_layers > small.config.num_hidden_layers
    assert sum(p.numel() for p in large.parameters()) > sum(p.numel() for p in small.parameters())


def test_path_errors(tmp_path):
    with pytest.raises(ValueError, match="name"):
        bundled.path("policy-medium")
    with pytest.raises(FileNotFoundError, match="bundled.train"):
        bundled.path("prm", root=tmp_path)
    with pytest.raises(ValueError, match="size"):
        bundled.load_policy("medium")


def test_held_out_problems_are_test_split():
    probs = bundled.test_problems(50)
    assert all(p.split == "test" for p in probs)
    assert [p.question for p in probs] == [p.question for p in bundled.test_problems(50)]


@torch.no_grad()
def test_policy_greedy_equals_generate_and_solves_problems():
    policy = bundled.load_policy("small")
    probs = bundled.test_problems(6)
    res = best_of_n(policy, None, [p.prompt for p in probs], n=1, max_new_tokens=96, temperature=0.0,
                    select="majority")
    tok = policy.tokenizer
    for p, row in zip(probs, res.candidates):
        ids = tok(p.prompt, return_tensors="pt").input_ids
        ref = policy.model.generate(ids, do_sample=False, max_new_tokens=96, pad_token_id=tok.pad_token_id)
        assert row[0].token_ids == ref[0, ids.shape[1]:].tolist()
        assert row[0].finish == "eos"
        steps = row[0].text.split("\n\n")
        assert steps[-1].startswith("The answer is")  # the format is learnt even when the arithmetic is not
    # The two policies are trained: each solves some of these held-out problems greedily.
    probs = bundled.test_problems(30, levels=(1, 2))
    for size in ("small", "large"):
        res = best_of_n(bundled.load_policy(size), None, [p.prompt for p in probs], n=1, max_new_tokens=96,
                        temperature=0.0, select="majority")
        assert sum(arith.grade(a, p) for a, p in zip(res.predictions, probs)) >= 10


@torch.no_grad()
def _score_reference_and_one_slip(prm):
    """PRM scores (aggregate ``min``) of 8 held-out reference solutions and of each with its first
    result off by one: ``(problems, one-slip texts, PRMScores)``."""
    probs = bundled.test_problems(8, levels=(1, 2, 3))
    wrong = [p.solution.replace(f"= {p.values[1]}\n", f"= {p.values[1] + 1}\n", 1) for p in probs]
    scored = prm.score([p.prompt for p in probs], [[p.solution, w] for p, w in zip(probs, wrong)], agg="min")
    return probs, wrong, scored


@torch.no_grad()
def test_prm_scores_steps_like_a_full_forward():
    # A step's score: exp of the lowest token log-probability of the solution up to its end, from one
    # plain forward of prompt (with BOS) + each step tokenized alone.
    prm = bundled.load_prm()
    assert prm.head_kind == "likelihood" and prm.reduce == "min"
    probs, wrong, scored = _score_reference_and_one_slip(prm)
    tok = prm.tokenizer
    for p, w, rows in zip(probs, wrong, scored.step_scores):
        for text, got in zip((p.solution, w), rows):
            steps = split_steps(text)
            ids = tok(p.prompt).input_ids
            n, ends = len(ids), []
            for st in steps:
                ids = ids + tok(st, add_special_tokens=False).input_ids
                ends.append(len(ids) - 1)
            lp = prm.model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
            tok_lp = lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]  # log p(ids[t]) at index t - 1
            want = torch.stack([tok_lp[n - 1: e].min().exp() for e in ends])
            torch.testing.assert_close(torch.tensor(got), want, atol=2e-4, rtol=1e-3)


@torch.no_grad()
def test_likelihood_verifier_prefers_right_steps():
    probs, _, scored = _score_reference_and_one_slip(bundled.load_verifier("likelihood"))
    agg = scored.aggregate.view(len(probs), 2)
    assert (agg[:, 0] > agg[:, 1] + 0.05).sum() >= 6  # the reference beats its one-slip twin, by a margin


@pytest.mark.parametrize("kind,floor", [("likelihood", 0.7), ("prm", 0.8)])
@torch.no_grad()
def test_verifier_ranks_right_answers_above_wrong_ones(kind, floor):
    # The verifier's job in the demo: among the small policy's own samples for a problem, right answers
    # score higher than wrong ones (pairs within a problem). The trained PRM's target is 0.80.
    probs = bundled.test_problems(32, seed=99)
    res = best_of_n(bundled.load_policy("small"), bundled.load_verifier(kind), [p.prompt for p in probs], n=8,
                    max_new_tokens=96, temperature=0.8, seed=0)
    pairs = []
    for p, cands in zip(probs, res.candidates):
        right = [c.score for c in cands if arith.grade(c.answer, p)]
        wrong = [c.score for c in cands if not arith.grade(c.answer, p)]
        pairs += [r > w for r in right for w in wrong]
    assert len(pairs) >= 50
    assert sum(pairs) / len(pairs) > floor


@torch.no_grad()
def test_prm_prefers_right_steps():
    probs, _, scored = _score_reference_and_one_slip(bundled.load_prm())
    agg = scored.aggregate.view(len(probs), 2)
    assert (agg[:, 0] > agg[:, 1] + 0.05).sum() >= 6  # the reference beats its one-slip twin, by a margin


def test_training_examples_align_with_how_searches_tokenize(tok):
    p = arith.generate(1, seed=0)[0]
    ids, tgt = policy_example(tok, p)
    n = len(tok(p.prompt).input_ids)
    assert tgt[:n] == [-100] * n and tgt[n:] == ids[n:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n:-1]) == p.solution
    # The PRM's examples: a sample on the reference is all targets; one that leaves it ends at its first
    # wrong token, whose target is the reference's token and whose own token is marked to be made unlikely.
    ids, tgt, wrong = verifier_example(tok, p, p.solution)
    assert tgt[:n] == [-100] * n and tgt[n:] == ids[n:] and set(wrong) == {-100}
    assert tok.decode(ids[n:]) == p.solution
    v1 = p.values[1]
    slip = p.solution.replace(f"= {v1}\n", f"= {v1 + 1}\n", 1)
    ids2, tgt2, wrong2 = verifier_example(tok, p, slip)
    t = len(ids2) - 1
    assert ids2[:t] == ids[:t] and ids2[t] != ids[t]
    assert tgt2[t] == ids[t] and wrong2[t] == ids2[t] and tgt2[n:t] == ids[n:t]
    assert wrong2[:t] == [-100] * t
    assert tok.decode(ids2[n:]) == slip[: len(tok.decode(ids2[n:]))]
    # Longer than the reference: the first extra token is wrong, its target the end of the solution.
    ids3, tgt3, wrong3 = verifier_example(tok, p, p.solution + "\n\nmore")
    assert ids3[:len(ids)] == ids and tgt3[-1] == tok.eos_token_id and wrong3[-1] == ids3[-1]


def test_thinking_solutions_and_their_training_examples(tok):
    import random

    from tts_kernels.bundled.train import think_example, think_tokenizer

    rng = random.Random(0)
    checked = slipped = fixed = unchecked_wrong = 0
    for p in arith.generate(300, seed=1):
        text, spans = arith.thinking_solution(p, rng)
        think, answer = text.split(arith.THINK_END + arith.STEP_DELIMITER)
        assert answer.startswith("The answer is ") and think.count("\n") >= len(p.ops)
        wait = arith.WAIT + "\n" in think
        checked += wait
        slipped += bool(spans)
        # Right at the end when there was no slip or a check pass fixed the first one (the rest is recomputed);
        # an unchecked slip leaves it wrong (unless later slips happen to cancel it).
        right = arith.grade(answer.split()[-1], p)
        if not spans or wait:
            assert right, (text, spans)
        unchecked_wrong += bool(spans) and not wait and not right
        fixed += bool(spans) and wait
        for a, b in spans:  # a slip span is a result right after "= "
            assert text[a - 2: a] == "= " and text[a:b].isdigit()
    assert checked and slipped and fixed and unchecked_wrong
    ttok = think_tokenizer(tok)
    p = arith.generate(1, seed=3)[0]
    seed = next(s for s in range(100) if arith.thinking_solution(p, random.Random(s))[1])  # one with a slip
    text, spans = arith.thinking_solution(p, random.Random(seed))
    ids, tgt = think_example(ttok, p, random.Random(seed))
    n = len(ttok(arith.thinking_prompt(p)).input_ids)
    assert tgt[:n] == [-100] * n and ids[-1] == ttok.eos_token_id and "<think>" in ttok.convert_ids_to_tokens(ids[:n])
    assert ttok.decode(ids[n:-1]) == text
    # No loss on the slips' tokens, and on nothing else of the solution.
    dropped = "".join(ttok.decode([t]) for t, y in zip(ids[n:-1], tgt[n:-1]) if y == -100)
    assert dropped == "".join(text[a:b] for a, b in spans)


def test_train_script_runs_small(tmp_path):
    # The real run takes ~30 minutes; this checks the pipeline end to end at toy sizes.
    cmd = [sys.executable, "-m", "tts_kernels.bundled.train", "--out", str(tmp_path), "--train-problems", "300",
           "--small-steps", "2", "--large-steps", "2", "--prm-steps", "2", "--prm-problems", "8",
           "--prm-samples", "2", "--batch-size", "4", "--think-steps", "2", "--think-problems", "40",
           "--think-batch-size", "4"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    policy = bundled.load_policy("small", root=tmp_path)
    prm = bundled.load_prm(root=tmp_path)
    assert policy.model.config.num_hidden_layers == 3 and prm.head_kind == "likelihood"
    info = json.loads((tmp_path / "prm" / "training.json").read_text())
    assert info["steps"] == 2 and info["prm_problems"] == 8
    think = bundled.load_policy("think", root=tmp_path)
    assert arith.THINK_END in think.tokenizer.get_vocab() and len(think.tokenizer) == len(policy.tokenizer) + 2
    # --prm-only retrains the PRM from the saved policies and leaves them alone.
    weights = (tmp_path / "policy-large" / "model.safetensors").read_bytes()
    res = subprocess.run(cmd + ["--prm-only", "--prm-steps", "3", "--prm-lr", "2e-3"], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "policy-large" / "model.safetensors").read_bytes() == weights
    info = json.loads((tmp_path / "prm" / "training.json").read_text())
    assert info["steps"] == 3 and info["lr"] == 2e-3
    assert json.loads((tmp_path / "policy-think" / "training.json").read_text())["steps"] == 2  # left alone
    # --think-only retrains the thinking policy from the saved policy-small, and only it.
    small = (tmp_path / "policy-small" / "model.safetensors").read_bytes()
    res = subprocess.run(cmd + ["--think-only", "--think-steps", "3"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "policy-small" / "model.safetensors").read_bytes() == small
    assert json.loads((tmp_path / "policy-think" / "training.json").read_text())["steps"] == 3
