"""Train the bundled models: ``python -m tts_kernels.bundled.train [--out DIR] [--seed 0]``.

Builds, in order (about 30 minutes on 2 CPU cores with the defaults; see ``--help``):

1. **Tokenizer**: byte-level BPE (``tokenizers``) on generated problems, digits kept one
   per token, a blank line always one token; saved as a transformers fast tokenizer
   (``AutoTokenizer.from_pretrained``) in every model folder.
2. **policy-small** (3 layers) and **policy-large** (4 layers, more steps): transformers
   Llama causal LMs trained on reference solutions of :mod:`~tts_kernels.bundled.arith`
   train problems (loss on the solution tokens only). The small one is trained briefly on
   purpose: right often but far from always at greedy decoding, so search has room to
   help. (Arithmetic is learnt in a sudden jump somewhere between ~700 and ~1000 steps at
   these sizes; a wider 256-unit model at 1200 steps had not made it yet, hence the shapes.)
3. **policy-think**: policy-small with ``<think>``/``</think>`` added, fine-tuned on solutions that think
   first (:func:`~tts_kernels.bundled.arith.thinking_solution`: equations with slips, sometimes a
   ``Wait`` and a check pass that finds and fixes the first slip, then the clean answer; the slips
   themselves get no loss). ``--think-only`` trains just this one from the saved policy-small.
4. **prm**: a verifier that continues policy-large as a causal LM (same shape, initialised from it),
   trained further on solutions *sampled* from policy-small (``tts_kernels``' own batched sampler) plus
   reference solutions: a sample's tokens are targets up to its first token that leaves the reference
   solution; there the reference's token is the target and the sample's token gets an unlikelihood term
   (``-log(1 - p)``); nothing after it is trained (:func:`verifier_example`). It reads steps as the
   likelihood verifier does (a step scores ``exp`` of the lowest token log-probability of its prefix;
   ``bundled.load_prm``), so it is a process verifier trained on the small policy's own mistakes:
   labels come from the reference solution, never by hand. (Token classifiers trained on step labels
   did not learn to check arithmetic in these budgets; ``benchmarks/RESULTS.md`` lists what was tried.)

Each folder holds ``config.json``, ``model.safetensors`` (weights stored in bfloat16:
``from_pretrained(..., dtype=torch.float32)`` widens them), the tokenizer files and a
``training.json`` with the settings, seed, final losses and time. Same seed, same
machine type: same weights (one process, ``torch.manual_seed``, deterministic data).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from . import arith
from ..models.text import split_steps

BUNDLED = Path(__file__).resolve().parent / "weights"

# Model shapes: (hidden, intermediate, layers, heads). Small enough to train on 2 CPU cores.
SHAPES = {"policy-small": (128, 352, 3, 4), "policy-large": (128, 352, 4, 4)}
VOCAB_SIZE = 512
MAX_POSITIONS = 256


def build_tokenizer(texts):
    """Byte-level BPE with digits split one per token and ``"\\n\\n"`` isolated; BOS added by the
    post-processor for ``add_special_tokens=True``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n\n"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=MAX_POSITIONS)


def llama_config(tokenizer, shape, **kw):
    from transformers import LlamaConfig

    h, inter, layers, heads = shape
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=MAX_POSITIONS,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kw)


def policy_example(tokenizer, problem) -> tuple[list[int], list[int]]:
    """Token ids and per-position targets (-100: no loss) of ``prompt + solution + EOS``. The prompt and
    the solution are tokenized apart, as a search sees them (prompt prefilled, solution generated)."""
    prompt = tokenizer(problem.prompt).input_ids
    sol = tokenizer(problem.solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = prompt + sol
    return ids, [-100] * len(prompt) + sol


THINK_TOKENS = ("<think>", arith.THINK_END)  # added to the shared tokenizer for policy-think
THINK_POSITIONS = 640
THINK_TRAIN_LEN = 300  # training examples longer than this (a few level-5 ones with two check passes) are left out


def think_tokenizer(tokenizer):
    """The bundled tokenizer plus the thinking span's two markers, as ordinary added tokens (kept in decoded
    text: the search reads the thinking too)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(list(THINK_TOKENS))
    tok.model_max_length = THINK_POSITIONS
    return tok


def think_example(tokenizer, problem, rng: random.Random) -> tuple[list[int], list[int]]:
    """``thinking_prompt + thinking_solution + EOS`` with targets on the solution, except the tokens of
    its slips (:func:`~tts_kernels.bundled.arith.thinking_solution`)."""
    prompt = tokenizer(arith.thinking_prompt(problem)).input_ids
    text, spans = arith.thinking_solution(problem, rng)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    sol = list(enc.input_ids) + [tokenizer.eos_token_id]
    keep = [not any(a < e and s < b for a, b in spans) for s, e in enc.offset_mapping] + [True]
    return prompt + sol, [-100] * len(prompt) + [t if k else -100 for t, k in zip(sol, keep)]


def train_think(small, tokenizer, problems, *, steps: int, batch_size: int, lr: float, seed: int):
    """policy-think: policy-small (it already adds and subtracts) with the thinking markers added,
    fine-tuned on thinking solutions."""
    import copy

    tok = think_tokenizer(tokenizer)
    model = copy.deepcopy(small)
    model.resize_token_embeddings(len(tok))
    model.config.max_position_embeddings = THINK_POSITIONS
    rng = random.Random(seed)
    examples = [think_example(tok, p, rng) for p in problems]
    examples = [e for e in examples if len(e[0]) <= THINK_TRAIN_LEN]  # the longest few cost the most padding
    loss = train_loop(model, examples, steps=steps, batch_size=batch_size, lr=lr, pad_id=tok.pad_token_id,
                      seed=seed + 2, causal=True, desc="policy-think")
    return model, tok, loss


def verifier_example(tokenizer, problem, text: str) -> tuple[list[int], list[int], list[int]]:
    """A sampled solution as a likelihood verifier reads it (prompt with BOS, each step tokenized alone, as
    :class:`~tts_kernels.models.HFPRM` feeds a causal LM), with ``(ids, targets, wrong)``: ``targets`` are the
    sample's own tokens up to its first token that leaves the reference solution, where the target is the
    reference's token instead (the correction) and ``wrong`` holds the sample's token (to be made unlikely);
    the example ends there (nothing after it is trained). A sample that stays on the reference is all
    targets."""
    def encode(steps):
        ids = tokenizer(problem.prompt).input_ids
        n = len(ids)
        if steps:
            for t in tokenizer(steps, add_special_tokens=False).input_ids:
                ids = ids + t
        return ids, n

    ids, n = encode(split_steps(text, arith.STEP_DELIMITER))
    ref, _ = encode(split_steps(problem.solution, arith.STEP_DELIMITER))
    ref = ref + [tokenizer.eos_token_id]
    targets, wrong = [-100] * n + ids[n:], [-100] * len(ids)
    for t in range(n, len(ids)):
        if ids[t] != ref[t]:
            targets[t], wrong[t] = ref[t], ids[t]
            # Cut after it: nothing later is trained, and a causal LM's earlier positions never see it.
            return ids[: t + 1], targets[: t + 1], wrong[: t + 1]
    return ids, targets, wrong


def _batch(examples, pad_id):
    width = max(len(e[0]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    tgt = torch.full((len(examples), width), -100, dtype=torch.long)
    wrong = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        x, y = e[0], e[1]
        ids[i, : len(x)] = torch.tensor(x)
        tgt[i, : len(y)] = torch.tensor(y)
        if len(e) > 2:
            wrong[i, : len(e[2])] = torch.tensor(e[2])
        mask[i, : len(x)] = 1
    return ids, tgt, wrong, mask


def train_loop(model, examples, *, steps: int, batch_size: int, lr: float, pad_id: int, seed: int, causal: bool,
               log_every: int = 50, desc: str = "", unlikelihood: float = 0.0) -> float:
    """AdamW, linear warm-up then cosine decay; returns the mean loss of the last ``log_every`` steps.
    Causal LMs predict ``targets[t + 1]`` from position ``t`` (targets are aligned with the ids).
    Examples are ``(ids, targets)`` or ``(ids, targets, wrong)``: with ``unlikelihood > 0`` each ``wrong``
    token adds ``unlikelihood * -log(1 - p(wrong))`` (per wrong token, over the batch's target tokens)."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    recent, t0 = [], time.perf_counter()
    for step in range(steps):
        ids, tgt, wrong, mask = _batch(rng.sample(examples, batch_size), pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits
        if causal:
            logits, tgt, wrong = logits[:, :-1], tgt[:, 1:], wrong[:, 1:]
        logits = logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                 ignore_index=-100)
        if unlikelihood > 0 and bool((wrong >= 0).any()):
            at = wrong >= 0
            lp = logits[at].log_softmax(-1).gather(-1, wrong[at][:, None]).squeeze(-1)
            ul = -torch.log1p(-lp.exp().clamp(max=1 - 1e-6))
            loss = loss + unlikelihood * ul.sum() / (tgt >= 0).sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-log_every:]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"  {desc} step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    return sum(recent) / len(recent)


def save(model, tokenizer, path: Path, info: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(path)
    (path / "training.json").write_text(json.dumps(info, indent=1) + "\n")


@torch.no_grad()
def sampled_verifier_data(policy_model, tokenizer, problems, *, samples: int, temperature: float, seed: int,
                          max_new_tokens: int):
    """:func:`verifier_example` of ``samples`` sampled solutions per problem (``tts_kernels``' own batched
    sampler), and the share of them that leave the reference somewhere."""
    from ..models.policy import HFPolicy
    from . import sample_texts

    texts = sample_texts(HFPolicy(policy_model, tokenizer), problems, samples, temperature=temperature, seed=seed,
                         chunk=64, max_new_tokens=max_new_tokens)
    out = [verifier_example(tokenizer, p, t) for p, row in zip(problems, texts) for t in row]
    return out, sum(any(w >= 0 for w in e[2]) for e in out) / max(len(out), 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tts_kernels.bundled.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(BUNDLED), help="where the model folders go (default: the package's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-problems", type=int, default=40000)
    ap.add_argument("--small-steps", type=int, default=750)
    ap.add_argument("--large-steps", type=int, default=1100)
    ap.add_argument("--prm-steps", type=int, default=600)
    ap.add_argument("--prm-problems", type=int, default=2048,
                    help="train problems whose sampled solutions train the PRM (as many again give reference solutions)")
    ap.add_argument("--prm-samples", type=int, default=4, help="sampled solutions per PRM problem")
    ap.add_argument("--prm-lr", type=float, default=2e-3)
    ap.add_argument("--prm-unlikelihood", type=float, default=1.0,
                    help="weight of the unlikelihood term on each sample's first wrong token")
    ap.add_argument("--think-steps", type=int, default=1200)
    ap.add_argument("--think-batch-size", type=int, default=32)
    ap.add_argument("--think-problems", type=int, default=20000)
    ap.add_argument("--think-lr", type=float, default=2e-3)
    ap.add_argument("--think-only", action="store_true",
                    help="train only policy-think, from the policy-small already in --out")
    ap.add_argument("--prm-only", action="store_true",
                    help="train only the PRM, from the policies already in --out (saved weights are what the full "
                         "run holds in memory too: save() rounds them to bfloat16 in place)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    out = Path(args.out)
    t_start = time.perf_counter()
    problems = arith.generate(args.train_problems, seed=args.seed, split="train")
    tokenizer = build_tokenizer([p.prompt + p.solution for p in problems])
    print(f"tokenizer: {len(tokenizer)} tokens", flush=True)
    examples = [policy_example(tokenizer, p) for p in problems]
    common = dict(seed=args.seed, train_problems=args.train_problems, batch_size=args.batch_size,
                  torch=torch.__version__, threads=torch.get_num_threads())

    models = {}
    if args.think_only:
        from transformers import AutoTokenizer

        small = LlamaForCausalLM.from_pretrained(out / "policy-small", dtype=torch.float32).eval()
        _think(args, small, AutoTokenizer.from_pretrained(out / "policy-small"), problems, out, common)
        return 0
    if args.prm_only:
        for name in ("policy-small", "policy-large"):
            models[name] = LlamaForCausalLM.from_pretrained(out / name, dtype=torch.float32).eval()
    for name, steps, lr in (("policy-small", args.small_steps, 3e-3), ("policy-large", args.large_steps, 3e-3)):
        if args.prm_only:
            break
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(llama_config(tokenizer, SHAPES[name], attn_implementation="sdpa"))
        loss = train_loop(model, examples, steps=steps, batch_size=args.batch_size, lr=lr,
                          pad_id=tokenizer.pad_token_id, seed=args.seed, causal=True, desc=name)
        models[name] = model
        save(model, tokenizer, out / name, dict(common, shape=SHAPES[name], steps=steps, lr=lr, final_loss=loss,
                                                 seconds=round(time.perf_counter() - t0, 1)))
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, loss {loss:.4f}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

    t0 = time.perf_counter()
    data, wrong_frac = sampled_verifier_data(models["policy-small"], tokenizer, problems[: args.prm_problems],
                                             samples=args.prm_samples, temperature=1.0, seed=args.seed,
                                             max_new_tokens=96)
    ref = [verifier_example(tokenizer, p, p.solution) for p in problems[args.prm_problems: 2 * args.prm_problems]]
    print(f"prm data: {len(data)} sampled solutions ({wrong_frac:.0%} leave the reference) + {len(ref)} reference "
          f"solutions, {time.perf_counter() - t0:.0f} s", flush=True)
    import copy

    torch.manual_seed(args.seed)
    prm = copy.deepcopy(models["policy-large"])
    loss = train_loop(prm, data + ref, steps=args.prm_steps, batch_size=args.batch_size, lr=args.prm_lr,
                      pad_id=tokenizer.pad_token_id, seed=args.seed + 1, causal=True, desc="prm",
                      unlikelihood=args.prm_unlikelihood)
    save(prm, tokenizer, out / "prm", dict(common, shape=SHAPES["policy-large"], init="policy-large",
                                           steps=args.prm_steps, lr=args.prm_lr, unlikelihood=args.prm_unlikelihood,
                                           final_loss=loss, prm_problems=args.prm_problems,
                                           prm_samples=args.prm_samples, leave_reference_fraction=wrong_frac,
                                           seconds=round(time.perf_counter() - t0, 1)))
    print(f"prm: loss {loss:.4f}, {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.prm_only:
        _think(args, models["policy-small"], tokenizer, problems, out, common)
    print(f"all done in {time.perf_counter() - t_start:.0f} s -> {out}", flush=True)
    return 0


def _think(args, small, tokenizer, problems, out: Path, common: dict) -> None:
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model, tok, loss = train_think(small, tokenizer, problems[: args.think_problems], steps=args.think_steps,
                                   batch_size=args.think_batch_size, lr=args.think_lr, seed=args.seed)
    save(model, tok, out / "policy-think", dict(common, shape=SHAPES["policy-small"], init="policy-small",
                                                steps=args.think_steps, lr=args.think_lr, final_loss=loss,
                                                batch_size=args.think_batch_size, max_len=THINK_TRAIN_LEN,
                                                think_problems=args.think_problems,
                                                seconds=round(time.perf_counter() - t0, 1)))
    print(f"policy-think: loss {loss:.4f}, {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
