"""csrc/sources.txt as the tests read it: (kind, path) pairs, kind "cpu" or "cuda"."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def listed_sources() -> list[tuple[str, str]]:
    out = []
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            kind, path = line.split()
            out.append((kind, path))
    return out
