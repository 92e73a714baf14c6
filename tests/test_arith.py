"""The bundled task: generator determinism and difficulty, disjoint splits, automatic step labels, grading."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tts_kernels.bundled import arith
from tts_kernels.search import extract_answer


def test_generator_is_deterministic_and_distinct():
    a = arith.generate(200, seed=3)
    b = arith.generate(200, seed=3)
    c = arith.generate(200, seed=4)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in a] != [p.question for p in c]
    assert len({p.question for p in a}) == 200


def test_splits_are_disjoint_by_construction():
    train = arith.generate(3000, seed=0, split="train")
    test = arith.generate(1000, seed=0, split="test")
    assert all(p.split == "train" for p in train) and all(p.split == "test" for p in test)
    assert not {p.question for p in train} & {p.question for p in test}
    # The split is a function of the question alone: the same text can never land in both.
    assert all(arith.split_of(p.question) == "test" for p in test)
    # About one problem in five of the whole space is a test problem.
    rng = random.Random(0)
    frac = sum(arith.make_problem(rng, 3, 20).split == "test" for _ in range(4000)) / 4000
    assert 0.17 < frac < 0.23


@pytest.mark.parametrize("level", sorted(arith.LEVELS))
def test_difficulty_controls_steps_and_operands(level):
    num_ops, max_operand = arith.LEVELS[level]
    for p in arith.generate(100, seed=1, levels=(level,)):
        assert p.level == level and len(p.ops) == num_ops
        assert 1 <= p.start <= max_operand and all(1 <= n <= max_operand for _, n in p.ops)
        assert min(p.values) >= 0
        assert len(p.steps) == num_ops + 1 and p.steps[-1] == f"The answer is {p.answer}"
        assert p.solution.count(arith.STEP_DELIMITER) == num_ops
        assert extract_answer(p.solution) == str(p.answer)


def test_solution_matches_the_story():
    p = arith.Problem(question="q", start=12, ops=(("+", 7), ("-", 5)))
    assert p.values == [12, 19, 14]
    assert p.solution == "12 + 7 = 19\n\n19 - 5 = 14\n\nThe answer is 14"
    rng = random.Random(5)
    q = arith.make_problem(rng, 4, 30)
    for sign, n in q.ops:  # every operation is told in the question
        assert f" {n} " in q.question or f" {n}." in q.question
    assert q.question.endswith("have now?") and q.prompt == q.question + "\n\n"


def test_check_steps_reference_is_all_good():
    for p in arith.generate(300, seed=2):
        assert arith.check_steps(p, p.solution) == [True] * len(p.steps)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10**6), data=st.data())
def test_check_steps_a_wrong_step_and_everything_after_is_bad(seed, data):
    p = arith.make_problem(random.Random(seed), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 99)))
    steps = list(p.steps)
    k = data.draw(st.integers(0, len(steps) - 1))
    kind = data.draw(st.sampled_from(["result", "operand", "sign", "left", "garbage"]))
    if k == len(steps) - 1:
        steps[k] = f"The answer is {p.answer + data.draw(st.integers(1, 9))}"
    else:
        a, s, n, r = p.values[k], p.ops[k][0], p.ops[k][1], p.values[k + 1]
        bump = data.draw(st.integers(1, 9))
        steps[k] = {"result": f"{a} {s} {n} = {r + bump}", "operand": f"{a} {s} {n + bump} = {r}",
                    "sign": f"{a} {'-' if s == '+' else '+'} {n} = {r}", "left": f"{a + bump} {s} {n} = {r}",
                    "garbage": "I do not know"}[kind]
    labels = arith.check_steps(p, "\n\n".join(steps))
    assert labels == [True] * k + [False] * (len(steps) - k)


def test_check_steps_structure():
    p = arith.Problem(question="q", start=3, ops=(("+", 4),))
    assert arith.check_steps(p, "3 + 4 = 7\n\nThe answer is 7") == [True, True]
    assert arith.check_steps(p, "3 + 4 = 7") == [True]  # unfinished: no verdict on what is missing
    assert arith.check_steps(p, "The answer is 7") == [False]  # skipped the equation
    assert arith.check_steps(p, "3 + 4 = 7\n\n7 + 0 = 7\n\nThe answer is 7") == [True, False, False]
    assert arith.check_steps(p, "3 + 4 = 7\n\nThe answer is 7\n\nThe answer is 7") == [True, True, False]
    assert arith.check_steps(p, "") == []


def test_grade():
    p = arith.Problem(question="q", start=3, ops=(("+", 4),))
    assert arith.grade("7", p) and arith.grade(" 7 ", p)
    assert not arith.grade("8", p) and not arith.grade(None, p) and not arith.grade("seven", p)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        arith.generate(3, seed=0, split="dev")
    with pytest.raises(ValueError, match="levels"):
        arith.generate(3, seed=0, levels=(9,))
    with pytest.raises(ValueError, match="num_ops"):
        arith.make_problem(random.Random(0), 0, 5)
    with pytest.raises(ValueError, match="max_operand"):
        arith.make_problem(random.Random(0), 2, 0)
