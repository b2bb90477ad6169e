"""The distributed training loop on real gloo ranks: W-independence, compressed gradients,
wire bytes, sharded state, every method, and a failing rank.

Ranks are spawned by ``distributed_utils.run_ranks``; one spawn per scenario (starting a
rank costs seconds), several runs inside a scenario where they can share it.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from distributed_utils import RankError, run_ranks
from gnaq_dist.config import load_config
from gnaq_dist.graph import TrainCSR
from gnaq_dist.synthetic import clustered_interactions
from gnaq_dist.train.config import TrainConfig

GNAQ_ROW_BYTES = 16 // 4 + 2 * 4  # d=16 two-bit codes (4 bytes) + four fp16 levels


def small_data():
    return clustered_interactions(n_users=300, n_items=200, seed=1)


def small_config(method: str = "gnaq", bits: int | None = 2, **extra) -> TrainConfig:
    overrides = [
        f"model.method={method}", f"model.bits={'null' if bits is None else bits}",
        "model.dim=16", "model.num_layers=2", "schedule.epochs=2", "schedule.warmup_epochs=1",
        "schedule.batch_size=512", "schedule.num_negatives=2", "schedule.eval_every=0",
        "schedule.propagation=sampled", "schedule.fanouts=[-1,-1]",
        "optim.lr=0.02", "progress=false", "seed=3", "eval.ks=[10,20]",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(TrainConfig, [], overrides)


def _state(trainer) -> dict:
    """This rank's rows with their global ids (to reassemble the table in global order)."""
    m = trainer.shard.method
    owned = trainer.partition.owned_ids(trainer.rank)
    out = {"ids": owned, "levels": m.levels.detach()[: len(owned)].clone().numpy()}
    out["codes"] = m.codes[: len(owned)].clone().numpy()
    if m.bias is not None:
        out["bias"] = m.bias.detach()[: len(owned)].clone().numpy()
    return out


def scenario_train(rank: int, world: int, overrides_list: list[dict]) -> list[dict]:
    """Run each configuration in turn; return its result and this rank's rows."""
    from gnaq_dist.allocator import retaining_freed_memory
    from gnaq_dist.distributed.trainer import DistributedTrainer

    data = small_data()
    out = []
    for overrides in overrides_list:
        records: list[dict] = []
        method = overrides.pop("method", "gnaq_static")
        bits = overrides.pop("bits", 2)
        trainer = DistributedTrainer(small_config(method, bits, **overrides), data, records.append)
        result = trainer.run()
        result["reports"] = len(records)
        if method in ("gnaq", "gnaq_static"):
            result["state"] = _state(trainer)
        result["adam_rows"] = trainer.shard.optimizer.state_rows()
        result["edges_held"] = (int(trainer.edges.indices.shape[0]), int(trainer.test_csr[1].shape[0]))
        result["own_users"] = int((trainer.partition.owner[: data.n_users] == rank).sum())
        result["retaining"] = retaining_freed_memory()
        out.append(result)
    return out


def _global(results: list[dict], key: str) -> np.ndarray:
    parts = [(r["state"]["ids"], r["state"][key]) for r in results]
    n = sum(len(i) for i, _ in parts)
    table = np.zeros((n,) + parts[0][1].shape[1:], dtype=parts[0][1].dtype)
    for ids, values in parts:
        table[ids] = values
    return table


@pytest.fixture(scope="module")
def refined_runs():
    """GNAQ as its reference runs it (codes re-assigned every step, score biases, tanh levels),
    two quantized epochs with fp32 levels and exact gradients, on 1 and 2 ranks: split
    full-graph propagation, and blocks at full fan-out."""
    runs = [{"method": "gnaq", "schedule.propagation": propagation, "schedule.epochs": 3,
             "model.level_dtype": "float32"} for propagation in ("full", "sampled")]
    one = run_ranks(scenario_train, 1, [dict(r) for r in runs], timeout=180)
    two = run_ranks(scenario_train, 2, [dict(r) for r in runs], timeout=180)
    return {(p, w): [ranks[i] for ranks in res] for i, p in enumerate(("full", "sampled"))
            for w, res in ((1, one), (2, two))}


@pytest.mark.parametrize("propagation", ["full", "sampled"])
def test_refinement_on_two_ranks_equals_one(refined_runs, propagation):
    """Every rank refines its own rows; the halo copies (full) and fetched rows (blocks) on the
    other rank see the new codes at the next step, or two ranks could not match one."""
    one, two = refined_runs[(propagation, 1)], refined_runs[(propagation, 2)]
    for key in ("codes", "levels", "bias"):
        np.testing.assert_allclose(_global(one, key), _global(two, key), rtol=0, atol=1e-5, err_msg=key)
    assert np.abs(_global(one, "bias")).sum() > 0
    for k, v in one[0]["metrics"].items():
        assert two[0]["metrics"][k] == pytest.approx(v, abs=1e-9)
    epochs = [[r for r in res["history"] if r["event"] == "epoch"] for res in (one[0], two[0], two[1])]
    changed = [[r.get("codes_changed") for r in e] for e in epochs]
    assert changed[0] == changed[1] == changed[2]  # summed over ranks: the same figure on every rank
    assert changed[0][0] is None and all(0 < c <= 1 for c in changed[0][1:])  # fp warm-up, then refining
    assert all(r["layer0_error"] == 0.0 for e in epochs for r in e[1:])  # fp32 levels store exactly
    # Full graph: each owner refines from its own rows' forward, nothing moves for it; blocks:
    # the requesters send the propagated rows of the batch's nodes to their owners.
    refine_bytes = two[0]["wire"]["refine"]["gradients_sent_bytes"]
    assert refine_bytes == 0 if propagation == "full" else refine_bytes > 0
    assert one[0]["wire"]["refine"]["gradients_sent_bytes"] == 0


@pytest.fixture(scope="module")
def exact_runs():
    """GNAQ 2-bit (the frozen-code form), one warm-up epoch and one quantized epoch,
    uncompressed, on 1 and 2 ranks: on blocks sampled at full fan-out, and split full-graph
    propagation."""
    runs = [{}, {"schedule.propagation": "full"},
            # one propagation a step for half the epoch's positives (the default kind of schedule)
            {"schedule.propagation": "full", "schedule.batch_size": "null", "schedule.steps_per_epoch": 2}]
    one = run_ranks(scenario_train, 1, [dict(r) for r in runs], timeout=180)
    two = run_ranks(scenario_train, 2, [dict(r) for r in runs], timeout=180)
    return ([r[0] for r in one], [r[0] for r in two], [r[1] for r in one], [r[1] for r in two],
            [r[2] for r in one], [r[2] for r in two])


def test_two_ranks_train_exactly_like_one(exact_runs):
    one, two = exact_runs[:2]
    assert two[0]["partition"]["world_size"] == 2
    np.testing.assert_array_equal(_global(one, "codes"), _global(two, "codes"))
    np.testing.assert_allclose(_global(one, "levels"), _global(two, "levels"), atol=1e-5, rtol=0)
    for k, v in one[0]["metrics"].items():
        assert two[0]["metrics"][k] == pytest.approx(v, abs=1e-9)
        assert two[1]["metrics"][k] == two[0]["metrics"][k]  # every rank returns the same metrics
    assert one[0]["phase_steps"] == two[0]["phase_steps"] == {"fp": 6, "quantized": 6}
    # Same records on every rank (Ray's report is a barrier): 2 epochs x (epoch, wire, epoch_end) + 1 eval.
    assert two[0]["reports"] == two[1]["reports"] == one[0]["reports"] == 7
    # retain_freed_memory: null keeps a worker's freed blocks (its steps keep their tables).
    assert all(r["retaining"] for r in one + two)


def test_two_ranks_train_like_one_with_a_few_large_steps_an_epoch(exact_runs):
    one, two = exact_runs[4:]
    assert one[0]["phase_steps"] == two[0]["phase_steps"] == {"fp": 2, "quantized": 2}
    np.testing.assert_array_equal(_global(one, "codes"), _global(two, "codes"))
    np.testing.assert_allclose(_global(one, "levels"), _global(two, "levels"), atol=1e-5, rtol=0)
    for k, v in one[0]["metrics"].items():
        assert two[0]["metrics"][k] == pytest.approx(v, abs=1e-9)


def test_split_full_graph_propagation_trains_like_blocks_on_one_and_two_ranks(exact_runs):
    """Both are exact propagation: the same parameters, whatever the number of ranks."""
    blocks_one, blocks_two, full_one, full_two = exact_runs[:4]
    for full in (full_one, full_two):
        np.testing.assert_array_equal(_global(blocks_one, "codes"), _global(full, "codes"))
        np.testing.assert_allclose(_global(blocks_one, "levels"), _global(full, "levels"), atol=1e-5, rtol=0)
        for k, v in blocks_one[0]["metrics"].items():
            assert full[0]["metrics"][k] == pytest.approx(v, abs=1e-9)
    # Two ranks swap the boundary's activations (fp32) and nothing else moves that blocks did not.
    assert full_two[0]["wire"]["train"]["activations_bytes"] > 0
    assert full_one[0]["wire"]["train"]["activations_bytes"] == 0
    assert blocks_two[0]["wire"]["train"]["activations_bytes"] == 0


def test_each_rank_holds_about_half_the_rows(exact_runs):
    two = exact_runs[1]
    n_nodes = 500
    for r in two:
        rows = r["rows"]
        assert rows["param_rows"] == rows["owned_rows"] == rows["buffer_rows"]
        assert rows["optimizer_state_rows"] == rows["optimizer_moment_rows"] == r["adam_rows"] == rows["owned_rows"]
        assert abs(rows["owned_rows"] - n_nodes / 2) <= 0.1 * n_nodes / 2
    assert sum(r["rows"]["owned_rows"] for r in two) == n_nodes
    # The rows are held packed: 2-bit codes (d/4 bytes) + 4 fp32 levels, the training floor.
    d = 16
    for r in two:
        mem = r["memory"]
        assert mem["floor_bytes_per_node"] == d * 2 / 8 + 4 * 4
        assert mem["table_bytes_per_node"] == pytest.approx(mem["floor_bytes_per_node"])
        assert mem["table_bytes"] == r["rows"]["owned_rows"] * (d // 4 + 16)
        assert mem["optimizer_bytes_per_node"] == 2 * 4 * 4 + 8  # Adam moments of the levels, step count


def test_split_ranks_keep_only_their_own_users_edges(exact_runs):
    """With the graph split by owner, the per-edge arrays follow the shard: each rank keeps
    its own users' train and test edges (the two ranks' add up to the whole), while a rank
    with sampled blocks keeps every edge (DGL samples the whole graph)."""
    data = small_data()
    n_train = TrainCSR.from_pairs(data.n_users, data.n_items, data.train_user, data.train_item).indices.shape[0]
    n_test = np.unique(data.test_user * data.n_items + data.test_item).shape[0]
    _, blocks_two, full_one, full_two = exact_runs[:4]
    assert full_one[0]["edges_held"] == (n_train, n_test)
    assert [sum(r["edges_held"][i] for r in full_two) for i in (0, 1)] == [n_train, n_test]
    for r in full_two:
        assert 0.25 * n_train < r["edges_held"][0] < 0.75 * n_train
        assert 0 < r["own_users"] < data.n_users
        # the summary's shard: what the rank propagates (own + halo rows, its non-zeros)
        assert r["shard"]["own_nodes"] == r["rows"]["owned_rows"] and r["shard"]["halo_nodes"] > 0
    assert sum(r["shard"]["nnz"] for r in full_two) == full_one[0]["shard"]["nnz"] == 2 * n_train
    assert full_one[0]["shard"]["halo_nodes"] == 0
    assert all(r["edges_held"][0] == n_train for r in blocks_two)


@pytest.fixture(scope="module")
def compressed_runs():
    """d = 64, 36 warm-up + 24 quantized steps on 2 ranks: fp32 gradients, then 2-bit with error feedback."""
    base = {"model.dim": 64, "schedule.epochs": 10, "schedule.warmup_epochs": 6, "optim.quant_lr": "null",
            "distributed.partition": "hash"}  # METIS may cut this graph differently from run to run
    plain, two_bit = run_ranks(scenario_train, 2, [dict(base), dict(base, **{"distributed.grad_bits": 2})],
                               timeout=180)[0]
    return plain, two_bit


def test_two_bit_gradients_with_error_feedback_keep_recall(compressed_runs):
    plain, two_bit = compressed_runs
    random_recall = 20 / 190  # 200 items, about 9 masked per user
    assert plain["metrics"]["recall@20"] > 4 * random_recall  # the budget learns something
    # Measured with a hash partition: 0.5656 fp32 gradients, 0.5700 2-bit with error feedback (the same every run).
    assert two_bit["metrics"]["recall@20"] == pytest.approx(plain["metrics"]["recall@20"], rel=0.02)


def _phase_wire(result: dict, phase: str) -> dict:
    """Bytes of all wire records of one phase, summed."""
    out: dict = {}
    for rec in result["history"]:
        if rec["event"] == "wire" and rec["phase"] == phase:
            for k, v in rec.items():
                if k.endswith("_bytes"):
                    out[k] = out.get(k, 0) + v
    return out


def test_compressed_gradients_and_fetched_gnaq_rows_are_over_10x_smaller(compressed_runs):
    plain, two_bit = compressed_runs
    fp_phase, q_phase = _phase_wire(two_bit, "fp"), _phase_wire(two_bit, "quantized")
    # Warm-up: d = 64 fp32 rows fetched as is; their 2-bit gradients 16 + 2 bytes vs 256.
    assert fp_phase["rows_fetched_bytes"] == fp_phase["rows_fetched_fp32_bytes"] > 0
    assert fp_phase["gradients_sent_fp32_bytes"] / fp_phase["gradients_sent_bytes"] == pytest.approx(256 / 18)
    assert fp_phase["gradients_sent_fp32_bytes"] >= 10 * fp_phase["gradients_sent_bytes"]
    # Quantized phase: a GNAQ row is 16 code bytes + 4 fp16 levels (24 bytes) vs 256.
    assert q_phase["rows_fetched_fp32_bytes"] / q_phase["rows_fetched_bytes"] == pytest.approx(256 / 24)
    assert q_phase["rows_fetched_fp32_bytes"] >= 10 * q_phase["rows_fetched_bytes"]
    # GNAQ's gradient is 2^b = 4 values a row: 1 + 2 bytes at 2 bits vs 16 as fp32 (the counter's
    # baseline, 5.3x), and vs the d-dim fp32 gradient an fp32 model sends per row, 85x.
    assert q_phase["gradients_sent_fp32_bytes"] / q_phase["gradients_sent_bytes"] == pytest.approx(16 / 3)
    rows_sent = q_phase["gradients_sent_bytes"] / 3
    assert 4 * 64 * rows_sent >= 10 * q_phase["gradients_sent_bytes"]
    # Uncompressed gradients are counted at their full size.
    plain_q = _phase_wire(plain, "quantized")
    assert plain_q["gradients_sent_bytes"] == plain_q["gradients_sent_fp32_bytes"] > 0
    assert two_bit["wire"]["train"]["total_bytes"] < plain["wire"]["train"]["total_bytes"]


def scenario_methods(rank: int, world: int) -> list[dict]:
    """Every method the distributed loop trains (not BiGeaR: test_bigear.py), a few steps each on
    this rank; plus GNAQ with code refinement."""
    from gnaq_dist.distributed.evaluation import evaluate_gathered, evaluate_split
    from gnaq_dist.distributed.trainer import DistributedTrainer

    data = small_data()
    out = []
    full = {"schedule.propagation": "full"}
    for method, bits, extra in [("fp", None, {}), ("gnaq", 2, {}), ("gnaq_ste", 2, {}), ("lsq", 2, {}),
                                ("n2uq", 2, {}), ("gnaq", 2, {"model.refine_every": 2}),
                                ("lsq", 4, {"distributed.grad_bits": 2, "distributed.partition": "hash"}),
                                # split full-graph propagation (halo exchange) for every kind of row
                                ("n2uq", 2, {**full, "distributed.grad_bits": 2}),
                                ("gnaq", 2, {**full, "model.refine_every": 2}),
                                ("fp", None, full), ("lsq", 2, {**full, "distributed.partition": "hash"}),
                                ("lsq", 2, {**full, "model.lsq_step": "node"})]:
        cfg = small_config(method, bits, **{"schedule.max_steps": 9, **extra})
        # Split runs keep every edge here, for the gathered evaluation they are compared with
        # (the split runs of exact_runs hold their own users' edges only).
        DistributedTrainer.keep_whole_edges = True
        trainer = DistributedTrainer(cfg, data)
        result = trainer.run()
        result["method"] = method
        if extra.get("schedule.propagation") == "full":
            # Split evaluation (no N x d table on any rank) against the whole table gathered.
            result["split_eval"], result["gathered_eval"] = evaluate_split(trainer), evaluate_gathered(trainer)
        out.append(result)
    return out


@pytest.mark.slow
def test_every_method_trains_on_two_ranks():
    t0 = time.monotonic()
    ranks = run_ranks(scenario_methods, 2, timeout=240)
    for r0, r1 in zip(*ranks):
        assert r0["metrics"] == r1["metrics"], r0["method"]
        json.dumps(r0, allow_nan=False)  # the summary a launcher writes must be valid JSON
        assert r0["metrics"] and all(np.isfinite(v) for v in r0["metrics"].values()), r0["method"]
        assert r0["metrics"]["recall@20"] > 0, r0["method"]
        want = {"fp": 9, "quantized": 0} if r0["method"] == "fp" else {"fp": 6, "quantized": 3}
        assert r0["steps"] == 9 and r0["phase_steps"] == want, r0["method"]
        assert r0["storage"]["compression_ratio"] >= 1.0
        if r0["method"] != "fp":
            assert r0["storage"]["compression_ratio"] > 1.0
    refined = ranks[0][5]
    assert refined["wire"]["refine"]["gradients_sent_bytes"] > 0  # propagated rows went to their owners
    assert ranks[0][6]["partition"]["method"] == "hash"
    assert ranks[0][6]["wire"]["train"]["allreduce_bytes"] > 0  # LSQ's shared step is all-reduced
    for full in ranks[0][7:]:
        assert full["wire"]["train"]["activations_bytes"] > 0, full["method"]
    # With the whole graph split by owner, each owner refines its own rows: nothing to send.
    assert ranks[0][8]["wire"]["refine"]["gradients_sent_bytes"] == 0  # headers only
    # LSQ with a step per node: the step is a row parameter (nothing all-reduced), each row has its own grid.
    assert ranks[0][11]["wire"]["train"]["allreduce_bytes"] < ranks[0][10]["wire"]["train"]["allreduce_bytes"]
    assert ranks[0][11]["storage"]["bytes_per_node"] > ranks[0][10]["storage"]["bytes_per_node"]
    split_evaluated = [r for r in ranks[0] + ranks[1] if "split_eval" in r]
    assert sorted({r["method"] for r in split_evaluated}) == ["fp", "gnaq", "lsq", "n2uq"]
    for r in split_evaluated:
        (m_split, s_split), (m_all, s_all) = r["split_eval"], r["gathered_eval"]
        assert m_split.keys() == m_all.keys(), r["method"]
        for k, v in m_all.items():
            assert m_split[k] == pytest.approx(v, abs=1e-9), (r["method"], k)
        assert s_split == pytest.approx(s_all), r["method"]
        assert m_split == r["metrics"]  # what the run reported was the split evaluation
    print(f"every method: {time.monotonic() - t0:.1f} s")


def scenario_setup_failure(rank: int, world: int) -> str:
    """Rank 1 is given no data and a dataset that does not exist; both ranks must raise."""
    from gnaq_dist.distributed.trainer import train_worker

    data = small_data() if rank == 0 else None
    cfg = small_config(dataset="/nonexistent/dataset")
    try:
        train_worker(cfg, data)
    except Exception as exc:  # noqa: BLE001 - the scenario reports each rank's error
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def scenario_step_failure(rank: int, world: int) -> None:
    """Rank 1 raises inside its third step; rank 0 is then blocked in a collective."""
    from gnaq_dist.distributed.trainer import DistributedTrainer

    trainer = DistributedTrainer(small_config(), small_data())
    if rank == 1:
        original = trainer.step

        def failing_step(*args):
            if trainer.global_step == 2:
                raise ValueError("injected failure on rank 1")
            return original(*args)

        trainer.step = failing_step
    trainer.run()


def test_a_rank_that_fails_setup_makes_every_rank_raise():
    t0 = time.monotonic()
    errors = run_ranks(scenario_setup_failure, 2, timeout=180, pg_timeout_s=120)
    assert "GnaqInputError" in errors[1] and "nonexistent" in errors[1]
    assert errors[0].startswith("RuntimeError") and "1 other rank" in errors[0]
    assert time.monotonic() - t0 < 90  # the failure is agreed on, not found by the 120 s process-group timeout


@pytest.mark.slow
def test_a_rank_that_raises_mid_training_fails_the_run_promptly():
    t0 = time.monotonic()
    with pytest.raises(RankError, match="injected failure on rank 1"):
        run_ranks(scenario_step_failure, 2, timeout=60, pg_timeout_s=30)
    assert time.monotonic() - t0 < 25  # well before the 30 s process-group timeout


def test_steady_throughput_leaves_out_the_first_step():
    from gnaq_dist.distributed.metrics import steady_throughput

    got = steady_throughput([(3.0, 10), (1.0, 8), (2.0, 8), (1.5, 4)])
    assert got["first_step_seconds"] == 3.0
    assert got["steps"] == 3
    assert got["seconds_per_step"] == pytest.approx(1.5)
    assert got["median_step_seconds"] == pytest.approx(1.5)
    assert got["edges_per_second"] == pytest.approx(20 / 4.5)
    one = steady_throughput([(2.0, 5)])
    assert one["first_step_seconds"] == 2.0 and one["seconds_per_step"] is None and one["edges_per_second"] is None
    assert steady_throughput([])["first_step_seconds"] is None
