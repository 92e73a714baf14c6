"""Default answer extraction and answer ids for voting."""
import pytest

from tts_kernels.search.answers import answer_ids, extract_answer, normalize_answer


@pytest.mark.parametrize("text,want", [
    ("Step 1: 2+2=4\n\nThe answer is 4", "4"),
    ("so the final answer is: $1,234$.", "1234"),
    ("The answer is 3.\n\nWait.\n\nThe answer is 5", "5"),
    ("... \\boxed{\\frac{1}{2}} and The answer is 7", "\\frac{1}{2}"),
    ("\\boxed{12} then \\boxed{-03}", "-3"),
    ("no conclusion here", None),
    ("\\boxed{unbalanced", None),
    ("The answer is +0.0", "0"),
])
def test_extract(text, want):
    assert extract_answer(text) == want


def test_normalize_leaves_non_numbers():
    assert normalize_answer(" x^2 + 1 ") == "x^2 + 1"
    assert normalize_answer("1,23") == "1,23"


def test_answer_ids():
    ids = answer_ids([["4", None, "5", "4"], [None, None, None, None]])
    assert ids.tolist() == [[0, -1, 1, 0], [-1, -1, -1, -1]]
    with pytest.raises(ValueError, match="same number"):
        answer_ids([["1"], ["1", "2"]])
