"""KV fork and beam reorder: :class:`~tts_kernels.cache.PagedKVCache` against transformers' dense cache.

(a) ``beam_step``: one beam-search step's cache update, ``K`` beams of one prompt with
``T`` tokens of history. Peer (what ``generate()`` does with a ``DynamicCache``):
``reorder_cache`` (``index_select`` of every layer's keys and values) then ``update``
of every layer with the new token (``torch.cat``: another full copy). Ours:
``PagedKVCache.reorder`` (block-table rows) then one-token ``append`` on every layer.
Parents as in a typical step: each beam keeps its own history with probability 1/2,
else takes a random beam. Both caches grow by one token per call (a few dozen over a
run, against ``T`` >= 256). Bytes written: peer, the whole cache twice; ours, the new
tokens plus at most one copied block per beam (the copy-on-write tail; counted as a
full block for every block the step took from the pool, an upper bound).

(b) ``rollback``: particle Gibbs restarting ``K`` particles from a reference trajectory's prefix
of ``t`` of its ``T`` tokens. Peer: ``K`` copies of the prefix in a ``DynamicCache`` (slice and
copy every layer's keys and values, what a dense cache must do). Ours: ``fork`` the reference
``K`` times and ``truncate`` the copies to ``t`` (table rows and reference counts; a shared tail
block is copied only when a copy next appends), then ``free`` them so the next call starts alike.
Bytes: the peer's copies; ours writes no KV bytes, only block-table rows (``fork``, ``truncate`` and
``free`` each write ``K`` int64 rows of ``max_blocks`` entries; counted, the rest is smaller).

(c) ``best_of_n``: set-up of best-of-N on a small random Llama: prefill one prompt once
into a paged cache and fork it ``N`` times (shared blocks) against prefilling ``N``
copies into a ``DynamicCache`` (what ``generate(num_return_sequences=N)`` does). Bytes:
the keys and values written.
"""
from __future__ import annotations

import math

import torch

from ..cache import PagedKVCache
from .kv_reorder import beam_parents
from .timing import compare


def _row(op, shape, dtype, device, peer, res, peer_bytes, ours_bytes, **extra) -> dict:
    row = {"op": op, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
           "peer": peer, "peer_ms": res["peer_ms"], "ours_ms": res["ours_ms"], "ratio": res["ratio"],
           "gbs": ours_bytes / (res["ours_ms"] * 1e-3) / 1e9, "floor_pct": None, "peer_bytes": peer_bytes,
           "ours_bytes": ours_bytes, "bytes_ratio": peer_bytes / max(ours_bytes, 1)}
    row.update(extra)
    return row


def beam_step_case(T: int, *, K: int = 8, layers: int = 8, heads: int = 8, D: int = 64, block_size: int = 16,
                   dtype=torch.float32, device="cpu", rounds: int = 5, iters: int = 10) -> dict:
    from transformers import DynamicCache

    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    parents = beam_parents(1, K, 0.5, gen).to(device)
    new_k = [torch.randn(K, heads, 1, D, generator=gen).to(device, dtype) for _ in range(layers)]
    new_v = [torch.randn(K, heads, 1, D, generator=gen).to(device, dtype) for _ in range(layers)]
    calls = 2 * (3 + rounds * iters) + 8  # compare()'s warm-up and timed calls, plus the probe below

    # Peer: the K beams' histories in a DynamicCache (the prompt expanded K times, as generate() does).
    dense = DynamicCache()
    for layer in range(layers):
        k = torch.randn(1, heads, T, D, generator=gen).to(device, dtype)
        dense.update(k.expand(K, -1, -1, -1).contiguous(), k.expand(K, -1, -1, -1).contiguous(), layer)

    def peer():
        dense.reorder_cache(parents)
        for layer in range(layers):
            dense.update(new_k[layer], new_v[layer], layer)

    # Ours: the prompt once, forked to K beams (blocks shared), then the same steps.
    per_beam = math.ceil((T + calls) / block_size) + 1
    kv = PagedKVCache(layers, heads, D, num_blocks=math.ceil(T / block_size) + K * per_beam, block_size=block_size,
                      max_seqs=K + 1, max_seq_len=T + calls + block_size, dtype=dtype, device=device)
    root = kv.allocate(1)
    for layer in range(layers):
        k = torch.randn(1, heads, T, D, generator=gen).to(device, dtype)
        kv.append(layer, root, k, k)
    ids = kv.fork(root.repeat(K))
    kv.free(root)

    def ours():
        kv.reorder(ids, ids.index_select(0, parents))
        for layer in range(layers):
            kv.append(layer, ids, new_k[layer], new_v[layer])

    # Bytes: probe a few steps for the blocks a step takes (each may be a copied shared tail).
    taken = 0
    for _ in range(4):
        kv.reorder(ids, ids.index_select(0, parents))
        before = kv.num_free_blocks
        for layer in range(layers):
            kv.append(layer, ids, new_k[layer], new_v[layer])
        taken = max(taken, before - kv.num_free_blocks)
    peer()  # keep the two caches the same length
    res = compare(peer, ours, device=device, rounds=rounds, iters=iters)
    esize = torch.empty((), dtype=dtype).element_size()
    token_bytes = 2 * layers * heads * D * esize            # keys and values of one token, all layers
    peer_bytes = 2 * K * T * token_bytes                    # index_select copy + cat copy of the whole cache
    ours_bytes = K * token_bytes + taken * block_size * token_bytes
    shape = f"K={K} L={layers} H={heads} D={D} T={T} P={block_size}"
    return _row("kv_beam_step", shape, dtype, device, "DynamicCache.reorder_cache + update", res, peer_bytes,
                ours_bytes, blocks_per_step=taken, max_blocks_per_step=K)


def best_of_n_case(N: int = 64, prompt_len: int = 512, *, hidden: int = 256, layers: int = 4, vocab_size: int = 32000,
                   block_size: int = 16, device="cpu", rounds: int = 3, iters: int = 2) -> dict:
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from ..models.compat import ForwardArgs
    from ..models.hf_paged import PagedCache, use_paged_attention

    device = torch.device(device)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = use_paged_attention(LlamaForCausalLM(cfg).eval().to(device))
    ids = torch.randint(3, vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    first = PagedCache(model, batch_size=1, num_blocks=math.ceil(prompt_len / block_size) + 1, block_size=block_size,
                       max_seqs=N + 1)
    pool = first.kv
    first.free()
    out = {}
    fwd = ForwardArgs(model)  # the cache keyword this transformers version declares

    @torch.no_grad()
    def peer():
        cache = DynamicCache(config=model.config)
        out["peer"] = model(**fwd(cache, input_ids=ids.expand(N, -1), use_cache=True, logits_to_keep=1)).logits

    @torch.no_grad()
    def ours():
        cache = PagedCache(model, batch_size=1, kv=pool)
        logits = model(**fwd(cache, input_ids=ids, use_cache=True, logits_to_keep=1)).logits
        cache.repeat_interleave(N)  # N samples share the prompt's blocks
        out["ours"] = logits
        out["cache"] = cache

    ours()
    out["cache"].free()
    peer()
    torch.testing.assert_close(out["ours"].expand(N, -1, -1), out["peer"], rtol=1e-4, atol=1e-4)

    def ours_and_free():
        ours()
        out["cache"].free()

    res = compare(peer, ours_and_free, device=device, rounds=rounds, iters=iters, warmup=1)
    token_bytes = 2 * layers * cfg.num_key_value_heads * (hidden // cfg.num_attention_heads) * 4
    shape = f"N={N} prompt={prompt_len} llama h={hidden} layers={layers} V={vocab_size}"
    return _row("best_of_n_setup", shape, torch.float32, device, f"prefill {N} copies (DynamicCache)", res,
                N * prompt_len * token_bytes, prompt_len * token_bytes)


def rollback_case(T: int, *, K: int = 16, layers: int = 8, heads: int = 8, D: int = 64, block_size: int = 16,
                  dtype=torch.float32, device="cpu", rounds: int = 5, iters: int = 10) -> dict:
    from transformers import DynamicCache

    device = torch.device(device)
    gen = torch.Generator().manual_seed(1)
    t = T // 2 + 5  # the prefix kept: inside a block
    ref = [torch.randn(1, heads, T, D, generator=gen).to(device, dtype) for _ in range(layers)]

    def peer():
        dense = DynamicCache()
        for layer in range(layers):
            k = ref[layer][:, :, :t].expand(K, -1, -1, -1).contiguous()
            dense.update(k, k.clone(), layer)

    kv = PagedKVCache(layers, heads, D, num_blocks=math.ceil(T / block_size) + 1, block_size=block_size,
                      max_seqs=K + 1, max_seq_len=T, dtype=dtype, device=device)
    root = kv.allocate(1)
    for layer in range(layers):
        kv.append(layer, root, ref[layer], ref[layer])
    lens = torch.full((K,), t, dtype=torch.int64, device=device)

    def ours():
        ids = kv.fork(root.repeat(K))
        kv.truncate(ids, lens)
        kv.free(ids)

    res = compare(peer, ours, device=device, rounds=rounds, iters=iters)
    token_bytes = 2 * layers * heads * D * torch.empty((), dtype=dtype).element_size()
    shape = f"K={K} L={layers} H={heads} D={D} T={T} t={t} P={block_size}"
    table_bytes = 3 * K * math.ceil(kv.max_seq_len / block_size) * 8
    return _row("kv_rollback", shape, dtype, device, "K prefix copies in a DynamicCache", res, K * t * token_bytes,
                table_bytes)


def run(device="cpu", quick: bool = False, rounds: int | None = None, with_model: bool = True) -> list[dict]:
    """Rows for ``tts-kernels bench``: the beam step and the particle-Gibbs roll-back at T = 256, 1024,
    2048 and (``with_model``) the best-of-64 set-up. ``gbs``: the bytes we write / our time."""
    rounds = rounds or (3 if quick else 5)
    Ts = (256, 2048) if quick else (256, 1024, 2048)
    rows = [beam_step_case(T, device=device, rounds=rounds, iters=5 if quick else 10) for T in Ts]
    rows += [rollback_case(T, device=device, rounds=rounds, iters=5 if quick else 10) for T in Ts]
    if with_model:
        rows.append(best_of_n_case(prompt_len=128 if quick else 512, device=device, rounds=2 if quick else 3))
    return rows
