"""A scripted policy and verifier that implement the search protocols with no transformers model.

They are the smallest honest backend: what a new backend (vLLM, another framework) must
provide, and nothing more (``tts_kernels.search.protocols``). The policy's next-token logits
are a fixed function of a row's last token and position (a seeded table), computed with
tensor ops on the device, so forks, clones and paused rows behave as with a real model; the
verifier scores a step from its text. Both count tokens and keys as the protocols ask, and
count their live sessions so tests can check that a search frees what it starts.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from tts_kernels.ops.prm import fold_step_scores, init_aggregate

CHARS = ["<pad>", "<eos>"] + list("abcdefgh .")


class CharTokenizer:
    """One character per token; ids 0 (pad) and 1 (EOS) are special."""

    def __init__(self, chars=CHARS):
        self.chars = list(chars)
        self.pad_token_id, self.eos_token_id = 0, 1

    def encode(self, text: str) -> list[int]:
        return [self.chars.index(c) for c in text if c in self.chars]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self.chars[i] for i in ids if not (skip_special_tokens and i < 2))

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]


class _FlopModel(nn.Module):
    """What the FLOP estimate reads: parameters and a config with layers, heads and head size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.head = nn.Linear(4, vocab, bias=False)
        self.config = SimpleNamespace(num_hidden_layers=1, num_attention_heads=1, head_dim=4)


class ScriptedPolicy:
    """``logits(row) = table[last token of row] + bias[position of row % 7]``; ``bias`` favours
    nothing, ``table`` is seeded; ``boost`` adds to chosen tokens' logits everywhere."""

    def __init__(self, *, vocab=CHARS, seed: int = 0, boost: dict | None = None, eos: bool = True):
        self.tokenizer = CharTokenizer(vocab)
        V = len(vocab)
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(V, V, generator=g)
        self.bias = torch.randn(7, V, generator=g) * 0.5
        for tok, b in (boost or {}).items():
            self.table[:, self.tokenizer.chars.index(tok) if isinstance(tok, str) else tok] += b
        self.eos_token_ids = [1] if eos else []
        self.model = _FlopModel(V)
        self.live_sessions = 0

    @property
    def device(self) -> torch.device:
        return self.table.device

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt) or [2]

    def logits(self, last: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.table[last] + self.bias[pos % 7]

    def start(self, prompt_ids, *, rows_hint: int, max_new_tokens: int) -> ScriptedSession:
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt must have at least one token")
        return ScriptedSession(self, prompt_ids)


class ScriptedSession:
    def __init__(self, policy: ScriptedPolicy, prompt_ids):
        self.policy = policy
        self.last = torch.tensor([p[-1] for p in prompt_ids])
        self.pos = torch.tensor([len(p) for p in prompt_ids])
        self.logits = policy.logits(self.last, self.pos)
        self.prefill_tokens = self.tokens = sum(len(p) for p in prompt_ids)
        self.keys = torch.tensor(sum(len(p) * (len(p) + 1) // 2 for p in prompt_ids))
        self.freed = False
        policy.live_sessions += 1

    @property
    def rows(self) -> int:
        return self.last.shape[0]

    def fork(self, rows: torch.Tensor) -> None:
        self.last, self.pos, self.logits = (t.index_select(0, rows) for t in (self.last, self.pos, self.logits))

    def clone(self, rows: torch.Tensor) -> ScriptedSession:
        other = copy.copy(self)
        other.fork(rows)
        other.tokens = other.prefill_tokens = 0
        other.keys = torch.zeros((), dtype=torch.long)
        other.freed = False
        self.policy.live_sessions += 1
        return other

    def decode(self, tokens: torch.Tensor, active: torch.Tensor | None = None, rows=None) -> torch.Tensor:
        active = torch.ones_like(tokens, dtype=torch.bool) if active is None else active
        run = torch.ones_like(active)
        if rows is not None:  # only these rows run; the others are left as they are
            run = torch.zeros_like(active)
            run[rows] = True
            active = active & run
        self.keys = self.keys + torch.where(run, self.pos + 1, 0).sum()
        self.last = torch.where(active, tokens, self.last)
        self.pos = self.pos + active
        self.logits = torch.where(active[:, None], self.policy.logits(self.last, self.pos), self.logits)
        self.tokens += int(run.sum())
        return self.logits

    def truncate(self, rows: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor) -> None:
        assert len(set(rows.tolist())) == rows.shape[0] and bool((lengths >= 1).all())
        assert bool((lengths <= self.pos[rows]).all()), "a row can only be cut shorter"
        self.last, self.pos = self.last.clone(), self.pos.clone()
        self.last[rows], self.pos[rows] = tokens, lengths
        self.logits = self.logits.clone()
        self.logits[rows] = self.policy.logits(tokens, lengths)
        self.tokens += rows.shape[0]

    def free(self) -> None:
        assert not self.freed, "session freed twice"
        self.freed = True
        self.policy.live_sessions -= 1


@dataclass
class Scores:
    step_scores: list
    aggregate: torch.Tensor
    tokens: int
    keys: int


def step_score(text: str) -> float:
    """A step's score from its text: more 'a's is better (a fixed, easily checked rule)."""
    return (1 + text.count("a")) / (2 + len(text))


class ScriptedVerifier:
    def __init__(self):
        self.flop_module = _FlopModel(8)
        self.live_sessions = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def start(self, prompts, *, agg: str, rows: int, max_new_tokens: int) -> ScriptedVerifierSession:
        return ScriptedVerifierSession(self, [len(p) for p in prompts], agg)

    def score_steps(self, prompts, steps, *, agg: str) -> Scores:
        session = self.start(prompts, agg=agg, rows=sum(len(c) for c in steps), max_new_tokens=0)
        try:
            session.fork(torch.tensor([p for p, cands in enumerate(steps) for _ in cands], dtype=torch.long))
            flat = [st for cands in steps for st in cands]
            got = session.add_steps(flat).tolist()
            rows, i = [], 0
            for cands in steps:
                rows.append([got[i + j][: len(cands[j])] for j in range(len(cands))])
                i += len(cands)
            return Scores(rows, session.aggregate.clone(), session.tokens, session.keys)
        finally:
            session.free()


class ScriptedVerifierSession:
    def __init__(self, verifier: ScriptedVerifier, prompt_lens: list[int], agg: str):
        self.verifier, self.agg = verifier, agg
        self.aggregate, self.count = init_aggregate(len(prompt_lens), agg)
        self.lens = list(prompt_lens)
        self.tokens = sum(prompt_lens)
        self.keys = sum(n * (n + 1) // 2 for n in prompt_lens)
        self.freed = False
        verifier.live_sessions += 1

    @property
    def rows(self) -> int:
        return len(self.lens)

    def fork(self, rows: torch.Tensor) -> None:
        self.aggregate, self.count = self.aggregate.index_select(0, rows), self.count.index_select(0, rows)
        self.lens = [self.lens[r] for r in rows.tolist()]

    def clone(self, rows: torch.Tensor) -> ScriptedVerifierSession:
        other = copy.copy(self)
        other.fork(rows)
        other.tokens = other.keys = 0
        other.freed = False
        self.verifier.live_sessions += 1
        return other

    def score(self, r: int, row: list[str], j: int) -> float:
        """Row ``r``'s score for its new step ``row[j]`` (a subclass may read the row's history)."""
        return step_score(row[j])

    def add_steps(self, steps: list[list[str]]) -> torch.Tensor:
        if len(steps) != self.rows:
            raise ValueError(f"steps has {len(steps)} rows, the session {self.rows}")
        S = max((len(s) for s in steps), default=0)
        scores = torch.full((self.rows, S), float("nan"))
        for r, row in enumerate(steps):
            for j, text in enumerate(row):
                scores[r, j] = self.score(r, row, j)
                self.keys += len(text) * self.lens[r] + len(text) * (len(text) + 1) // 2
                self.lens[r] += len(text)
                self.tokens += len(text)
        if S:
            self.aggregate, self.count = fold_step_scores(scores, ~torch.isnan(scores), self.aggregate, self.count,
                                                          self.agg)
        return scores

    def free(self) -> None:
        assert not self.freed, "session freed twice"
        self.freed = True
        self.verifier.live_sessions -= 1
