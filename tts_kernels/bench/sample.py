"""sample against the eager top-p sampling transformers runs in ``generate(do_sample=True)``.

Peer (``TemperatureLogitsWarper`` + ``TopPLogitsWarper`` + ``torch.multinomial``):
``logits.to(float32, copy=True) / T``, ascending ``sort``, ``softmax``,
``cumsum``, mask ``cumsum <= 1 - top_p`` (keeping the last), ``scatter`` back,
``masked_fill(-inf)``, ``softmax``, ``multinomial(1)``. Ours: one ``sample``
call with the same temperature and top_p. Floor: the logits read once;
bandwidth is reported against the measured copy bandwidth of the same device.
"""
from __future__ import annotations

import torch

from ..ops.sample import sample
from .timing import bench_row, compare, copy_bandwidth_gbs

CPU_SHAPES = [(8, 128256), (32, 152064)]
CUDA_SHAPES = CPU_SHAPES + [(256, 152064)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOP_P = 0.9
TEMPERATURE = 0.8
# Logits scale: randn * 4 puts the top-p = 0.9 boundary a few thousand tokens
# deep at V = 128k (LLM rows are usually more peaked; a narrower top-p set only
# helps us, since the eager sort costs the same whatever the logits).
SCALE = 4.0


def eager_top_p_sample(logits: torch.Tensor, top_p: float, temperature: float, generator=None) -> torch.Tensor:
    scores = logits.to(copy=True, dtype=torch.float32) / temperature
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - top_p)
    drop[:, -1:] = False  # always keep the most probable token
    scores = scores.masked_fill(drop.scatter(1, sorted_idx, drop), float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)


def bench_case(R: int, V: int, dtype: torch.dtype, device="cpu", backend="auto", rounds=5, iters=5,
               copy_gbs: float | None = None, top_p: float = TOP_P) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(R, V, generator=gen) * SCALE).to(device=device, dtype=dtype)
    offset = torch.zeros((), dtype=torch.int64, device=device)  # a device counter: no host value per call
    ours = lambda: sample(logits, temperature=TEMPERATURE, top_p=top_p, seed=1234, offset=offset,  # noqa: E731
                          backend=backend)
    peer = lambda: eager_top_p_sample(logits, top_p, TEMPERATURE)  # noqa: E731
    tokens, _ = ours()
    # Sanity: our tokens lie inside the peer's top-p set (same filter up to ties).
    x = logits.float() / TEMPERATURE
    chosen = x.gather(1, tokens.view(-1, 1)).squeeze(1)
    p = torch.softmax(x, -1)
    above = torch.where(x > chosen.view(-1, 1), p, torch.zeros_like(p)).sum(-1)
    if not bool((above < top_p + 1e-4).all()):
        raise AssertionError(f"sample chose a token outside the top-p set at {(R, V, dtype)}")
    res = compare(peer, ours, device=device, rounds=rounds, iters=iters)
    nbytes = logits.numel() * logits.element_size()
    copy_gbs = copy_gbs if copy_gbs is not None else copy_bandwidth_gbs(nbytes, device)
    op = f"sample top_p={top_p}" + ("" if backend == "auto" else f"[{backend}]")
    return bench_row(op, f"R={R} V={V}", dtype, device, "eager sort+cumsum+multinomial", res, nbytes, copy_gbs)


def run(device="cpu", shapes=None, dtypes=("fp32", "bf16"), backends=("auto",), rounds=5, iters=5) -> list[dict]:
    device = torch.device(device)
    shapes = shapes or (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    copy_gbs = copy_bandwidth_gbs(max(R * V for R, V in shapes) * 4, device)
    rows = []
    for R, V in shapes:
        for name in dtypes:
            for backend in backends:
                rows.append(bench_case(R, V, DTYPES[name], device, backend, rounds, iters, copy_gbs))
    return rows
