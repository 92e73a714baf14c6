"""How a public op reaches its kernel: one decision for every op and device.

Backends of an op (``backend=`` of its public function):

- ``"reference"``: its plain-PyTorch meaning (``reference.py``), on any device;
- ``"cpp"``: the compiled extension's kernel for the tensors' device, reached
  only through ``torch.ops.tts.<op>`` (CPU always; CUDA for ``beam_topk`` and
  ``kv_reorder_`` when the extension was built with nvcc);
- ``"triton"``: ``tts_kernels/triton/<op>.py`` (CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``);
- ``"auto"``: the table below.

Two tables, both pure functions of the op, the device type and the facts of
this install (:class:`Build`), so tests check them on a CPU-only machine:

- :func:`registered`: the backend ``torch.ops.tts.<op>`` runs for a device.
  C++ registers the CPU kernels and (built with nvcc) the CUDA kernels of
  ``beam_topk`` and ``kv_reorder_``; :func:`register_cuda_kernels` registers a
  Python CUDA kernel for every op this build left without one (Triton, or the
  reference where Triton or a C++ kernel is missing), so ``torch.ops.tts.*``
  works on CUDA tensors from code that never imports the public functions, and
  under ``torch.compile`` (the fakes in ``_fake.py`` trace it).
- :func:`decide`: what a public function runs for ``backend=``: the checks of
  the name, the environment override, and the fallback when a compiled kernel
  is missing. ``"auto"`` is :func:`registered` for CPU and CUDA (so an
  ``"auto"`` call is one ``torch.ops.tts`` call, compile-friendly), except
  ``beam_topk`` on CUDA with both C++ and Triton kernels, which is ``"tuned"``:
  the faster of the two per shape class (``_autotune.py``). Other devices get
  the reference.

Environment overrides replace ``"auto"`` only (an explicit ``backend=`` wins):
``TTS_KERNELS_BACKEND=reference|cpp|triton`` for every op that has that
backend, on every device (an op without it, e.g. ``kv_reorder_`` and
``triton``, keeps ``"auto"``); ``TTS_KERNELS_BEAM_BACKEND`` for ``beam_topk``
on CUDA tensors only, where it skips the timing (it predates the general one
and wins over it there).

A fallback to the reference under ``"auto"`` is logged once per op, device and
reason (logger ``tts_kernels``): at INFO when the extension did not load (the
import already warned), at WARNING otherwise (Triton not installed; an
extension built without CUDA kernels). Without Triton the CUDA kernel of
``sample``, ``paged_attention`` and (without C++ CUDA kernels) ``beam_topk`` is
that reference rather than an error: correct and slow, as the whole package is
without its extension; only an explicit ``backend="triton"`` raises.

The public function decides once per (op, device type, backend asked) and
remembers it (:func:`resolve`); ``torch.ops.tts.<op>`` itself is the raw op,
whose arguments the public function has checked.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Callable, Mapping, NamedTuple

import torch

from .. import _ext
from ..reference import beam_topk_ref, kv_reorder_ref, paged_attention_ref, sample_op_ref

_logger = logging.getLogger("tts_kernels")

GENERAL_ENV = "TTS_KERNELS_BACKEND"
_NAMED = ("reference", "cpp", "triton")


class OpSpec(NamedTuple):
    backends: tuple[str, ...]  # the values backend= accepts
    cuda_cpp: bool  # the extension has a CUDA C++ kernel for it (when built with nvcc)
    autotune: bool = False  # "auto" on CUDA times C++ against Triton when both exist
    env: str | None = None  # op-specific override of "auto" for CUDA tensors


_ALL = ("auto", "reference", "cpp", "triton")
OPS = {
    "beam_topk": OpSpec(_ALL, cuda_cpp=True, autotune=True, env="TTS_KERNELS_BEAM_BACKEND"),
    "sample": OpSpec(_ALL, cuda_cpp=False),
    "paged_attention": OpSpec(_ALL, cuda_cpp=False),
    "kv_reorder_": OpSpec(("auto", "reference", "cpp"), cuda_cpp=True),
}

# Each backend's Python function takes the op's schema arguments, in order.
REFERENCE = {
    "beam_topk": beam_topk_ref,
    "sample": sample_op_ref,
    "paged_attention": paged_attention_ref,
    "kv_reorder_": kv_reorder_ref,
}


class Build(NamedTuple):
    """What this install can run."""

    has_c: bool
    has_cuda_kernels: bool
    has_triton: bool
    load_error: str | None = None


class Decision(NamedTuple):
    backend: str  # "reference" | "cpp" | "triton" | "tuned"
    fallback: str | None = None  # why "auto" got the reference (logged once), else None
    level: int = logging.WARNING


def current_build() -> Build:
    return Build(_ext.HAS_C, _ext.HAS_CUDA_KERNELS, _ext.HAS_TRITON, _ext.LOAD_ERROR)


def registered(op: str, device_type: str, build: Build) -> str | None:
    """The backend ``torch.ops.tts.<op>`` runs for ``device_type`` tensors (None: no kernel)."""
    spec = OPS[op]
    if device_type == "cpu":
        return "cpp" if build.has_c else "reference"
    if device_type == "cuda":
        if spec.cuda_cpp and build.has_cuda_kernels:
            return "cpp"
        return "triton" if "triton" in spec.backends and build.has_triton else "reference"
    # The no-extension library registers the reference for every device.
    return None if build.has_c else "reference"


def decide(op: str, device_type: str, backend: str, build: Build, env: Mapping[str, str]) -> Decision:
    """What the public function of ``op`` runs for ``backend`` on ``device_type`` tensors.

    Raises ``ValueError`` for a name the op does not have (or a bad override
    value, naming the variable) and for a combination no build has (``"cpp"``
    for a CUDA op without a C++ kernel); ``RuntimeError`` when this build lacks
    what an explicit choice needs (the extension, its CUDA kernels, Triton).
    """
    spec = OPS[op]
    if backend not in spec.backends:
        raise ValueError(f"backend must be one of {spec.backends} for {op}, got {backend!r}")
    source = "backend"
    if backend == "auto":
        backend, source = _override(spec, device_type, env)
    if backend == "auto":
        return _auto(spec, op, device_type, build)
    _check_available(spec, op, device_type, backend, build, source)
    return Decision(backend)


def _override(spec: OpSpec, device_type: str, env: Mapping[str, str]) -> tuple[str, str]:
    if spec.env is not None and device_type == "cuda":
        value = env.get(spec.env)
        if value:
            if value not in _NAMED:
                raise ValueError(f"{spec.env} must be one of {_NAMED}, got {value!r}")
            return value, spec.env
    value = env.get(GENERAL_ENV)
    if value:
        if value not in _NAMED:
            raise ValueError(f"{GENERAL_ENV} must be one of {_NAMED}, got {value!r}")
        if value in spec.backends:
            return value, GENERAL_ENV
    return "auto", "backend"


def _auto(spec: OpSpec, op: str, device_type: str, build: Build) -> Decision:
    if device_type not in ("cpu", "cuda"):
        return Decision("reference", f"no compiled kernel for {device_type} tensors")
    chosen = registered(op, device_type, build)
    if chosen == "reference":
        return Decision("reference", *_why_reference(spec, device_type, build))
    if chosen == "cpp" and device_type == "cuda" and spec.autotune and build.has_triton:
        return Decision("tuned")
    return Decision(chosen)


def _why_reference(spec: OpSpec, device_type: str, build: Build) -> tuple[str, int]:
    if device_type == "cuda" and "triton" in spec.backends:
        return "triton is not installed", logging.WARNING
    if not build.has_c:
        return f"the compiled extension did not load ({build.load_error})", logging.INFO
    return "the extension was built without CUDA kernels (no nvcc)", logging.WARNING


def _check_available(spec: OpSpec, op: str, device_type: str, backend: str, build: Build, source: str) -> None:
    if backend == "cpp":
        if device_type == "cuda" and not spec.cuda_cpp:
            raise ValueError(f"{source}='cpp' runs on CPU tensors only ({op} has no CUDA C++ kernel); "
                             "the tensors are on cuda: use backend='triton' or 'auto'")
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"{source}='cpp': the C++ kernels take CPU or CUDA tensors, not {device_type}")
        if not build.has_c:
            raise RuntimeError(f"{source}='cpp' needs the compiled extension tts_kernels._C, which did not load: "
                               f"{build.load_error}")
        if device_type == "cuda" and not build.has_cuda_kernels:
            raise RuntimeError(f"{source}='cpp' on CUDA tensors needs the extension's CUDA kernels, and it was "
                               f"built without them (no nvcc); use backend='auto' for {op}")
    elif backend == "triton" and not build.has_triton:
        raise RuntimeError(f"{source}='triton' needs the triton package, which is not installed ({op})")


# ----------------------------------------------------------------------------- running a decision

_NOTED: set = set()
# (op, device type, backend asked) -> the backend resolve() chose: decided once.
_CHOSEN: dict[tuple[str, str, str], str] = {}


def _note_once(op: str, device_type: str, reason: str, level: int) -> None:
    key = (op, device_type, reason)
    if key not in _NOTED:
        _NOTED.add(key)
        _logger.log(level, "tts_kernels: %s on %s tensors runs the reference kernel: %s", op, device_type, reason)


def resolve(op: str, device_type: str, backend: str) -> str:
    """:func:`decide` for this install and ``os.environ``; logs a fallback once.

    Decided once per (op, device type, backend asked) and remembered: the flags
    and the environment are read at the first call. Deciding on every call
    costs a few microseconds (the environment lookups), a third of the Python
    cost of a small op. :func:`forget` makes the next call decide again.
    """
    chosen = _CHOSEN.get((op, device_type, backend))
    if chosen is not None:
        return chosen
    d = decide(op, device_type, backend, current_build(), os.environ)
    # No logging while dynamo traces (a logger call would break the graph); the
    # eager call before or after says it.
    if not torch.compiler.is_compiling():
        if d.fallback is not None:
            _note_once(op, device_type, d.fallback, d.level)
        _CHOSEN[(op, device_type, backend)] = d.backend
    return d.backend


def forget() -> None:
    """Drop the remembered choices (after changing the environment or the flags)."""
    _CHOSEN.clear()


def run(op: str, device_type: str, backend: str, *args):
    """Run ``backend`` (``"reference"``, ``"cpp"`` or ``"triton"``) on the op's schema arguments.

    Through ``torch.ops.tts.<op>`` whenever that is the kernel it dispatches to
    (always for ``"cpp"``), so torch.compile sees one op with a fake; directly
    otherwise (e.g. ``"reference"`` on CPU when the C++ kernel is registered).
    """
    if backend == "cpp" or _REGISTERED.get((op, device_type)) == backend:
        return getattr(torch.ops.tts, op)(*args)
    return kernel(op, backend)(*args)


def call(op: str, device_type: str, backend: str, *args):
    """:func:`resolve` then :func:`run` (for ops without a ``"tuned"`` choice)."""
    return run(op, device_type, resolve(op, device_type, backend), *args)


def kernel(op: str, backend: str) -> Callable:
    """The Python function of ``backend`` (``"reference"`` or ``"triton"``) for ``op``."""
    if backend == "reference":
        return REFERENCE[op]
    if backend == "triton":
        return _TRITON[op]
    raise ValueError(f"{op}: no Python function for backend {backend!r}")


def _triton_kernel(op: str) -> Callable:
    """``tts_kernels.triton.<op>.<op>_triton``, imported on the first call: importing
    tts_kernels never imports triton (slow, and absent on many CPU machines)."""

    def fn(*args):
        try:
            module = importlib.import_module(f"tts_kernels.triton.{op}")
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] != "triton":
                raise
            raise RuntimeError(f"tts::{op}: the Triton kernel needs the triton package, which is not installed"
                               ) from exc
        return getattr(module, f"{op}_triton")(*args)

    fn.__name__ = fn.__qualname__ = f"{op}_triton"
    return fn


_TRITON = {op: _triton_kernel(op) for op, spec in OPS.items() if "triton" in spec.backends}

# ----------------------------------------------------------------------------- CUDA registration

# (op, device type) -> the backend torch.ops.tts.<op> dispatches to, as registered
# at import. run() trusts this, not the flags, so a test that patches the flags
# to play another build never sends a call to a kernel that is not there.
_REGISTERED: dict[tuple[str, str], str | None] = {}
# op -> the Python function registered as its CUDA kernel (ops with a C++ one are absent).
CUDA_KERNELS: dict[str, Callable] = {}
_cuda_lib = None


def _noting(op: str, fn: Callable, reason: str, level: int) -> Callable:
    def ref_cuda(*args):
        _note_once(op, "cuda", reason, level)
        return fn(*args)

    ref_cuda.__name__ = ref_cuda.__qualname__ = f"{op}_cuda"
    return ref_cuda


def register_cuda_kernels() -> None:
    """Give every op a CUDA kernel: :func:`registered` for this build, as a Python
    kernel where the extension has no C++ one. Runs once, when this module is imported.

    Plain ``Library.impl`` rather than ``torch.library.triton_op``: the schemas
    are defined once (C++, or ``_ext``'s fallback) and ``triton_op`` would define
    its own; the cost is that torch.compile treats the op as opaque (the fake
    gives shapes) instead of inlining the Triton kernels.
    """
    global _cuda_lib
    if _cuda_lib is not None:
        return
    build = current_build()
    lib = torch.library.Library("tts", "IMPL")
    for op, spec in OPS.items():
        for device_type in ("cpu", "cuda"):
            _REGISTERED[(op, device_type)] = registered(op, device_type, build)
        chosen = _REGISTERED[(op, "cuda")]
        if chosen == "cpp":
            continue
        fn = kernel(op, chosen)
        if chosen == "reference":
            fn = _noting(op, fn, *_why_reference(spec, "cuda", build))
        lib.impl(op, fn, "CUDA")
        CUDA_KERNELS[op] = fn
    _cuda_lib = lib


register_cuda_kernels()
