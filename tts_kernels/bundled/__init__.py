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
    :func:`~tts_kernels.bundled.arith.thinking_prompt`, its thinking ends at ``</think>``). Loaded as any
    folder is (:meth:`~tts_kernels.models.HFPolicy.from_pretrained`)."""
    from ..models.policy import HFPolicy

    if size not in ("small", "large", "think"):
        raise ValueError(f"size must be 'small', 'large' or 'think', got {size!r}")
    return HFPolicy.from_pretrained(str(path(f"policy-{size}", root)), device=device, dtype=dtype)


def verifier_head(folder: str | Path) -> str:
    """How a verifier folder is read without a preset: ``"likelihood"`` for a causal LM (the bundled PRM),
    ``"classifier"`` for a 2-label token classifier (``"value"``: 1 label), from its ``config.json``
    (:func:`tts_kernels.models.loading.generic_head`)."""
    from ..models.loading import generic_head

    return generic_head(folder)


def load_prm(*, device="cpu", root=None, dtype=torch.float32):
    """The trained PRM as an :class:`~tts_kernels.models.HFPRM`.

    The bundled one is a causal LM (policy-large trained further on the small policy's own samples: their
    right tokens as targets, and at each sample's first wrong token the right one as target and the wrong
    one made unlikely; :mod:`.train`); a step scores ``exp`` of the lowest token log-probability of its
    prefix (``head="likelihood"``, ``reduce="min"``). A folder holding a token classifier is read as one
    (``head="classifier"``)."""
    from ..models.prm import load_verifier as load

    p = path("prm", root)
    return load(str(p), head=verifier_head(p), reduce="min", step_delimiter=arith.STEP_DELIMITER,
                         device=device, dtype=dtype)


VERIFIERS = ("prm", "likelihood")


def load_verifier(kind: str = "prm", *, device="cpu", root=None, dtype=torch.float32, reduce: str = "min"):
    """The step verifier a search uses, as an :class:`~tts_kernels.models.HFPRM`.

    * ``"prm"``: the trained PRM (:func:`load_prm`);
    * ``"likelihood"``: policy-large reading the steps, untrained as a verifier: a step scores ``exp`` of
      the ``reduce`` (``"min"``/``"mean"``/``"sum"``) of its prefix's token log-probabilities
      (``head="likelihood"``): a larger model judging a smaller one's steps.
    """
    if kind == "prm":
        return load_prm(device=device, root=root, dtype=dtype)
    if kind != "likelihood":
        raise ValueError(f"kind must be one of {VERIFIERS}, got {kind!r}")
    from ..models.prm import load_verifier as load

    return load(str(path("policy-large", root)), head="likelihood", reduce=reduce,
                step_delimiter=arith.STEP_DELIMITER, device=device, dtype=dtype)


POLICIES = {"policy-small": "small", "policy-large": "large", "policy-think": "think"}


def policy_from(source=None, *, device="cpu", dtype=torch.float32, backend: str = "hf", root=None, **kwargs):
    """The policy ``source`` names, as every command (``demo``, ``eval``, ``serve``) loads one:

    * ``None`` or a bundled name (``"policy-small"``, ``"policy-large"``, ``"policy-think"``; ``root``: another
      folder of bundled models): the bundled policy;
    * a transformers folder, a hub id or a ``.gguf`` file: :meth:`~tts_kernels.models.HFPolicy.from_pretrained`
      (``kwargs`` go to it: ``chat_template``, ``system_prompt``, pool sizes).

    ``backend="vllm"``: a :class:`~tts_kernels.integrations.vllm.VLLMPolicy` over the folder instead (vLLM
    installed; a bundled name resolves to its folder; ``kwargs`` go to ``vllm.LLM``)."""
    from ..models.loading import torch_dtype
    from ..models.policy import HFPolicy

    source = None if source is None else str(source)
    folder = str(path(source or "policy-small", root)) if source is None or source in POLICIES else source
    if backend == "vllm":
        import os

        from ..integrations.vllm import VLLMPolicy

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        return VLLMPolicy(folder, dtype=str(torch_dtype(dtype)).removeprefix("torch."), **kwargs)
    if backend != "hf":
        raise ValueError(f"backend must be 'hf' or 'vllm', got {backend!r}")
    return HFPolicy.from_pretrained(folder, device=device, dtype=torch_dtype(dtype), **kwargs)


def verifier_from(source, *, preset: str | None = None, head: str | None = None, reduce: str = "min",
                  step_delimiter: str = "\n\n", device="cpu", dtype=torch.float32, root=None, **kwargs):
    """The verifier ``source`` names, as every command (``demo``, ``eval``, ``serve``) loads one; ``None`` for
    ``None`` or ``"none"``:

    * a bundled name (``"prm"``, ``"likelihood"``; ``root``: another folder of bundled models): :func:`load_verifier`
      (``reduce`` for ``"likelihood"``);
    * a transformers folder, a hub id or a ``.gguf`` file: :func:`tts_kernels.models.prm.load_verifier` (its
      published format when ``preset`` names one or one is detected, else a generic ``head``; ``kwargs`` go to
      it)."""
    from ..models.prm import load_verifier as load

    if source is None or source == "none":
        return None
    source = str(source)
    if source in VERIFIERS:
        if preset is not None or head is not None:
            raise ValueError(f"the bundled verifier {source!r} has its own format; a preset or head is for a folder")
        return load_verifier(source, device=device, root=root, dtype=dtype, reduce=reduce)
    return load(source, preset=preset, head=head, reduce=reduce, step_delimiter=step_delimiter, device=device,
                dtype=dtype, **kwargs)


def optimal_table_path(root=None) -> Path:
    """Where the fitted compute-optimal table of the bundled models lives (:mod:`.fit_optimal`)."""
    return Path(root or ROOT) / "compute_optimal.json"


def optimal_table(verifier: str = "prm", root=None):
    """The fitted :class:`~tts_kernels.search.compute_optimal.OptimalTable` for ``verifier``, or ``None``
    when there is none (no file, or one fitted with another verifier: its calibration reads that one's
    scores)."""
    from ..search.compute_optimal import OptimalTable

    p = optimal_table_path(root)
    if not p.is_file():
        return None
    table = OptimalTable.load(p)
    return table if table.meta.get("verifier") == verifier else None


def sample_texts(policy, problems, n: int, *, temperature: float, seed: int, chunk: int,
                 max_new_tokens: int = 96) -> list[list[str]]:
    """``n`` sampled solution texts per problem, ``chunk`` problems per batch (batch ``i``, its first
    problem's index, samples with seed ``seed + i``)."""
    from ..search.best_of_n import sample_completions

    out = []
    for i in range(0, len(problems), chunk):
        texts, _, _, _ = sample_completions(policy, [p.prompt for p in problems[i: i + chunk]], n,
                                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i)
        out += texts
    return out


def test_problems(n: int = 100, *, seed: int = TEST_SEED, levels=tuple(arith.LEVELS)) -> list[arith.Problem]:
    """The held-out problems (``"test"`` split): never seen in training."""
    return arith.generate(n, seed=seed, split="test", levels=levels)
