"""The Ray that ``train_on_ray`` starts for itself on one machine: which Ray processes run
beside the training workers. Each Ray Python process wakes 100 times a second, and on a
machine the workers fill each costs their step about 1 % (docs/scale.md), so the ones a
one-machine job does not use must not start: idle pool workers, the preemption watcher,
the dataset manager, the placement-group cleaner and Ray Data's autoscaling coordinator.
Also: Ray Train's INFO line per report stays out of the driver's output, and the workers
start with the allocator settings of a process that allocates from a thread. Linux only
(reads /proc)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from gnaq_dist.allocator import THREAD_ALLOCATION_ENV  # noqa: E402
from gnaq_dist.distributed.ray_launch import ONE_MACHINE_RAY_ENV, train_on_ray  # noqa: E402
from gnaq_dist.train.config import TrainConfig  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


def ray_processes_beside_me(config: TrainConfig, report) -> dict:
    """Runs in each worker: the titles of the processes its raylet started (workers, agents)."""
    import torch.distributed as dist

    dist.barrier()  # both workers and every actor of the job are up
    raylet = os.getppid()
    titles = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == raylet:
            titles.append(title.split(".")[0].strip())
    report({"event": "eval", "epoch": 1})  # Ray Train logs an INFO line per report unless quieted
    print(f"worker {dist.get_rank()} listed its neighbours", file=sys.stderr, flush=True)
    dist.barrier()
    # The environment the process started with, which is what glibc's malloc read.
    started_with = dict(entry.decode().split("=", 1) for entry in
                        Path("/proc/self/environ").read_bytes().split(b"\0") if b"=" in entry)
    return {"titles": sorted(titles), "malloc_env": {k: started_with.get(k) for k in THREAD_ALLOCATION_ENV}}


@pytest.fixture
def no_ray_running():
    if ray.is_initialized():
        pytest.skip("needs to start its own Ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable there
    for name in (*ONE_MACHINE_RAY_ENV, *THREAD_ALLOCATION_ENV):
        if name in os.environ:
            pytest.skip(f"{name} is set in this environment")
    yield
    assert not ray.is_initialized(), "train_on_ray left the Ray it started running"
    # The settings of the Ray it started stay with that Ray.
    assert not set(ONE_MACHINE_RAY_ENV) & set(os.environ)


def test_a_ray_started_for_one_job_runs_no_actor_that_the_job_does_not_use(no_ray_running, tmp_path, capfd):
    summary = train_on_ray(TrainConfig(dataset="unused", out=str(tmp_path)), workers=2,
                           worker_fn=ray_processes_beside_me)
    # The workers' stderr reaches the driver in order: the line printed after the report
    # arrives, and the report's own INFO line (its whole record, once per report) does not.
    err = capfd.readouterr().err
    assert "listed its neighbours" in err
    assert "Reporting training result" not in err
    titles = summary["titles"]
    assert titles.count("ray::RayTrainWorker") == 2, titles
    assert "ray::TrainController" in titles, titles
    for unused in ("ray::IDLE", "ray::PreemptionWatcher", "ray::DatasetManager", "ray::PlacementGroupCleaner",
                   "ray::_AutoscalingCoordinator"):
        assert unused not in titles, titles
    # What is left beside the workers and the controller: the report barrier's actor and
    # Ray's agents.
    others = set(titles) - {"ray::RayTrainWorker", "ray::TrainController"}
    assert len(others) <= 3, titles
    assert summary["malloc_env"] == THREAD_ALLOCATION_ENV
