"""``model.lsq_step``: LSQ with one learned step for the table or one per node, chosen in the
config, trained, checkpointed and read back in the form it was trained in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gnaq_dist import checkpoint as ckpt
from gnaq_dist.config import load_config
from gnaq_dist.errors import ConfigError
from gnaq_dist.synthetic import clustered_interactions
from gnaq_dist.train.config import TrainConfig
from gnaq_dist.train.local import train_local


def config(tmp_path, step: str, **overrides) -> TrainConfig:
    sets = {"model.method": "lsq", "model.bits": 2, "model.lsq_step": step, "model.dim": 8, "model.num_layers": 2,
            "schedule.epochs": 3, "schedule.warmup_epochs": 1, "schedule.batch_size": 512, "schedule.eval_every": 0,
            "eval.ks": [10], "optim.lr": 0.02, "progress": False, "threads": 1, "out": str(tmp_path / step),
            **overrides}
    return load_config(TrainConfig, [], [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def test_a_bad_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.lsq_step"):
        config(tmp_path, "row")
    cfg = config(tmp_path, "tensor")
    cfg.model.lsq_step = "row"  # set in code, past the loader's check
    with pytest.raises(ConfigError, match="model.lsq_step: 'row'"):
        cfg.validate()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run of each step form on the same data, with their final checkpoints."""
    root = tmp_path_factory.mktemp("lsq_step")
    data = clustered_interactions(n_users=80, n_items=50, seed=4)
    return data, {step: train_local(config(root, step), data, checkpoints=True) for step in ("tensor", "node")}


def test_node_steps_are_trained_row_parameters_and_counted_per_node(runs):
    data, by_step = runs
    n = data.n_nodes
    node, tensor = by_step["node"].method, by_step["tensor"].method
    assert node.per_row and node.step.shape == (n, 1) and any(p is node.step for p in node.trainable_row_params())
    assert not tensor.per_row and tensor.step.shape == (1,) and any(p is tensor.step for p in tensor.dense_params())
    assert len(torch.unique(node.step.detach())) > n // 2  # the steps moved apart, row by row
    # d = 8 two-bit codes (2 bytes) plus, per node, 4 fp16 levels (8 bytes); one shared grid costs 8 bytes in all.
    assert by_step["node"].storage["bytes_per_node"] == 2 + 8
    assert by_step["tensor"].storage["bytes_per_node"] == pytest.approx(2 + 8 / n)
    for result in by_step.values():
        assert all(np.isfinite(v) for v in result.metrics.values())


def test_checkpoints_keep_the_step_form(runs, tmp_path):
    data, by_step = runs
    for step, result in by_step.items():
        manifest = ckpt.verify(result.checkpoint)
        assert manifest["model"]["lsq_step"] == step
        kind, table = ckpt.load_table(result.checkpoint, manifest, data)
        assert kind == "packed" and table.levels.shape[0] == (data.n_nodes if step == "node" else 1)
        want = result.method.pack(torch.float16)
        assert np.array_equal(table.codes, want.codes) and np.array_equal(table.levels, want.levels)
    # Resuming a per-node checkpoint with a per-table config is refused, not silently reshaped.
    cfg = config(tmp_path, "tensor", **{"checkpoint.resume": by_step["node"].checkpoint})
    with pytest.raises(ckpt.CheckpointError, match="model.lsq_step is 'node' in the checkpoint"):
        train_local(cfg, data, checkpoints=True)
