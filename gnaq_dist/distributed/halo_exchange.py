"""The halo's exchange: the same rows from the same owners at every call, planned once.

Why: a rank's halo is asked for at every layer of every step, so the header and the ids go
once, when the plan (:class:`FixedExchange`) is built; afterwards a pull or a push is one
``all_to_all`` of rows, or, between ranks on one host, a copy through shared memory
(:mod:`.shared_rows`). The one-off fetch (:func:`.row_exchange.fetch_rows`) is a plan used once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gnaq_dist.allocator import huge_page_table
from gnaq_dist.distributed.comm import (
    Pending,
    all_to_all,
    check_ids,
    comm_device,
    exchange_header,
    group_by_owner,
    id_dtype,
    rank_and_size,
)
from gnaq_dist.distributed.compression import PIECE_ROWS, ErrorFeedback, RowCompressor, encode_with_feedback
from gnaq_dist.distributed.partition import Partition
from gnaq_dist.distributed.rows import DenseShard, RowServer
from gnaq_dist.distributed.shared_rows import SharedTables
from gnaq_dist.distributed.wire import WireCounter, count_bytes
from gnaq_dist.errors import GnaqInputError


class FixedExchange:
    """The same rows, from the same owners, at every call: the plan is made once.

    The header and the ids go once, when the plan is built (a collective; ``row_bytes``
    and ``width`` are checked against every peer's, as every exchange does). For a request
    that does not change between calls (a rank's halo, asked for at every layer of every
    step) the plan is kept: afterwards a pull is one ``all_to_all`` of rows
    (:meth:`pull_wire_rows`: wire rows of a server, :meth:`pull_rows`: fp32 rows) and a push
    one ``all_to_all`` of gradient rows (:meth:`push_gradients`, compressed or fp32), summed
    into the owners' rows in rank order. Rows come back in the order of ``needed_ids``.

    With ``shared_memory_dir`` (a tmpfs such as /dev/shm) and every rank on one host, the
    float rows of :meth:`start_pull_rows` and :meth:`start_push_gradients` do not go through the
    process group: each rank writes what it sends into a table its peers have mapped and reads
    its part of theirs (:class:`~gnaq_dist.distributed.shared_rows.SharedTables`). Rows arrive
    the same either way; a halo's plan (rows in owner order) also sums pushed gradients in
    the same order, bit for bit; a permuted plan may round them in another order.
    """

    def __init__(self, needed_ids: torch.Tensor, partition: Partition, *, counter: WireCounter | None = None,
                 row_bytes: int = 0, width: int = 0, what: str = "FixedExchange",
                 shared_memory_dir: str | None = None):
        rank, world = rank_and_size()
        if partition.world_size != world:
            raise GnaqInputError(f"partition is for {partition.world_size} ranks, the process group has {world}")
        ids = check_ids(needed_ids, partition, what)
        order, recv_counts = group_by_owner(ids, partition)  # what this rank receives, by owner
        send_counts = exchange_header(recv_counts, row_bytes, width, what, counter)
        wire_ids = id_dtype(partition)
        count_bytes(counter, "control",
                    int(ids.numel() - recv_counts[rank]) * torch.empty(0, dtype=wire_ids).element_size())
        asked = all_to_all(ids[order].to(wire_ids), recv_counts.tolist(), send_counts.tolist()).to(torch.int64)
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

    def pull_wire_rows(self, server: RowServer, counter: WireCounter | None = None,
                    kind: str = "rows_fetched") -> torch.Tensor:
        """Wire rows ``needed_ids`` from the owners' ``server`` (uint8 (n, row_bytes), in that
        order), as :func:`.row_exchange.fetch_rows` with ``decode=False`` (collective)."""
        rb = int(server.row_bytes)
        payload = server.serve(self.send_rows)
        if payload.dtype != torch.uint8 or tuple(payload.shape) != (self.send_rows.shape[0], rb):
            raise RuntimeError(f"server returned {payload.dtype} {tuple(payload.shape)}, expected uint8 "
                               f"({self.send_rows.shape[0]}, {rb})")
        sent = self._remote(self.send_counts)
        count_bytes(counter, kind, sent * rb, sent * int(server.fp32_row_bytes))
        got = all_to_all(payload.reshape(-1), [c * rb for c in self.send_counts],
                          [c * rb for c in self.recv_counts]).reshape(sum(self.recv_counts), rb)
        if self.in_order:
            return got
        out = torch.empty((self.num_needed, rb), dtype=torch.uint8)
        out[self.order] = got
        return out

    def pull_rows(self, x_own: torch.Tensor, counter: WireCounter | None = None,
                  kind: str = "activations") -> torch.Tensor:
        """Rows ``needed_ids`` of the ranks' ``x_own`` (n_own, d), as float32 (collective)."""
        server = DenseShard(x_own.detach().cpu())
        return server.decode(self.pull_wire_rows(server, counter, kind)).to(x_own.device)

    def push_gradients(self, grad: torch.Tensor, n_own: int, compressor: RowCompressor | None = None,
                       error_feedback: ErrorFeedback | None = None, counter: WireCounter | None = None,
                       kind: str = "gradients_sent", out: torch.Tensor | None = None,
                       accumulate: bool = False, scratch: bool = False) -> torch.Tensor:
        """Gradients of the needed rows to their owners, compressed as :func:`.row_exchange.push_row_gradients`
        compresses them (None: fp32; error feedback on the needed ids); returns each owner's
        (n_own, k) float32 sum of what came back (collective), in ``out`` if given (added to
        what ``out`` holds with ``accumulate``). ``scratch``: ``grad`` may be overwritten."""
        k = int(grad.shape[1])
        comp = compressor if compressor is not None else RowCompressor(bits=None)
        if error_feedback is not None and error_feedback.dim != k:
            raise GnaqInputError(f"error feedback holds rows of {error_feedback.dim} values, gradients have {k}")
        g = grad.detach().cpu()
        wire = encode_with_feedback(comp, error_feedback, self.needed, g.to(torch.float32),
                                    scratch=scratch or g.dtype != torch.float32)
        rb = comp.row_bytes(k)
        remote = self._remote(self.recv_counts)
        count_bytes(counter, kind, remote * rb, remote * 4 * k)
        rows = wire if self.in_order else wire[self.order]
        back = all_to_all(rows.reshape(-1), [c * rb for c in self.recv_counts],
                           [c * rb for c in self.send_counts]).reshape(sum(self.send_counts), rb)
        if out is not None and out.dtype == torch.float32 and tuple(out.shape) == (n_own, k):
            target = out.detach() if accumulate else out.detach().zero_()
        elif accumulate:
            raise GnaqInputError(f"push_gradients: accumulate needs an fp32 ({n_own}, {k}) out tensor")
        else:
            target = torch.zeros((n_own, k), dtype=torch.float32)
        # Decoded a piece at a time: the float rows of a halo's worth of gradients never exist at once.
        rows_to = self.send_rows.to(target.device)
        for a in range(0, back.shape[0], PIECE_ROWS):
            b = min(a + PIECE_ROWS, back.shape[0])
            target.index_add_(0, rows_to[a:b], comp.decode(back[a:b].contiguous(), k).to(target.device))
        return target if out is not None else target.to(grad.device)

    # -- float rows into and out of caller-held buffers (the fused propagation's hot path) --
    def _served_rows(self, like: torch.Tensor) -> torch.Tensor:
        """The (rows this rank serves, d) buffer, kept between calls: the same rows move at every
        layer of every step (pulls send from it, pushes receive into it; never both at once)."""
        self._rows_buffer = reuse_or_allocate(self._rows_buffer, int(self.send_rows.shape[0]), like)
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
        _, world = rank_and_size()
        mine = torch.tensor([self.send_counts, self.recv_counts], dtype=torch.int64)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        self._peer_starts = [(int(c[0, : self.rank].sum()), int(c[1, : self.rank].sum())) for c in every]
        self._served, self._needed = served, needed
        return True

    def push_buffer(self, like: torch.Tensor) -> torch.Tensor | None:
        """Where to compute the (n_needed, d) gradients that :meth:`start_push_gradients` sends, so
        that they are written once: this rank's shared table (free to write), or None without shared
        memory (collective, as :meth:`start_push_gradients`)."""
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
        count_bytes(counter, kind, sent * send.shape[1] * send.element_size(), sent * 4 * send.shape[1])
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
        count_bytes(counter, kind, remote * grad.shape[1] * grad.element_size(), remote * 4 * grad.shape[1])
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

    def start_pull_rows(self, x_own: torch.Tensor, out: torch.Tensor, counter: WireCounter | None = None,
                   kind: str = "activations") -> Pending:
        """Start moving rows ``needed_ids`` of the ranks' ``x_own`` (n_own, d) into ``out``
        (n_needed, d), uncompressed (collective); ``wait()`` returns ``out``. ``x_own`` is read
        before this returns, so the caller may compute on it while the rows travel."""
        if self._share(x_own):
            return self._pull_shared(x_own, out, counter, kind)
        if not self.in_order or out.device != comm_device() or not out.is_contiguous():
            out.copy_(self.pull_rows(x_own, counter, kind))
            return Pending(None, lambda: out)
        send = torch.index_select(x_own.detach(), 0, self.send_rows, out=self._served_rows(x_own))
        sent = self._remote(self.send_counts)
        count_bytes(counter, kind, sent * send.shape[1] * send.element_size(), sent * 4 * send.shape[1])
        work = dist.all_to_all_single(out, send, self.recv_counts, self.send_counts, async_op=True)
        return Pending(work, lambda: out)

    def start_push_gradients(self, grad: torch.Tensor, counter: WireCounter | None = None,
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
        count_bytes(counter, kind, remote * grad.shape[1] * grad.element_size(), remote * 4 * grad.shape[1])
        work = dist.all_to_all_single(back, grad, self.send_counts, self.recv_counts, async_op=True)
        return Pending(work, lambda into: into.index_add_(0, self.send_rows, back))


def reuse_or_allocate(buf: torch.Tensor | None, rows: int, like: torch.Tensor) -> torch.Tensor:
    """``buf`` if it is a (rows, d) tensor of ``like``'s width, dtype and device, else a new one.

    Why: the same activation-sized buffers serve every layer of every step, and a fresh
    one costs its page faults each time (docs/notes/distributed-history.md)."""
    shape = (int(rows), int(like.shape[1]))
    if buf is None or tuple(buf.shape) != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = huge_page_table(shape, like.dtype, like.device)  # read at random by the sparse products
    return buf


__all__ = ["FixedExchange", "reuse_or_allocate"]
