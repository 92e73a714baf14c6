"""How an op reaches its kernel (tts_kernels/ops/_dispatch.py), checked on CPU.

The decision table is a pure function of the op, the device type, the backend
asked, the build (extension, its CUDA kernels, Triton) and the environment, so
every row, CUDA ones included, is checked here without a GPU. Then what import
registered: a CUDA kernel for every op, a fake or a stated reason for every
schema. Last, the registered CUDA kernels themselves run on CPU tensors: the
Triton ones in the interpreter, in a child process started with
``TRITON_INTERPRET=1`` (this file, run as a script; tests/child_process.py says
why a child), each against the reference.
"""
from __future__ import annotations

import os
import sys

OPS = ("beam_topk", "sample", "paged_attention", "kv_reorder_")
TRITON_OPS = ("beam_topk", "sample", "paged_attention")


def _cuda_kernel(torch, op):
    """The CUDA kernel of ``torch.ops.tts.<op>`` as a function of the schema's arguments.

    A Python-registered one is reached through the dispatcher (a CUDA key set
    sends the call to it whatever the tensors' device); a C++ one would reject
    CPU tensors, so then the Triton function is called instead.
    """
    from tts_kernels.ops import _dispatch

    if op not in _dispatch.CUDA_KERNELS:
        return _dispatch.kernel(op, "triton")
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    overload = getattr(torch.ops.tts, op).default
    return lambda *args: overload.redispatch(keys, *args)


def _case_sample(torch):
    from tts_kernels.reference import sample_op_ref

    logits = torch.randn(5, 300) * 3
    per_row = (None, torch.tensor([0, 3, 1, 50, 7]), None, None, None, torch.tensor(4))
    for args in ((logits, 0.8, 0, 0.9, 0.05, 11, 2, *([None] * 6)), (logits, 1.0, 0, 0.8, 0.0, 5, 0, *per_row)):
        out = _cuda_kernel(torch, "sample")(*args)
        ref = sample_op_ref(*args)
        assert torch.equal(out[0], ref[0]), (out[0], ref[0])
        torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)


def _case_paged_attention(torch):
    from paged_checks import TOL, make_case, make_shared_case

    from tts_kernels.reference import paged_attention_ref

    q, kc, vc, bt, L = make_case(3, 8, 2, 16, 4, [0, 9, 13])
    for args in ((q, kc, vc, bt, L, 0.25, None, None), (q, kc, vc, bt, L, 0.25, 5, None)):
        out = _cuda_kernel(torch, "paged_attention")(*args)
        torch.testing.assert_close(out, paged_attention_ref(*args), **TOL[torch.float32])
    q, kc, vc, bt, L, pre = make_shared_case([(3, 9, [1, 2, 3])], 8, 2, 16, 4)
    out = _cuda_kernel(torch, "paged_attention")(q, kc, vc, bt, L, 0.25, None, pre)
    torch.testing.assert_close(out, paged_attention_ref(q, kc, vc, bt, L, 0.25), **TOL[torch.float32])


def _case_beam_topk(torch):
    from beam_checks import check_selection

    logits, beam_scores = torch.randn(6, 50) * 3, -torch.rand(2, 3) * 5
    for C, T in ((6, 1.0), (4, 0.7)):
        check_selection(_cuda_kernel(torch, "beam_topk")(logits, beam_scores, C, T), logits, beam_scores, C, T)


CASES = {name[len("_case_"):]: fn for name, fn in list(globals().items()) if name.startswith("_case_")}


def _child() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch

    from child_process import record, report

    from tts_kernels.triton import sample as st

    results = {"_interpreted": type(st._sample_kernel).__name__ == "InterpretedFunction"}
    for i, (name, fn) in enumerate(CASES.items()):
        torch.manual_seed(3000 + i)
        record(results, name, fn, torch)
    report(results)


if __name__ == "__main__":
    _child()
    sys.exit(0)


# ----------------------------------------------------------------------------- the tests

import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tts_kernels import _ext, beam_topk, kv_reorder_, sample  # noqa: E402
from tts_kernels.ops import _dispatch, _fake  # noqa: E402
from tts_kernels.ops._dispatch import Build, decide, registered  # noqa: E402
from tts_kernels.reference import beam_topk_ref, kv_reorder_ref  # noqa: E402

from child_process import run_py  # noqa: E402

needs_triton = pytest.mark.skipif(not _ext.HAS_TRITON, reason="triton is not installed")

# Builds: everything; this machine's (no nvcc); CUDA kernels without Triton;
# extension without CUDA kernels and without Triton; no extension; nothing.
FULL = Build(True, True, True)
NO_NVCC = Build(True, False, True)
NO_TRITON = Build(True, True, False)
CPU_ONLY = Build(True, False, False)
NO_EXT = Build(False, False, True, "disabled by TTS_KERNELS_NO_EXT=1")
NOTHING = Build(False, False, False, "ImportError: gone")

# (op, device, backend asked, build, env) -> the backend run.
TABLE = [
    # auto on CPU: the C++ kernel, else the reference.
    *[(op, "cpu", "auto", FULL, {}, "cpp") for op in OPS],
    *[(op, "cpu", "auto", NO_EXT, {}, "reference") for op in OPS],
    # auto on CUDA, beam_topk: timed C++ vs Triton; one of them; the reference.
    ("beam_topk", "cuda", "auto", FULL, {}, "tuned"),
    ("beam_topk", "cuda", "auto", NO_TRITON, {}, "cpp"),
    ("beam_topk", "cuda", "auto", NO_NVCC, {}, "triton"),
    ("beam_topk", "cuda", "auto", NO_EXT, {}, "triton"),
    ("beam_topk", "cuda", "auto", CPU_ONLY, {}, "reference"),
    ("beam_topk", "cuda", "auto", NOTHING, {}, "reference"),
    # sample and paged_attention have no C++ CUDA kernel in any build.
    *[(op, "cuda", "auto", b, {}, "triton") for op in ("sample", "paged_attention") for b in (FULL, NO_NVCC, NO_EXT)],
    *[(op, "cuda", "auto", b, {}, "reference") for op in ("sample", "paged_attention") for b in (NO_TRITON, NOTHING)],
    # kv_reorder_ on CUDA without the extension's CUDA kernels: the fallback, never the missing C++ op.
    ("kv_reorder_", "cuda", "auto", FULL, {}, "cpp"),
    ("kv_reorder_", "cuda", "auto", NO_TRITON, {}, "cpp"),
    ("kv_reorder_", "cuda", "auto", NO_NVCC, {}, "reference"),
    ("kv_reorder_", "cuda", "auto", CPU_ONLY, {}, "reference"),
    ("kv_reorder_", "cuda", "auto", NO_EXT, {}, "reference"),
    # Other devices: the reference (plain torch runs anywhere).
    *[(op, "mps", "auto", FULL, {}, "reference") for op in OPS],
    # Explicit choices are kept when the build has them.
    *[(op, dev, "reference", b, {}, "reference") for op in OPS for dev in ("cpu", "cuda") for b in (FULL, NOTHING)],
    *[(op, "cpu", "cpp", CPU_ONLY, {}, "cpp") for op in OPS],
    ("beam_topk", "cuda", "cpp", FULL, {}, "cpp"),
    ("kv_reorder_", "cuda", "cpp", FULL, {}, "cpp"),
    *[(op, dev, "triton", NO_NVCC, {}, "triton") for op in TRITON_OPS for dev in ("cpu", "cuda")],
    # Environment overrides replace auto only.
    ("beam_topk", "cuda", "auto", FULL, {"TTS_KERNELS_BEAM_BACKEND": "triton"}, "triton"),
    ("beam_topk", "cuda", "auto", FULL, {"TTS_KERNELS_BEAM_BACKEND": "cpp"}, "cpp"),
    ("beam_topk", "cpu", "auto", FULL, {"TTS_KERNELS_BEAM_BACKEND": "triton"}, "cpp"),  # CUDA only
    ("beam_topk", "cuda", "auto", FULL, {"TTS_KERNELS_BEAM_BACKEND": "cpp", "TTS_KERNELS_BACKEND": "triton"}, "cpp"),
    ("beam_topk", "cuda", "reference", FULL, {"TTS_KERNELS_BEAM_BACKEND": "cpp"}, "reference"),
    *[(op, dev, "auto", FULL, {"TTS_KERNELS_BACKEND": "reference"}, "reference") for op in OPS
      for dev in ("cpu", "cuda")],
    ("sample", "cpu", "auto", FULL, {"TTS_KERNELS_BACKEND": "triton"}, "triton"),
    ("kv_reorder_", "cpu", "auto", FULL, {"TTS_KERNELS_BACKEND": "triton"}, "cpp"),  # no Triton kernel: auto
    ("kv_reorder_", "cuda", "auto", NO_NVCC, {"TTS_KERNELS_BACKEND": "triton"}, "reference"),
    ("sample", "cpu", "cpp", FULL, {"TTS_KERNELS_BACKEND": "reference"}, "cpp"),
    ("sample", "cpu", "auto", FULL, {"TTS_KERNELS_BACKEND": ""}, "cpp"),  # empty: unset
]


@pytest.mark.parametrize("op,device,backend,build,env,want", TABLE)
def test_decision_table(op, device, backend, build, env, want):
    assert decide(op, device, backend, build, env).backend == want


# (op, device, backend asked, build, env) -> (exception, words of its message).
ERRORS = [
    *[(op, "cpu", "nope", FULL, {}, ValueError, "backend") for op in OPS],
    ("kv_reorder_", "cuda", "triton", FULL, {}, ValueError, "backend"),
    *[(op, "cpu", "cpp", NO_EXT, {}, RuntimeError, "backend='cpp' needs the compiled extension.*TTS_KERNELS_NO_EXT")
      for op in OPS],
    *[(op, "cuda", "cpp", FULL, {}, ValueError, "CPU tensors only.*no CUDA C\\+\\+ kernel")
      for op in ("sample", "paged_attention")],
    *[(op, "cuda", "cpp", NO_NVCC, {}, RuntimeError, "built without them") for op in ("beam_topk", "kv_reorder_")],
    ("beam_topk", "mps", "cpp", FULL, {}, ValueError, "CPU or CUDA"),
    *[(op, "cuda", "triton", NO_TRITON, {}, RuntimeError, f"backend='triton' needs the triton package.*{op}")
      for op in TRITON_OPS],
    ("beam_topk", "cuda", "auto", FULL, {"TTS_KERNELS_BEAM_BACKEND": "fast"}, ValueError, "TTS_KERNELS_BEAM_BACKEND"),
    ("sample", "cpu", "auto", FULL, {"TTS_KERNELS_BACKEND": "fast"}, ValueError, "TTS_KERNELS_BACKEND"),
    # An override that names a backend the build lacks fails like the argument would, naming the variable.
    ("sample", "cuda", "auto", FULL, {"TTS_KERNELS_BACKEND": "cpp"}, ValueError, "TTS_KERNELS_BACKEND='cpp'"),
    ("beam_topk", "cuda", "auto", NO_TRITON, {"TTS_KERNELS_BEAM_BACKEND": "triton"}, RuntimeError,
     "TTS_KERNELS_BEAM_BACKEND='triton'"),
]


@pytest.mark.parametrize("op,device,backend,build,env,exc,words", ERRORS)
def test_decision_errors(op, device, backend, build, env, exc, words):
    with pytest.raises(exc, match=words):
        decide(op, device, backend, build, env)


@pytest.mark.parametrize("build", [FULL, NO_NVCC, NO_TRITON, CPU_ONLY, NO_EXT, NOTHING])
@pytest.mark.parametrize("op", OPS)
def test_auto_is_the_registered_kernel(op, build):
    # "auto" on CPU and CUDA is what torch.ops.tts.<op> runs (one op call, which
    # torch.compile traces with the fake), except the timed choice of beam_topk.
    for device in ("cpu", "cuda"):
        d = decide(op, device, "auto", build, {})
        assert d.backend in (registered(op, device, build), "tuned")
        assert (d.fallback is not None) == (d.backend == "reference")
        if d.backend == "tuned":
            assert registered(op, device, build) == "cpp" and build.has_triton


def test_fallback_reasons():
    d = decide("sample", "cpu", "auto", NO_EXT, {})
    assert d.level == logging.INFO and "TTS_KERNELS_NO_EXT" in d.fallback  # the import already warned
    d = decide("sample", "cuda", "auto", NO_TRITON, {})
    assert d.level == logging.WARNING and "triton" in d.fallback
    d = decide("kv_reorder_", "cuda", "auto", NO_NVCC, {})
    assert d.level == logging.WARNING and "without CUDA kernels" in d.fallback
    assert decide("sample", "cpu", "auto", FULL, {"TTS_KERNELS_BACKEND": "reference"}).fallback is None  # asked for


# ----------------------------------------------------------------------------- this install, flags patched


@pytest.fixture
def fresh(monkeypatch):
    """resolve() decides again under patched flags or environment, and forgets afterwards."""
    monkeypatch.delenv("TTS_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("TTS_KERNELS_BEAM_BACKEND", raising=False)
    _dispatch.forget()
    yield monkeypatch
    _dispatch.forget()


def test_kv_reorder_on_cuda_without_cuda_kernels_resolves_to_the_fallback(fresh):
    fresh.setattr(_ext, "HAS_C", True)
    fresh.setattr(_ext, "HAS_CUDA_KERNELS", False)
    assert _dispatch.resolve("kv_reorder_", "cuda", "auto") == "reference"
    assert _dispatch.resolve("kv_reorder_", "cpu", "auto") == "cpp"
    with pytest.raises(RuntimeError, match="built without them"):
        _dispatch.resolve("kv_reorder_", "cuda", "cpp")
    _dispatch.forget()
    fresh.setattr(_ext, "HAS_CUDA_KERNELS", True)
    assert _dispatch.resolve("kv_reorder_", "cuda", "auto") == "cpp"


def test_patched_build_without_extension_runs_the_reference(fresh, caplog):
    # The dispatcher still holds the C++ kernel (it loaded), so a call decided
    # "reference" must go to the reference function itself, not through the op.
    calls = []

    def spy(*args):
        calls.append(args)
        return beam_topk_ref(*args)

    fresh.setattr(_ext, "HAS_C", False)
    fresh.setitem(_dispatch.REFERENCE, "beam_topk", spy)
    fresh.setattr(_dispatch, "_NOTED", set())
    logits, bs = torch.randn(6, 40), torch.randn(2, 3)
    with caplog.at_level(logging.INFO, logger="tts_kernels"):
        for _ in range(3):
            out = beam_topk(logits, bs, 5)
    assert len(calls) == 3
    assert all(torch.equal(a, b) for a, b in zip(out, beam_topk_ref(logits, bs, 5)))
    notes = [r for r in caplog.records if "beam_topk on cpu tensors runs the reference" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO  # once; INFO: the import warned already
    with pytest.raises(RuntimeError, match="compiled extension"):
        beam_topk(logits, bs, 5, backend="cpp")


def test_environment_override_reaches_the_public_function(fresh):
    calls = []
    fresh.setitem(_dispatch.REFERENCE, "kv_reorder_", lambda c, p: (calls.append(1), kv_reorder_ref(c, p)))
    fresh.setenv("TTS_KERNELS_BACKEND", "reference")
    caches, parents = [torch.randn(3, 4)], torch.tensor([2, 2, 0])
    want = caches[0][parents].clone()
    kv_reorder_(caches, parents)
    assert calls == [1] and torch.equal(caches[0], want)
    fresh.setenv("TTS_KERNELS_BACKEND", "fast")
    _dispatch.forget()
    with pytest.raises(ValueError, match="TTS_KERNELS_BACKEND"):
        sample(torch.randn(2, 5), seed=1)


def test_decided_once(fresh):
    assert _dispatch.resolve("sample", "cpu", "auto") == "cpp"
    fresh.setenv("TTS_KERNELS_BACKEND", "reference")
    assert _dispatch.resolve("sample", "cpu", "auto") == "cpp"  # remembered
    _dispatch.forget()
    assert _dispatch.resolve("sample", "cpu", "auto") == "reference"


# ----------------------------------------------------------------------------- what import registered


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tts::{op}", "CUDA")
    want = registered(op, "cuda", _dispatch.current_build())
    # Python registers exactly the CUDA kernels the build has no C++ one for.
    assert (op in _dispatch.CUDA_KERNELS) == (want != "cpp")
    if want == "triton":
        assert _dispatch.CUDA_KERNELS[op] is _dispatch.kernel(op, "triton")


def test_registered_kv_reorder_cuda_kernel_is_the_fallback():
    if "kv_reorder_" not in _dispatch.CUDA_KERNELS:
        pytest.skip("the extension has its C++ CUDA kernel (it would reject CPU tensors)")
    caches, parents = [torch.randn(4, 3), torch.randn(4, 2, 2)], torch.tensor([3, 3, 0, 1])
    want = [c[parents].clone() for c in caches]
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    torch.ops.tts.kv_reorder_.default.redispatch(keys, caches, parents)
    assert all(torch.equal(a, b) for a, b in zip(caches, want))


def _has_fake(name: str) -> bool:
    # torch.library.register_fake registers the fake as the op's Meta kernel too.
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"tts::{name}", "Meta")


@pytest.mark.parametrize("name", list(_ext.SCHEMAS))
def test_every_schema_has_a_fake_or_a_reason(name):
    if name in _fake.NO_FAKE:
        reason = _fake.NO_FAKE[name]
        assert reason and "\n" not in reason
        assert not _has_fake(name), f"{name} has a fake now: drop it from NO_FAKE"
    else:
        assert _has_fake(name), f"{name} has no fake kernel: add one to ops/_fake.py or a reason to NO_FAKE"


def test_no_fake_lists_only_schemas():
    assert set(_fake.NO_FAKE) <= set(_ext.SCHEMAS)


def test_without_extension_every_op_has_cuda_and_fake_kernels():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        "import tts_kernels\n"
        "from tts_kernels import _ext\n"
        "from tts_kernels.ops import _dispatch\n"
        "assert not tts_kernels.HAS_C\n"
        "for op in ('beam_topk', 'sample', 'paged_attention', 'kv_reorder_'):\n"
        "    assert torch._C._dispatch_has_kernel_for_dispatch_key('tts::' + op, 'CUDA'), op\n"
        "    assert torch._C._dispatch_has_kernel_for_dispatch_key('tts::' + op, 'Meta'), op\n"
        "    assert op in _dispatch.CUDA_KERNELS, op\n"
        "want = 'triton' if _ext.HAS_TRITON else 'reference'\n"
        "assert {op: _dispatch._REGISTERED[(op, 'cuda')] for op in _dispatch.OPS} == dict(\n"
        "    beam_topk=want, sample=want, paged_attention=want, kv_reorder_='reference')\n"
        "print('ok')\n"
    )
    res = run_py(code, TTS_KERNELS_NO_EXT="1")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_without_triton_cuda_kernels_fall_back_to_the_reference():
    # Triton hidden from this child (None in sys.modules: not found, and its import fails).
    code = (
        "import sys, logging, torch\n"
        "sys.modules['triton'] = None\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "import tts_kernels\n"
        "from tts_kernels import _ext\n"
        "from tts_kernels.ops import _dispatch\n"
        "from tts_kernels.reference import sample_op_ref\n"
        "assert not _ext.HAS_TRITON\n"
        "assert _dispatch._REGISTERED[('sample', 'cuda')] == 'reference'\n"
        "keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)\n"
        "x = torch.randn(3, 50); args = (x, 1.0, 0, 0.9, 0.0, 4, 0) + (None,) * 6\n"
        "for _ in range(2):\n"
        "    out = torch.ops.tts.sample.default.redispatch(keys, *args)\n"
        "    assert all(torch.equal(a, b) for a, b in zip(out, sample_op_ref(*args)))\n"
        "try:\n"
        "    tts_kernels.sample(x, seed=1, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton package' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n"
    )
    res = run_py(code)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr
    notes = [ln for ln in res.stdout.splitlines() if "sample on cuda tensors runs the reference" in ln]
    assert len(notes) == 1 and "triton is not installed" in notes[0], res.stdout


def test_importing_tts_kernels_does_not_import_triton():
    res = run_py("import sys, tts_kernels\nassert 'triton' not in sys.modules, 'triton imported'\nprint('ok')")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


# ----------------------------------------------------------------------------- CUDA kernels, interpreted


@needs_triton
def test_kernels_are_interpreted(child_results):
    assert child_results["_interpreted"], "TRITON_INTERPRET=1 did not take effect"


@needs_triton
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_kernel_matches_reference(child_results, name):
    r = child_results[name]
    assert r["verdict"] == "ok", r["verdict"]
