"""The reproduction pipeline and the main job, on small data: every output is written
and holds what the runs measured."""

from __future__ import annotations

import csv
import json
import statistics

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
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
    assert "GNAQ 2-bit" in md and "BiGeaR 1-bit" in md and "after 4 fp epochs and trains 2 quantized" in md
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_methods_list_is_validated_before_training(tmp_path, capsys):
    assert parse_methods("fp,gnaq:4,bigear") == [("fp", None), ("gnaq", 4), ("bigear", 1)]
    with pytest.raises(GnaqInputError):
        parse_methods("gnaq:two")
    code = gnaq_main(["reproduce", str(tmp_path / "missing"), str(tmp_path / "out"), "--methods", "gnaq:3"])
    assert code == 2
    assert "bit width" in capsys.readouterr().err


def tiny_base(**extra) -> TrainConfig:
    overrides = ["model.dim=8", "model.num_layers=2", "schedule.epochs=4", "schedule.warmup_epochs=2",
                 "schedule.batch_size=512", "schedule.eval_every=1", "optim.lr=0.05", "progress=false",
                 "eval.ks=[10,20]", "seed=5"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(TrainConfig, [], overrides)


@pytest.mark.parametrize("protocol", ["shared-warmup", "scratch", "reference"])
def test_each_protocol_runs_two_methods_over_two_seeds(tmp_path, protocol):
    data = clustered_interactions(n_users=120, n_items=80, seed=3, valid_per_user=2)
    base = tiny_base(**({"schedule.early_stopping.patience": 1} if protocol == "reference" else {}))
    rows = run_reproduction(base, data, tmp_path, [("fp", None), ("lsq", 2)], protocol=protocol, seeds=2,
                            timing_rounds=2, timing_batches=2)
    assert [(r.method, r.seed) for r in rows] == [("fp", 5), ("lsq", 5), ("fp", 6), ("lsq", 6)]
    out = json.loads((tmp_path / "results.json").read_text())
    assert out["protocol"] == protocol and out["seeds"] == [5, 6]
    fp, lsq = out["methods"]
    assert (fp["method"], lsq["method"]) == ("LightGCN fp32", "LSQ 2-bit")
    for entry, runs in ((fp, rows[0::2]), (lsq, rows[1::2])):
        per = entry["per_seed"]
        assert [p["seed"] for p in per] == [5, 6]
        for p, row in zip(per, runs):
            assert p["recall@20"] == pytest.approx(row.result.metrics["recall@20"])
            # The reported metrics are those of an evaluation in the run's own log.
            evals = {e["epoch"]: e for e in read_log(row.run_dir / "metrics.jsonl", "eval")}
            at = p["best_epoch"] if protocol == "reference" else max(evals)
            assert evals[at]["ndcg@20"] == pytest.approx(p["ndcg@20"])
        values = [p["ndcg@20"] for p in per]
        assert entry["mean"]["ndcg@20"] == pytest.approx(statistics.mean(values))
        assert entry["std"]["ndcg@20"] == pytest.approx(statistics.stdev(values))
    assert fp["per_seed"][0]["ndcg@20"] != fp["per_seed"][1]["ndcg@20"]  # the seeds differ
    for p, f in zip(lsq["per_seed"], fp["per_seed"]):
        if protocol == "shared-warmup":
            assert (p["fp_epochs"], p["quant_epochs"], p["best_epoch"]) == (2, 2, None)
        elif protocol == "scratch":
            assert (p["fp_epochs"], p["quant_epochs"], p["best_epoch"]) == (0, 4, None)
        else:  # from the best fp epoch of its own seed, at most 4 quantized epochs more
            assert f["best_epoch"] is not None and p["fp_epochs"] == f["best_epoch"]
            assert 1 <= p["quant_epochs"] <= 4 and p["fp_epochs"] < p["best_epoch"] <= p["fp_epochs"] + 4
    # The timing table: one row per method, every step of every round timed.
    assert [t["method"] for t in out["timing"]] == ["LightGCN fp32", "LSQ 2-bit"]
    assert all(t["steps"] == 4 and t["median_ms"] > 0 for t in out["timing"])
    assert lsq["ms_per_step"] == out["timing"][1]["median_ms"]
    md = (tmp_path / "results.md").read_text()
    assert md.count("\n| LSQ 2-bit | ") == 1 and " ± " in md and f"Protocol `{protocol}`" in md
    assert "Seeds: 5, 6 (mean ± sample standard deviation)." in md
    with (tmp_path / "results.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert (tmp_path / "seed6" / "lsq-2bit" / "metrics.jsonl").exists()


def test_a_table_written_before_the_last_seed_names_the_seeds_it_holds(tmp_path):
    """results.md is rewritten after every run: while seeds remain it says which seeds it averages."""
    from gnaq_dist.reproduce import _write_results

    data = clustered_interactions(n_users=120, n_items=80, seed=3)
    base = tiny_base()
    rows = run_reproduction(base, data, tmp_path, [("fp", None)], protocol="scratch", seeds=1)
    _write_results(rows, base, tmp_path, "scratch", [5, 6])
    md = (tmp_path / "results.md").read_text()
    assert "Seeds: 5 so far, of 5, 6 planned." in md and " ± " not in md


def write_tiny_dataset(tmp_path, valid: bool) -> str:
    from gnaq_dist.ingest import IngestConfig, ingest

    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(100), 8)
    items = (users % 4) * 15 + rng.integers(0, 15, users.size)
    pq.write_table(pa.table({"user_id": users.astype(str), "item_id": items.astype(str)}), tmp_path / "log.parquet")
    out = str(tmp_path / ("ds-valid" if valid else "ds"))
    ingest(str(tmp_path / "log.parquet"), out, load_config(IngestConfig, [], [
        f"split.valid_fraction={0.2 if valid else 0}", "progress=false"]))
    return out


def test_cli_reference_protocol_needs_a_validation_split(tmp_path, capsys):
    dataset = write_tiny_dataset(tmp_path, valid=False)
    code = gnaq_main(["reproduce", dataset, str(tmp_path / "out"), "--protocol", "reference",
                      "--methods", "fp,gnaq:2", "--no-progress"])
    assert code == 2
    assert "early_stopping.split='valid'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    code = gnaq_main(["reproduce", dataset, str(tmp_path / "out"), "--protocol", "reference",
                      "--methods", "gnaq:2", "--no-progress"])
    assert code == 2 and "add fp to --methods" in capsys.readouterr().err


def test_cli_reproduce_reference_on_tiny_parquet(tmp_path, capsys):
    dataset = write_tiny_dataset(tmp_path, valid=True)
    code = gnaq_main(["reproduce", dataset, str(tmp_path / "out"), "--protocol", "reference", "--seeds", "1",
                      "--methods", "fp,gnaq:2", "--timing-rounds", "1", "--timing-batches", "1", "--no-progress",
                      "--set", "model.dim=8", "--set", "schedule.epochs=3", "--set", "schedule.eval_every=1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| GNAQ 2-bit |" in printed and "Protocol `reference`" in printed
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [t["method"] for t in out["timing"]] == ["LightGCN fp32", "GNAQ 2-bit"]
    assert all(m["per_seed"][0]["best_epoch"] is not None for m in out["methods"])


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
