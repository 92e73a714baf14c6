"""`tts-kernels eval`: strategies at several budgets over a problem set, sharded over ranks, resumable.

    tts-kernels eval --out DIR [--data FILE.jsonl] [--strategies weighted_best_of_n] [--budgets 1,4,16]
                     [--verifier prm|likelihood] [--policy PATH] [--verifier-model PATH] [--limit K] [--seed S]
                     [--device cpu|cuda] ...
    torchrun --nproc_per_node N -m tts_kernels eval --out DIR ...

Without ``--data`` it runs the first 100 bundled held-out arithmetic problems (``--limit K``: the
first K) with the bundled small policy and the verifier ``--verifier`` names (as in ``demo``:
``prm``, the default, or ``likelihood``; ``--verifier-model`` points it at another folder). With
several nodes, ``--out`` must be on a filesystem every node sees (rank 0 merges all ranks' part
files). Datasets: :mod:`tts_kernels.apps.eval_data`; graders: :mod:`tts_kernels.apps.grading`.

Same results for any number of ranks, and after any number of restarts. The sampler's
random stream depends on a row's place in its batch, so a problem's outputs depend on its
batch-mates. Problems are therefore run in fixed chunks of ``--chunk-size`` consecutive
problems (part of the config), chunk ``c`` with seed :func:`chunk_seed` ``(S, c)``, every
strategy and budget of a chunk before any of its records is written. A 1-rank run, an
N-rank run and a resumed run compute exactly the same batches; which rank runs a chunk
does not matter (the chunks still to do are dealt round-robin over the ranks).

Nothing lost. Rank ``r`` of ``w`` appends to ``DIR/parts/rank-r-of-w.jsonl``: one flushed line
per record, then a ``{"chunk_done": c, ...}`` line that commits the chunk, then fsync. A chunk
is complete when its commit line follows all its records. On start every rank rewrites its own
part file without incomplete chunks (what a kill left), then rank 0 reads all part files (of
any world size, so a run can resume with a different number of ranks) and deals out the
chunks not complete. At the end rank 0 merges the first complete copy of every chunk into
``DIR/results.jsonl`` (dataset order, then strategy, then budget), writes ``DIR/summary.json``
and ``DIR/scaling.png`` and prints the table. ``DIR/config.json`` (strategies, budgets, seed,
chunk size, search settings, device type, model and dataset hashes, fields, limit, grader) is
written by the first run; a later run with any of these changed is refused
(:class:`ConfigMismatch`); a search setting that a folder's config lacks (added to
:class:`~tts_kernels.search.Settings` after it was written) counts as equal when it has its
default value, which is how the old run behaved. Part files: :mod:`tts_kernels.apps.eval_parts`.

Strategies that pool their budget over the prompts of a call (``compute_optimal``,
``adaptive_best_of_n``) spend it over the whole run instead of per chunk
(:mod:`tts_kernels.apps.eval_pooled`): a first pass runs every chunk's pilot (stage ``"pilot"`` of the part
files, resumable and dealt over the ranks like the chunks), then one allocation per (strategy, budget)
over every problem is computed from the pilot records read back from the part files (the same on every
rank and after any restart), then each chunk runs its searches with the allocated samples together with the
other strategies' work. Their problems draw under per-problem seeds, and they read the fitted
compute-optimal table ``--optimal-table`` names (default ``auto``: the bundled table when the bundled
policy and verifier run, else none); ``config.json`` records the table's sha256 and each pooled
strategy's allocation: ``"run"``; ``"chunk"`` with ``--pooled-allocation chunk`` (the same pilots and seeds,
one allocation per chunk); ``"call"`` for a pooled strategy registered without separable moves, run as one
call per chunk under the chunk's seed like the other strategies.

Per-record compute: a chunk's :class:`~tts_kernels.search.Compute` is spent on its problems
together (shared prefill, batched decoding), so each record carries an even share of it
(``policy_tokens``, ``prm_tokens``, ``policy_flops``, ``prm_flops``, ``samples``: chunk total /
problems in the chunk) and the chunk's totals in ``chunk_compute``. Sums over a run are exact.

One writer per folder. Two runs writing one ``DIR`` at once would interleave their part files,
so rank 0 locks the folder (:mod:`tts_kernels.apps.eval_lock`: an OS ``flock`` on ``DIR/eval.lock``)
after the dataset and models are checked (a bad dataset still leaves no ``DIR``) and before anything
in ``DIR`` is written, and holds it for the whole run (:func:`main` releases it on return or
error; the OS drops it on any exit, a kill included, so a lock file a dead run left behind
blocks nothing). The other ranks of a torchrun job
wait for rank 0's answer before touching ``DIR``, so they share its lock. A run that finds the
folder locked is refused on every rank (status 2, the error names ``DIR`` and the holder's pid,
host and start time) and changes nothing in ``DIR``.

Test hooks: ``TTS_EVAL_STOP_AFTER=K`` makes a process exit (status 3, like a kill) right after
writing its K-th record; ``TTS_EVAL_PAUSE_AFTER=K:PATH`` makes it wait there, still holding the
folder, until ``PATH`` exists (at most 10 minutes), then carry on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from .. import __version__, bundled
from ..search import STRATEGIES, OptimalTable, Settings, run, run_together
from ..models.prm_formats import PRESETS
from ..search.settings import RECIPES, VOTE_KEYS
from .eval_data import DatasetError, bundled_dataset, describe_bad, load_jsonl
from .eval_lock import FolderBusy, acquire
from .eval_parts import FINAL, PILOT, CommitTail, expected_keys, repair, scan
from .eval_pooled import pilot_chunk, plan, run_wide, search_chunk
from .grading import GRADERS, get_grader, grader_name
from .options import add_strategies_argument, add_verifier_argument, parse_budgets, parse_strategies
from .report import machine_info, plot_scaling, print_summary, summarize

STOP_ENV = "TTS_EVAL_STOP_AFTER"
PAUSE_ENV = "TTS_EVAL_PAUSE_AFTER"
BUNDLED_PROBLEMS = 100  # default held-out set; `--limit K` takes its first K (K > 100: more of the same stream)
FORMAT = 1  # of config.json and the part files
COMPUTE_FIELDS = ("policy_prefill_tokens", "policy_generated_tokens", "prm_tokens", "policy_flops", "prm_flops")


class ConfigMismatch(RuntimeError):
    """``--out`` holds a run with another configuration (or is not an eval directory)."""


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of chunk ``chunk`` in a run with ``--seed seed`` (a 31-bit hash of both,
    so chunks of nearby seeds do not share streams the way ``seed + chunk`` would)."""
    return int.from_bytes(hashlib.sha256(f"tts-eval/{seed}/{chunk}".encode()).digest()[:4], "little") & 0x7FFFFFFF


# --verifier name -> the bundled folder it reads by default. ``likelihood`` reads its folder as a causal LM's
# likelihood; ``prm`` by what the folder holds (bundled.verifier_head: the bundled PRM, a causal LM, as a
# likelihood; a token classifier as a 2-label step classifier).
VERIFIER_FOLDERS = {"likelihood": "policy-large", "prm": "prm"}


def add_arguments(ap) -> None:
    ap.add_argument("--out", required=True, help="directory for results.jsonl, summary.json, scaling.png (resumable)")
    ap.add_argument("--data", default=None, help="JSONL dataset (default: the bundled held-out arithmetic problems)")
    add_strategies_argument(ap, "weighted_best_of_n")
    ap.add_argument("--budgets", default="1,4,16", help="samples (or beams) per problem, comma list (default 1,4,16)")
    ap.add_argument("--policy", default=None, help="policy model: a transformers folder or a .gguf file (default: the bundled policy-small)")
    add_verifier_argument(ap)
    ap.add_argument("--verifier-model", "--prm", dest="verifier_model", default=None,
                    help="verifier model folder: a causal LM for --verifier likelihood (default: the bundled "
                         "policy-large); for --verifier prm a causal LM read as a likelihood PRM (default: the "
                         "bundled prm) or a 2-label token classifier")
    ap.add_argument("--verifier-preset", default=None, choices=("auto",) + PRESETS,
                    help="read --verifier-model as a published PRM in its own input format (auto: detect it); "
                         "with --verifier prm")
    ap.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                    help="search settings of a published recipe (sal: search-and-learn's; README, 'Recipes')")
    ap.add_argument("--problem-field", default="problem", help="dataset field sent to the policy as is")
    ap.add_argument("--answer-field", default="answer")
    ap.add_argument("--id-field", default="id", help="dataset id field (missing: the 0-based line index)")
    ap.add_argument("--limit", type=int, default=None, help="only the first K problems")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--vote-key", default="normalized", choices=VOTE_KEYS,
                    help="what makes two answers one vote: the extracted string (normalized) or its value as "
                         "math-verify reads it (math: \\frac{1}{2} and 0.5 vote together)")
    ap.add_argument("--grader", default="auto",
                    help=f"{', '.join(GRADERS)} or module:function (auto: integer if every answer is one)")
    ap.add_argument("--chunk-size", type=int, default=8, help="problems per batch; part of the config (default 8)")
    ap.add_argument("--optimal-table", default="auto",
                    help="compute_optimal/adaptive_best_of_n: a fitted table file (python -m "
                         "tts_kernels.bundled.fit_optimal), none, or auto (default: the bundled table when the "
                         "bundled policy and verifier run); its sha256 is part of the config")
    ap.add_argument("--pooled-allocation", default="run", choices=("run", "chunk"),
                    help="compute_optimal/adaptive_best_of_n: spend the budget over the whole run (run: pilots of "
                         "every chunk, one allocation, then the searches; default) or within each chunk (chunk: "
                         "the same pilots and seeds, one allocation per chunk)")
    ap.add_argument("--skip-bad", action="store_true", help="skip malformed dataset lines instead of stopping")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------- distributed

class _Dist:
    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False
        if device == "cuda":
            self.device = torch.device(f"cuda:{self.local_rank}" if self.world > 1 else "cuda")
            if self.world > 1:
                torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="gloo" if device == "cpu" else "nccl")
            self.owned = True

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- config

def _digest(folder: Path) -> str:
    """sha256 of a model folder's config, tokenizer and weights (each file's name, then its bytes), or of a
    GGUF file (which holds all three)."""
    h = hashlib.sha256()
    if folder.suffix.lower() == ".gguf":
        folder, names = folder.parent, [folder.name]
    else:
        names = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")
                       or p.name in ("config.json", "tokenizer.json"))
    for name in names:
        h.update(name.encode() + b"\0")
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_config(out: Path, cfg: dict) -> None:
    """Refuse ``out`` when its ``config.json`` differs from ``cfg`` (``"info"`` is not compared)."""
    path = out / "config.json"
    if not path.is_file():
        raise ConfigMismatch(f"{out} has part files but no config.json: not a resumable eval directory; "
                             f"use a new --out")
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigMismatch(f"cannot read {path}: {exc}; use a new --out") from exc
    a = _flatten({k: v for k, v in old.items() if k != "info"})
    b = _flatten({k: v for k, v in json.loads(json.dumps(cfg)).items() if k != "info"})
    defaults = _flatten({"settings": Settings().as_dict()})
    for k, v in defaults.items():  # a setting added since the folder was written: the old run had its default
        if k not in a and b.get(k) == v:
            a[k] = v
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))
    if diff:
        lines = [f"  {k}: {a.get(k, '<absent>')!r} in {path}, {b.get(k, '<absent>')!r} now" for k in diff]
        raise ConfigMismatch(f"{out} holds a run with a different configuration:\n" + "\n".join(lines)
                             + "\nresume with the same dataset, models and flags, or use a new --out")


# ---------------------------------------------------------------- work

def _load_models(policy_path: Path, prm_path: Path | None, device, settings, prm_head: str = "classifier",
                 prm_preset: str | None = None):
    """The policy and the verifier (or None), through the one loader of every command
    (:func:`tts_kernels.bundled.policy_from` / ``verifier_from``): the verifier in its published format with
    ``prm_preset`` (``auto``: detected), else with the generic ``prm_head`` the run's config records."""
    from transformers.utils import logging as hf_logging


    hf_logging.disable_progress_bar()  # its loading bars would cut through the eval bars
    policy = bundled.policy_from(policy_path, device=device)  # a folder or a .gguf file
    prm = None
    if prm_path is not None:
        prm = bundled.verifier_from(prm_path, preset=prm_preset or None, head=None if prm_preset else prm_head,
                                    step_delimiter=settings.step_delimiter, device=device)
    return policy, prm


def _score(s):
    return None if s is None or (isinstance(s, float) and math.isnan(s)) else float(s)


def run_chunk(c: int, probs, strategies, budgets, policy, prm, settings, seed: int, grader, planned=None):
    """Records (in problem, strategy, budget order) and the commit line of chunk ``c``. ``planned``: the
    run-wide pooled strategies' pilots and allocations (:func:`~tts_kernels.apps.eval_pooled.plan`)."""
    prompts = [p.prompt for p in probs]
    runs, seconds, greedy = {}, {}, None
    wide = run_wide(strategies) if planned is not None else []
    for b in budgets:
        t0 = time.perf_counter()
        names = [s for s in strategies if s != "greedy" and s not in wide]
        got = {} if not names else run_together(names, policy, prm, prompts, budget=b, settings=settings,
                                                seed=chunk_seed(seed, c))
        for s in wide:
            got[s] = search_chunk(probs, s, b, policy, prm, settings, seed, planned, c)
        if "greedy" in strategies:  # the budget does not change greedy decoding: run it once per chunk
            greedy = greedy or run("greedy", policy, None, prompts, budget=1, settings=settings)
            got["greedy"] = greedy
        seconds[str(b)] = round(time.perf_counter() - t0, 4)
        runs.update({(s, b): got[s] for s in strategies})
    P, records = len(probs), []
    for i, p in enumerate(probs):
        for s in strategies:
            for b in budgets:
                res = runs[(s, b)]
                pred, cands, comp = res.predictions[i], res.candidates[i], dataclasses.asdict(res.compute)
                rec = {"id": p.id, "index": p.index, "chunk": c, "strategy": s, "budget": b,
                       "prediction": pred, "answer": p.answer, "correct": bool(grader(pred, p.answer)),
                       "answers": [x.answer for x in cands], "scores": [_score(x.score) for x in cands],
                       "samples": res.samples / P,
                       "policy_tokens": (comp["policy_prefill_tokens"] + comp["policy_generated_tokens"]) / P,
                       "prm_tokens": comp["prm_tokens"] / P, "policy_flops": comp["policy_flops"] / P,
                       "prm_flops": comp["prm_flops"] / P,
                       "chunk_compute": {**comp, "samples": res.samples, "problems": P}}
                if res.prompt_info[i]:
                    rec["info"] = res.prompt_info[i]
                records.append(rec)
    return records, {"chunk_done": c, "problems": P, "records": len(records), "seconds": seconds}


def _parse_args(args):
    budgets = parse_budgets(args.budgets)
    strategies = parse_strategies(args.strategies)
    for name in ("limit", "chunk_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    return strategies, budgets, any(STRATEGIES[s].needs_verifier for s in strategies)


def main(args) -> int:
    """The ``eval`` command (module docstring); 2 on a bad dataset, a mismatched ``--out`` or one
    another run is writing."""
    rank = int(os.environ.get("RANK", "0"))
    dist = None
    try:
        with contextlib.ExitStack() as held:  # the folder's lock, released on any return or exception
            dist = _Dist(args.device)
            return _run(args, dist, held)
    except (DatasetError, ConfigMismatch, FileNotFoundError, FolderBusy) as exc:
        if rank == 0:
            print(f"tts-kernels eval: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist is not None:
            dist.close()


def _claim(out: Path, dist: _Dist, held: contextlib.ExitStack) -> None:
    """Rank 0 locks ``out`` for the run (``held`` releases it), then tells every rank whether the run
    may go on; the other ranks touch nothing in ``out`` before that answer. Refused: every rank
    raises (:class:`FolderBusy`, or :class:`ConfigMismatch` when ``out`` cannot be made or locked)."""
    refusal = None
    if dist.rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = held.enter_context(acquire(out))
            if lock.unsupported:
                print(f"tts-kernels eval: warning: {lock.unsupported}; not guarding {out} against a second "
                      f"writer: run one eval at a time on it", file=sys.stderr)
        except FolderBusy as exc:
            refusal = ("busy", exc.holder)
        except OSError as exc:
            refusal = ("unusable", f"cannot use {out} as an eval directory: {exc}")
    refusal = dist.broadcast(refusal)
    if refusal is not None:
        kind, detail = refusal
        raise FolderBusy(out, detail) if kind == "busy" else ConfigMismatch(detail)


def _pause_hook() -> tuple[int, Path | None]:
    """``TTS_EVAL_PAUSE_AFTER=K:PATH`` as ``(K, PATH)``; ``(0, None)`` when unset."""
    value = os.environ.get(PAUSE_ENV, "")
    if not value:
        return 0, None
    k, _, path = value.partition(":")
    return int(k), Path(path)


def _pause(until: Path, limit: float = 600.0) -> None:
    deadline = time.monotonic() + limit
    while not until.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _run(args, dist: _Dist, held: contextlib.ExitStack) -> int:
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    strategies, budgets, needs_prm = _parse_args(args)
    if args.data:
        data = load_jsonl(args.data, problem_field=args.problem_field, answer_field=args.answer_field,
                          id_field=args.id_field, skip_bad=args.skip_bad, limit=args.limit)
    else:
        data = bundled_dataset(max(BUNDLED_PROBLEMS, args.limit or 0), args.limit)
    rank0 = dist.rank == 0
    if data.skipped and rank0:
        print(f"skipping {describe_bad(data.skipped, data.source)}", file=sys.stderr)
    try:
        grader = get_grader(args.grader, [p.answer for p in data.problems])
    except (ValueError, ImportError) as exc:
        raise SystemExit(f"--grader: {exc}") from None
    policy_path = Path(args.policy) if args.policy else bundled.path("policy-small")
    default_folder = VERIFIER_FOLDERS[args.verifier]
    prm_path = (Path(args.verifier_model) if args.verifier_model else bundled.path(default_folder)) if needs_prm \
        else None
    for p in (policy_path, prm_path):
        if p is not None and not (p / "config.json").is_file() and not (p.suffix.lower() == ".gguf" and p.is_file()):
            raise FileNotFoundError(f"no model folder (config.json) or .gguf file at {p}")
    prm_head = "likelihood" if args.verifier == "likelihood" or prm_path is None or prm_path.suffix.lower() == ".gguf" \
        else bundled.verifier_head(prm_path)  # a GGUF file holds a causal LM
    if args.verifier_preset and args.verifier != "prm":
        raise SystemExit("--verifier-preset reads a trained PRM: use it with --verifier prm")
    settings = Settings.recipe(args.recipe, vote_key=args.vote_key) if args.recipe else Settings(vote_key=args.vote_key)
    cfg = {"format": FORMAT, "strategies": strategies, "budgets": budgets, "seed": args.seed,
           "chunk_size": args.chunk_size, "settings": settings.as_dict(), "device": args.device,
           "dtype": "float32", "grader": grader_name(grader), "policy_sha256": _digest(policy_path),
           "prm_sha256": _digest(prm_path) if prm_path else None, "prm_head": prm_head if prm_path else None,
           "dataset": {"sha256": data.sha256, "problems": len(data.problems), "problem_field": args.problem_field,
                       "answer_field": args.answer_field, "id_field": args.id_field, "limit": args.limit,
                       "skip_bad": args.skip_bad},
           "info": {"dataset": data.source, "policy": str(policy_path), "prm": str(prm_path) if prm_path else None,
                    "tts_kernels": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S")}}
    for key, value in (("recipe", args.recipe), ("prm_preset", args.verifier_preset)):
        if value:  # only when given, so folders written before these flags existed still resume
            cfg[key] = value
    wide, table, run_settings = run_wide(strategies), None, settings
    pooled = [s for s in strategies if STRATEGIES[s].pooled]
    if pooled:  # only then, so folders of runs without them still resume
        table_path = _optimal_table(args)
        if table_path is not None:
            try:
                table = OptimalTable.load(table_path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise SystemExit(f"--optimal-table: cannot read an OptimalTable from {table_path}: {exc}") from None
            run_settings = settings.replace(optimal_table=str(table_path))  # what a per-chunk pooled strategy reads
        cfg["pooled"] = {"allocation": {s: args.pooled_allocation if s in wide else "call" for s in pooled},
                         "optimal_table": None if table_path is None else hashlib.sha256(table_path.read_bytes())
                         .hexdigest()}
        cfg["info"]["optimal_table"] = None if table_path is None else str(table_path)
    out = Path(args.out)
    _claim(out, dist, held)  # one writer per folder: nothing in `out` is written before this
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    if rank0 and not (out / "config.json").exists() and not any(parts.glob("rank-*.jsonl")):
        tmp = out / "config.json.tmp"
        tmp.write_text(json.dumps(cfg, indent=1) + "\n")
        os.replace(tmp, out / "config.json")
    dist.barrier()
    check_config(out, cfg)  # every rank refuses alike, so none is left waiting

    chunks = [data.problems[i:i + args.chunk_size] for i in range(0, len(data.problems), args.chunk_size)]
    expected = expected_keys(chunks, strategies, budgets)
    if wide:
        expected.update(expected_keys(chunks, wide, budgets, stage=PILOT))
    mine_path = parts / f"rank-{dist.rank}-of-{dist.world}.jsonl"
    repair(mine_path, expected)
    todo = None
    if rank0:
        complete = scan(parts, expected)
        finals = [c for c in range(len(chunks)) if (FINAL, c) not in complete]
        pilots = [c for c in range(len(chunks)) if (PILOT, c) not in complete] if wide and finals else []
        done_before = sum(len(chunks[c]) for c in range(len(chunks)) if (FINAL, c) in complete)
        print(f"tts-kernels eval: {len(data.problems)} problems ({data.source}), {', '.join(strategies)} at budgets "
              f"{budgets}, {dist.world} rank{'s' if dist.world > 1 else ''}, device {args.device}"
              + (f"; resuming: {done_before} problems done, {len(data.problems) - done_before} to do"
                 if complete else "")
              + (f"; {', '.join(wide)}: budget spent over the whole run, pilots of {len(pilots)} chunk"
                 f"{'s' if len(pilots) != 1 else ''} first" if wide and finals else ""), flush=True)
        todo = (pilots, finals)
    pilots_todo, todo = dist.broadcast(todo)
    mine = todo[dist.rank::dist.world]
    t_work = time.perf_counter()
    total = len(data.problems)
    tail = CommitTail(parts)
    bar = tqdm(total=total if rank0 else sum(len(chunks[c]) for c in mine), unit="problem", position=dist.local_rank,
               desc="eval (all ranks)" if rank0 and dist.world > 1 else ("eval" if rank0 else f"rank {dist.rank}"),
               disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    if rank0:
        bar.update(tail.problems())
    models: list = []

    def loaded():
        if not models:
            models.extend(_load_models(policy_path, prm_path, dist.device, settings, prm_head, args.verifier_preset))
        return models

    with _PartWriter(mine_path) as writer:
        for c in pilots_todo[dist.rank::dist.world]:  # run-wide pooled strategies: every chunk's pilot first
            writer.block(*pilot_chunk(c, chunks[c], wide, budgets, *loaded(), settings, args.seed, table))
        planned = None
        if wide and todo:  # one allocation over the whole run, from the pilot records every rank committed
            dist.barrier()
            if rank0:
                complete = scan(parts, expected)
                lost = [c for c in range(len(chunks)) if (PILOT, c) not in complete]
                planned = ("lost", lost) if lost else plan({c: complete[(PILOT, c)][0] for c in range(len(chunks))},
                                                           len(chunks), wide, budgets, settings, table,
                                                           args.pooled_allocation)
            planned = dist.broadcast(planned)
            if isinstance(planned, tuple):
                raise RuntimeError(f"pilot chunks {planned[1][:10]} are not complete in {parts} after every rank "
                                   f"finished its pilots")
        for c in mine:
            records, commit = run_chunk(c, chunks[c], strategies, budgets, *loaded(), run_settings, args.seed, grader,
                                        planned)
            writer.block(records, commit)
            bar.update(tail.problems() - bar.n if rank0 else len(chunks[c]))
    if dist.world > 1:  # rank 0 keeps its bar moving while the others finish
        work = torch.distributed.barrier(async_op=True)
        while rank0 and not work.is_completed():
            time.sleep(0.5)
            bar.update(tail.problems() - bar.n)
        work.wait()
    if not rank0:
        bar.close()
        return 0
    bar.update(tail.problems() - bar.n)
    bar.close()
    work_s = time.perf_counter() - t_work
    done_now = sum(len(chunks[c]) for c in todo)
    _finish(out, parts, expected, chunks, strategies, budgets, cfg, policy_path, dist.world,
            {"wall_seconds": round(time.perf_counter() - t_start, 2), "work_seconds": round(work_s, 2),
             "problems_this_run": done_now, "problems_per_second": round(done_now / work_s, 4) if done_now else None},
            data.skipped)
    return 0


def _finish(out, parts, expected, chunks, strategies, budgets, cfg, policy_path, world, timing, skipped):
    """Rank 0: merge the parts into results.jsonl, then summary.json, the table and scaling.png."""
    units = scan(parts, expected)
    missing = [c for c in range(len(chunks)) if (FINAL, c) not in units]
    if missing:
        raise RuntimeError(f"chunks {missing[:10]} are not complete in {parts} after every rank finished")
    complete = {c: units[(FINAL, c)] for c in range(len(chunks))}
    pilot_seconds = {c: units[(PILOT, c)][1]["seconds"] for c in range(len(chunks)) if (PILOT, c) in units}
    tmp = out / "results.jsonl.tmp"
    with open(tmp, "w") as f:
        for c in range(len(chunks)):
            for rec in complete[c][0]:
                f.write(json.dumps(rec) + "\n")
    os.replace(tmp, out / "results.jsonl")
    n = sum(len(ch) for ch in chunks)
    model = policy_path.name
    runs = []
    for s in strategies:
        for b in budgets:
            recs = [r for c in range(len(chunks)) for r in complete[c][0] if r["strategy"] == s and r["budget"] == b]
            firsts = {r["chunk"]: r["chunk_compute"] for r in reversed(recs)}  # one per chunk: its totals
            comp = {k: sum(cc[k] for cc in firsts.values()) for k in COMPUTE_FIELDS}
            seconds = sum(complete[c][1]["seconds"][str(b)] + pilot_seconds.get(c, {}).get(str(b), 0.0)
                          for c in range(len(chunks))) / len(strategies)
            runs.append({"model": model, "strategy": s, "budget": b, "correct": sum(r["correct"] for r in recs),
                         "samples": sum(cc["samples"] for cc in firsts.values()), "compute": comp, "seconds": seconds})
    rows = summarize(runs, n)
    print()
    print_summary(rows)
    print(f"\n{n} problems; this run: {timing['problems_this_run']} problems in {timing['work_seconds']:.1f} s on "
          f"{world} rank{'s' if world > 1 else ''}" + (f" = {timing['problems_per_second']:.3f} problems/s"
                                                       if timing["problems_per_second"] else ""))
    plot(rows, out / "scaling.png")
    summary = {"machine": machine_info(), "problems": n, "world_size": world, **timing, "config": cfg,
               "skipped_lines": [{"line": ln, "why": why} for ln, why in skipped], "rows": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out / 'results.jsonl'}, {out / 'summary.json'}, {out / 'scaling.png'}")


class _PartWriter:
    """Appends units to a rank's part file (opened at the first one): records flushed one by one, then the
    commit line, then fsync. Runs the test hooks (:data:`STOP_ENV`, :data:`PAUSE_ENV`) on the records."""

    def __init__(self, path: Path):
        self.path, self.f, self.written = path, None, 0
        self.stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
        self.pause_after, self.pause_until = _pause_hook()

    def block(self, records: list[dict], commit: dict) -> None:
        if self.f is None:
            self.f = open(self.path, "a", encoding="utf-8")
        f = self.f
        for rec in records:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            self.written += 1
            if self.written == self.stop_after:  # the test hook: die like a killed process
                os.fsync(f.fileno())
                os._exit(3)
            if self.written == self.pause_after:  # the test hook: hold the folder mid-run
                _pause(self.pause_until)
        f.write(json.dumps(commit) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def __enter__(self) -> _PartWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self.f is not None:
            self.f.close()


def _optimal_table(args) -> Path | None:
    """The table file ``--optimal-table`` names: ``none``; ``auto``: the bundled table when the bundled
    policy and the bundled verifier it was fitted for run (else none); or a path."""
    if args.optimal_table == "none":
        return None
    if args.optimal_table == "auto":
        bundled_models = args.policy is None and args.verifier_model is None and not args.verifier_preset
        if bundled_models and bundled.optimal_table(args.verifier) is not None:
            return bundled.optimal_table_path()
        return None
    path = Path(args.optimal_table)
    if not path.is_file():
        raise SystemExit(f"--optimal-table: no file {path} (a fitted table, none or auto)")
    return path


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against budget and against FLOPs per problem, one line per strategy."""
    plot_scaling(rows, path, f"tts-kernels eval: {rows[0]['model']} policy, {rows[0]['problems']} problems")
