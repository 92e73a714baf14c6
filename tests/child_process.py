"""Running test code in a child Python process, and the Triton-interpreter test harness.

Triton decides between compiled and interpreted kernels when ``@triton.jit`` runs
(at import), from ``TRITON_INTERPRET``; setting it inside the test session would be
too late for modules already imported and too broad for the GPU tests. So each
``tests/test_triton_*.py`` file runs itself as a script in a child process with
``TRITON_INTERPRET=1``: the child records a verdict per case (:func:`record`) and
prints them on one ``RESULTS {json}`` line (:func:`report`); the parent's tests read
them through the ``child_results`` fixture (tests/conftest.py), which calls
:func:`run_interpreter_child`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_py(code: str, **env) -> subprocess.CompletedProcess:
    """Run ``python -c code`` from the repository root with extra environment variables."""
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=ROOT, timeout=300)


def run_interpreter_child(test_file: str, timeout: int = 900) -> dict:
    """Run ``test_file`` under ``TRITON_INTERPRET=1``; return the dict of its ``RESULTS`` line (or fail)."""
    import pytest

    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, str(Path(test_file).resolve())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter child failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULTS "):])


def record(results: dict, name: str, fn, *args) -> None:
    """Child side: run one case; store ``{"verdict": "ok" | traceback, "seconds"}`` under ``name``."""
    t0 = time.perf_counter()
    try:
        fn(*args)
        verdict = "ok"
    except Exception:  # reported by the parent's test of this case
        verdict = traceback.format_exc()
    results[name] = {"verdict": verdict, "seconds": round(time.perf_counter() - t0, 2)}


def report(results: dict) -> None:
    """Child side: print the verdicts for the parent."""
    print("RESULTS " + json.dumps(results))


def compile_for_hopper(kernel, signature: dict, constants: dict, **options):
    """Compile a ``@triton.jit`` kernel to sm_90 cubin without a GPU (what the interpreter never
    checks: typing, shape rules, lowering); returns the compiled kernel (``.asm`` has ``ptx``,
    ``cubin``). Skips when this process interprets Triton, when Triton's compiler API moved, or
    when Triton has no ``ptxas``."""
    import pytest

    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - layout of triton internals
        pytest.skip(f"triton's compiler API moved: {exc}")
    if type(kernel).__name__ == "InterpretedFunction":
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernels are not compilable objects")
    try:
        return triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                              options=options)
    except RuntimeError as exc:
        if "ptxas" in str(exc).lower() and "not found" in str(exc).lower():
            pytest.skip(f"no ptxas for triton: {exc}")
        raise
