"""kv_reorder_: in-place beam reorder over many cache tensors, against the reference."""
import pytest
import torch

from tts_kernels import kv_reorder_
from tts_kernels.reference import kv_reorder_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_caches(n, dtype, layers=3):
    # Different row sizes per tensor, like K and V of layers with other head dims.
    shapes = [(n, 2, 5, 4), (n, 3, 7), (n, 1), (n, 2, 3, 8)][:layers + 1]
    return [torch.randn(s).to(dtype) for s in shapes]


PARENTS = [
    [0, 1, 2, 3, 4, 5],  # identity: nothing moves
    [1, 0, 3, 2, 5, 4],  # swaps: every source is overwritten
    [0, 0, 0, 0, 0, 0],  # one parent taken by all
    [5, 0, 1, 2, 3, 4],  # a cycle
    [2, 2, 2, 3, 3, 0],  # mixed: kept, shared, dropped
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parents", PARENTS)
def test_matches_reference(parents, dtype):
    p = torch.tensor(parents)
    ours = make_caches(len(parents), dtype)
    ref = [c.clone() for c in ours]
    ptrs = [c.data_ptr() for c in ours]
    kv_reorder_(ours, p)
    kv_reorder_ref(ref, p)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    assert ptrs == [c.data_ptr() for c in ours], "must be in place"


def test_random_permutations_and_sizes():
    for n in (1, 2, 7, 33):
        p = torch.randint(0, n, (n,))
        ours = make_caches(n, torch.float32)
        ref = [c.clone() for c in ours]
        kv_reorder_(ours, p)
        kv_reorder_ref(ref, p)
        assert all(torch.equal(a, b) for a, b in zip(ours, ref))


def test_strided_rows_fallback():
    # A non-contiguous row layout (transposed inner dims) takes the generic path.
    base = torch.randn(5, 4, 6)
    c = base.transpose(1, 2)
    ref = c.clone()
    p = torch.tensor([4, 3, 2, 1, 0])
    kv_reorder_([c], p)
    kv_reorder_ref([ref], p)
    assert torch.equal(c, ref)


def test_dynamic_cache_layout():
    # transformers' DynamicCache keys/values: [N, heads, T, head_dim], one tensor per layer and kind.
    n = 8
    caches = [torch.randn(n, 2, 11, 16) for _ in range(2 * 4)]
    ref = [c.clone() for c in caches]
    p = torch.tensor([0, 0, 1, 3, 3, 3, 6, 2])
    kv_reorder_(caches, p)
    for c, r in zip(caches, ref):
        assert torch.equal(c, r[p])


def test_opcheck():
    caches = make_caches(4, torch.float32)
    torch.library.opcheck(torch.ops.tts.kv_reorder_.default, (caches, torch.tensor([1, 1, 3, 0])))


@pytest.mark.parametrize(
    "caches,parents,exc,word",
    [
        (torch.randn(3, 2), torch.tensor([0, 1, 2]), TypeError, "caches"),
        ([torch.randn(3, 2)], torch.tensor([0, 1, 2]).int(), TypeError, "parents"),
        ([torch.randn(3, 2)], torch.tensor([[0, 1, 2]]), ValueError, "parents"),
        ([torch.randn(3, 2), torch.randn(4, 2)], torch.tensor([0, 1, 2]), ValueError, r"caches\[1\]"),
        ([torch.randn(3, 2)], torch.tensor([0, 1, 3]), ValueError, "parents"),
        ([torch.randn(3, 2)], torch.tensor([0, -1, 2]), ValueError, "parents"),
        ([torch.randn(3, 2), "x"], torch.tensor([0, 1, 2]), TypeError, r"caches\[1\]"),
        ([torch.randn(3, 2, device="meta")], torch.tensor([0, 1, 2]), ValueError, "device"),
    ],
)
def test_bad_input_changes_nothing(caches, parents, exc, word):
    before = [c.clone() if isinstance(c, torch.Tensor) and c.device.type == "cpu" else None
              for c in (caches if isinstance(caches, list) else [])]
    with pytest.raises(exc, match=word):
        kv_reorder_(caches, parents)
    for c, b in zip(caches if isinstance(caches, list) else [], before):
        if b is not None:
            assert torch.equal(c, b), "an error must leave every cache untouched"


def test_compile_fullgraph():
    caches = make_caches(5, torch.float32)
    ref = [c.clone() for c in caches]
    p = torch.tensor([4, 4, 0, 1, 2])

    @torch.compile(fullgraph=True)
    def step(cs, parents):
        kv_reorder_(cs, parents, backend="cpp")
        return cs[0].sum()

    step(caches, p)
    kv_reorder_ref(ref, p)
    assert all(torch.equal(a, b) for a, b in zip(caches, ref))
