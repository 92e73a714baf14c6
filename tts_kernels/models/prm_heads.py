"""Published PRM heads read from their checkpoint files, so the PRM loads without its remote code.

Qwen2.5-Math-PRM (``Qwen2ForProcessRewardModel``) and Skywork-o1-Open-PRM (``Qwen2ForPrmModel``) are a
plain transformers Qwen2 body (weights ``model.*``) with a head transformers has no class for; their
folders name their own class as remote code (``auto_map``). :meth:`HFPRM.from_pretrained
<tts_kernels.models.HFPRM.from_pretrained>` loads the body with transformers (``AutoModel``: the
class of the config's ``model_type``, ``auto_map`` not followed) and the head with :func:`read_head`,
from these weights beside it (the layouts of the published classes, :data:`LAYOUTS`):

* ``score.0.*``, ``score.2.*``: Qwen's ``score = Sequential(Linear(h, h), ReLU(), Linear(h, 2))``
  (both with bias; 2 labels, read ``softmax(logits)[1]``);
* ``v_head.summary.*``: Skywork's value head, ``Linear(h, 1)`` (read ``sigmoid``; its dropout is off
  at inference).

The weights are read from ``model.safetensors`` or ``pytorch_model.bin`` (Skywork publishes only the
latter; read with ``weights_only=True``), or from the shards an ``.index.json`` lists, in a folder or
a hub repository (:func:`transformers.utils.cached_file`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("tts_kernels")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # each alone, or sharded with its .index.json
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "revision", "subfolder", "token")


@dataclass(frozen=True)
class HeadLayout:
    """A published head: Linear layers with a ReLU between each two, named by their weight prefixes;
    each with its output width (``None``: the body's hidden size)."""

    source: str
    linears: tuple[tuple[str, int | None], ...]

    @property
    def first(self) -> str:
        return self.linears[0][0] + ".weight"

    def names(self) -> list[str]:
        return [f"{p}.{s}" for p, _ in self.linears for s in ("weight", "bias")]


LAYOUTS = (
    HeadLayout("Qwen2ForProcessRewardModel's score = Linear(h, h), ReLU, Linear(h, 2)",
               (("score.0", None), ("score.2", 2))),
    HeadLayout("Skywork's Qwen2ForPrmModel v_head.summary = Linear(h, 1)", (("v_head.summary", 1),)),
)


def _file(path: str, name: str, hub: dict) -> str | None:
    from transformers.utils import cached_file

    return cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub)


def _read(file: str, names: list[str] | None = None) -> dict[str, torch.Tensor] | list[str]:
    """The tensors ``names`` of one weight file, or (``names=None``) the names it holds."""
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            return list(f.keys()) if names is None else {n: f.get_tensor(n) for n in names}
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return list(state) if names is None else {n: state[n] for n in names}


def weight_map(path: str, hub: dict | None = None) -> dict[str, str]:
    """Every weight name of the checkpoint at ``path`` (a folder or hub id) and the file holding it."""
    hub = hub or {}
    for name in WEIGHT_FILES:
        index = _file(path, name + ".index.json", hub)
        if index is not None:
            with open(index) as f:
                return json.load(f)["weight_map"]
        single = _file(path, name, hub)
        if single is not None:
            return dict.fromkeys(_read(single), name)
    raise ValueError(f"{path}: no weights to read a PRM head from (looked for {', '.join(WEIGHT_FILES)}, alone or "
                     f"with .index.json); pass head_module=")


def read_head(path: str, hidden: int, hub: dict | None = None) -> torch.nn.Module:
    """The PRM head in the checkpoint at ``path`` (a layout of :data:`LAYOUTS`, on a body of hidden size
    ``hidden``): a ``Linear``, or a ``Sequential`` of them with ReLUs between, in the checkpoint's dtype.
    A checkpoint with no such head, or one whose weights do not have the layout's shapes, is refused
    with the weights named."""
    hub = hub or {}
    where = weight_map(path, hub)
    layout = next((lay for lay in LAYOUTS if lay.first in where), None)
    if layout is None:
        stems = sorted({n.split(".")[0] for n in where})
        raise ValueError(f"{path}: no PRM head in its weights: looked for "
                         f"{'; '.join(f'{lay.first} ({lay.source})' for lay in LAYOUTS)}; its weights are "
                         f"{', '.join(s + '.*' for s in stems)}. Pass head_module=, or load a "
                         f"*ForTokenClassification checkpoint")
    missing = [n for n in layout.names() if n not in where]
    if missing:
        raise ValueError(f"{path}: has {layout.first} but not {', '.join(missing)} ({layout.source})")
    tensors = {}
    for file in dict.fromkeys(where[n] for n in layout.names()):
        local = _file(path, file, hub)
        tensors.update(_read(local, [n for n in layout.names() if where[n] == file]))
    mods, fan_in = [], hidden
    for k, (prefix, out) in enumerate(layout.linears):
        out = hidden if out is None else out
        lin = torch.nn.Linear(fan_in, out, device="meta")
        for part, shape in (("weight", (out, fan_in)), ("bias", (out,))):
            t = tensors[f"{prefix}.{part}"]
            if tuple(t.shape) != shape:
                raise ValueError(f"{path}: {prefix}.{part} has shape {tuple(t.shape)}; {layout.source} on hidden "
                                 f"size {hidden} needs {shape}")
            setattr(lin, part, torch.nn.Parameter(t, requires_grad=False))
        mods += [lin] + ([torch.nn.ReLU()] if k < len(layout.linears) - 1 else [])
        fan_in = out
    log.info("%s: PRM head read from its weights (%s); transformers' load of the body lists them as unexpected",
             path, layout.source)
    return mods[0] if len(mods) == 1 else torch.nn.Sequential(*mods)


class ScoredModel(torch.nn.Module):
    """A transformers body (``model``) and a PRM head read from its checkpoint (``score``): what
    :class:`~tts_kernels.models.HFPRM` reads of a published PRM class, without its remote code.
    ``forward`` gives the head's output at every token, as the published class does."""

    def __init__(self, body: torch.nn.Module, score: torch.nn.Module):
        super().__init__()
        self.model = body
        self.score = score.to(next(body.parameters()).dtype)
        self.config = body.config

    @property
    def base_model(self) -> torch.nn.Module:
        return self.model

    def set_attn_implementation(self, implementation: str) -> None:
        self.model.set_attn_implementation(implementation)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.score(self.model(input_ids=input_ids, **kwargs).last_hidden_state)
