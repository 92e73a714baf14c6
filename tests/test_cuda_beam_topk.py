"""beam_topk and kv_reorder_ on CUDA: the C++ and Triton backends against the reference.

Skipped without a GPU. Each backend is skipped on its own when it is missing
(C++: the extension built without CUDA; Triton: not installed).
"""

import pytest
import torch

from tts_kernels import _ext, beam_topk, kv_reorder_
from tts_kernels.reference import beam_topk_ref, kv_reorder_ref

from beam_checks import TOL, check_selection as check

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

BACKENDS = [
    pytest.param("cpp", marks=pytest.mark.skipif(not _ext.HAS_CUDA_KERNELS, reason="extension built without CUDA")),
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")),
]
NEEDS_CPP = pytest.mark.skipif(not _ext.HAS_CUDA_KERNELS, reason="extension built without CUDA")

DTYPES = list(TOL)
DEV = "cuda"


def make(B, K, V, dtype, scale=3.0):
    logits = (torch.randn(B * K, V, device=DEV) * scale).to(dtype)
    beam_scores = -torch.rand(B, K, device=DEV) * 5
    return logits, beam_scores


SHAPES = [(1, 1, 7), (2, 3, 7), (5, 4, 1000), (2, 4, 50257), (1, 8, 151936), (3, 2, 200003)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,V", SHAPES)
def test_matches_reference(backend, B, K, V, dtype):
    logits, bs = make(B, K, V, dtype)
    for C in sorted({1, 2 * K, min(K * V, 2 * K + 3), min(K * V, 32)}):
        check(beam_topk(logits, bs, C, backend=backend), logits, bs, C)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_temperature(backend, dtype):
    logits, bs = make(3, 4, 50257, dtype)
    for T in (0.7, 1.3):
        check(beam_topk(logits, bs, 8, T, backend=backend), logits, bs, 8, T)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B,K,V,C", [(2, 3, 7, 21), (2, 3, 7, 15), (2, 4, 1000, 40), (2, 2, 1000, 1500), (1, 4, 5003, 4096)]
)
def test_large_num_candidates(backend, B, K, V, C):
    """C above the fused paths' list length (C++: 32, Triton: 1024), up to K*V."""
    logits, bs = make(B, K, V, torch.float32)
    check(beam_topk(logits, bs, C, backend=backend), logits, bs, C)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_items_generic_path(backend):
    """B above the 65535 grid-y limit on the C > 32 path."""
    B, K, V, C = 70000, 1, 100, 33
    logits, bs = make(B, K, V, torch.float32)
    out = beam_topk(logits, bs, C, backend=backend)
    ref = beam_topk_ref(logits, bs, C)
    torch.testing.assert_close(out[0], ref[0], **TOL[torch.float32])
    check(tuple(t[:64] for t in out), logits[:64], bs[:64], C)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [6, 40])
def test_nan_and_neginf_rows(backend, C):
    B, K, V = 2, 3, 50257
    logits, bs = make(B, K, V, torch.float32)
    logits[0, ::7] = float("nan")
    logits[0, int(logits[0].nan_to_num(-1e9).argmax())] = float("nan")
    logits[1] = float("-inf")
    logits[2] = float("nan")
    logits[3, : V // 2] = float("-inf")
    check(beam_topk(logits, bs, C, backend=backend), logits, bs, C)


@pytest.mark.parametrize("backend", BACKENDS)
def test_item_all_neginf(backend):
    """Every beam of an item dead: its candidates are -inf, in flat-index order."""
    logits, bs = make(2, 2, 1000, torch.float32)
    logits[:2] = float("-inf")
    for C in (4, 40, 1500):
        out = beam_topk(logits, bs, C, backend=backend)
        check(out, logits, bs, C)
        assert torch.isinf(out[0][0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [6, 40, 1500])
def test_finished_beams_at_neginf(backend, C):
    """Beam score -inf: every token of the row ties at -inf, so the lowest flat
    indices win the tie, not the highest logits."""
    logits, bs = make(3, 2, 1000, torch.float32)
    bs[0] = float("-inf")  # a whole item finished
    bs[1, 0] = float("-inf")
    check(beam_topk(logits, bs, C, backend=backend), logits, bs, C)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows(backend, dtype):
    """Rows of a wider tensor, starting off a 16-byte boundary (vector-load head)."""
    B, K, V = 2, 3, 50257
    wide = (torch.randn(B * K, V + 9, device=DEV) * 3).to(dtype)
    logits = wide[:, 3 : V + 3]
    bs = -torch.rand(B, K, device=DEV) * 5
    check(beam_topk(logits, bs, 6, backend=backend), logits, bs, 6)
    cols = (torch.randn(V, B * K, device=DEV) * 3).to(dtype).t()  # unit stride along rows: copied
    check(beam_topk(cols, bs, 6, backend=backend), cols, bs, 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_logits_ties(backend):
    logits = torch.randint(-3, 4, (2 * 3, 5000), device=DEV).float()
    bs = torch.zeros(2, 3, device=DEV)
    for C in (12, 40):
        check(beam_topk(logits, bs, C, backend=backend), logits, bs, C)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture(backend):
    """No host sync in the op: it can be captured and replayed with new logits."""
    logits, bs = make(2, 4, 50257, torch.float32)
    beam_topk(logits, bs, 8, backend=backend)  # warm up (Triton compiles here, not in the capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = beam_topk(logits, bs, 8, backend=backend)
    fresh, _ = make(2, 4, 50257, torch.float32)
    logits.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    check(out, logits, bs, 8)


def test_auto_backend_picks_and_caches(monkeypatch):
    from tts_kernels.ops import _autotune, _dispatch

    monkeypatch.delenv("TTS_KERNELS_BEAM_BACKEND", raising=False)
    monkeypatch.delenv("TTS_KERNELS_BACKEND", raising=False)
    _dispatch.forget()  # decide again without the overrides
    logits, bs = make(2, 4, 50257, torch.float16)
    check(beam_topk(logits, bs, 8), logits, bs, 8)
    if _ext.HAS_CUDA_KERNELS and HAS_TRITON:  # timed only when there are two to choose from
        key = _autotune._shape_class(logits, 8)
        assert _autotune._CHOICES.get(key) in ("cpp", "triton")
    _dispatch.forget()


# ----------------------------------------------------------------------------- kv_reorder_


def make_caches(n):
    g = torch.Generator(device=DEV).manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=DEV, generator=g).to(dtype)

    return [
        rnd(n, 4, 33, 16, dtype=torch.float16),  # HF layout [beams, heads, seq, dim]
        rnd(n, 7),  # 28-byte rows: 4-byte copies
        rnd(n, 3, 5, dtype=torch.bfloat16),  # 30-byte rows: 2-byte copies
        torch.randint(-100, 100, (n, 13), device=DEV, dtype=torch.int8),  # odd bytes
        rnd(2 * n, 4, 8)[::2],  # rows further apart than their size
        rnd(n, 6, 5).transpose(1, 2),  # rows not one block: generic path
        rnd(n, 0, 3),  # empty
    ]


def parents_patterns(n):
    ar = torch.arange(n)
    return {
        "identity": ar,
        "all_from_0": torch.zeros(n, dtype=torch.long),
        "reverse": ar.flip(0),
        "cycle": (ar + 1) % n,
        "beam_like": ar // 2 * 2,
        "random": torch.randint(0, n, (n,), generator=torch.Generator().manual_seed(n)),
    }


def assert_reorder_matches(caches, parents):
    expected = [c.clone() for c in caches]
    kv_reorder_ref(expected, parents)
    kv_reorder_(caches, parents, backend="cpp")
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)


@NEEDS_CPP
@pytest.mark.parametrize("n", [1, 5, 8])
@pytest.mark.parametrize("pattern", ["identity", "all_from_0", "reverse", "cycle", "beam_like", "random"])
def test_kv_reorder_matches_reference(n, pattern):
    assert_reorder_matches(make_caches(n), parents_patterns(n)[pattern].to(DEV))


@NEEDS_CPP
def test_kv_reorder_many_tensors_and_passes():
    """More tensors than one launch takes, and a cache larger than the staging
    buffer (several passes over byte ranges of the rows)."""
    n = 8
    caches = [torch.randn(n, 3, 17, device=DEV) for _ in range(70)]
    caches.append(torch.randn(n, 8 << 20, device=DEV)[:, : 6 << 20])  # 24 MiB rows, 32 MiB apart
    caches.append(torch.randn(n, 5 << 20, device=DEV))  # 20 MiB rows
    # 350 MiB of rows in all: the staging buffer (a quarter) takes several passes.
    assert_reorder_matches(caches, torch.tensor([1, 2, 3, 0, 0, 5, 5, 6], device=DEV))


@NEEDS_CPP
def test_kv_reorder_op_directly_and_empty_list():
    parents = torch.tensor([2, 2, 0], device=DEV)
    cache = torch.arange(12.0, device=DEV).reshape(3, 4)
    torch.ops.tts.kv_reorder_([cache], parents)
    assert torch.equal(cache, torch.tensor([[8.0, 9, 10, 11], [8, 9, 10, 11], [0, 1, 2, 3]], device=DEV))
    torch.ops.tts.kv_reorder_([], parents)  # no-op
