"""The Ray Train launcher on a real local Ray: workers in a gloo group, results back
through Ray Train, a failing worker fails the job with its error, and bad requests are
refused before any worker starts."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from gnaq_dist.distributed.ray_launch import (  # noqa: E402
    DistributedTrainingError,
    check_capacity,
    connect,
    ray_environment,
    train_on_ray,
)
from gnaq_dist.errors import GnaqInputError  # noqa: E402
from gnaq_dist.train.config import TrainConfig  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray_environment()
    ray.init(address="local", num_cpus=3, include_dashboard=False, object_store_memory=300 * 1024 * 1024)
    # Workers unpickle this module's functions by value: tests/ is not importable there.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def sum_of_ranks(config: TrainConfig, report) -> dict:
    import torch
    import torch.distributed as dist

    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    report({"epoch": 1, "loss": 0.5})
    return {"metrics": {"sum": float(value), "backend": dist.get_backend()}, "seed": config.seed}


def fails_on_rank_one(config: TrainConfig, report) -> dict:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("worker 1 found a broken shard")
    dist.barrier()  # rank 0 waits for rank 1, which never comes
    return {}


@pytest.mark.slow
def test_workers_form_a_gloo_group_and_return_a_summary(local_ray, tmp_path):
    config = TrainConfig(dataset="unused", out=str(tmp_path), seed=7)
    summary = train_on_ray(config, workers=2, worker_fn=sum_of_ranks)
    assert summary["metrics"] == {"sum": 3.0, "backend": "gloo"}
    assert summary["seed"] == 7
    assert len(summary["worker_nodes"]) == 2


@pytest.mark.slow
def test_a_failing_worker_fails_the_job_with_its_error(local_ray, tmp_path):
    config = TrainConfig(dataset="unused", out=str(tmp_path))
    t0 = time.time()
    with pytest.raises(DistributedTrainingError, match="worker 1 found a broken shard"):
        train_on_ray(config, workers=2, worker_fn=fails_on_rank_one)
    assert time.time() - t0 < 300  # an error, not a hang (Ray's group timeout is 30 minutes)


@pytest.mark.slow
def test_more_workers_than_cpus_is_refused_before_start(local_ray):
    with pytest.raises(GnaqInputError, match="has 3 CPUs, 4 are needed"):
        check_capacity(3)


def test_unreachable_address_is_refused_quickly():
    t0 = time.time()
    with pytest.raises(GnaqInputError, match="no Ray cluster reachable"):
        connect("127.0.0.1:1", workers=1)
    assert time.time() - t0 < 10
    with pytest.raises(GnaqInputError, match="expected HOST:PORT"):
        connect("nonsense", workers=1)


@pytest.mark.slow
def test_gnaq_trains_on_two_ray_workers_through_the_cli(local_ray, tmp_path, capsys):
    """`gnaq train --workers 2`: the real sharded loop in Ray Train workers, on the
    bundled Last.fm sample; 2-bit gradients on the wire, metrics and bytes come back."""
    import json

    from gnaq_dist.cli import main as gnaq_main
    from gnaq_dist.demo import ingest_bundled

    dataset = ingest_bundled(tmp_path / "lastfm", progress=False)
    out = tmp_path / "run"
    code = gnaq_main([
        "train", "--workers", "2", "--dataset", dataset, "--out", str(out), "--no-progress",
        "--set", "model.dim=16", "--set", "model.num_layers=2", "--set", "schedule.epochs=3",
        "--set", "schedule.warmup_epochs=2", "--set", "schedule.batch_size=2048", "--set", "optim.lr=0.01",
        "--set", "schedule.propagation=sampled", "--set", "schedule.fanouts=[5, 5]",
        "--set", "distributed.grad_bits=2", "--set", "distributed.partition=hash",
    ])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["worker_nodes"]) == 2
    # every worker's shard comes back with its peak memory: together they own every node
    nodes = summary["partition"]["n_users"] + summary["partition"]["n_items"]
    assert sum(s["own_nodes"] for s in summary["worker_shards"]) == nodes
    assert 0.02 < summary["metrics"]["recall@20"] <= 1.0  # random ranking gives about 0.005
    assert summary["phase_epochs"] == {"fp": 2, "quantized": 1}
    # d = 16: fp32 rows (64 B) against gnaq's 2-bit codes (4 B), 4 fp16 levels (8 B) and an fp16 score bias (2 B)
    assert summary["storage"]["compression_ratio"] == pytest.approx(64 / 14)
    assert summary["wire"]["train"]["gradients_sent_bytes"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert evals and evals[-1]["recall@20"] == summary["metrics"]["recall@20"]
    assert records[0]["event"] == "start" and records[0]["world_size"] == 2
    assert records[-1]["event"] == "end" and records[-1]["metrics"] == summary["metrics"]


def _train_worker_pids() -> list[int]:
    """The live Ray Train worker actors' processes among this test's own descendants, by the
    title Ray gives an actor's process (``ray::RayTrainWorker...``)."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline()[:1])
        except psutil.Error:
            continue
        if title.startswith("ray::RayTrainWorker"):
            pids.append(proc.pid)
    return pids


def _kill_a_worker_after_checkpoint(root, epoch: int, done: "threading.Event", killed: list) -> None:
    """SIGKILL one Ray Train worker (an actor of this test's Ray) once checkpoint ``epoch`` is complete."""
    import json
    import os
    import signal

    while not done.is_set():
        manifests = sorted(root.glob("ckpt-*/manifest.json")) if root.exists() else []
        if any(json.loads(m.read_text())["epoch"] >= epoch for m in manifests):
            for pid in _train_worker_pids():  # this test's Ray's only, never another's
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(pid)
                return
        time.sleep(0.1)


@pytest.mark.slow
def test_a_killed_worker_process_resumes_from_the_last_checkpoint(local_ray, tmp_path):
    """A real SIGKILL of a worker mid-training: Ray Train restarts the group (FailureConfig),
    the workers resume from the checkpoint that get_checkpoint() points to, and the run ends
    with the metrics of an uninterrupted run of the same seed and budget."""
    import threading

    from gnaq_dist.config import load_config
    from gnaq_dist.demo import ingest_bundled

    dataset = ingest_bundled(tmp_path / "lastfm", progress=False)

    def config(out):
        return load_config(TrainConfig, [], [
            f"dataset={dataset}", f"out={out}", "progress=false", "model.dim=16", "model.num_layers=2",
            "schedule.epochs=5", "schedule.warmup_epochs=2", "schedule.batch_size=2048", "schedule.eval_every=0",
            "schedule.propagation=sampled", "schedule.fanouts=[5, 5]", "optim.lr=0.01",
            "distributed.grad_bits=2", "distributed.partition=hash",
            "checkpoint.every_epochs=1", "checkpoint.max_failures=2",
        ])

    reference = train_on_ray(config(tmp_path / "ref"), workers=2)
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_after_checkpoint,
                              args=(tmp_path / "crash" / "checkpoints", 2, done, killed), daemon=True)
    killer.start()
    try:
        crashed = train_on_ray(config(tmp_path / "crash"), workers=2)
    finally:
        done.set()
        killer.join()
    assert killed, "no worker was killed: the run finished before its second checkpoint?"
    assert crashed["resumed_from"] is not None and crashed["resumed_from"]["epoch"] >= 2
    assert crashed["steps"] == reference["steps"]
    for k in ("recall@20", "ndcg@20"):
        assert crashed["metrics"][k] == pytest.approx(reference["metrics"][k], rel=0.01), k


@pytest.mark.slow
def test_a_killed_ray_run_keeps_the_metrics_of_its_finished_epochs(tmp_path):
    """`gnaq train --workers 2` killed (SIGKILL, the driver and every process it started) after
    its second epoch: metrics.jsonl at --out already holds the records of the finished epochs,
    written by rank 0 as they came, not by the driver at the end."""
    import json
    import os
    import signal
    import subprocess

    import psutil

    from gnaq_dist.demo import ingest_bundled

    dataset = ingest_bundled(tmp_path / "lastfm", progress=False)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([
        sys.executable, "-m", "gnaq_dist.cli", "train", "--workers", "2", "--dataset", dataset, "--out", str(out),
        "--no-progress", "--set", "model.dim=16", "--set", "model.num_layers=2", "--set", "schedule.epochs=30",
        "--set", "schedule.warmup_epochs=2", "--set", "schedule.batch_size=2048", "--set", "schedule.eval_every=1",
        "--set", "schedule.propagation=sampled", "--set", "schedule.fanouts=[5, 5]",
        "--set", "distributed.partition=hash", "--set", "checkpoint.every_epochs=1",
    ], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = out / "metrics.jsonl"
    deadline = time.time() + 400

    def epochs_logged() -> list[int]:
        """Epochs whose last record (the checkpoint's) is in the log; a line still being written is skipped."""
        if not log.exists():
            return []
        done = []
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["event"] == "checkpoint":
                done.append(record["epoch"])
        return done

    try:
        while len(epochs_logged()) < 2 and driver.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert driver.poll() is None, "the run ended before it was killed"
        assert len(epochs_logged()) >= 2, "no two epochs logged in time"
    finally:
        family = [driver.pid] + [p.pid for p in psutil.Process(driver.pid).children(recursive=True)] \
            if driver.poll() is None else []
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        driver.wait(timeout=60)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    finished = sorted({r["epoch"] for r in records if r["event"] == "epoch"})
    assert finished[:2] == [1, 2]
    for epoch in finished[:2]:
        mine = [r for r in records if r.get("epoch") == epoch]
        assert {"epoch", "wire", "eval", "checkpoint"} <= {r["event"] for r in mine}, mine
        assert next(r for r in mine if r["event"] == "eval")["recall@20"] > 0
    assert not (out / "summary.json").exists()  # the run did not end: only its per-epoch records are there


def test_the_driver_leaves_out_the_placement_group_cleaners_lines(capsys):
    """Ray Train's cleaner actor warns every second without a dashboard, and dies with a traceback
    where Ray's current-cluster record is stale; the run's own lines pass, whole and in order."""
    from gnaq_dist.distributed.ray_launch import _dropping_lines

    with _dropping_lines():
        print("(RayTrainWorker pid=7) epoch 1 [fp] loss 0.5")
        sys.stderr.write("(PlacementGroupCleaner pid=9) Traceback (most recent call last):\n(Placement")
        sys.stderr.write("GroupCleaner pid=9) ray.exceptions.RpcError: Timed out\n")
        sys.stderr.write("(PlacementGroupCleaner pid=9) Failed to query Ray Train Controller actor state.\n")
        print("(RayTrainWorker pid=7) epoch 2 [fp] loss 0.4", end="")
    out, err = capsys.readouterr()
    assert out == "(RayTrainWorker pid=7) epoch 1 [fp] loss 0.5\n(RayTrainWorker pid=7) epoch 2 [fp] loss 0.4"
    assert err == ""
