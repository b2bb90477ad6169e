"""A real two-node Ray cluster on 127.0.0.1 (cluster/local_cluster.py, as cluster/local.sh
starts it): 2 Ray Train workers land on different nodes (STRICT_SPREAD), train on the
bundled Last.fm sample, write a sharded checkpoint, and the cluster goes away without
leftover processes, also when the test fails. The head runs the dashboard's job server,
and ``ray job submit --working-dir DIR -- gnaq train --address auto ...`` runs there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import load_script

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parent.parent


cluster_local = load_script("cluster/local_cluster.py")  # test and trial tooling outside the library

pytestmark = pytest.mark.slow  # a real two-node Ray cluster: about 90 s


@pytest.fixture(autouse=True)
def _restore_environment():
    """launch() points this process at its cluster (RAY_ADDRESS, PATH, the loopback switch, and
    Ray's record of the machine's current cluster), as the shell that ran local.sh would be;
    later tests start their own Ray, so put it all back."""
    saved = dict(os.environ)
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # where ray.init() looks for "the" cluster
    before = current.read_text() if current.exists() else None
    yield
    os.environ.clear()
    os.environ.update(saved)
    if before is None:
        current.unlink(missing_ok=True)
    else:
        current.write_text(before)


def ray_daemons_of(temp_dir: Path) -> list[str]:
    """raylet / gcs_server processes (not zombies) whose command line names ``temp_dir``:
    found independently of cluster_local.cluster_processes."""
    left = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.info["name"] in ("raylet", "gcs_server") and str(temp_dir) in cmdline:
                left.append(f"{proc.pid} {proc.info['name']}")
        except psutil.Error:
            continue
    return left


@pytest.fixture(scope="module")
def two_nodes():
    """Head (node_a) + one more node (node_b), 2 CPUs each, all on 127.0.0.1; the head
    runs the dashboard (job server) on 127.0.0.1 too."""
    if ray.is_initialized():
        ray.shutdown()
    port = cluster_local.free_port()
    # Short, under /tmp: Ray's Unix sockets live below it (107-byte limit on a socket path).
    temp_dir = Path(tempfile.mkdtemp(prefix="gnaq-ray-t", dir="/tmp"))
    t0 = time.time()
    try:
        state = cluster_local.launch(port, node_cpus=(2, 2), temp_dir=temp_dir, object_store_mb=150, timeout=120,
                                     extra_args=["--dashboard", "--dashboard-port", str(cluster_local.free_port())])
        state["start_seconds"] = time.time() - t0
        yield state
    finally:
        # The driver first: a driver whose GCS disappears exits its process after a while.
        if ray.is_initialized():
            ray.shutdown()
        stopped = cluster_local.stop(temp_dir=temp_dir, remove=False)
        left = ray_daemons_of(temp_dir)
        if not left:
            import shutil

            shutil.rmtree(temp_dir, ignore_errors=True)
        assert stopped > 0
        assert left == [], f"Ray processes of the test cluster outlived stop(): {left}"


def test_the_cluster_has_two_live_nodes_on_loopback(two_nodes):
    assert two_nodes["address"].startswith("127.0.0.1:")
    nodes = two_nodes["nodes"]
    assert [n["name"] for n in nodes] == ["node_a", "node_b"]
    assert [n["head"] for n in nodes] == [True, False]
    assert len({n["node_id"] for n in nodes}) == 2
    assert all(n["ip"] == "127.0.0.1" and n["cpus"] == 2 for n in nodes)
    assert two_nodes["dashboard"].startswith("http://127.0.0.1:")
    # Every TCP server of the cluster listens on the loopback interface only.
    listening = []
    for proc in cluster_local.cluster_processes(two_nodes["temp_dir"]):
        try:
            listening += [(proc.name(), c.laddr.ip) for c in proc.net_connections("tcp")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    assert listening, "no listening socket found"
    outside = [(name, ip) for name, ip in listening if ip not in ("127.0.0.1", "::ffff:127.0.0.1")]
    assert outside == []


def test_two_workers_train_on_two_nodes(two_nodes, tmp_path):
    """``gnaq train --address 127.0.0.1:PORT`` from a driver outside the cluster (which keeps
    127.0.0.1 as its address with the loopback switch set before Ray is imported)."""
    from gnaq_dist.demo import ingest_bundled

    dataset = ingest_bundled(tmp_path / "lastfm", progress=False)
    checkpoints = tmp_path / "checkpoints"
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env[cluster_local.LOOPBACK_ENV] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    t0 = time.time()
    done = subprocess.run([
        sys.executable, "-m", "gnaq_dist.cli", "train", "--address", two_nodes["address"], "--workers", "2",
        "--dataset", str(dataset), "--out", str(out), "--no-progress",
        "--set", "threads=1", "--set", "model.dim=16", "--set", "model.num_layers=2", "--set", "schedule.epochs=2",
        "--set", "schedule.warmup_epochs=1", "--set", "schedule.batch_size=2048", "--set", "schedule.max_steps=4",
        "--set", "schedule.eval_every=0", "--set", "schedule.propagation=sampled", "--set", "schedule.fanouts=[5, 5]",
        "--set", "optim.lr=0.01", "--set", "distributed.grad_bits=2", "--set", "distributed.partition=hash",
        "--set", "distributed.placement=STRICT_SPREAD",
        "--set", f"checkpoint.dir={checkpoints}", "--set", "checkpoint.every_epochs=1",
    ], capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    seconds = time.time() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())

    node_ids = {n["node_id"] for n in two_nodes["nodes"]}
    assert len(summary["worker_nodes"]) == 2
    assert summary["worker_nodes"][0] != summary["worker_nodes"][1]
    assert set(summary["worker_nodes"]) == node_ids  # one worker on the head, one on node_b
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert 0.0 <= summary["metrics"]["recall@20"] <= 1.0
    assert summary["metrics"]["ndcg@20"] >= 0.0
    assert summary["wire"]["train"]["gradients_sent_bytes"] > 0
    # The sharded checkpoint: one shard per worker, the manifest written last.
    manifest_path = Path(summary["checkpoint"]) / "manifest.json"
    assert manifest_path.parent.parent == checkpoints
    manifest = json.loads(manifest_path.read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == 4
    assert len(list(manifest_path.parent.glob("shard-*-of-00002.parquet"))) == 2
    print(f"cluster start {two_nodes['start_seconds']:.1f} s, 2-node training {seconds:.1f} s")


def test_ray_job_submit_runs_gnaq_train_on_the_cluster(two_nodes, tmp_path):
    """As docs/cluster.md shows it: the job's config comes from the uploaded working dir,
    its entrypoint is the installed ``gnaq`` CLI, run by the head with ``--address auto``."""
    from gnaq_dist.demo import ingest_bundled

    dataset = ingest_bundled(tmp_path / "lastfm", progress=False)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "job.yaml").write_text(
        "threads: 1\nmodel: {dim: 16, num_layers: 2}\n"
        "schedule: {epochs: 2, warmup_epochs: 1, batch_size: 2048, max_steps: 2, eval_every: 0,\n"
        "           propagation: sampled, fanouts: [5, 5]}\n"
        "distributed: {grad_bits: 2, partition: hash, placement: STRICT_SPREAD}\n"
        "checkpoint: {every_epochs: 1}\n")
    out = tmp_path / "run"
    ray_cli = Path(sys.executable).parent / "ray"
    command = [str(ray_cli), "job", "submit", "--address", two_nodes["dashboard"], "--working-dir", str(job_dir),
               "--", "gnaq", "train", "--config", "job.yaml", "--dataset", str(dataset), "--address", "auto",
               "--workers", "2", "--no-progress", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    log = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, log
    assert "succeeded" in log

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert len(set(summary["worker_nodes"])) == 2
    assert set(summary["worker_nodes"]) == {n["node_id"] for n in two_nodes["nodes"]}
    manifest = json.loads((Path(summary["checkpoint"]) / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and Path(summary["checkpoint"]).parent == out / "checkpoints"
