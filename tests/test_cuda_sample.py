"""sample on CUDA (the compiled Triton kernel) against the reference and the CPU kernel.

Skipped without a GPU or without Triton. Not run on the machine that wrote it
(no GPU there): the kernel is covered by the interpreter and sm_90 compile tests
in tests/test_triton_sample.py; these tests are for benchmarks/gpu_check.sh.
"""
import pytest
import torch

from tts_kernels import sample
from tts_kernels.reference import sample_ref, sample_uniform_ref

from sample_checks import LOGITS, SETTINGS, chi2_test, draw_counts, exact_probs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
triton = pytest.importorskip("triton")

FILTERS = [dict(), dict(top_k=40, temperature=0.7), dict(top_p=0.9), dict(min_p=0.05),
           dict(top_k=50, top_p=0.8, min_p=0.02, temperature=0.8), dict(temperature=0.0)]


def test_uniforms_bit_identical():
    from tts_kernels.triton.sample import sample_uniforms_triton

    for seed, offset in [(0, 0), (2**62 + 5, 2**40 + 3), (-1, -(2**63))]:
        u = sample_uniforms_triton(seed, offset, 5, 1000, "cuda").cpu()
        assert torch.equal(u, sample_uniform_ref(seed, offset, 5, 1000))


@pytest.mark.parametrize("V", [7, 50257, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_and_cpu(V, dtype):
    # GPU exp/log are not the CPU's to the last bit: tokens may differ only at
    # near-ties of e/E (~1e-6 per row), so allow a rare mismatch.
    logits = (torch.randn(64, V) * 3).to(dtype)
    for kw in FILTERS:
        out = sample(logits.cuda(), seed=5, offset=V, **kw)
        ref = sample_ref(logits, seed=5, offset=V, **kw)
        cpu = sample(logits, seed=5, offset=V, **kw)
        assert int((out[0].cpu() != ref[0]).sum()) <= 1, kw
        assert int((out[0].cpu() != cpu[0]).sum()) <= 1, kw
        same = out[0].cpu() == ref[0]
        torch.testing.assert_close(out[1].cpu()[same], ref[1][same], rtol=1e-4, atol=1e-4)


def test_device_parameters_and_no_sync():
    R, V = 32, 32000
    logits = torch.randn(R, V, device="cuda") * 3
    offset = torch.zeros((), dtype=torch.int64, device="cuda")
    top_p = torch.full((R,), 0.9, device="cuda")
    sample(logits, top_p=top_p, seed=1, offset=offset)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            sample(logits, top_p=top_p, seed=1, offset=offset)
            offset += 1
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("setting", SETTINGS)
def test_distribution(setting):
    fn = lambda x, **kw: tuple(t.cpu() for t in sample(x.cuda(), **kw))  # noqa: E731
    counts, _, _ = draw_counts(fn, setting)
    q = exact_probs(torch.tensor(LOGITS), *setting)
    assert (counts[q == 0] == 0).all()
    assert chi2_test(counts, q)[2] > 1e-4
