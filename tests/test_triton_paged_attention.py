"""Triton paged_attention against the reference, in the Triton interpreter (CPU tensors, fp32).

As in test_triton_beam_topk.py, Triton chooses interpreted or compiled kernels
when ``tts_kernels.triton.paged_attention`` is imported, so every case runs in
one child process started with ``TRITON_INTERPRET=1`` (this file, run as a
script) and each test reads its case's verdict. The interpreter has no bf16 or
fp16 dot on CPU here, so it checks fp32 (the IEEE-dot path); the 16-bit
variants are compiled for sm_90 below without a GPU.
"""
from __future__ import annotations

import os
import sys


# name, (n, H, Hkv, D, P, lens), window, extra
CASES = [
    ("n1_gqa1_p16_len1", (1, 4, 4, 64, 16, [1]), None, {}),
    ("n3_gqa4_p16_bounds", (3, 8, 2, 64, 16, [0, 16, 37]), None, {}),
    ("n7_gqa7_d40_p5", (7, 28, 4, 40, 5, [1, 5, 10, 64, 99, 0, 251]), None, {}),
    ("n3_gqa7_d40_p1_window", (3, 7, 1, 40, 1, [33, 1, 2]), 7, {}),
    ("n7_gqa4_long_window", (7, 32, 8, 64, 16, [1024, 16, 17, 300, 0, 47, 512]), 100, {}),
    ("window_larger_than_len", (3, 8, 2, 64, 16, [5, 40, 0]), 1000, {}),
    ("window_1", (2, 4, 1, 24, 5, [9, 1]), 1, {}),
    ("d128_gqa8_2048", (2, 8, 1, 128, 16, [2048, 1500]), None, {}),
    ("scale_and_strided_table", (3, 8, 2, 64, 16, [40, 1, 77]), None, {"strided": True, "scale": 0.05}),
    ("public_api", (3, 8, 2, 40, 5, [12, 0, 31]), 9, {"api": True}),
    ("nan_in_unheld_slots", (5, 8, 2, 40, 5, [3, 10, 11, 0, 7]), 3, {"poison": True}),
]
# name, groups (rows, prompt, own lens), (H, Hkv, D, P), window, extra
SHARED_CASES = [
    ("shared_one_group", [(4, 40, [1, 5, 17, 0])], (8, 2, 64, 16), None, {}),
    ("shared_mixed_groups", [(3, 33, [2, 2, 9]), (1, 20, [4]), (5, 64, [1, 1, 30, 0, 16])], (7, 1, 40, 5), None, {}),
    ("shared_window", [(2, 3, [1, 7]), (6, 100, [10, 20, 1, 2, 3, 50])], (8, 2, 64, 16), 30, {}),
    ("shared_chunks_of_a_big_group", [(40, 48, list(range(40)))], (4, 1, 24, 16), None, {}),
    ("shared_p1_gqa1", [(5, 9, [0, 1, 2, 3, 4])], (4, 4, 24, 1), 6, {}),
    ("shared_odd_prefix_values", [(5, 48, [3, 0, 9, 16, 1]), (3, 16, [5, 6, 7])], (8, 2, 64, 16), None,
     {"prefix_shift": -5}),
    ("shared_prefix_over_len", [(3, 32, [0, 4, 8])], (8, 2, 64, 16), 10, {"prefix_shift": 1000}),
]


def _child() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch

    import tts_kernels
    from tts_kernels.reference import paged_attention_ref
    from tts_kernels.triton import paged_attention as pa

    from child_process import record, report
    from paged_checks import TOL, make_case, make_shared_case, poison_past_length

    kinds = {type(pa._paged_attn_kernel).__name__, type(pa._prefix_attn_kernel).__name__}
    results = {"_interpreted": kinds == {"InterpretedFunction"}, "_kinds": sorted(kinds)}
    tol = TOL[torch.float32]

    def plain_case(k, shape, window, extra):
        n, H, Hkv, D, P, lens = shape
        q, kc, vc, bt, L = make_case(n, H, Hkv, D, P, lens, gen=torch.Generator().manual_seed(100 + k))
        scale = extra.get("scale", D ** -0.5)
        if extra.get("strided"):
            wide = torch.full((n, bt.shape[1] + 5), 3, dtype=torch.int32)
            wide[:, 2:2 + bt.shape[1]] = bt
            bt_in = wide[:, 2:2 + bt.shape[1]]
        else:
            bt_in = bt
        kin, vin = poison_past_length(kc, vc, bt, L) if extra.get("poison") else (kc, vc)
        if extra.get("api"):
            out = tts_kernels.paged_attention(q, kin, vin, bt_in, L, sliding_window=window, backend="triton")
        else:
            out = pa.paged_attention_triton(q, kin, vin, bt_in, L, scale, window)
        torch.testing.assert_close(out, paged_attention_ref(q, kc, vc, bt, L, scale, window), **tol)

    def shared_case(k, groups, H, Hkv, D, P, window, extra):
        q, kc, vc, bt, L, pre = make_shared_case(groups, H, Hkv, D, P, gen=torch.Generator().manual_seed(k))
        pre = pre + extra.get("prefix_shift", 0)
        out = tts_kernels.paged_attention(q, kc, vc, bt, L, sliding_window=window, prefix_lens=pre,
                                          backend="triton")
        torch.testing.assert_close(out, paged_attention_ref(q, kc, vc, bt, L, None, window), **tol)

    for k, (name, shape, window, extra) in enumerate(CASES):
        record(results, name, plain_case, k, shape, window, extra)
    for k, (name, groups, (H, Hkv, D, P), window, extra) in enumerate(SHARED_CASES):
        record(results, name, shared_case, k, groups, H, Hkv, D, P, window, extra)
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


@pytest.mark.parametrize("name", [c[0] for c in CASES] + [c[0] for c in SHARED_CASES])
def test_matches_reference(child_results, name):
    r = child_results[name]
    assert r["verdict"] == "ok", r["verdict"]


def test_prefix_plan_groups():
    # The on-device grouping, on plain tensors: runs of equal prefix length and
    # equal prefix block ids; singletons and prefix 0 are not groups.
    import torch

    from tts_kernels.triton.paged_attention import _prefix_plan

    bt = torch.tensor([[1, 2, 9], [1, 2, 8], [1, 2, 7], [1, 3, 6], [4, 5, 0], [4, 5, 1], [4, 5, 2]], dtype=torch.int32)
    L = torch.tensor([40, 40, 35, 40, 20, 33, 33], dtype=torch.int32)
    pre = torch.tensor([32, 32, 32, 32, 32, 32, 32], dtype=torch.int32)
    p, cnt = _prefix_plan(bt, L, pre, 16, rows_per_chunk=2)
    # rows 0-2 share blocks [1, 2]; row 3 differs; row 4 is clamped to 20 (alone); rows 5-6 share [4, 5].
    assert p.tolist() == [32, 32, 32, 0, 0, 32, 32]
    assert cnt.tolist() == [2, 0, 1, 0, 0, 2, 0]


# (kernel, dtype, constexprs): fp32 IEEE and 16-bit tensor-core dots, with and
# without window and prefix state.
_COMMON = dict(D_PAD=128, BLOCK_N=64)
_AOT_VARIANTS = [
    ("_paged_attn_kernel", "fp32", dict(GQ=4, GQ_PAD=16, HAS_WINDOW=False, HAS_PREFIX=False, IEEE=True, **_COMMON)),
    ("_paged_attn_kernel", "bf16", dict(GQ=4, GQ_PAD=16, HAS_WINDOW=True, HAS_PREFIX=True, IEEE=False, **_COMMON)),
    ("_paged_attn_kernel", "fp16", dict(GQ=7, GQ_PAD=16, HAS_WINDOW=False, HAS_PREFIX=False, IEEE=False,
                                        **_COMMON)),
    ("_prefix_attn_kernel", "bf16", dict(GQ=4, GQ_PAD=4, ROWS=16, HAS_WINDOW=True, IEEE=False, **_COMMON)),
    ("_prefix_attn_kernel", "fp32", dict(GQ=1, GQ_PAD=1, ROWS=64, HAS_WINDOW=False, IEEE=True, **_COMMON)),
]
_SIGNATURES = {
    "_paged_attn_kernel": dict(
        q_ptr="*{dt}", k_ptr="*{dt}", v_ptr="*{dt}", bt_ptr="*i32", bt_stride="i32", lens_ptr="*i32",
        pre_ptr="*i32", st_m_ptr="*fp32", st_l_ptr="*fp32", st_acc_ptr="*fp32", out_ptr="*{dt}",
        scale="fp32", window="i32", H="i32", Hkv="i32", P="i32", D="i32"),
    "_prefix_attn_kernel": dict(
        q_ptr="*{dt}", k_ptr="*{dt}", v_ptr="*{dt}", bt_ptr="*i32", bt_stride="i32", lens_ptr="*i32",
        pre_ptr="*i32", cnt_ptr="*i32", st_m_ptr="*fp32", st_l_ptr="*fp32", st_acc_ptr="*fp32",
        scale="fp32", window="i32", H="i32", Hkv="i32", P="i32", D="i32"),
}


def test_kernels_compile_for_hopper():
    """The interpreter does not run Triton's compiler (typing, tl.dot shape rules,
    lowering); compile to sm_90 cubin without a GPU."""
    from tts_kernels.triton import paged_attention as pa

    for name, dt, consts in _AOT_VARIANTS:
        sig = {k: v.format(dt=dt) for k, v in _SIGNATURES[name].items()}
        sig.update({k: "constexpr" for k in consts})
        kernel = compile_for_hopper(getattr(pa, name), sig, consts, num_warps=4, enable_fp_fusion=True)
        assert "cubin" in kernel.asm, name
