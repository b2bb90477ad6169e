"""The process group's collectives that everything above builds on (gloo on CPU, nccl on GPU).

Every rank must call the same collectives in the same order; a rank with nothing to send
still calls them, with empty tensors. So the helpers here also make a failure collective:
the header of every exchange carries each rank's row size and width (a rank built with
other settings makes *every* rank raise), and :func:`run_on_rank_then_agree` turns one
rank's exception into an error on all ranks instead of the others hanging in the next
collective. Bookkeeping stays on the CPU; buffers move to the GPU only for nccl.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from gnaq_dist.distributed.partition import PARTITION_METHODS, Partition
from gnaq_dist.distributed.wire import WireCounter, count_bytes
from gnaq_dist.errors import GnaqInputError

_HEADER_FIELDS = 3  # count, row_bytes, width


def comm_device() -> torch.device:
    """Where collective buffers must live: the current CUDA device for nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_and_size() -> tuple[int, int]:
    """This rank and the world size of the default process group (which must exist)."""
    if not dist.is_initialized():
        raise RuntimeError("the row exchange needs an initialised default process group")
    return dist.get_rank(), dist.get_world_size()


def all_to_all(buf: torch.Tensor, send: Sequence[int], recv: Sequence[int]) -> torch.Tensor:
    """Variable-size all_to_all of a 1-D tensor (``send[r]`` elements to rank r), on the comm device."""
    dev = comm_device()
    out = torch.empty(int(sum(recv)), dtype=buf.dtype, device=dev)
    dist.all_to_all_single(out, buf.to(dev).contiguous(), [int(x) for x in recv], [int(x) for x in send])
    return out.cpu()


def exchange_header(counts: torch.Tensor, row_bytes: int, width: int, what: str,
                    counter: WireCounter | None) -> torch.Tensor:
    """Send (count, row_bytes, width) to every peer; returns the counts received, after
    checking that every peer uses the same row format (every rank sees a mismatch)."""
    rank, world = rank_and_size()
    hdr = torch.empty((world, _HEADER_FIELDS), dtype=torch.int64)
    hdr[:, 0] = counts
    hdr[:, 1] = row_bytes
    hdr[:, 2] = width
    fields = [_HEADER_FIELDS] * world
    got = all_to_all(hdr.reshape(-1), fields, fields).reshape(world, _HEADER_FIELDS)
    count_bytes(counter, "control", (world - 1) * _HEADER_FIELDS * 8)
    bad = ((got[:, 1] != row_bytes) | (got[:, 2] != width)).nonzero().reshape(-1).tolist()
    if bad:
        raise GnaqInputError(
            f"{what}: rank {rank} uses rows of {row_bytes} bytes / {width} values but rank(s) {bad} use "
            f"{got[bad, 1].tolist()} bytes / {got[bad, 2].tolist()} values"
        )
    return got[:, 0]


class Pending:
    """A collective under way (``async_op``); ``wait(...)`` completes it and returns its result."""

    def __init__(self, work: Any, finish: Callable[..., torch.Tensor]) -> None:
        self._work, self._finish = work, finish

    def wait(self, *args: Any) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._finish(*args)


# -- global ids, grouped by their owners ------------------------------------------------------
def id_dtype(partition: Partition) -> torch.dtype:
    """Node ids on the wire: int32 when the graph has fewer than 2^31 nodes, else int64."""
    return torch.int32 if partition.num_nodes < 2**31 else torch.int64


def check_ids(ids: torch.Tensor, partition: Partition, what: str) -> torch.Tensor:
    """``ids`` as a CPU int64 tensor of global node ids, or a :class:`GnaqInputError` naming ``what``."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise GnaqInputError(f"{what}: ids must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}")
    ids = ids.to(device="cpu", dtype=torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= partition.num_nodes):
        raise GnaqInputError(f"{what}: ids must lie in [0, {partition.num_nodes}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
    return ids


def group_by_owner(ids: torch.Tensor, partition: Partition) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order of ``ids`` by owner, and the count per owner."""
    owner = partition.owner_of(ids)
    order = torch.sort(owner, stable=True).indices
    counts = torch.bincount(owner, minlength=partition.world_size)
    return order, counts


# -- reductions and broadcasts ------------------------------------------------------------------
@torch.no_grad()
def allreduce_dense(tensors: Sequence[torch.Tensor], *, counter: WireCounter | None = None) -> None:
    """Average ``tensors`` (e.g. dense parameters' gradients) over ranks, in place, in one all_reduce.

    Counted as a ring all-reduce: ``2 (W-1)/W`` times the buffer's bytes sent per rank.
    """
    _, world = rank_and_size()
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors]).to(comm_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    _count_allreduce(counter, flat, world)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset: offset + n].reshape(t.shape).to(device=t.device, dtype=t.dtype))
        offset += n


def allreduce_sum(t: torch.Tensor, counter: WireCounter | None = None) -> torch.Tensor:
    """Sum a CPU tensor over ranks (on the comm device, so nccl works too); with ``counter``,
    its bytes are counted as :func:`allreduce_dense` counts its own."""
    buf = t.to(comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    _count_allreduce(counter, buf, rank_and_size()[1])
    return buf.cpu()


def _count_allreduce(counter: WireCounter | None, buf: torch.Tensor, world: int) -> None:
    """A ring all-reduce sends ``2 (W-1)/W`` times the buffer's bytes per rank."""
    if counter is not None:
        nbytes = int(round(2 * (world - 1) / world * buf.numel() * buf.element_size()))
        count_bytes(counter, "allreduce", nbytes, nbytes)


def broadcast_partition(partition: Partition | None, src: int = 0) -> Partition:
    """Every rank gets ``src``'s partition (needed for METIS, which is not repeatable).

    ``partition`` may be None on ranks other than ``src``. Uses the default process group.
    """
    dev = comm_device()
    rank = dist.get_rank()
    header = torch.zeros(4, dtype=torch.int64, device=dev)
    if rank == src:
        if partition is None:
            raise GnaqInputError(f"rank {src} must pass the partition it broadcasts")
        header = torch.tensor([partition.world_size, partition.n_users, partition.n_items,
                               PARTITION_METHODS.index(partition.method)], dtype=torch.int64, device=dev)
    dist.broadcast(header, src)
    world, n_users, n_items, m = (int(v) for v in header.cpu())
    owner = torch.empty(n_users + n_items, dtype=torch.int32, device=dev)
    if rank == src:
        owner.copy_(torch.from_numpy(partition.owner))
    dist.broadcast(owner, src)
    if rank == src:
        return partition
    return Partition.from_owner(owner.cpu().numpy(), world, n_users, n_items, method=PARTITION_METHODS[m])


# -- one rank's failure, every rank's error -------------------------------------------------------
def _raise_if_any_rank_failed(ok: bool, what: str) -> None:
    """Raise on every rank if some rank failed ``what`` (the failed rank raises its own error first)."""
    flag = allreduce_sum(torch.tensor([0 if ok else 1], dtype=torch.int64))
    if ok and int(flag) > 0:
        raise RuntimeError(f"{what} failed on {int(flag)} other rank(s); see their error")


def run_on_rank_then_agree(fn: Callable[[], Any] | None, what: str) -> Any:
    """``fn()`` on this rank (None: nothing here), then :func:`_raise_if_any_rank_failed`: a rank
    that fails makes every rank raise instead of the others hanging in the next collective."""
    value, error = None, None
    try:
        if fn is not None:
            value = fn()
    except BaseException as exc:  # noqa: BLE001 - re-raised below on this rank
        error = exc
    _raise_if_any_rank_failed(error is None, what)
    if error is not None:
        raise error
    return value


__all__ = [
    "Pending",
    "all_to_all",
    "allreduce_dense",
    "allreduce_sum",
    "broadcast_partition",
    "check_ids",
    "comm_device",
    "exchange_header",
    "group_by_owner",
    "id_dtype",
    "rank_and_size",
    "run_on_rank_then_agree",
]
