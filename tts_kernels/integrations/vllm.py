"""A vLLM engine as the policy of every search: :class:`VLLMPolicy`.

The searches ask a policy session for whole continuations through its optional ``generate``
(:mod:`~tts_kernels.search.protocols`): a step ends at the step delimiter (a vLLM stop string), a
completion at EOS, a stop string or ``max_tokens``. Every row's history is its token ids on the
host; ``fork`` / ``clone`` / ``truncate`` (particle Gibbs's roll-back) only copy or cut those lists,
and vLLM's prefix cache (``enable_prefix_caching``, on by default here) finds the shared histories
again, so forked rows do not prefill their common prefix twice. The verifier scores on the device
with this package's ops, as with any policy.

Accounting from vLLM's outputs: ``tokens`` counts the prompts once (``prefill_tokens``, as a session
that prefills at its start would), then every prompt position vLLM computed again (the part of a
history its prefix cache did not hold: the last partial block of every request, a roll-back's new
tail) and every token it generated; ``keys`` the keys all of those attended. (Exact within a search;
a prompt still cached from an earlier search is counted as prefilled all the same.)

Randomness: with ``seeded=True`` each row's request gets a seed derived from its search key
(:func:`~tts_kernels.search.seeds.engine_seeds`); vLLM's CPU backend refuses per-request seeds
("CPU Generator does not use offset"), so on CPU the default is ``seeded=False``: the engine's own
generator (``LLM(seed=...)``) draws, and results are not reproducible per request there.

Not supported: the token-level ``beam_search`` (it needs logits per token; vLLM has its own
``LLM.beam_search``, compared in ``benchmarks/bench_vllm.py``). vLLM must be installed (``make
test-vllm`` builds its virtualenv); importing this module does not import it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..models.policy import eos_ids

class VLLMPolicy:
    """:class:`~tts_kernels.search.Policy` over a ``vllm.LLM``.

    ``llm``: a ``vllm.LLM``, or a model folder to start one with ``llm_kwargs`` (defaults:
    ``enable_prefix_caching=True``, ``block_size=32`` (CPU's default of 128 would leave the short
    histories of small tasks uncached), ``enforce_eager=True``, ``dtype="float32"``, ``seed=0``).
    ``seeded``: seed each request (default: unless vLLM runs on CPU).
    """

    def __init__(self, llm, *, seeded: bool | None = None, **llm_kwargs):
        from vllm import LLM

        if isinstance(llm, (str, Path)):
            kw = dict(enable_prefix_caching=True, block_size=32, enforce_eager=True, dtype="float32", seed=0)
            kw.update(llm_kwargs)
            llm = LLM(model=str(llm), **kw)
        elif llm_kwargs:
            raise TypeError("llm_kwargs apply only when llm is a model folder")
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        config = llm.llm_engine.model_config
        self.max_model_len = int(config.max_model_len)
        self.eos_token_ids = eos_ids(config.hf_config, self.tokenizer)
        with torch.device("meta"):  # the model's shapes, for the FLOP estimate (no memory)
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_config(config.hf_config)
        self.model.config.max_position_embeddings = self.max_model_len
        self.vocab_size = int(config.hf_config.vocab_size)
        device = getattr(getattr(getattr(llm.llm_engine, "vllm_config", None), "device_config", None), "device_type",
                         "cpu")
        self.seeded = (device != "cpu") if seeded is None else bool(seeded)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # where the search keeps its row tensors (the engine holds the model)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def start(self, prompt_ids: list[list[int]], *, rows_hint: int | None = None,
              max_new_tokens: int = 0) -> VLLMSession:
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt must have at least one token")
        return VLLMSession(self, [list(p) for p in prompt_ids])


class VLLMSession:
    """Rows of token histories on the host; continuations come from the engine (:meth:`generate`)."""

    def __init__(self, policy: VLLMPolicy, histories: list[list[int]], counted: bool = True):
        self.policy = policy
        self.ids = histories
        self.prefill_tokens = sum(len(h) for h in histories) if counted else 0
        self.tokens = self.prefill_tokens  # + what vLLM computes beyond the first prefill (see the module doc)
        self._owed = self.prefill_tokens  # prompt positions counted already, to be met by vLLM's first calls
        self.keys = 0

    @property
    def rows(self) -> int:
        return len(self.ids)

    @property
    def logits(self) -> torch.Tensor:
        # The rows, vocabulary size and device a search reads; a text-level engine computes no logits here.
        return torch.zeros(1, self.policy.vocab_size).expand(self.rows, -1)

    def fork(self, rows: torch.Tensor) -> None:
        self.ids = [list(self.ids[r]) for r in rows.tolist()]

    def clone(self, rows: torch.Tensor) -> VLLMSession:
        return VLLMSession(self.policy, [list(self.ids[r]) for r in rows.tolist()], counted=False)

    def truncate(self, rows: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor) -> None:
        for r, n in zip(rows.tolist(), lengths.tolist()):
            self.ids[r] = self.ids[r][:n]

    def decode(self, tokens, active=None, rows=None):
        raise NotImplementedError("a vLLM session samples whole continuations (generate); the token-level "
                                  "beam_search needs a policy that returns logits per token")

    def generate(self, rows, *, max_tokens: int, stop: list[str], temperature: float, top_p: float, top_k: int,
                 min_p: float, logprobs: bool, seeds: list[int]) -> list[tuple[list[int], str, float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        rows = list(range(self.rows)) if rows is None else list(rows)
        if not rows:
            return []
        eos = set(self.policy.eos_token_ids)
        room = [self.policy.max_model_len - len(self.ids[r]) for r in rows]
        params = []
        for r, s, left in zip(rows, seeds, room):
            params.append(SamplingParams(
                max_tokens=max(1, min(max_tokens, left)), temperature=temperature, top_p=top_p,
                top_k=top_k if top_k > 0 else 0, min_p=min_p, stop=list(stop) or None,
                include_stop_str_in_output=True, logprobs=0 if logprobs else None,
                seed=s if self.policy.seeded else None, skip_special_tokens=True))
        prompts = [TokensPrompt(prompt_token_ids=list(self.ids[r])) for r in rows]
        outs = self.policy.llm.generate(prompts, params, use_tqdm=False)
        result, computed = [], 0
        for r, o in zip(rows, outs):
            c = o.outputs[0]
            ids = list(c.token_ids)
            if c.finish_reason == "length":
                finish = "length"
            elif ids and ids[-1] in eos:
                finish = "eos"
            else:
                finish = "stop" if c.stop_reason is not None else "eos"
            cached = min(int(getattr(o, "num_cached_tokens", 0) or 0), len(self.ids[r]))
            L = len(self.ids[r])
            computed += L - cached
            self.tokens += len(ids)
            # Keys attended: the computed prompt positions, then one more key per generated token.
            self.keys += sum(range(cached + 1, L + 1)) + sum(range(L + 1, L + len(ids) + 1))
            self.ids[r].extend(t for t in ids if t not in eos)
            lp = float(c.cumulative_logprob) if logprobs and c.cumulative_logprob is not None else 0.0
            result.append((ids, finish, lp))
        credit = min(self._owed, computed)  # the first computation of the prompts is the prefill counted
        self._owed -= credit
        self.tokens += computed - credit
        return result

    def free(self) -> None:
        self.ids = []
