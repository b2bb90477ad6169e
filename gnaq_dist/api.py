"""The public Python API: one call a stage, as the ``gnaq`` commands run them.

``ingest`` (logs -> dataset), ``load_dataset``, ``train`` (in this process, or on Ray Train with
the user's ``ScalingConfig`` and ``RunConfig``), ``evaluate``, ``export`` (checkpoint -> bundle)
and ``Bundle`` (``Bundle.load(path).recommend(users)``). Each is importable from ``gnaq_dist``;
docs/api.md has a runnable example of each. A config may be its dataclass, a dict of the same
keys, or a YAML file's path.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gnaq_dist.errors import ConfigError, GnaqInputError

if TYPE_CHECKING:
    from gnaq_dist.ingest.config import IngestConfig
    from gnaq_dist.interactions import InteractionData
    from gnaq_dist.train.config import TrainConfig


def _as_config(cls: type, config: Any, what: str) -> Any:
    """``config`` as a ``cls``: an instance (copied: a run fills in paths), a dict of the same
    keys, or a YAML file's path."""
    from gnaq_dist.config import from_dict, load_config

    if isinstance(config, cls):
        return copy.deepcopy(config)
    if isinstance(config, dict):
        return from_dict(cls, config, what)
    if isinstance(config, (str, os.PathLike)):
        return load_config(cls, [config])
    raise ConfigError(f"{what}: expected a {cls.__name__}, a dict or a YAML path, got {type(config).__name__}")


def ingest(source: str, out: str, config: IngestConfig | dict | str | os.PathLike | None = None, *,
           overwrite: bool = False, append: bool = False) -> dict[str, Any]:
    """Ingest the logs at ``source`` (any fsspec URI) into the dataset directory ``out``; returns
    the dataset's manifest (``gnaq ingest``). ``config``: an ``IngestConfig`` (columns, cleaning,
    split, storage options), a dict of its keys or a YAML path; None: the defaults."""
    from gnaq_dist.ingest import IngestConfig
    from gnaq_dist.ingest.pipeline import ingest as run_ingest

    cfg = IngestConfig() if config is None else _as_config(IngestConfig, config, "ingest config")
    cfg.validate()
    return run_ingest(source, out, cfg, overwrite=overwrite, append=append)


def load_dataset(uri: str, storage_options: dict[str, Any] | None = None, verify: bool = True) -> InteractionData:
    """An ingested dataset read back (verified against its manifest): users, items and the splits."""
    from gnaq_dist.dataset import load_dataset as read

    return read(uri, storage_options=storage_options, verify=verify)


def _checked(config: Any) -> TrainConfig:
    """The run's TrainConfig, refused before any data is read or Ray starts if it cannot run:
    no dataset, an output it cannot write, a dataset without the split or rows it needs."""
    from gnaq_dist.dataset import read_manifest
    from gnaq_dist.storage import check_writable
    from gnaq_dist.train.config import TrainConfig

    cfg = _as_config(TrainConfig, config, "train config")
    cfg.validate()
    if not cfg.dataset:
        raise GnaqInputError("no dataset: pass --dataset URI or set dataset: in a config file")
    check_writable(cfg.out, cfg.storage_options, "--out")
    if cfg.checkpoint.dir:
        check_writable(cfg.checkpoint.dir, cfg.storage_options, "checkpoint.dir")
    cfg.check_dataset(read_manifest(cfg.dataset, cfg.storage_options))
    return cfg


def train(config: TrainConfig | dict | str | os.PathLike, *, scaling_config: Any = None, run_config: Any = None,
          address: str | None = None) -> Any:
    """Train ``config``; the run's ``metrics.jsonl``, ``summary.json`` and checkpoints go to its ``out``.

    Without ``scaling_config`` (and ``address``): in this process; returns a
    :class:`~gnaq_dist.train.local.TrainResult` (``.metrics``, ``.checkpoint`` URI, ...). With a
    ``ray.train.ScalingConfig`` (workers, CPUs/GPUs per worker, placement strategy): on Ray
    Train, joining ``address`` or an initialised Ray, else starting a local one; ``run_config``
    is the user's ``ray.train.RunConfig`` (name, storage, callbacks, FailureConfig,
    CheckpointConfig; :func:`~gnaq_dist.distributed.ray_launch.run_config_for` says how it is
    completed). Returns Ray's ``Result``: ``.metrics`` is the last epoch's report (``loss``,
    ``recall@20``, ``ndcg@20``, ``positives_per_s``, wire bytes), ``.checkpoint`` the last
    checkpoint (pass it to :func:`evaluate` or :func:`export`). Either way a checkpoint is
    written at the end.
    """
    cfg = _checked(config)
    out = cfg.out.rstrip("/") or cfg.out
    if scaling_config is None and run_config is None and address is None:
        from gnaq_dist.config import to_dict
        from gnaq_dist.storage import write_text
        from gnaq_dist.train.local import train_local
        from gnaq_dist.train.resume_check import check_resume

        check_resume(cfg)  # a refused resume: one line before the dataset is loaded
        result = train_local(cfg, log_path=f"{out}/metrics.jsonl", checkpoints=True)
        summary = {
            "config": to_dict(cfg), "metrics": result.metrics, "phase_seconds": result.phase_seconds,
            "phase_epochs": result.phase_epochs, "seconds_per_epoch": result.seconds_per_epoch,
            "storage": result.storage, "checkpoint": result.checkpoint, "resumed_from": result.resumed_from,
            "early_stopping": result.early_stopping,
            **({"latent_lr": result.latent_lr} if result.latent_lr is not None else {}),
        }
        write_text(f"{out}/summary.json", json.dumps(summary, indent=2, default=str), cfg.storage_options)
        return result
    from gnaq_dist.distributed.ray_launch import fit_on_ray, ray_storage

    ray_storage(cfg.out, cfg.storage_options)  # a store Ray's workers can reach
    if cfg.checkpoint.dir:
        ray_storage(cfg.checkpoint.dir, cfg.storage_options)
    return fit_on_ray(cfg, scaling_config, run_config, address=address, final_checkpoint=True)


def checkpoint_uri(checkpoint: Any) -> str:
    """A checkpoint's URI: a path or URI as it is; a ``ray.train.Checkpoint`` (``Result.checkpoint``)
    from its path on its filesystem."""
    if isinstance(checkpoint, str):
        return checkpoint
    path, fs = getattr(checkpoint, "path", None), getattr(checkpoint, "filesystem", None)
    if path is None or fs is None:  # (a ray.train.Checkpoint is os.PathLike too, but refuses os.fspath)
        if isinstance(checkpoint, os.PathLike):
            return os.fspath(checkpoint)
        raise GnaqInputError(f"{checkpoint!r}: expected a checkpoint URI or a ray.train.Checkpoint")
    handler = getattr(fs, "handler", None)
    if handler is not None and hasattr(getattr(handler, "fs", None), "unstrip_protocol"):
        return handler.fs.unstrip_protocol(path)  # a pyarrow view of an fsspec filesystem
    kind = getattr(fs, "type_name", "local")
    if kind == "local":
        return str(Path(path))
    scheme = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}.get(kind)
    if scheme is None:
        raise GnaqInputError(f"{checkpoint!r}: a checkpoint on a {kind} filesystem has no URI gnaq can read")
    return f"{scheme}://{path}"


def evaluate(model: Any = None, dataset: str | None = None, **options: Any) -> dict[str, Any]:
    """Recall@K / NDCG@K of a checkpoint (a URI or ``Result.checkpoint``) or a bundle on
    ``dataset``'s held-out split (``gnaq evaluate``). ``options``: ``ks``, ``split``,
    ``max_users``, ``seed``, ``batch_size``, ``storage_options``, ``progress``; or, with no
    model, ``popularity=True`` or ``oracle=LOG`` (:func:`gnaq_dist.evaluate.evaluate`)."""
    from gnaq_dist.evaluate import evaluate as run_evaluate

    return run_evaluate(None if model is None else checkpoint_uri(model), dataset, **options)


def export(checkpoint: Any, out: str, *, overwrite: bool = False,
           storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint (a URI or ``Result.checkpoint``) as a bundle at ``out`` that serves on its own
    (``gnaq export``); returns the bundle's size report."""
    from gnaq_dist.export import export_checkpoint

    return export_checkpoint(checkpoint_uri(checkpoint), out, overwrite=overwrite, storage_options=storage_options)


def __getattr__(name: str) -> Any:
    if name == "Bundle":  # numpy and pyarrow only (serving.py)
        from gnaq_dist.serving import Bundle

        return Bundle
    raise AttributeError(name)


__all__ = ["Bundle", "checkpoint_uri", "evaluate", "export", "ingest", "load_dataset", "train"]
