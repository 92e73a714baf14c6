"""Loading what users have: a transformers folder (or hub id) or a GGUF file, as a causal LM and its tokenizer.

A GGUF checkpoint (llama.cpp's format; quantized) is read by transformers itself
(``from_pretrained(folder, gguf_file=NAME)``, which needs the ``gguf`` package) and dequantized to the
dtype asked: the model then runs in that dtype like any other, its tokenizer and chat template come
from the file. A path that ends in ``.gguf`` is read as one (its folder and file name are split here),
so every command that takes a model path takes a GGUF file too.

A model loaded from GGUF cannot be saved by transformers ("not serializable"); :func:`convert_gguf`
writes it once as a plain folder (safetensors, config, tokenizer), which then loads in about a second
instead of dequantizing again.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("tts_kernels")


def split_gguf(path, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(folder or hub id, GGUF file name or None)`` for ``path``: a path ending in ``.gguf`` is split into
    its folder and name (``gguf_file`` must then be unset); anything else is returned with ``gguf_file``."""
    path = str(path)
    if path.lower().endswith(".gguf"):
        if gguf_file is not None:
            raise ValueError(f"path {path!r} is a GGUF file already; do not also pass gguf_file={gguf_file!r}")
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {path!r} does not exist")
        return str(p.parent), p.name
    if gguf_file is not None and not str(gguf_file).lower().endswith(".gguf"):
        raise ValueError(f"gguf_file must name a .gguf file, got {gguf_file!r}")
    return path, gguf_file


def _gguf_kwargs(gguf_file: str | None) -> dict:
    if gguf_file is None:
        return {}
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError as e:
        raise ImportError("reading a GGUF file needs the gguf package: pip install gguf accelerate") from e
    return {"gguf_file": gguf_file}


def load_config(path, *, gguf_file: str | None = None, **kwargs):
    """The model config of ``path`` (a folder, hub id or ``.gguf`` file)."""
    from transformers import AutoConfig

    path, gguf_file = split_gguf(path, gguf_file)
    return AutoConfig.from_pretrained(path, **_gguf_kwargs(gguf_file), **kwargs)


def load_tokenizer(path, *, gguf_file: str | None = None, **kwargs):
    """The tokenizer of ``path`` (a folder, hub id or ``.gguf`` file: its vocabulary and chat template)."""
    from transformers import AutoTokenizer

    path, gguf_file = split_gguf(path, gguf_file)
    return AutoTokenizer.from_pretrained(path, **_gguf_kwargs(gguf_file), **kwargs)


def load_model(path, *, gguf_file: str | None = None, auto=None, dtype: torch.dtype = torch.float32, device=None,
               **kwargs):
    """``auto.from_pretrained`` (default ``AutoModelForCausalLM``) of ``path`` in eval mode, in ``dtype`` (a GGUF
    file is dequantized to it), moved to ``device`` when given. ``kwargs`` go to ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    path, gguf_file = split_gguf(path, gguf_file)
    auto = auto or AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=dtype, **_gguf_kwargs(gguf_file), **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()


def convert_gguf(path, out_dir, *, gguf_file: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write the GGUF checkpoint ``path`` (dequantized to ``dtype``) as a plain transformers folder ``out_dir``
    (model, generation config, tokenizer and chat template); returns ``out_dir``.

    transformers refuses to save a model it loaded from GGUF, so the weights go into a model built from the
    same config without its ``quantization_config`` (every key matches; tied embeddings re-tied)."""
    from transformers import AutoModelForCausalLM

    path, gguf_file = split_gguf(path, gguf_file)
    if gguf_file is None:
        raise ValueError(f"convert_gguf needs a .gguf file, got {path!r}")
    loaded = load_model(path, gguf_file=gguf_file, dtype=dtype)
    tokenizer = load_tokenizer(path, gguf_file=gguf_file)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"converting {gguf_file}: weights do not match the model built from its config "
                           f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("converted %s to %s", gguf_file, out)
    return out


# ----------------------------------------------------------------------------- the one loader of every command

BUNDLED_POLICIES = {"policy-small": "small", "policy-large": "large", "policy-think": "think"}


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be a torch dtype or its name (float32, bfloat16, float16), got {dtype!r}")


def load_policy(source=None, *, device="cpu", dtype=torch.float32, backend: str = "hf", root=None, **kwargs):
    """The policy ``source`` names, for every command (``demo``, ``eval``, ``serve``) and the bundled loaders:

    * ``None`` or a bundled name (``"policy-small"``, ``"policy-large"``, ``"policy-think"``; ``root``: another
      folder of bundled models): the bundled policy;
    * a transformers folder, a hub id or a ``.gguf`` file: :meth:`~tts_kernels.models.HFPolicy.from_pretrained`
      (``kwargs`` go to it: ``chat_template``, ``system_prompt``, pool sizes).

    ``backend="vllm"``: a :class:`~tts_kernels.integrations.vllm.VLLMPolicy` over the folder instead (vLLM
    installed; the bundled names resolve to their folders)."""
    from .. import bundled

    dtype = _dtype(dtype)
    if source is not None and not isinstance(source, str):
        source = str(source)
    folder = bundled.path(source or "policy-small", root) if source is None or source in BUNDLED_POLICIES else None
    if backend == "vllm":
        import os

        from ..integrations.vllm import VLLMPolicy

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        return VLLMPolicy(str(folder or source), dtype=str(dtype).removeprefix("torch."), **kwargs)
    if backend != "hf":
        raise ValueError(f"backend must be 'hf' or 'vllm', got {backend!r}")
    from .policy import HFPolicy

    return HFPolicy.from_pretrained(folder or source, dtype=dtype, device=device, **kwargs)


def generic_head(config) -> str:
    """The :class:`~tts_kernels.models.HFPRM` head a model reads as when no preset applies, from its config (a
    ``PretrainedConfig`` or a folder holding ``config.json``): a causal LM is read as its own ``"likelihood"``;
    a token classifier as a ``"classifier"`` (2 labels) or a ``"value"`` head (1 label)."""
    if not hasattr(config, "architectures"):
        import json

        folder = Path(config)
        if str(folder).lower().endswith(".gguf"):
            return "likelihood"  # a GGUF file holds a causal LM
        config = type("Config", (), json.loads((folder / "config.json").read_text()))
    arch = list(getattr(config, "architectures", None) or [""])
    if any(a.endswith("ForCausalLM") for a in arch):
        return "likelihood"
    labels = getattr(config, "num_labels", None) or len(getattr(config, "id2label", None) or {}) or 2
    return "value" if labels == 1 else "classifier"


def verifier_plan(source, *, preset: str | None = None, head: str | None = None, tokenizer=None, config=None,
                  gguf_file: str | None = None) -> tuple[str | None, str]:
    """``(preset or None, head)``: how :func:`load_verifier` reads ``source`` (a folder, hub id or ``.gguf``
    file), without loading its weights.

    * ``head`` given (one of HFPRM's heads): that generic head, no preset;
    * ``preset`` a name of :data:`~tts_kernels.models.prm_formats.PRESETS`: that published format;
    * ``preset="auto"``: the format detected (:func:`~tts_kernels.models.prm_formats.detect_preset`), an
      error naming the presets when none fits;
    * neither: the detected format when one fits, else the generic head of the config (:func:`generic_head`)."""
    from .prm import HEADS
    from .prm_formats import PRESET_HEADS, PRESETS, detect_preset

    if head is not None and preset is not None:
        raise ValueError(f"pass a preset ({preset!r}, the published format) or a head ({head!r}, a generic one), "
                         "not both")
    if head is not None:
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        return None, head
    if preset is not None and preset != "auto":
        if preset not in PRESETS:
            raise ValueError(f"preset must be 'auto' or one of {PRESETS}, got {preset!r}")
        return preset, PRESET_HEADS[preset]
    path, gguf_file = split_gguf(source, gguf_file)
    config = config or load_config(path, gguf_file=gguf_file)
    tokenizer = tokenizer or load_tokenizer(path, gguf_file=gguf_file)
    try:
        found = detect_preset(config, tokenizer, str(source))
    except ValueError:
        if preset == "auto":
            raise
        return None, "likelihood" if gguf_file else generic_head(config)
    return found, PRESET_HEADS[found]


def load_verifier(source, *, preset: str | None = None, head: str | None = None, reduce: str = "min",
                  step_delimiter: str = "\n\n", device="cpu", dtype=torch.float32, root=None, gguf_file=None,
                  model_kwargs: dict | None = None, **kwargs):
    """The verifier ``source`` names, for every command (``demo``, ``eval``, ``serve``) and the bundled loaders;
    ``None`` for ``None`` or ``"none"``:

    * a bundled name (``"prm"``, ``"likelihood"``; ``root``: another folder of bundled models): the bundled
      verifier (:func:`tts_kernels.bundled.load_verifier`, ``reduce`` for ``"likelihood"``);
    * a transformers folder, a hub id or a ``.gguf`` file, read as :func:`verifier_plan` says: a published
      format (``preset``) through :meth:`~tts_kernels.models.HFPRM.from_pretrained`, or a generic head
      (``head``: ``"likelihood"`` and ``"label_token"`` load a causal LM, ``"classifier"`` and ``"value"`` a
      token classifier; ``reduce`` is the likelihood's). The choice is logged.

    ``step_delimiter`` splits completions in :meth:`HFPRM.score`; ``kwargs`` go to :class:`HFPRM` (a label-token
    head's ``good_token``/``bad_token``, ``system_prompt``, pool sizes)."""
    from .. import bundled
    from .prm import HFPRM

    if source is None or source == "none":
        return None
    dtype = _dtype(dtype)
    if not isinstance(source, str):
        source = str(source)
    if source in bundled.VERIFIERS:
        if preset is not None or head is not None:
            raise ValueError(f"the bundled verifier {source!r} has its own format; a preset or head is for a folder")
        return bundled.load_verifier(source, device=device, root=root, dtype=dtype, reduce=reduce)
    model_kwargs = dict(model_kwargs or {})
    path, gguf_file = split_gguf(source, gguf_file)
    tokenizer = load_tokenizer(path, gguf_file=gguf_file)
    config = load_config(path, gguf_file=gguf_file, **model_kwargs) if head is None else None
    preset, head = verifier_plan(source, preset=preset, head=head, tokenizer=tokenizer, config=config,
                                 gguf_file=gguf_file)
    log.info("verifier %s read as %s", source, f"preset {preset!r}" if preset else f"generic head {head!r}")
    if preset is not None:
        return HFPRM.from_pretrained(path, preset, tokenizer=tokenizer, dtype=dtype, device=device,
                                     gguf_file=gguf_file, model_kwargs=model_kwargs, step_delimiter=step_delimiter,
                                     **kwargs)
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    auto = AutoModelForCausalLM if head in ("likelihood", "label_token") else AutoModelForTokenClassification
    model = load_model(path, gguf_file=gguf_file, auto=auto, dtype=dtype, device=device, **model_kwargs)
    if head == "likelihood":
        kwargs["reduce"] = reduce
    return HFPRM(model, tokenizer, head=head, step_delimiter=step_delimiter, **kwargs)
