"""sample(..., stats_k=k): token confidence, entropy and self-certainty, every backend, and SlidingWindow.

Each backend (the reference, the C++ kernel, the Triton kernel in the interpreter) is checked
against the statistics computed here directly from the full logits in float64, on fresh random
inputs of odd sizes, and the draw must be the one without statistics. The Triton cases run in a
child process under ``TRITON_INTERPRET=1`` (tests/child_process.py says why), this file run as
a script; each test reads its case's verdict.
"""
from __future__ import annotations

import math
import os
import sys

# fp32 statistics within 1e-5 relative of float64; the atol only covers exact zeros (V = 1, a point mass).
TOL = dict(rtol=1e-5, atol=1e-7)


def truth(torch, logits, k):
    """float64 statistics of ``logits [R, V]`` from their definition (NaN, +inf read as -inf)."""
    x = logits.double()
    x = torch.where(torch.isnan(x) | torch.isposinf(x), torch.full_like(x, -math.inf), x)
    R, V = x.shape
    lp = x - torch.logsumexp(x, dim=1, keepdim=True)
    p = lp.exp()
    conf = -lp.topk(min(k, V), dim=1).values.mean(dim=1)
    ent = -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(dim=1)
    sc = -math.log(V) - lp.mean(dim=1)
    out = torch.stack([conf, ent, sc], dim=1)
    out[torch.isneginf(x.max(dim=1).values)] = math.nan
    return out


def check_stats(torch, got, logits, k):
    assert got.dtype == torch.float32 and tuple(got.shape) == (logits.shape[0], 3), (got.dtype, got.shape)
    want = truth(torch, logits, k)
    torch.testing.assert_close(got.double(), want, equal_nan=True, **TOL)


def special_logits(torch):
    """Rows with -inf, NaN and +inf entries, no finite logit, one finite logit, fewer finite than k,
    ties at the maximum, a near point mass."""
    V = 300
    x = torch.randn(10, V) * 3
    x[0, ::3] = -math.inf
    x[1] = -math.inf  # no finite logit: NaN
    x[2] = math.nan  # no finite logit either
    x[3, :] = -math.inf
    x[3, 17] = 0.5  # one finite logit: a point mass
    x[4, 5:] = -math.inf  # 5 finite < k = 20: confidence +inf
    x[5, ::2] = math.nan
    x[5, 1] = math.inf  # overflow garbage, read as -inf
    x[6] = (torch.randint(-3, 4, (V,)) / 2).float()  # many ties, several at the maximum
    x[7, 42] = 40.0  # nearly all the mass on one token: log Z = log(1 + ~1e-15)
    x[8] = 0.0  # uniform: confidence = entropy = log V, self-certainty 0
    x[9, 100:] = -1e30  # finite but far below: p underflows to 0
    return x


# ----------------------------------------------------------------------------- Triton cases (child)


def _triton_stats(torch, st, logits, k, **kw):
    full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, offset=0)
    full.update(kw)
    args = (logits, full["temperature"], full["top_k"], full["top_p"], full["min_p"], full["seed"], full["offset"])
    stats = torch.empty(logits.shape[0], 3)
    tok, lp = st.sample_triton(*args, stats_k=min(k, logits.shape[1]), stats=stats)
    tok0, lp0 = st.sample_triton(*args)
    assert torch.equal(tok, tok0) and torch.equal(lp, lp0), "stats changed the draw"
    return stats


def _case_sizes(torch, st):
    for V in (1, 7, 1000):
        for R in (1, 3, 17):
            logits = torch.randn(R, V) * 3
            for k in (1, 20, V + 3):
                check_stats(torch, _triton_stats(torch, st, logits, k), logits, k)


def _case_v49152(torch, st):
    logits = torch.randn(2, 49152) * 3
    for k in (1, 20):
        check_stats(torch, _triton_stats(torch, st, logits, k), logits, k)
    check_stats(torch, _triton_stats(torch, st, logits[:1], 49153), logits[:1], 49153)


def _case_filters_and_temperature(torch, st):
    # The statistics are of the temperature-1 distribution whatever the sampler is asked.
    logits = torch.randn(3, 500) * 2
    for kw in (dict(temperature=0.7, top_k=5), dict(top_p=0.8), dict(temperature=0.0), dict(min_p=0.1)):
        check_stats(torch, _triton_stats(torch, st, logits, 20, **kw), logits, 20)


def _case_special_rows(torch, st):
    logits = special_logits(torch)
    for k in (1, 20, 301):
        check_stats(torch, _triton_stats(torch, st, logits, k), logits, k)


def _case_fp16_bf16(torch, st):
    for dt in (torch.float16, torch.bfloat16):
        logits = (torch.randn(3, 513) * 3).to(dt)
        check_stats(torch, _triton_stats(torch, st, logits, 20), logits, 20)


def _case_public_api(torch, st):
    import tts_kernels

    logits = torch.randn(3, 200) * 2
    tok, lp, stats = tts_kernels.sample(logits, top_p=0.9, seed=4, stats_k=20, backend="triton")
    tok0, lp0 = tts_kernels.sample(logits, top_p=0.9, seed=4, backend="triton")
    assert torch.equal(tok, tok0) and torch.equal(lp, lp0)
    check_stats(torch, stats, logits, 20)


CASES = {name[len("_case_"):]: fn for name, fn in list(globals().items()) if name.startswith("_case_")}


def _child() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch

    from child_process import record, report

    from tts_kernels.triton import sample as st

    results = {"_interpreted": type(st._sample_stats_kernel).__name__ == "InterpretedFunction"}
    for i, (name, fn) in enumerate(CASES.items()):
        torch.manual_seed(5000 + i)
        record(results, name, fn, torch, st)
    report(results)


if __name__ == "__main__":
    _child()
    sys.exit(0)


# ----------------------------------------------------------------------------- the tests

import pytest  # noqa: E402
import torch  # noqa: E402

from tts_kernels import sample  # noqa: E402
from tts_kernels.ops import SlidingWindow  # noqa: E402
from tts_kernels.reference import SlidingWindowRef, sample_ref, sample_stats_ref  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SAMPLERS = [dict(), dict(temperature=0.7), dict(temperature=0.0), dict(top_k=5, top_p=0.9, min_p=0.02)]


def with_and_without(logits, backend, k, **kw):
    """``sample`` with stats_k=k; asserts the draw equals the call without statistics."""
    kw.setdefault("seed", 11)
    tok, lp, stats = sample(logits, stats_k=k, backend=backend, **kw)
    tok0, lp0 = sample(logits, backend=backend, **kw)
    assert torch.equal(tok, tok0), "stats changed the tokens"
    assert torch.equal(lp, lp0), "stats changed the logprobs"
    assert stats.device == logits.device
    return stats


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 7, 1000, 49152])
def test_matches_float64(backend, dtype, V):
    # The reference sorts every row per call: at V = 49152 it gets fewer rows and samplers.
    slow = backend == "reference" and V > 1000
    for R in (1, 3) if slow else (1, 3, 17):
        logits = (torch.randn(R, V) * 3).to(dtype)
        for k in (1, 20, V + 3):
            for i, kw in enumerate(SAMPLERS[:2] if slow else SAMPLERS):
                stats = with_and_without(logits, backend, k, offset=i, **kw)
                check_stats(torch, stats, logits, k)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_special_rows(backend):
    logits = special_logits(torch)
    for k in (1, 20, 301):
        for kw in (dict(), dict(temperature=0.5, top_p=0.9), dict(temperature=0.0)):
            stats = with_and_without(logits, backend, k, **kw)
            check_stats(torch, stats, logits, k)
            assert torch.isnan(stats[1:3]).all(), "no finite logit: NaN"
            assert torch.isposinf(stats[[0, 4, 5], 2]).all(), "a -inf logit: self-certainty +inf"
            assert bool(torch.isposinf(stats[4, 0])) == (k > 5), "fewer finite logits than k: confidence +inf"
            assert stats[3, 1] == 0 and (stats[3, 0] == 0) == (k == 1), "a point mass: entropy 0"
            torch.testing.assert_close(stats[8], torch.tensor([math.log(300), math.log(300), 0.0]), rtol=1e-6,
                                       atol=1e-6)
            finite = ~torch.isnan(stats)
            assert (stats[finite] >= 0).all()


def test_overflow_at_the_temperature_still_counts_at_temperature_1():
    # / 0.01 overflows 1e37 to +inf (-inf for the sampler); at temperature 1 it is the maximum.
    logits = torch.randn(2, 10)
    logits[0, 7] = 1e37
    logits[1] = -1e37
    logits[1, 3] = 1e37
    for backend in ("reference", "cpp"):
        stats = with_and_without(logits, backend, 4, temperature=0.01)
        check_stats(torch, stats, logits, 4)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_per_row_parameters_streams_and_strides(backend):
    R, V = 9, 700
    full = torch.randn(R, 2, V) * 3
    logits = full[:, 1, :]  # row stride 2V
    kw = dict(temperature=torch.rand(R) + 0.3, top_k=torch.arange(R) * 7, top_p=torch.rand(R) * 0.5 + 0.5,
              seed=torch.arange(R) + 5, offset=torch.tensor(3), stream=torch.arange(R) * 11)
    stats = with_and_without(logits, backend, 20, **kw)
    check_stats(torch, stats, logits, 20)
    t = (torch.randn(V, 5) * 3).t()  # non-unit token stride
    check_stats(torch, with_and_without(t, backend, 3), t, 3)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        logits = torch.randn(5, 49152) * 3
        check_stats(torch, with_and_without(logits, "cpp", 20, top_p=0.9), logits, 20)
    finally:
        torch.set_num_threads(old)


def test_large_k_paths():
    # k above the C++ kernel's sorted-list limit (256): the histogram selection, with ties at the k-th value.
    logits = (torch.randint(-20, 21, (4, 3000)) / 4).float()
    for k in (255, 256, 257, 1000, 2999, 3000, 2**62):
        check_stats(torch, with_and_without(logits, "cpp", k), logits, k)
        check_stats(torch, with_and_without(logits, "reference", k), logits, k)


def test_reference_and_cpp_agree_on_fuzz():
    g = torch.Generator().manual_seed(77)
    for i in range(40):
        R, V = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 4000, (1,), generator=g))
        logits = torch.randn(R, V, generator=g) * float(torch.randint(1, 12, (1,), generator=g))
        holes = torch.rand(R, V, generator=g)
        logits[holes < 0.05] = -math.inf
        logits[holes > 0.99] = math.nan
        k = int(torch.randint(1, 40, (1,), generator=g))
        a = with_and_without(logits, "cpp", k, offset=i)
        b = with_and_without(logits, "reference", k, offset=i)
        torch.testing.assert_close(a, b, equal_nan=True, **TOL)
        check_stats(torch, a, logits, k)


def test_default_is_unchanged():
    logits = torch.randn(4, 100)
    out = sample(logits, seed=3)
    assert len(out) == 2
    assert len(sample(logits, seed=3, stats_k=0)) == 2
    assert len(sample(logits, seed=3, stats_k=1)) == 3
    tok, lp, stats = sample_ref(logits, seed=3, stats_k=5)
    assert torch.equal(stats, sample_stats_ref(logits, 5))


@pytest.mark.parametrize(
    "stats_k,exc",
    [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("20", TypeError), (torch.tensor(3), TypeError),
     (None, TypeError)],
)
def test_bad_stats_k(stats_k, exc):
    with pytest.raises(exc, match="stats_k"):
        sample(torch.randn(3, 10), seed=0, stats_k=stats_k)
    # Checked before anything else: named even when the logits are bad too.
    with pytest.raises(exc, match="stats_k"):
        sample(torch.randn(10), seed=0, stats_k=stats_k)


def test_opcheck_and_compile():
    logits = torch.randn(4, 50)
    op = torch.ops.tts.sample.default
    stats = torch.empty(4, 3)
    args = (logits, 0.8, 5, 0.9, 0.0, 1, 2, None, None, None, None, None, None, None, 20, stats)
    torch.library.opcheck(op, args)  # on copies of the arguments
    tok, lp = op(*args)
    assert torch.equal(tok, op(*args[:14])[0])
    check_stats(torch, stats, logits, 20)
    compiled = torch.compile(lambda x: sample(x, temperature=0.7, top_p=0.9, seed=5, stats_k=3), fullgraph=True)
    tok, lp, got = compiled(logits)
    want = sample(logits, temperature=0.7, top_p=0.9, seed=5, stats_k=3)
    assert torch.equal(tok, want[0]) and torch.equal(got, want[2])


# ----------------------------------------------------------------------------- Triton (interpreter)

triton_needed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton is not installed")


@triton_needed
def test_triton_is_interpreted(child_results):
    assert child_results["_interpreted"], "TRITON_INTERPRET=1 did not take effect"


@triton_needed
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_float64(child_results, name):
    r = child_results[name]
    assert r["verdict"] == "ok", r["verdict"]


@triton_needed
def test_triton_stats_kernel_compiles_for_hopper():
    """The interpreter does not run Triton's compiler: compile the stats kernel to sm_90 cubin."""
    from child_process import compile_for_hopper

    from tts_kernels.triton import sample as st

    for dt, ptr in (("fp32", False), ("bf16", True)):
        sig = dict(logits_ptr=f"*{dt}", row_stride="i64", V="i32")
        for p, ptr_t, val_t in (("t", "*fp32", "fp32"), ("k", "*i64", "i64"), ("p", "*fp32", "fp32"),
                                ("mp", "*fp32", "fp32"), ("s", "*i64", "i64"), ("o", "*i64", "i64")):
            sig.update({f"{p}_ptr": ptr_t, f"{p}_stride": "i32", f"{p}_val": val_t})
        sig.update(st_ptr="*i64", tokens_ptr="*i64", logprobs_ptr="*fp32", stats_ptr="*fp32", stats_k="i64")
        consts = dict(T_PTR=ptr, K_PTR=ptr, P_PTR=ptr, MP_PTR=ptr, S_PTR=ptr, O_PTR=True, ST_PTR=ptr,
                      TILE=st._TILE, STILE=st._STILE, NPIV=st._NPIV)
        sig.update({k: "constexpr" for k in consts})
        kernel = compile_for_hopper(st._sample_stats_kernel, sig, consts, num_warps=4, enable_fp_fusion=False)
        assert "cubin" in kernel.asm, dt


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)

cuda_needed = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_needed
@pytest.mark.parametrize("V", [7, 49152, 151936])
def test_cuda_matches_float64(V):
    logits = torch.randn(64, V) * 3
    logits[0, ::5] = -math.inf
    logits[1] = -math.inf
    for dtype in DTYPES:
        x = logits.to(dtype)
        stats = with_and_without(x.cuda(), "auto", 20, top_p=0.9).cpu()
        # GPU exp/log are approximate to a few ulp.
        torch.testing.assert_close(stats.double(), truth(torch, x, 20), equal_nan=True, rtol=1e-4, atol=1e-6)


@cuda_needed
def test_cuda_no_sync():
    R, V = 16, 32000
    logits = torch.randn(R, V, device="cuda") * 3
    offset = torch.zeros((), dtype=torch.int64, device="cuda")
    win = SlidingWindow.start(R, 8, device="cuda")
    active = torch.ones(R, dtype=torch.bool, device="cuda")
    sample(logits, seed=1, offset=offset, stats_k=20)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            tok, lp, stats = sample(logits, seed=1, offset=offset, stats_k=20)
            win.push(stats[:, 0], active & (tok % 7 != 0))
            offset += 1
        win = win.select(torch.arange(R, device="cuda").flip(0))
        _ = win.lowest < 1.0
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ----------------------------------------------------------------------------- SlidingWindow


def assert_window(win: SlidingWindow, ref: SlidingWindowRef):
    assert win.count.tolist() == ref.count
    torch.testing.assert_close(win.mean, torch.tensor(ref.mean, dtype=torch.float32), equal_nan=True, rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(win.lowest, torch.tensor(ref.lowest, dtype=torch.float32), equal_nan=True,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window", [1, 3, 16])
def test_sliding_window_matches_reference(window):
    g = torch.Generator().manual_seed(window)
    R = 7
    win, ref = SlidingWindow.start(R, window), SlidingWindowRef(R, window)
    assert torch.isnan(win.mean).all() and torch.isposinf(win.lowest).all() and (win.count == 0).all()
    for step in range(80):
        values = torch.rand(R, generator=g) * 10
        active = torch.rand(R, generator=g) < [0.9, 0.5, 0.2][step % 3]
        if step % 7 == 0:
            win.push(values.double())  # all rows active; any float dtype
            ref.push(values.tolist(), [True] * R)
        else:
            win.push(values, active)
            ref.push(values.tolist(), active.tolist())
        assert_window(win, ref)
        if step % 13 == 5:  # fork some rows, drop others (repeats allowed)
            R = int(torch.randint(1, 10, (1,), generator=g))
            idx = torch.randint(0, win.rows, (R,), generator=g)
            forked = win.select(idx)
            ref = ref.select(idx.tolist())
            assert_window(forked, ref)
            before = (win.values.clone(), win.count.clone(), win.mean.clone(), win.lowest.clone())
            forked.push(torch.full((R,), 100.0))  # the copy is independent of the original
            ref.push([100.0] * R, [True] * R)
            for a, b in zip((win.values, win.count, win.mean, win.lowest), before):
                assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()],
                                                                                              b[~b.isnan()])
            win = forked
            assert_window(win, ref)


def test_sliding_window_grow_appends_empty_rows():
    win, ref = SlidingWindow.start(3, 4), SlidingWindowRef(3, 4)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        v = torch.rand(3, generator=g)
        win.push(v)
        ref.push(v.tolist(), [True] * 3)
    grown = win.grow(2)
    assert grown.rows == 5 and win.rows == 3  # a new window; this one unchanged
    wide = SlidingWindowRef(5, 4)  # rows 0..2 as before (the reference's rows copied), 3..4 empty
    wide.values[:3], wide.lowest[:3] = [list(r) for r in ref.values], list(ref.lowest)
    assert_window(grown, wide)
    for _ in range(5):  # the new rows fill as rows of their own
        v = torch.rand(5, generator=g)
        grown.push(v)
        wide.push(v.tolist(), [True] * 5)
        assert_window(grown, wide)


def test_sliding_window_lowest_and_non_finite_values():
    win, ref = SlidingWindow.start(2, 3), SlidingWindowRef(2, 3)
    seq = [(5.0, 1.0), (4.0, math.inf), (3.0, 2.0), (9.0, 3.0), (9.0, 4.0), (9.0, 5.0), (math.nan, 6.0),
           (1.0, 7.0), (1.0, 8.0), (1.0, 9.0)]
    lowest = []
    for a, b in seq:
        win.push(torch.tensor([a, b]), torch.tensor([True, True]))
        ref.push([a, b], [True, True])
        assert_window(win, ref)
        lowest.append(win.lowest.tolist())
    assert lowest[1] == [math.inf, math.inf]  # no full window yet
    assert lowest[2][0] == 4.0 and lowest[2][1] == math.inf  # an inf in the window: its mean is inf
    assert lowest[3][1] == math.inf and lowest[4][1] == 3.0  # once the inf left the window: (2 + 3 + 4) / 3
    assert lowest[9][0] == 1.0  # the NaN mean was skipped, and the window recovered from it


def test_sliding_window_from_sample_stats():
    # A decode-loop shape: statistics from sample, rows finishing, a fork.
    R, V = 6, 300
    win, ref = SlidingWindow.start(R, 4), SlidingWindowRef(R, 4)
    done = torch.zeros(R, dtype=torch.bool)
    for step in range(12):
        logits = torch.randn(R, V) * 3
        tok, _, stats = sample(logits, seed=2, offset=step, stats_k=20)
        active = ~done
        win.push(stats[:, 0], active)
        ref.push(stats[:, 0].tolist(), active.tolist())
        done |= tok % 11 == 0
        if step == 6:
            idx = torch.tensor([0, 0, 1, 2, 3, 5])
            win, ref, done = win.select(idx), ref.select(idx.tolist()), done[idx]
        assert_window(win, ref)


@pytest.mark.parametrize(
    "call,exc,word",
    [
        (lambda: SlidingWindow.start(3, 0), ValueError, "window"),
        (lambda: SlidingWindow.start(3, 2.0), TypeError, "window"),
        (lambda: SlidingWindow.start(-1, 2), ValueError, "rows"),
        (lambda: SlidingWindow.start(3, 2).push(torch.zeros(4)), ValueError, "values"),
        (lambda: SlidingWindow.start(3, 2).push(torch.zeros(3, dtype=torch.long)), TypeError, "values"),
        (lambda: SlidingWindow.start(3, 2).push(torch.zeros(3), torch.ones(3)), ValueError, "active"),
        (lambda: SlidingWindow.start(3, 2).select(torch.zeros(2, 2, dtype=torch.long)), ValueError, "idx"),
    ],
)
def test_sliding_window_bad_input(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
