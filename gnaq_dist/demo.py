"""The main job on the bundled Last.fm sample: ingest, train on Ray, checkpoint, export, report.

``gnaq run`` with no arguments works on a fresh machine: the data
(``gnaq_dist/data/lastfm``, see its ORIGIN.md) and the config
(``gnaq_dist/configs/demo.yaml``) ship inside the package. It trains GNAQ 2-bit as
Ray Train workers (a local Ray with 2 workers by default, sharded tables, 2-bit
gradients), writes sharded checkpoints, exports the final one as an edge bundle and
serves a top-K from it; a full-precision run in this process on the same budget is
the reference for quality and size. Both runs get the same thread budget: each Ray
worker runs ``threads`` torch threads, the fp run ``workers x threads`` (so the seconds
compare like with like). It prints the results table and writes ``results.png``: the
training curves with GNAQ's quantized phase shaded, and Recall@20 against bytes per node.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gnaq_dist.config import from_dict, load_config

PACKAGE = Path(__file__).resolve().parent
BUNDLED_LOG = PACKAGE / "data" / "lastfm" / "interactions.parquet"
DEMO_CONFIG = PACKAGE / "configs" / "demo.yaml"
DEMO_METHODS: list[tuple[str, int | None]] = [("fp", None), ("gnaq", 2)]
COLUMNS = ["method", "workers", "threads", "recall@10", "recall@20", "ndcg@10", "ndcg@20", "bytes_per_node",
           "compression", "seconds"]


def ingest_bundled(out: str | Path, progress: bool = True) -> str:
    """Ingest the bundled Last.fm sample (its own train/test split) into ``out``."""
    from gnaq_dist.ingest import IngestConfig, ingest

    config = from_dict(IngestConfig, {
        "columns": {"weight": "weight", "split": "split"}, "split": {"strategy": "column"},
        "progress": progress,
    })
    ingest(str(BUNDLED_LOG), str(out), config, overwrite=True)
    return str(out)


def run_demo(out: str | Path = "runs/demo", configs: list[str] = (), overrides: list[str] = (),
             progress: bool = True, workers: int = 2, address: str | None = None) -> Path:
    """Ingest, fp reference (in process), GNAQ on ``workers`` Ray workers, export, serve, report."""
    from gnaq_dist.dataset import load_dataset
    from gnaq_dist.distributed.ray_launch import train_on_ray, write_run_files
    from gnaq_dist.export import export_checkpoint, format_size_report
    from gnaq_dist.serving import Bundle
    from gnaq_dist.train.config import TrainConfig
    from gnaq_dist.train.local import train_local

    out = Path(out).resolve()
    t0 = time.time()
    dataset = ingest_bundled(out / "dataset", progress)
    # A demo starts afresh (resume=never); `gnaq train` resumes from its checkpoints by default.
    base = load_config(TrainConfig, [DEMO_CONFIG, *configs],
                       [f"dataset={dataset}", f"progress={str(progress).lower()}", "checkpoint.resume=never",
                        *overrides])
    fp_config, quant, budget = demo_configs(base, workers, out)
    rows = []
    t1 = time.time()
    fp = train_local(fp_config, data=load_dataset(dataset), log_path=out / "fp" / "metrics.jsonl")
    rows.append({"method": "LightGCN fp32", "method_key": "fp", "workers": 1, "threads": fp_config.threads,
                 **_metrics(fp.metrics), "bytes_per_node": fp.storage["bytes_per_node"], "compression": 1.0,
                 "seconds": time.time() - t1, "run_dir": str(out / "fp"), "fp_epochs": 0})
    t1 = time.time()
    summary = train_on_ray(quant, workers, address=address)
    write_run_files(summary, out / "gnaq")
    label = f"GNAQ {quant.model.bits}-bit (Ray, {summary['world_size']} workers)"
    rows.append({"method": label, "method_key": "gnaq", "workers": summary["world_size"], "threads": quant.threads,
                 **_metrics(summary["metrics"]), "bytes_per_node": summary["storage"]["bytes_per_node"],
                 "compression": summary["storage"]["compression_ratio"], "seconds": time.time() - t1,
                 "run_dir": str(out / "gnaq"), "fp_epochs": 0})
    bundle_dir = out / "bundle"
    report = export_checkpoint(summary["checkpoint"], str(bundle_dir), overwrite=True)
    bundle = Bundle.load(bundle_dir)
    user = bundle.user_ids[0]
    _write_results(rows, out)
    plot_demo(rows, out / "results.png", quant.schedule.warmup_epochs)
    print((out / "results.md").read_text())
    print(budget)
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"bundle: {bundle_dir}\n{format_size_report(report)}")
    print(_example_recommendation(bundle, user).replace("{bundle}", str(bundle_dir)))
    print(f"plot: {out / 'results.png'}   logs: {out}/*/metrics.jsonl   total {time.time() - t0:.0f} s")
    return out


def demo_configs(base, workers: int, out: Path):
    """The fp reference's and GNAQ's configs on one thread budget, and the line that says so.

    Each Ray worker runs ``threads`` torch threads (the config's, else 1); the fp run in this
    process gets all of them, ``workers x threads``, so both runs use the same number of cores and
    the ``seconds`` column compares like with like.
    """
    from gnaq_dist.train.config import TrainConfig

    per_worker = base.threads or 1
    budget = workers * per_worker
    fp = from_dict(TrainConfig, {**_as_dict(base), "out": str(out / "fp"), "threads": budget,
                                 "model": {**_as_dict(base.model), "method": "fp", "bits": None}})
    quant = from_dict(TrainConfig, {**_as_dict(base), "out": str(out / "gnaq"), "threads": per_worker})
    line = (f"threads: {budget} for each run (fp32: 1 process x {budget} torch threads; "
            f"GNAQ: {workers} Ray workers x {per_worker})")
    return fp, quant, line


def demo_figure(rows: list[dict], quantized_after: int | None = None):
    """Two panels: Recall@20 over epochs with the quantized phase shaded, and Recall@20 against
    bytes per node (log scale) for each run. ``rows``: the results rows with ``run_dir``;
    ``quantized_after``: the last fp epoch (the warm-up), else read from the logs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gnaq_dist.runlog import read_log

    fig, (ax_curve, ax_bytes) = plt.subplots(1, 2, figsize=(12, 4.5))
    last_epoch = 0
    for row in rows:
        log = Path(row["run_dir"]) / "metrics.jsonl"
        if not log.exists():
            continue
        points = [(r["epoch"], r["recall@20"]) for r in read_log(log, "eval") if r.get("recall@20") is not None]
        epochs = [r for r in read_log(log, "epoch")]
        if row["method_key"] != "fp":
            first_quantized = [r["epoch"] for r in epochs if r.get("phase") == "quantized"]
            if first_quantized:
                quantized_after = min(first_quantized) - 1
        last_epoch = max([last_epoch] + [r["epoch"] for r in epochs] + [p[0] for p in points])
        if points:
            xs, ys = zip(*points)
            ax_curve.plot(xs, ys, marker="o", label=row["method"])
    if quantized_after is not None and last_epoch > quantized_after:
        ax_curve.axvspan(quantized_after, last_epoch, color="tab:orange", alpha=0.12,
                         label=f"quantized phase (after epoch {quantized_after})")
        ax_curve.axvline(quantized_after, color="tab:orange", linestyle="--", linewidth=1)
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel("Recall@20")
    ax_curve.set_title("Training curves (GNAQ: fp warm-up, then quantized)")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8)
    for row in rows:
        x, y = float(row["bytes_per_node"]), float(row["recall@20"] or 0.0)
        ax_bytes.scatter([x], [y], s=60, zorder=3)
        ax_bytes.annotate(f"{row['method']}\n{x:.0f} B/node, {float(row['compression']):.1f}x smaller",
                          (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
    ax_bytes.set_xscale("log")
    sizes = [float(r["bytes_per_node"]) for r in rows] or [1.0]
    ax_bytes.set_xlim(min(sizes) / 2, max(sizes) * 2)
    from matplotlib.ticker import NullFormatter

    ax_bytes.xaxis.set_minor_formatter(NullFormatter())
    ax_bytes.set_xticks(sorted(set(sizes)), [f"{s:g}" for s in sorted(set(sizes))])
    recalls = [float(r["recall@20"] or 0.0) for r in rows]
    ax_bytes.set_ylim(0, max(recalls + [1e-3]) * 1.25)
    ax_bytes.set_xlabel("embedding table, bytes per node (log)")
    ax_bytes.set_ylabel("Recall@20")
    ax_bytes.set_title("Quality against size")
    ax_bytes.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def plot_demo(rows: list[dict], path: Path, quantized_after: int | None = None) -> list[str]:
    """Write :func:`demo_figure` to ``path``; returns its panels' titles."""
    import matplotlib.pyplot as plt

    fig = demo_figure(rows, quantized_after)
    titles = [ax.get_title() for ax in fig.axes]
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return titles


def _as_dict(obj) -> dict:
    from gnaq_dist.config import to_dict

    return to_dict(obj)


def _metrics(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")}


def _write_results(rows: list[dict], out: Path) -> None:
    import csv

    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def fmt(column: str, v) -> str:
        if column == "threads":
            return str(v)
        if column in ("bytes_per_node", "seconds"):
            return f"{v:.1f}"
        if column == "compression":
            return f"{v:.1f}x"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(c, r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _example_recommendation(bundle, user) -> str:
    """Top-5 for the bundle's first user, served from the bundle alone (numpy + pyarrow)."""
    ((items, scores),) = bundle.recommend([user], k=5)
    shown = ", ".join(f"{i} ({s:.3f})" for i, s in zip(items, scores))
    return f"gnaq recommend {{bundle}} --user {user} -k 5  ->  {shown}"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers for GNAQ (default 2)")
    parser.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    parser.add_argument("--no-progress", action="store_true")


def run_demo_from_args(args: argparse.Namespace) -> int:
    run_demo(args.out, args.config, args.overrides, progress=not args.no_progress, workers=args.workers,
             address=args.address)
    return 0
