"""Row tables that ranks on one host read from each other's memory (a tmpfs such as /dev/shm).

Why: between processes on one machine, gloo moves an ``all_to_all`` through TCP over the
loopback device, which costs several times the CPU of a memory copy of the same rows
(docs/notes/distributed-history.md; benchmarks/bench_halo_exchange.py); on two cores that
CPU is taken from the sparse products. So when every rank can map every other rank's
files, each rank writes the rows it sends into its own table, a one-element ``all_reduce``
says that every table is written, and each rank reads its part of its peers' tables in
place; a second one says they have been read, before a table is written again. Only those
two small messages go through the process group.

Whether the ranks share memory is agreed once per set of tables (:meth:`SharedTables.create`,
a collective): each rank creates its file with ``posix_fallocate`` (so a tmpfs too small
fails there with ENOSPC, not later with SIGBUS on a page), every rank maps every file, and
the tables are used only if all of them succeeded and all ranks run under one kernel
(the same ``boot_id``). Otherwise every rank gets ``None`` and the caller keeps the process
group's transport. The files are unlinked as soon as every rank has mapped them: nothing
is left behind, even after a crash, and the memory is freed with the last mapping.
Resident-set figures count a shared page in every process that touched it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

#: Where the training loop puts them by default (``distributed.shared_memory_dir``).
DEFAULT_DIR = "/dev/shm"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _map(path: str, rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    if rows * width == 0:
        return torch.empty((rows, width), dtype=dtype)
    return torch.from_file(path, shared=True, size=rows * width, dtype=dtype).view(rows, width)


def _true_on_every_rank(ok: bool) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@dataclass(eq=False)
class SharedTables:
    """One ``(rows_r, width)`` table per rank ``r``, every one mapped by every rank.

    Rank ``r`` writes only ``tables[r]`` (:attr:`own`); the others only read it, between
    :meth:`written` and :meth:`read` (the handshake is the caller's; see
    :class:`~gnaq_dist.distributed.halo_exchange.FixedExchange`)."""

    tables: list[torch.Tensor]
    rank: int
    _read: Any = field(default=None, repr=False)  # the pending "all ranks have read" all_reduce

    @property
    def own(self) -> torch.Tensor:
        return self.tables[self.rank]

    @classmethod
    def create(cls, rows: int, width: int, dtype: torch.dtype, directory: str | None,
               what: str = "rows") -> SharedTables | None:
        """This rank's table of ``rows`` rows and its peers' (collective; ``rows`` may differ
        by rank), or ``None`` on every rank when they cannot share ``directory``'s memory
        (``None``: not asked; other hosts; no such directory; not enough room; the nccl
        backend, whose buffers live on the GPU)."""
        if not dist.is_initialized():
            raise RuntimeError("shared tables need an initialised default process group")
        rank, world = dist.get_rank(), dist.get_world_size()
        if directory is None or world == 1 or dist.get_backend() != "gloo":
            return None  # the same on every rank: no collective skipped by some of them
        nbytes = int(rows) * int(width) * torch.empty(0, dtype=dtype).element_size()
        path, error = None, None
        try:
            fd, path = tempfile.mkstemp(prefix=f"gnaq-{what}-r{rank}-", dir=directory)
            try:
                if nbytes:
                    os.posix_fallocate(fd, 0, nbytes)  # ENOSPC now rather than SIGBUS on a page later
            finally:
                os.close(fd)
        except OSError as e:
            error = f"rank {rank}: {directory}: {e}"
        infos: list[Any] = [None] * world
        dist.all_gather_object(infos, (path, int(rows), _boot_id(), error))
        tables: list[torch.Tensor] = []
        if all(info[0] is not None for info in infos):
            if len({info[2] for info in infos}) != 1 or infos[0][2] is None:
                error = "the ranks do not run under one kernel"
            else:
                try:
                    tables = [_map(p, r, width, dtype) for p, r, _, _ in infos]
                except (OSError, RuntimeError) as e:
                    error = f"rank {rank} cannot map its peers' tables: {e}"
        ok = _true_on_every_rank(error is None and len(tables) == world)  # every rank has mapped every file
        if path is not None:
            os.unlink(path)
        if not ok:
            reason = next((info[3] for info in infos if info[3]), error or "a peer could not map the tables")
            # Ranks on several hosts is the normal case of a cluster; one host that cannot share
            # (no such directory, a tmpfs too small: Docker's /dev/shm is 64 MiB) costs speed.
            one_host = len({info[2] for info in infos}) == 1 and infos[0][2] is not None
            log.log(logging.WARNING if one_host and rank == 0 else logging.INFO,
                    "%s: rows move through the process group, not shared memory (%s)%s", what, reason,
                    "; set distributed.shared_memory_dir to a tmpfs with room, e.g. a larger /dev/shm"
                    if one_host else "")
            return None
        return cls(tables, rank)

    def written(self) -> Any:
        """After writing :attr:`own`: start the all_reduce that tells every rank all tables are
        written; ``wait()`` it before reading a peer's (the work keeps its tensor)."""
        return dist.all_reduce(torch.zeros(1), async_op=True)

    def read(self) -> None:
        """After reading the peers' tables: start the all_reduce that lets their owners write
        them again (:meth:`before_writing` waits for it)."""
        self._read = dist.all_reduce(torch.zeros(1), async_op=True)

    def before_writing(self) -> torch.Tensor:
        """:attr:`own`, once every rank has finished reading it (the last :meth:`read`)."""
        if self._read is not None:
            self._read.wait()
            self._read = None
        return self.own

    def close(self) -> None:
        """Finish the handshake and drop the mappings (the memory goes with the last rank's)."""
        self.before_writing()
        self.tables = []


__all__ = ["DEFAULT_DIR", "SharedTables"]
