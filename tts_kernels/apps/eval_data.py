"""Problem sets for ``tts-kernels eval``: a JSONL dataset, checked line by line, or the bundled one.

A dataset is a JSONL file, one JSON object per line, with a problem field (a non-empty
string, sent to the policy as it is: no template is added) and an answer field (a string
or a number), and optionally an id field (a string or an integer; without it, or when a
line lacks it, the problem's 0-based line index is its id). Blank lines are skipped.

Every line is checked before any work starts: bad JSON, a line that is not an object,
a missing or mistyped field and a repeated id are all reported together with their
line numbers (:class:`DatasetError`); ``skip_bad=True`` drops those lines instead and
reports them in :attr:`Dataset.skipped`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import bundled

__all__ = ["EvalProblem", "Dataset", "DatasetError", "load_jsonl", "bundled_dataset", "MAX_REPORTED"]

MAX_REPORTED = 20  # problems listed in an error message; the rest are counted


class DatasetError(ValueError):
    """A dataset that cannot be evaluated as it is (malformed lines, no problems)."""


@dataclass(frozen=True)
class EvalProblem:
    """One problem: its position in the evaluated set, source line (1-based; 0 = bundled), id, prompt, gold answer."""

    index: int
    line: int
    id: str | int
    prompt: str
    answer: str | int | float


@dataclass
class Dataset:
    problems: list[EvalProblem]
    source: str  # the file, or "bundled"
    sha256: str  # of the file's bytes (bundled: of its problems as JSON)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, why) of lines skipped by skip_bad


def describe_bad(bad: list[tuple[int, str]], source: str) -> str:
    lines = [f"  line {n}: {why}" for n, why in bad[:MAX_REPORTED]]
    if len(bad) > MAX_REPORTED:
        lines.append(f"  ... and {len(bad) - MAX_REPORTED} more")
    return f"{source}: {len(bad)} malformed line{'s' if len(bad) != 1 else ''}:\n" + "\n".join(lines)


def _check(obj, n: int, problem_field: str, answer_field: str, id_field: str) -> str | None:
    """Why line ``n``'s object is unusable, or ``None``."""
    if not isinstance(obj, dict):
        return f"not a JSON object (got {type(obj).__name__})"
    if problem_field not in obj:
        return f"missing field {problem_field!r}"
    if not isinstance(obj[problem_field], str) or not obj[problem_field].strip():
        return f"field {problem_field!r} must be a non-empty string"
    if answer_field not in obj:
        return f"missing field {answer_field!r}"
    a = obj[answer_field]
    if isinstance(a, bool) or not isinstance(a, (str, int, float)) or (isinstance(a, str) and not a.strip()):
        return f"field {answer_field!r} must be a non-empty string or a number"
    if id_field in obj and (isinstance(obj[id_field], bool) or not isinstance(obj[id_field], (str, int))):
        return f"field {id_field!r} must be a string or an integer"
    return None


def load_jsonl(path, *, problem_field: str = "problem", answer_field: str = "answer", id_field: str = "id",
               skip_bad: bool = False, limit: int | None = None) -> Dataset:
    """Read and check a JSONL dataset (module docstring); the first ``limit`` good problems.

    Raises :class:`DatasetError` listing every malformed line (the first
    :data:`MAX_REPORTED`, then a count) unless ``skip_bad``, and when no problem is left."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc}") from exc
    good: list[tuple[int, dict]] = []
    bad: list[tuple[int, str]] = []
    seen: dict = {}
    for n, text in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            bad.append((n, f"bad JSON: {exc}"))
            continue
        why = _check(obj, n, problem_field, answer_field, id_field)
        if why is None:
            pid = obj.get(id_field, n - 1)
            if pid in seen:
                why = f"duplicate id {pid!r} (first on line {seen[pid]})"
            else:
                seen[pid] = n
        if why is not None:
            bad.append((n, why))
        else:
            good.append((n, obj))
    if bad and not skip_bad:
        raise DatasetError(describe_bad(bad, str(path)) + "\nfix them, or pass --skip-bad to skip them")
    if limit is not None:
        good = good[:limit]
    if not good:
        skipped = f" ({len(bad)} malformed lines skipped)" if bad else ""
        raise DatasetError(f"{path}: no problems to evaluate{skipped}")
    problems = [EvalProblem(i, n, obj.get(id_field, n - 1), obj[problem_field], obj[answer_field])
                for i, (n, obj) in enumerate(good)]
    return Dataset(problems, str(path), hashlib.sha256(raw).hexdigest(), bad)


def bundled_dataset(n: int = 100, limit: int | None = None) -> Dataset:
    """The bundled held-out arithmetic problems (``bundled.test_problems(n)``), first ``limit`` of them:
    id = ``Problem.id``, prompt = ``Problem.prompt``, answer = the integer answer."""
    problems = bundled.test_problems(n)[:limit]
    out = [EvalProblem(i, 0, p.id, p.prompt, p.answer) for i, p in enumerate(problems)]
    blob = json.dumps([[p.id, p.prompt, p.answer] for p in out]).encode()
    return Dataset(out, "bundled", hashlib.sha256(blob).hexdigest())
