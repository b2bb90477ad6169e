"""Row exchange between workers over torch.distributed (gloo on CPU, nccl on GPU).

Why: each worker owns a shard of the embedding rows (see :mod:`.partition`) but its
batches touch rows of every shard. As in DGL's distributed sparse optimizers, only the
touched rows move: requests and gradients are grouped by owner, the counts go first
(``all_to_all_single`` of a small header), then one variable-size ``all_to_all_single``
carries the rows. Rows travel in quantized form: a GNAQ row is its packed 2-bit codes
plus its fp16 levels (:class:`QuantizedShard`), a gradient row is b-bit codes plus an
fp16 scale (:class:`~gnaq_dist.distributed.compression.RowCompressor`).

Every rank must call the same functions in the same order (they are collectives); a
rank with nothing to send still calls them, with empty tensors. The header each rank
sends also carries its row size and width, so a rank built with other settings makes
*every* rank raise instead of some of them hanging.

Messages (``n`` rows from one rank to one peer, ids int32 when the graph has fewer than
2^31 nodes, else int64):

* header: ``(count, row_bytes, width)`` int64 per peer (24 bytes), for every exchange;
* fetch request: ``n`` ids; fetch answer: ``n`` rows of ``server.row_bytes`` bytes, in
  request order (no ids);
* gradient push: ``n`` rows of ``id | payload`` (the compressor's row bytes).

Bookkeeping (owners, local rows) happens on the CPU; buffers move to the GPU only for
nccl collectives. Rows a rank sends to itself never touch the wire: fetches go through
the same serve/decode path (so a local row equals what a peer would get), gradients for
own rows stay fp32 and uncompressed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist

from gnaq_dist.allocator import huge_page_table
from gnaq_dist.distributed.compression import ErrorFeedback, RowCompressor, bytes_view
from gnaq_dist.distributed.partition import Partition
from gnaq_dist.distributed.shared_rows import SharedTables
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.quant.dequant_kernels import dequantize_rows
from gnaq_dist.quant.packing import PackedTable, packed_row_bytes, unpack_codes_torch

#: ``activations``: fp32 rows of propagated layers and their gradients (full-graph propagation
#: split by owner, :mod:`.halo`), kept apart from the embedding rows and their gradients.
WIRE_KINDS = ("rows_fetched", "gradients_sent", "activations", "allreduce", "control")
HEADER_FIELDS = 3  # count, row_bytes, width


# -- accounting ----------------------------------------------------------------------------
@dataclass
class WireCounter:
    """Bytes this rank sent to other ranks, by kind, with their fp32 equivalents.

    ``control`` is headers and row ids: the same whatever the row format, so it is kept
    apart from the payload kinds (their ratios compare like with like) and added back in
    :meth:`total`. Bytes a rank sends to itself are not counted: they never leave it.
    """

    sent: dict[str, int] = field(default_factory=lambda: {k: 0 for k in WIRE_KINDS})
    fp32: dict[str, int] = field(default_factory=lambda: {k: 0 for k in WIRE_KINDS})
    messages: dict[str, int] = field(default_factory=lambda: {k: 0 for k in WIRE_KINDS})

    def add(self, kind: str, nbytes: int, fp32_bytes: int | None = None) -> None:
        if kind not in WIRE_KINDS:
            raise GnaqInputError(f"wire kind must be one of {WIRE_KINDS}, got {kind!r}")
        self.sent[kind] += int(nbytes)
        self.fp32[kind] += int(nbytes if fp32_bytes is None else fp32_bytes)
        self.messages[kind] += 1

    def total(self) -> int:
        return sum(self.sent.values())

    def total_fp32(self) -> int:
        return sum(self.fp32.values())

    def ratio(self, kind: str | None = None) -> float:
        """fp32-equivalent bytes over bytes sent (for ``kind``, or all kinds); inf if nothing sent."""
        sent = self.total() if kind is None else self.sent[kind]
        fp32 = self.total_fp32() if kind is None else self.fp32[kind]
        return float("inf") if sent == 0 else fp32 / sent

    def summary(self) -> dict[str, float]:
        """Flat dict for a training log: ``<kind>_bytes``, ``<kind>_fp32_bytes``, totals, ratio."""
        out: dict[str, float] = {}
        for k in WIRE_KINDS:
            out[f"{k}_bytes"] = self.sent[k]
            out[f"{k}_fp32_bytes"] = self.fp32[k]
        out["total_bytes"] = self.total()
        out["total_fp32_bytes"] = self.total_fp32()
        out["total_ratio"] = self.ratio()
        return out

    def reset(self) -> None:
        for k in WIRE_KINDS:
            self.sent[k] = self.fp32[k] = self.messages[k] = 0

    def pop(self) -> dict[str, float]:
        """:meth:`summary`, then :meth:`reset` (call once per step)."""
        out = self.summary()
        self.reset()
        return out


def _count(counter: WireCounter | None, kind: str, nbytes: int, fp32_bytes: int | None = None) -> None:
    if counter is not None:
        counter.add(kind, nbytes, fp32_bytes)


# -- shards that serve rows ----------------------------------------------------------------
class RowServer(Protocol):
    """What :func:`fetch_rows` needs from a rank's shard: fixed-size rows in and out."""

    row_bytes: int  # wire bytes of one served row
    width: int  # values per decoded row
    fp32_row_bytes: int  # what the row would cost as fp32 (for the counter)

    def serve(self, local_rows: torch.Tensor) -> torch.Tensor: ...  # uint8 (n, row_bytes)

    def decode(self, payload: torch.Tensor) -> torch.Tensor: ...  # (n, width) float32


class QuantizedShard:
    """A rank's rows in PackedTable form: packed codes + per-row levels, served as is.

    Row on the wire: ``ceil(groups*dim*b/8)`` code bytes, then ``groups * 2^b`` levels in
    the table's level dtype (fp16: 2 bytes each). With a per-tensor codebook (levels of
    first axis 1) only codes travel; every rank holds the shared levels. 2-bit GNAQ,
    d = 64, fp16 levels: 16 + 8 = 24 bytes a row against 256 in fp32 (10.7x).
    """

    def __init__(self, codes: torch.Tensor, levels: torch.Tensor, bits: int, dim: int, groups: int = 1) -> None:
        self.bits, self.dim, self.groups = int(bits), int(dim), int(groups)
        self.width = self.groups * self.dim
        self.code_bytes = packed_row_bytes(self.width, self.bits)
        if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] != self.code_bytes:
            raise GnaqInputError(f"codes must be uint8 (n, {self.code_bytes}), got {codes.dtype} {tuple(codes.shape)}")
        k = 1 << self.bits
        if levels.dim() != 3 or levels.shape[1:] != (self.groups, k) or levels.shape[0] not in (1, codes.shape[0]):
            raise GnaqInputError(f"levels must be (n or 1, {self.groups}, {k}), got {tuple(levels.shape)}")
        if levels.dtype not in (torch.float16, torch.float32):
            raise GnaqInputError(f"levels must be float16 or float32, got {levels.dtype}")
        self.codes = codes.contiguous()
        self.levels = levels.contiguous()
        self.shared_levels = levels.shape[0] == 1 and codes.shape[0] != 1
        self.level_bytes = 0 if self.shared_levels else self.groups * k * levels.element_size()
        self.row_bytes = self.code_bytes + self.level_bytes
        self.fp32_row_bytes = 4 * self.dim  # the fp32 embedding a row stands for (PackedTable.fp32_bytes)

    @classmethod
    def from_packed(cls, table: PackedTable, rows: np.ndarray | None = None) -> QuantizedShard:
        """The shard of ``table`` holding ``rows`` (e.g. ``partition.owned_ids(rank)``), or all of it."""
        codes, levels = table.codes, table.levels
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            codes = codes[rows]
            levels = levels if levels.shape[0] == 1 else levels[rows]
        return cls(torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(np.ascontiguousarray(levels)),
                   table.bits, table.dim, table.groups)

    @property
    def num_rows(self) -> int:
        return int(self.codes.shape[0])

    def serve(self, local_rows: torch.Tensor) -> torch.Tensor:
        local_rows = local_rows.to(torch.int64)
        if local_rows.numel() and (int(local_rows.min()) < 0 or int(local_rows.max()) >= self.num_rows):
            raise GnaqInputError(f"local rows must lie in [0, {self.num_rows}), got "
                                 f"[{int(local_rows.min())}, {int(local_rows.max())}]")
        codes = self.codes[local_rows]
        if self.shared_levels:
            return codes
        lv = self.levels[local_rows].reshape(local_rows.shape[0], self.level_bytes // self.levels.element_size())
        lv = lv.view(torch.uint8)
        return torch.cat([codes, lv], dim=1)

    def split_payload(self, payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Wire rows -> (packed codes uint8 (n, code bytes), a view of ``payload``; levels float32
        (n, groups, 2^b), or (1, groups, 2^b) for a shared codebook)."""
        n = payload.shape[0]
        packed = payload[:, : self.code_bytes]
        if self.shared_levels:
            return packed, self.levels.to(torch.float32)
        levels = (bytes_view(payload[:, self.code_bytes:], self.levels.dtype)
                  .reshape(n, self.groups, 1 << self.bits).to(torch.float32))
        return packed, levels

    def decode_parts(self, payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Wire rows -> (codes uint8 (n, groups*dim), levels float32 (n, groups, 2^b)), unpacked."""
        packed, levels = self.split_payload(payload)
        codes = unpack_codes_torch(packed.contiguous(), self.bits, self.width)
        return codes, levels.expand(payload.shape[0], -1, -1)

    def decode(self, payload: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Wire rows -> dequantized (n, groups*dim) float32, as :meth:`PackedTable.dequantize`, in
        one pass over the packed bytes (:func:`~gnaq_dist.quant.dequant_kernels.dequantize_rows`);
        into ``out`` if given."""
        packed, levels = self.split_payload(payload)
        levels = levels.reshape(levels.shape[0], self.groups << self.bits)
        return dequantize_rows(packed, levels, self.bits, self.width, self.dim, out=out)


class DenseShard:
    """A rank's rows as a float32 table (the full-precision warm-up): 4*d bytes a row."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2:
            raise GnaqInputError(f"weight must be 2-D (n, d), got shape {tuple(weight.shape)}")
        self.weight = weight
        self.width = int(weight.shape[1])
        self.row_bytes = self.fp32_row_bytes = 4 * self.width

    def serve(self, local_rows: torch.Tensor) -> torch.Tensor:
        rows = self.weight.detach()[local_rows.to(torch.int64)].to(torch.float32).contiguous()
        return rows.view(torch.uint8).reshape(rows.shape[0], self.row_bytes)

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        return bytes_view(payload, torch.float32).reshape(payload.shape[0], self.width)


# -- collectives ---------------------------------------------------------------------------
def comm_device() -> torch.device:
    """Where collective buffers must live: the current CUDA device for nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _world() -> tuple[int, int]:
    if not dist.is_initialized():
        raise RuntimeError("the row exchange needs an initialised default process group")
    return dist.get_rank(), dist.get_world_size()


def _all_to_all(buf: torch.Tensor, send: Sequence[int], recv: Sequence[int]) -> torch.Tensor:
    """Variable-size all_to_all of a 1-D tensor (``send[r]`` elements to rank r), on the comm device."""
    dev = comm_device()
    out = torch.empty(int(sum(recv)), dtype=buf.dtype, device=dev)
    dist.all_to_all_single(out, buf.to(dev).contiguous(), [int(x) for x in recv], [int(x) for x in send])
    return out.cpu()


def _exchange_header(counts: torch.Tensor, row_bytes: int, width: int, what: str,
                     counter: WireCounter | None) -> torch.Tensor:
    """Send (count, row_bytes, width) to every peer; returns the counts received, after
    checking that every peer uses the same row format (every rank sees a mismatch)."""
    rank, world = _world()
    hdr = torch.empty((world, HEADER_FIELDS), dtype=torch.int64)
    hdr[:, 0] = counts
    hdr[:, 1] = row_bytes
    hdr[:, 2] = width
    got = _all_to_all(hdr.reshape(-1), [HEADER_FIELDS] * world, [HEADER_FIELDS] * world).reshape(world, HEADER_FIELDS)
    _count(counter, "control", (world - 1) * HEADER_FIELDS * 8)
    bad = ((got[:, 1] != row_bytes) | (got[:, 2] != width)).nonzero().reshape(-1).tolist()
    if bad:
        raise GnaqInputError(
            f"{what}: rank {rank} uses rows of {row_bytes} bytes / {width} values but rank(s) {bad} use "
            f"{got[bad, 1].tolist()} bytes / {got[bad, 2].tolist()} values"
        )
    return got[:, 0]


def _id_dtype(partition: Partition) -> torch.dtype:
    return torch.int32 if partition.num_nodes < 2**31 else torch.int64


def _check_ids(ids: torch.Tensor, partition: Partition, what: str) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise GnaqInputError(f"{what}: ids must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}")
    ids = ids.to(device="cpu", dtype=torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= partition.num_nodes):
        raise GnaqInputError(f"{what}: ids must lie in [0, {partition.num_nodes}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
    return ids


def _group_by_owner(ids: torch.Tensor, partition: Partition) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order of ``ids`` by owner, and the count per owner."""
    owner = partition.owner_of(ids)
    order = torch.sort(owner, stable=True).indices
    counts = torch.bincount(owner, minlength=partition.world_size)
    return order, counts


def fetch_rows(needed_ids: torch.Tensor, partition: Partition, server: RowServer, *,
               counter: WireCounter | None = None, decode: bool = True) -> torch.Tensor:
    """Rows of the global ``needed_ids`` (unique), from their owners, in the order asked.

    ``server`` is this rank's own shard (rows ``partition.owned_ids(rank)``); it answers
    the peers' requests and decodes the answers. Returns (n, server.width) float32, or
    with ``decode=False`` the uint8 (n, server.row_bytes) wire rows (e.g. for
    ``QuantizedShard.decode_parts``). A :class:`FixedExchange` used once. Collective:
    every rank calls it, possibly with no ids.
    """
    ids = _check_ids(needed_ids, partition, "fetch_rows")
    if ids.numel() > 1 and bool((torch.sort(ids).values.diff() == 0).any()):
        raise GnaqInputError("fetch_rows: needed_ids must be unique")
    device = torch.as_tensor(needed_ids).device
    plan = FixedExchange(ids, partition, counter=counter, row_bytes=int(server.row_bytes),
                         width=int(server.width), what="fetch_rows")
    rows = plan.pull_served(server, counter)
    return (server.decode(rows) if decode else rows).to(device)


def count_at_owners(ids: torch.Tensor, partition: Partition, n_own: int, *, counts: torch.Tensor | None = None,
                    counter: WireCounter | None = None) -> torch.Tensor:
    """How often each of this rank's ``n_own`` rows occurs in all ranks' ``ids`` (int64, collective).

    Why: a row's L2 weight in a step is its number of occurrences in the global batch, and
    a rank holding only its own users' positives sees only its share of them. Sends one
    ``(local row, count)`` pair per distinct id to its owner (as ``control`` bytes).
    ``counts`` given: ``ids`` are already distinct and sorted, each occurring ``counts`` times
    (``torch.unique(..., return_counts=True)`` of a caller that needs the distinct ids too).
    """
    ids = _check_ids(ids, partition, "count_at_owners")
    rank, world = _world()
    uniq, cnt = torch.unique(ids, return_counts=True) if counts is None else (ids, counts.to(torch.int64))
    order, counts = _group_by_owner(uniq, partition)
    pairs = torch.stack([partition.local_of(uniq[order]), cnt[order]], dim=1).reshape(-1)
    recv = _exchange_header(counts, 16, 2, "count_at_owners", counter)
    got = _all_to_all(pairs, (2 * counts).tolist(), (2 * recv).tolist()).reshape(-1, 2)
    _count(counter, "control", int(counts.sum() - counts[rank]) * 16)
    out = torch.zeros(int(n_own), dtype=torch.int64)
    if got.numel() and int(got[:, 0].max()) >= n_own:
        raise GnaqInputError(f"count_at_owners: a peer sent row {int(got[:, 0].max())} of {n_own}")
    return out.index_add_(0, got[:, 0], got[:, 1])


def _encode_gradients(comp: RowCompressor, error_feedback: ErrorFeedback | None, ids: torch.Tensor,
                      g: torch.Tensor) -> torch.Tensor:
    """Wire rows of gradient rows ``g`` (global ``ids``), with error feedback when compressing."""
    if error_feedback is not None and comp.bits is not None:
        p = error_feedback.compensate(ids, g).cpu()
        wire, carried = comp.encode(p)
        error_feedback.update(ids, p, carried)
        return wire
    return comp.encode(g)[0]


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
    rank, world = _world()
    if partition.world_size != world:
        raise GnaqInputError(f"partition is for {partition.world_size} ranks, the process group has {world}")
    ids = _check_ids(ids, partition, "push_row_gradients")
    if grads.dim() != 2 or grads.shape[0] != ids.shape[0]:
        raise GnaqInputError(f"push_row_gradients: grads must be ({ids.shape[0]}, k), got {tuple(grads.shape)}")
    device = grads.device
    k = int(grads.shape[1])
    comp = compressor if compressor is not None else RowCompressor(bits=None)
    if error_feedback is not None and error_feedback.dim != k:
        raise GnaqInputError(f"error feedback holds rows of {error_feedback.dim} values, gradients have {k}")

    uids, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    g = torch.zeros((uids.shape[0], k), dtype=torch.float32).index_add_(0, inverse, grads.detach().cpu().float())
    order, send_counts = _group_by_owner(uids, partition)
    uids, g = uids[order], g[order]
    starts = torch.cumsum(send_counts, 0) - send_counts
    mine = slice(int(starts[rank]), int(starts[rank] + send_counts[rank]))
    remote = torch.ones(uids.shape[0], dtype=torch.bool)
    remote[mine] = False
    own_ids, own_g = uids[mine], g[mine]
    rem_ids, rem_g = uids[remote], g[remote]
    wire_counts = send_counts.clone()
    wire_counts[rank] = 0

    id_dtype = _id_dtype(partition)
    id_bytes = torch.empty(0, dtype=id_dtype).element_size()
    rb = comp.row_bytes(k)
    recv_counts = _exchange_header(wire_counts, id_bytes + rb, k, "push_row_gradients", counter)

    wire = _encode_gradients(comp, error_feedback, rem_ids, rem_g)
    n_rem = rem_ids.shape[0]
    msg = torch.cat([rem_ids.to(id_dtype).view(torch.uint8).reshape(n_rem, id_bytes), wire.cpu()], dim=1)
    _count(counter, "control", n_rem * id_bytes)
    _count(counter, "gradients_sent", n_rem * rb, n_rem * 4 * k)
    got = _all_to_all(msg.reshape(-1), (wire_counts * (id_bytes + rb)).tolist(),
                      (recv_counts * (id_bytes + rb)).tolist()).reshape(-1, id_bytes + rb)
    got_ids = bytes_view(got[:, :id_bytes], id_dtype).reshape(-1).to(torch.int64)
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


class FixedExchange:
    """The same rows, from the same owners, at every call: the plan is made once.

    The header and the ids go once, when the plan is built (a collective; ``row_bytes``
    and ``width`` are checked against every peer's, as every exchange does). For a request
    that does not change between calls (a rank's halo, asked for at every layer of every
    step) the plan is kept: afterwards a pull is one ``all_to_all`` of rows
    (:meth:`pull_served`: wire rows of a server, :meth:`pull`: fp32 rows) and a push one
    ``all_to_all`` of gradient rows (:meth:`push_gradients`, compressed or fp32), summed
    into the owners' rows in rank order. Rows come back in the order of ``needed_ids``.

    With ``shared_memory_dir`` (a tmpfs such as /dev/shm) and every rank on one host, the
    float rows of :meth:`start_pull` and :meth:`start_push` do not go through the process
    group: each rank writes what it sends into a table its peers have mapped and reads its
    part of theirs (:class:`~gnaq_dist.distributed.shared_rows.SharedTables`). Rows arrive
    the same either way; a halo's plan (rows in owner order) also sums pushed gradients in
    the same order, bit for bit; a permuted plan may round them in another order.
    """

    def __init__(self, needed_ids: torch.Tensor, partition: Partition, *, counter: WireCounter | None = None,
                 row_bytes: int = 0, width: int = 0, what: str = "FixedExchange",
                 shared_memory_dir: str | None = None):
        rank, world = _world()
        if partition.world_size != world:
            raise GnaqInputError(f"partition is for {partition.world_size} ranks, the process group has {world}")
        ids = _check_ids(needed_ids, partition, what)
        order, recv_counts = _group_by_owner(ids, partition)  # what this rank receives, by owner
        send_counts = _exchange_header(recv_counts, row_bytes, width, what, counter)
        id_dtype = _id_dtype(partition)
        _count(counter, "control", int(ids.numel() - recv_counts[rank]) * torch.empty(0, dtype=id_dtype).element_size())
        asked = _all_to_all(ids[order].to(id_dtype), recv_counts.tolist(), send_counts.tolist()).to(torch.int64)
        if asked.numel() and bool((partition.owner_of(asked) != rank).any()):
            raise RuntimeError(f"{what}: rank {rank} was asked for rows it does not own")
        self.rank = rank
        self.order = order  # position in needed_ids of each received row
        # Ids already grouped by owner (a halo plan's are): rows arrive in place, no permutation.
        self.in_order = bool(torch.equal(order, torch.arange(order.shape[0], dtype=order.dtype)))
        self.recv_counts = [int(c) for c in recv_counts]
        self.send_counts = [int(c) for c in send_counts]
        self.send_rows = partition.local_of(asked)  # own rows to send, grouped by requester
        self.partition = partition
        self.needed = ids
        self.num_needed = int(ids.numel())
        self._rows_buffer: torch.Tensor | None = None
        self.shared_memory_dir = shared_memory_dir
        self._unshared = False  # the ranks found they cannot share memory (agreed; not asked again)
        self._served: SharedTables | None = None  # rows this rank serves (pulls), by requester
        self._needed: SharedTables | None = None  # gradients of the rows it needs (pushes), by owner
        self._peer_starts: list[tuple[int, int]] = []  # per peer: where my rows start in its two tables

    def _remote(self, counts: list[int]) -> int:
        return sum(counts) - counts[self.rank]

    def pull_served(self, server: RowServer, counter: WireCounter | None = None,
                    kind: str = "rows_fetched") -> torch.Tensor:
        """Wire rows ``needed_ids`` from the owners' ``server`` (uint8 (n, row_bytes), in that
        order), as :func:`fetch_rows` with ``decode=False`` (collective)."""
        rb = int(server.row_bytes)
        payload = server.serve(self.send_rows)
        if payload.dtype != torch.uint8 or tuple(payload.shape) != (self.send_rows.shape[0], rb):
            raise RuntimeError(f"server returned {payload.dtype} {tuple(payload.shape)}, expected uint8 "
                               f"({self.send_rows.shape[0]}, {rb})")
        sent = self._remote(self.send_counts)
        _count(counter, kind, sent * rb, sent * int(server.fp32_row_bytes))
        got = _all_to_all(payload.reshape(-1), [c * rb for c in self.send_counts],
                          [c * rb for c in self.recv_counts]).reshape(sum(self.recv_counts), rb)
        if self.in_order:
            return got
        out = torch.empty((self.num_needed, rb), dtype=torch.uint8)
        out[self.order] = got
        return out

    def pull(self, x_own: torch.Tensor, counter: WireCounter | None = None, kind: str = "activations") -> torch.Tensor:
        """Rows ``needed_ids`` of the ranks' ``x_own`` (n_own, d), as float32 (collective)."""
        server = DenseShard(x_own.detach().cpu())
        return server.decode(self.pull_served(server, counter, kind)).to(x_own.device)

    def push_gradients(self, grad: torch.Tensor, n_own: int, compressor: RowCompressor | None = None,
                       error_feedback: ErrorFeedback | None = None, counter: WireCounter | None = None,
                       kind: str = "gradients_sent", out: torch.Tensor | None = None,
                       accumulate: bool = False) -> torch.Tensor:
        """Gradients of the needed rows to their owners, compressed as :func:`push_row_gradients`
        compresses them (None: fp32; error feedback on the needed ids); returns each owner's
        (n_own, k) float32 sum of what came back (collective), in ``out`` if given (added to
        what ``out`` holds with ``accumulate``)."""
        k = int(grad.shape[1])
        comp = compressor if compressor is not None else RowCompressor(bits=None)
        if error_feedback is not None and error_feedback.dim != k:
            raise GnaqInputError(f"error feedback holds rows of {error_feedback.dim} values, gradients have {k}")
        wire = _encode_gradients(comp, error_feedback, self.needed, grad.detach().cpu().to(torch.float32))
        rb = comp.row_bytes(k)
        remote = self._remote(self.recv_counts)
        _count(counter, kind, remote * rb, remote * 4 * k)
        rows = wire if self.in_order else wire[self.order]
        back = _all_to_all(rows.reshape(-1), [c * rb for c in self.recv_counts],
                           [c * rb for c in self.send_counts]).reshape(sum(self.send_counts), rb)
        values = comp.decode(back.contiguous(), k)
        if out is not None and out.dtype == torch.float32 and tuple(out.shape) == (n_own, k):
            target = out.detach() if accumulate else out.detach().zero_()
            return target.index_add_(0, self.send_rows.to(out.device), values.to(out.device))
        if accumulate:
            raise GnaqInputError(f"push_gradients: accumulate needs an fp32 ({n_own}, {k}) out tensor")
        return torch.zeros((n_own, k), dtype=torch.float32).index_add_(0, self.send_rows, values).to(grad.device)

    # -- float rows into and out of caller-held buffers (the fused propagation's hot path) --
    def _served_rows(self, like: torch.Tensor) -> torch.Tensor:
        """The (rows this rank serves, d) buffer, kept between calls: the same rows move at every
        layer of every step (pulls send from it, pushes receive into it; never both at once)."""
        self._rows_buffer = kept_buffer(self._rows_buffer, int(self.send_rows.shape[0]), like)
        return self._rows_buffer

    def reserve(self, like: torch.Tensor) -> None:
        """Make and touch the served-rows buffer of ``like``'s width now (see ``HaloPlan.reserve``);
        with shared memory, this rank's tables and the parts of its peers' that it reads
        (collective)."""
        if self._share(like):
            assert self._served is not None and self._needed is not None
            for tables in (self._served, self._needed):
                tables.before_writing().zero_()
                for peer, t in enumerate(tables.tables):
                    if peer != self.rank:
                        t.sum()  # map the peers' pages here, not in the first step
        elif self._rows_buffer is None:
            self._served_rows(like).zero_()

    def release(self) -> None:
        self._rows_buffer = None
        for tables in (self._served, self._needed):
            if tables is not None:
                tables.close()
        self._served = self._needed = None

    # -- shared memory between the ranks of one host (see SharedTables) --
    def _share(self, like: torch.Tensor) -> bool:
        """Whether float rows of ``like``'s width and dtype move through shared tables; makes them
        at the first call (collective: every rank calls it at the same point, and all agree)."""
        if self.shared_memory_dir is None or self._unshared or comm_device().type != "cpu":
            return False
        width, dtype = int(like.shape[1]), like.dtype
        if self._served is not None:
            own = self._served.own
            if own.shape[1] == width and own.dtype == dtype:
                return True
            self.release()  # another width: tables anew (on every rank, which see the same width)
        what = f"halo-w{width}"
        served = SharedTables.create(len(self.send_rows), width, dtype, self.shared_memory_dir, what + "-served")
        needed = SharedTables.create(self.num_needed, width, dtype, self.shared_memory_dir, what + "-needed") \
            if served is not None else None
        if served is None or needed is None:
            self._unshared = True
            return False
        _, world = _world()
        mine = torch.tensor([self.send_counts, self.recv_counts], dtype=torch.int64)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        self._peer_starts = [(int(c[0, : self.rank].sum()), int(c[1, : self.rank].sum())) for c in every]
        self._served, self._needed = served, needed
        return True

    def push_buffer(self, like: torch.Tensor) -> torch.Tensor | None:
        """Where to compute the (n_needed, d) gradients that :meth:`start_push` sends, so that they
        are written once: this rank's shared table (free to write), or None without shared
        memory (collective, as :meth:`start_push`)."""
        if not self.in_order or not self._share(like):
            return None
        assert self._needed is not None
        return self._needed.before_writing()

    def _pull_shared(self, x_own: torch.Tensor, out: torch.Tensor, counter: WireCounter | None,
                     kind: str) -> Pending:
        served = self._served
        assert served is not None
        send = torch.index_select(x_own.detach(), 0, self.send_rows, out=served.before_writing())
        sent = self._remote(self.send_counts)
        _count(counter, kind, sent * send.shape[1] * send.element_size(), sent * 4 * send.shape[1])
        written = served.written()

        def finish() -> torch.Tensor:
            written.wait()
            start = 0
            for peer, n in enumerate(self.recv_counts):
                if n:
                    rows = served.tables[peer].narrow(0, self._peer_starts[peer][0], n)
                    if self.in_order:
                        out.narrow(0, start, n).copy_(rows)
                    else:
                        out[self.order[start: start + n]] = rows
                start += n
            served.read()
            return out

        return Pending(None, finish)

    def _push_shared(self, grad: torch.Tensor, counter: WireCounter | None, kind: str) -> Pending:
        needed = self._needed
        assert needed is not None
        box = needed.before_writing()
        if grad.data_ptr() != box.data_ptr() or grad.shape != box.shape:
            box.copy_(grad if self.in_order else grad[self.order])
        remote = self._remote(self.recv_counts)
        _count(counter, kind, remote * grad.shape[1] * grad.element_size(), remote * 4 * grad.shape[1])
        written = needed.written()

        def finish(into: torch.Tensor) -> torch.Tensor:
            written.wait()
            start = 0
            for peer, n in enumerate(self.send_counts):  # rank order, as the process group's path sums
                if n:
                    rows = needed.tables[peer].narrow(0, self._peer_starts[peer][1], n)
                    into.index_add_(0, self.send_rows.narrow(0, start, n), rows)
                start += n
            needed.read()
            return into

        return Pending(None, finish)

    def start_pull(self, x_own: torch.Tensor, out: torch.Tensor, counter: WireCounter | None = None,
                   kind: str = "activations") -> Pending:
        """Start moving rows ``needed_ids`` of the ranks' ``x_own`` (n_own, d) into ``out``
        (n_needed, d), uncompressed (collective); ``wait()`` returns ``out``. ``x_own`` is read
        before this returns, so the caller may compute on it while the rows travel."""
        if self._share(x_own):
            return self._pull_shared(x_own, out, counter, kind)
        if not self.in_order or out.device != comm_device() or not out.is_contiguous():
            out.copy_(self.pull(x_own, counter, kind))
            return Pending(None, lambda: out)
        send = torch.index_select(x_own.detach(), 0, self.send_rows, out=self._served_rows(x_own))
        sent = self._remote(self.send_counts)
        _count(counter, kind, sent * send.shape[1] * send.element_size(), sent * 4 * send.shape[1])
        work = dist.all_to_all_single(out, send, self.recv_counts, self.send_counts, async_op=True)
        return Pending(work, lambda: out)

    def start_push(self, grad: torch.Tensor, counter: WireCounter | None = None,
                   kind: str = "activations") -> Pending:
        """Start sending gradients ``grad`` (n_needed, d) of the needed rows, uncompressed, to
        their owners (collective); ``wait(into)`` adds what arrived into the owners' rows of
        ``into`` (n_own, d) in place and returns it. ``grad`` must stay unchanged until then."""
        if self._share(grad):
            return self._push_shared(grad, counter, kind)
        if not self.in_order or grad.device != comm_device() or not grad.is_contiguous():
            n_own = int(self.partition.counts()[self.rank])
            summed = self.push_gradients(grad, n_own, counter=counter, kind=kind)
            return Pending(None, lambda into: into.add_(summed.to(into.dtype)))
        back = self._served_rows(grad)
        remote = self._remote(self.recv_counts)
        _count(counter, kind, remote * grad.shape[1] * grad.element_size(), remote * 4 * grad.shape[1])
        work = dist.all_to_all_single(back, grad, self.send_counts, self.recv_counts, async_op=True)
        return Pending(work, lambda into: into.index_add_(0, self.send_rows, back))


def kept_buffer(buf: torch.Tensor | None, rows: int, like: torch.Tensor) -> torch.Tensor:
    """``buf`` if it is a (rows, d) tensor of ``like``'s width, dtype and device, else a new one.

    Why: the same activation-sized buffers serve every layer of every step, and a fresh
    tensor of 100+ MiB costs its page faults each time (docs/scale.md)."""
    shape = (int(rows), int(like.shape[1]))
    if buf is None or tuple(buf.shape) != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = huge_page_table(shape, like.dtype, like.device)  # read at random by the sparse products
    return buf


class Pending:
    """A collective under way (``async_op``); ``wait(...)`` completes it and returns its result."""

    def __init__(self, work: Any, finish: Callable[..., torch.Tensor]) -> None:
        self._work, self._finish = work, finish

    def wait(self, *args: Any) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._finish(*args)


@torch.no_grad()
def allreduce_dense(tensors: Sequence[torch.Tensor], *, counter: WireCounter | None = None) -> None:
    """Average ``tensors`` (e.g. dense parameters' gradients) over ranks, in place, in one all_reduce.

    Counted as a ring all-reduce: ``2 (W-1)/W`` times the buffer's bytes sent per rank.
    """
    _, world = _world()
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors]).to(comm_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    nbytes = int(round(2 * (world - 1) / world * flat.numel() * 4))
    _count(counter, "allreduce", nbytes, nbytes)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset: offset + n].reshape(t.shape).to(device=t.device, dtype=t.dtype))
        offset += n


__all__ = [
    "WIRE_KINDS",
    "DenseShard",
    "QuantizedShard",
    "RowServer",
    "WireCounter",
    "allreduce_dense",
    "comm_device",
    "count_at_owners",
    "fetch_rows",
    "push_row_gradients",
]
