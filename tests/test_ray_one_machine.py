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


def alive_actor_classes() -> list[str]:
    """The class names of the Ray cluster's live actors, from its control store (GCS).

    Read from Ray's own record of the actors, not from process titles, which Ray may word
    differently from one release to the next."""
    from ray._private import state

    actors = state.actors(actor_state_name="ALIVE").values()
    return sorted(a["ActorClassName"].rsplit(".", 1)[-1] for a in actors)


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
    return {"actors": actors, "raylet_children": children,
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
def test_a_ray_started_for_one_job_runs_no_actor_that_the_job_does_not_use(no_ray_running, tmp_path, capfd):
    summary = train_on_ray(TrainConfig(dataset="unused", out=str(tmp_path)), workers=2,
                           worker_fn=ray_processes_beside_me)
    # The workers' stderr reaches the driver in order: the line printed after the report
    # arrives, and the report's own INFO line (its whole record, once per report) does not.
    err = capfd.readouterr().err
    assert "listed its neighbours" in err
    assert "Reporting training result" not in err
    actors = summary["actors"]
    assert actors.count("RayTrainWorker") == 2, actors
    assert "TrainController" in actors, actors
    for unused in ("PreemptionWatcher", "DatasetManager", "PlacementGroupCleaner", "AutoscalingCoordinator"):
        assert not any(unused in name for name in actors), actors
    # Beside the workers and the controller: the report barrier's actor (and Train's state
    # actor where it runs), at most two in all.
    assert len(actors) <= 5, actors
    # Every process the raylet started is a live actor's, or one of Ray's two agents (dashboard
    # agent, runtime-env agent): no idle pool worker started ahead of the actors.
    assert len(actors) <= summary["raylet_children"] <= len(actors) + 2, summary
    assert summary["malloc_env"] == THREAD_ALLOCATION_ENV
