"""Reproduction: fp, GNAQ and the baselines on one dataset and one budget.

Runs full precision, GNAQ 2-bit, GNAQ 2-bit with the straight-through ablation,
LSQ 2-bit, N2UQ 2-bit and BiGeaR 1-bit with the same backbone, loss, seed and budget,
and writes ``results.md``, ``results.csv``, ``results.png`` (quality and size per
method, training curves) and one run directory per method with its ``metrics.jsonl``.

The fp run doubles as the shared warm-up: its state after ``warmup_epochs`` starts
every quantized method (same seed and batches, so identical to separate warm-ups).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

from gnaq_dist.errors import GnaqInputError
from gnaq_dist.interactions import InteractionData
from gnaq_dist.train.config import TrainConfig
from gnaq_dist.train.local import LocalTrainer, TrainResult
from gnaq_dist.runlog import RunLog, read_log

DEFAULT_METHODS: list[tuple[str, int | None]] = [
    ("fp", None), ("gnaq", 2), ("gnaq_ste", 2), ("lsq", 2), ("n2uq", 2), ("bigear", 1),
]
LABELS = {"fp": "LightGCN fp32", "gnaq": "GNAQ", "gnaq_ste": "GNAQ (STE ablation)", "lsq": "LSQ",
          "n2uq": "N2UQ", "bigear": "BiGeaR"}


@dataclass
class Row:
    method: str
    bits: int | None
    result: TrainResult
    run_dir: Path

    @property
    def label(self) -> str:
        name = LABELS.get(self.method, self.method)
        return name if self.bits is None else f"{name} {self.bits}-bit"


def parse_methods(text: str) -> list[tuple[str, int | None]]:
    """``fp,gnaq:2,bigear:1`` -> [("fp", None), ("gnaq", 2), ("bigear", 1)]."""
    out: list[tuple[str, int | None]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, bits = part.partition(":")
        try:
            default = {"fp": None, "bigear": 1}.get(name, 2)
            out.append((name, int(bits) if bits else default))
        except ValueError as exc:
            raise GnaqInputError(f"--methods: bad bit width in {part!r}") from exc
    return out


def method_config(base: TrainConfig, method: str, bits: int | None, out: Path) -> TrainConfig:
    config = copy.deepcopy(base)
    config.model.method = method
    config.model.bits = bits
    config.out = str(out)
    config.validate()
    return config


def run_reproduction(
    base: TrainConfig,
    data: InteractionData,
    out_dir: str | Path,
    methods: list[tuple[str, int | None]] | None = None,
) -> list[Row]:
    methods = methods or DEFAULT_METHODS
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Validate every configuration before any training starts.
    configs = [(m, b, method_config(base, m, b, out_dir / f"{m}{'' if b is None else f'-{b}bit'}"))
               for m, b in methods]
    rows: list[Row] = []
    warm_start = None
    ordered = sorted(configs, key=lambda c: c[0] != "fp")  # fp first: it provides the warm start
    for method, bits, config in ordered:
        run_dir = Path(config.out)
        log_path = run_dir / "metrics.jsonl"
        if log_path.exists():
            log_path.unlink()
        trainer = LocalTrainer(config, data, RunLog(log_path))
        if method == "fp":
            result = trainer.run(capture_epoch=base.schedule.warmup_epochs or None)
            warm_start = result.warm_start
        else:
            result = trainer.run(warm_start=warm_start if warm_start is not None and
                                 warm_start.epoch == config.schedule.warmup_epochs else None)
        rows.append(Row(method, bits, result, run_dir))
        write_results(rows, base, out_dir)
    return rows


COLUMNS = ["method", "recall@10", "recall@20", "ndcg@10", "ndcg@20", "bytes_per_node", "compression",
           "s_per_epoch", "fp_epochs", "quant_epochs"]


def _row_values(row: Row) -> dict[str, object]:
    r = row.result
    return {
        "method": row.label,
        "recall@10": r.metrics.get("recall@10"), "recall@20": r.metrics.get("recall@20"),
        "ndcg@10": r.metrics.get("ndcg@10"), "ndcg@20": r.metrics.get("ndcg@20"),
        "bytes_per_node": r.storage["bytes_per_node"], "compression": r.storage["compression_ratio"],
        "s_per_epoch": r.seconds_per_epoch,
        "fp_epochs": r.phase_epochs["fp"], "quant_epochs": r.phase_epochs["quantized"],
    }


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.1f}"
    return str(value)


def write_results(rows: list[Row], base: TrainConfig, out_dir: Path) -> None:
    values = [_row_values(r) for r in rows]
    with (out_dir / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(values)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(v[c]) for c in COLUMNS) + " |" for v in values]
    s = base.schedule
    lines += ["", f"Budget: {s.epochs} epochs ({s.warmup_epochs} fp warm-up + {s.epochs - s.warmup_epochs} "
              f"quantized for the quantized methods), "
              f"{f'batch {s.batch_size}' if s.batch_size else f'{s.steps_per_epoch} steps an epoch'}, {s.num_negatives} negatives, "
              f"d = {base.model.dim}, L = {base.model.num_layers}, lr {base.optim.lr}, seed {base.seed}."]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    plot_results(rows, out_dir / "results.png")


def plot_results(rows: list[Row], path: Path) -> None:
    plot_table([dict(_row_values(r), method_key=r.method, run_dir=str(r.run_dir)) for r in rows], path)


def plot_table(entries: list[dict], path: Path) -> None:
    """Training curves (from each run's metrics.jsonl) and final quality with table size.

    ``entries``: one dict per method with the results.csv columns plus ``method_key``
    and ``run_dir``, so a finished reproduction can be re-plotted from its files.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.5))
    curves = {}
    for e in entries:
        log = Path(e["run_dir"]) / "metrics.jsonl"
        curves[e["method"]] = [(r["epoch"], r["recall@20"]) for r in read_log(log, "eval")] if log.exists() else []
    fp_curve = next((curves[e["method"]] for e in entries if e["method_key"] == "fp"), [])
    for e in entries:
        points = curves[e["method"]]
        if e["method_key"] != "fp" and points:
            # A quantized run starts from the fp curve at the end of its warm-up.
            points = [p for p in fp_curve if p[0] == int(e["fp_epochs"])] + points
        if points:
            xs, ys = zip(*points)
            ax_curve.plot(xs, ys, marker="o", label=e["method"])
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel("Recall@20")
    ax_curve.set_title("Training curves (evaluated from the packed tables)")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8)
    recalls = [float(e["recall@20"] or 0.0) for e in entries]
    bars = ax_bar.bar(range(len(entries)), recalls, color="tab:blue")
    ax_bar.set_xticks(range(len(entries)), [e["method"] for e in entries], rotation=25, ha="right", fontsize=8)
    ax_bar.set_ylabel("Recall@20")
    for bar, e in zip(bars, entries):
        ax_bar.annotate(f"{float(e['bytes_per_node']):.0f} B/node\n{float(e['compression']):.1f}x",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax_bar.set_ylim(0, max(recalls + [1e-3]) * 1.2)
    ax_bar.set_title("Final quality and table size per node")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="ingested dataset URI")
    parser.add_argument("out", help="directory for results.md/.csv/.png and the per-method runs")
    parser.add_argument("--methods", default=None,
                        help="comma list of method[:bits] (default: fp,gnaq:2,gnaq_ste:2,lsq:2,n2uq:2,bigear:1)")
    parser.add_argument("--no-progress", action="store_true")


def run_reproduce_from_args(args: argparse.Namespace) -> int:
    from gnaq_dist.config import load_config
    from gnaq_dist.dataset import load_dataset

    overrides = [f"dataset={args.dataset}"] + (["progress=false"] if args.no_progress else []) + args.overrides
    base = load_config(TrainConfig, args.config, overrides)
    methods = parse_methods(args.methods) if args.methods else None
    for m, b in methods or DEFAULT_METHODS:
        method_config(base, m, b, Path(args.out))  # fail before loading data or training
    data = load_dataset(base.dataset, storage_options=base.storage_options)
    t0 = time.time()
    rows = run_reproduction(base, data, args.out, methods)
    print((Path(args.out) / "results.md").read_text())
    print(json.dumps({"seconds": round(time.time() - t0, 1), "out": str(args.out)}))
    return 0 if rows else 1
