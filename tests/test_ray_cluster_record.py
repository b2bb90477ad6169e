"""A local Ray started by ``gnaq train --workers`` resolves "the current cluster" to itself.

Ray Train v2's placement-group cleaner (a detached actor) asks the state API of "the current
cluster" whether the Train controller is alive, and removes the run's placement group when
that cluster does not know the controller. Without an address it takes the cluster that Ray's
record (``<RAY_TMPDIR or /tmp>/ray/ray_current_cluster``, written by ``ray start``) names. Here
that record names a decoy: another live Ray on this machine, with a dashboard that answers the
state API. The run must train to the end, the cleaner must never have asked the decoy, and the
decoy's record must be left as it was (``ray_launch.connect``, docs/reliability.md).

A root that a killed driver left (its reaper killed with it) is removed by the next run.
The test keeps the machine's own record untouched: the decoy and the run get a private
``RAY_TMPDIR`` (where Ray reads and writes its record), and the environment is put back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from conftest import load_script
from test_concurrent_writers import finish, gnaq
from test_signals import tiny_dataset

pytest.importorskip("ray")
cluster_local = load_script("cluster/local_cluster.py")

pytestmark = pytest.mark.slow  # a decoy Ray and a two-worker run: about 90 s


@pytest.fixture
def decoy(monkeypatch):
    """A live one-node Ray with a dashboard, reachable on the machine's address, named by the
    record under a private RAY_TMPDIR (yielded with the record's text)."""
    # Short, under /tmp: Ray's Unix sockets live below it (107-byte limit on a socket path).
    root = Path(tempfile.mkdtemp(prefix="gqrec", dir="/tmp"))
    (root / "ray").mkdir()
    (root / "tmp").mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(root))  # Ray's record: root/ray/ray_current_cluster
    monkeypatch.setenv("TMPDIR", str(root / "tmp"))  # the run's own temporary folders, checked below
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    temp_dir = root / "decoy"
    try:
        cluster_local.launch(cluster_local.free_port(), node_cpus=(1,), temp_dir=temp_dir, object_store_mb=100,
                             timeout=120, extra_args=["--dashboard", "--dashboard-port", str(cluster_local.free_port()),
                                                      "--node-ip", "auto"])
        record = (root / "ray" / "ray_current_cluster").read_text()
        yield root, record
    finally:
        cluster_local.stop(temp_dir=temp_dir, remove=False)
        shutil.rmtree(root, ignore_errors=True)


def test_the_placement_group_cleaner_asks_our_ray_not_the_recorded_one(decoy, tmp_path):
    root, record = decoy
    # a root left by a driver killed together with its reaper: nobody holds its lock
    stale = root / "tmp" / ".gnaq-ray.tmp-dead"
    (stale / "ray").mkdir(parents=True)
    (stale / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    dataset = tiny_dataset(tmp_path)
    proc = gnaq("train", "--workers", "2", "--dataset", str(dataset), "--out", str(tmp_path / "run"),
                "--no-progress", "--epochs", "6", "--set", "schedule.warmup_epochs=1", "--set", "model.dim=8",
                "--set", "distributed.partition=hash")
    code, out, err = finish(proc, timeout=400)
    assert code == 0, err[-4000:]
    assert (tmp_path / "run" / "summary.json").exists()
    # Asked the decoy, the cleaner learns that "the controller" does not exist and exits (then the
    # controller warns, over several lines, that it cannot register the placement group), or it
    # removes the run's placement group (the workers die and the run fails).
    assert "placement group" not in (out + err).lower(), (out + err)[-4000:]
    logs = list((root / "ray").glob("session_latest/logs/worker-*.err"))
    cleaner = [p.read_text(errors="replace") for p in logs
               if ":actor_name:PlacementGroupCleaner" in p.read_text(errors="replace")]
    assert len(cleaner) == 1, [p.name for p in logs]
    # It asked our Ray, which runs no dashboard, so it could not answer; never the decoy.
    assert f"Connecting to latest cluster at {record.strip()}." not in cleaner[0], cleaner[0][-3000:]
    assert "Failed to query Ray Train Controller actor state" in cleaner[0], cleaner[0][-3000:]
    assert (root / "ray" / "ray_current_cluster").read_text() == record  # the machine's record as it was
    assert list((root / "tmp").glob(".gnaq-ray.tmp-*")) == []  # the run's private Ray root removed, the stale one too
