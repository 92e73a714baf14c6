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


# ----------------------------------------------------------------------------- helpers of the one loader

def torch_dtype(dtype) -> torch.dtype:
    """``dtype`` as a ``torch.dtype`` (a dtype, or its name: ``"float32"``, ``"bfloat16"``, ``"float16"``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be a torch dtype or its name (float32, bfloat16, float16), got {dtype!r}")


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
