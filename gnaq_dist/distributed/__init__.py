"""Distributed training pieces: who owns which row, how rows and gradients travel.

* :mod:`.partition`: METIS (via DGL) or hash partitioning of users and items;
* :mod:`.compression`: low-bit gradient rows with error feedback;
* :mod:`.exchange`: fetch quantized rows from, and push gradients to, their owners
  over torch.distributed (gloo or nccl), with byte accounting;
* :mod:`.halo`: full-graph propagation split by owner (own nodes' layers, halo rows swapped).

Importing this package does not import DGL (only METIS partitioning does).
"""

from gnaq_dist.distributed.compression import COMPRESSION_BITS, CompressedRows, ErrorFeedback, RowCompressor
from gnaq_dist.distributed.exchange import (
    WIRE_KINDS,
    DenseShard,
    QuantizedShard,
    RowServer,
    WireCounter,
    allreduce_dense,
    comm_device,
    fetch_rows,
    push_row_gradients,
)
from gnaq_dist.distributed.halo import HaloPlan, remote_rows
from gnaq_dist.distributed.partition import (
    METHODS,
    Partition,
    broadcast_partition,
    edge_cut_fraction,
    edges_for_rank,
    hash_owner,
    partition_nodes,
)

__all__ = [
    "COMPRESSION_BITS",
    "METHODS",
    "WIRE_KINDS",
    "CompressedRows",
    "DenseShard",
    "ErrorFeedback",
    "HaloPlan",
    "Partition",
    "QuantizedShard",
    "RowCompressor",
    "RowServer",
    "WireCounter",
    "allreduce_dense",
    "broadcast_partition",
    "comm_device",
    "edge_cut_fraction",
    "edges_for_rank",
    "fetch_rows",
    "hash_owner",
    "partition_nodes",
    "push_row_gradients",
    "remote_rows",
]
