"""Recall@20 over training time of finished runs, as a fraction of a ceiling (the oracle's).

Reads each run directory's ``metrics.jsonl`` (one-process or Ray runs), plots every
evaluation's Recall@20 / ``--ceiling`` against its training seconds, marks where the
quantized phase starts, and prints a table of the evaluations with seconds per epoch.

    python benchmarks/plot_run_quality.py /tmp/s10/run-w2 /tmp/full/run-w2 --label 1/10 --label full \\
        --ceiling 0.4450 --ceiling 0.43 --out docs/img/scale-quality.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--label", action="append", default=[])
    p.add_argument("--ceiling", action="append", type=float, default=[], help="Recall@20 of the oracle, per run")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, run in enumerate(args.runs):
        label = args.label[i] if i < len(args.label) else run.name
        ceiling = args.ceiling[i] if i < len(args.ceiling) else 1.0
        recs = records(run)
        evals = [r for r in recs if r.get("event") == "eval" and "train_seconds" in r]
        epochs = [r for r in recs if r.get("event") == "epoch"]
        xs = [r["train_seconds"] / 60 for r in evals]
        ys = [r["recall@20"] / ceiling for r in evals]
        line, = ax.plot(xs, ys, marker="o", label=f"{label} (ceiling {ceiling:.4f})")
        quant = [r for r in evals if r["phase"] == "quantized"]
        if quant:
            ax.plot([r["train_seconds"] / 60 for r in quant], [r["recall@20"] / ceiling for r in quant], "s",
                    color=line.get_color(), markersize=8, markerfacecolor="none")
        per_epoch = sum(r["seconds"] for r in epochs) / max(len(epochs), 1)
        print(f"{label}: {len(epochs)} epochs, {per_epoch:.1f} s an epoch")
        for r in evals:
            print(f"  epoch {r['epoch']:>3} {r['phase']:<9} {r['train_seconds'] / 60:6.1f} min  "
                  f"recall@20 {r['recall@20']:.4f}  ({r['recall@20'] / ceiling:.3f} of the ceiling)")
    ax.axhline(0.9, color="grey", lw=0.6, ls="--")
    ax.axhline(0.8, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("training minutes (evaluation excluded); squares: quantized 2-bit table")
    ax.set_ylabel("Recall@20 / oracle Recall@20")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
