"""The main job on the bundled Last.fm sample: ingest, train on Ray, checkpoint, export, report.

``gnaq run`` with no arguments works on a fresh machine: the data
(``gnaq_dist/data/lastfm``, see its ORIGIN.md) and the config
(``gnaq_dist/configs/demo.yaml``) ship inside the package. It trains GNAQ 2-bit as
Ray Train workers (a local Ray with 2 workers by default, sharded tables, 2-bit
gradients), writes sharded checkpoints, exports the final one as an edge bundle and
serves a top-K from it; a full-precision run in this process on the same budget is
the reference for quality and size. It prints the results table and writes a plot of
the training curves.
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
COLUMNS = ["method", "workers", "recall@10", "recall@20", "ndcg@10", "ndcg@20", "bytes_per_node",
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
    from gnaq_dist.reproduce import plot_table
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
    rows = []
    fp_config = from_dict(TrainConfig, {**_as_dict(base), "out": str(out / "fp"), "threads": None,
                                        "model": {**_as_dict(base.model), "method": "fp", "bits": None}})
    t1 = time.time()
    fp = train_local(fp_config, data=load_dataset(dataset), log_path=out / "fp" / "metrics.jsonl")
    rows.append({"method": "LightGCN fp32", "method_key": "fp", "workers": 1, **_metrics(fp.metrics),
                 "bytes_per_node": fp.storage["bytes_per_node"], "compression": 1.0,
                 "seconds": time.time() - t1, "run_dir": str(out / "fp"), "fp_epochs": 0})
    quant = from_dict(TrainConfig, {**_as_dict(base), "out": str(out / "gnaq")})
    t1 = time.time()
    summary = train_on_ray(quant, workers, address=address)
    write_run_files(summary, out / "gnaq")
    label = f"GNAQ {quant.model.bits}-bit (Ray, {summary['world_size']} workers)"
    rows.append({"method": label, "method_key": "gnaq", "workers": summary["world_size"],
                 **_metrics(summary["metrics"]), "bytes_per_node": summary["storage"]["bytes_per_node"],
                 "compression": summary["storage"]["compression_ratio"], "seconds": time.time() - t1,
                 "run_dir": str(out / "gnaq"), "fp_epochs": 0})
    bundle_dir = out / "bundle"
    report = export_checkpoint(summary["checkpoint"], str(bundle_dir), overwrite=True)
    bundle = Bundle.load(bundle_dir)
    user = bundle.user_ids[0]
    _write_results(rows, out)
    plot_table(rows, out / "results.png")
    print((out / "results.md").read_text())
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"bundle: {bundle_dir}\n{format_size_report(report)}")
    print(_example_recommendation(bundle, user).replace("{bundle}", str(bundle_dir)))
    print(f"plot: {out / 'results.png'}   logs: {out}/*/metrics.jsonl   total {time.time() - t0:.0f} s")
    return out


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
