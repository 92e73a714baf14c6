"""``sample``: one token per row with temperature, top-k, top-p and min-p, from
counter-based randomness (see :func:`tts_kernels.reference.sample_ref` for the meaning).

Validation happens here and never reads tensor data (so it never syncs): Python
numbers are range-checked; tensors are checked for dtype, shape and device, and
the kernels give every value a defined meaning (see ``sample_ref``). Then the
call goes to ``torch.ops.tts.sample``: the C++ kernel on CPU, the Triton kernel
registered for CUDA (``_dispatch.py``).

``stats_k >= 1`` adds the rows' confidence statistics: the op's optional ``stats``
argument (float32 ``[R, 3]``, allocated here) is written by the same kernel call, so
the op's outputs (and every caller of ``torch.ops.tts.sample``) stay as they were.
"""
from __future__ import annotations

import math

import torch

from . import _dispatch
from ._validate import check_tensor

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = _dispatch.OPS["sample"].backends
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _row_tensor(name: str, t: torch.Tensor, R: int, device, dtypes, cast: torch.dtype) -> torch.Tensor:
    check_tensor(name, t, dtypes=dtypes)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != R):
        raise ValueError(f"{name} must be a number, a 0-dim tensor or a [R] = [{R}] tensor, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits is on {device}; all arguments must be on the same device")
    return t if t.dtype == cast else t.to(cast)


def _number(name: str, v, kind: type, ok, rule: str):
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
        what = "a float" if kind is float else "an int"
        raise TypeError(f"{name} must be {what} or a tensor, got {type(v).__name__}")
    if not ok(v):
        raise ValueError(f"{name} must be {rule}, got {v}")
    return kind(v)


def _validate(logits, temperature, top_k, top_p, min_p, seed, offset):
    check_tensor("logits", logits, ndim=2, dtypes=LOGIT_DTYPES)
    R, V = logits.shape
    if V < 1:
        raise ValueError(f"logits must have at least one column (vocabulary), got shape {tuple(logits.shape)}")
    if R >= 2**32 or V >= 2**34:
        raise ValueError(f"logits shape {tuple(logits.shape)} is too large (R < 2**32 and V < 2**34)")
    dev = logits.device
    scalars, tensors = [], []
    specs = [
        ("temperature", temperature, float, lambda v: v >= 0 and math.isfinite(v), "finite and >= 0",
         _FLOATS, torch.float32, 1.0),
        ("top_k", top_k, int, lambda v: v >= 0, ">= 0 (0: no top-k)", _INTS, torch.int64, 0),
        ("top_p", top_p, float, lambda v: 0 < v <= 1, "in (0, 1]", _FLOATS, torch.float32, 1.0),
        ("min_p", min_p, float, lambda v: 0 <= v <= 1, "in [0, 1]", _FLOATS, torch.float32, 0.0),
        ("seed", seed, int, lambda v: _INT64_MIN <= v <= _INT64_MAX, "a 64-bit integer", (torch.int64,),
         torch.int64, 0),
        ("offset", offset, int, lambda v: _INT64_MIN <= v <= _INT64_MAX, "a 64-bit integer", (torch.int64,),
         torch.int64, 0),
    ]
    for name, v, kind, ok, rule, dtypes, cast, default in specs:
        if isinstance(v, torch.Tensor):
            tensors.append(_row_tensor(name, v, R, dev, dtypes, cast))
            scalars.append(default)
        else:
            tensors.append(None)
            scalars.append(_number(name, v, kind, ok, rule))
    return scalars, tensors


def sample(
    logits: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    seed: int | torch.Tensor,
    offset: int | torch.Tensor = 0,
    stream: torch.Tensor | None = None,
    backend: str = "auto",
    stats_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits [R, V]`` (float32/float16/bfloat16).

    Filters in transformers' order: ``temperature`` (0: greedy), ``top_k`` (0: off),
    ``top_p`` (1: off), ``min_p`` (0: off); each may be a number or a per-row
    tensor (0-dim or ``[R]``) on the logits' device. Randomness is counter-based
    (Philox): the same ``seed``, ``offset`` (Python ints or int64 tensors, 0-dim
    or ``[R]``) and inputs give the same tokens on every run and backend, and an
    ``offset`` tensor advanced on the device keeps a decode loop free of syncs.
    ``stream`` (optional int64 ``[R]``, values in ``[0, 2**32)``) is each row's place in
    the random stream, by default its row index: a row given the same ``seed``, ``offset``
    and ``stream`` draws the same uniforms wherever it sits in the batch, so a request's
    candidates keyed by (request seed, candidate number) do not depend on their batch-mates.

    Returns ``tokens [R]`` int64 and ``logprobs [R]`` float32: the log-probability
    of each token under the filtered, temperature-scaled, renormalised
    distribution (0 for greedy rows; a row without a finite logit gives token 0
    and -inf). Exact rules: :func:`tts_kernels.reference.sample_ref`.

    ``stats_k`` (int, default 0: off, and the call is unchanged): with ``stats_k >= 1``
    the call returns ``(tokens, logprobs, stats)``, ``stats [R, 3]`` float32 on the
    logits' device, computed by the same kernel while it reads the logits, from
    the full distribution at temperature 1, ``lp = log_softmax(logits.float(), -1)``
    (whatever the temperature, filters and the token drawn; the draw is the same as
    without it): ``stats[:, 0]`` token confidence ``-mean(top-k of lp)``, ``k =
    min(stats_k, V)`` (DeepConf); ``stats[:, 1]`` entropy ``-sum(p * lp)``;
    ``stats[:, 2]`` self-certainty ``-log(V) - mean(lp)`` = KL(uniform || p),
    +inf for a row with a -inf logit. A row with no finite logit gives NaN.
    Exact rules: :func:`tts_kernels.reference.sample_stats_ref`;
    :class:`tts_kernels.ops.confidence.SlidingWindow` averages them over a decode loop.

    ``backend``: ``"auto"`` (default: C++ on CPU, Triton on CUDA, the reference
    where those are missing, logged once), ``"reference"``, ``"cpp"`` (CPU C++) or
    ``"triton"`` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``);
    ``TTS_KERNELS_BACKEND`` replaces ``"auto"`` (``tts_kernels/ops/_dispatch.py``).
    """
    k = _check_stats_k(stats_k)
    scalars, tensors = _validate(logits, temperature, top_k, top_p, min_p, seed, offset)
    stream = _check_stream(stream, logits)
    if not k:
        return _dispatch.call("sample", logits.device.type, backend, logits, *scalars, *tensors, stream)
    stats = torch.empty((logits.shape[0], 3), dtype=torch.float32, device=logits.device)
    tokens, logprobs = _dispatch.call("sample", logits.device.type, backend, logits, *scalars, *tensors, stream,
                                      min(k, logits.shape[1]), stats)
    return tokens, logprobs, stats


def _check_stats_k(stats_k) -> int:
    if isinstance(stats_k, bool) or not isinstance(stats_k, int):
        raise TypeError(f"stats_k must be an int (0: no statistics), got {type(stats_k).__name__}")
    if stats_k < 0:
        raise ValueError(f"stats_k must be >= 0 (0: no statistics), got {stats_k}")
    return stats_k


def _check_stream(stream, logits):
    if stream is None:
        return None
    check_tensor("stream", stream, ndim=1)
    R = logits.shape[0]
    if stream.dtype not in _INTS or stream.shape[0] != R:
        raise ValueError(f"stream must be an integer tensor of shape [R={R}], got {stream.dtype} {tuple(stream.shape)}")
    if stream.device != logits.device:
        raise ValueError(f"stream is on {stream.device}, logits on {logits.device}")
    stream = stream.to(torch.int64)
    if stream.device.type == "cpu" and R and not bool(((stream >= 0) & (stream < 2**32)).all()):
        raise ValueError("stream values must be in [0, 2**32)")
    return stream
