"""The house rules, checked from the source: layers import downward only, and no module imports one
that imports it back. Every import counts: module level, inside functions, under TYPE_CHECKING.

Layers, bottom to top: kernels (``_ext``, ``_threads``, ``reference``, ``ops``, ``triton``) < ``cache`` <
``models`` < ``search`` < ``integrations`` < ``bundled`` < ``bench`` < ``apps``. The package root re-exports the
library (kernels, cache, search) and sits at the search level.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tts_kernels"
LAYERS = ["kernels", "cache", "models", "search", "integrations", "bundled", "bench", "apps"]
RANK = {name: i for i, name in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
COMPILED = {"tts_kernels._C"}  # the C++ extension (kernels layer): no source to walk


def layer(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1:
        return "search"  # the package root
    top = parts[1]
    if top in ("_ext", "_C", "_threads", "reference", "ops", "triton"):
        return "kernels"
    if top == "__main__":
        return "apps"
    if top not in RANK:
        raise AssertionError(f"{mod} belongs to no layer: add it to LAYERS in tests/test_layering.py")
    return top


def imports(mod: str) -> set[str]:
    """Package modules ``mod`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    path = MODULES[mod]
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES.keys() | COMPILED else source
                       for a in node.names]
        else:
            continue
        for t in targets:
            # A name imported from a module (not a module itself): the module it lives in.
            while t and t not in MODULES and t not in COMPILED and "." in t:
                t = t.rpartition(".")[0]
            if t in MODULES and t != mod and t not in COMPILED:
                out.add(t)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    assert {layer(m) for m in MODULES} <= set(LAYERS)
    assert len(MODULES) > 40  # the walk found the package


def test_layers_import_downward_only():
    bad = sorted(f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, ts in GRAPH.items() for t in ts
                 if RANK[layer(t)] > RANK[layer(m)])
    assert not bad, "\n".join(bad)


def test_nothing_in_the_library_imports_apps_or_bench():
    bad = sorted(f"{m} imports {t}" for m, ts in GRAPH.items() for t in ts
                 if layer(t) in ("apps", "bench") and layer(m) not in ("apps", "bench"))
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_checker_sees_a_cycle_and_an_upward_import():
    # The checks above can fail: a made-up graph with a cycle is caught, and so is models -> search.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert RANK[layer("tts_kernels.search.best_of_n")] > RANK[layer("tts_kernels.models.prm")]
    assert "tts_kernels.models.text" in GRAPH["tts_kernels.search.best_of_n"]


@pytest.mark.parametrize("module", ["tts_kernels", "tts_kernels.search", "tts_kernels.bundled.arith",
                                    "tts_kernels.bundled", "tts_kernels.models", "tts_kernels.apps.cli"])
def test_light_imports_do_not_load_transformers(module):
    # The task, the search layer and the CLI import transformers only when a model is loaded.
    code = f"import sys, {module}; print('transformers' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
