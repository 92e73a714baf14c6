"""No search module reaches into another's private state, checked from the source.

A name with a single leading underscore is its module's own business. For every module of
``tts_kernels/search`` this walks the syntax tree and fails on

* ``from .other import _name`` (any spelling of another search module: relative, absolute,
  ``from . import other`` then ``other._name``, ``import tts_kernels.search.other as o`` then ``o._name``);
* ``obj._name`` where ``_name`` is defined by another search module (a module-level function, class
  or variable, or a class's method or attribute, ``self._name = ...`` included) and not by this one
  (a module may use its own private names on any object).

Dunder names (``__init__``) are not private. ``getattr(obj, "_name")`` with a string is not seen.
"""
import ast
from pathlib import Path

SEARCH = Path(__file__).resolve().parents[1] / "tts_kernels" / "search"
PACKAGE = "tts_kernels.search"


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def defined_private(tree: ast.AST) -> set[str]:
    """Private names a module defines: at module level, in its classes, and as ``self._x = ...`` attributes."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for t in ast.walk(target):
                    if isinstance(t, ast.Name):
                        out.add(t.id)
                    elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in ("self",
                                                                                                           "cls"):
                        out.add(t.attr)
    return {n for n in out if private(n)}


def search_module(node: ast.ImportFrom, alias: str | None = None) -> str | None:
    """The search module an import names (``from .x import y`` -> ``x``; with ``alias``, ``from . import x``
    -> ``x``), or ``None`` when it is not a module of this package."""
    if node.level == 1:
        base = node.module
    elif node.level == 0 and node.module and (node.module + ".").startswith(PACKAGE + "."):
        base = node.module[len(PACKAGE) + 1:] or None
    else:
        return None
    if base is None:  # from . import x
        return alias
    return base.split(".")[0]


def violations(sources: dict[str, str]) -> list[str]:
    """``sources``: module name (file stem) -> source text, all of one package. Each violation as a line."""
    trees = {name: ast.parse(text) for name, text in sources.items()}
    owns = {name: defined_private(tree) for name, tree in trees.items()}
    bad = []
    for name, tree in trees.items():
        others = set().union(*(owns[m] for m in trees if m != name)) - owns[name]
        module_aliases = {}  # local name -> another search module bound to it
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    target = search_module(node, a.name)
                    if node.module is None and node.level == 1 and target in trees:  # from . import other
                        if target != name:
                            module_aliases[a.asname or a.name] = target
                        continue
                    src = search_module(node)
                    if src is not None and src != name and private(a.name):
                        bad.append(f"{name}:{node.lineno} imports {a.name} from {src}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(PACKAGE + "."):
                        mod = a.name[len(PACKAGE) + 1:].split(".")[0]
                        if mod != name and a.asname:
                            module_aliases[a.asname] = mod
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not private(node.attr):
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in module_aliases:
                bad.append(f"{name}:{node.lineno} reads {module_aliases[base.id]}.{node.attr}")
            elif isinstance(base, ast.Attribute) and ast.unparse(base).startswith(PACKAGE + "."):
                mod = ast.unparse(base)[len(PACKAGE) + 1:].split(".")[0]
                if mod != name:
                    bad.append(f"{name}:{node.lineno} reads {mod}.{node.attr}")
            elif node.attr in others:
                owner = sorted(m for m in trees if m != name and node.attr in owns[m])
                bad.append(f"{name}:{node.lineno} uses {ast.unparse(node)} ({node.attr} is private to "
                           f"{', '.join(owner)})")
    return sorted(bad)


def test_no_search_module_uses_another_ones_private_names():
    sources = {p.stem: p.read_text() for p in sorted(SEARCH.glob("*.py"))}
    assert len(sources) > 15  # the walk found the package
    bad = violations(sources)
    assert not bad, "\n".join(bad)


def test_the_checker_catches_each_form():
    owner = (
        "_TABLE = {}\n"
        "def _helper(): pass\n"
        "def public(): return _helper()\n"
        "class Engine:\n"
        "    def __init__(self):\n"
        "        self._state = 0\n"
        "    def _advance(self):\n"
        "        self._state += 1\n"
    )
    caught = {
        "from .owner import _helper\n": "imports _helper from owner",
        "from tts_kernels.search.owner import _TABLE\n": "imports _TABLE from owner",
        "from . import owner\nowner._helper()\n": "reads owner._helper",
        "from . import owner as o\nx = o._TABLE\n": "reads owner._TABLE",
        "import tts_kernels.search.owner as o\no._helper()\n": "reads owner._helper",
        "import tts_kernels.search.owner\ntts_kernels.search.owner._helper()\n": "reads owner._helper",
        "def f(engine):\n    engine._state = 3\n": "uses engine._state",
        "def f(engine):\n    return engine._advance()\n": "uses engine._advance",
        "from .owner import Engine\nclass Sub(Engine):\n    def go(self):\n        self._advance()\n":
            "uses self._advance",
    }
    for user, want in caught.items():
        got = violations({"owner": owner, "user": user})
        assert len(got) == 1 and want in got[0], (user, got)
    fine = [
        "from .owner import public, Engine\n",
        "from . import owner\nowner.public()\nx = owner.__name__\n",
        "def _helper(): pass\ndef f(o):\n    return o._helper()\n",  # its own private name, on any object
        "class Mine:\n    def __init__(self):\n        self._state = 1\n",
        "from ..ops._validate import check_int\nfrom .._threads import in_search_pool\n",  # not a search module
        "def f(x):\n    return x._private_to_nobody\n",  # defined by no search module
    ]
    for user in fine:
        assert violations({"owner": owner, "user": user}) == [], user
