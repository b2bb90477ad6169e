"""The main job on the bundled Last.fm sample: ingest, train, evaluate, report.

``gnaq run`` with no arguments works on a fresh machine: the data
(``gnaq_dist/data/lastfm``, see its ORIGIN.md) and the config
(``gnaq_dist/configs/demo.yaml``) ship inside the package. It trains full precision
and GNAQ 2-bit on one budget (GNAQ starts from the fp run's warm-up), and prints the
results table and the path of the training-curve plot.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gnaq_dist.config import from_dict, load_config

PACKAGE = Path(__file__).resolve().parent
BUNDLED_LOG = PACKAGE / "data" / "lastfm" / "interactions.parquet"
DEMO_CONFIG = PACKAGE / "configs" / "demo.yaml"
DEMO_METHODS: list[tuple[str, int | None]] = [("fp", None), ("gnaq", 2)]


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
             progress: bool = True) -> Path:
    from gnaq_dist.dataset import load_dataset
    from gnaq_dist.reproduce import run_reproduction
    from gnaq_dist.train.config import TrainConfig

    out = Path(out)
    t0 = time.time()
    dataset = ingest_bundled(out / "dataset", progress)
    base = load_config(TrainConfig, [DEMO_CONFIG, *configs],
                       [f"dataset={dataset}", f"progress={str(progress).lower()}", *overrides])
    data = load_dataset(base.dataset)
    run_reproduction(base, data, out, DEMO_METHODS)
    print((out / "results.md").read_text())
    print(f"plot: {out / 'results.png'}   logs: {out}/*/metrics.jsonl   total {time.time() - t0:.0f} s")
    return out


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--no-progress", action="store_true")


def run_demo_from_args(args: argparse.Namespace) -> int:
    run_demo(args.out, args.config, args.overrides, progress=not args.no_progress)
    return 0
