"""What a Ray Train worker reports: one ``ray.train.report`` an epoch, with the checkpoint it wrote.

The trainer hands every log record to :class:`EpochReporter` (``epoch``, ``wire``, ``eval``,
``checkpoint``) and marks the end of each epoch (``{"event": "epoch_end"}``). The reporter merges
the epoch's records into one flat dict of numbers (loss, positives/s, wire bytes, and
``recall@K`` / ``ndcg@K`` when the epoch was evaluated) and reports it on every rank (the call is
a barrier: every rank sees the same records, so every rank reports as often). Rank 0 passes the
epoch's checkpoint along: the sharded checkpoint the ranks wrote into the Ray run's directory,
registered where it lies (``CheckpointUploadMode.NO_UPLOAD``), so that the run's
``CheckpointConfig`` (``num_to_keep``, ``checkpoint_score_attribute``) decides which to keep.

Rank 0 also appends each record to ``<out>/metrics.jsonl`` as it comes (a run killed midway
keeps its finished epochs) and, with ``progress``, prints one line an epoch (no progress bars:
a worker's output reaches the driver's log line by line).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

#: Log record fields that are not metrics.
NOT_METRICS = ("event", "time", "uri")


def _epoch_metrics(records: list[dict[str, Any]]) -> dict[str, float | int]:
    """The numbers of one epoch's records, merged in order (later records win a shared key);
    ``phase`` becomes ``quantized`` (0 or 1)."""
    metrics: dict[str, float | int] = {}
    for record in records:
        for key, value in record.items():
            if key in NOT_METRICS:
                continue
            if key == "phase":
                metrics["quantized"] = int(value == "quantized")
            elif isinstance(value, bool):
                metrics[key] = int(value)
            elif isinstance(value, (int, float)):
                metrics[key] = value
    return metrics


def _progress_line(metrics: dict[str, Any]) -> str:
    """One line for an epoch's report: epoch, step, loss, throughput, and the metrics if evaluated."""
    parts = [f"epoch {metrics['epoch']}" if "epoch" in metrics else "report"]
    if "quantized" in metrics:
        parts.append("[quantized]" if metrics["quantized"] else "[fp]")
    if "step" in metrics:
        parts.append(f"step {metrics['step']}")
    if "loss" in metrics:
        parts.append(f"loss={metrics['loss']:.4f}")
    if "positives_per_s" in metrics:
        parts.append(f"{metrics['positives_per_s']:,.0f} positives/s")
    parts += [f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(("recall@", "ndcg@"))]
    return " ".join(parts)


def _ray_checkpoint(uri: str, storage_options: dict[str, Any] | None = None):
    """A ``ray.train.Checkpoint`` for the checkpoint directory at ``uri``, on the same
    filesystem that the Ray run's storage uses (:func:`.ray_launch.ray_storage`)."""
    from ray.train import Checkpoint

    from gnaq_dist.storage import arrow_fs, is_local, resolve

    fs, path = resolve(uri, storage_options)
    if is_local(fs):
        return Checkpoint(path)
    return Checkpoint(path, filesystem=arrow_fs(fs))


class EpochReporter:
    """The ``report`` hook of a Ray Train worker (see the module docstring)."""

    def __init__(self, rank: int, out: str | None, storage_options: dict[str, Any] | None = None,
                 progress: bool = False) -> None:
        self.rank = rank
        self.storage_options = storage_options
        self.progress = progress and rank == 0
        self.pending: list[dict[str, Any]] = []
        self.reports = 0
        self.log = None
        if rank == 0 and out:
            from gnaq_dist.runlog import RunLog

            self.log = RunLog(f"{out.rstrip('/')}/metrics.jsonl", storage_options)

    def __call__(self, record: dict[str, Any]) -> None:
        if record.get("event") == "epoch_end":
            self.flush()
            return
        self.pending.append(record)
        if self.log is not None and record.get("event"):
            self.log.append(record)

    def flush(self) -> None:
        """Report the records since the last report (nothing if there are none: every rank agrees)."""
        import ray.train
        from ray.train import CheckpointUploadMode

        if not self.pending:
            return
        metrics = _epoch_metrics(self.pending)
        uris = [r["uri"] for r in self.pending if r.get("event") == "checkpoint" and r.get("uri")]
        checkpoint = _ray_checkpoint(uris[-1], self.storage_options) if uris and self.rank == 0 else None
        self.pending = []
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        self.reports += 1
        if self.progress:
            print(_progress_line(metrics), file=sys.stdout, flush=True)


def resume_uri(checkpoint_root: str) -> str | None:
    """The checkpoint a restarted (or resumed) Ray Train run was handed, as a URI under
    ``checkpoint_root`` (the run's directory, where the ranks wrote it); None if none."""
    import posixpath

    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    return f"{checkpoint_root.rstrip('/')}/{posixpath.basename(checkpoint.path.rstrip('/'))}"


def quiet_report_lines() -> None:
    """Drop the INFO line Ray Train logs in a worker for every report (with the whole record).

    ``LoggingConfig(log_level="WARNING")`` does not reach it: Ray Train names that logger by
    its source file's path, not under ``ray.train``. Found by that name among the loggers
    already made, without importing Ray's internals; where none matches, the lines stay.
    """
    for name in list(logging.Logger.manager.loggerDict):
        if name.endswith(("/execution/context.py", "\\execution\\context.py")) and "train" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def write_summary(summary: dict[str, Any], out: str, storage_options: dict[str, Any] | None = None) -> None:
    """Rank 0 at the end: ``summary.json`` and, from the run's whole history, ``metrics.jsonl``
    (replacing the lines appended as the run went), each all or nothing."""
    from gnaq_dist.storage import write_text

    base = out.rstrip("/")
    history = summary.get("history") or []
    if history:
        write_text(f"{base}/metrics.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in history),
                   storage_options)
    write_text(f"{base}/summary.json", json.dumps(summary, indent=2, default=str), storage_options)


__all__ = ["EpochReporter", "quiet_report_lines", "resume_uri", "write_summary"]
