"""Triton kernels (CUDA; on CPU tensors they run under ``TRITON_INTERPRET=1``).

Import the submodules lazily (``from tts_kernels.triton.beam_topk import ...``):
importing this package does not import ``triton``, so the rest of
``tts_kernels`` works where Triton is not installed.
"""
