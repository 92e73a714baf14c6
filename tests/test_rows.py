"""StepRows (search/rows.py), the engine under every step search, on the scripted fake: one declaration of
the per-row fields, and each operation -- fork, drop, park, roll_back, refill -- checked against fresh
sessions started from the same history, with per-prompt draws that do not depend on the batch."""
import ast
import dataclasses
import inspect

import pytest
import torch
from scripted import ScriptedPolicy, ScriptedVerifier, step_score

from tts_kernels.ops.thinking import ThinkingState
from tts_kernels.search import Settings, rows as rows_module
from tts_kernels.search.dedupe import RowHashes
from tts_kernels.search.rows import History, RowData, StepRows

PROMPTS = ["abc", "h.", "ggg a"]
SEEDS = [3, 4, 5]
S = Settings(max_new_tokens=10, max_step_tokens=5, num_iterations=4, step_delimiter=".", temperature=1.0, agg="min")


def start(prompts=PROMPTS, seeds=SEEDS, **kw):
    policy, verifier = ScriptedPolicy(boost={".": 1.0, 1: -3.0}), ScriptedVerifier()
    return StepRows(policy, verifier, prompts, S, seeds=seeds, capacity=32, **kw)


def fresh_logits(rows, r):
    """The next-token logits of a fresh policy session over row ``r``'s prompt and completion."""
    s = rows.policy.start([rows.prompt_ids[rows.owner[r]] + rows.ids[r]], rows_hint=1, max_new_tokens=1)
    try:
        return s.logits[0]
    finally:
        s.free()


def fresh_aggregate(rows, r):
    return float(rows.prm_model.score_steps([rows.prompts[rows.owner[r]]], [[rows.steps[r]]], agg=S.agg).aggregate[0])


def check_row(rows, r):
    """Row ``r``'s sessions and fields agree with a fresh start from its history."""
    assert rows.texts[r] == "".join(rows.steps[r])
    assert rows.tok.decode(rows.ids[r], skip_special_tokens=True) == rows.texts[r]
    assert sum(rows.step_ntok[r]) == len(rows.ids[r])
    assert torch.equal(rows.pol.logits[r], fresh_logits(rows, r))
    assert rows.step_scores[r] == pytest.approx([step_score(t) for t in rows.steps[r]], abs=1e-6)
    if rows.steps[r]:
        assert float(rows.prm.aggregate[r]) == pytest.approx(fresh_aggregate(rows, r), abs=1e-6)


def test_one_declaration_covers_every_field():
    """RowData.take maps every declared field, whatever its kind, and copies the host lists per row."""
    n = 3
    values = {}
    for f in dataclasses.fields(RowData):
        if f.name in ("logprob_sum", "logprob_count"):
            values[f.name] = torch.arange(n) + (10 if f.name == "logprob_sum" else 20)
        elif f.name == "thinking":
            values[f.name] = ThinkingState(*(torch.arange(n) + 30 + k for k in range(6)))
        elif f.name == "hashes":
            values[f.name] = RowHashes(n, "cpu")
            values[f.name].h = torch.arange(2 * n).view(n, 2)
        else:
            values[f.name] = [[f.name, r] for r in range(n)]
    data = RowData(**values)
    order = [2, 0, 2]
    got = data.take(order, torch.tensor(order))
    for f in dataclasses.fields(RowData):
        old, new = getattr(data, f.name), getattr(got, f.name)
        if isinstance(old, list):
            assert new == [old[r] for r in order] and new[0] is not old[2] and new[0] is not new[2]
        elif isinstance(old, torch.Tensor):
            assert new.tolist() == [old[r].item() for r in order]
        elif isinstance(old, RowHashes):
            assert torch.equal(new.h, old.h[order]) and old.h.shape[0] == n
        else:
            assert torch.equal(new.thought, old.thought[order]) and torch.equal(new.mpos, old.mpos[order])
    # Every field reads as a column of the rows.
    rows = start()
    try:
        assert all(getattr(rows, f.name) is getattr(rows.data, f.name) for f in dataclasses.fields(RowData))
    finally:
        rows.free()


def test_fork_copies_histories_and_numbers_each_prompts_rows():
    rows = start()
    try:
        rows.fork([0, 0, 1, 2, 2, 2])
        assert rows.stream == [0, 1, 0, 0, 1, 2] and rows.owner == [0, 0, 1, 2, 2, 2]
        rows.step(False)
        rows.fork([1, 1, 3, 5])  # repeats: copies share the history, and get their own lists
        assert rows.owner == [0, 0, 2, 2] and rows.stream == [0, 1, 0, 1] and len(rows.pol.logits) == 4
        assert rows.texts[0] == rows.texts[1] and rows.steps[0] is not rows.steps[1]
        for r in range(4):
            check_row(rows, r)
        rows.step(False)
        assert rows.texts[0] != rows.texts[1]  # their own streams: other draws from the same history
        for r in range(4):
            check_row(rows, r)
    finally:
        rows.free()


def _texts_of(rows, p):
    return [t for t, o in zip(rows.texts, rows.owner) if o == p]


def test_drop_keeps_the_others_draws():
    """Dropping rows changes nothing for the rows left (their streams are kept: prompt 0's second row still
    draws as its second candidate), and the dropped rows leave both sessions."""
    kept = start()
    full = start()
    try:
        for rows in (kept, full):
            rows.fork([0, 0, 1, 1, 2, 2])
            rows.step(False)
        kept.drop([0, 2, 3])
        assert kept.owner == [0, 2, 2] and kept.stream == [1, 0, 1]
        assert kept.pol.rows == kept.prm.rows == 3
        for rows in (kept, full):
            rows.step(False)
            rows.step(False)
        assert kept.texts == [full.texts[r] for r in (1, 4, 5)] and full.texts[0] != full.texts[1]
        for r in range(3):
            check_row(kept, r)
    finally:
        kept.free()
        full.free()


def test_parked_rows_do_not_sample_and_ride_along():
    rows = start()
    try:
        rows.fork([0, 0, 1, 2])
        rows.step(False)
        rows.park([1])
        before = (rows.texts[1], rows.ids[1], rows.pol.logits[1].clone(), float(rows.prm.aggregate[1]))
        texts, finish = rows.step(False)
        assert texts[1] == "" and finish[1] is None
        assert (rows.texts[1], rows.ids[1]) == before[:2] and torch.equal(rows.pol.logits[1], before[2])
        assert float(rows.prm.aggregate[1]) == before[3]
        rows.fork([0, 2, 1])  # the parked row is carried after the listed ones; its copy (listed) is live
        assert rows.parked == [False, False, False, True] and rows.texts[3] == before[0] == rows.texts[2]
        assert rows.owner == [0, 1, 0, 0]
        rows.unpark([3])
        texts, _ = rows.step(False)
        assert texts[3] != "" and all(not p for p in rows.parked)
        for r in range(4):
            check_row(rows, r)
    finally:
        rows.free()


def test_roll_back_equals_a_fresh_start_from_the_kept_steps():
    rows = start(keep_prompts=True)
    try:
        rows.fork([0, 0, 2, 2])
        for _ in range(3):
            rows.step(False)
        deep = [r for r in range(4) if len(rows.steps[r]) >= 2]
        assert deep, "no row grew two steps"
        want = {r: (rows.steps[r][:1], rows.step_scores[r][:1]) for r in deep}
        rows.roll_back(deep, 1)  # the verifier rows hold more than one step: they start again from the prompt
        for r in deep:
            assert (rows.steps[r], rows.step_scores[r]) == (want[r][0], pytest.approx(want[r][1], abs=1e-6))
            assert rows.scored[r] == 1
            check_row(rows, r)
        rows.step(False)  # and they grow again from there
        for r in range(4):
            check_row(rows, r)
        with pytest.raises(ValueError, match="cannot keep 9"):
            rows.roll_back([0], 9)
    finally:
        rows.free()
    plain = start()
    try:
        plain.fork([0, 0])
        plain.step(False)
        plain.step(False)
        with pytest.raises(ValueError, match="keep_prompts"):
            plain.roll_back([r for r in range(2) if plain.steps[r]], 0)
    finally:
        plain.free()


def test_roll_back_of_a_parked_history_scores_its_kept_steps():
    """Particle Gibbs's case: a row started parked with a whole completion (the verifier holds the prompt
    only), forked live and rolled back to its first steps."""
    steps = ["ab.", "cd.", "ee"]
    ids = ScriptedPolicy().tokenizer.encode("".join(steps))
    hist = History(prompt=1, ids=ids, text="".join(steps), steps=steps, step_scores=[0.9, 0.9, 0.9],
                   step_ntok=[3, 3, 2])
    rows = start(parked=[hist])
    try:
        assert rows.parked == [False, False, False, True] and rows.scored[3] == 0
        rows.fork([0, 3])
        assert rows.owner == [0, 1, 1] and rows.parked == [False, False, True]
        rows.roll_back([1], 2)
        assert rows.steps[1] == steps[:2] and rows.texts[1] == "ab.cd." and rows.ids[1] == ids[:6]
        assert rows.step_scores[1] == pytest.approx([step_score(s) for s in steps[:2]], abs=1e-6)
        check_row(rows, 1)
        assert rows.steps[2] == steps and rows.step_scores[2] == [0.9, 0.9, 0.9]  # the parked original
    finally:
        rows.free()
    with pytest.raises(ValueError, match="cannot go back"):
        start(track_logprobs=True).roll_back([0], 0)


def test_refill_starts_new_candidates_from_the_prompt():
    """keep_prompts: new rows of given prompts start from the prompt and draw as each prompt's next
    candidate; a refilled row draws the same whatever else is in the batch."""
    rows = start(keep_prompts=True)
    alone = start(prompts=[PROMPTS[0]], seeds=[SEEDS[0]], keep_prompts=True)
    try:
        assert rows.parked == [True] * 3
        rows.fork([0, 0, 1])
        alone.fork([0, 0])
        assert rows.owner == [0, 0, 1, 0, 1, 2] and rows.parked == [False] * 3 + [True] * 3
        for r in (rows, alone):
            r.step(False)
            r.drop([0])
        new = rows.refill([0, 2, 0])
        assert new == [2, 3, 4] and [rows.owner[r] for r in new] == [0, 2, 0]
        assert [rows.stream[r] for r in new] == [2, 0, 3]  # prompt 0 used streams 0 and 1
        assert rows.owner == [0, 1, 0, 2, 0, 0, 1, 2] and rows.parked == [False] * 5 + [True] * 3
        for r in new:
            assert rows.texts[r] == "" and rows.steps[r] == []
            assert torch.equal(rows.pol.logits[r], fresh_logits(rows, r))
        assert alone.refill([0, 0]) == [1, 2]
        for r in (rows, alone):
            r.step(False)
            r.step(False)
        assert _texts_of(alone, 0) == _texts_of(rows, 0)  # streams 1, 2, 3 and the parked prompt row
        for r in range(5):
            check_row(rows, r)
    finally:
        rows.free()
        alone.free()
    plain = start()
    try:
        with pytest.raises(ValueError, match="keep_prompts"):
            plain.refill([0])
    finally:
        plain.free()


def test_seeds_and_cancellation_are_arguments():
    rows = start(cancelled=lambda: {1})
    try:
        assert rows.cancelled_prompts() == frozenset({1})
    finally:
        rows.free()
    rows = start()
    try:
        assert rows.cancelled_prompts() == frozenset()
    finally:
        rows.free()
    # Nothing in rows.py reads the ambient cancellation or draws a seed of its own.
    tree = ast.parse(inspect.getsource(rows_module))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "cancel" not in imported and "random" not in imported
