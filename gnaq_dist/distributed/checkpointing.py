"""Each rank's part in the run's checkpoints: which one to resume from, the collective save and
restore sequences.

Why apart from :mod:`gnaq_dist.checkpoint`: that module is the format and the store (files,
manifest, verification, retention) and knows nothing of ranks; here is the order in which
ranks use it (as PyTorch-BigGraph's checkpoint manager sits over its checkpoint storage).
Rank 0 chooses and verifies the checkpoint and commits the manifest last; every rank writes
and reads its own shard; one rank's failure raises on every rank
(:func:`.comm.run_on_rank_then_agree`) instead of leaving the others in a collective.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from gnaq_dist import checkpoint as ckpt
from gnaq_dist.distributed.comm import run_on_rank_then_agree
from gnaq_dist.distributed.compression import ErrorFeedback
from gnaq_dist.distributed.partition import Partition
from gnaq_dist.distributed.sharded import MethodShard
from gnaq_dist.quant.base import EmbeddingMethod
from gnaq_dist.train.config import TrainConfig

log = logging.getLogger(__name__)

ResumeHint = Callable[[], "str | None"]  # the checkpoint URI a restarted Ray Train run was handed
#: Makes this rank's shard of a restored method with its learning rate: (shard, error feedback per message).
StartShard = Callable[[EmbeddingMethod, float], "tuple[MethodShard, list[ErrorFeedback | None]]"]


@dataclass
class Restored:
    """Where a restored run stands: its step, trained positives and log records so far."""

    step: int
    positives: int
    history: list[dict[str, Any]]


class RankCheckpoints:
    """This rank's view of the checkpoints under ``config.checkpoint_root``."""

    def __init__(self, config: TrainConfig, rank: int, world: int, data_key: dict[str, Any],
                 prune: bool = True) -> None:
        self.config = config
        self.rank, self.world = rank, world
        self.data_key = data_key
        self.prune = prune  # keep checkpoint.keep_last (False: another owner, Ray Train, decides)

    def _model_key(self) -> dict[str, Any]:
        m = self.config.model
        key = {"method": m.method, "bits": m.bits, "dim": m.dim, "num_layers": m.num_layers}
        return {**key, "lsq_step": m.lsq_step} if m.method == "lsq" else key

    # -- choosing the checkpoint to resume from ------------------------------------------------
    def _choose_resume(self, hint: ResumeHint | None) -> ckpt.Loaded | None:
        """Rank 0: the checkpoint to start from (an explicit URI, Ray's hint, or the newest complete)."""
        ck = self.config.checkpoint
        uri = hint() if hint is not None and ck.resume == "auto" and ck.every_epochs else None
        return ckpt.choose_resume(ck.resume, ck.every_epochs, self.config.checkpoint_root, self.config.storage_options,
                                  self.data_key, self._model_key(), uri)

    def find_resume(self, hint: ResumeHint | None) -> ckpt.Loaded | None:
        """Collective: rank 0 chooses and verifies, every rank gets the same checkpoint (or none)."""
        choice = run_on_rank_then_agree(partial(self._choose_resume, hint) if self.rank == 0 else None,
                                        "choosing the checkpoint to resume from")
        box = [choice.uri if choice is not None else None]
        dist.broadcast_object_list(box, 0)
        if box[0] is None:
            return None
        if self.rank == 0:
            return choice
        return ckpt.Loaded(box[0], ckpt.read_manifest(box[0], self.config.storage_options))

    def saved_partition(self, loaded: ckpt.Loaded | None, n_users: int, n_items: int) -> Partition | None:
        """The checkpoint's owners when this run can keep them (same W, same partition method):
        each rank then reloads exactly its own shard. None otherwise."""
        m = loaded.manifest if loaded is not None else None
        if m is None or m["world_size"] != self.world or \
                m["partition"]["method"] != self.config.distributed.partition:
            return None
        owner = ckpt.read_table(loaded.uri, "partition.parquet", self.config.storage_options, manifest=m)["owner"]
        part = Partition.from_owner(owner.to_numpy(), self.world, n_users, n_items, method=m["partition"]["method"])
        if part.checksum() != m["partition"]["owner_checksum"]:
            raise ckpt.CheckpointError(f"{loaded.uri}/partition.parquet does not match its manifest")
        return part

    # -- restore ---------------------------------------------------------------------------------
    def restore(self, loaded: ckpt.Loaded, partition: Partition, start_shard: StartShard) -> Restored:
        """Load this rank's rows (from any number of writer ranks), optimizer state and residuals."""
        cfg = self.config
        m, so = loaded.manifest, cfg.storage_options
        owned = partition.owned_ids(self.rank)
        same = m["world_size"] == self.world and m["partition"]["owner_checksum"] == partition.checksum()
        rows = ckpt.read_rows(loaded.uri, m, owned, so, shards=[self.rank] if same else None)
        method = ckpt.build_for_rows(m, len(owned))
        ckpt.load_rows(method, rows)
        lr = cfg.optim.rate("fp" if m["shard_method"] == "fp" else "quantized")
        shard, feedback = start_shard(method, lr)
        ckpt.load_rows(method, rows, shard.optimizer)
        ckpt.load_dense(method, ckpt.read_table(loaded.uri, "dense.parquet", so, manifest=m), shard.dense_optimizer)
        self._restore_residuals(loaded, same, partition, feedback)
        progress = m["progress"]
        return Restored(int(m["step"]), int(progress.get("positives", 0)), list(m.get("history", [])))

    def _restore_residuals(self, loaded: ckpt.Loaded, same: bool, partition: Partition,
                           feedback: list[ErrorFeedback | None]) -> None:
        """Error-feedback residuals: a rank's own on a plain resume; on a reshard, each row's summed
        residual (gradient not yet delivered) goes to one rank that does not own the row."""
        if not any(ef is not None for ef in feedback):
            return
        m, so = loaded.manifest, self.config.storage_options
        table = ckpt.read_residuals(loaded.uri, m, so, ranks=[self.rank] if same else None)
        if table.num_rows == 0:
            return
        msg = table["message"].to_numpy().astype(np.int64)
        gid = table["global_id"].to_numpy()
        values = table["residual"].combine_chunks()
        for i, ef in enumerate(feedback):
            if ef is None:
                continue
            sel = np.flatnonzero(msg == i)
            if not sel.size:
                continue
            res = values.take(pa.array(sel)).flatten().to_numpy(zero_copy_only=False).reshape(sel.size, ef.dim)
            ids = gid[sel]
            if not same:
                uniq, inv = np.unique(ids, return_inverse=True)
                summed = np.zeros((uniq.size, ef.dim), dtype=np.float32)
                np.add.at(summed, inv, res)
                keeper = (partition.owner[uniq] + 1) % self.world
                mine = (keeper == self.rank) & (partition.owner[uniq] != self.rank)
                ids, res = uniq[mine], summed[mine]
            ef.load_state(torch.from_numpy(ids), torch.from_numpy(np.ascontiguousarray(res)))

    # -- save ------------------------------------------------------------------------------------
    def save(self, *, step: int, epoch: int, phase: str, shard: MethodShard, feedback: list[ErrorFeedback | None],
             partition: Partition, positives: int, history: list[dict[str, Any]]) -> str:
        """Collective: every rank writes its shard, rank 0 the replicated parts and, last, the
        manifest; returns the committed checkpoint's URI on every rank."""
        cfg = self.config
        so = cfg.storage_options
        store = ckpt.CheckpointStore(cfg.checkpoint_root, so)
        name = ckpt.checkpoint_name(step)

        def write_shard() -> dict[str, Any]:
            files: dict[str, Any] = {}
            table = ckpt.shard_table(shard.method, shard.owned, shard.optimizer)
            files[ckpt.shard_name(self.rank, self.world)] = store.write_file(
                name, ckpt.shard_name(self.rank, self.world), ckpt.parquet_bytes(table))
            residuals = []
            for ef, width in zip(feedback, shard.gradient_widths()):
                if ef is None:
                    residuals.append((np.zeros(0, np.int64), np.zeros((0, width), np.float32)))
                else:
                    ids, res = ef.state()
                    residuals.append((ids.cpu().numpy(), res.cpu().numpy()))
            files[ckpt.residual_name(self.rank, self.world)] = store.write_file(
                name, ckpt.residual_name(self.rank, self.world), ckpt.parquet_bytes(ckpt.residual_table(residuals)))
            return files

        files = run_on_rank_then_agree(write_shard, "writing checkpoint shards")
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, files)

        def commit() -> str:
            merged = {k: v for part in everyone for k, v in part.items()}
            merged["dense.parquet"] = store.write_file(
                name, "dense.parquet", ckpt.parquet_bytes(ckpt.dense_table(shard.method, shard.dense_optimizer)))
            merged["partition.parquet"] = store.write_file(
                name, "partition.parquet", ckpt.parquet_bytes(pa.table({"owner": partition.owner})))
            from gnaq_dist.config import to_dict

            manifest = ckpt.new_manifest(
                step=step, epoch=epoch, phase=phase, shard_method=shard.method.name,
                world_size=self.world, config=to_dict(cfg), data=self.data_key,
                partition=partition.describe(), files=merged,
                progress={"positives": positives}, history=history)
            uri = store.commit(name, manifest)
            removed = store.prune(cfg.checkpoint.keep_last) if self.prune else []
            if removed:
                log.info("removed old checkpoints %s", removed)
            return uri

        uri = run_on_rank_then_agree(commit if self.rank == 0 else None, "committing the checkpoint")
        box = [uri]
        dist.broadcast_object_list(box, 0)
        return box[0]


__all__ = ["RankCheckpoints", "Restored", "ResumeHint"]
