"""`tts-kernels eval`: sharded runs equal one process, killed runs resume to the same results, bad input is refused,
and a folder has one writer at a time.

Runs are small (6 bundled problems in chunks of 2, budgets 1 and 2, majority and weighted
best-of-N sharing one sampling run). Single-process runs go through ``cli.main`` in this
process (on one thread, as torchrun gives each rank); the 2-rank, killed and held runs are
child processes.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tts_kernels import bundled
from tts_kernels.apps import cli
from tts_kernels.apps.eval_data import MAX_REPORTED, DatasetError, load_jsonl
from tts_kernels.apps.eval_lock import LOCK_NAME, FolderBusy, acquire
from tts_kernels.apps.evaluate import PAUSE_ENV, STOP_ENV, chunk_seed
from tts_kernels.bundled import arith
from tts_kernels.search import Settings

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--strategies", "majority,weighted_best_of_n", "--budgets", "1,2", "--limit", "6", "--chunk-size", "2",
          "--no-progress"]
RECORDS_PER_CHUNK = 2 * 2 * 2  # problems x strategies x budgets


def run_here(out, *extra) -> int:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main(["eval", "--out", str(out), *COMMON, *extra])
    finally:
        torch.set_num_threads(n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(out, *extra, nproc=1, env=None) -> subprocess.CompletedProcess:
    launch = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port())]
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([*launch, "-m", "tts_kernels", "eval", "--out", str(out), *COMMON, *extra],
                          capture_output=True, text=True, cwd=ROOT, env=e, timeout=300)


def start_child(out, log, *extra, env=None) -> subprocess.Popen:
    """A single-process eval left running (stdout and stderr go to the file ``log``)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "tts_kernels", "eval", "--out", str(out), *COMMON, *extra],
                                stdout=f, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=e)


def wait_for_records(part, k, proc, log, timeout=240):
    """Until ``part`` holds ``k`` lines (``proc`` paused there by ``TTS_EVAL_PAUSE_AFTER``)."""
    deadline = time.monotonic() + timeout
    while not (part.exists() and len(part.read_text().splitlines()) >= k):
        assert proc.poll() is None, f"exited {proc.returncode}:\n{Path(log).read_text()}"
        assert time.monotonic() < deadline, Path(log).read_text()
        time.sleep(0.1)


def snapshot(folder) -> dict:
    """Every file under ``folder``: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def lines(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def keys(records) -> list[tuple]:
    return [(r["id"], r["strategy"], r["budget"]) for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("eval") / "reference"
    assert run_here(out) == 0
    return out


def test_reference_run_writes_every_record(reference):
    recs = lines(reference / "results.jsonl")
    problems = bundled.test_problems(100)[:6]
    # dataset order, then strategy, then budget; one line each, nothing twice
    assert keys(recs) == [(p.id, s, b) for p in problems for s in ("majority", "weighted_best_of_n") for b in (1, 2)]
    for r in recs:
        p = problems[r["index"]]
        assert r["answer"] == p.answer and r["correct"] == arith.grade(r["prediction"], p)
    for r in recs:
        assert len(r["answers"]) == len(r["scores"]) == r["budget"]
        assert all(isinstance(s, float) for s in r["scores"])  # weighted runs the PRM, majority shares its samples
        cc = r["chunk_compute"]
        assert r["policy_flops"] == cc["policy_flops"] / cc["problems"] > 0 and r["prm_tokens"] > 0
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["problems"] == 6 and summary["problems_this_run"] == 6
    for row in summary["rows"]:
        mine = [r for r in recs if (r["strategy"], r["budget"]) == (row["strategy"], row["budget"])]
        assert row["correct"] == sum(r["correct"] for r in mine)
        assert row["flops_per_problem"] == pytest.approx(sum(r["policy_flops"] + r["prm_flops"] for r in mine) / 6)
    assert (reference / "scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_two_ranks_equal_one_rank(reference, tmp_path):
    res = run_child(tmp_path, nproc=2)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "results.jsonl").read_text() == (reference / "results.jsonl").read_text()
    parts = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert parts == ["rank-0-of-2.jsonl", "rank-1-of-2.jsonl"]
    done = {p: [r["chunk_done"] for r in lines(tmp_path / "parts" / p) if "chunk_done" in r] for p in parts}
    assert done == {"rank-0-of-2.jsonl": [0, 2], "rank-1-of-2.jsonl": [1]}
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 2
    assert "eval (all ranks)" not in res.stdout and "accuracy" in res.stdout  # the table, printed once


def test_killed_run_resumes_to_the_same_results(reference, tmp_path):
    stop = RECORDS_PER_CHUNK + 3  # dies 3 records into the second chunk
    res = run_child(tmp_path, env={STOP_ENV: str(stop)})
    assert res.returncode == 3, res.stdout + res.stderr
    part = tmp_path / "parts" / "rank-0-of-1.jsonl"
    killed = lines(part)
    assert len(killed) == stop + 1 and [r["chunk_done"] for r in killed if "chunk_done" in r] == [0]
    assert not (tmp_path / "results.jsonl").exists()
    stale = json.loads((tmp_path / LOCK_NAME).read_text())  # the dead run's note: it blocks nothing
    assert stale["pid"] != os.getpid()

    assert run_here(tmp_path) == 0
    assert (tmp_path / "results.jsonl").read_text() == (reference / "results.jsonl").read_text()
    resumed = lines(part)  # the stray lines of the killed chunk are gone, chunk 0 was not redone
    assert [r["chunk_done"] for r in resumed if "chunk_done" in r] == [0, 1, 2]
    recs = [r for r in resumed if "chunk_done" not in r]
    assert len(recs) == 3 * RECORDS_PER_CHUNK and len(set(keys(recs))) == len(recs)
    assert resumed[:RECORDS_PER_CHUNK + 1] == killed[:RECORDS_PER_CHUNK + 1]
    assert json.loads((tmp_path / "summary.json").read_text())["problems_this_run"] == 4

    assert run_here(tmp_path) == 0  # complete: nothing redone, same results
    assert lines(part) == resumed
    assert (tmp_path / "results.jsonl").read_text() == (reference / "results.jsonl").read_text()


def test_one_rank_run_resumed_by_two_ranks(reference, tmp_path):
    res = run_child(tmp_path, env={STOP_ENV: str(RECORDS_PER_CHUNK + 1)})
    assert res.returncode == 3, res.stdout + res.stderr
    res = run_child(tmp_path, nproc=2)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming: 2 problems done, 4 to do" in res.stdout
    assert (tmp_path / "results.jsonl").read_text() == (reference / "results.jsonl").read_text()


def test_changed_config_is_refused(reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = (out / "results.jsonl").read_text()
    assert run_here(out, "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "seed: 0 in" in err and "1 now" in err and "new --out" in err
    assert run_here(out, "--chunk-size", "3", "--limit", "5") == 2
    err = capsys.readouterr().err
    assert "chunk_size: 2 in" in err and "dataset.limit: 6 in" in err
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": p.id, "problem": p.prompt, "answer": p.answer}) + "\n"
                            for p in bundled.test_problems(6)))
    assert run_here(out, "--data", str(data)) == 2
    assert "dataset.sha256" in capsys.readouterr().err
    assert run_here(out, "--verifier", "likelihood") == 2  # the same head, another folder
    err = capsys.readouterr().err
    assert "prm_sha256" in err
    assert run_here(out, "--vote-key", "math") == 2
    assert "settings.vote_key: 'normalized' in" in capsys.readouterr().err
    assert run_here(out, "--recipe", "sal") == 2  # a recipe is its settings (and its name)
    err = capsys.readouterr().err
    assert "settings.num_iterations: 8 in" in err and "40 now" in err and "recipe: '<absent>' in" in err
    with pytest.raises(SystemExit, match="--verifier prm"):  # the likelihood verifier is no published PRM
        run_here(out, "--verifier", "likelihood", "--verifier-preset", "auto")
    assert (out / "results.jsonl").read_text() == before  # nothing mixed in

    # A folder written before a search setting existed: that setting at its default is no change.
    cfg = json.loads((out / "config.json").read_text())
    for added in ("lookahead", "stop", "top_k", "vote_key"):
        assert cfg["settings"].pop(added) == Settings().as_dict()[added]
    (out / "config.json").write_text(json.dumps(cfg))
    assert run_here(out) == 0
    assert (out / "results.jsonl").read_text() == before

    (out / "config.json").unlink()
    assert run_here(out) == 2
    assert "has part files but no config.json" in capsys.readouterr().err


def test_changed_dataset_file_is_refused(tmp_path, capsys):
    data, out = tmp_path / "data.jsonl", tmp_path / "out"
    data.write_text(json.dumps({"problem": bundled.test_problems(1)[0].prompt, "answer": "\\frac{4}{2}"}) + "\n")
    assert run_here(out, "--data", str(data), "--strategies", "majority", "--budgets", "1") == 0
    assert json.loads((out / "config.json").read_text())["grader"] == "math-verify"  # auto: a LaTeX answer
    data.write_text(data.read_text().replace("frac{4}{2}", "frac{6}{2}"))
    assert run_here(out, "--data", str(data), "--strategies", "majority", "--budgets", "1") == 2
    assert "dataset.sha256" in capsys.readouterr().err


BAD = [
    '{"id": "a", "problem": "1 + 1?", "answer": "2"}',
    'not json',
    '{"id": "b", "problem": "2 + 2?"}',
    '[1, 2]',
    '{"id": "a", "problem": "dup", "answer": 1}',
    '',
    '{"problem": "", "answer": 3}',
    '{"problem": "no id", "answer": "\\\\frac{1}{2}"}',
]


def test_bad_dataset_lines_are_reported_with_line_numbers(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(BAD) + "\n")
    with pytest.raises(DatasetError) as e:
        load_jsonl(data)
    msg = str(e.value)
    assert "5 malformed lines" in msg and "--skip-bad" in msg
    assert "line 2: bad JSON" in msg and "line 3: missing field 'answer'" in msg
    assert "line 4: not a JSON object" in msg and "line 5: duplicate id 'a' (first on line 1)" in msg
    assert "line 7: field 'problem' must be a non-empty string" in msg and "line 8" not in msg
    # the CLI refuses before any work: no output directory at all
    assert run_here(tmp_path / "out", "--data", str(data)) == 2
    assert "line 2: bad JSON" in capsys.readouterr().err and not (tmp_path / "out").exists()

    got = load_jsonl(data, skip_bad=True)
    assert [(p.id, p.line, p.index) for p in got.problems] == [("a", 1, 0), (7, 8, 1)]  # no id: 0-based line index
    assert [n for n, _ in got.skipped] == [2, 3, 4, 5, 7]
    with pytest.raises(DatasetError, match="missing field 'question'"):
        load_jsonl(data, problem_field="question")
    with pytest.raises(DatasetError, match="no problems to evaluate"):
        load_jsonl(data, problem_field="question", skip_bad=True)


def test_many_bad_lines_are_capped(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("{\n" * (MAX_REPORTED + 5))
    msg = str(pytest.raises(DatasetError, load_jsonl, data).value)
    assert f"{MAX_REPORTED + 5} malformed lines" in msg and f"line {MAX_REPORTED}:" in msg
    assert f"line {MAX_REPORTED + 1}:" not in msg and "... and 5 more" in msg


def test_skip_bad_and_prm_beam_search(tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    probs = bundled.test_problems(2)
    data.write_text("\n".join([json.dumps({"q": probs[0].prompt, "a": probs[0].answer, "key": "p0"}), "{oops",
                               json.dumps({"q": probs[1].prompt, "a": str(probs[1].answer), "key": "p1"})]) + "\n")
    out = tmp_path / "out"
    assert run_here(out, "--data", str(data), "--problem-field", "q", "--answer-field", "a", "--id-field", "key",
                    "--skip-bad", "--strategies", "prm_beam_search", "--budgets", "2") == 0
    cap = capsys.readouterr()
    assert "skipping" in cap.err and "line 2: bad JSON" in cap.err
    assert "prm_beam_search" in cap.out and "problems/s" in cap.out
    recs = lines(out / "results.jsonl")
    assert keys(recs) == [("p0", "prm_beam_search", 2), ("p1", "prm_beam_search", 2)]
    assert all(r["prm_flops"] > 0 and len(r["answers"]) == len(r["scores"]) >= 1 for r in recs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_lines"][0]["line"] == 2 and summary["config"]["grader"] == "integer"
    assert summary["rows"][0]["correct"] == sum(r["correct"] for r in recs)


def test_verifier_choice(reference, tmp_path):
    # The default (as in demo) is the trained PRM (a causal LM read as a likelihood); --verifier likelihood
    # is policy-large's own likelihood.
    cfg = json.loads((reference / "config.json").read_text())
    assert cfg["prm_head"] == "likelihood" and cfg["info"]["prm"].endswith("prm")
    out = tmp_path / "out"
    assert run_here(out, "--verifier", "likelihood", "--strategies", "best_of_n", "--budgets", "2", "--limit",
                    "2") == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["prm_head"] == "likelihood" and cfg["info"]["prm"].endswith("policy-large")
    recs = lines(out / "results.jsonl")
    assert len(recs) == 2 and all(r["prm_flops"] > 0 and 0 <= min(r["scores"]) <= 1 for r in recs)


def test_chunk_seeds_differ_and_are_stable():
    seeds = [chunk_seed(0, c) for c in range(100)] + [chunk_seed(1, c) for c in range(100)]
    assert len(set(seeds)) == 200 and all(0 <= s < 2 ** 31 for s in seeds)
    assert chunk_seed(0, 1) != chunk_seed(1, 0) and chunk_seed(3, 4) == chunk_seed(3, 4)


def test_greedy_and_a_step_search_together(tmp_path):
    # greedy runs once per chunk whatever the budget; the others at each budget.
    out = tmp_path / "out"
    assert run_here(out, "--strategies", "greedy,dvts", "--budgets", "1,2", "--limit", "2") == 0
    recs = lines(out / "results.jsonl")
    assert keys(recs) == [(p.id, s, b) for p in bundled.test_problems(2) for s in ("greedy", "dvts") for b in (1, 2)]
    greedy = [r for r in recs if r["strategy"] == "greedy"]
    assert all(r["samples"] == 1 and r["prm_tokens"] == 0 and len(r["answers"]) == 1 for r in greedy)
    assert [r["prediction"] for r in greedy if r["budget"] == 1] == [r["prediction"] for r in greedy
                                                                       if r["budget"] == 2]


def test_second_writer_is_refused_while_the_first_runs(reference, tmp_path):
    out, go, log = tmp_path / "out", tmp_path / "go", tmp_path / "first.log"
    part, held = out / "parts" / "rank-0-of-1.jsonl", RECORDS_PER_CHUNK + 3  # 3 records into chunk 1
    first = start_child(out, log, env={PAUSE_ENV: f"{held}:{go}"})
    try:
        wait_for_records(part, held, first, log)
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid
        before = snapshot(out)
        res = run_child(out)  # a second process on the same folder, same flags
        assert res.returncode == 2, res.stdout + res.stderr
        assert f"tts-kernels eval: error: {out} is in use by another tts-kernels eval (pid {first.pid} on host " \
               in res.stderr and "use another --out" in res.stderr
        res = run_child(out, nproc=2)  # a 2-rank job: rank 0 is refused, every rank exits, none hangs
        assert res.returncode != 0 and re.search(r"exitcode\s*:\s*2\b", res.stderr), res.stdout + res.stderr
        assert res.stderr.count(f"is in use by another tts-kernels eval (pid {first.pid} ") == 1
        assert snapshot(out) == before  # the refused runs changed nothing, the first is still paused
        assert first.poll() is None
        go.touch()
        assert first.wait(timeout=300) == 0, log.read_text()
    finally:
        go.touch()
        if first.poll() is None:
            first.kill()
            first.wait()
    assert (out / "results.jsonl").read_text() == (reference / "results.jsonl").read_text()
    assert [r["chunk_done"] for r in lines(part) if "chunk_done" in r] == [0, 1, 2]
    assert len(lines(part)) == 3 * (RECORDS_PER_CHUNK + 1)  # nothing from the refused runs
    assert (out / LOCK_NAME).read_text() == ""  # released
    assert run_here(out) == 0  # the folder is free again


def test_killed_writer_leaves_no_lock(reference, tmp_path):
    out, log = tmp_path / "out", tmp_path / "first.log"
    part, held = out / "parts" / "rank-0-of-1.jsonl", RECORDS_PER_CHUNK + 3
    first = start_child(out, log, env={PAUSE_ENV: f"{held}:{tmp_path / 'never'}"})
    try:
        wait_for_records(part, held, first, log)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    # The lock file stays and still names the dead process; the lock went with it.
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid
    assert run_here(out) == 0
    assert (out / "results.jsonl").read_text() == (reference / "results.jsonl").read_text()


def test_lock_file(tmp_path, capsys):
    # Held by this process: another open of the same file is refused, naming this pid, and writes nothing.
    out = tmp_path / "out"
    out.mkdir()
    with acquire(out) as lock:
        assert lock.held and json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(FolderBusy, match=f"{out} is in use by another tts-kernels eval \\(pid {os.getpid()} "):
            acquire(out)
        before = snapshot(out)
        assert run_here(out) == 2
        assert f"{out} is in use by another tts-kernels eval (pid {os.getpid()} on host" in capsys.readouterr().err
        assert snapshot(out) == before and not (out / "parts").exists() and not (out / "config.json").exists()
    assert (out / LOCK_NAME).read_text() == ""

    # A stale lock file (its pid dead, no lock held) or a garbled one blocks nothing; the new holder rewrites it.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for text in (json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "long ago"}), "{garbage"):
        (out / LOCK_NAME).write_text(text)
        with acquire(out):
            assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()


# ---------------------------------------------------------------- pooled strategies: one budget over the whole run

POOLED = ["--strategies", "compute_optimal,adaptive_best_of_n,majority", "--budgets", "2,4"]
WIDE = ("compute_optimal", "adaptive_best_of_n")
PILOTS_PER_CHUNK = 2 * 2 * 2  # problems x run-wide strategies x budgets
FINALS_PER_CHUNK = 2 * 3 * 2  # problems x strategies x budgets


@pytest.fixture(scope="module")
def pooled_reference(tmp_path_factory):
    """An uninterrupted single-process run of two run-wide pooled strategies beside a per-chunk one."""
    out = tmp_path_factory.mktemp("eval") / "pooled"
    assert run_here(out, *POOLED) == 0
    return out


def test_pooled_strategies_allocate_over_the_whole_run(pooled_reference):
    from tts_kernels.search import STRATEGIES

    parts = lines(pooled_reference / "parts" / "rank-0-of-1.jsonl")
    # Every chunk's pilot is committed before any chunk's searches.
    assert [(r.get("stage", "final"), r["chunk_done"]) for r in parts if "chunk_done" in r] == \
        [("pilot", 0), ("pilot", 1), ("pilot", 2), ("final", 0), ("final", 1), ("final", 2)]
    pilots = [r for r in parts if r.get("stage") == "pilot" and "chunk_done" not in r]
    assert len(pilots) == 3 * PILOTS_PER_CHUNK
    recs = lines(pooled_reference / "results.jsonl")
    assert keys(recs) == [(p.id, s, b) for p in bundled.test_problems(6) for s in POOLED[1].split(",") for b in (2, 4)]
    assert all("stage" not in r for r in recs)  # the results are the final records only
    table = bundled.optimal_table("prm")
    cfg = json.loads((pooled_reference / "config.json").read_text())
    assert cfg["pooled"] == {"allocation": {"compute_optimal": "run", "adaptive_best_of_n": "run"},
                             "optimal_table": hashlib.sha256(bundled.optimal_table_path().read_bytes()).hexdigest()}
    for s in WIDE:
        for b in (2, 4):
            mine = sorted((r for r in pilots if (r["strategy"], r["budget"]) == (s, b)), key=lambda r: r["index"])
            # One allocation over all 6 problems, from the pilot records as committed.
            alloc = STRATEGIES[s].fn.allocate(torch.tensor([r["features"] for r in mine], dtype=torch.float64),
                                              budget=b, table=table, settings=Settings())
            final = [r for r in recs if (r["strategy"], r["budget"]) == (s, b)]
            assert [r["info"]["n"] for r in final] == alloc.n
            assert [r["info"]["level"] for r in final] == alloc.level
            assert [r["info"]["strategy"] for r in final] == [x or "pilot" for x in alloc.strategy]
            for r, p in zip(final, mine):
                assert r["answers"][:p["pilot_n"]] == p["answers"] and r["scores"][:p["pilot_n"]] == p["scores"]
                assert r["info"]["pilot_answer"] == p["prediction"]
            # Exact accounting over the run: what was allocated was spent, within budget * problems.
            per_chunk = {r["chunk"]: r["chunk_compute"] for r in final}
            assert sum(cc["samples"] for cc in per_chunk.values()) == alloc.samples <= b * 6
            pilot_compute = {r["chunk"]: r["chunk_compute"] for r in mine}
            if b == 2:  # per chunk (2 problems, 2 samples left) no 3-sample upgrade of the table fits; run-wide some do
                chunked = [n for c in range(3) for n in STRATEGIES[s].fn.allocate(
                    torch.tensor([r["features"] for r in mine[2 * c: 2 * c + 2]], dtype=torch.float64), budget=b,
                    table=table, settings=Settings()).n]
                assert chunked == [1] * 6 and max(alloc.n) == 3
            # A record's compute is its chunk's pilot and searches together.
            assert all(per_chunk[c][k] >= pilot_compute[c][k] > 0 for c in per_chunk
                       for k in ("samples", "policy_flops", "prm_tokens"))
    # A pilot size shared by strategies and budgets is one pilot run: the same candidates.
    by = {(r["strategy"], r["budget"], r["index"]): r for r in pilots}
    for i in range(6):
        a, b = by[("compute_optimal", 2, i)], by[("adaptive_best_of_n", 4, i)]
        if a["pilot_n"] == b["pilot_n"]:
            assert a["answers"] == b["answers"] and a["scores"] == b["scores"]


def test_pooled_runs_equal_across_ranks_and_resumes(pooled_reference, tmp_path):
    want = (pooled_reference / "results.jsonl").read_text()
    res = run_child(tmp_path / "two", *POOLED, nproc=2)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "two" / "results.jsonl").read_text() == want
    # Killed in the pilot pass (3 records into the second chunk's pilots), resumed by one process.
    out = tmp_path / "killed_in_pilots"
    res = run_child(out, *POOLED, env={STOP_ENV: str(PILOTS_PER_CHUNK + 3)})
    assert res.returncode == 3, res.stdout + res.stderr
    assert run_here(out, *POOLED) == 0
    assert (out / "results.jsonl").read_text() == want
    part = lines(out / "parts" / "rank-0-of-1.jsonl")
    assert [(r.get("stage", "final"), r["chunk_done"]) for r in part if "chunk_done" in r][:1] == [("pilot", 0)]
    assert len(part) == 3 * (PILOTS_PER_CHUNK + 1) + 3 * (FINALS_PER_CHUNK + 1)  # nothing twice
    # Killed in the search pass (5 records into the second chunk), resumed by two ranks.
    out = tmp_path / "killed_in_searches"
    res = run_child(out, *POOLED, env={STOP_ENV: str(3 * PILOTS_PER_CHUNK + FINALS_PER_CHUNK + 5)})
    assert res.returncode == 3, res.stdout + res.stderr
    res = run_child(out, *POOLED, nproc=2)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming: 2 problems done, 4 to do" in res.stdout
    assert (out / "results.jsonl").read_text() == want
    assert not (out / "parts" / "rank-0-of-2.jsonl").read_text().count('"stage": "pilot"')  # pilots not redone


def test_pooled_config_records_the_table_and_the_allocation(pooled_reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(pooled_reference, out)
    assert run_here(out, *POOLED, "--optimal-table", "none") == 2
    assert "pooled.optimal_table" in capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    del cfg["pooled"]  # a folder of an earlier release, which allocated per chunk without the table
    (out / "config.json").write_text(json.dumps(cfg))
    assert run_here(out, *POOLED) == 2
    err = capsys.readouterr().err
    assert "pooled.allocation.compute_optimal: '<absent>' in" in err and "'run' now" in err
    with pytest.raises(SystemExit, match="--optimal-table: no file"):
        run_here(tmp_path / "other", *POOLED, "--optimal-table", str(tmp_path / "missing.json"))


def test_pooled_allocation_per_chunk_differs_in_scope_alone(pooled_reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(pooled_reference, out)
    assert run_here(out, *POOLED, "--pooled-allocation", "chunk") == 2  # another allocation: another config
    assert "pooled.allocation.compute_optimal: 'run' in" in capsys.readouterr().err
    out = tmp_path / "chunk"
    assert run_here(out, *POOLED, "--pooled-allocation", "chunk") == 0
    assert json.loads((out / "config.json").read_text())["pooled"]["allocation"] == \
        {"compute_optimal": "chunk", "adaptive_best_of_n": "chunk"}

    def pilots(folder):
        return [r for r in lines(folder / "parts" / "rank-0-of-1.jsonl") if r.get("stage") == "pilot" and "chunk" in r]

    assert pilots(out) == pilots(pooled_reference)  # the same pilots (seeds per problem)
    recs = lines(out / "results.jsonl")
    for s in WIDE:  # budget 2: per chunk no 3-sample upgrade fits, so every problem gets one sample more
        assert [r["info"]["n"] for r in recs if (r["strategy"], r["budget"]) == (s, 2)] == [1] * 6
    same = [r for r in recs if r["strategy"] == "majority"]
    assert same == [r for r in lines(pooled_reference / "results.jsonl") if r["strategy"] == "majority"]
