"""PRM presets: incremental scoring (ours) against a full re-score per step (search-and-learn's way).

Models and tokenizers are built here, no downloads: for each preset a random model of its
architecture (Mistral causal LM for ``math-shepherd``, Llama for ``rlhflow``, a Qwen2 2-label token
classifier for ``qwen2.5-math-prm``, a Qwen2 1-label one (value head) for ``skywork-prm``) and a BPE
tokenizer trained on a small corpus with the special tokens and chat template that model family
uses: Metaspace (sentencepiece-style, BOS) for Mistral, byte-level for Llama 3 and Qwen2.

Peer: at every step of a search, score each candidate's whole text from scratch, as
search-and-learn's ``PRM.score`` does: render it, tokenize it, one right-padded forward of every
candidate, read the scores at the step positions. Ours: one :class:`~tts_kernels.models.HFPRM`
session, the question prefilled once and forked per candidate, one ``add_steps`` call per step
running only the new tokens. Both see the same candidates; every step's scores are compared before
timing (1e-4) and the step positions of the peer are found the way each model's reference code
finds them.
"""
from __future__ import annotations

import random
import string
import time

import torch

# Characters the generated steps use (the tokenizers' alphabet): printable ASCII and the Cyrillic of "ки".
ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n" + "ки"
WORDS = ["Step", "step", "We", "have", "so", "the", "answer", "is", "+", "-", "=", "x", "y", "12", "3.5",
         "\\boxed{4}", "Let", "then", "ки", "sum", "of", "and", "\n\n", "\n", " "]

LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")


def random_text(rng: random.Random, words: int) -> str:
    """Words and characters in a random mix: leading spaces, newlines, runs of punctuation."""
    out = []
    for _ in range(words):
        r = rng.random()
        if r < 0.6:
            out.append(rng.choice(WORDS))
        elif r < 0.9:
            out.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 5))))
        else:
            out.append(" " * rng.randint(1, 3))
        out.append(rng.choice([" ", " ", "", "\n"]))
    return "".join(out)


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [random_text(rng, 12) for _ in range(400)] + [" ки\n\n", "ки ки", "+ -", "Step 1: 2 + 3 = 5 ки"] * 20


def tokenizer_for(preset: str):
    """A fast tokenizer of the preset's model family, trained here on a small corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if preset == "math-shepherd":  # Mistral: sentencepiece-style BPE, BOS added, no chat template
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        # Newlines apart, as Mistral's vocabulary has no merge with them (they are byte tokens there).
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                     pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        special = ["<unk>", "<s>", "</s>"]
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False, initial_alphabet=list(ALPHABET) + ["▁"])
        tok.train_from_iterator(_corpus(), trainer)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                       pad_token="</s>")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if preset == "rlhflow":  # Llama 3: byte-level BPE, BOS added, chat template with trimmed contents
        special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    else:  # Qwen2: byte-level BPE, nothing added, ChatML template
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<extra_0>"] if preset == "qwen2.5-math-prm"
                                                                        else [])
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    if preset == "rlhflow":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>",
                                       pad_token="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN_TEMPLATE)
    if preset == "skywork-prm":
        kw["bos_token"] = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def model_for(preset: str, vocab_size: int, *, hidden: int = 32, layers: int = 2, seed: int = 0,
              deep_head: bool = False):
    """A random model of the preset's architecture (fp32, eval). ``deep_head``: Qwen's own PRM head
    layout (``score`` = Linear, ReLU, Linear), on a 2-label token classifier."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForTokenClassification)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0,
                  tie_word_embeddings=False)
    if preset == "math-shepherd":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif preset == "rlhflow":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForTokenClassification(Qwen2Config(**common, num_labels=2 if preset == "qwen2.5-math-prm" else 1))
        if deep_head:
            model.score = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                              torch.nn.Linear(hidden, 2))
    for p in model.parameters():  # larger weights than the default init, so scores spread over (0, 1)
        p.data.mul_(4.0 if p.dim() > 1 else 1.0)
    return model.eval()


def prm_for(preset: str, **kw):
    """``(HFPRM, tokenizer)`` of a random model of ``preset``."""
    from ..models.prm import HFPRM

    tok = tokenizer_for(preset)
    model = model_for(preset, len(tok), **kw)
    return HFPRM(model, tok, preset=preset), tok


@torch.no_grad()
def full_rescore(prm, question: str, candidates: list[list[str]]) -> list[list[float]]:
    """search-and-learn's way: each candidate's whole text rendered and tokenized from scratch, one
    right-padded forward of all of them, the scores read at every step's position."""
    fmt, tok, model = prm.format, prm.tokenizer, prm.model
    rows, where = [], []
    for steps in candidates:
        if fmt.whole_text:
            r = fmt.render(question, steps)
            enc = tok(r.text, add_special_tokens=fmt.add_special_tokens, return_offsets_mapping=True)
            ends = [e for _, e in enc.offset_mapping]
            rows.append(enc.input_ids)
            where.append([max(j for j, e in enumerate(ends) if e == b) for _, b in r.spans])
        else:
            ids, pos = list(fmt.prompt_ids(question)), []
            for s in fmt.step_ids(steps):
                ids += s
                pos.append(len(ids) - 1)
            rows.append(ids)
            where.append(pos)
    T = max(len(r) for r in rows)
    x = torch.full((len(rows), T), tok.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, r in enumerate(rows):
        x[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    dev = prm.device
    out = model(input_ids=x.to(dev), attention_mask=mask.to(dev))
    logits = out.logits.float()
    if fmt.head == "label_token":
        good, bad = fmt.labels
        p = torch.softmax(logits[..., [good, bad]], -1)[..., 0]
    elif fmt.head == "classifier":
        p = torch.softmax(logits, -1)[..., 1]
    else:
        p = torch.sigmoid(logits[..., 0])
    return [[float(p[i, j]) for j in pos] for i, pos in enumerate(where)]


def run(*, device="cpu", quick: bool = False, presets=None, steps=(8, 32), rounds: int = 3) -> list[dict]:
    """Per preset and step count: milliseconds for scoring ``N`` candidates step by step, ours against the
    full re-score per step; the scores of every step compared first."""
    presets = presets or ["math-shepherd", "rlhflow", "qwen2.5-math-prm", "skywork-prm"]
    N, words = (4, 4) if quick else (16, 8)
    hidden, layers = (32, 2) if quick else (256, 4)
    out = []
    for preset in presets:
        prm, tok = prm_for(preset, hidden=hidden, layers=layers)
        prm.model.to(device)
        rng = random.Random(1)
        question = random_text(rng, 24)
        for S in steps:
            cands = [[random_text(rng, words) + "\n\n" for _ in range(S - 1)] + [random_text(rng, words)]
                     for _ in range(N)]

            def ours():
                sess = prm.start([question], agg="min", rows=N, max_new_tokens=S * 4 * words)
                try:
                    sess.fork(torch.zeros(N, dtype=torch.long, device=prm.device))
                    got = [sess.add_steps([[c[k]] for c in cands])[:, 0].tolist() for k in range(S)]
                finally:
                    sess.free()
                return [[got[k][i] for k in range(S)] for i in range(N)]

            def peer():
                got = [full_rescore(prm, question, [c[: k + 1] for c in cands]) for k in range(S)]
                return [[got[k][i][k] for k in range(S)] for i in range(N)]

            a, b = torch.tensor(ours()), torch.tensor(peer())
            if not torch.allclose(a, b, atol=1e-4, rtol=0):
                raise AssertionError(f"{preset}: incremental scores differ from the full re-score "
                                     f"(max {float((a - b).abs().max()):.2e})")
            times = {"ours": [], "peer": []}
            for _ in range(rounds):
                for name, fn in (("ours", ours), ("peer", peer)):
                    t0 = time.perf_counter()
                    fn()
                    if prm.device.type == "cuda":
                        torch.cuda.synchronize()
                    times[name].append((time.perf_counter() - t0) * 1e3)
            o, p = sorted(times["ours"])[rounds // 2], sorted(times["peer"])[rounds // 2]
            out.append({"preset": preset, "steps": S, "candidates": N, "hidden": hidden, "layers": layers,
                        "peer_ms": p, "ours_ms": o, "ratio": p / o, "max_abs_diff": float((a - b).abs().max())})
    return out
