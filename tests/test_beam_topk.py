"""beam_topk: every CPU backend against the reference, odd sizes, dtypes, bad input."""
import math

import pytest
import torch

import tts_kernels
from tts_kernels import beam_topk
from tts_kernels.reference import beam_topk_ref

from beam_checks import TOL, check_selection

DTYPES = list(TOL)


def make(B, K, V, dtype, scale=3.0):
    logits = (torch.randn(B * K, V) * scale).to(dtype)
    beam_scores = -torch.rand(B, K) * 5
    return logits, beam_scores


SHAPES = [(1, 1, 7), (2, 3, 7), (3, 4, 1000), (5, 2, 50257), (2, 4, 151936), (1, 2, 200003)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,V", SHAPES)
def test_matches_reference(B, K, V, dtype):
    logits, bs = make(B, K, V, dtype)
    for C in sorted({1, 2 * K, min(K * V, 2 * K + 3)}):
        out = beam_topk(logits, bs, C)
        check_selection(out, logits, bs, C)
        if dtype == torch.float32:
            # fp32 random logits have no ties: the indices are exactly the reference's.
            ref = beam_topk_ref(logits, bs, C)
            assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])


def test_default_candidates_is_2k():
    logits, bs = make(2, 3, 100, torch.float32)
    assert beam_topk(logits, bs)[0].shape == (2, 6)


@pytest.mark.parametrize("V", [7, 13])
def test_candidates_beyond_vocab(V):
    # C > V: candidates must come from several beams; C = K*V takes everything.
    logits, bs = make(2, 3, V, torch.float32)
    for C in (V + 1, 3 * V):
        check_selection(beam_topk(logits, bs, C), logits, bs, C)


@pytest.mark.parametrize("temperature", [0.3, 1.7])
def test_temperature(temperature):
    logits, bs = make(3, 2, 5000, torch.float32)
    out = beam_topk(logits, bs, 4, temperature)
    check_selection(out, logits, bs, 4, temperature)
    ref = beam_topk_ref(logits, bs, 4, temperature)
    assert torch.equal(out[2], ref[2])


def test_strided_rows():
    # logits[:, -1, :] of a [N, T, V] tensor: row stride T*V, contiguous tokens.
    full = torch.randn(6, 3, 999)
    logits = full[:, -1, :]
    bs = torch.randn(2, 3)
    check_selection(beam_topk(logits, bs, 5), logits, bs, 5)
    # Non-unit token stride takes the copy path.
    t = torch.randn(999, 6).t()
    check_selection(beam_topk(t, bs, 5), t, bs, 5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_never_selected(dtype):
    logits, bs = make(2, 2, 3000, dtype)
    logits[0, 100] = float("nan")
    logits[1, :50] = float("nan")
    logits[3, 7] = float("nan")
    logits[2, :-1] = float("nan")  # one finite logit left in this row
    # torch.topk ranks NaN above everything, so a kernel that forgets to
    # sanitise would pick these positions first.
    out = beam_topk(logits, bs, 4)
    check_selection(out, logits, bs, 4)
    flat_rows = torch.arange(2).view(-1, 1) * 2 + out[1]
    assert not torch.isnan(logits[flat_rows, out[2]].float()).any()


def test_all_neg_inf_row():
    logits, bs = make(2, 2, 500, torch.float32)
    logits[1] = float("-inf")  # beam 1 of item 0 is dead
    logits[2:] = float("-inf")  # item 1 entirely dead
    logits[3, 5] = float("nan")
    out = beam_topk(logits, bs, 4)
    check_selection(out, logits, bs, 4)
    assert (out[1][0] == 0).all()  # only beam 0 is alive in item 0
    assert torch.isneginf(out[0][1]).all()  # -inf, not NaN, no error


def test_pos_inf_is_garbage():
    # +inf logits (fp16 overflow), or finite ones that overflow under x / T, are
    # treated like NaN: never selected, and the rest of the row stays well defined.
    logits, bs = make(2, 2, 300, torch.float32)
    logits[1, 17] = float("inf")
    logits[0, 5] = 3e38  # / 0.5 overflows to +inf
    out = beam_topk(logits, bs, 4, 0.5)
    check_selection(out, logits, bs, 4, 0.5)
    assert torch.isfinite(out[0]).all()
    flat = out[1] * 300 + out[2]
    assert not ((flat == 17 + 300) | (flat == 5)).any()


def test_finished_beams_at_neg_inf():
    # Finished beams carry -inf scores: all their candidates tie at -inf and are
    # ordered by flat index, whatever their logits.
    logits, bs = make(2, 3, 50, torch.float32)
    bs[0, 1] = float("-inf")
    bs[1, :] = float("-inf")
    out = beam_topk(logits, bs, 8)
    check_selection(out, logits, bs, 8)
    assert torch.equal(out[1][1], torch.zeros(8, dtype=torch.long))
    assert torch.equal(out[2][1], torch.arange(8))


def test_ties_lower_index_first():
    logits = torch.zeros(4, 10)
    bs = torch.zeros(2, 2)
    scores, parents, tokens = beam_topk(logits, bs, 5)
    assert torch.equal(parents, torch.zeros(2, 5, dtype=torch.long))
    assert torch.equal(tokens, torch.arange(5).repeat(2, 1))
    torch.testing.assert_close(scores, torch.full((2, 5), -math.log(10)))


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts(threads):
    # One thread, and few rows so the vocabulary is split over threads.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        logits, bs = make(1, 1, 100003, torch.float32)
        ref = beam_topk_ref(logits, bs, 2)
        out = beam_topk(logits, bs, 2)
        assert torch.equal(out[2], ref[2])
        torch.testing.assert_close(out[0], ref[0], **TOL[torch.float32])
    finally:
        torch.set_num_threads(old)


def test_opcheck_and_compile():
    logits, bs = make(2, 3, 50, torch.float32)
    torch.library.opcheck(torch.ops.tts.beam_topk.default, (logits, bs, 4, 1.0))
    compiled = torch.compile(lambda x, s: beam_topk(x, s, 4), fullgraph=True)
    out = compiled(logits, bs)
    ref = beam_topk_ref(logits, bs, 4)
    assert torch.equal(out[2], ref[2])


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(logits=torch.randn(6)), ValueError, "logits"),
        (dict(logits=torch.randint(0, 5, (6, 10))), TypeError, "logits"),
        (dict(beam_scores=torch.randn(2, 3).double()), TypeError, "beam_scores"),
        (dict(beam_scores=torch.randn(6)), ValueError, "beam_scores"),
        (dict(beam_scores=torch.randn(2, 2)), ValueError, "B*K"),
        (dict(num_candidates=0), ValueError, "num_candidates"),
        (dict(num_candidates=31), ValueError, "num_candidates"),
        (dict(num_candidates=2.0), TypeError, "num_candidates"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature="1"), TypeError, "temperature"),
        (dict(logits=[[1.0]]), TypeError, "logits"),
        (dict(backend="nope"), ValueError, "backend"),
    ],
)
def test_bad_input(kwargs, exc, word):
    args = dict(logits=torch.randn(6, 10), beam_scores=torch.randn(2, 3), num_candidates=4, temperature=1.0)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        beam_topk(**args)


def test_device_mismatch():
    meta_scores = torch.randn(2, 3, device="meta")
    with pytest.raises(ValueError, match="device"):
        beam_topk(torch.randn(6, 10), meta_scores)


def test_extension_loaded():
    # The suite must exercise the compiled kernels, not silently the fallback.
    assert tts_kernels.HAS_C, tts_kernels._ext.LOAD_ERROR


def test_fuzz_against_reference():
    # Seeded random shapes, candidate counts, temperatures, dtypes and holes
    # (NaN, -inf, +inf logits; finished beams at -inf), checked like the rest.
    gen = torch.Generator().manual_seed(1234)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    for _ in range(60):
        B, K, V = draw(1, 4), draw(1, 5), draw(1, 3000)
        dtype = DTYPES[draw(0, 2)]
        logits = (torch.randn(B * K, V, generator=gen) * draw(1, 8)).to(dtype)
        bs = -torch.rand(B, K, generator=gen) * 10
        holes = torch.rand(B * K, V, generator=gen)
        logits[holes < 0.02] = float("nan")
        logits[(holes >= 0.02) & (holes < 0.05)] = float("-inf")
        logits[holes > 0.999] = float("inf")
        if draw(0, 4) == 0:
            bs[draw(0, B - 1), draw(0, K - 1)] = float("-inf")
        C = draw(1, min(K * V, 40))
        T = [1.0, 0.5, 2.0][draw(0, 2)]
        check_selection(beam_topk(logits, bs, C, T), logits, bs, C, T)
