"""The reproduction pipeline and the main job, on small data: every output is written
and holds what the runs measured."""

from __future__ import annotations

import csv

import pytest

from gnaq_dist.cli import main as gnaq_main
from gnaq_dist.config import load_config
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.reproduce import DEFAULT_METHODS, parse_methods, run_reproduction
from gnaq_dist.runlog import read_log
from gnaq_dist.synthetic import clustered_interactions
from gnaq_dist.train.config import TrainConfig


def test_reproduction_runs_every_method_and_writes_table_and_plot(tmp_path):
    data = clustered_interactions(n_users=200, n_items=120, seed=2)
    base = load_config(TrainConfig, [], [
        "model.dim=16", "model.num_layers=2", "schedule.epochs=6", "schedule.warmup_epochs=4",
        "schedule.batch_size=256", "schedule.eval_every=2", "optim.lr=0.02", "progress=false",
    ])
    rows = run_reproduction(base, data, tmp_path)
    assert [(r.method, r.bits) for r in rows] == DEFAULT_METHODS
    with (tmp_path / "results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [t["method"] for t in table] == [r.label for r in rows]
    for row, line in zip(rows, table):
        assert float(line["recall@20"]) == pytest.approx(row.result.metrics["recall@20"])
        evals = list(read_log(row.run_dir / "metrics.jsonl", "eval"))
        assert evals[-1]["recall@20"] == pytest.approx(row.result.metrics["recall@20"])
    # Every quantized method started from the fp run's state after the warm-up.
    assert all(int(t["fp_epochs"]) == (6 if t["method"].startswith("LightGCN") else 4) for t in table)
    gnaq = next(r for r in rows if r.method == "gnaq")
    assert gnaq.result.storage["bytes_per_node"] == 16 * 2 / 8 + 4 * 2 + 2  # codes + 4 fp16 levels + fp16 bias
    md = (tmp_path / "results.md").read_text()
    assert "GNAQ 2-bit" in md and "BiGeaR 1-bit" in md and "Budget: 6 epochs" in md
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_methods_list_is_validated_before_training(tmp_path, capsys):
    assert parse_methods("fp,gnaq:4,bigear") == [("fp", None), ("gnaq", 4), ("bigear", 1)]
    with pytest.raises(GnaqInputError):
        parse_methods("gnaq:two")
    code = gnaq_main(["reproduce", str(tmp_path / "missing"), str(tmp_path / "out"), "--methods", "gnaq:3"])
    assert code == 2
    assert "bit width" in capsys.readouterr().err


@pytest.mark.slow
def test_main_job_runs_on_the_bundled_data(tmp_path, capsys):
    """`gnaq run`: ingest the bundled Last.fm, fp in process, GNAQ 2-bit on 2 local Ray
    workers with checkpoints, export the last checkpoint, serve a top-K from the bundle."""
    code = gnaq_main(["run", "--out", str(tmp_path), "--no-progress", "--set", "schedule.epochs=3",
                      "--set", "schedule.warmup_epochs=2", "--set", "model.dim=16", "--set", "schedule.eval_every=1",
                      "--set", "checkpoint.every_epochs=2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "GNAQ 2-bit (Ray, 2 workers)" in out and "LightGCN fp32" in out
    assert (tmp_path / "dataset" / "manifest.json").exists()
    assert (tmp_path / "results.png").exists()
    checkpoints = sorted((tmp_path / "gnaq" / "checkpoints").glob("ckpt-*/manifest.json"))
    assert len(checkpoints) == 2  # epoch 2 and the end of the run
    assert (tmp_path / "bundle" / "bundle.json").exists()
    assert "12.00 bytes/node" in out and "gnaq recommend" in out
    with (tmp_path / "results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert table[1]["workers"] == "2"
    assert float(table[1]["bytes_per_node"]) == 12.0  # d = 16: 4 bytes of codes + 4 fp16 levels
    assert float(table[1]["recall@20"]) > 0.02  # Last.fm: far above random (about 0.005)
