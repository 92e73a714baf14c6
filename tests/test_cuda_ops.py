"""``torch.ops.tts.*`` on CUDA tensors in any build, as model code calls them.

Every op reaches a CUDA kernel (C++, Triton, or the reference where this build
has neither; tests/test_dispatch.py checks which on CPU), called directly,
through the public function's ``"auto"``, and under ``torch.compile(fullgraph=True)``.

Skipped without a GPU. Not run on the machine that wrote it (no GPU there).
"""
import pytest
import torch

from tts_kernels import _ext, kv_reorder_, paged_attention, sample
from tts_kernels.reference import kv_reorder_ref, paged_attention_ref, sample_op_ref

from beam_checks import check_selection
from paged_checks import TOL, make_shared_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"
NONE6 = (None,) * 6


def _sample_args(logits):
    return (logits, 0.8, 40, 0.9, 0.0, 5, 3, *NONE6)


def test_sample_op():
    logits = torch.randn(64, 32000) * 3
    out = torch.ops.tts.sample(*_sample_args(logits.to(DEV)))
    ref = sample_op_ref(*_sample_args(logits))
    # GPU exp/log are not the CPU's to the last bit: a token may differ at a near-tie (see test_cuda_sample.py).
    assert int((out[0].cpu() != ref[0]).sum()) <= 1
    assert torch.equal(out[0], sample(logits.to(DEV), temperature=0.8, top_k=40, top_p=0.9, seed=5, offset=3)[0])


def test_beam_topk_op():
    logits, bs = torch.randn(8, 50257, device=DEV) * 3, -torch.rand(2, 4, device=DEV) * 5
    check_selection(torch.ops.tts.beam_topk(logits, bs, 8, 1.0), logits, bs, 8)


def test_paged_attention_op():
    args = [t.to(DEV) for t in make_shared_case([(3, 40, [1, 2, 3]), (1, 5, [4])], 8, 2, 64, 16)]
    q, kc, vc, bt, L, pre = args
    out = torch.ops.tts.paged_attention(q, kc, vc, bt, L, 0.125, None, pre)
    torch.testing.assert_close(out, paged_attention_ref(q, kc, vc, bt, L, 0.125), **TOL[torch.float32])
    torch.testing.assert_close(paged_attention(q, kc, vc, bt, L, scale=0.125, prefix_lens=pre), out)


def test_kv_reorder_op_and_auto_in_any_build():
    # Without the extension's CUDA kernels this used to fail with "no kernel for CUDA".
    parents = torch.tensor([2, 2, 0, 1], device=DEV)
    for call in (lambda c: torch.ops.tts.kv_reorder_(c, parents), lambda c: kv_reorder_(c, parents)):
        caches = [torch.randn(4, 3, 5, device=DEV), torch.randn(4, 7, device=DEV).half()]
        want = [c.clone() for c in caches]
        kv_reorder_ref(want, parents)
        call(caches)
        assert all(torch.equal(a, b) for a, b in zip(caches, want))


def test_compile_fullgraph_calls_the_ops():
    # Inductor generates Triton for the surrounding ops; without Triton, trace only.
    backend = "inductor" if _ext.HAS_TRITON else "aot_eager"
    logits, bs = torch.randn(8, 1000, device=DEV) * 3, -torch.rand(2, 4, device=DEV)
    q, kc, vc, bt, L, pre = [t.to(DEV) for t in make_shared_case([(2, 20, [1, 2])], 8, 2, 64, 16)]
    caches = [torch.randn(4, 6, device=DEV)]
    parents = torch.tensor([3, 3, 1, 0], device=DEV)

    def step(logits, bs, q, caches, parents):
        tokens, logprobs = torch.ops.tts.sample(logits * 2, 1.0, 0, 0.9, 0.0, 7, 0, *NONE6)
        scores, par, tok = torch.ops.tts.beam_topk(logits, bs, 8, 1.0)
        out = torch.ops.tts.paged_attention(q, kc, vc, bt, L, 0.125, None, pre)
        torch.ops.tts.kv_reorder_(caches, parents)
        return tokens, logprobs, scores, tok, out.sum(-1)

    eager_caches = [c.clone() for c in caches]
    want = step(logits, bs, q, eager_caches, parents)
    got = torch.compile(step, fullgraph=True, backend=backend)(logits, bs, q, caches, parents)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.equal(caches[0], eager_caches[0])
