"""Compare training runs side by side: their evaluation curves, final metrics and wall time.

Reads each run directory's ``metrics.jsonl`` (what ``gnaq train`` writes), prints one
row per evaluation with every run's metric, the final metrics with their relative gap to
the first run (the reference), and writes a plot of the curves.

    python pipelines/compare_runs.py runs/gowalla-w1-local runs/gowalla-w2 \
        --labels "1 process, full graph" "2 Ray workers, sampled" --out docs/img/gowalla-w2.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.runlog import read_log


def load_run(run_dir: str | Path) -> dict:
    """The eval records and the end record of one run; a clear error if it has none."""
    log = Path(run_dir) / "metrics.jsonl"
    if not log.exists():
        raise GnaqInputError(f"{log}: no such file (is {run_dir} a `gnaq train --out` directory?)")
    evals = list(read_log(log, "eval"))
    if not evals:
        raise GnaqInputError(f"{log}: no 'eval' records (the run has not evaluated yet)")
    ends = list(read_log(log, "end"))
    return {"evals": evals, "end": ends[-1] if ends else None}


def relative_gap(value: float, reference: float) -> float:
    """(value - reference) / reference: negative when value is below the reference."""
    return (value - reference) / reference if reference else float("nan")


def compare(runs: list[dict], labels: list[str], metric: str) -> str:
    """A markdown report: the curve of ``metric`` per evaluated epoch, then the final metrics."""
    epochs = sorted({r["epoch"] for run in runs for r in run["evals"]})
    lines = ["| epoch | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for epoch in epochs:
        cells = []
        for run in runs:
            hit = [r[metric] for r in run["evals"] if r["epoch"] == epoch]
            cells.append(f"{hit[-1]:.4f}" if hit else "-")
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    final = [run["evals"][-1] for run in runs]
    keys = [k for k in final[0] if "@" in k]
    lines += ["", "| run | " + " | ".join(keys) + " | wall s |", "|---" * (len(keys) + 2) + "|"]
    for label, run, last in zip(labels, runs, final):
        wall = run["end"]["time"] if run["end"] else float("nan")
        cells = []
        for k in keys:
            gap = relative_gap(last[k], final[0][k])
            cells.append(f"{last[k]:.4f}" + ("" if last is final[0] else f" ({gap:+.2%})"))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {wall:,.0f} |")
    return "\n".join(lines)


def plot(runs: list[dict], labels: list[str], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, run in zip(labels, runs):
        ax.plot([r["epoch"] for r in run["evals"]], [r[metric] for r in run["evals"]], marker="o",
                label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories; the first is the reference")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: the directory names)")
    parser.add_argument("--metric", default="recall@20")
    parser.add_argument("--out", type=Path, help="write the plot here (PNG)")
    args = parser.parse_args(argv)
    labels = args.labels or [Path(r).name for r in args.runs]
    try:
        if len(labels) != len(args.runs):
            raise GnaqInputError(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
        runs = [load_run(r) for r in args.runs]
        if args.metric not in runs[0]["evals"][-1]:
            raise GnaqInputError(f"--metric {args.metric!r}: not in {args.runs[0]}'s eval records")
    except GnaqInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(compare(runs, labels, args.metric))
    if args.out:
        plot(runs, labels, args.metric, args.out)
        print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
