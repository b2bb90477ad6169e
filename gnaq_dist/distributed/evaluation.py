"""Evaluation of a distributed run: the same metrics and storage report on every rank.

Two ways, chosen by :func:`evaluate`. Split (``propagation: full``): each rank propagates its
own nodes from the stored rows, as in training, and ranks its own evaluation users, so no rank
builds an N x d table. Gathered (sampled propagation, and BiGeaR, whose stored form is built
from the whole graph): every rank gathers the whole table in storage form and scores it
exactly as the one-process trainer does. Both score from the packed table, not the training
tensors, and sum the ranks' ranking sums (collective).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from gnaq_dist.distributed.comm import allreduce_sum
from gnaq_dist.distributed.compression import bytes_view
from gnaq_dist.distributed.halo import final_own_rows
from gnaq_dist.distributed.halo_exchange import FixedExchange
from gnaq_dist.distributed.partition import Partition
from gnaq_dist.distributed.row_exchange import fetch_rows
from gnaq_dist.distributed.rows import LatentShard, QuantizedShard
from gnaq_dist.distributed.sharded import MethodShard
from gnaq_dist.distributed.wire import WireCounter
from gnaq_dist.evaluation import EvalSums, evaluate_ranking, finalize
from gnaq_dist.methods import is_gnaq
from gnaq_dist.propagation import final_from_packed, propagate_full
from gnaq_dist.quant.base import score_rows
from gnaq_dist.quant.packing import PackedTable, packed_row_bytes, storage_figures, storage_report, with_bias_bytes

if TYPE_CHECKING:
    from gnaq_dist.distributed.trainer import DistributedTrainer


def evaluate(trainer: DistributedTrainer) -> tuple[dict[str, float], dict[str, float]]:
    """Metrics (the same on every rank) and the storage report of the whole table (collective).

    With the graph split by owner (``propagation: full``), evaluation is split the same way
    (:func:`evaluate_split`); otherwise every rank gathers the table and propagates the
    whole graph (:func:`evaluate_gathered`).
    """
    if trainer.halo is not None:
        trainer.halo.release_buffers()  # evaluation's own tables take their place
    metrics, storage = evaluate_split(trainer) if trainer.halo is not None else evaluate_gathered(trainer)
    return metrics, _with_latent_bytes(storage, trainer)


def _with_latent_bytes(storage: dict[str, float], trainer: DistributedTrainer) -> dict[str, float]:
    """gnaq_lat: the storage report with the integer latent counted, as the one-process trainer counts
    it (what a checkpoint holds to go on training, beside the served table)."""
    latent = float(getattr(trainer.shard.method, "latent_bytes_per_node", 0.0))
    if not latent or "latent_bytes_per_node" in storage:
        return storage
    out = dict(storage)
    out["served_bytes_per_node"] = out["bytes_per_node"]
    out["latent_bytes_per_node"] = latent
    out["bytes_per_node"] += latent
    out["compression_ratio"] = out["fp32_bytes_per_node"] / out["bytes_per_node"]
    return out


def gather_latent(method, partition: Partition, counter: WireCounter) -> torch.Tensor:
    """The whole table of a latent row format (fp weights) on every rank (collective)."""
    server = LatentShard(list(method.trainable_row_params()), method.dim)
    ids = torch.arange(partition.num_nodes, dtype=torch.int64)
    return fetch_rows(ids, partition, server, counter=counter)


def _packed_server(shard: MethodShard, level_dtype: torch.dtype) -> tuple[PackedTable, QuantizedShard]:
    """This rank's rows in storage form and a server of them (wire rows = stored rows)."""
    method = shard.method
    own = method.pack(level_dtype=level_dtype)
    if shard.num_owned == 0:  # a placeholder row: serve nothing
        own = PackedTable(own.method, own.bits, own.dim, 0, own.codes[:0], own.levels[:0]
                          if own.levels.shape[0] != 1 else own.levels,
                          bias=None if own.bias is None else own.bias[:0])
    server = QuantizedShard.from_packed(own)
    if own.num_rows == 1 and own.levels.shape[0] == 1 and not is_gnaq(method.name):
        server.shared_levels, server.level_bytes = True, 0  # one owned row of a shared codebook
        server.row_bytes = server.code_bytes
    return own, server


@torch.no_grad()
def _gathered_table(trainer: DistributedTrainer) -> tuple[str, Any]:
    """The full layer-0 table on every rank, in storage form (collective).

    ``("fp", weight)`` for fp (no packed form); ``("packed", PackedTable)`` otherwise,
    built from the shards' wire rows.
    """
    method = trainer.shard.method
    partition = trainer.partition
    if method.name == "fp":
        return "fp", gather_latent(method, partition, trainer.wire.gather)
    own, server = _packed_server(trainer.shard, trainer.level_dtype)
    ids = torch.arange(partition.num_nodes, dtype=torch.int64)
    payload = fetch_rows(ids, partition, server, counter=trainer.wire.gather, decode=False)
    cb = packed_row_bytes(own.groups * own.dim, own.bits)
    codes = payload[:, :cb].contiguous().numpy()
    if server.shared_levels:
        levels = own.levels
    else:
        levels = (bytes_view(payload[:, cb:], server.levels.dtype)
                  .reshape(-1, own.groups, 1 << own.bits).numpy())
    return "packed", PackedTable(own.method, own.bits, own.dim, partition.num_nodes, codes, levels,
                                 own.groups, own.needs_propagation, own.group_weights)


@torch.no_grad()
def final_embeddings(trainer: DistributedTrainer, kind: str, table) -> torch.Tensor:
    """All nodes' final embeddings from the gathered table, exactly as ``local.py`` scores them."""
    method = trainer.shard.method
    L = trainer.config.model.num_layers
    if kind == "fp":
        return method.combine(propagate_full(trainer.whole_graph(), table, L, method.layer_fn))
    return final_from_packed(trainer.whole_graph(), table, method.combine, L)


def _rank_users(trainer: DistributedTrainer, user_rows: torch.Tensor, item_rows: torch.Tensor) -> dict[str, float]:
    """This rank's evaluation users ranked (rows in ``trainer.eval_users`` order), summed over ranks."""
    cfg = trainer.config
    sums = evaluate_ranking(user_rows, item_rows, trainer.eval_users, trainer.train_csr, trainer.test_csr,
                            ks=tuple(cfg.eval.ks), batch_size=cfg.eval.batch_size,
                            progress=cfg.progress and trainer.rank == 0)
    flat = allreduce_sum(sums.to_tensor())
    return finalize(EvalSums.from_tensor(tuple(cfg.eval.ks), flat))


def _fp_storage(dim: int) -> dict[str, float]:
    """The storage report of an fp32 table of ``dim`` columns."""
    return {"bytes_per_node": 4.0 * dim, "fp32_bytes_per_node": 4.0 * dim, "compression_ratio": 1.0}


def _stored_bias(trainer: DistributedTrainer) -> torch.Tensor | None:
    """This rank's score biases as stored (rounded to ``model.level_dtype``), or None."""
    bias = trainer.shard.method.bias_of(None)
    if bias is None:
        return None
    return bias.detach()[: trainer.shard.num_owned].to(trainer.level_dtype).to(torch.float32)


def _with_bias_bytes(storage: dict[str, float], trainer: DistributedTrainer) -> dict[str, float]:
    """The storage report with the score bias counted (one value a node, as the levels are stored)."""
    if trainer.shard.method.bias_of(None) is None or "bias_bytes_per_node" in storage:
        return storage
    return with_bias_bytes(storage, torch.finfo(trainer.level_dtype).bits / 8)


def evaluate_gathered(trainer: DistributedTrainer) -> tuple[dict[str, float], dict[str, float]]:
    """Every rank gathers the whole stored table and scores the whole graph (collective)."""
    kind, table = _gathered_table(trainer)
    bias = _stored_bias(trainer)
    if bias is not None:
        ids = torch.arange(trainer.partition.num_nodes, dtype=torch.int64)
        bias = fetch_rows(ids, trainer.partition, LatentShard([bias], 1), counter=trainer.wire.gather).reshape(-1)
    trainer.wire.allreduce_gather_bytes()
    final = final_embeddings(trainer, kind, table)
    n_users = trainer.data.n_users
    final = score_rows(final, bias, torch.arange(final.shape[0]) < n_users)
    metrics = _rank_users(trainer, final[:n_users], final[n_users:])
    storage = _fp_storage(trainer.config.model.dim) if kind == "fp" else storage_report(table)
    return metrics, _with_bias_bytes(storage, trainer)


@torch.no_grad()
def evaluate_split(trainer: DistributedTrainer) -> tuple[dict[str, float], dict[str, float]]:
    """Each rank propagates its own nodes over its rows of ``A_hat`` (the halo's stored rows
    and activations from their owners, as in training), then ranks its own evaluation users
    against all items' final rows. Nothing of size N x d is built: memory and work follow
    the shard, and the result equals :func:`evaluate_gathered`'s."""
    method, plan, part = trainer.shard.method, trainer.halo, trainer.partition
    counter = trainer.wire.gather
    own_ids = torch.arange(plan.n_own, dtype=torch.int64)
    if method.name == "fp":
        server = LatentShard(list(method.trainable_row_params()), method.dim)
        storage = _fp_storage(trainer.config.model.dim)
    else:  # the stored table's rows, propagated as final_from_packed propagates them
        own, server = _packed_server(trainer.shard, trainer.level_dtype)
        shared = server.shared_levels
        t = allreduce_sum(torch.tensor([own.code_bytes(), 0 if shared else own.level_bytes(), own.num_rows],
                                       dtype=torch.int64)).tolist()
        level_bytes = t[1] + (own.level_bytes() if shared else 0)  # a shared codebook is stored once
        storage = storage_figures(own.bits, own.dim, own.groups, t[2], t[0], level_bytes)
    L = trainer.config.model.num_layers
    if method.name == "fp" and L > 0:  # the weight in place and the halo's rows in the plan's table, as a step
        final_own = plan.mean_of_own_rows(method.weight.detach(), L, counter)
    else:
        payload = torch.cat([server.serve(own_ids), plan.exchange.pull_wire_rows(server, counter)])
        # Every method the distributed loop trains has plain layers (BiGeaR, which has not, trains in one process).
        x_input = server.decode(payload)
        del payload
        final_own = final_own_rows(plan, method, x_input, L, counter)
        del x_input
    plan.release_buffers()  # ranking holds the final rows and the scores, nothing else
    n_users = trainer.data.n_users
    final_own = score_rows(final_own, _stored_bias(trainer), trainer.owned_t < n_users)
    storage = _with_bias_bytes(storage, trainer)
    items = FixedExchange(torch.arange(n_users, part.num_nodes, dtype=torch.int64), part,
                          counter=counter, what="evaluation items").pull_rows(final_own, counter)
    users = final_own[part.local_of(torch.from_numpy(trainer.eval_users))]
    trainer.wire.allreduce_gather_bytes()
    return _rank_users(trainer, users, items), storage


__all__ = ["evaluate", "evaluate_gathered", "evaluate_split", "final_embeddings", "gather_latent"]
