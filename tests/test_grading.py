"""Graders: exact integers for the bundled task, math-verify equivalence for LaTeX answers, pluggable."""
import pytest

from tts_kernels.apps.grading import IntegerGrader, MathVerifyGrader, as_integer, get_grader, grader_name


@pytest.fixture(scope="module")
def mv():
    return MathVerifyGrader()


@pytest.mark.parametrize("pred, gold", [
    (r"\frac{1}{2}", "0.5"), ("0.5", r"\frac{1}{2}"), (r"\sqrt{4}", "2"), ("2", r"\sqrt{4}"),
    (r"\dfrac{3}{4}", "0.75"), ("1+x", "x+1"), (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}2"), (r"\frac12", "1/2"),
    ("5", 5), ("5.0", "5"), (r"\boxed{7}", "7"), (r"2\pi", r"\pi \cdot 2"), (r"\{1,2\}", r"\{2,1\}"),
])
def test_math_verify_equivalent(mv, pred, gold):
    assert mv(pred, gold) is True


@pytest.mark.parametrize("pred, gold", [
    ("3", "4"), (r"\frac{1}{3}", "0.5"), (r"\sqrt{5}", "2"), ("x^2", "x^3"), (r"\pi", "3.14"), ("x+1", "x-1"),
    ("-2", "2"),
])
def test_math_verify_not_equivalent(mv, pred, gold):
    assert mv(pred, gold) is False


@pytest.mark.parametrize("pred", [None, "", "   ", "}{\\frac", "\\", "$$", "((((", "\\boxed{"])
def test_math_verify_never_raises_on_garbage(mv, pred):
    assert mv(pred, r"\frac{1}{2}") is False
    assert mv("1", pred) is False  # a gold answer it cannot read marks nothing right


def test_integer_grader():
    g = IntegerGrader()
    assert g("42", 42) and g(" +42 ", "42") and g("42.0", 42) and g("-7", "-7")
    assert not g("41", 42) and not g(None, 42) and not g("4 2", 42) and not g("42.5", 42) and not g("x", "x")
    assert not g(True, 1)  # a bool is not an answer
    assert [as_integer(v) for v in (3, 3.0, "3", "3.5", 3.5, None, "")] == [3, 3, 3, None, None, None, None]


def test_get_grader_auto_and_by_name():
    assert isinstance(get_grader("auto", [1, "2", " -3 "]), IntegerGrader)
    assert isinstance(get_grader("auto", [1, r"\frac{1}{2}"]), MathVerifyGrader)
    assert isinstance(get_grader("integer"), IntegerGrader)
    assert isinstance(get_grader("math-verify"), MathVerifyGrader)
    with pytest.raises(ValueError, match="needs the gold answers"):
        get_grader("auto")
    with pytest.raises(ValueError, match="grader must be one of"):
        get_grader("sympy")


def parity_grader(prediction, gold) -> bool:
    """A user grader: right when the parities agree."""
    return prediction is not None and int(prediction) % 2 == int(gold) % 2


def test_get_grader_plugin():
    g = get_grader(f"{__name__}:parity_grader")  # any importable callable, as `--grader module:function`
    assert g("3", 5) is True and g("4", 5) is False
    assert grader_name(g) == f"{__name__}:parity_grader"
    with pytest.raises(ValueError, match="cannot load grader"):
        get_grader("tts_kernels.apps.grading:no_such_grader")
    assert grader_name(get_grader("integer")) == "integer"
