"""Part files of ``tts-kernels eval``: one per rank, appended a chunk at a time, read back whole.

Rank ``r`` of ``w`` appends to ``parts/rank-r-of-w.jsonl`` one line per record (flushed), then one
commit line ``{"chunk_done": c, "problems": P, "records": R, "seconds": {budget: s}}``, then
fsyncs. A unit of work is a chunk of a *stage*: ``"final"`` (the records that make the results;
lines without a ``"stage"`` field, as every line of earlier releases) or ``"pilot"`` (the pilot pass of
strategies that pool their budget over the whole run; records and commit line carry
``"stage": "pilot"``). Units are keyed ``(stage, chunk)``. A unit is complete in a file when a commit
line follows exactly its expected records (:func:`expected_keys`); anything else (the records of a
chunk a kill cut short, a torn last line) is incomplete and ignored. :func:`repair` drops it from a
rank's own file before the rank appends again, so a redone chunk never runs into its stray first half;
:func:`scan` finds the first complete copy of every unit over all part files, of any world size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["FINAL", "PILOT", "expected_keys", "repair", "scan", "CommitTail"]

FINAL, PILOT = "final", "pilot"  # the stages of a chunk's work


def expected_keys(chunks, strategies, budgets, stage: str = FINAL) -> dict[tuple[str, int], set]:
    """``{(stage, chunk): {(id as JSON, strategy, budget)}}``: the records that make each unit complete."""
    return {(stage, c): {(json.dumps(p.id), s, b) for p in probs for s in strategies for b in budgets}
            for c, probs in enumerate(chunks)}


def _key(rec: dict) -> tuple:
    return json.dumps(rec.get("id")), rec.get("strategy"), rec.get("budget")


def _unit(obj: dict, chunk_field: str = "chunk") -> tuple:
    return obj.get("stage", FINAL), obj.get(chunk_field)


def _blocks(path: Path, expected: dict[tuple, set]) -> tuple[list[tuple], bool]:
    """The complete units in one part file, as ``(unit, record lines, records, commit line, commit)``;
    and whether the file holds anything else (an incomplete unit, a torn line)."""
    blocks, lines, recs, dirty = [], [], [], False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                obj = json.loads(line) if line.endswith("\n") else None
            except json.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict):
                dirty, lines, recs = True, [], []
            elif "chunk_done" in obj:
                c = _unit(obj, "chunk_done")
                keys = {_key(r) for r in recs}
                if c in expected and all(_unit(r) == c for r in recs) and len(recs) == len(keys) == len(
                        expected[c]) and keys == expected[c]:
                    blocks.append((c, lines, recs, line, obj))
                else:
                    dirty = True
                lines, recs = [], []
            else:
                if recs and _unit(recs[-1]) != _unit(obj):
                    dirty, lines, recs = True, [], []
                lines.append(line)
                recs.append(obj)
    return blocks, dirty or bool(recs)


def repair(path: Path, expected: dict[tuple, set]) -> None:
    """Rewrite a part file with its complete units only (atomic replace), if it holds anything else."""
    if not path.is_file():
        return
    blocks, dirty = _blocks(path, expected)
    if dirty:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for _, lines, _, done, _ in blocks:
                f.writelines(lines + [done])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def scan(parts: Path, expected: dict[tuple, set]) -> dict[tuple, tuple[list[dict], dict]]:
    """The first complete copy of every unit over all part files: ``{(stage, chunk): (records, commit)}``."""
    out = {}
    for path in sorted(parts.glob("rank-*.jsonl")):
        for c, _, recs, _, done in _blocks(path, expected)[0]:
            out.setdefault(c, (recs, done))
    return out


class CommitTail:
    """Counts committed problems (final stage) in the part files, reading only what was appended since the
    last look."""

    def __init__(self, parts: Path):
        self.parts, self.offsets, self.done = parts, {}, {}

    def problems(self) -> int:
        for path in sorted(self.parts.glob("rank-*.jsonl")):
            with open(path, "rb") as f:
                f.seek(self.offsets.get(path, 0))
                data = f.read()
            end = data.rfind(b"\n") + 1
            self.offsets[path] = self.offsets.get(path, 0) + end
            for line in data[:end].splitlines():
                if line.startswith(b'{"chunk_done"'):
                    try:
                        d = json.loads(line)
                        if d.get("stage", FINAL) == FINAL:
                            self.done[d["chunk_done"]] = d["problems"]
                    except (json.JSONDecodeError, KeyError):
                        pass
        return sum(self.done.values())
