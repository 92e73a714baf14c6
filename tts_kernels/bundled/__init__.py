"""The bundled task and models: arithmetic word problems (:mod:`.arith`), a small and a larger
policy and a PRM for them, and the script that trains them (:mod:`.train`).

Importing this package or :mod:`.arith` imports neither transformers nor the model adapters;
the loaders below do, when called.

The models were trained by ``python -m tts_kernels.bundled.train`` (settings, seed, losses and
time in each folder's ``training.json``) and ship in the package as transformers model
folders (``config.json``, ``model.safetensors``, tokenizer files), so plain
``from_pretrained(path)`` loads them too::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(bundled.path("policy-small"))
    model = AutoModelForCausalLM.from_pretrained(bundled.path("policy-small"))
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import arith

ROOT = Path(__file__).resolve().parent / "weights"
NAMES = ("policy-small", "policy-large", "prm", "policy-think")
TEST_SEED = 1234  # the held-out problems the demo and `eval` use by default


def path(name: str, root: str | Path | None = None) -> Path:
    """Folder of a bundled model (``"policy-small"``, ``"policy-large"``, ``"prm"`` or ``"policy-think"``)."""
    if name not in NAMES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")
    p = Path(root or ROOT) / name
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"no bundled model at {p}; train one with `python -m tts_kernels.bundled.train`")
    return p


def load_tokenizer(name: str = "policy-small", root=None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path(name, root))


def load_policy(size: str = "small", *, device="cpu", root=None, dtype=torch.float32):
    """An :class:`~tts_kernels.models.HFPolicy` over ``policy-{size}`` (``"small"``, ``"large"``, or
    ``"think"``: policy-small fine-tuned to think before it answers; its prompts are
    :func:`~tts_kernels.bundled.arith.thinking_prompt`, its thinking ends at ``</think>``)."""
    from transformers import AutoModelForCausalLM

    from ..models.policy import HFPolicy

    if size not in ("small", "large", "think"):
        raise ValueError(f"size must be 'small', 'large' or 'think', got {size!r}")
    p = path(f"policy-{size}", root)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype).to(device).eval()
    return HFPolicy(model, load_tokenizer(f"policy-{size}", root))


def load_prm(*, device="cpu", root=None, dtype=torch.float32):
    """An :class:`~tts_kernels.models.HFPRM` (2-class token classifier read at each step's last token).

    Known defect: it ranks right and wrong answers about at random; :func:`load_verifier` ``("likelihood")``
    is the verifier that works."""
    from transformers import AutoModelForTokenClassification

    from ..models.prm import HFPRM

    p = path("prm", root)
    model = AutoModelForTokenClassification.from_pretrained(p, dtype=dtype).to(device).eval()
    return HFPRM(model, load_tokenizer("prm", root), head="classifier", step_delimiter=arith.STEP_DELIMITER)


VERIFIERS = ("likelihood", "prm")


def load_verifier(kind: str = "likelihood", *, device="cpu", root=None, dtype=torch.float32, reduce: str = "min"):
    """The step verifier a search uses, as an :class:`~tts_kernels.models.HFPRM`.

    * ``"prm"``: the trained PRM (:func:`load_prm`);
    * ``"likelihood"``: policy-large reading the steps: a step scores ``exp`` of the ``reduce``
      (``"min"``/``"mean"``/``"sum"``) of its prefix's token log-probabilities (``head="likelihood"``).
      No training beyond the policy's: a stronger model's surprise at a weaker one's steps.
    """
    if kind == "prm":
        return load_prm(device=device, root=root, dtype=dtype)
    if kind != "likelihood":
        raise ValueError(f"kind must be one of {VERIFIERS}, got {kind!r}")
    from ..models.prm import HFPRM

    large = load_policy("large", device=device, root=root, dtype=dtype)
    return HFPRM(large.model, large.tokenizer, head="likelihood", reduce=reduce, step_delimiter=arith.STEP_DELIMITER)


def test_problems(n: int = 100, *, seed: int = TEST_SEED, levels=tuple(arith.LEVELS)) -> list[arith.Problem]:
    """The held-out problems (``"test"`` split): never seen in training."""
    return arith.generate(n, seed=seed, split="test", levels=levels)
