"""The Ray Train launcher on a real local Ray: workers in a gloo group, results back
through Ray Train, a failing worker fails the job with its error, and bad requests are
refused before any worker starts."""

from __future__ import annotations

import sys
import time

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
    ray.init(num_cpus=3, include_dashboard=False, object_store_memory=300 * 1024 * 1024)
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


def test_workers_form_a_gloo_group_and_return_a_summary(local_ray, tmp_path):
    config = TrainConfig(dataset="unused", out=str(tmp_path), seed=7)
    summary = train_on_ray(config, workers=2, worker_fn=sum_of_ranks)
    assert summary["metrics"] == {"sum": 3.0, "backend": "gloo"}
    assert summary["seed"] == 7
    assert len(summary["worker_nodes"]) == 2


def test_a_failing_worker_fails_the_job_with_its_error(local_ray, tmp_path):
    config = TrainConfig(dataset="unused", out=str(tmp_path))
    t0 = time.time()
    with pytest.raises(DistributedTrainingError, match="worker 1 found a broken shard"):
        train_on_ray(config, workers=2, worker_fn=fails_on_rank_one)
    assert time.time() - t0 < 120  # an error, not a hang


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
