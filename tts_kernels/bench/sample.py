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


# ----------------------------------------------------------------------------- confidence statistics

STATS_K = 20  # DeepConf's token confidence over the top 20
STATS_ROWS = (16, 64)
# SmolLM2-135M's shape (config.json of HuggingFaceTB/SmolLM2-135M-Instruct): the decode step of a
# real 49152-token model without fetching it (random weights: the same GEMMs, the same time).
SMOLLM2_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)


def stats_case(R: int, V: int, temperature: float, *, top_p: float = 1.0, backend: str = "cpp", rounds: int = 7,
               iters: int = 10, device="cpu") -> dict:
    """``sample`` without and with ``stats_k=STATS_K`` on the same logits, timed alternately
    (:func:`~.timing.compare`: best-of-rounds medians)."""
    gen = torch.Generator(device="cpu").manual_seed(R * 7 + V)
    logits = (torch.randn(R, V, generator=gen) * SCALE).to(device)
    offset = torch.zeros((), dtype=torch.int64, device=device)
    kw = dict(temperature=temperature, top_p=top_p, seed=1234, offset=offset, backend=backend)
    without = lambda: sample(logits, **kw)  # noqa: E731
    with_stats = lambda: sample(logits, stats_k=STATS_K, **kw)  # noqa: E731
    a, b = without(), with_stats()
    if not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])):
        raise AssertionError(f"stats changed the draw at R={R} V={V} T={temperature}")
    res = compare(without, with_stats, device=device, rounds=rounds, iters=iters)
    return {"R": R, "V": V, "temperature": temperature, "top_p": top_p, "backend": backend,
            "without_ms": res["peer_ms"], "with_ms": res["ours_ms"], "ratio": res["ours_ms"] / res["peer_ms"],
            "overhead_ms": res["ours_ms"] - res["peer_ms"], "without_rounds_ms": res["peer_rounds_ms"],
            "with_rounds_ms": res["ours_rounds_ms"]}


def smollm2_shaped_policy(device="cpu"):
    """An :class:`~tts_kernels.models.HFPolicy` over a Llama of SmolLM2-135M's shape with random
    weights (the bundled tokenizer: its ids are valid tokens of the larger vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .. import bundled
    from ..models.policy import HFPolicy

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_CONFIG)).to(device).eval()
    return HFPolicy(model, bundled.load_tokenizer("policy-small"))


def decode_step_ms(policy, rows: int, *, steps: int = 12, warmup: int = 3) -> float:
    """Median ms of one ``PolicySession.decode`` (the model's forward for one token per row, on the
    paged cache) over ``rows`` rows of the bundled held-out prompts; tokens drawn by ``sample``."""
    import statistics
    import time

    from .. import bundled

    prompts = [policy.encode(p.prompt) for p in bundled.test_problems(rows)]
    sess = policy.start(prompts, max_new_tokens=steps + warmup + 2)
    dev = sess.logits.device
    times = []
    for i in range(warmup + steps):
        tokens, _ = sample(sess.logits, temperature=0.8, seed=0, offset=i)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        sess.decode(tokens)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    sess.free()
    return statistics.median(times)


def bundled_vocab_size() -> int:
    """The bundled policies' vocabulary (their ``config.json``)."""
    import json

    from .. import bundled

    return int(json.loads((bundled.path("policy-small") / "config.json").read_text())["vocab_size"])


def run_stats(rows=STATS_ROWS, temperatures=(0.8, 1.0), *, decode: bool = True, rounds: int = 7, iters: int = 10,
              device="cpu") -> list[dict]:
    """The C++ ``sample`` with and without statistics at the bundled vocabulary and SmolLM2's, and
    (``decode``) the overhead as a share of a decode step of a model with that vocabulary: the bundled
    small policy, and a SmolLM2-135M-shaped one. ``share = overhead / (decode + sample without)``."""
    from .. import bundled

    models = [(bundled_vocab_size(), "bundled policy-small", lambda: bundled.load_policy("small", device=device)),
              (SMOLLM2_CONFIG["vocab_size"], "SmolLM2-135M shape", lambda: smollm2_shaped_policy(device))]
    out = []
    for V, name, load in models:
        policy = load() if decode else None
        for R in rows:
            step = decode_step_ms(policy, R) if decode else None
            for T in temperatures:
                row = stats_case(R, V, T, rounds=rounds, iters=iters, device=device)
                row.update(model=name, decode_ms=step,
                           step_share_pct=100.0 * row["overhead_ms"] / (step + row["without_ms"]) if decode else None)
                out.append(row)
        del policy
    return out
