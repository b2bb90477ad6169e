"""The single-process training loop: every method end to end, repeatability, the block
path inside the loop, packed-form evaluation, and errors before training starts."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from gnaq_dist.cli import main as gnaq_main
from gnaq_dist.config import load_config
from gnaq_dist.errors import ConfigError, GnaqInputError
from gnaq_dist.evaluation import evaluate_ranking, finalize
from gnaq_dist.propagation import propagate_full
from gnaq_dist.quant.base import score_rows
from gnaq_dist.synthetic import clustered_interactions
from gnaq_dist.train.config import TrainConfig
from gnaq_dist.train.local import LocalTrainer

RANDOM_RECALL20 = 20 / 190  # 200 items, about 10 train items masked per user


@pytest.fixture(scope="module")
def data():
    return clustered_interactions(n_users=300, n_items=200, seed=1)


def small_config(method: str, bits: int | None, **extra) -> TrainConfig:
    overrides = [
        f"model.method={method}", f"model.bits={'null' if bits is None else bits}",
        "model.dim=16", "model.num_layers=2", "schedule.epochs=30", "schedule.warmup_epochs=20",
        "schedule.batch_size=256", "schedule.num_negatives=2", "schedule.eval_every=0",
        "optim.lr=0.02", "progress=false", "seed=3", "eval.ks=[10,20]",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(TrainConfig, [], overrides)


@pytest.mark.parametrize(
    "method,bits",
    [("fp", None), ("gnaq", 2), ("gnaq_ste", 2), ("lsq", 2), ("n2uq", 2), ("bigear", 1), ("gnaq", 1),
     ("gnaq", 4), ("gnaq", 8)],
)
def test_every_method_learns_end_to_end(data, method, bits):
    result = LocalTrainer(small_config(method, bits), data).run()
    recall = result.metrics["recall@20"]
    assert np.isfinite(recall)
    # The clustered data is learnable: every method must clearly beat random ranking.
    assert recall > 2 * RANDOM_RECALL20, (method, bits, result.metrics)
    assert result.phase_epochs["fp"] + result.phase_epochs["quantized"] == 30
    if method == "fp":
        assert result.storage["compression_ratio"] == 1.0
    else:
        assert result.phase_epochs == {"fp": 20, "quantized": 10}
        # Stored bytes are exactly the floor: b*d/8 of codes plus the (shared or per-row) levels.
        assert result.storage["bytes_per_node"] == result.storage["floor_bytes_per_node"]
        assert result.storage["compression_ratio"] == pytest.approx(4 * 16 / result.storage["bytes_per_node"])


def test_gnaq_2bit_table_is_over_10x_smaller_than_fp32(data):
    result = LocalTrainer(small_config("gnaq", 2, **{"model.dim": 64, "schedule.epochs": 2,
                                                     "schedule.warmup_epochs": 1}), data).run()
    # 64 two-bit codes (16 bytes) + 4 fp16 levels (8 bytes) + an fp16 score bias against 256 bytes of fp32.
    assert result.storage["bytes_per_node"] == 26.0 and result.storage["bias_bytes_per_node"] == 2.0
    assert result.storage["compression_ratio"] == pytest.approx(256 / 26)
    static = LocalTrainer(small_config("gnaq_static", 2, **{"model.dim": 64, "schedule.epochs": 2,
                                                            "schedule.warmup_epochs": 1}), data).run()
    assert static.storage["bytes_per_node"] == 24.0 and "bias_bytes_per_node" not in static.storage


def test_same_seed_same_result(data):
    a = LocalTrainer(small_config("gnaq", 2, **{"schedule.epochs": 4, "schedule.warmup_epochs": 2}), data).run()
    b = LocalTrainer(small_config("gnaq", 2, **{"schedule.epochs": 4, "schedule.warmup_epochs": 2}), data).run()
    c = LocalTrainer(small_config("gnaq", 2, **{"schedule.epochs": 4, "schedule.warmup_epochs": 2,
                                                "seed": 4}), data).run()
    assert a.metrics == b.metrics
    assert torch.equal(a.method.levels, b.method.levels)
    assert not torch.equal(a.method.levels, c.method.levels)


@pytest.mark.parametrize("method,extra", [("gnaq_static", {}), ("gnaq", {"model.refine_every": 0})])
def test_sampled_path_with_full_fanout_trains_like_the_full_graph(data, method, extra):
    """The block path inside the loop: with fan-out -1 every step equals the full path (score
    biases included). Refinement differs by design: blocks propagate the batch's nodes only."""
    full = small_config(method, 2, **{"schedule.epochs": 2, "schedule.warmup_epochs": 1, **extra})
    sampled = copy.deepcopy(full)
    sampled.schedule.propagation = "sampled"
    sampled.schedule.fanouts = [-1, -1]
    a = LocalTrainer(full, data).run()
    b = LocalTrainer(sampled, data).run()
    torch.testing.assert_close(a.method.levels, b.method.levels, rtol=1e-4, atol=1e-5)
    assert torch.equal(a.method.codes, b.method.codes)
    if method == "gnaq":
        assert a.method.bias.abs().sum() > 0
        torch.testing.assert_close(a.method.bias, b.method.bias, rtol=1e-4, atol=1e-5)


def test_sampled_path_with_small_fanout_learns(data):
    config = small_config("gnaq", 2, **{"schedule.propagation": "sampled", "schedule.fanouts": "[5, 5]"})
    result = LocalTrainer(config, data).run()
    assert result.metrics["recall@20"] > 2 * RANDOM_RECALL20


def test_packed_and_training_time_forms_rank_identically(data):
    config = small_config("gnaq", 2, **{"schedule.epochs": 3, "schedule.warmup_epochs": 1,
                                        "model.level_dtype": "float32"})
    trainer = LocalTrainer(config, data)
    result = trainer.run()
    method = result.method
    with torch.no_grad():
        training_form = method.combine(propagate_full(trainer.graph, method.embed(None), 2, method.layer_fn))
    packed_form = trainer.final_embeddings(method)
    torch.testing.assert_close(packed_form, training_form, rtol=0, atol=0)
    n_users = data.n_users
    is_user = torch.arange(data.n_nodes) < n_users
    bias = method.bias_of(None).detach()  # float32 levels: the biases are stored exactly too
    packed_form, training_form = score_rows(packed_form, bias, is_user), score_rows(training_form, bias, is_user)

    def metrics(final):
        return finalize(evaluate_ranking(final[:n_users], final[n_users:], trainer.eval_users,
                                         trainer.train_csr, trainer.test_csr, ks=(10, 20)))

    assert metrics(packed_form) == metrics(training_form) == result.metrics


def test_fp16_levels_rank_like_fp32_levels(data):
    result = LocalTrainer(small_config("gnaq", 2, **{"schedule.epochs": 3, "schedule.warmup_epochs": 1}), data).run()
    trainer = LocalTrainer(small_config("gnaq", 2, **{"model.level_dtype": "float32"}), data)
    exact = trainer.evaluate(result.method)
    assert result.metrics["recall@20"] == pytest.approx(exact["recall@20"], abs=0.01)


def test_config_contradictions_fail_before_training():
    with pytest.raises(ConfigError, match="warmup_epochs"):
        load_config(TrainConfig, [], ["schedule.epochs=5", "schedule.warmup_epochs=6"])
    with pytest.raises(ConfigError, match="unknown method 'gnaq3'"):
        load_config(TrainConfig, [], ["model.method=gnaq3"])
    with pytest.raises(ConfigError, match="bit width"):
        load_config(TrainConfig, [], ["model.bits=3"])
    with pytest.raises(ConfigError, match="bigear is 1-bit"):
        load_config(TrainConfig, [], ["model.method=bigear", "model.bits=2"])
    with pytest.raises(ConfigError, match="fanouts has 2 entries"):
        load_config(TrainConfig, [], ["schedule.propagation=sampled", "schedule.fanouts=[5, 5]"])
    with pytest.raises(ConfigError, match="unknown key 'epoch'"):
        load_config(TrainConfig, [], ["schedule.epoch=5"])


def test_exponent_floats_read_as_numbers_in_files_and_overrides(tmp_path):
    """YAML 1.1 reads ``1e-4`` as a string; configs and --set take it as the float it means."""
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  l2: 1e-4\n  lr: 5E-2\n")
    cfg = load_config(TrainConfig, [path], ["optim.grad_clip=2e0", "dataset=1e5x"])
    assert (cfg.optim.l2, cfg.optim.lr, cfg.optim.grad_clip, cfg.dataset) == (1e-4, 5e-2, 2.0, "1e5x")


@pytest.fixture()
def lastfm_dataset(tmp_path, shared_data):
    from gnaq_dist.ingest import IngestConfig, ingest
    from gnaq_dist.config import from_dict

    config = from_dict(IngestConfig, {"columns": {"weight": "weight", "split": "split"},
                                      "split": {"strategy": "column"}, "progress": False})
    out = str(tmp_path / "lastfm")
    ingest(str(shared_data / "lastfm" / "interactions.parquet"), out, config)
    return out


@pytest.mark.shared_data
def test_cli_train_on_ingested_lastfm(tmp_path, lastfm_dataset, capsys):
    """`gnaq train` reads an ingested real dataset and writes its log and summary."""
    out = tmp_path / "run"
    code = gnaq_main(["train", "--dataset", lastfm_dataset, "--out", str(out), "--no-progress",
                      "--set", "schedule.epochs=3", "--set", "schedule.warmup_epochs=2",
                      "--set", "schedule.batch_size=4096", "--set", "model.dim=32", "--set", "optim.lr=0.01"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phase_epochs"] == {"fp": 2, "quantized": 1}
    assert summary["metrics"]["recall@20"] > 0.02  # popularity alone gives about 0.07 here
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "end" and "eval" in events


@pytest.mark.shared_data
def test_cli_train_refuses_a_dataset_whose_files_do_not_match_the_manifest(tmp_path, lastfm_dataset, capsys):
    import pyarrow.parquet as pq

    train_file = tmp_path / "lastfm" / "train.parquet"
    table = pq.read_table(train_file)
    pq.write_table(table.slice(0, table.num_rows - 1), train_file)  # one edge fewer
    code = gnaq_main(["train", "--dataset", lastfm_dataset, "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.parquet" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


def test_cli_train_without_dataset_is_an_error(capsys):
    assert gnaq_main(["train", "--no-progress"]) == 2
    assert "no dataset" in capsys.readouterr().err
