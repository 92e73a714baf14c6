"""sample: the CPU kernel against the reference, the distribution, determinism, bad input."""
import math

import pytest
import torch

from tts_kernels import sample
from tts_kernels.reference import philox4x32_ref, sample_ref, sample_uniform_ref

from child_process import run_py
from sample_checks import LOGITS, SETTINGS, chi2_test, draw_counts, exact_probs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# logprob = (x - m) - log Z: x - m is exact, log Z differs by the order of the sum
# over up to 1.5e5 kept terms and by exp's last bits (the CPU kernel's polynomial
# exp is within ~2e-7 relative): a few 1e-7 absolute in practice.
LP_TOL = dict(rtol=1e-5, atol=1e-5)
FILTERS = [
    dict(),
    dict(temperature=0.7),
    dict(top_k=1),
    dict(top_k=40),
    dict(top_k=300),  # above the small-k insertion limit: nth_element path
    dict(top_p=0.9),
    dict(top_p=0.3, temperature=1.5),
    dict(min_p=0.05),
    dict(top_k=50, top_p=0.8, min_p=0.02, temperature=0.8),
    dict(temperature=0.0),
]


def both(logits, **kw):
    kw.setdefault("seed", 7)
    return sample(logits, **kw), sample_ref(logits, **{k: v for k, v in kw.items()})


def assert_same(out, ref):
    assert out[0].dtype == torch.int64 and out[1].dtype == torch.float32
    assert torch.equal(out[0], ref[0]), f"tokens differ at rows {(out[0] != ref[0]).nonzero().flatten().tolist()}"
    torch.testing.assert_close(out[1], ref[1], **LP_TOL)


# ----------------------------------------------------------------------------- randomness


def test_philox_known_answer():
    # Random123's published known-answer vectors for philox4x32_10.
    z = torch.tensor(0)
    assert [int(w) for w in philox4x32_ref((z, z, z, z), (z, z))] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = torch.tensor(0xFFFFFFFF)
    assert [int(w) for w in philox4x32_ref((f, f, f, f), (f, f))] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_uniforms_are_open_and_distinct():
    u = sample_uniform_ref(3, 9, 4, 4096)
    assert u.dtype == torch.float32 and (u > 0).all() and (u < 1).all()
    assert u.unique().numel() > 0.99 * u.numel()
    assert abs(float(u.mean()) - 0.5) < 0.01
    # Each row, each offset, each seed its own stream.
    assert not torch.equal(u[0], u[1])
    assert not torch.equal(u, sample_uniform_ref(3, 10, 4, 4096))
    assert not torch.equal(u, sample_uniform_ref(4, 9, 4, 4096))
    # Per-row seeds/offsets equal the scalar ones row by row.
    per_row = sample_uniform_ref(torch.tensor([3, 3, 5, 3]), torch.tensor([9, 9, 9, 1]), 4, 64)
    assert torch.equal(per_row[:2], u[:2, :64]) and torch.equal(per_row[2], sample_uniform_ref(5, 9, 4, 64)[2])


@pytest.mark.parametrize("seed,offset", [(0, 0), (123456789, 7), (2**62 + 5, 2**40 + 3), (-1, -(2**63))])
def test_kernel_uses_the_reference_uniforms(seed, offset):
    # With equal logits every token has e = 1, so the race picks argmax u: the
    # kernel's Philox words must be the reference's, bit for bit, in every lane
    # (V = 61 crosses whole and partial 32-token blocks).
    R, V = 512, 61
    tokens, _ = sample(torch.zeros(R, V), seed=seed, offset=offset)
    u = sample_uniform_ref(seed, offset, R, V)
    assert torch.equal(tokens, u.argmax(dim=1))


# ----------------------------------------------------------------------------- parity with the reference


@pytest.mark.parametrize("V", [7, 1000, 50257])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(V, dtype):
    R = 16 if V <= 1000 else 4
    logits = (torch.randn(R, V) * 3).to(dtype)
    for kw in FILTERS:
        assert_same(*both(logits, offset=V, **kw))


def test_matches_reference_151936():
    logits = torch.randn(3, 151936) * 4
    for kw in (dict(), dict(top_p=0.9, temperature=0.8), dict(top_k=20, min_p=0.01)):
        assert_same(*both(logits.to(torch.bfloat16), **kw))


def test_many_rows_agree():
    # Tokens agree with the reference except at last-ulp ties of e/E (~1e-6 per
    # row): 4096 rows of fresh inputs, every one equal.
    logits = torch.randn(4096, 300) * 2
    assert_same(*both(logits, top_p=0.95, seed=99, offset=1))
    assert_same(*both(logits, top_k=10, temperature=0.5, seed=99, offset=2))


def test_per_row_parameters():
    R, V = 12, 500
    logits = torch.randn(R, V) * 3
    kw = dict(
        temperature=torch.tensor([1.0, 0.0, 0.5, 2.0] * 3),
        top_k=torch.tensor([0, 5, 1, 100, 0, 0, 3, 499, 500, 0, 20, 7], dtype=torch.int32),
        top_p=torch.tensor([1.0, 0.9, 0.5, 0.1, 0.99, 1.0, 0.7, 0.8, 0.95, 0.6, 0.05, 1.0]),
        min_p=torch.tensor([0.0, 0.1, 0.0, 0.0, 0.05, 0.3, 0.0, 0.0, 0.01, 0.0, 0.0, 0.2], dtype=torch.float64),
        seed=torch.arange(R) * 1000 + 3,
        offset=torch.arange(R) + 50,
    )
    out, ref = both(logits, **kw)
    assert_same(out, ref)
    assert (out[1][1::4] == 0).all()  # temperature 0 rows are greedy
    # 0-dim tensors mean the same as numbers.
    a = sample(logits, temperature=torch.tensor(0.7), top_p=torch.tensor(0.9), seed=torch.tensor(5),
               offset=torch.tensor(11))
    b = sample(logits, temperature=0.7, top_p=0.9, seed=5, offset=11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_strided_rows():
    full = torch.randn(6, 3, 999) * 3
    logits = full[:, -1, :]  # row stride 3*999
    assert not logits.is_contiguous()
    out = sample(logits, top_p=0.9, seed=1)
    assert torch.equal(out[0], sample(logits.contiguous(), top_p=0.9, seed=1)[0])
    assert_same(out, sample_ref(logits, top_p=0.9, seed=1))
    t = (torch.randn(999, 6) * 3).t()  # non-unit token stride: the copy path
    assert_same(sample(t, top_k=30, seed=2), sample_ref(t, top_k=30, seed=2))


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        logits = torch.randn(3, 100003) * 3
        assert_same(*both(logits, top_p=0.9, seed=4))
    finally:
        torch.set_num_threads(old)


def test_fuzz_against_reference():
    gen = torch.Generator().manual_seed(4321)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    for i in range(60):
        R, V = draw(1, 6), draw(1, 3000)
        dtype = DTYPES[draw(0, 2)]
        logits = (torch.randn(R, V, generator=gen) * draw(1, 8)).to(dtype)
        if draw(0, 1):  # ties: logits on a coarse grid
            logits = (torch.randint(-4, 5, (R, V), generator=gen).float() / 2).to(dtype)
        holes = torch.rand(R, V, generator=gen)
        logits[holes < 0.02] = float("nan")
        logits[(holes >= 0.02) & (holes < 0.05)] = float("-inf")
        logits[holes > 0.995] = float("inf")
        kw = dict(temperature=[1.0, 0.5, 2.0, 0.0][draw(0, 3)], top_k=[0, 1, 5, 64, V][draw(0, 4)],
                  top_p=[1.0, 0.9, 0.5, 0.05][draw(0, 3)], min_p=[0.0, 0.1, 0.5][draw(0, 2)],
                  seed=draw(0, 2**31), offset=i)
        assert_same(*both(logits, **kw))


# ----------------------------------------------------------------------------- distribution


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_distribution_chi_square(backend, setting):
    fn = lambda x, **kw: sample(x, backend=backend, **kw)  # noqa: E731
    counts, tokens, logprobs = draw_counts(fn, setting)
    q = exact_probs(torch.tensor(LOGITS), *setting)
    assert (counts[q == 0] == 0).all(), f"filtered-out tokens drawn: {counts.tolist()} vs {q.tolist()}"
    stat, dof, pval = chi2_test(counts, q)
    # Fixed seeds make this deterministic; 1e-4 leaves room for an unlucky but
    # correct seed while a wrong filter or a biased race gives p ~ 0.
    assert pval > 1e-4, f"chi2 = {stat:.1f} on {dof} dof (p = {pval:.2e}); counts {counts.tolist()}, q {q.tolist()}"
    torch.testing.assert_close(logprobs.double(), q.log()[tokens], rtol=1e-5, atol=1e-5)


def test_chi_square_detects_a_wrong_distribution():
    # The test has power: the unfiltered draws fail against the top-k=3 law.
    counts, _, _ = draw_counts(lambda x, **kw: sample(x, **kw), SETTINGS[0], rows=500, offsets=range(4))
    q = exact_probs(torch.tensor(LOGITS), 1.0, 4, 1.0, 0.0)
    q = (q + 1e-9) / (q + 1e-9).sum()
    assert chi2_test(counts, q)[2] < 1e-6


def test_large_vocab_marginal():
    # V = 50257, top_p = 0.9: the mass of the kept set is drawn in proportion.
    V, R = 50257, 64
    x = torch.randn(V) * 2.5
    logits = x.repeat(R, 1)
    toks = torch.cat([sample(logits, top_p=0.9, seed=11, offset=o)[0] for o in range(40)])
    q = exact_probs_fast(x, 0.9)
    # Bucket tokens by q-decile of the kept set: each bucket's share of draws.
    kept = (q > 0).nonzero().flatten()
    assert (q[toks] > 0).all(), "a token outside the top-p set was drawn"
    order = kept[q[kept].argsort()]
    buckets = torch.zeros(V, dtype=torch.long)
    edges = torch.linspace(0, len(order), 6).long()
    for b in range(5):
        buckets[order[edges[b]:edges[b + 1]]] = b
    counts = torch.bincount(buckets[toks], minlength=5)
    probs = torch.stack([q[order[edges[b]:edges[b + 1]]].sum() for b in range(5)])
    assert chi2_test(counts, probs / probs.sum())[2] > 1e-4


def exact_probs_fast(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """float64 top-p law of one row (no ties in random data)."""
    x = x.double()
    p = torch.softmax(x, 0)
    sp, idx = torch.sort(p, descending=True)
    above = torch.cumsum(sp, 0) - sp
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[idx[above < top_p]] = True
    q = torch.where(keep, p, torch.zeros_like(p))
    return q / q.sum()


# ----------------------------------------------------------------------------- determinism, special rows


def test_determinism():
    logits = torch.randn(64, 1000)
    a = sample(logits, top_p=0.95, seed=3, offset=17)
    b = sample(logits, top_p=0.95, seed=3, offset=17)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = sample(logits, top_p=0.95, seed=3, offset=18)
    d = sample(logits, top_p=0.95, seed=4, offset=17)
    assert (a[0] != c[0]).sum() > 32 and (a[0] != d[0]).sum() > 32
    # An offset tensor: the same tokens as the number.
    e = sample(logits, top_p=0.95, seed=torch.tensor(3), offset=torch.tensor(17))
    assert torch.equal(a[0], e[0])


def test_greedy():
    logits = torch.randn(8, 300)
    logits[3, 10] = logits[3, 20] = 50.0  # tie: lowest index
    tokens, lp = sample(logits, temperature=0.0, top_k=5, top_p=0.5, min_p=0.3, seed=0)
    expected = logits.argmax(dim=1)
    assert torch.equal(tokens, expected) and int(tokens[3]) == 10
    assert (lp == 0).all()


def test_narrow_filters_are_greedy():
    logits = torch.randn(16, 2000) * 2
    m = logits.argmax(dim=1)
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        tokens, lp = sample(logits, seed=5, **kw)
        assert torch.equal(tokens, m), kw
        assert (lp == 0).all(), kw


def test_ties_are_kept_together():
    # Equal logits form one group: top_k = 2 of four equal maxima keeps all four.
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 3.0]]).repeat(4000, 1)
    tokens, lp = sample(logits, top_k=2, seed=1)
    assert set(tokens.tolist()) == {1, 2, 4, 5}
    torch.testing.assert_close(lp, torch.full_like(lp, -math.log(4)))
    tokens, lp = sample(logits, top_p=0.3, seed=2)  # mass above each maximum is 0 < 0.3
    assert set(tokens.tolist()) == {1, 2, 4, 5}


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_special_rows(backend):
    V = 40
    logits = torch.randn(6, V)
    logits[0] = float("-inf")  # no finite logit
    logits[1] = float("nan")
    logits[2] = float("inf")  # overflow garbage
    logits[3, :] = float("nan")
    logits[3, 17] = 0.5  # one finite logit: a point mass
    logits[4, ::2] = float("nan")
    logits[5, 7] = 3e38  # / 0.5 overflows to +inf: never chosen
    for T in (1.0, 0.5, 0.0):
        tokens, lp = sample(logits, temperature=T, top_p=0.9, seed=3, backend=backend)
        assert tokens[:3].tolist() == [0, 0, 0] and torch.isneginf(lp[:3]).all()
        assert int(tokens[3]) == 17 and float(lp[3]) == 0.0
        assert int(tokens[4]) % 2 == 1
        if T == 0.5:
            assert int(tokens[5]) != 7
        assert torch.isfinite(lp[3:]).all()


# ----------------------------------------------------------------------------- API


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(logits=torch.randn(6)), ValueError, "logits"),
        (dict(logits=torch.randint(0, 5, (6, 10))), TypeError, "logits"),
        (dict(logits=[[1.0]]), TypeError, "logits"),
        (dict(logits=torch.randn(3, 0)), ValueError, "logits"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature="1"), TypeError, "temperature"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=2.0), TypeError, "top_k"),
        (dict(top_k=True), TypeError, "top_k"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(min_p=-0.1), ValueError, "min_p"),
        (dict(min_p=1.1), ValueError, "min_p"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(offset=-(2**63) - 1), ValueError, "offset"),
        (dict(temperature=torch.ones(5)), ValueError, "temperature"),
        (dict(top_k=torch.ones(6)), TypeError, "top_k"),
        (dict(top_p=torch.ones(6, dtype=torch.long)), TypeError, "top_p"),
        (dict(seed=torch.tensor(1, dtype=torch.int32)), TypeError, "seed"),
        (dict(offset=torch.zeros(2, 3, dtype=torch.long)), ValueError, "offset"),
        (dict(min_p=torch.zeros(6, device="meta")), ValueError, "device"),
        (dict(backend="nope"), ValueError, "backend"),
        (dict(stream=torch.arange(5)), ValueError, "stream must be an integer tensor of shape"),
        (dict(stream=torch.arange(6.0)), ValueError, "stream must be an integer"),
        (dict(stream=torch.tensor([0, 1, 2, 3, 4, 2**32])), ValueError, "stream values"),
        (dict(stream=torch.tensor([0, 1, 2, 3, 4, -1])), ValueError, "stream values"),
    ],
)
def test_bad_input(kwargs, exc, word):
    args = dict(logits=torch.randn(6, 10), seed=0)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        sample(**args)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_stream_makes_a_row_independent_of_its_place_in_the_batch(backend):
    # A request's candidates keyed by (seed, stream) draw the same tokens alone or among others.
    g = torch.Generator().manual_seed(3)
    mine = torch.randn(4, 300, generator=g) * 2
    others = torch.randn(5, 300, generator=g) * 2
    kw = dict(temperature=0.9, top_p=0.95, offset=11, backend=backend)
    alone, lp_alone = sample(mine, seed=torch.full((4,), 42), stream=torch.arange(4), **kw)
    batch = torch.cat([others[:3], mine, others[3:]])
    seeds = torch.tensor([1, 2, 3, 42, 42, 42, 42, 4, 5])
    streams = torch.tensor([0, 1, 2, 0, 1, 2, 3, 0, 1])
    tok, lp = sample(batch, seed=seeds, stream=streams, **kw)
    assert torch.equal(tok[3:7], alone) and torch.equal(lp[3:7], lp_alone)
    # Without streams the rows' draws depend on their place; the default stream is the row index.
    moved, _ = sample(batch, seed=seeds, **kw)
    assert torch.equal(moved, sample(batch, seed=seeds, stream=torch.arange(9), **kw)[0])
    u = sample_uniform_ref(42, 11, 4, 300, stream=torch.tensor([5, 6, 7, 8]))
    assert torch.equal(u, sample_uniform_ref(42, 11, 9, 300)[5:])


def test_stream_matches_the_reference_on_random_inputs():
    for trial in range(20):
        g = torch.Generator().manual_seed(trial)
        R, V = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(2, 700, (1,), generator=g))
        logits = torch.randn(R, V, generator=g) * 3
        streams = torch.randint(0, 2**32, (R,), generator=g)
        kw = dict(temperature=1.1, top_k=int(V // 3), top_p=0.9, seed=trial, offset=trial * 7)
        got = sample(logits, stream=streams, **kw)
        want = sample_ref(logits, stream=streams, **kw)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_seed_is_required():
    with pytest.raises(TypeError, match="seed"):
        sample(torch.randn(2, 5))


def test_opcheck_and_compile():
    logits = torch.randn(4, 50)
    op = torch.ops.tts.sample.default
    torch.library.opcheck(op, (logits, 0.8, 5, 0.9, 0.0, 1, 2, None, None, None, None, None, None, None))
    per_row = (torch.rand(4) + 0.5, torch.tensor([0, 3, 5, 50]), torch.rand(4), torch.zeros(4),
               torch.arange(4), torch.tensor(9), torch.tensor([7, 2**32 - 1, 0, 5]))
    torch.library.opcheck(op, (logits, 1.0, 0, 1.0, 0.0, 0, 0, *per_row))
    offset = torch.tensor(3)
    compiled = torch.compile(lambda x, o: sample(x, temperature=0.7, top_p=0.9, seed=5, offset=o), fullgraph=True)
    out = compiled(logits, offset)
    assert torch.equal(out[0], sample_ref(logits, temperature=0.7, top_p=0.9, seed=5, offset=offset)[0])


def test_fallback_without_extension():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        "import tts_kernels\n"
        "assert not tts_kernels.HAS_C\n"
        "from tts_kernels.reference import sample_ref\n"
        "x = torch.randn(5, 300)\n"
        "a = tts_kernels.sample(x, top_p=0.9, top_k=torch.tensor([0, 1, 2, 3, 4]), seed=3)\n"
        "b = sample_ref(x, top_p=0.9, top_k=torch.tensor([0, 1, 2, 3, 4]), seed=3)\n"
        "assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])\n"
        "print('ok')\n"
    )
    res = run_py(code, TTS_KERNELS_NO_EXT="1")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
