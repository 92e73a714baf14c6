"""Thinking budgets: the device rule (ops.thinking) against the plain per-row reference, token by token,
and the setting's bad input."""
import random

import pytest
import torch

from tts_kernels.ops.thinking import ThinkingRule, ThinkingState, thinking_logits, thinking_update
from tts_kernels.reference import thinking_ref
from tts_kernels.search.thinking import ThinkingBudget

FIELDS = ("thought", "answering", "fseq", "fpos", "injections", "mpos")


def make_rule(forced, marker, eos, lo, hi):
    L = max(len(s) for s in forced)
    t = torch.full((len(forced), L), -1, dtype=torch.int64)
    for i, s in enumerate(forced):
        t[i, : len(s)] = torch.tensor(s)
    return ThinkingRule(forced=t, lengths=torch.tensor([len(s) for s in forced]), marker=torch.tensor(marker),
                        eos=torch.tensor(eos, dtype=torch.int64), min_tokens=lo, max_tokens=2**62 if hi is None else hi)


def row_state(state, r):
    return {f: int(getattr(state, f)[r]) for f in FIELDS}


@pytest.mark.parametrize("case", range(12))
def test_rule_matches_the_reference_token_by_token(case):
    rng = random.Random(case)
    V = rng.choice([11, 17, 40])
    W = rng.randint(1, 3)
    marker = [rng.randrange(V) for _ in range(rng.choice([1, 1, 2, 3]))]
    conts = [[rng.randrange(V) for _ in range(rng.randint(1, 3))] for _ in range(W)]
    prefix = [rng.randrange(V) for _ in range(rng.randint(0, 2))]
    eos = [rng.randrange(V)] if case % 3 else []
    lo = rng.randint(0, 12)
    hi = None if case % 4 == 0 else lo + rng.randint(0, 10)
    forced = conts + [marker + prefix]
    rule = make_rule(forced, marker, eos, lo, hi)
    R, T = 7, 40
    state = ThinkingState.start(R)
    refs = [row_state(state, r) for r in range(R)]
    g = torch.Generator().manual_seed(case)
    seen = {"inject": 0, "forced_end": 0, "natural_end": 0}
    for t in range(T):
        logits = torch.randn(R, V, generator=g) * 3
        # Make stopping likely, so the rule has work: the marker's tokens and EOS get a boost.
        boost = marker[min(t % len(marker), len(marker) - 1)]
        logits[:, boost] += 4.0
        for e in eos:
            logits[:, e] += 2.0
        got = thinking_logits(logits, state, rule)
        tokens = []
        for r in range(R):
            want, update = thinking_ref(logits[r], refs[r], forced, marker, eos, lo, hi)
            assert torch.allclose(got[r], want, atol=1e-5, equal_nan=True), (t, r, got[r], want)
            probs = torch.softmax(got[r].double(), -1)
            tok = int(torch.multinomial(probs, 1, generator=g))
            tokens.append(tok)
            before = refs[r]
            refs[r] = update(tok)
            seen["inject"] += refs[r]["injections"] > before["injections"]
            seen["natural_end"] += refs[r]["answering"] and not before["answering"] and before["fpos"] < 0
            seen["forced_end"] += refs[r]["fseq"] == W and refs[r]["fpos"] == 1 and before["fpos"] < 0
        state = thinking_update(state, torch.tensor(tokens), rule)
        for r in range(R):
            assert row_state(state, r) == refs[r], (t, r)
    assert sum(seen.values()) > 0  # the rule did something in this run


def test_min_max_and_forcing_on_scripted_logits():
    """A row that always wants to stop: below the min it says the continuation, at the max the end sequence is
    forced, then the answer prefix; another row that never stops is forced at the max too."""
    V, END, WAIT, EOS, A, B = 10, 1, 2, 3, 4, 5
    budget = make_rule([[WAIT], [END, A, B]], [END], [EOS], 3, 6)
    state = ThinkingState.start(2)
    seq = [[], []]
    for _ in range(12):
        logits = torch.full((2, V), -5.0)
        logits[0, END] = 10.0  # row 0 wants to end thinking at once
        logits[1, 7] = 10.0  # row 1 never ends thinking
        x = thinking_logits(logits, state, budget)
        tok = x.argmax(-1)
        state = thinking_update(state, tok, budget)
        for r in range(2):
            seq[r].append(int(tok[r]))
    assert seq[0][:4] == [WAIT, WAIT, WAIT, END]  # 3 forced continuations, then its own end at thought 3
    assert int(state.injections[0]) == 3 and int(state.thought[0]) == 4
    assert seq[1][:9] == [7] * 6 + [END, A, B]  # the max: the marker, then the answer prefix
    assert int(state.thought[1]) == 7 and int(state.answering[1]) == 1 and int(state.fpos[1]) == -1
    assert seq[1][9:] == [7] * 3  # answering: the logits are its own again


def test_forks_carry_the_state():
    rule = make_rule([[2, 3], [1]], [1], [], 5, None)
    state = ThinkingState.start(2)
    x = torch.zeros(2, 6)
    x[:, 1] = 9.0
    state = thinking_update(state, thinking_logits(x, state, rule).argmax(-1), rule)  # both start "2 3"
    forked = state.select(torch.tensor([1, 1, 0]))
    assert forked.fpos.tolist() == [1, 1, 1] and forked.injections.tolist() == [1, 1, 1]
    y = thinking_logits(torch.zeros(3, 6), forked, rule)
    assert y.argmax(-1).tolist() == [3, 3, 3] and torch.isinf(y[:, :3]).all()  # each finishes its continuation


def test_budget_setting_checks_and_encodes():
    from tiny_models import char_tokenizer

    tok = char_tokenizer()
    with pytest.raises(ValueError, match="min_thinking_tokens .* is above max_thinking_tokens"):
        ThinkingBudget(min_thinking_tokens=5, max_thinking_tokens=4)
    with pytest.raises(ValueError, match="Settings.thinking.min_thinking_tokens must be an int >= 0"):
        ThinkingBudget(min_thinking_tokens=-1)
    with pytest.raises(ValueError, match="continuations must be a list of non-empty strings"):
        ThinkingBudget(continuations=("Wait", ""))
    with pytest.raises(ValueError, match="continuations is empty"):
        ThinkingBudget(min_thinking_tokens=3, continuations=())
    with pytest.raises(ValueError, match="unknown field"):
        ThinkingBudget.of({"min_tokens": 3})
    with pytest.raises(ValueError, match="Settings.thinking.end '\u2603' is not a token"):  # not encodable here
        ThinkingBudget(end="\u2603").rule(tok, [2])
    with pytest.raises(ValueError, match="Settings.thinking.continuations '\u2603'"):  # encodes to nothing
        ThinkingBudget(end="#", continuations=("\u2603",)).rule(tok, [2])
    rule = ThinkingBudget(min_thinking_tokens=2, max_thinking_tokens=9, end="#", continuations=("Wait", "Hm"),
                          answer_prefix="A:").rule(tok, [2])
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    assert rule.marker.tolist() == enc("#") and rule.eos.tolist() == [2]
    assert rule.lengths.tolist() == [4, 2, 3]
    assert rule.forced[2, :3].tolist() == enc("#A:") and rule.forced[1, 2].item() == -1
    assert ThinkingBudget.of({"min_thinking_tokens": 2}).min_thinking_tokens == 2
