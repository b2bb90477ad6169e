"""Sharded checkpoints: format round trips, verification, retention, resume and resharding.

The distributed scenarios run on real gloo ranks (``run_ranks``) with real Parquet files
on the local filesystem; ``memory://`` is used where one process is enough.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from distributed_utils import run_ranks
from gnaq_dist import checkpoint as ckpt
from gnaq_dist.config import load_config
from gnaq_dist.distributed.sparse_adam import RowSparseAdam
from gnaq_dist.quant import build_method
from gnaq_dist.synthetic import clustered_interactions
from gnaq_dist.train.config import TrainConfig

METHODS = [("fp", None), ("gnaq", 2), ("gnaq_ste", 4), ("lsq", 2), ("n2uq", 2), ("bigear", 1)]


def small_data():
    return clustered_interactions(n_users=300, n_items=200, seed=1)


def ck_config(out: str, **extra) -> TrainConfig:
    overrides = [
        "model.method=gnaq", "model.bits=2", "model.dim=16", "model.num_layers=2",
        "schedule.epochs=3", "schedule.warmup_epochs=1", "schedule.batch_size=512", "schedule.num_negatives=2",
        "schedule.eval_every=1", "schedule.propagation=sampled", "schedule.fanouts=[-1,-1]",
        "optim.lr=0.02", "progress=false", "seed=3", "eval.ks=[10,20]", f"out={out}",
        "checkpoint.every_epochs=1", "checkpoint.keep_last=5", "distributed.grad_bits=2",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(TrainConfig, [], overrides)


# -- format round trips (one process) -------------------------------------------------------------
@pytest.mark.parametrize("name,bits", METHODS)
def test_shard_rows_round_trip_every_method(name, bits):
    torch.manual_seed(0)
    n, d = 7, 8
    method = build_method(name, n, d, bits, 2, phi="identity")
    method.init_from_full_precision(torch.randn(n, d) * 0.1)
    opt = RowSparseAdam(list(method.trainable_row_params()), 0.01)
    opt.step(torch.tensor([1, 4]), [torch.randn(2, *p.shape[1:]) for p in method.trainable_row_params()])
    ids = np.array([3, 10, 11, 20, 21, 22, 40])
    table = pq.read_table(pa_buffer(ckpt.parquet_bytes(ckpt.shard_table(method, ids, opt))))
    assert table["global_id"].to_pylist() == ids.tolist()
    fresh = build_method(name, n, d, bits, 2, phi="identity")
    fresh_opt = RowSparseAdam(list(fresh.trainable_row_params()), 0.01)
    ckpt.load_rows(fresh, table, fresh_opt)
    for a, b in zip(method.state_dict().values(), fresh.state_dict().values()):
        if a.shape and a.shape[0] == n:  # row state; dense parameters travel in dense.parquet
            assert torch.equal(a, b)
    assert torch.equal(opt.steps, fresh_opt.steps)
    for a, b in zip(opt.exp_avg + opt.exp_avg_sq, fresh_opt.exp_avg + fresh_opt.exp_avg_sq):
        assert torch.equal(a, b)
    if name == "gnaq":  # 2-bit codes are stored packed: 8 codes in 2 bytes
        assert table.schema.field("buffer.codes").type.byte_width == 2


@pytest.mark.parametrize("name", ["lsq", "n2uq"])
def test_dense_parameters_and_adam_state_round_trip(name):
    torch.manual_seed(0)
    method = build_method(name, 5, 4, 2, 1)
    method.init_from_full_precision(torch.randn(5, 4))
    opt = torch.optim.Adam(method.dense_params(), lr=0.1)
    for p in method.dense_params():
        p.grad = torch.ones_like(p)
    opt.step()
    table = ckpt.dense_table(method, opt)
    fresh = build_method(name, 5, 4, 2, 1)
    fresh_opt = torch.optim.Adam(fresh.dense_params(), lr=0.1)
    ckpt.load_dense(fresh, table, fresh_opt)
    for a, b in zip(method.dense_params(), fresh.dense_params()):
        assert torch.allclose(a, b)
    for i in opt.state_dict()["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.allclose(opt.state_dict()["state"][i][k], fresh_opt.state_dict()["state"][i][k])


def pa_buffer(data: bytes):
    import pyarrow as pa

    return pa.BufferReader(data)


# -- the store: verification, fallback, retention ----------------------------------------------------
def _fake_checkpoint(store: ckpt.CheckpointStore, step: int, data_key: dict, bits: int = 2) -> str:
    name = ckpt.checkpoint_name(step)
    payload = ckpt.parquet_bytes(ckpt.residual_table([]))
    files = {"shard-00000-of-00001.parquet": store.write_file(name, "shard-00000-of-00001.parquet", payload)}
    config = {"model": {"method": "gnaq", "bits": bits, "dim": 16, "num_layers": 2, "phi": "identity",
                        "level_dtype": "float16"}}
    manifest = ckpt.new_manifest(step=step, epoch=step, phase="quantized", shard_method="gnaq", world_size=1,
                                 config=config, data=data_key, partition={}, files=files, progress={}, history=[])
    return store.commit(name, manifest)


def test_store_skips_incomplete_and_corrupt_checkpoints_and_prunes(tmp_path):
    key = ckpt.data_key(small_data())
    store = ckpt.CheckpointStore(str(tmp_path / "ck"))
    uris = [_fake_checkpoint(store, s, key) for s in (1, 2, 3, 4)]
    assert store.latest().uri == uris[-1]
    # newest has a flipped byte, the one before lost its manifest: fall back to step 2
    shard = tmp_path / "ck" / ckpt.checkpoint_name(4) / "shard-00000-of-00001.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    os.remove(tmp_path / "ck" / ckpt.checkpoint_name(3) / ckpt.MANIFEST)
    assert store.latest().uri == uris[1]
    with pytest.raises(ckpt.CheckpointError, match="shard-00000-of-00001.parquet.*sha256"):
        ckpt.verify(uris[3])
    with pytest.raises(ckpt.CheckpointError, match="no manifest.json"):
        ckpt.verify(uris[2])
    # keep the 2 newest complete ones (steps 2 and 4); step 1 goes, debris older than them too
    removed = store.prune(2)
    assert removed == [ckpt.checkpoint_name(1)]
    assert store.names() == [ckpt.checkpoint_name(s) for s in (2, 3, 4)]


def test_verify_refuses_truncated_shard_other_dataset_and_other_bit_width():
    store = ckpt.CheckpointStore("memory://ckpt-verify")
    key = ckpt.data_key(small_data())
    uri = _fake_checkpoint(store, 5, key)
    assert ckpt.verify(uri, data=key, model={"method": "gnaq", "bits": 2})["step"] == 5
    other = ckpt.data_key(clustered_interactions(n_users=300, n_items=200, seed=2))
    with pytest.raises(ckpt.CheckpointError, match="another dataset"):
        ckpt.verify(uri, data=other)
    with pytest.raises(ckpt.CheckpointError, match="model.bits is 2 in the checkpoint, 4 in this config"):
        ckpt.verify(uri, model={"bits": 4})
    path = store.dir_path(ckpt.checkpoint_name(5)) + "/shard-00000-of-00001.parquet"
    data = store.fs.cat_file(path)
    store.fs.pipe_file(path, data[:-10])
    with pytest.raises(ckpt.CheckpointError, match="shard-00000-of-00001.parquet.*truncated"):
        ckpt.verify(uri)


# -- distributed: resume and reshard on real gloo ranks -----------------------------------------------
def scenario_write_then_resume(rank: int, world: int, out: str) -> dict:
    """Run A: 3 epochs with a checkpoint each epoch. Run B: resume A's epoch-1 checkpoint, same W."""
    from gnaq_dist.distributed.trainer import train_worker

    data = small_data()
    a = train_worker(ck_config(f"{out}/a"), data)
    first = ckpt.CheckpointStore(f"{out}/a/checkpoints").names()[0]
    b = train_worker(ck_config(f"{out}/b", **{"checkpoint.resume": f"{out}/a/checkpoints/{first}"}), data)
    return {"a": a, "b": b}


def scenario_load(rank: int, world: int, out: str, uri: str, tag: str, partition: str = "metis") -> dict:
    """Load ``uri`` on ``world`` ranks, evaluate at once, train to the end of the budget."""
    from gnaq_dist.distributed.trainer import train_worker

    config = ck_config(f"{out}/{tag}", **{"checkpoint.resume": uri, "distributed.partition": partition})
    return train_worker(config, small_data())


def _evals(history: list[dict]) -> list[dict]:
    return [r for r in history if r["event"] == "eval"]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt2"))
    results = run_ranks(scenario_write_then_resume, 2, out, timeout=180)
    return out, results


def test_two_ranks_write_complete_sharded_checkpoints(two_rank_runs):
    out, results = two_rank_runs
    store = ckpt.CheckpointStore(f"{out}/a/checkpoints")
    names = store.names()
    assert len(names) == 3  # one per epoch
    manifest = ckpt.verify(store.uri(names[-1]))
    assert manifest["world_size"] == 2 and manifest["phase"] == "quantized" and manifest["model"]["bits"] == 2
    assert set(manifest["files"]) == {"shard-00000-of-00002.parquet", "shard-00001-of-00002.parquet",
                                      "residuals-00000-of-00002.parquet", "residuals-00001-of-00002.parquet",
                                      "dense.parquet", "partition.parquet"}
    shards = [pq.read_table(os.path.join(out, "a", "checkpoints", names[-1], f"shard-0000{r}-of-00002.parquet"))
              for r in (0, 1)]
    ids = np.sort(np.concatenate([s["global_id"].to_numpy() for s in shards]))
    assert np.array_equal(ids, np.arange(500))  # every node once, split between the two shards
    assert all(abs(s.num_rows - 250) < 150 for s in shards)
    residuals = pq.read_table(os.path.join(out, "a", "checkpoints", names[-1], "residuals-00000-of-00002.parquet"))
    assert residuals.num_rows > 0  # 2-bit gradients with error feedback leave residuals to keep
    assert manifest["step"] == results[0]["a"]["steps"]
    assert results[0]["a"]["checkpoint"] == store.uri(names[-1])
    # the first checkpoint is the fp warm-up
    assert ckpt.verify(store.uri(names[0]))["shard_method"] == "fp"


def test_resume_continues_exactly_like_the_uninterrupted_run(two_rank_runs):
    _, results = two_rank_runs
    a, b = results[0]["a"], results[0]["b"]
    assert b["resumed_from"]["epoch"] == 1
    resume_eval = [r for r in _evals(b["history"]) if r["phase"] == "resume"][0]
    first_eval = _evals(a["history"])[0]
    assert resume_eval["recall@20"] == pytest.approx(first_eval["recall@20"], rel=1e-6)
    for k in ("recall@20", "ndcg@20", "recall@10"):
        assert b["metrics"][k] == pytest.approx(a["metrics"][k], rel=1e-3)
    assert b["steps"] == a["steps"]


@pytest.mark.slow
@pytest.mark.parametrize("world_then,world_now,partition", [(2, 1, "metis"), (1, 2, "metis"), (2, 2, "hash")])
def test_reshard_loads_with_identical_metrics(two_rank_runs, world_then, world_now, partition, tmp_path):
    out, results = two_rank_runs
    if world_then == 2:
        source, history = f"{out}/a/checkpoints", results[0]["a"]["history"]
    else:  # a one-rank run writes the checkpoint first
        (single,) = run_ranks(scenario_load, 1, str(tmp_path), "never", "w1", timeout=120)
        source, history = f"{tmp_path}/w1/checkpoints", single["history"]
    store = ckpt.CheckpointStore(source)
    name = store.names()[1]  # epoch 2: quantized, mid-run
    written = [r for r in _evals(history) if r["epoch"] == 2 and r["phase"] == "quantized"][0]
    loaded = run_ranks(scenario_load, world_now, str(tmp_path), store.uri(name), f"re{world_now}", partition,
                       timeout=120)
    assert loaded[0]["resumed_from"]["world_size_then"] == world_then
    assert loaded[0]["partition"]["method"] == ("hash" if partition == "hash" or world_now == 1 else "metis")
    assert loaded[0]["world_size"] == world_now
    at_load = [r for r in _evals(loaded[0]["history"]) if r["phase"] == "resume"][0]
    for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20"):
        assert at_load[k] == pytest.approx(written[k], rel=1e-6), k
    assert loaded[0]["steps"] > written["step"]  # and training went on to the end of the budget
    assert np.isfinite(loaded[0]["metrics"]["recall@20"])


def test_resume_auto_refuses_a_checkpoint_of_another_bit_width(two_rank_runs, tmp_path):
    from distributed_utils import RankError

    out, _ = two_rank_runs
    with pytest.raises(RankError, match="model.bits is 2 in the checkpoint, 4 in this config"):
        run_ranks(scenario_bits, 1, out, timeout=60)


def scenario_bits(rank: int, world: int, out: str) -> None:
    from gnaq_dist.distributed.trainer import train_worker

    train_worker(ck_config(f"{out}/a", **{"model.bits": 4}), small_data())


def test_export_reads_every_shard(two_rank_runs):
    out, results = two_rank_runs
    store = ckpt.CheckpointStore(f"{out}/a/checkpoints")
    manifest = ckpt.verify(store.uri(store.names()[-1]))
    rows = ckpt.read_rows(store.uri(store.names()[-1]), manifest, np.arange(500))
    assert rows.num_rows == 500
    assert json.dumps(manifest["config"])  # plain JSON, nothing pickled
