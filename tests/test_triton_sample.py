"""Triton sample against the reference, in the Triton interpreter (CPU tensors).

As in tests/test_triton_beam_topk.py, the interpreter must be on before the
kernel module is imported, so every case runs in one child process started with
``TRITON_INTERPRET=1`` (this file, run as a script) and each test reads its
case's verdict. The interpreter runs each program in numpy, so sizes are small
except two single-row cases at V = 50257.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


FILTERS = [
    dict(),
    dict(temperature=0.7, top_k=3),
    dict(top_p=0.8),
    dict(min_p=0.1, temperature=1.3),
    dict(top_k=50, top_p=0.8, min_p=0.02, temperature=0.8),
    dict(temperature=0.0, top_k=5),
]


def _case_uniform_bits(torch, st):
    """The kernel's uniforms are the reference's, bit for bit."""
    from tts_kernels.reference import sample_uniform_ref

    for seed, offset in [(0, 0), (123456789, 7), (2**62 + 5, 2**40 + 3), (-1, -(2**63))]:
        out = st.sample_uniforms_triton(seed, offset, 3, 77, "cpu")
        assert torch.equal(out, sample_uniform_ref(seed, offset, 3, 77)), f"seed={seed} offset={offset}"


def _case_race_uses_uniforms(torch, st):
    R, V = 48, 61
    tokens, _ = st.sample_triton(torch.zeros(R, V), 1.0, 0, 1.0, 0.0, 2**40 + 1, 3)
    from tts_kernels.reference import sample_uniform_ref

    assert torch.equal(tokens, sample_uniform_ref(2**40 + 1, 3, R, V).argmax(dim=1))


def _parity(torch, logits, **kw):
    from tts_kernels.reference import sample_ref
    from tts_kernels.triton.sample import sample_triton

    full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, offset=0)
    full.update(kw)
    tensors = {}
    for name, key in (("temperature", "temperatures"), ("top_k", "top_ks"), ("top_p", "top_ps"),
                      ("min_p", "min_ps"), ("seed", "seeds"), ("offset", "offsets")):
        if isinstance(full[name], torch.Tensor):
            tensors[key] = full[name]
            full[name] = 0
    out = sample_triton(logits, full["temperature"], full["top_k"], full["top_p"], full["min_p"], full["seed"],
                        full["offset"], **tensors)
    ref = sample_ref(logits, **dict(dict(seed=7), **kw))
    assert torch.equal(out[0], ref[0]), f"tokens differ at rows {(out[0] != ref[0]).nonzero().flatten().tolist()}"
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)


def _case_v7(torch, st):
    logits = torch.randn(16, 7) * 3
    for kw in FILTERS:
        _parity(torch, logits, offset=1, **kw)


def _case_v1000(torch, st):
    logits = torch.randn(4, 1000) * 3
    for kw in FILTERS:
        _parity(torch, logits, offset=2, **kw)


def _case_v50257_top_p(torch, st):
    _parity(torch, torch.randn(1, 50257) * 3, top_p=0.9, temperature=0.8, seed=11)


def _case_v50257_top_k_min_p(torch, st):
    _parity(torch, torch.randn(1, 50257) * 3, top_k=20, min_p=0.05, seed=12)


def _case_ties_and_holes(torch, st):
    logits = torch.randint(-3, 4, (6, 300)).float() / 2  # many exact ties
    logits[0] = float("-inf")
    logits[1] = float("nan")
    logits[2, ::3] = float("nan")
    logits[3, 5] = float("inf")
    logits[4, :] = float("-inf")
    logits[4, 9] = 1.0
    for kw in (dict(top_k=4), dict(top_p=0.5), dict(min_p=0.5, temperature=0.5), dict(temperature=0.0)):
        _parity(torch, logits, **kw)


def _case_per_row_params(torch, st):
    R = 6
    logits = torch.randn(R, 400) * 3
    _parity(torch, logits,
            temperature=torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 0.9]),
            top_k=torch.tensor([0, 5, 1, 100, 400, 7]),
            top_p=torch.tensor([1.0, 0.9, 0.5, 0.1, 0.95, 0.6]),
            min_p=torch.tensor([0.0, 0.1, 0.0, 0.0, 0.05, 0.2]),
            seed=torch.arange(R) + 3, offset=torch.tensor(5))


def _case_strided_fp16_bf16(torch, st):
    full = torch.randn(4, 3, 513) * 3
    _parity(torch, full[:, -1, :], top_p=0.9)  # row stride 3*513
    _parity(torch, (torch.randn(4, 513) * 3).to(torch.float16), top_k=10)
    _parity(torch, (torch.randn(4, 513) * 3).to(torch.bfloat16), top_p=0.7)


def _case_public_api(torch, st):
    import tts_kernels
    from tts_kernels.reference import sample_ref

    logits = torch.randn(3, 200)
    a = tts_kernels.sample(logits, top_p=0.9, seed=4, offset=torch.tensor(2), backend="triton")
    b = sample_ref(logits, top_p=0.9, seed=4, offset=2)
    assert torch.equal(a[0], b[0])


def _case_stream(torch, st):
    from tts_kernels.reference import sample_ref

    logits = torch.randn(5, 333) * 3
    streams = torch.tensor([9, 0, 2**32 - 1, 4, 9])
    a = st.sample_triton(logits, 1.0, 0, 0.9, 0.0, 7, 3, streams=streams)
    b = sample_ref(logits, top_p=0.9, seed=7, offset=3, stream=streams)
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[0][4], st.sample_triton(logits[4:], 1.0, 0, 0.9, 0.0, 7, 3, streams=streams[4:])[0][0])


def _case_distribution(torch, st):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sample_checks import LOGITS, chi2_test, draw_counts, exact_probs

    setting = (1.0, 0, 0.8, 0.0)  # top-p only: the interpreter runs ~10 ms per row and pass
    fn = lambda x, **kw: st.sample_triton(x, kw["temperature"], kw["top_k"], kw["top_p"], kw["min_p"],  # noqa: E731
                                          kw["seed"], kw["offset"])
    counts, _, _ = draw_counts(fn, setting, rows=300, offsets=range(2))
    q = exact_probs(torch.tensor(LOGITS), *setting)
    assert (counts[q == 0] == 0).all()
    assert chi2_test(counts, q)[2] > 1e-4, counts.tolist()


CASES = {name[len("_case_"):]: fn for name, fn in list(globals().items()) if name.startswith("_case_")}


def _child() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch

    from child_process import record, report

    from tts_kernels.triton import sample as st

    results = {"_interpreted": type(st._sample_kernel).__name__ == "InterpretedFunction"}
    for i, (name, fn) in enumerate(CASES.items()):
        torch.manual_seed(2000 + i)
        record(results, name, fn, torch, st)
    report(results)


if __name__ == "__main__":
    _child()
    sys.exit(0)


# ----------------------------------------------------------------------------- the tests

import pytest  # noqa: E402

pytest.importorskip("triton")

from child_process import compile_for_hopper  # noqa: E402

def test_kernel_is_interpreted(child_results):
    assert child_results["_interpreted"], "TRITON_INTERPRET=1 did not take effect"


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(child_results, name):
    r = child_results[name]
    assert r["verdict"] == "ok", r["verdict"]


# (logits dtype, per-row-tensor flags, num_warps): scalar parameters (the usual
# call), every parameter from a tensor, and a mix.
_AOT_VARIANTS = [
    ("fp32", dict(T_PTR=False, K_PTR=False, P_PTR=False, MP_PTR=False, S_PTR=False, O_PTR=True, ST_PTR=False), 4),
    ("bf16", dict(T_PTR=True, K_PTR=True, P_PTR=True, MP_PTR=True, S_PTR=True, O_PTR=True, ST_PTR=True), 4),
    ("fp16", dict(T_PTR=False, K_PTR=True, P_PTR=False, MP_PTR=True, S_PTR=False, O_PTR=False, ST_PTR=True), 4),
]


def test_kernel_compiles_for_hopper():
    """The interpreter does not run Triton's compiler (typing of loop-carried
    values, while loops, tl.philox lowering); compile to sm_90 cubin without a GPU."""
    from tts_kernels.triton import sample as st

    for dt, flags, warps in _AOT_VARIANTS:
        sig = dict(logits_ptr=f"*{dt}", row_stride="i64", V="i32")
        for p, ptr_t, val_t in (("t", "*fp32", "fp32"), ("k", "*i64", "i64"), ("p", "*fp32", "fp32"),
                                ("mp", "*fp32", "fp32"), ("s", "*i64", "i64"), ("o", "*i64", "i64")):
            sig.update({f"{p}_ptr": ptr_t, f"{p}_stride": "i32", f"{p}_val": val_t})
        sig.update(st_ptr="*i64", tokens_ptr="*i64", logprobs_ptr="*fp32")
        consts = dict(flags, TILE=st._TILE, STILE=st._STILE, NPIV=st._NPIV)
        sig.update({k: "constexpr" for k in consts})
        kernel = compile_for_hopper(st._sample_kernel, sig, consts, num_warps=warps, enable_fp_fusion=False)
        assert "cubin" in kernel.asm, dt
        # x / T and e / E must be true divisions (an approximate one changes choices).
        assert "div.rn.f32" in kernel.asm["ptx"], f"{dt}: division is not div.rn"
