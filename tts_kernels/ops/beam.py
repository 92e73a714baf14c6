"""``beam_topk``: the fused beam-search expansion step.

Validation happens here (never reading device data, so it never syncs), then
``_dispatch`` picks the kernel: ``torch.ops.tts.beam_topk`` (CPU: C++; CUDA: the
C++ kernel, or the Triton one registered for CUDA when the extension has no CUDA
kernels), or, on CUDA with both, whichever was measured faster for that shape
class (``_autotune.py``).
"""
from __future__ import annotations

import torch

from . import _dispatch
from ._validate import check_same_device, check_tensor

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = _dispatch.OPS["beam_topk"].backends


def _validate(logits, beam_scores, num_candidates, temperature) -> int:
    check_tensor("logits", logits, ndim=2, dtypes=LOGIT_DTYPES)
    check_tensor("beam_scores", beam_scores, ndim=2, dtypes=(torch.float32,))
    check_same_device(logits=logits, beam_scores=beam_scores)
    B, K = beam_scores.shape
    R, V = logits.shape
    if K < 1 or B < 1:
        raise ValueError(f"beam_scores must have shape [B, K] with B, K >= 1, got {tuple(beam_scores.shape)}")
    if V < 1:
        raise ValueError(f"logits must have at least one column (vocabulary), got shape {tuple(logits.shape)}")
    if R != B * K:
        raise ValueError(
            f"logits has {R} rows but beam_scores {tuple(beam_scores.shape)} needs B*K = {B * K} rows"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not temperature > 0.0 or temperature == float("inf"):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    C = 2 * K if num_candidates is None else num_candidates
    if isinstance(C, bool) or not isinstance(C, int):
        raise TypeError(f"num_candidates must be an int, got {type(num_candidates).__name__}")
    if C < 1 or C > K * V:
        raise ValueError(f"num_candidates must be in [1, K*V] = [1, {K * V}], got {C}")
    return C


def beam_topk(
    logits: torch.Tensor,
    beam_scores: torch.Tensor,
    num_candidates: int | None = None,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused beam expansion: log-softmax + cumulative score + top-C over all beams.

    ``logits [B*K, V]`` (float32/float16/bfloat16; row ``b*K + j`` is beam ``j`` of
    batch item ``b``) and ``beam_scores [B, K]`` float32. Computes
    ``log_softmax(logits.float() / temperature) + beam_scores`` viewed as
    ``[B, K*V]`` and returns its top ``num_candidates`` (default ``2*K``) per batch
    item, sorted descending, as ``scores [B, C]`` float32, ``parents [B, C]`` int64
    (beam, ``0..K-1``) and ``tokens [B, C]`` int64 (``0..V-1``). Equal scores are
    ordered by flat index ``parent*V + token``. NaN logits are never selected; an
    all ``-inf`` row gives ``-inf`` scores.

    ``backend``: ``"auto"`` (default), ``"reference"``, ``"cpp"`` (the compiled
    kernel for the tensors' device) or ``"triton"`` (CUDA tensors, or CPU under
    ``TRITON_INTERPRET=1``); ``TTS_KERNELS_BEAM_BACKEND`` or ``TTS_KERNELS_BACKEND``
    replace ``"auto"`` (see ``tts_kernels/ops/_dispatch.py``).
    """
    C = _validate(logits, beam_scores, num_candidates, temperature)
    device_type = logits.device.type
    choice = _dispatch.resolve("beam_topk", device_type, backend)
    if choice == "tuned":
        from ._autotune import pick_cuda_backend

        choice = pick_cuda_backend(logits, beam_scores.shape[1], C)
    return _dispatch.run("beam_topk", device_type, choice, logits, beam_scores, C, float(temperature))
