"""Pick the faster CUDA backend of ``beam_topk`` (Triton or C++) per shape class.

A shape class is (device index, logits dtype, rows rounded up to a power of
two, V rounded up to a power of two, C). The first call in a class times both
backends on the caller's logits (a few warm-up runs, then the median of timed
runs between CUDA events) and remembers the faster one for the process.

That first call synchronises with the device once (to read the events), and
runs the op about 2 * (_WARMUP + _RUNS) extra times; every later call in the
class is a dictionary lookup. Inside CUDA-graph capture or torch.compile
tracing nothing is timed: an unseen class gets the C++ kernel.

``TTS_KERNELS_BEAM_BACKEND=triton|cpp`` skips all of this (read in ops/_dispatch.py).
"""
from __future__ import annotations

import statistics
import warnings

import torch

_WARMUP = 3
_RUNS = 10
_CHOICES: dict[tuple, str] = {}


def _pow2_bucket(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _shape_class(logits: torch.Tensor, C: int) -> tuple:
    R, V = logits.shape
    index = logits.device.index if logits.device.index is not None else torch.cuda.current_device()
    return (index, logits.dtype, _pow2_bucket(R), _pow2_bucket(V), int(C))


def _record_runs(fn) -> list:
    """Warm-up runs (the first one compiles, for Triton), then timed runs between events."""
    for _ in range(_WARMUP):
        fn()
    events = []
    for _ in range(_RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    return events


def _time_backends(logits: torch.Tensor, K: int, C: int) -> str:
    from ._dispatch import kernel

    B = logits.shape[0] // K
    beam_scores = torch.zeros(B, K, device=logits.device, dtype=torch.float32)
    runs = {"cpp": _record_runs(lambda: torch.ops.tts.beam_topk(logits, beam_scores, C, 1.0))}
    try:
        triton_fn = kernel("beam_topk", "triton")
        runs["triton"] = _record_runs(lambda: triton_fn(logits, beam_scores, C, 1.0))
    except Exception as exc:  # Triton failed to import or compile here: not a candidate
        warnings.warn(f"beam_topk: Triton backend unavailable ({type(exc).__name__}: {exc}); using C++",
                      RuntimeWarning, stacklevel=4)
    torch.cuda.synchronize(logits.device)  # the one host sync of a new shape class
    ms = {name: statistics.median(s.elapsed_time(e) for s, e in ev) for name, ev in runs.items()}
    return min(ms, key=ms.get)


def pick_cuda_backend(logits: torch.Tensor, K: int, C: int) -> str:
    """``"triton"`` or ``"cpp"``: the backend measured faster for this shape class.

    Called by ``beam_topk`` only when both exist (``_dispatch`` decided ``"tuned"``).
    """
    key = _shape_class(logits, C)
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        # Timing would sync (illegal while capturing) or run on fake tensors.
        return "cpp"
    choice = _time_backends(logits, K, C)
    _CHOICES[key] = choice
    return choice
