"""Settings.vote_key: answers that are one value vote together under "math" (math-verify's reading),
stay apart under "normalized" (the extracted string), in every voting path."""
import math

import pytest

from tts_kernels.search import Candidate, Settings, select_candidates
from tts_kernels.search.answers import answer_ids, math_key, math_parse, vote_key

HALF = ["\\frac{1}{2}", "0.5", "\\dfrac12", "1/2"]


def test_math_key_reads_values():
    assert len({math_key(a) for a in HALF}) == 1
    assert math_key("x+1") == math_key("1+x") and math_key("25") == math_key("25.0") == math_key("+25")
    assert math_key("\\sqrt{4}") == math_key("2") and math_key("0.5") != math_key("0.25")
    assert math_key("") == "" and math_parse(None) == [] and math_parse("   ") == []


def test_answer_ids_by_key():
    row = ["0.3", "\\frac{1}{2}", "0.3", "0.5", None, "\\dfrac12"]
    assert answer_ids([row]).tolist() == [[0, 1, 0, 2, -1, 3]]
    assert answer_ids([row], key=math_key).tolist() == [[0, 1, 0, 1, -1, 1]]
    assert vote_key("normalized") is None and vote_key("math") is math_key
    with pytest.raises(ValueError, match="vote_key"):
        vote_key("fuzzy")
    with pytest.raises(ValueError, match="Settings.vote_key"):
        Settings(vote_key="fuzzy")


@pytest.mark.parametrize("rule", ["majority", "weighted"])
def test_votes_group_by_value(rule):
    answers = ["0.3", "0.3", "\\frac{1}{2}", "0.5", "\\boxed{\\dfrac12}"]
    cands = [[Candidate(text=a, answer=a, score=1.0) for a in answers]]
    chosen, got = select_candidates(cands, rule)
    assert got == ["0.3"] and chosen == [0]  # three strings of 1/2 are three answers of one vote each
    chosen, got = select_candidates(cands, rule, vote_key="math")
    assert got == ["\\frac{1}{2}"] and chosen == [2]  # one value with three votes; its first candidate


def test_a_search_votes_by_the_setting():
    # best_of_n's weighted rule over scripted candidates: the setting reaches the selection.
    from scripted import ScriptedPolicy, ScriptedVerifier

    from tts_kernels.search import run

    policy, verifier = ScriptedPolicy(), ScriptedVerifier()
    s = Settings(max_new_tokens=6, temperature=1.0)
    table = {}

    def extract(text):  # answers that are one value written three ways, by the text's first character
        return table.setdefault(text[:1], ["0.5", "\\frac{1}{2}", "1/2", "3"][len(table) % 4]) if text else None

    # seed 26: a run where the summed scores of the three spellings of 1/2 beat "3" only together (found by trying seeds)
    a = run("weighted_best_of_n", policy, verifier, ["ab"], budget=16, settings=s, seed=26, extract=extract)
    b = run("weighted_best_of_n", policy, verifier, ["ab"], budget=16, settings=s.replace(vote_key="math"), seed=26,
            extract=extract)
    assert [c.text for c in a.candidates[0]] == [c.text for c in b.candidates[0]]

    def best(key):  # the answer with the largest summed score, by key
        totals = {}
        for c in b.candidates[0]:
            if c.answer is not None and not math.isnan(c.score):
                totals[key(c.answer)] = totals.get(key(c.answer), 0.0) + c.score
        return max(totals, key=totals.get)

    assert a.predictions[0] == best(lambda x: x) and math_key(b.predictions[0]) == best(math_key)
    assert math_key(a.predictions[0]) != math_key(b.predictions[0])  # here the two keys pick differently
