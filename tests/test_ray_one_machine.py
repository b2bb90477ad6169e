"""The Ray that ``train_on_ray`` starts for itself on one machine: which Ray processes run
beside the training workers. Each Ray Python process wakes 100 times a second, and on a
machine the workers fill each slows their step (docs/notes/2026-12-07-public-ray.md),
so the ones that settings of the public API can leave out must not start: idle pool workers and
the preemption watcher. Three more that a one-machine job does not use (Train's dataset manager
and placement-group cleaner, Ray Data's autoscaling coordinator) can only be left out by
subclassing Ray Train's private parts, which gnaq does not do: the test pins the full list, so
that a Ray release that adds a process is noticed. Also: Ray Train's INFO line per report stays
out of the driver's output, and the workers start with the allocator settings of a process that
allocates from a thread. Linux only (reads /proc)."""

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


def alive_actor_classes() -> list[str]:
    """Run in a worker: the class names of the live actors its raylet started, by the title Ray
    gives an actor's process (``ray::ClassName`` or ``ray::ClassName.method``)."""
    import psutil

    names = []
    for proc in psutil.Process(os.getppid()).children():
        try:
            title = (proc.cmdline() or [""])[0]
        except psutil.Error:
            continue
        if title.startswith("ray::") and not title.startswith("ray::IDLE") and "Agent" not in title:
            names.append(title[len("ray::"):].split()[0].split(".")[0])
    return sorted(names)


def ray_processes_beside_me(config: TrainConfig, report) -> dict:
    """Runs in each worker: the live actors, and how many processes its raylet started
    (actors' workers, idle pool workers and Ray's agents)."""
    import torch.distributed as dist

    dist.barrier()  # both workers and every actor of the job are up
    raylet = os.getppid()
    children = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == raylet and fields[0] != "Z":
            children += 1
    actors = alive_actor_classes()
    report({"event": "eval", "epoch": 1})  # Ray Train logs an INFO line per report unless quieted
    print(f"worker {dist.get_rank()} listed its neighbours", file=sys.stderr, flush=True)
    dist.barrier()
    # The environment the process started with, which is what glibc's malloc read.
    started_with = dict(entry.decode().split("=", 1) for entry in
                        Path("/proc/self/environ").read_bytes().split(b"\0") if b"=" in entry)
    return {"actors": actors, "raylet_children": children, "niceness": os.nice(0),
            "malloc_env": {k: started_with.get(k) for k in THREAD_ALLOCATION_ENV}}


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


@pytest.mark.slow
def test_a_ray_started_for_one_job_runs_only_what_a_public_trainer_needs(no_ray_running, tmp_path, capfd):
    summary = train_on_ray(TrainConfig(dataset="unused", out=str(tmp_path)), workers=2,
                           worker_fn=ray_processes_beside_me)
    # The workers' stderr reaches the driver in order: the line printed after the report
    # arrives, and the report's own INFO line (its whole record, once per report) does not.
    err = capfd.readouterr().err
    assert "listed its neighbours" in err
    assert "Reporting training result" not in err
    actors = summary["actors"]
    assert actors.count("RayTrainWorker") == 2, actors
    assert not any("PreemptionWatcher" in name for name in actors), actors
    # The workers, Train's controller and report barrier, and the three a public TorchTrainer
    # always starts: nothing else.
    assert sorted(set(actors)) == ["DatasetManager", "PlacementGroupCleaner", "RayTrainWorker",
                                   "SynchronizationActor", "TrainController", "_AutoscalingCoordinatorActor"], actors
    # Every process the raylet started is a live actor's, or one of Ray's two agents (dashboard
    # agent, runtime-env agent): no idle pool worker started ahead of the actors.
    assert len(actors) <= summary["raylet_children"] <= len(actors) + 2, summary
    assert summary["malloc_env"] == THREAD_ALLOCATION_ENV
    assert summary["niceness"] == os.nice(0)  # the workers run at the driver's priority, not Ray's 15
