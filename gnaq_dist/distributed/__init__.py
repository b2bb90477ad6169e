"""Distributed training: each worker owns a shard of the embedding rows; rows and gradients travel.

Exports :func:`train_worker` (one rank's run inside a process group),
:class:`DistributedTrainer`, :func:`fit_on_ray` / :func:`train_on_ray` (W workers under Ray Train's public ``TorchTrainer``), and the
partition record :class:`Partition` with :func:`partition_nodes`, for the rest of the library
(``gnaq_dist.train`` with a ``ScalingConfig`` is the public way to train on Ray); the rest is internal.

Modules, from the run down to the wire (each imports only modules listed below it):

* :mod:`.ray_launch`: launches W workers under Ray Train with the user's or the config's Scaling/RunConfig;
* :mod:`.ray_report`: what a worker reports to Ray Train: one report an epoch, with its checkpoint;
* :mod:`.address_probe`: whether ``--address`` is a Ray cluster, answered within seconds;
* :mod:`.ray_reaper`: a watchdog process that ends a local Ray whose driver was killed;
* :mod:`.trainer`: a rank's setup, data-parallel step and run loop (the shared schedule);
* :mod:`.checkpointing`: which checkpoint a run resumes from; the ranks' save and restore sequence;
* :mod:`.evaluation`: metrics from the stored rows, split by owner or gathered on every rank;
* :mod:`.metrics`: the run's byte counts summed over ranks, steady step throughput;
* :mod:`.sharded`: a rank's rows of an embedding method: wire format, differentiable view, update;
* :mod:`.sparse_adam`: lazy, row-sparse Adam over the owned rows;
* :mod:`.halo`: full-graph propagation split by owner (a rank's rows of ``A_hat`` and its halo);
* :mod:`.row_exchange`: rows fetched from, gradients pushed to their owners, one request at a time;
* :mod:`.halo_exchange`: the halo's rows from their owners, planned once, over shared memory on one host;
* :mod:`.shared_rows`: row tables that ranks on one host map from each other's memory;
* :mod:`.rows`: row servers: a shard's rows as fixed-size wire rows (quantized, dense, latent);
* :mod:`.compression`: low-bit gradient rows with error feedback;
* :mod:`.comm`: the process group's collectives, id grouping by owner, every-rank failure agreement;
* :mod:`.wire`: bytes sent by kind, beside their fp32 equivalents;
* :mod:`.partition_store`: a partition computed apart (``gnaq partition``) and read back;
* :mod:`.partition`: who owns which row (METIS via DGL, or hash), a pure record.

Importing this package imports none of them (nor torch or DGL): the names above load on first use.
"""

from __future__ import annotations

from gnaq_dist.lazy import lazy_exports

_EXPORTS = {
    "DistributedTrainer": "gnaq_dist.distributed.trainer",
    "train_worker": "gnaq_dist.distributed.trainer",
    "train_on_ray": "gnaq_dist.distributed.ray_launch",
    "fit_on_ray": "gnaq_dist.distributed.ray_launch",
    "Partition": "gnaq_dist.distributed.partition",
    "partition_nodes": "gnaq_dist.distributed.partition",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["DistributedTrainer", "Partition", "fit_on_ray", "partition_nodes", "train_on_ray", "train_worker"]
