"""Early stopping (schedule.early_stopping) in the one-process trainer, on small data:
it stops once the held-out metric stops improving, and the run ends with the best
evaluation's tables, metrics and checkpoint."""

from __future__ import annotations

import json

import pytest

from gnaq_dist.cli import main as gnaq_main
from gnaq_dist.config import load_config
from gnaq_dist.errors import ConfigError, GnaqInputError
from gnaq_dist.evaluation import evaluate_ranking, finalize
from gnaq_dist.graph import interactions_csr
from gnaq_dist.runlog import RunLog, read_log
from gnaq_dist.synthetic import clustered_interactions
from gnaq_dist.train.config import TrainConfig
from gnaq_dist.train.local import LocalTrainer


@pytest.fixture(scope="module")
def data():
    return clustered_interactions(n_users=200, n_items=120, seed=4, valid_per_user=2)


def config(method="fp", bits=None, **extra) -> TrainConfig:
    overrides = [
        f"model.method={method}", f"model.bits={'null' if bits is None else bits}", "model.dim=16",
        "model.num_layers=2", "schedule.epochs=60", "schedule.warmup_epochs=3", "schedule.batch_size=512",
        "schedule.eval_every=1", "schedule.early_stopping.patience=2", "optim.lr=0.2", "optim.l2=0",
        "progress=false", "seed=1", "eval.ks=[10,20]",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(TrainConfig, [], overrides)


def valid_metric(trainer: LocalTrainer, method, data, metric="ndcg@20") -> float:
    csr = interactions_csr(data.valid_user, data.valid_item, data.n_users, data.n_items)
    final = trainer.final_embeddings(method)
    users = __import__("gnaq_dist.evaluation", fromlist=["users_to_evaluate"]).users_to_evaluate(csr[0])
    sums = evaluate_ranking(final[: data.n_users], final[data.n_users:], users, trainer.train_csr, csr, ks=(10, 20))
    return finalize(sums)[metric]


@pytest.mark.parametrize("method,bits", [("fp", None), ("gnaq", 2)])
def test_stops_and_restores_the_best_evaluation(tmp_path, data, method, bits):
    trainer = LocalTrainer(config(method, bits), data, RunLog(tmp_path / "metrics.jsonl"))
    result = trainer.run()
    stop = result.early_stopping
    assert stop["stopped_early"] and stop["last_epoch"] < 60
    assert stop["best_epoch"] == stop["last_epoch"] - 2  # patience 2: two evaluations without a better one
    evals = {r["epoch"]: r for r in read_log(tmp_path / "metrics.jsonl", "eval")}
    assert max(evals) == stop["last_epoch"]
    # The run's metrics are the best epoch's test metrics, and the tables are that epoch's:
    # evaluating the returned method again gives them, and the best validation value.
    best = evals[stop["best_epoch"]]
    assert result.metrics["recall@20"] == pytest.approx(best["recall@20"])
    assert result.metrics["ndcg@20"] == pytest.approx(best["ndcg@20"])
    assert result.metrics["ndcg@20"] != pytest.approx(evals[stop["last_epoch"]]["ndcg@20"])
    assert trainer.evaluate(result.method)["ndcg@20"] == pytest.approx(best["ndcg@20"])
    assert valid_metric(trainer, result.method, data) == pytest.approx(stop["best_value"])
    stops = list(read_log(tmp_path / "metrics.jsonl", "stopping_eval"))
    assert [s["epoch"] for s in stops][-1] == stop["last_epoch"]
    # Counted in the last phase only: a quantized run evaluates its warm-up but never stops there.
    first_phase = "quantized" if bits else "fp"
    assert min(s["epoch"] for s in stops) == (4 if bits else 1)
    assert all(evals[s["epoch"]]["phase"] == first_phase for s in stops)
    assert max(s["value"] for s in stops) == pytest.approx(stop["best_value"])
    end = next(read_log(tmp_path / "metrics.jsonl", "end"))
    assert end["early_stopping"]["best_epoch"] == stop["best_epoch"]


def test_without_patience_running_out_the_best_is_still_kept(tmp_path, data):
    trainer = LocalTrainer(config(**{"schedule.epochs": 6, "schedule.early_stopping.patience": 50}), data)
    result = trainer.run()
    stop = result.early_stopping
    assert not stop["stopped_early"] and stop["last_epoch"] == 6 and stop["evaluations"] == 6
    assert valid_metric(trainer, result.method, data) == pytest.approx(stop["best_value"])


def test_gnaq_train_writes_the_best_epochs_checkpoint_and_says_so(tmp_path, capsys):
    from gnaq_dist.checkpoint import CheckpointStore
    from gnaq_dist.ingest import IngestConfig, ingest
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(150), 10)
    items = (users % 5) * 20 + rng.integers(0, 20, users.size)
    pq.write_table(pa.table({"user_id": users.astype(str), "item_id": items.astype(str)}), tmp_path / "log.parquet")
    ingest(str(tmp_path / "log.parquet"), str(tmp_path / "ds"),
           load_config(IngestConfig, [], ["split.valid_fraction=0.2", "progress=false"]))
    out = tmp_path / "run"
    code = gnaq_main(["train", "--dataset", str(tmp_path / "ds"), "--out", str(out), "--method", "fp",
                      "--no-progress", "--set", "model.dim=8", "--set", "schedule.epochs=80",
                      "--set", "schedule.eval_every=1", "--set", "optim.lr=0.3", "--set", "optim.l2=0",
                      "--set", "schedule.early_stopping.patience=1", "--set", "checkpoint.every_epochs=1"])
    assert code == 0
    printed = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    stop = summary["early_stopping"]
    assert stop["stopped_early"] and "early_stopping" in printed.out
    assert f"the metrics and tables are epoch {stop['best_epoch']}'s" in printed.out + printed.err
    # The final checkpoint is the newest and holds the best epoch's tables.
    latest = CheckpointStore(str(out / "checkpoints")).latest()
    history = latest.manifest["history"]
    assert any(r.get("event") == "early_stopping" and r["best_epoch"] == stop["best_epoch"] for r in history)
    code = gnaq_main(["evaluate", latest.uri, "--dataset", str(tmp_path / "ds"), "--no-progress", "--json"])
    assert code == 0
    evaluated = json.loads(capsys.readouterr().out)
    evals = {r["epoch"]: r for r in read_log(out / "metrics.jsonl", "eval")}
    assert evaluated["ndcg@20"] == pytest.approx(evals[stop["best_epoch"]]["ndcg@20"])
    assert evaluated["ndcg@20"] != pytest.approx(evals[stop["last_epoch"]]["ndcg@20"])
    assert summary["metrics"]["ndcg@20"] == pytest.approx(evaluated["ndcg@20"])


def test_bad_settings_are_refused_before_training(data):
    with pytest.raises(ConfigError, match="early_stopping.metric"):
        config(**{"schedule.early_stopping.metric": "auc"})
    with pytest.raises(ConfigError, match="eval.ks"):
        config(**{"schedule.early_stopping.metric": "ndcg@50"})
    with pytest.raises(ConfigError, match="eval_every"):
        config(**{"schedule.eval_every": 0})
    no_valid = clustered_interactions(n_users=50, n_items=40, seed=1)
    with pytest.raises(GnaqInputError, match="no validation split"):
        LocalTrainer(config(), no_valid)
    cfg = config()
    with pytest.raises(GnaqInputError, match="early_stopping.split='valid'"):
        cfg.check_dataset({"counts": {"train": 10, "test": 5}})
    from gnaq_dist.distributed.ray_launch import train_on_ray

    with pytest.raises(ConfigError, match="one-process trainer only"):
        train_on_ray(config(), workers=2)
