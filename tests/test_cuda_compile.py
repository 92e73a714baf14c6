"""The CUDA kernels compile with nvcc on their own (no torch, no GPU needed).

The kernels take raw pointers and a stream (DESIGN.md), so they must build
without torch headers; this catches a broken .cu on machines without a GPU or
a CUDA build of torch. One architecture (Hopper, what setup.py targets by
default) keeps it quick; cuda_ops.cpp, which needs torch's CUDA headers, is
left to the real build.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

from source_list import listed_sources

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
# The nvcc flags of setup.py, plus the ones torch's CUDAExtension adds that can
# change what compiles (no implicit half/bfloat16 conversions).
FLAGS = [
    "-std=c++17", "-O3", "--use_fast_math", "-arch=sm_90a",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]


def cuda_sources():
    srcs = [path for kind, path in listed_sources() if kind == "cuda" and path.endswith(".cu")]
    assert srcs, "csrc/sources.txt lists no .cu file"
    return srcs


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_cu_files_compile(tmp_path):
    # Start every compile, then wait: the files build in parallel.
    procs = {}
    for src in cuda_sources():
        obj = tmp_path / (Path(src).stem + ".o")
        cmd = [NVCC, *FLAGS, "-I", str(ROOT / "csrc"), "-c", str(ROOT / src), "-o", str(obj)]
        procs[src] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failures = []
    for src, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures.append(f"{src}:\n{out}")
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
