"""Likelihood verifier: :class:`~tts_kernels.models.HFPRM` ``head="likelihood"`` against the usual recipe.

Peer (what people do today to score candidates by a model's likelihood): one padded forward over every
full candidate (prompt + completion, ``N`` times per prompt), ``log_softmax`` over the whole vocabulary
at every position, gather each token's log-probability, then each step's prefix minimum. Ours:
``HFPRM(model, tok, head="likelihood").score(...)``: each prompt prefilled once and forked, only the
completions run, the LM head applied in row chunks and reduced on the device by
:func:`~tts_kernels.ops.prm.prefix_likelihood`. Same model, same candidates; the step scores are
compared before timing.

Model: a random Llama causal LM over a synthetic 32000-token word-level vocabulary
(:func:`tts_kernels.bench.best_of_n.make_tokenizer`); steps are separated by newlines (whitespace to
the tokenizer, so every step's last token is its end).
"""
from __future__ import annotations

import torch

from .best_of_n import make_models, make_tokenizer
from .timing import compare


def _candidates(P, N, prompt_len, steps, step_len, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = lambda k: " ".join(f"t{int(i)}" for i in torch.randint(4, vocab, (k,), generator=g))  # noqa: E731
    prompts = [words(prompt_len) for _ in range(P)]
    comps = [["\n".join(words(step_len) for _ in range(steps)) for _ in range(N)] for _ in range(P)]
    return prompts, comps


@torch.no_grad()
def peer_scores(model, tok, prompts, completions, device) -> list[list[list[float]]]:
    """Full forward per candidate, full-vocabulary log_softmax, gather, prefix min at every step end."""
    rows, meta = [], []
    for p, cs in zip(prompts, completions):
        p_ids = tok(p).input_ids
        for c in cs:
            ids, ends = list(p_ids), []
            for s in c.split("\n"):
                ids += tok(s, add_special_tokens=False).input_ids
                ends.append(len(ids) - 1)
            rows.append(ids)
            meta.append((len(p_ids), ends))
    T = max(len(r) for r in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    x, mask = x.to(device), mask.to(device)
    logp = model(input_ids=x, attention_mask=mask).logits.float().log_softmax(-1)
    tok_lp = logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]  # [B, T-1]: log p of token t+1
    out, i = [], 0
    for cs in completions:
        group = []
        for _ in cs:
            n0, ends = meta[i]
            run = tok_lp[i, n0 - 1:].cummin(0).values
            group.append([float(run[e - n0].exp()) for e in ends])
            i += 1
        out.append(group)
    return out


def run(*, device="cpu", quick=False, rounds=None, shapes=None) -> list[dict]:
    from ..models.prm import HFPRM

    device = torch.device(device)
    vocab = 8000 if quick else 32000
    hidden, layers = (64, 2) if quick else (256, 4)
    model, _ = make_models(hidden=hidden, layers=layers, vocab=vocab)
    model = model.to(device)
    tok = make_tokenizer(vocab)
    prm = HFPRM(model, tok, head="likelihood", reduce="min", step_delimiter="\n")
    shapes = shapes or ([(2, 4, 16, 3, 8)] if quick else [(2, 16, 64, 4, 16), (2, 64, 64, 4, 16), (4, 16, 192, 4, 16)])
    rows = []
    for P, N, prompt_len, steps, step_len in shapes:
        prompts, comps = _candidates(P, N, prompt_len, steps, step_len, vocab)
        ours = prm.score(prompts, comps)
        want = peer_scores(model, tok, prompts, comps, device)
        got = torch.tensor(ours.step_scores)
        if not torch.allclose(got, torch.tensor(want), rtol=1e-3, atol=1e-6):
            raise AssertionError(f"likelihood scores differ from the full-forward recipe at {(P, N)}")
        res = compare(lambda: peer_scores(model, tok, prompts, comps, device),  # noqa: B023
                      lambda: prm.score(prompts, comps),  # noqa: B023
                      device=device, rounds=rounds or (2 if quick else 3), iters=1, warmup=1)
        peer_tokens = N * sum(len(tok(p).input_ids) for p in prompts) + P * N * steps * step_len
        rows.append({"shape": f"P={P} N={N} prompt={prompt_len} steps={steps}x{step_len} V={vocab} h={hidden}",
                     "peer_ms": res["peer_ms"], "ours_ms": res["ours_ms"], "ratio": res["ratio"],
                     "peer_tokens": peer_tokens, "ours_tokens": ours.tokens})
    return rows
