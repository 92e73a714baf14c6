"""What the applications print and write: machine facts, tables, run summaries and the scaling plot.

Shared by ``bench`` and ``check`` (:func:`print_table`), ``demo`` and ``eval``
(:func:`summarize`, :func:`print_summary`, :func:`plot_scaling`), and everything that writes a
JSON record of a run (:func:`machine_info`, :func:`write_json`).
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

COLUMNS = [("op", "op"), ("shape", "shape"), ("dtype", "dtype"), ("device", "device"), ("peer_ms", "peer ms"),
           ("ours_ms", "ours ms"), ("ratio", "ratio"), ("gbs", "GB/s"), ("floor_pct", "% floor")]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if v < 100 else f"{v:.1f}"
    return "-" if v is None else str(v)


def print_table(rows: list[dict], file=sys.stdout) -> None:
    cells = [[h for _, h in COLUMNS]] + [[_fmt(r.get(k)) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    for j, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)), file=file)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=file)
    file.flush()


def write_json(path: str | Path | None, data) -> None:
    """``data`` as indented JSON at ``path``; nothing when ``path`` is None (a script's ``--json``)."""
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)


def machine_info() -> dict:
    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def summarize(runs: list[dict], problems: int) -> list[dict]:
    """One row per (model, strategy, budget): accuracy and compute per problem; with a run's per-problem
    ``outcomes`` also their 95% bootstrap interval (``ci95``) and the outcomes themselves."""
    from ..bench.stats import bootstrap_ci

    rows = []
    for r in runs:
        c = r["compute"]
        extra = {}
        if r.get("outcomes") is not None:
            extra = {"ci95": list(bootstrap_ci(r["outcomes"])), "outcomes": list(r["outcomes"])}
        rows.append({**extra, "model": r["model"], "strategy": r["strategy"], "budget": r["budget"],
                     "accuracy": r["correct"] / problems, "correct": r["correct"], "problems": problems,
                     "samples_per_problem": r["samples"] / problems,
                     "policy_tokens_per_problem": (c["policy_prefill_tokens"] + c["policy_generated_tokens"]) / problems,
                     "prm_tokens_per_problem": c["prm_tokens"] / problems,
                     "flops_per_problem": (c["policy_flops"] + c["prm_flops"]) / problems, "seconds": r["seconds"]})
    return rows


def print_summary(rows: list[dict], file=sys.stdout) -> None:
    ci = any("ci95" in r for r in rows)
    head = ["policy", "strategy", "budget", "accuracy"] + (["95% interval"] if ci else []) + [
        "samples/prob", "policy tok/prob", "PRM tok/prob", "MFLOP/prob", "seconds"]

    def interval(r):
        return [f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}" if "ci95" in r else "-"] if ci else []

    cells = [head] + [[r["model"], r["strategy"], str(r["budget"]), f"{r['accuracy']:.3f} ({r['correct']}/{r['problems']})",
                       *interval(r), f"{r['samples_per_problem']:.1f}", f"{r['policy_tokens_per_problem']:.0f}",
                       f"{r['prm_tokens_per_problem']:.0f}", f"{r['flops_per_problem'] / 1e6:.1f}",
                       f"{r['seconds']:.1f}"] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for j, c in enumerate(cells):
        print("  ".join(x.ljust(w) for x, w in zip(c, widths)), file=file)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=file)


def plot_scaling(curves: list[dict], path: Path, title: str, references: list[dict] = ()) -> None:
    """Accuracy against budget and against FLOPs per problem: one line per strategy of ``curves`` (in
    order of first appearance), each row of ``references`` (greedy runs) a horizontal line and a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in dict.fromkeys(r["strategy"] for r in curves):
        pts = sorted((r["budget"], r["flops_per_problem"], r["accuracy"]) for r in curves if r["strategy"] == s)
        axes[0].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=s)
        axes[1].plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=s)
    for r in references:
        style = dict(color="gray" if r["model"] == "small" else "black", linestyle="--" if r["model"] == "small"
                     else ":", label=f"{r['model']} policy, greedy")
        axes[0].axhline(r["accuracy"], **style)
        axes[1].axhline(r["accuracy"], **style)
        axes[1].plot([r["flops_per_problem"]], [r["accuracy"]], marker="*", markersize=12, color=style["color"])
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("budget (samples or beams per problem)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("FLOPs per problem (policy + verifier, measured)")
    for ax in axes:
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left", ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
