"""``gnaq_lat`` in the distributed loop, on real gloo ranks: a step equals the one-process
trainer's (levels, latent, row state), 1 and 2 ranks train alike from scratch (split full
graph and blocks at full fan-out), the worker holds no fp32 (N, d) table or Adam state of
that size, the bytes moved are counted, and sharded checkpoints resume and reshard
(2 -> 1 -> 2 ranks) exactly and export the served table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from distributed_utils import run_ranks
from gnaq_dist import checkpoint as ckpt
from gnaq_dist.config import load_config
from gnaq_dist.synthetic import clustered_interactions
from gnaq_dist.train.config import TrainConfig

DIM = 16


def small_data():
    return clustered_interactions(n_users=300, n_items=200, seed=1)


def lat_config(**extra) -> TrainConfig:
    """gnaq_lat 2-bit from scratch (no fp warm-up), fp32 levels and exact gradients unless overridden."""
    overrides = {
        "model.method": "gnaq_lat", "model.bits": 2, "model.dim": DIM, "model.num_layers": 2,
        "model.level_dtype": "float32", "model.latent_lr": 0.05, "schedule.epochs": 3, "schedule.warmup_epochs": 0,
        "schedule.batch_size": 512, "schedule.num_negatives": 2, "schedule.eval_every": 0,
        "schedule.propagation": "full", "schedule.fanouts": "[-1,-1]", "optim.lr": 0.02, "optim.quant_lr": "null",
        "progress": "false", "seed": 3, "eval.ks": "[10,20]",
    }
    overrides.update(extra)
    return load_config(TrainConfig, [], [f"{k}={v}" for k, v in overrides.items()])


def _rows(trainer) -> dict:
    """This rank's rows of the method, with their global ids."""
    m = trainer.shard.method
    owned = trainer.partition.owned_ids(trainer.rank)
    n = len(owned)
    return {"ids": owned, "levels": m.levels.detach()[:n].clone().numpy(), "latent": m.latent_int[:n].numpy(),
            "state": m.grad_sq[:n].clone().numpy()}


def _global(parts: list[dict], key: str) -> np.ndarray:
    n = sum(len(p["ids"]) for p in parts)
    out = np.zeros((n,) + parts[0][key].shape[1:], dtype=parts[0][key].dtype)
    for p in parts:
        out[p["ids"]] = p[key]
    return out


def _held(trainer) -> dict:
    """What the worker holds across steps: the method's tensors and the optimizer's (shape, dtype)."""
    m = trainer.shard.method
    return {"tensors": [(name, tuple(t.shape), str(t.dtype)) for name, t in m.state_dict().items()],
            "moments": [tuple(t.shape) for t in trainer.shard.optimizer.exp_avg],
            "n_own": trainer.shard.num_owned}


# -- one step against the one-process trainer -----------------------------------------------------
def _batches(data, n: int, size: int, seed: int = 5):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pick = rng.choice(data.n_train, size, replace=False)
        users = torch.from_numpy(data.train_user[pick]).to(torch.int64)
        pos = torch.from_numpy(data.train_item[pick]).to(torch.int64)
        neg = torch.from_numpy(rng.integers(0, data.n_items, (size, 2))).to(torch.int64)
        out.append((users, pos, neg))
    return out


def scenario_steps(rank: int, world: int, propagation: str) -> dict:
    """The quantized start, then two steps on fixed global batches (each rank its own users' share)."""
    from gnaq_dist.distributed.trainer import DistributedTrainer

    data = small_data()
    cfg = lat_config(**{"schedule.propagation": propagation})
    trainer = DistributedTrainer(cfg, data)
    trainer._start_fp()
    trainer._start_quantized()
    trainer.shard.set_lr(cfg.optim.rate("quantized"))
    start = _rows(trainer)
    owner = torch.from_numpy(trainer.partition.owner)
    for users, pos, neg in _batches(data, 2, 400):
        mine = owner[users] == rank
        trainer.step(users[mine], pos[mine], neg[mine], int(users.shape[0]))
    return {"start": start, "end": _rows(trainer)}


@pytest.fixture(scope="module")
def step_runs():
    return {(p, w): run_ranks(scenario_steps, w, p, timeout=180) for p in ("full", "sampled") for w in (1, 2)}


@pytest.mark.parametrize("propagation", ["full", "sampled"])
def test_a_step_equals_the_one_process_trainers_on_one_and_two_ranks(step_runs, propagation):
    """Forward, backward (levels through the codes, dL/dx to the owner) and the latent update
    (row state, stochastic rounding keyed by global row id): 1 rank, 2 ranks and LocalTrainer
    agree after two steps from the same start and batches."""
    from gnaq_dist.quant import build_method
    from gnaq_dist.train.local import LocalTrainer

    data = small_data()
    cfg = lat_config(**{"schedule.propagation": propagation})
    one, two = step_runs[(propagation, 1)], step_runs[(propagation, 2)]
    for key in ("levels", "latent", "state"):  # both start from the same seeded table
        np.testing.assert_array_equal(_global([r["start"] for r in one], key), _global([r["start"] for r in two], key))
    local = LocalTrainer(cfg, data)
    m = build_method("gnaq_lat", data.n_nodes, DIM, 2, 2, **local.schedule.method_options(cfg), seed=cfg.seed)
    with torch.no_grad():
        m.levels.copy_(torch.from_numpy(_global([r["start"] for r in one], "levels")))
        m.latent_int = torch.from_numpy(_global([r["start"] for r in one], "latent"))
        m.grad_sq.copy_(torch.from_numpy(_global([r["start"] for r in one], "state")))
    optimizer = local._optimizer(m, cfg.optim.rate("quantized"))
    for users, pos, neg in _batches(data, 2, 400):
        local.step(m, optimizer, users, pos, neg)
    want = {"levels": m.levels.detach().numpy(), "latent": m.latent_int.numpy(), "state": m.grad_sq.numpy()}
    for runs in (one, two):
        got = {k: _global([r["end"] for r in runs], k) for k in want}
        np.testing.assert_allclose(got["levels"], want["levels"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["state"], want["state"], rtol=1e-4, atol=1e-12)
        # integer latent: equal but for a value whose rounding a float-order difference can flip
        assert (got["latent"] != want["latent"]).mean() < 1e-3
    start = _global([r["start"] for r in one], "latent")
    assert (want["latent"] != start).mean() > 0.01  # the latent moved
    if propagation == "full":
        # every row took the propagation's update each step, the batch's rows the L2 term's too
        assert np.all(_global([r["end"] for r in one], "state")[:, 1] >= 2)


# -- whole runs: 1 and 2 ranks, memory, bytes ---------------------------------------------------------
RUNS = [
    {"schedule.propagation": "full"},
    {"schedule.propagation": "sampled"},
    {"schedule.propagation": "full", "distributed.grad_bits": 2, "model.level_dtype": "float16"},
]


def scenario_runs(rank: int, world: int) -> list[dict]:
    from gnaq_dist.distributed.trainer import DistributedTrainer

    data = small_data()
    out = []
    for extra in RUNS:
        records: list[dict] = []
        trainer = DistributedTrainer(lat_config(**extra), data, records.append)
        result = trainer.run()
        result["rows_state"] = _rows(trainer)
        result["held"] = _held(trainer)
        result["reports"] = len(records)
        out.append(result)
    return out


@pytest.fixture(scope="module")
def whole_runs():
    return {w: run_ranks(scenario_runs, w, timeout=240) for w in (1, 2)}


def assert_same_run(x: list[dict], y: list[dict]) -> None:
    """Two runs' ranks (their rows and metrics) ended in the same place: levels and row state to
    float tolerance, the latent but for a rounding flipped by summation order, the metrics."""
    gx = {k: _global([r["rows_state"] for r in x], k) for k in ("levels", "latent", "state")}
    gy = {k: _global([r["rows_state"] for r in y], k) for k in ("levels", "latent", "state")}
    np.testing.assert_allclose(gx["levels"], gy["levels"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(gx["state"], gy["state"], rtol=1e-3, atol=1e-12)
    assert (gx["latent"] != gy["latent"]).mean() < 1e-3
    for k, v in x[0]["metrics"].items():
        assert y[0]["metrics"][k] == pytest.approx(v, abs=1e-3)


@pytest.mark.parametrize("i", [0, 1], ids=["full", "sampled"])
def test_two_ranks_train_like_one_from_scratch(whole_runs, i):
    one = [r[i] for r in whole_runs[1]]
    two = [r[i] for r in whole_runs[2]]
    assert_same_run(one, two)
    assert two[1]["metrics"] == two[0]["metrics"]  # every rank reports the same metrics
    assert one[0]["phase_steps"] == two[0]["phase_steps"] == {"fp": 0, "quantized": 18}  # 6 steps an epoch, no warm-up
    epochs = [r for r in two[0]["history"] if r["event"] == "epoch"]
    assert all(r["phase"] == "quantized" and 0 < r["codes_changed"] < 1 for r in epochs)  # the codes move
    assert one[0]["metrics"]["recall@20"] > 0


def test_storage_counts_the_latent_and_the_served_table(whole_runs):
    s = whole_runs[2][0][0]["storage"]
    served = DIM * 2 / 8 + 4 * 4  # 2-bit codes + four fp32 levels
    assert s["served_bytes_per_node"] == pytest.approx(served)
    assert s["latent_bytes_per_node"] == DIM * 4 / 8
    assert s["bytes_per_node"] == pytest.approx(served + DIM / 2)
    s16 = whole_runs[2][0][2]["storage"]  # fp16 levels: 4 + 8 bytes served, the usual GNAQ row
    assert s16["served_bytes_per_node"] == pytest.approx(DIM * 2 / 8 + 2 * 4)


def test_no_fp32_table_or_adam_state_of_table_size(whole_runs):
    """The worker's tables across steps: the packed latent (uint8), fp32 levels (n, 2^b), (v, t)
    (n, 2); Adam holds the levels' moments only."""
    for rank in whole_runs[2]:
        for run in rank:
            held = run["held"]
            n = held["n_own"]
            assert n > 100  # about half the 500 rows
            for name, shape, dtype in held["tensors"]:
                if len(shape) == 2 and shape[1] == DIM:
                    assert dtype == "torch.uint8", name
                assert not (len(shape) == 2 and shape[1] >= DIM and dtype == "torch.float32"), name
            assert held["moments"] == [(n, 4)]
            assert run["memory"]["optimizer_bytes_per_node"] <= 4 * 4 * 2 + 8 + 1e-9  # two fp32 moments of 4 levels, a count


def test_bytes_moved_are_counted(whole_runs):
    """Two ranks: the halo's rows travel as codes + levels (12 or 24 bytes at d = 16, against 64 in
    fp32) and dL/dx goes back to the owners (d values a row: 2-bit with a fp16 scale, 6 bytes)."""
    one, two = whole_runs[1][0][0]["wire"]["train"], whole_runs[2][0][0]["wire"]["train"]
    assert one["rows_fetched_bytes"] == one["gradients_sent_bytes"] == 0
    assert two["rows_fetched_bytes"] > 0 and two["gradients_sent_bytes"] > 0
    assert two["rows_fetched_fp32_bytes"] / two["rows_fetched_bytes"] == pytest.approx(64 / (4 + 16))
    assert two["gradients_sent_fp32_bytes"] == two["gradients_sent_bytes"]  # exact gradients: fp32 rows
    low = whole_runs[2][0][2]["wire"]["train"]
    assert low["rows_fetched_fp32_bytes"] / low["rows_fetched_bytes"] == pytest.approx(64 / (4 + 8))
    assert low["gradients_sent_fp32_bytes"] / low["gradients_sent_bytes"] == pytest.approx(64 / (4 + 2))
    assert whole_runs[2][0][0]["wire"]["refine"]["gradients_sent_bytes"] == 0  # the update moves nothing
    assert np.isfinite(whole_runs[2][0][2]["metrics"]["recall@20"])


# -- checkpoints: resume, reshard 2 -> 1 -> 2, export ---------------------------------------------
def scenario_ckpt(rank: int, world: int, out: str, tag: str, epochs: int, resume: str | None) -> dict:
    from gnaq_dist.distributed.trainer import DistributedTrainer

    extra = {"out": f"{out}/{tag}", "checkpoint.every_epochs": 1, "checkpoint.keep_last": 5,
             "schedule.epochs": epochs, "schedule.eval_every": 1, "model.level_dtype": "float16",
             # a constant latent step: the cosine's curve follows each run's own plan, and b plans 3 epochs
             "model.latent_decay": "none"}
    if resume:
        extra["checkpoint.resume"] = resume
    trainer = DistributedTrainer(lat_config(**extra), small_data())
    result = trainer.run()
    result["rows_state"] = _rows(trainer)
    return result


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    """a: 2 ranks, 4 epochs straight. b: 1 rank from a's epoch-2 checkpoint to epoch 3. c: 2 ranks
    from b's epoch-3 checkpoint to epoch 4. Exact gradients (compressed ones depend on which rank
    owns a row: its own rows' gradients never go through the compressor)."""
    out = str(tmp_path_factory.mktemp("lat-ckpt"))
    a = run_ranks(scenario_ckpt, 2, out, "a", 4, None, timeout=180)
    store = ckpt.CheckpointStore(f"{out}/a/checkpoints")
    b = run_ranks(scenario_ckpt, 1, out, "b", 3, store.uri(store.names()[1]), timeout=180)
    store_b = ckpt.CheckpointStore(f"{out}/b/checkpoints")
    c = run_ranks(scenario_ckpt, 2, out, "c", 4, store_b.uri(store_b.names()[-1]), timeout=180)
    return out, a, b, c


@pytest.mark.slow
def test_checkpoints_carry_the_latent_and_its_row_state(resharded):
    out, a, _, _ = resharded
    store = ckpt.CheckpointStore(f"{out}/a/checkpoints")
    uri = store.uri(store.names()[-1])
    manifest = ckpt.verify(uri)
    assert manifest["shard_method"] == "gnaq_lat" and manifest["world_size"] == 2
    rows = ckpt.read_rows(uri, manifest, np.arange(500))
    names = set(rows.column_names)
    assert {"param.levels", "buffer.latent_packed", "buffer.grad_sq", "adam.m.levels"} <= names
    assert not any(n.startswith("param.") and n != "param.levels" for n in names)  # no fp latent
    col = rows.schema.field("buffer.latent_packed").type
    assert col.value_type == pa.uint8() and col.list_size == DIM * 4 // 8  # the bytes as held
    latent = _global([r["rows_state"] for r in a], "latent")
    m = ckpt.build_for_rows(manifest, 500)
    ckpt.load_rows(m, rows)
    np.testing.assert_array_equal(m.latent_int.numpy(), latent)


@pytest.mark.slow
def test_resume_and_reshard_two_one_two_continue_the_run_exactly(resharded):
    _, a, b, c = resharded
    assert b[0]["resumed_from"]["world_size_then"] == 2 and b[0]["world_size"] == 1
    assert c[0]["resumed_from"]["world_size_then"] == 1 and c[0]["world_size"] == 2
    assert_same_run(a, c)
    resume_eval = [r for r in b[0]["history"] if r["event"] == "eval" and r["phase"] == "resume"][0]
    written = [r for r in a[0]["history"] if r["event"] == "eval" and r["epoch"] == 2][0]
    assert resume_eval["recall@20"] == pytest.approx(written["recall@20"], abs=1e-9)


@pytest.mark.slow
def test_export_gives_the_served_table(resharded, tmp_path):
    from gnaq_dist.export import export_bundle

    out, *_ = resharded
    store = ckpt.CheckpointStore(f"{out}/c/checkpoints")
    uri = store.uri(store.names()[-1])
    data = small_data()
    kind, table = ckpt.load_table(uri, ckpt.verify(uri), data)
    assert kind == "packed" and table.bits == 2
    report = export_bundle(str(tmp_path / "bundle"), kind, table, data, 2, {})
    # codes and levels only, as GNAQ's bundle (fp16 levels: 24 bytes a node at d = 64, 12 at d = 16);
    # the latent, which only training needs, stays in the checkpoint
    assert report["embedding_bytes_per_node"] == DIM * 2 / 8 + 2 * 4
