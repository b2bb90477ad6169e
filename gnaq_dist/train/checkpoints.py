"""The one-process trainer's checkpoints: a world of one rank in the sharded format.

A one-process run writes what a distributed run of one worker writes
(:mod:`gnaq_dist.checkpoint`): ``shard-00000-of-00001.parquet`` with every row,
its (empty) error-feedback residuals, ``dense.parquet``, ``partition.parquet`` (every
node owned by rank 0) and, last, ``manifest.json``. So ``gnaq export``, ``gnaq evaluate``
and a distributed run with any number of workers read it as they read their own.

The one-process loop trains with torch's dense Adam; the format holds the row-sparse
Adam of the distributed loop (per-row moments and step counts). Dense Adam steps every row
at every step, so its state is that with one step count for all rows: :class:`RowAdamView`
presents it so, and :func:`restore` puts it back (from a distributed checkpoint, whose rows
have their own counts, every row takes the largest).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from gnaq_dist import checkpoint as ckpt
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.graph import BipartiteGraph
from gnaq_dist.quant.base import EmbeddingMethod
from gnaq_dist.train.config import TrainConfig

log = logging.getLogger(__name__)


class RowAdamView:
    """The row parameters' state of a torch Adam over a whole method, shaped as the row-sparse
    Adam that :func:`gnaq_dist.checkpoint.shard_table` and ``load_rows`` read and fill:
    ``exp_avg`` / ``exp_avg_sq`` (one tensor per row parameter) and ``steps`` (one per row)."""

    def __init__(self, method: EmbeddingMethod, optimizer: torch.optim.Optimizer | None, n_rows: int) -> None:
        state = optimizer.state if optimizer is not None else {}
        self.exp_avg: list[torch.Tensor] = []
        self.exp_avg_sq: list[torch.Tensor] = []
        step = 0
        for p in method.trainable_row_params():
            entry = state.get(p)
            if entry:
                self.exp_avg.append(entry["exp_avg"].detach())
                self.exp_avg_sq.append(entry["exp_avg_sq"].detach())
                step = max(step, int(entry["step"]))
            else:  # no step taken yet in this phase
                self.exp_avg.append(torch.zeros(p.shape, dtype=torch.float32))
                self.exp_avg_sq.append(torch.zeros(p.shape, dtype=torch.float32))
        self.steps = torch.full((n_rows,), step, dtype=torch.int64)

    def install(self, method: EmbeddingMethod, optimizer: torch.optim.Optimizer) -> None:
        """Make these moments ``optimizer``'s state of the row parameters (one step count for all)."""
        step = float(self.steps.max()) if self.steps.numel() else 0.0
        if step <= 0:
            return  # the phase had taken no step: a fresh Adam
        for p, m, v in zip(method.trainable_row_params(), self.exp_avg, self.exp_avg_sq):
            optimizer.state[p] = {"step": torch.tensor(step, dtype=torch.float32),
                                  "exp_avg": m.to(p.dtype).reshape(p.shape).clone(),
                                  "exp_avg_sq": v.to(p.dtype).reshape(p.shape).clone()}


class DenseAdamView:
    """A torch Adam over a whole method, seen as the Adam of its dense parameters only (the
    indices :func:`gnaq_dist.checkpoint.dense_table` and ``load_dense`` use)."""

    def __init__(self, method: EmbeddingMethod, optimizer: torch.optim.Optimizer) -> None:
        self.params = list(method.dense_params())
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        state = self.optimizer.state
        return {"state": {i: state[p] for i, p in enumerate(self.params) if state.get(p)}, "param_groups": []}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for i, entry in state_dict["state"].items():
            p = self.params[int(i)]
            self.optimizer.state[p] = {"step": torch.as_tensor(entry["step"], dtype=torch.float32).reshape(()),
                                       "exp_avg": entry["exp_avg"].to(p.dtype).reshape(p.shape).clone(),
                                       "exp_avg_sq": entry["exp_avg_sq"].to(p.dtype).reshape(p.shape).clone()}


def _whole_partition(n_users: int, n_items: int):
    """Every node owned by rank 0 (what a one-worker run records)."""
    from gnaq_dist.distributed.partition import Partition

    return Partition.from_owner(np.zeros(n_users + n_items, dtype=np.int32), 1, n_users, n_items, method="hash")


@dataclass
class OneProcessCheckpoints:
    """The checkpoints of one one-process run under ``config.checkpoint_root``."""

    config: TrainConfig
    data_key: dict[str, Any]

    def _model_key(self) -> dict[str, Any]:
        m = self.config.model
        key = {"method": m.method, "bits": m.bits, "dim": m.dim, "num_layers": m.num_layers}
        return {**key, "lsq_step": m.lsq_step} if m.method == "lsq" else key

    def find_resume(self) -> ckpt.Loaded | None:
        """The checkpoint to start from (``checkpoint.resume``), verified against this data and model."""
        ck = self.config.checkpoint
        return ckpt.choose_resume(ck.resume, ck.every_epochs, self.config.checkpoint_root,
                                  self.config.storage_options, self.data_key, self._model_key())

    def save(self, *, step: int, epoch: int, phase: str, method: EmbeddingMethod,
             optimizer: torch.optim.Optimizer | None, positives: int, history: list[dict[str, Any]]) -> str:
        """Write checkpoint ``ckpt-<step>`` (the manifest last), prune to ``checkpoint.keep_last``;
        returns its URI."""
        from gnaq_dist.config import to_dict
        from gnaq_dist.runlog import _jsonable

        cfg = self.config
        history = json.loads(json.dumps(history, default=_jsonable))  # as metrics.jsonl has them
        store = ckpt.CheckpointStore(cfg.checkpoint_root, cfg.storage_options)
        name = ckpt.checkpoint_name(step)
        n_users, n_items = int(self.data_key["n_users"]), int(self.data_key["n_items"])
        n = n_users + n_items
        shard, residuals = ckpt.shard_name(0, 1), ckpt.residual_name(0, 1)
        rows = ckpt.shard_table(method, np.arange(n, dtype=np.int64), RowAdamView(method, optimizer, n))
        files = {shard: store.write_file(name, shard, ckpt.parquet_bytes(rows))}
        del rows
        files[residuals] = store.write_file(name, residuals, ckpt.parquet_bytes(ckpt.residual_table([])))
        dense_opt = DenseAdamView(method, optimizer) if optimizer is not None else None
        files["dense.parquet"] = store.write_file(
            name, "dense.parquet", ckpt.parquet_bytes(ckpt.dense_table(method, dense_opt)))
        part = _whole_partition(n_users, n_items)
        files["partition.parquet"] = store.write_file(
            name, "partition.parquet", ckpt.parquet_bytes(pa.table({"owner": part.owner})))
        manifest = ckpt.new_manifest(step=step, epoch=epoch, phase=phase, shard_method=method.name, world_size=1,
                                     config=to_dict(cfg), data=self.data_key, partition=part.describe(),
                                     files=files, progress={"positives": int(positives)}, history=history)
        uri = store.commit(name, manifest)
        removed = store.prune(cfg.checkpoint.keep_last)
        if removed:
            log.info("removed old checkpoints %s", removed)
        return uri


def restore(loaded: ckpt.Loaded, n_rows: int, graph: BipartiteGraph | None, lr_fp: float, lr_quant: float,
            storage_options: dict[str, Any] | None = None, latent_lr: float | None = None
            ) -> tuple[EmbeddingMethod, torch.optim.Optimizer]:
    """A checkpoint's method over all ``n_rows`` rows (written by any number of ranks) and a torch
    Adam holding its optimizer state. ``latent_lr``: gnaq_lat's latent step as the resuming run
    resolves it (its rate, like ``lr_quant``, is the run's, not the checkpoint's)."""
    m = loaded.manifest
    rows = ckpt.read_rows(loaded.uri, m, np.arange(n_rows, dtype=np.int64), storage_options)
    try:
        method = ckpt.build_for_rows(m, n_rows, graph, latent_lr=latent_lr)
        view = RowAdamView(method, None, n_rows)
        ckpt.load_rows(method, rows, view)
    except GnaqInputError as exc:
        raise ckpt.CheckpointError(f"{loaded.uri}: {exc}") from None
    lr = lr_fp if m["shard_method"] == "fp" else lr_quant
    optimizer = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=lr)
    view.install(method, optimizer)
    ckpt.load_dense(method, ckpt.read_table(loaded.uri, "dense.parquet", storage_options, manifest=m),
                    DenseAdamView(method, optimizer))
    return method, optimizer


__all__ = ["DenseAdamView", "OneProcessCheckpoints", "RowAdamView", "restore"]
