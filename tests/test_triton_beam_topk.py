"""Triton beam_topk against the reference, in the Triton interpreter (CPU tensors).

Triton picks interpreted or compiled kernels when ``@triton.jit`` runs, i.e. when
``tts_kernels.triton.beam_topk`` is imported, from ``TRITON_INTERPRET``. Setting
the variable here would come too late if another test imported that module
first, and too broadly for the GPU tests, which need the compiled kernels in the
same session. So every case runs in one child process started with
``TRITON_INTERPRET=1`` (this file, run as a script); each test reads its case's
verdict. The child checks that the kernels really are interpreted.

The interpreter is slow (numpy per Triton op), so the sizes are chosen to cross
every path once: tiny and odd vocabularies, several vocabulary splits, a top list
longer than the one-at-a-time insertion limit (bitonic path), C > 1024 (generic
path), NaN, all -inf rows, temperature, strided rows, exact ties.
"""
from __future__ import annotations

import os
import sys


# name, B, K, V, C, temperature, extra
CASES = [
    ("v7_b1_k1_c1", 1, 1, 7, 1, 1.0, {}),
    ("v7_b2_k3_c2k", 2, 3, 7, 6, 1.0, {}),
    ("v7_b2_k3_c_over_v", 2, 3, 7, 15, 1.0, {}),
    ("v7_b5_k4_c_all", 5, 4, 7, 28, 0.5, {}),  # C = K*V; CP = 32 > insertion limit
    ("v1000_b5_k4_c2k_temp", 5, 4, 1000, 8, 0.7, {}),
    ("v1000_b2_k3_splits", 2, 3, 1000, 6, 1.0, {"splits": 4}),
    ("v1000_b1_k3_c1", 1, 3, 1000, 1, 1.0, {"splits": 2}),
    ("v300_b1_k2_c40_bitonic", 1, 2, 300, 40, 1.0, {}),
    ("v1000_b2_k2_c1500_generic", 2, 2, 1000, 1500, 1.3, {}),
    ("v50257_b2_k4_c2k", 2, 4, 50257, 8, 1.0, {}),
    ("v50257_b1_k1_c2_temp", 1, 1, 50257, 2, 2.0, {}),
    ("nan_and_neginf_rows", 2, 3, 1000, 6, 1.0, {"nan": True, "splits": 2}),
    ("posinf_and_overflow", 2, 2, 1000, 4, 0.5, {"posinf": True, "splits": 2}),
    ("item_all_neginf_c_over_v", 2, 2, 7, 10, 1.0, {"item_neginf": True}),
    ("item_all_neginf_generic", 1, 2, 600, 1100, 1.0, {"item_neginf": True}),
    ("finished_beams_neginf_score", 3, 2, 1000, 6, 1.0, {"dead_beams": True, "splits": 2}),
    ("integer_logits_ties", 2, 3, 500, 12, 1.0, {"ties": True}),
    ("strided_rows", 2, 3, 1000, 6, 1.5, {"strided": True}),
    ("fp16_logits", 2, 2, 1000, 4, 1.0, {"dtype": "float16"}),
    ("public_api_backend_triton", 2, 3, 1000, 6, 1.0, {"api": True}),
]

def _make_case(torch, B, K, V, extra):
    dtype = getattr(torch, extra.get("dtype", "float32"))
    if extra.get("ties"):
        logits = torch.randint(-3, 4, (B * K, V)).float()
        beam_scores = torch.zeros(B, K)
    else:
        logits = torch.randn(B * K, V) * 3
        beam_scores = -torch.rand(B, K) * 5
    if extra.get("nan"):
        logits[0, ::7] = float("nan")
        logits[0, int(logits[0].nan_to_num(-1e9).argmax())] = float("nan")  # the max itself
        logits[1] = float("-inf")
        logits[2] = float("nan")
        logits[3, : V // 2] = float("-inf")
    if extra.get("posinf"):
        logits[0, 3] = float("inf")  # overflow garbage: never chosen
        logits[1, 900] = 3e38  # finite, but +inf after / 0.5
    if extra.get("item_neginf"):
        logits[:K] = float("-inf")  # every beam of item 0
    if extra.get("dead_beams"):
        # Finished beams at -inf: item 0 entirely (its candidates are -inf ties,
        # so by lowest flat index), item 1 half.
        beam_scores[0] = float("-inf")
        beam_scores[1, 0] = float("-inf")
    if extra.get("strided"):
        wide = torch.randn(B * K, V + 13) * 3
        logits = wide[:, 5 : V + 5]
        assert not logits.is_contiguous() and logits.stride(1) == 1
    return logits.to(dtype), beam_scores


def _child() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch

    import tts_kernels
    from tts_kernels.triton import beam_topk as bt

    from beam_checks import check_selection
    from child_process import record, report

    kinds = {type(bt._beam_partial_kernel).__name__, type(bt._beam_merge_kernel).__name__}
    results = {"_interpreted": kinds == {"InterpretedFunction"}, "_kinds": sorted(kinds)}

    def run_case(B, K, V, C, T, extra):
        logits, beam_scores = _make_case(torch, B, K, V, extra)
        if extra.get("api"):
            out = tts_kernels.beam_topk(logits, beam_scores, C, T, backend="triton")
        else:
            out = bt.beam_topk_triton(logits, beam_scores, C, T, num_splits=extra.get("splits"))
        check_selection(out, logits, beam_scores, C, T)

    for i, (name, B, K, V, C, T, extra) in enumerate(CASES):
        torch.manual_seed(1000 + i)
        record(results, name, run_case, B, K, V, C, T, extra)
    report(results)


if __name__ == "__main__":
    _child()
    sys.exit(0)


# ----------------------------------------------------------------------------- the tests

import pytest  # noqa: E402

pytest.importorskip("triton")

from child_process import compile_for_hopper  # noqa: E402

def test_kernels_are_interpreted(child_results):
    assert child_results["_interpreted"], f"TRITON_INTERPRET=1 did not take effect: {child_results['_kinds']}"


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_matches_reference(child_results, name):
    r = child_results[name]
    assert r["verdict"] == "ok", r["verdict"]


# (kernel, logits/pointer dtype, constexprs, num_warps): the variants the wrapper
# launches most, plus the bitonic (CP > 16) and generic paths.
_AOT_VARIANTS = [
    ("_beam_partial_kernel", "fp32", dict(APPLY_T=True, WITH_TOPK=True, CP=8, TILE=1024), 4),
    ("_beam_partial_kernel", "bf16", dict(APPLY_T=False, WITH_TOPK=True, CP=64, TILE=1024), 4),
    ("_beam_partial_kernel", "fp16", dict(APPLY_T=False, WITH_TOPK=False, CP=1, TILE=1024), 4),
    ("_beam_merge_kernel", None, dict(CP=8, SP=16, TILE=128), 4),
    ("_beam_merge_kernel", None, dict(CP=64, SP=8, TILE=512), 4),
    ("_beam_scores_kernel", "bf16", dict(APPLY_T=True, SP=4, BLOCK=1024), 4),
]
_SIGNATURES = {
    "_beam_partial_kernel": dict(
        logits_ptr="*{dt}", row_stride="i64", V="i32", chunk="i32", temperature="fp32", beam_ptr="*fp32",
        part_m_ptr="*fp32", part_d_ptr="*fp32", part_key_ptr="*i64", S="i32"),
    "_beam_merge_kernel": dict(
        part_m_ptr="*fp32", part_d_ptr="*fp32", part_key_ptr="*i64", beam_ptr="*fp32",
        scores_ptr="*fp32", parents_ptr="*i64", tokens_ptr="*i64", K="i32", V="i32", S="i32", C="i32"),
    "_beam_scores_kernel": dict(
        logits_ptr="*{dt}", row_stride="i64", V="i32", temperature="fp32", part_m_ptr="*fp32",
        part_d_ptr="*fp32", beam_ptr="*fp32", out_ptr="*fp32", S="i32"),
}


def test_kernels_compile_for_hopper():
    """The interpreter does not run Triton's compiler (constexpr globals, typing of
    loop-carried values, int64 sorts, lowering); compile to sm_90 cubin without a GPU."""
    from tts_kernels.triton import beam_topk as bt

    for name, dt, consts, warps in _AOT_VARIANTS:
        sig = {k: v.format(dt=dt) for k, v in _SIGNATURES[name].items()}
        sig.update({k: "constexpr" for k in consts})
        kernel = compile_for_hopper(getattr(bt, name), sig, consts, num_warps=warps, enable_fp_fusion=False)
        assert "cubin" in kernel.asm, name
        if consts.get("APPLY_T"):
            # x / T must be a true division (an approximate one changes rankings).
            assert "div.rn.f32" in kernel.asm["ptx"], f"{name}: temperature division is not div.rn"
