"""paged_attention: the reference against dense SDPA, the CPU kernel against the
reference (odd sizes, GQA ratios, block sizes, windows, dtypes, shared prefixes),
opcheck, torch.compile and bad input."""

import pytest
import torch

import tts_kernels
from tts_kernels import paged_attention
from tts_kernels.reference import paged_attention_ref

from child_process import run_py
from paged_checks import TOL, dense_attention, make_case, make_shared_case, poison_past_length

DTYPES = list(TOL)

# n, H, Hkv, D, P, lens: GQA ratios 1, 4, 7, 8; head_dim 64, 40, 128, 24;
# block sizes 16, 5, 1; lengths 0, 1, block boundaries (16, 32, 1024), long.
SHAPES = [
    (1, 4, 4, 64, 16, [1]),
    (3, 8, 2, 64, 16, [0, 16, 37]),
    (7, 28, 4, 40, 5, [1, 5, 10, 64, 99, 0, 251]),
    (3, 7, 1, 40, 1, [33, 1, 2]),
    (7, 32, 8, 64, 16, [1024, 16, 17, 300, 0, 47, 512]),
    (2, 8, 1, 128, 16, [2048, 1500]),
    (3, 2, 2, 24, 5, [7, 25, 3]),
]
WINDOWS = [None, 1, 7, 100000]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"n{s[0]}_h{s[1]}_kv{s[2]}_d{s[3]}_p{s[4]}")
def test_matches_reference(shape, dtype, window):
    n, H, Hkv, D, P, lens = shape
    args = make_case(n, H, Hkv, D, P, lens, dtype, gen=torch.Generator().manual_seed(hash((shape[0], D, P)) % 1000))
    out = paged_attention(*args, sliding_window=window)
    ref = paged_attention_ref(*args, sliding_window=window)
    assert out.dtype == dtype and out.shape == (n, H, D)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    assert torch.equal(out[args[4] == 0], torch.zeros_like(out[args[4] == 0]))


@pytest.mark.parametrize("window", [None, 1, 6, 40])
@pytest.mark.parametrize("shape", SHAPES[1:5], ids=lambda s: f"n{s[0]}_h{s[1]}_kv{s[2]}_d{s[3]}_p{s[4]}")
def test_reference_matches_dense_sdpa(shape, window):
    # The reference itself, against a different formulation: dense gathered K/V,
    # SDPA with GQA and transformers' sliding-window mask, in float64.
    n, H, Hkv, D, P, lens = shape
    args = make_case(n, H, Hkv, D, P, lens)
    ref = paged_attention_ref(*args, sliding_window=window, scale=0.3)
    dense = dense_attention(*args, scale=0.3, sliding_window=window)
    torch.testing.assert_close(ref.double(), dense, rtol=1e-5, atol=1e-6)


def test_scale_and_strided_inputs():
    q, kc, vc, bt, L = make_case(3, 8, 2, 64, 16, [40, 1, 77])
    wide_q = torch.randn(3, 8, 80)[:, :, 8:72]  # strided query
    wide_q.copy_(q)
    wide_bt = torch.full((3, bt.shape[1] + 5), 7, dtype=torch.int32)
    wide_bt[:, 2:2 + bt.shape[1]] = bt
    bt_view = wide_bt[:, 2:2 + bt.shape[1]]  # row stride != max_blocks
    out = paged_attention(wide_q, kc, vc, bt_view, L, scale=0.05)
    torch.testing.assert_close(out, paged_attention_ref(q, kc, vc, bt, L, scale=0.05), **TOL[torch.float32])


def test_garbage_past_length_is_never_read():
    base = make_case(4, 8, 2, 40, 5, [3, 10, 11, 0], garbage=-1)
    outs = []
    for junk in (-1, 2**31 - 1, 0):
        bt = base[3].clone()
        for i, L in enumerate(base[4].tolist()):
            bt[i, (L + 4) // 5:] = junk
        outs.append(paged_attention(*base[:3], bt, base[4]))
    assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.parametrize("fn", [paged_attention, paged_attention_ref], ids=["kernel", "reference"])
@pytest.mark.parametrize("window", [None, 3])
def test_nan_in_unheld_pool_slots_is_never_read(fn, window):
    # PagedKVCache leaves its pools uninitialised: nothing past a row's length may reach the output.
    q, kc, vc, bt, L = make_case(5, 8, 2, 40, 5, [3, 10, 11, 0, 7])
    k, v = poison_past_length(kc, vc, bt, L)
    clean = fn(q, kc, vc, bt, L, sliding_window=window)
    got = fn(q, k, v, bt, L, sliding_window=window)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, clean, rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = make_case(5, 16, 4, 64, 16, [300, 1, 0, 64, 129], torch.bfloat16)
        torch.testing.assert_close(paged_attention(*args), paged_attention_ref(*args), **TOL[torch.bfloat16])
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------- shared prefix

# (rows, prompt_len, own token counts): groups of forks of one prompt, a lone
# sequence, a prompt shorter than a block (nothing shared), own lengths 0.
SHARED_LAYOUTS = [
    [(4, 40, [1, 5, 17, 0])],
    [(3, 33, [2, 2, 9]), (1, 20, [4]), (5, 64, [1, 1, 30, 0, 16])],
    [(2, 3, [1, 7]), (6, 100, [10, 20, 1, 2, 3, 50])],
]


@pytest.mark.parametrize("window", [None, 4, 30, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", range(len(SHARED_LAYOUTS)))
@pytest.mark.parametrize("P,H,Hkv,D", [(16, 8, 2, 64), (5, 7, 1, 40), (1, 4, 4, 24)])
def test_shared_prefix_matches_plain(layout, P, H, Hkv, D, dtype, window):
    q, kc, vc, bt, L, pre = make_shared_case(SHARED_LAYOUTS[layout], H, Hkv, D, P, dtype)
    ref = paged_attention_ref(q, kc, vc, bt, L, sliding_window=window)
    plain = paged_attention(q, kc, vc, bt, L, sliding_window=window)
    shared = paged_attention(q, kc, vc, bt, L, sliding_window=window, prefix_lens=pre)
    torch.testing.assert_close(shared, ref, **TOL[dtype])
    torch.testing.assert_close(shared, plain, **TOL[dtype])


def test_prefix_lens_any_values_give_the_plain_result():
    # Values that are not block multiples, longer than the sequence, zero, or
    # equal lengths over different blocks (no group): only sharing changes.
    q, kc, vc, bt, L, pre = make_shared_case([(5, 48, [3, 0, 9, 16, 1]), (3, 16, [5, 6, 7])], 8, 2, 64, 16)
    plain = paged_attention(q, kc, vc, bt, L)
    for p in (pre, pre - 5, pre + 1000, torch.zeros_like(pre), torch.full_like(pre, 16), L.clone()):
        for w in (None, 10):
            got = paged_attention(q, kc, vc, bt, L, prefix_lens=p, sliding_window=w)
            want = plain if w is None else paged_attention(q, kc, vc, bt, L, sliding_window=w)
            torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_shared_prefix_fp32_agrees_closely_with_plain():
    # The best-of-N shape of the benchmark, scaled down: one prompt, many forks.
    q, kc, vc, bt, L, pre = make_shared_case([(16, 256, [8] * 16)], 16, 4, 64, 16)
    torch.testing.assert_close(paged_attention(q, kc, vc, bt, L, prefix_lens=pre),
                               paged_attention(q, kc, vc, bt, L), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- op, compile, fallback


def test_opcheck():
    q, kc, vc, bt, L = make_case(3, 8, 2, 40, 5, [0, 12, 33])
    op = torch.ops.tts.paged_attention.default
    torch.library.opcheck(op, (q, kc, vc, bt, L, 0.2, None, None))
    torch.library.opcheck(op, (q.bfloat16(), kc.bfloat16(), vc.bfloat16(), bt, L, 0.2, 7, None))
    q, kc, vc, bt, L, pre = make_shared_case([(3, 20, [1, 2, 3])], 8, 2, 40, 5)
    torch.library.opcheck(op, (q, kc, vc, bt, L, 0.2, None, pre))


def test_compile_fullgraph():
    q, kc, vc, bt, L, pre = make_shared_case([(3, 20, [1, 2, 3]), (1, 5, [4])], 8, 2, 64, 16)

    @torch.compile(fullgraph=True)
    def step(q, kc, vc, bt, L, pre):
        return paged_attention(q * 2, kc, vc, bt, L, sliding_window=12, prefix_lens=pre).sum(-1)

    got = step(q, kc, vc, bt, L, pre)
    want = paged_attention_ref(q * 2, kc, vc, bt, L, sliding_window=12).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_extension_loaded():
    assert tts_kernels.HAS_C, tts_kernels._ext.LOAD_ERROR


def test_fallback_without_extension():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        "import tts_kernels\n"
        "from tts_kernels.reference import paged_attention_ref\n"
        "assert not tts_kernels.HAS_C\n"
        "q = torch.randn(2, 4, 8); kc = torch.randn(5, 2, 4, 8); vc = torch.randn(5, 2, 4, 8)\n"
        "bt = torch.tensor([[3, 1, -1], [0, 2, 4]], dtype=torch.int32); L = torch.tensor([6, 9], dtype=torch.int32)\n"
        "a = tts_kernels.paged_attention(q, kc, vc, bt, L, sliding_window=5)\n"
        "b = torch.ops.tts.paged_attention(q, kc, vc, bt, L, 8 ** -0.5, 5, None)\n"
        "assert torch.equal(a, paged_attention_ref(q, kc, vc, bt, L, sliding_window=5)) and torch.equal(a, b)\n"
        "print('ok')\n"
    )
    res = run_py(code, TTS_KERNELS_NO_EXT="1")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


# ---------------------------------------------------------------- bad input


def _good():
    q, kc, vc, bt, L = make_case(2, 8, 2, 16, 4, [5, 9])
    return dict(query=q, k_cache=kc, v_cache=vc, block_tables=bt, seq_lens=L)


@pytest.mark.parametrize(
    "change,exc,word",
    [
        (lambda a: a.update(query=a["query"][0]), ValueError, "query"),
        (lambda a: a.update(query=a["query"].long()), TypeError, "query"),
        (lambda a: a.update(query=a["query"].tolist()), TypeError, "query"),
        (lambda a: a.update(query=a["query"].double()), TypeError, "query"),
        (lambda a: a.update(k_cache=a["k_cache"][0]), ValueError, "k_cache"),
        (lambda a: a.update(v_cache=a["v_cache"].half()), TypeError, "v_cache"),
        (lambda a: a.update(k_cache=a["k_cache"].half(), v_cache=a["v_cache"].half()), TypeError, "dtype of query"),
        (lambda a: a.update(v_cache=a["v_cache"][:, :, :3]), ValueError, "v_cache"),
        (lambda a: a.update(k_cache=a["k_cache"].transpose(1, 2).contiguous().transpose(1, 2),
                            v_cache=a["v_cache"].transpose(1, 2).contiguous().transpose(1, 2)),
         ValueError, "contiguous"),
        (lambda a: a.update(query=torch.randn(2, 7, 16)), ValueError, "multiple of"),
        (lambda a: a.update(query=torch.randn(2, 8, 32)), ValueError, "head_dim"),
        (lambda a: a.update(k_cache=torch.randn(4, 2, 0, 16), v_cache=torch.randn(4, 2, 0, 16)),
         ValueError, "block_size"),
        (lambda a: a.update(block_tables=a["block_tables"].long()), TypeError, "block_tables"),
        (lambda a: a.update(block_tables=a["block_tables"][0]), ValueError, "block_tables"),
        (lambda a: a.update(block_tables=a["block_tables"][:1]), ValueError, "block_tables"),
        (lambda a: a.update(seq_lens=a["seq_lens"].long()), TypeError, "seq_lens"),
        (lambda a: a.update(seq_lens=a["seq_lens"][:1]), ValueError, "seq_lens"),
        (lambda a: a.update(seq_lens=torch.tensor([5, 10000], dtype=torch.int32)), ValueError, "seq_lens"),
        (lambda a: a.update(seq_lens=torch.tensor([-1, 5], dtype=torch.int32)), ValueError, "seq_lens"),
        (lambda a: a["block_tables"].__setitem__((1, 2), 99), ValueError, r"block_tables\[1, 2\]"),
        (lambda a: a["block_tables"].__setitem__((0, 0), -1), ValueError, r"block_tables\[0, 0\]"),
        (lambda a: a.update(scale="0.1"), TypeError, "scale"),
        (lambda a: a.update(scale=float("nan")), ValueError, "scale"),
        (lambda a: a.update(sliding_window=0), ValueError, "sliding_window"),
        (lambda a: a.update(sliding_window=2.0), TypeError, "sliding_window"),
        (lambda a: a.update(prefix_lens=torch.tensor([4, 4])), TypeError, "prefix_lens"),
        (lambda a: a.update(prefix_lens=torch.tensor([4], dtype=torch.int32)), ValueError, "prefix_lens"),
        (lambda a: a.update(prefix_lens=torch.tensor([4, -4], dtype=torch.int32)), ValueError, "prefix_lens"),
        (lambda a: a.update(seq_lens=a["seq_lens"].to("meta")), ValueError, "device"),
        (lambda a: a.update(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_input(change, exc, word):
    args = _good()
    change(args)
    with pytest.raises(exc, match=word):
        paged_attention(**args)


def test_bad_block_id_also_caught_by_the_raw_op():
    a = _good()
    a["block_tables"][0, 1] = 1000
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.tts.paged_attention(*a.values(), 0.25, None, None)
