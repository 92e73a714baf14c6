"""The console entry points run end to end and write what they promise (no timing asserted)."""
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "tts_kernels", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_bench_quick_writes_table(tmp_path):
    res = run_cli("bench", "--quick", "--cpu-only", "--skip-search", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "bench.json").read_text())
    ops = [r["op"] for r in data["rows"]]
    assert ops.count("beam_topk") == 2 and "kv_reorder_" in ops  # fp32 and bf16, and the cache reorder
    assert any(op.startswith("sample") for op in ops)
    for r in data["rows"]:
        assert r["peer_ms"] > 0 and r["ours_ms"] > 0 and r["ratio"] > 0 and r["gbs"] > 0
    with open(tmp_path / "bench.csv") as f:
        assert len(list(csv.DictReader(f))) == len(data["rows"])
    assert "ratio" in res.stdout and "kv_reorder_" in res.stdout


def test_demo_quick_matches_generate(tmp_path):
    res = run_cli("demo", "--quick", "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads((tmp_path / "demo.json").read_text())
    assert data["beam_search_identical"] is True
    assert "identical to transformers generate(): sequences True, scores True" in res.stdout
