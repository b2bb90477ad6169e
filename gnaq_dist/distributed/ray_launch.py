"""Run the distributed training loop as Ray Train workers, through the public ``TorchTrainer``.

:func:`fit_on_ray` starts (or joins, with ``address``) a Ray cluster, checks that it can
give the requested workers before any of them starts, and runs one ``TorchTrainer`` whose
workers each call the per-worker loop inside a ``torch.distributed`` group that Ray Train
sets up (gloo on CPU, nccl on GPU), with the user's ``ScalingConfig`` and ``RunConfig`` or
ones made from the config; it returns Ray's ``Result``. :func:`train_on_ray` returns the
run's summary instead (what ``gnaq train --workers`` prints).

Every epoch the workers report its metrics and checkpoint (:mod:`.ray_report`); rank 0 writes
``metrics.jsonl`` as it goes and ``summary.json`` at the end, at the run's ``out``. A worker
that raises fails the job with that worker's error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from gnaq_dist.allocator import worker_allocator_env
from gnaq_dist.config import from_dict, to_dict
from gnaq_dist.errors import DistributedTrainingError, GnaqInputError
from gnaq_dist.train.config import TrainConfig

log = logging.getLogger(__name__)

WorkerFn = Callable[..., dict]  # fn(config, report=callable) -> summary dict


def ray_environment() -> None:
    """Defaults for local runs: no usage stats, no auth token written to ~/.ray; and where the
    driver's output is not a terminal (a log file), the workers' lines without colour codes."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast (one line, exit 2) on an address where no Ray answers: ray.init would wait minutes."""
    from gnaq_dist.distributed.address_probe import probe_ray

    probe_ray(address, timeout)


# A Ray that this process starts for itself on one machine leaves out what only a cluster
# needs: every Ray Python process wakes 100 times a second (its core worker's signal check,
# not configurable), which slows training workers that fill the machine's cores.
ONE_MACHINE_RAY_ENV = {
    "RAY_prestart_worker_first_driver": "0",  # no idle pool workers started ahead of the actors
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # no other node whose preemption to watch for
    # The workers at this process's priority: Ray's default (15) hands their CPU to anything
    # else on the machine, an in-process run it is compared with included.
    "RAY_worker_niceness": "0",
}


#: Where a Ray process that is not given an address looks for "the" cluster: Train v2's
#: placement-group cleaner (a detached actor) asks the state API about the Train controller
#: there, and removes the run's placement group when that cluster does not know the
#: controller. Ray's record of the machine's current cluster (``<RAY_TMPDIR or /tmp>/ray/
#: ray_current_cluster``, written by ``ray start``) may name another live cluster, or a dead one.
CLUSTER_ADDRESS_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
#: The private temp roots of :func:`connect` are ``<TMPDIR>/.gnaq-ray.tmp-*``.
RECORD_ROOT_NAME = "gnaq-ray"


def own_cluster_record(root: str, gcs_address: str) -> None:
    """Ray's cluster record under the temp root ``root`` (``root/ray/ray_current_cluster``),
    naming ``gcs_address``: what the processes of a Ray started with ``RAY_TMPDIR=root`` find."""
    os.makedirs(os.path.join(root, "ray"), exist_ok=True)
    with open(os.path.join(root, "ray", "ray_current_cluster"), "w") as handle:
        handle.write(gcs_address)


def _ray_temp_dir() -> str:
    """Ray's default temp root as Ray documents it: ``$RAY_TMPDIR`` (else ``$TMPDIR`` on Linux,
    else /tmp) + ``/ray``; read here, not from Ray's private modules."""
    root = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    if not root:
        root = "/tmp" if sys.platform.startswith(("linux", "darwin")) else tempfile.gettempdir()
    return os.path.join(root, "ray")


def connect(address: str | None, workers: int, object_store_mb: int = 1024, record_root: str | None = None) -> bool:
    """Start a local Ray on this machine's CPUs (or join ``address``). True if we started it.

    A local Ray declares one logical CPU more than the machine has: Train v2 runs its
    controller as an actor, which is idle most of the time and must not wait for a CPU
    that the workers hold. It starts with ``ONE_MACHINE_RAY_ENV`` (where the environment
    does not set those variables already). With ``record_root`` (an empty private directory),
    its processes resolve "the current cluster" to this Ray, whatever the machine's record or
    the environment names: they get ``RAY_TMPDIR=record_root`` and no ``RAY_ADDRESS`` /
    ``RAY_API_SERVER_ADDRESS``, and ``record_root/ray/ray_current_cluster`` names this Ray
    (:data:`CLUSTER_ADDRESS_ENV`). Its session and logs stay in Ray's usual temp dir.
    """
    import ray

    ray_environment()
    if address:
        _check_reachable(address)
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
    hidden: dict[str, str] = {}
    extra: dict[str, Any] = {}
    if record_root is not None:
        extra["_temp_dir"] = _ray_temp_dir()  # sessions and logs where they always go
        hidden = {name: os.environ.pop(name) for name in (*CLUSTER_ADDRESS_ENV, "RAY_TMPDIR") if name in os.environ}
        added["RAY_TMPDIR"] = record_root
    os.environ.update(added)
    try:
        # address="local": a new Ray even where RAY_ADDRESS names another (--address is for that);
        # WARNING: its "Started a local Ray instance" line stays out of the run's output.
        ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False,
                 object_store_memory=object_store_mb * 1024 * 1024, log_to_driver=True,
                 logging_level=logging.WARNING, **extra)
    finally:
        for name in added:
            del os.environ[name]
        os.environ.update(hidden)
    if record_root is not None:
        # before any actor starts: the cleaner reads it on its first check
        own_cluster_record(record_root, ray.get_runtime_context().gcs_address)
    return True


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


def _worker_entry(payload: dict[str, Any]) -> None:
    """Runs in every Ray Train worker (a fresh process: imports happen here)."""
    import ray
    import torch.distributed as dist

    from gnaq_dist.distributed.ray_report import EpochReporter, quiet_report_lines, resume_uri, write_summary
    from gnaq_dist.distributed.trainer import train_worker

    config = from_dict(TrainConfig, payload["config"])
    custom: WorkerFn | None = payload.get("worker_fn")
    rank = dist.get_rank()
    quiet_report_lines()
    # One line an epoch from the reporter instead of the trainer's progress bars, whose
    # redraws reach the driver's log as lines of escape codes.
    progress, config.progress = config.progress, False
    reporter = EpochReporter(rank, config.out, config.storage_options, progress)
    if custom is not None:
        summary = dict(custom(config, report=reporter))
    else:
        summary = dict(train_worker(config, report=reporter, resume_hint=lambda: resume_uri(config.checkpoint_root),
                                    final_checkpoint=bool(payload.get("final_checkpoint")), prune_checkpoints=False))
    reporter.flush()  # what came after the last epoch's mark (the closing evaluation and checkpoint)
    # Where each worker ran and its peak resident memory (MiB), gathered for rank 0's summary
    # (and its shard: the rows and non-zeros it propagated, which its memory follows).
    mine = (ray.get_runtime_context().get_node_id(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            summary.get("shard"))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    summary["worker_nodes"] = [node for node, _, _ in everyone]
    summary["worker_peak_rss_mb"] = [round(rss, 1) for _, rss, _ in everyone]
    summary["worker_shards"] = [shard for _, _, shard in everyone]
    if rank == 0:
        write_summary(summary, config.out, config.storage_options)
    dist.barrier()  # the summary is written before any worker returns (and fit() with them)


def _absolute_paths(config: TrainConfig) -> None:
    """Local paths as absolute ones: Ray workers do not run in the driver's directory."""
    for obj, key in ((config, "dataset"), (config, "out"), (config.checkpoint, "dir")):
        value = getattr(obj, key)
        if value and "://" not in value:
            setattr(obj, key, str(Path(value).resolve()))
    if config.checkpoint.resume not in ("auto", "never") and "://" not in config.checkpoint.resume:
        config.checkpoint.resume = str(Path(config.checkpoint.resume).resolve())


def ray_storage(location: str, storage_options: dict[str, Any] | None = None) -> tuple[str, Any]:
    """``location`` (a local path or fsspec URI) as Ray Train's ``(storage_path, storage_filesystem)``.

    Local (a path or ``file://``): the absolute path, no filesystem (Ray's own local one). Any
    other store: the path inside it, with a pyarrow view of the same fsspec filesystem the run
    writes with (so ``storage_options``, e.g. an S3 endpoint and keys, apply to Ray's files too,
    and a checkpoint the ranks wrote is on Ray's storage filesystem). ``memory://`` is this
    process's memory, which Ray's workers cannot reach: refused.
    """
    from gnaq_dist.storage import arrow_fs, is_local, resolve

    fs, path = resolve(location, storage_options)
    if is_local(fs):
        return str(Path(path).resolve()), None
    if "memory" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        raise GnaqInputError(f"--out {location}: memory:// is this process's memory, which Ray workers cannot "
                             f"write to; use a local path or a shared store (s3://, gs://, ...)")
    return path, arrow_fs(fs)


def _scaling_config_for(config: TrainConfig, scaling_config: Any = None) -> Any:
    """The user's ``ScalingConfig``, or one from the config: ``distributed.workers`` workers of one
    CPU each, placed by ``distributed.placement``. ``config.distributed.workers`` follows it."""
    from ray.train import ScalingConfig

    if scaling_config is None:
        scaling_config = ScalingConfig(num_workers=config.distributed.workers, resources_per_worker={"CPU": 1},
                                       placement_strategy=config.distributed.placement)
    if not isinstance(scaling_config.num_workers, int):
        raise GnaqInputError(f"ScalingConfig(num_workers={scaling_config.num_workers!r}): gnaq trains on a fixed "
                             f"number of workers (an int)")
    config.distributed.workers = scaling_config.num_workers
    return scaling_config


def run_config_for(config: TrainConfig, run_config: Any = None) -> Any:
    """The Ray run's ``RunConfig``: the user's, completed, or one from the config.

    The run's directory (``storage_path/name``) is where the ranks write their checkpoints
    (``config.checkpoint.dir`` is set to it), so that Ray Train registers each where it lies and
    its ``CheckpointConfig`` alone decides which to keep. Without a user's RunConfig: storage
    ``<out>``, name ``checkpoints`` (the checkpoints at ``<out>/checkpoints``, as a one-process run
    writes them; ``checkpoint.dir`` moves them), ``CheckpointConfig(num_to_keep=checkpoint.keep_last)``,
    ``FailureConfig(max_failures=checkpoint.max_failures)``. A user's RunConfig keeps its name,
    callbacks, failure and checkpoint configs; storage left at Ray's default becomes ``<out>``, a
    default ``CheckpointConfig()`` becomes ``num_to_keep=checkpoint.keep_last``, and the workers'
    environment gets the allocator settings (``allocator.py``) where it does not set them.
    """
    import dataclasses
    import posixpath

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.constants import DEFAULT_STORAGE_PATH

    from gnaq_dist.storage import absolute_if_local, join

    so = config.storage_options
    keep = CheckpointConfig(num_to_keep=config.checkpoint.keep_last)
    if run_config is None:
        parent, name = posixpath.split(config.checkpoint_root.rstrip("/"))
        storage_path, storage_fs = ray_storage(parent or ".", so)
        return RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                         failure_config=FailureConfig(max_failures=config.checkpoint.max_failures),
                         checkpoint_config=keep,
                         # Ray Train's own INFO logs off (each epoch's report comes back in
                         # metrics.jsonl and Result.metrics).
                         logging_config=LoggingConfig(log_level="WARNING"),
                         # glibc reads these at the worker's start: its loop runs in a thread,
                         # whose freed blocks are otherwise unmapped (allocator.py).
                         worker_runtime_env={"env_vars": worker_allocator_env()})
    if run_config.storage_filesystem is not None:
        raise GnaqInputError("RunConfig.storage_filesystem: gnaq writes its checkpoints through fsspec; give "
                             "RunConfig.storage_path as a URI (and storage_options in the config) instead")
    location = config.out if run_config.storage_path == DEFAULT_STORAGE_PATH else run_config.storage_path
    storage_path, storage_fs = ray_storage(location, so)
    config.checkpoint.dir = join(absolute_if_local(location).rstrip("/"), run_config.name)
    runtime_env = dict(run_config.worker_runtime_env or {})
    runtime_env["env_vars"] = {**worker_allocator_env(), **dict(runtime_env.get("env_vars") or {})}
    changes: dict[str, Any] = {"storage_path": storage_path, "storage_filesystem": storage_fs,
                               "worker_runtime_env": runtime_env}
    if run_config.checkpoint_config == CheckpointConfig():
        changes["checkpoint_config"] = keep
    return dataclasses.replace(run_config, **changes)


#: Worker log lines that the driver does not print: a Ray without the dashboard cannot answer
#: the state API, and Train's placement-group cleaner says so (a warning every second, or its
#: monitor thread ends with a traceback once it finds no API server address in our GCS).
#: Nothing it prints is about the run.
DROPPED_LINES = ("Failed to query Ray Train Controller actor state", "(PlacementGroupCleaner pid=")


class _LineFilter:
    """A text stream that passes whole lines on to ``stream``, except those holding one of ``needles``."""

    def __init__(self, stream: Any, needles: tuple[str, ...]) -> None:
        import threading

        self.stream, self.needles = stream, needles
        self.pending = ""
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            *lines, self.pending = (self.pending + text).split("\n")
            kept = [line + "\n" for line in lines if not any(n in line for n in self.needles)]
            if kept:
                self.stream.write("".join(kept))
        return len(text)

    def flush(self) -> None:
        with self.lock:
            if self.pending and not any(n in self.pending for n in self.needles):
                self.stream.write(self.pending)
            self.pending = ""
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def _dropping_lines(needles: tuple[str, ...] = DROPPED_LINES):
    """While it lasts, this process's stdout and stderr leave out lines holding one of ``needles``."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _LineFilter(sys.stdout, needles), _LineFilter(sys.stderr, needles)
    try:
        yield
    finally:
        for filtered in (sys.stdout, sys.stderr):
            if isinstance(filtered, _LineFilter):
                filtered.flush()
        sys.stdout, sys.stderr = saved


def fit_on_ray(config: TrainConfig, scaling_config: Any = None, run_config: Any = None, *,
               address: str | None = None, worker_fn: WorkerFn | None = None,
               final_checkpoint: bool = False) -> Any:
    """Train ``config`` with a public ``TorchTrainer``; returns Ray Train's ``Result``.

    ``scaling_config`` / ``run_config``: the user's (see :func:`_scaling_config_for`,
    :func:`run_config_for`), or made from the config. Connects to ``address`` (or an already
    initialised Ray), else starts a local Ray for the job and shuts it down after. Every epoch the
    workers report its metrics and checkpoint (:mod:`.ray_report`): ``Result.metrics`` is the last
    report's, ``Result.checkpoint`` the last checkpoint (a gnaq sharded checkpoint directory).
    ``final_checkpoint``: a checkpoint at the end even with ``checkpoint.every_epochs`` 0.
    """
    config.validate()
    config.check_distributed()
    _absolute_paths(config)
    scaling = _scaling_config_for(config, scaling_config)
    run = run_config_for(config, run_config)
    from gnaq_dist.train.resume_check import check_resume

    check_resume(config)  # what the workers would refuse to resume from, refused before Ray starts
    import ray
    from ray.train.torch import TorchConfig, TorchTrainer

    from gnaq_dist import interrupts
    from gnaq_dist.distributed.ray_reaper import start_reaper

    workers = config.distributed.workers
    starts_ray = not address and not ray.is_initialized()
    record_root, held = None, None
    if starts_ray:
        from gnaq_dist import staging

        # its processes' view of "the current cluster": this Ray (connect). Held (flock) while
        # this process lives; roots of dead drivers whose reaper died too are removed here.
        staging.remove_stale(tempfile.gettempdir(), RECORD_ROOT_NAME, kinds=("tmp",))
        record_root = tempfile.mkdtemp(prefix=f".{RECORD_ROOT_NAME}.tmp-")
        held = staging.hold(record_root)
    # a Ray started here goes with this process, even a SIGKILLed one (ray_reaper.py)
    reaper = start_reaper(remove=(record_root,)) if record_root is not None else None

    def release() -> None:
        if reaper is not None:
            reaper.close()  # and whatever ray.shutdown left (its agents)
        if record_root is not None:
            shutil.rmtree(record_root, ignore_errors=True)
            staging.release(held)

    try:
        started = connect(address, workers, record_root=record_root)
    except BaseException:
        release()
        raise
    interrupts.reinstall()  # ray.init replaced our SIGTERM handler
    try:
        cpus = float((scaling.resources_per_worker or {}).get("CPU", 1.0))
        check_capacity(workers, cpus)
        trainer = TorchTrainer(
            _worker_entry,
            train_loop_config={"config": to_dict(config), "worker_fn": worker_fn,
                               "final_checkpoint": final_checkpoint},
            torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
            scaling_config=scaling,
            run_config=run,
        )
        try:
            with _dropping_lines():
                result = interrupts.call(trainer.fit)  # SIGINT / SIGTERM: Interrupted here, Ray shut down below
        except Exception as exc:  # ray.train.WorkerGroupError / TrainingFailedError
            raise DistributedTrainingError(str(exc)) from exc
        if result.error is not None:
            raise DistributedTrainingError(str(result.error))
        return result
    finally:
        if started:
            ray.shutdown()
        release()


def read_summary(out: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``summary.json`` rank 0 wrote at ``out`` at the end of a run."""
    from gnaq_dist.storage import read_json, resolve

    fs, path = resolve(f"{out.rstrip('/')}/summary.json", storage_options)
    if not fs.exists(path):
        raise DistributedTrainingError(f"the workers finished without writing {out}/summary.json")
    return read_json(fs, path)


def train_on_ray(
    config: TrainConfig,
    workers: int | None = None,
    address: str | None = None,
    worker_fn: WorkerFn | None = None,
    use_gpu: bool = False,
    placement_strategy: str | None = None,
    final_checkpoint: bool = False,
) -> dict[str, Any]:
    """Train ``config`` with Ray Train workers (:func:`fit_on_ray`); returns rank 0's summary.

    ``workers`` overrides ``config.distributed.workers``. ``placement_strategy`` is the
    strategy of the workers' placement group (``config.distributed.placement`` when None:
    ``SPREAD``; ``STRICT_SPREAD``: every worker on its own node; ``STRICT_PACK``).
    ``final_checkpoint``: a checkpoint at the end even with ``checkpoint.every_epochs`` 0
    (what ``gnaq train`` asks for).
    """
    from ray.train import ScalingConfig

    if workers is not None:
        config.distributed.workers = workers
    if config.distributed.workers < 1:
        raise GnaqInputError(f"--workers {config.distributed.workers}: need at least 1 worker")
    scaling = ScalingConfig(num_workers=config.distributed.workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1},
                            placement_strategy=placement_strategy or config.distributed.placement)
    fit_on_ray(config, scaling, address=address, worker_fn=worker_fn, final_checkpoint=final_checkpoint)
    return read_summary(config.out, config.storage_options)

def write_run_files(summary: dict[str, Any], out: str | Path, storage_options: dict[str, Any] | None = None) -> None:
    """``summary.json`` and the workers' log records as ``metrics.jsonl`` (as a local run writes
    them) at ``out``, a local path or any fsspec URI; each file all or nothing."""
    from gnaq_dist.storage import write_text

    base = str(out).rstrip("/")
    write_text(f"{base}/metrics.jsonl",
               "".join(json.dumps(record, default=str) + "\n" for record in summary.get("history", [])),
               storage_options)
    write_text(f"{base}/summary.json", json.dumps(summary, indent=2, default=str), storage_options)

