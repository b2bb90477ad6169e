"""Run the distributed training loop as Ray Train workers.

``train_on_ray`` starts (or joins, with ``address``) a Ray cluster, checks that it can
give the requested workers before any of them starts, and runs one
``TorchTrainer`` whose workers each call the per-worker loop inside a
``torch.distributed`` group that Ray Train sets up (gloo on CPU, nccl on GPU).

Results come back through Ray Train's own channel: rank 0 reports a checkpoint
directory holding ``summary.json`` (Train v2 keeps metrics only with checkpoints),
and every rank reports the same number of times, since ``ray.train.report`` is a
barrier. A worker that raises fails the job with that worker's error.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import tempfile
from pathlib import Path
from typing import Any, Callable

from gnaq_dist.allocator import worker_allocator_env
from gnaq_dist.config import from_dict, to_dict
from gnaq_dist.errors import ConfigError, DistributedTrainingError, GnaqInputError
from gnaq_dist.train.config import TrainConfig

log = logging.getLogger(__name__)

WorkerFn = Callable[..., dict]  # fn(config, report=callable) -> summary dict


def ray_environment() -> None:
    """Defaults for local runs: no usage stats, no auth token written to ~/.ray."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an address nobody listens on (ray.init would wait a minute or more)."""
    import socket

    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise GnaqInputError(f"--address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise GnaqInputError(f"--address {address}: no Ray cluster reachable there ({exc.strerror or exc})") from exc


# A Ray that this process starts for itself on one machine leaves out what only a cluster
# needs: every Ray Python process wakes 100 times a second (its core worker's signal check,
# not configurable), which slows training workers that fill the machine's cores.
ONE_MACHINE_RAY_ENV = {
    "RAY_prestart_worker_first_driver": "0",  # no idle pool workers started ahead of the actors
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # no other node whose preemption to watch for
}


def connect(address: str | None, workers: int, object_store_mb: int = 1024) -> bool:
    """Start a local Ray on this machine's CPUs (or join ``address``). True if we started it.

    A local Ray declares one logical CPU more than the machine has: Train v2 runs its
    controller as an actor, which is idle most of the time and must not wait for a CPU
    that the workers hold. It starts with ``ONE_MACHINE_RAY_ENV`` (where the environment
    does not set those variables already).
    """
    import ray

    ray_environment()
    if address:
        check_reachable(address)
    if ray.is_initialized():
        return False
    if address:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
        except Exception as exc:  # ConnectionError, TimeoutError, RuntimeError
            raise GnaqInputError(f"--address {address}: cannot connect to a Ray cluster ({exc})") from exc
        return False
    # The raylet that ray.init starts reads them, and its workers inherit them from it;
    # this process's environment is left as it was.
    added = {name: value for name, value in ONE_MACHINE_RAY_ENV.items() if name not in os.environ}
    os.environ.update(added)
    try:
        ray.init(num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False,
                 object_store_memory=object_store_mb * 1024 * 1024, log_to_driver=True)
    finally:
        for name in added:
            del os.environ[name]
    return True


def one_machine_trainer_class() -> type:
    """``TorchTrainer`` without three Train actors that a Ray started for one job does not use.

    The dataset manager serves Ray Data shards (we pass none); the placement-group cleaner
    removes a dead controller's placement group from a cluster that outlives the job (this
    Ray ends with it), and polls the state API once a second, which a Ray without a
    dashboard answers with a warning each time; Ray Data's autoscaling coordinator shares a
    cluster's resources between Train and Data and forwards their requests to an autoscaler
    (this Ray has neither: Train's fixed scaling policy asks it at every poll for nothing).
    Each is a Ray Python process (see ``ONE_MACHINE_RAY_ENV``). This reaches into Ray Train's
    private callbacks and scaling policy (ray is pinned in pyproject.toml;
    tests/test_ray_one_machine.py checks which actors run): where they have moved, the
    plain ``TorchTrainer`` is returned.
    """
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
    except ImportError:
        log.info("Ray Train's internals have moved: the local Ray runs its dataset manager, cleaner and "
                 "autoscaling coordinator")
        return TorchTrainer

    class NoAutoscalerScalingPolicy(FixedScalingPolicy):
        """Train's fixed number of workers, without resource requests to an autoscaler."""

        def after_controller_start(self, train_run_context) -> None:  # noqa: ANN001 - Ray Train's signature
            pass  # where the fixed policy makes the coordinator and sends its first request

        def _maybe_send_resource_request(self) -> None:
            pass  # called at every poll; with no coordinator, cancelling at shutdown does nothing

    class OneMachineTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):  # noqa: ANN202 - Ray Train's signature
            unused = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, unused)]

        def _initialize_and_run_controller(self, **controller_init_kwargs):  # noqa: ANN202 - Ray Train's
            if type(controller_init_kwargs.get("scaling_policy")) is FixedScalingPolicy and not self.datasets:
                controller_init_kwargs["scaling_policy"] = NoAutoscalerScalingPolicy(self.scaling_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return OneMachineTorchTrainer


def check_capacity(workers: int, cpus_per_worker: float = 1.0) -> None:
    """Refuse, before any worker starts, a job the cluster cannot place."""
    import ray

    if workers < 1:
        raise GnaqInputError(f"--workers {workers}: need at least 1 worker")
    total = ray.cluster_resources().get("CPU", 0.0)
    needed = workers * cpus_per_worker + 1  # + the Train controller
    if needed > total:
        raise GnaqInputError(
            f"--workers {workers}: the Ray cluster has {total:g} CPUs, {needed:g} are needed "
            f"({workers} workers x {cpus_per_worker:g} CPU + 1 for the Train controller)"
        )


def _quiet_report_lines() -> None:
    """Drop the INFO line Ray Train logs in a worker for every report, with its whole record.

    ``LoggingConfig(log_level="WARNING")`` does not reach it: Ray Train 2.60 names that
    logger by its file's path, not under ``ray.train``. Our records come back in the
    summary and metrics.jsonl.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _worker_entry(payload: dict[str, Any]) -> None:
    """Runs in every Ray Train worker (a fresh process: imports happen here)."""
    import ray.train
    import torch.distributed as dist

    from gnaq_dist.distributed.trainer import train_worker

    from gnaq_dist.checkpoint import POINTER

    config = from_dict(TrainConfig, payload["config"])
    custom: WorkerFn | None = payload.get("worker_fn")
    rank = dist.get_rank()
    _quiet_report_lines()

    def report(record: dict) -> None:
        if record.get("event") not in (None, "eval", "checkpoint"):
            return  # epoch and wire records travel in the summary's history, not one report each
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float, str, bool))}
        if record.get("event") == "checkpoint" and record.get("uri"):
            # Ray Train keeps a pointer to our sharded checkpoint (its own copy would double the
            # bytes); get_checkpoint() hands it back to the workers of a restarted run.
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    Path(tmp, POINTER).write_text(json.dumps({"uri": record["uri"]}))
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint)
            return
        ray.train.report(metrics)

    def resume_hint() -> str | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as path:
            pointer = Path(path, POINTER)
            return json.loads(pointer.read_text())["uri"] if pointer.exists() else None

    if custom is not None:
        summary = dict(custom(config, report=report))
    else:
        summary = dict(train_worker(config, report=report, resume_hint=resume_hint,
                                    final_checkpoint=bool(payload.get("final_checkpoint"))))
    # Where each worker ran and its peak resident memory (MiB), gathered for rank 0's summary.
    # (and its shard: the rows and non-zeros it propagated, which its memory follows).
    mine = (ray.get_runtime_context().get_node_id(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            summary.get("shard"))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    summary["worker_nodes"] = [node for node, _, _ in everyone]
    summary["worker_peak_rss_mb"] = [round(rss, 1) for _, rss, _ in everyone]
    summary["worker_shards"] = [shard for _, _, shard in everyone]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            Path(tmp, "summary.json").write_text(json.dumps(summary, default=str))
            if summary.get("checkpoint"):
                Path(tmp, POINTER).write_text(json.dumps({"uri": summary["checkpoint"]}))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"final": 1}, checkpoint=checkpoint)


def _absolute_paths(config: TrainConfig) -> None:
    """Local paths as absolute ones: Ray workers do not run in the driver's directory."""
    for obj, key in ((config, "dataset"), (config, "out"), (config.checkpoint, "dir")):
        value = getattr(obj, key)
        if value and "://" not in value:
            setattr(obj, key, str(Path(value).resolve()))
    if config.checkpoint.resume not in ("auto", "never") and "://" not in config.checkpoint.resume:
        config.checkpoint.resume = str(Path(config.checkpoint.resume).resolve())


def ray_storage(out: str, storage_options: dict[str, Any] | None = None) -> tuple[str, Any]:
    """Ray Train's run storage under the run's ``out``: ``(storage_path, storage_filesystem)``.

    A local ``out`` (a path or ``file://``): the directory ``<out>/ray``, no filesystem. Any
    other store: ``<out>/ray`` inside it, through a pyarrow view of the same fsspec filesystem
    the run writes with (so ``storage_options``, e.g. an S3 endpoint and keys, apply to Ray's
    files too). ``memory://`` is this process's memory, which Ray's workers cannot reach: refused.
    """
    from gnaq_dist.storage import arrow_fs, is_local, join, resolve

    fs, path = resolve(out, storage_options)
    if is_local(fs):
        return str(Path(path).resolve() / "ray"), None
    if "memory" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        raise GnaqInputError(f"--out {out}: memory:// is this process's memory, which Ray workers cannot "
                             f"write to; use a local path or a shared store (s3://, gs://, ...)")
    return join(path, "ray"), arrow_fs(fs)


def train_on_ray(
    config: TrainConfig,
    workers: int | None = None,
    address: str | None = None,
    storage_path: str | None = None,
    worker_fn: WorkerFn | None = None,
    use_gpu: bool = False,
    placement_strategy: str | None = None,
    final_checkpoint: bool = False,
) -> dict[str, Any]:
    """Train ``config`` with Ray Train workers; returns rank 0's summary.

    ``workers`` overrides ``config.distributed.workers``. ``placement_strategy`` is the
    strategy of the workers' placement group (``config.distributed.placement`` when None:
    ``SPREAD``; ``STRICT_SPREAD``: every worker on its own node; ``STRICT_PACK``).
    ``storage_path`` is Ray Train's run storage (default: ``<out>/ray``, in whatever store
    ``out`` names: :func:`ray_storage`). ``final_checkpoint``: a checkpoint at the end
    even with ``checkpoint.every_epochs`` 0 (what ``gnaq train`` asks for).
    """
    if workers is not None:
        config.distributed.workers = workers
    config.validate()
    if config.schedule.early_stopping.patience:
        raise ConfigError("schedule.early_stopping: the one-process trainer only (gnaq train without --workers)")
    _absolute_paths(config)
    workers = config.distributed.workers
    storage, storage_fs = (storage_path, None) if storage_path else ray_storage(config.out, config.storage_options)
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = connect(address, workers)
    try:
        check_capacity(workers)
        trainer_class = one_machine_trainer_class() if started else TorchTrainer
        trainer = trainer_class(
            _worker_entry,
            train_loop_config={"config": to_dict(config), "worker_fn": worker_fn,
                               "final_checkpoint": final_checkpoint},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": 1},
                                         placement_strategy=placement_strategy or config.distributed.placement),
            run_config=RunConfig(storage_path=storage, storage_filesystem=storage_fs, name="train",
                                 failure_config=FailureConfig(max_failures=config.checkpoint.max_failures),
                                 # Ray Train's own INFO logs off (our records come back in the
                                 # summary); its per-report line escapes this: _quiet_report_lines.
                                 logging_config=LoggingConfig(log_level="WARNING"),
                                 # glibc reads these at the worker's start: its loop runs in a
                                 # thread, whose freed blocks are otherwise unmapped (allocator.py).
                                 worker_runtime_env={"env_vars": worker_allocator_env()}),
        )
        try:
            result = trainer.fit()
        except Exception as exc:  # ray.train.WorkerGroupError / TrainingFailedError
            raise DistributedTrainingError(str(exc)) from exc
        if result.error is not None:
            raise DistributedTrainingError(str(result.error))
        if result.checkpoint is None:
            raise DistributedTrainingError("the workers finished without reporting a summary")
        with result.checkpoint.as_directory() as path:
            return json.loads(Path(path, "summary.json").read_text())
    finally:
        if started:
            ray.shutdown()


def write_run_files(summary: dict[str, Any], out: str | Path, storage_options: dict[str, Any] | None = None) -> None:
    """``summary.json`` and the workers' log records as ``metrics.jsonl`` (as a local run writes
    them) at ``out``, a local path or any fsspec URI; each file all or nothing."""
    from gnaq_dist.storage import write_text

    base = str(out).rstrip("/")
    write_text(f"{base}/metrics.jsonl",
               "".join(json.dumps(record, default=str) + "\n" for record in summary.get("history", [])),
               storage_options)
    write_text(f"{base}/summary.json", json.dumps(summary, indent=2, default=str), storage_options)

