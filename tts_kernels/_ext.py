"""Loads the compiled extension ``tts_kernels._C`` (which registers ``torch.ops.tts.*``).

When it cannot be loaded the same op schemas are defined here in Python with the
plain-PyTorch references as their kernels, so every public function still returns
correct results (slowly); one warning says so.

Either way the schemas are defined once, here or in C++. The CUDA kernels that
the build lacks (all of them without nvcc; ``sample`` and ``paged_attention``
always) are registered from Python by ``ops/_dispatch.py`` on import of
``tts_kernels.ops``, from the flags below.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

# The op schemas.  The C++ side defines them in csrc/registration.cpp; this copy
# is used only when the extension is missing, and tests/test_build.py checks the
# two agree.
SCHEMAS = {
    "beam_topk": "beam_topk(Tensor logits, Tensor beam_scores, int num_candidates, float temperature)"
    " -> (Tensor scores, Tensor parents, Tensor tokens)",
    "kv_reorder_": "kv_reorder_(Tensor(a!)[] caches, Tensor parents) -> ()",
    "sample": "sample(Tensor logits, float temperature, int top_k, float top_p, float min_p, int seed, int offset,"
    " Tensor? temperatures, Tensor? top_ks, Tensor? top_ps, Tensor? min_ps, Tensor? seeds, Tensor? offsets,"
    " Tensor? streams=None, int stats_k=0, Tensor(a!)? stats=None) -> (Tensor tokens, Tensor logprobs)",
    # PagedKVCache bookkeeping; without the extension the cache uses its tensor-op backend instead.
    "paged_fork_": "paged_fork_(Tensor(a!)[] state, Tensor parents, Tensor new_ids) -> int",
    "paged_reorder_": "paged_reorder_(Tensor(a!)[] state, Tensor ids, Tensor parents) -> int",
    "paged_free_": "paged_free_(Tensor(a!)[] state, Tensor ids) -> int",
    "paged_begin_step_": "paged_begin_step_(Tensor(a!)[] state, Tensor(b!) k_pool, Tensor(c!) v_pool, Tensor ids,"
    " Tensor? start, int t, int max_seq_len) -> (Tensor blk, Tensor slot, int err)",
    "paged_attention": "paged_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables,"
    " Tensor seq_lens, float scale, int? sliding_window, Tensor? prefix_lens) -> Tensor",
}

TORCH_MIN = (2, 13)  # the oldest torch the extension has been built and tested against (setup.py: torch>=2.13)


def version_tuple(text: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string (``"2.13.0+cpu"`` -> ``(2, 13)``; ``"5.20.0.dev0"`` -> ``(5, 20)``)."""
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in text.split("+")[0].split(".")[:2]]
    return tuple(parts + [0] * (2 - len(parts)))


def check_torch(version: str | None = None) -> None:
    """Warn (once, at import) when torch is older than the tested range. A warning, not an error:
    the GPU machines that run benchmarks/gpu_check.sh have an older torch and no way to upgrade."""
    version = version or torch.__version__
    if version_tuple(version) < TORCH_MIN:
        warnings.warn(f"tts_kernels is built and tested with torch >={TORCH_MIN[0]}.{TORCH_MIN[1]}; found {version} "
                      "(untested: expect build or behaviour differences)", RuntimeWarning, stacklevel=3)


check_torch()

HAS_C = False
HAS_CUDA_KERNELS = False
LOAD_ERROR: str | None = None
_fallback_lib = None


def _find_triton() -> bool:
    """Whether triton can be imported, found without importing it (that takes seconds)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a parent package fails, or a stub in sys.modules has no spec
        return False


HAS_TRITON = _find_triton()


def _define_fallback() -> None:
    global _fallback_lib
    from . import reference

    lib = torch.library.Library("tts", "DEF")
    for schema in SCHEMAS.values():
        lib.define(schema)
    lib.impl("beam_topk", reference.beam_topk_ref, "CompositeExplicitAutograd")
    lib.impl("kv_reorder_", reference.kv_reorder_ref, "CompositeExplicitAutograd")
    lib.impl("sample", reference.sample_op_ref, "CompositeExplicitAutograd")
    lib.impl("paged_attention", reference.paged_attention_ref, "CompositeExplicitAutograd")
    _fallback_lib = lib


def _load() -> None:
    global HAS_C, HAS_CUDA_KERNELS, LOAD_ERROR
    if os.environ.get("TTS_KERNELS_NO_EXT") == "1":
        LOAD_ERROR = "disabled by TTS_KERNELS_NO_EXT=1"
    else:
        try:
            from . import _C  # noqa: F401  (registers torch.ops.tts.*)

            HAS_C = True
            HAS_CUDA_KERNELS = bool(_C.has_cuda_kernels())
            return
        except (ImportError, OSError) as exc:  # pragma: no cover - exercised by test_build
            LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "tts_kernels: compiled extension not available "
        f"({LOAD_ERROR}); using the plain-PyTorch reference kernels (correct but slow). "
        "Rebuild with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=3,
    )
    _define_fallback()


_load()
