"""The parent side of the Triton-interpreter tests.

Triton decides between compiled and interpreted kernels when ``@triton.jit`` runs
(at import), from ``TRITON_INTERPRET``; setting it inside the test session would be
too late for modules already imported and too broad for the GPU tests. So each
``tests/test_triton_*.py`` file runs itself as a script in a child process with
``TRITON_INTERPRET=1``; the child prints one ``RESULTS {json}`` line with a verdict
per case, and the parent's tests read it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_interpreter_child(test_file: str, timeout: int = 900) -> dict:
    """Run ``test_file`` under ``TRITON_INTERPRET=1``; return the dict of its ``RESULTS`` line (or fail)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, str(Path(test_file).resolve())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter child failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULTS "):])
