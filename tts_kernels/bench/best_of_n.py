"""Best-of-N end to end: ``search.best_of_n`` against the usual transformers recipe.

Peer (what people do today): ``generate(do_sample=True, num_return_sequences=N)``
(the prompt is expanded N times and prefilled N times; top-p sorts ``[N, V]`` every
step), then one PRM forward over every full candidate (prompt + completion, N times
per prompt), reading the step-end scores. Ours: :func:`tts_kernels.search.best_of_n`
(prompt prefilled once and forked; fused sampling; the PRM prefills the prompt once
and runs only the completions). Same models, same sampling settings, same PRM head.

Models: a random Llama policy and a random Llama token-classification PRM over a
synthetic 32000-token word-level vocabulary (``t4 .. t31999``; words round-trip
through the tokenizer, so the PRM reads exactly the sampled tokens). Random models
never emit EOS, so every candidate is ``max_new_tokens`` long on both sides and the
token counts are exact. The two sides draw different random samples (different
RNGs), so their outputs are not compared; ``tests/test_best_of_n.py`` checks ours
token for token against a dense loop and greedy against ``generate()``.
"""
from __future__ import annotations

import statistics
import time
import warnings

import torch

from ..search.best_of_n import best_of_n
from .timing import _sync

VOCAB = 32000


def make_tokenizer(vocab: int = VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    words.update({f"t{i}": i for i in range(4, vocab)})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_models(hidden: int = 256, layers: int = 4, vocab: int = VOCAB, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

    cfg = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    torch.manual_seed(seed + 1)
    prm = LlamaForTokenClassification(LlamaConfig(num_labels=2, **cfg)).eval()
    return policy, prm


def _peer(policy_model, prm_model, tok, prompt_ids, n, max_new, temperature, top_p):
    """generate(num_return_sequences=n) + one PRM forward per full candidate; returns (scores, tokens run)."""
    x = torch.tensor(prompt_ids)
    with torch.no_grad():
        out = policy_model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=temperature,
                                    top_p=top_p, top_k=0, num_return_sequences=n, max_new_tokens=max_new,
                                    pad_token_id=0, eos_token_id=None)
        # The PRM reads each candidate's last token (one step: random models make no separators).
        logits = prm_model(out).logits[:, -1]
        scores = torch.softmax(logits.float(), -1)[:, 1]
    P, L = x.shape
    gen_tokens = P * n * L + P * n * (max_new - 1)  # prefill of n copies, then one token per row per step
    return scores, gen_tokens, out.numel()


def run(device="cpu", quick: bool = False, *, n_values=(16, 64), prompt_len: int = 256, max_new_tokens: int = 32,
        hidden: int = 256, layers: int = 4, rounds: int | None = None, temperature: float = 1.0,
        top_p: float = 0.9) -> list[dict]:
    """One row per N: median seconds of the peer and of ours (best round), tokens processed by each."""
    from transformers.utils import logging as hf_logging

    from ..models.policy import HFPolicy
    from ..models.prm import HFPRM

    if quick:
        n_values, prompt_len, max_new_tokens, hidden, layers = (8,), 64, 8, 128, 2
    rounds = rounds or (1 if quick else 3)
    tok = make_tokenizer()
    policy_model, prm_model = make_models(hidden, layers)
    policy_model, prm_model = policy_model.to(device), prm_model.to(device)
    policy = HFPolicy(policy_model, tok, eos_token_ids=[])
    prm = HFPRM(prm_model, tok, head="classifier")
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(4, VOCAB, (1, prompt_len), generator=gen).tolist()
    prompt_text = [tok.decode(prompt_ids[0])]
    assert tok(prompt_text[0]).input_ids == prompt_ids[0]
    rows = []
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for n in n_values:
                res = {}

                def peer():
                    res["peer"] = _peer(policy_model, prm_model, tok, prompt_ids, n, max_new_tokens, temperature,
                                        top_p)

                def ours():
                    res["ours"] = best_of_n(policy, prm, prompt_text, n=n, max_new_tokens=max_new_tokens,
                                            temperature=temperature, top_p=top_p, seed=0)

                times = {"peer": [], "ours": []}
                peer(), ours()  # warm-up
                for _ in range(rounds):
                    for name, fn in (("peer", peer), ("ours", ours)):
                        _sync(torch.device(device))
                        t0 = time.perf_counter()
                        fn()
                        _sync(torch.device(device))
                        times[name].append((time.perf_counter() - t0) * 1e3)
                r = res["ours"]
                assert all(len(c.token_ids) == max_new_tokens for c in r.candidates[0])
                _, peer_policy_tokens, peer_prm_tokens = res["peer"]
                peer_ms, ours_ms = min(times["peer"]), min(times["ours"])
                rows.append({
                    "op": "best_of_n",
                    "shape": f"N={n} prompt={prompt_len} new={max_new_tokens} V={VOCAB} h={hidden} L={layers}",
                    "dtype": "float32", "device": str(device),
                    "peer": "generate(num_return_sequences=N) + PRM forward per candidate",
                    "peer_ms": peer_ms, "ours_ms": ours_ms, "ratio": peer_ms / ours_ms,
                    "gbs": None, "floor_pct": None,
                    "peer_tokens": {"policy": peer_policy_tokens, "prm": peer_prm_tokens},
                    "ours_tokens": {"policy": r.info["policy_forward_tokens"], "prm": r.compute.prm_tokens},
                    "rounds_ms": times,
                    "median_ms": {k: statistics.median(v) for k, v in times.items()},
                })
    finally:
        hf_logging.set_verbosity(verbosity)
    return rows
