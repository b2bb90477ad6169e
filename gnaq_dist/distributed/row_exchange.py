"""Rows to and from their owners, one request at a time (over torch.distributed).

Why: each worker owns a shard of the embedding rows (:mod:`.partition`) but its batches
touch rows of every shard. As in DGL's distributed sparse optimizers, only the touched
rows move: requests and gradients are grouped by owner, the counts go first (the checked
header of :func:`.comm.exchange_header`), then one variable-size ``all_to_all_single``
carries the rows, in the row server's wire form (:mod:`.rows`) or as compressed gradient
rows (:mod:`.compression`). Both functions are collectives: every rank calls them in
the same order, possibly with no ids.

Messages (``n`` rows from one rank to one peer, ids int32 when the graph has fewer than
2^31 nodes, else int64):

* header: ``(count, row_bytes, width)`` int64 per peer (24 bytes), for every exchange;
* fetch request: ``n`` ids; fetch answer: ``n`` rows of ``server.row_bytes`` bytes, in
  request order (no ids);
* gradient push: ``n`` rows of ``id | payload`` (the compressor's row bytes).

Rows a rank sends to itself never touch the wire: fetches go through the same serve/decode
path (so a local row equals what a peer would get), gradients for own rows stay fp32 and
uncompressed.
"""

from __future__ import annotations

import torch

from gnaq_dist.distributed.comm import (
    all_to_all,
    check_ids,
    exchange_header,
    group_by_owner,
    id_dtype,
    rank_and_size,
)
from gnaq_dist.distributed.compression import ErrorFeedback, RowCompressor, bytes_view, encode_with_feedback
from gnaq_dist.distributed.halo_exchange import FixedExchange
from gnaq_dist.distributed.partition import Partition
from gnaq_dist.distributed.rows import RowServer
from gnaq_dist.distributed.wire import WireCounter, count_bytes
from gnaq_dist.errors import GnaqInputError


def fetch_rows(needed_ids: torch.Tensor, partition: Partition, server: RowServer, *,
               counter: WireCounter | None = None, decode: bool = True) -> torch.Tensor:
    """Rows of the global ``needed_ids`` (unique), from their owners, in the order asked.

    ``server`` is this rank's own shard (rows ``partition.owned_ids(rank)``); it answers
    the peers' requests and decodes the answers. Returns (n, server.width) float32, or
    with ``decode=False`` the uint8 (n, server.row_bytes) wire rows (e.g. for
    ``QuantizedShard.decode_parts``). A :class:`FixedExchange` used once. Collective:
    every rank calls it, possibly with no ids.
    """
    ids = check_ids(needed_ids, partition, "fetch_rows")
    if ids.numel() > 1 and bool((torch.sort(ids).values.diff() == 0).any()):
        raise GnaqInputError("fetch_rows: needed_ids must be unique")
    device = torch.as_tensor(needed_ids).device
    plan = FixedExchange(ids, partition, counter=counter, row_bytes=int(server.row_bytes),
                         width=int(server.width), what="fetch_rows")
    rows = plan.pull_wire_rows(server, counter)
    return (server.decode(rows) if decode else rows).to(device)


def push_row_gradients(
    ids: torch.Tensor,
    grads: torch.Tensor,
    partition: Partition,
    compressor: RowCompressor | None = None,
    error_feedback: ErrorFeedback | None = None,
    *,
    counter: WireCounter | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Send (global id, gradient row) pairs to the rows' owners; owners sum them.

    Duplicate ids are summed at the sender first (one row per id on the wire, one
    residual per id). Rows for other ranks are compressed (``compressor``; None or
    ``bits=None`` sends fp32) with ``error_feedback`` applied; rows this rank owns stay
    fp32. Returns this rank's touched local rows (sorted) and their summed gradients
    (float32, on ``grads``' device). Collective: every rank calls it, possibly with
    ``(0, k)`` gradients.
    """
    rank, world = rank_and_size()
    if partition.world_size != world:
        raise GnaqInputError(f"partition is for {partition.world_size} ranks, the process group has {world}")
    ids = check_ids(ids, partition, "push_row_gradients")
    if grads.dim() != 2 or grads.shape[0] != ids.shape[0]:
        raise GnaqInputError(f"push_row_gradients: grads must be ({ids.shape[0]}, k), got {tuple(grads.shape)}")
    device = grads.device
    k = int(grads.shape[1])
    comp = compressor if compressor is not None else RowCompressor(bits=None)
    if error_feedback is not None and error_feedback.dim != k:
        raise GnaqInputError(f"error feedback holds rows of {error_feedback.dim} values, gradients have {k}")

    uids, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    g = torch.zeros((uids.shape[0], k), dtype=torch.float32).index_add_(0, inverse, grads.detach().cpu().float())
    order, send_counts = group_by_owner(uids, partition)
    uids, g = uids[order], g[order]
    starts = torch.cumsum(send_counts, 0) - send_counts
    mine = slice(int(starts[rank]), int(starts[rank] + send_counts[rank]))
    remote = torch.ones(uids.shape[0], dtype=torch.bool)
    remote[mine] = False
    own_ids, own_g = uids[mine], g[mine]
    rem_ids, rem_g = uids[remote], g[remote]
    wire_counts = send_counts.clone()
    wire_counts[rank] = 0

    wire_ids = id_dtype(partition)
    id_bytes = torch.empty(0, dtype=wire_ids).element_size()
    rb = comp.row_bytes(k)
    recv_counts = exchange_header(wire_counts, id_bytes + rb, k, "push_row_gradients", counter)

    wire = encode_with_feedback(comp, error_feedback, rem_ids, rem_g)
    n_rem = rem_ids.shape[0]
    msg = torch.cat([rem_ids.to(wire_ids).view(torch.uint8).reshape(n_rem, id_bytes), wire.cpu()], dim=1)
    count_bytes(counter, "control", n_rem * id_bytes)
    count_bytes(counter, "gradients_sent", n_rem * rb, n_rem * 4 * k)
    got = all_to_all(msg.reshape(-1), (wire_counts * (id_bytes + rb)).tolist(),
                      (recv_counts * (id_bytes + rb)).tolist()).reshape(-1, id_bytes + rb)
    got_ids = bytes_view(got[:, :id_bytes], wire_ids).reshape(-1).to(torch.int64)
    got_g = comp.decode(got[:, id_bytes:].contiguous(), k)

    # Sum in rank order (own rows at this rank's place): the same order on every run.
    chunks_ids, chunks_g = [], []
    offsets = torch.cumsum(recv_counts, 0) - recv_counts
    for r in range(world):
        if r == rank:
            chunks_ids.append(own_ids)
            chunks_g.append(own_g)
        else:
            a, n = int(offsets[r]), int(recv_counts[r])
            chunks_ids.append(got_ids[a: a + n])
            chunks_g.append(got_g[a: a + n])
    all_ids = torch.cat(chunks_ids)
    if all_ids.numel() and bool((partition.owner_of(all_ids) != rank).any()):
        raise RuntimeError(f"push_row_gradients: rank {rank} received gradients for rows it does not own")
    local = partition.local_of(all_ids)
    rows, inv = torch.unique(local, sorted=True, return_inverse=True)
    summed = torch.zeros((rows.shape[0], k), dtype=torch.float32).index_add_(0, inv, torch.cat(chunks_g))
    return rows.to(device), summed.to(device)


__all__ = ["fetch_rows", "push_row_gradients"]
