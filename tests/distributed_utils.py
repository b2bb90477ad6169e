"""Run a scenario on several real ranks of a gloo process group (TorchRec-style tests).

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` fresh processes; each sets
one torch thread, joins a gloo group over TCP on 127.0.0.1, runs
``fn(rank, world_size, *args)`` and sends back its return value (plain-pickled). The
parent returns the values in rank order. If a rank raises, the others are terminated
and the parent raises :class:`RankError` with that rank's traceback at once (no
waiting for the group's own timeout); if the ranks run past ``timeout`` seconds, they
are terminated and :class:`TimeoutError` is raised.

``remote_rows(x_own, ids, partition, ...)``: a rank's differentiable read of rows of an
activation split by owner (a test's loss over rows of every rank).

``edge_cut_fraction(partition, graph)``: the share of the train edges whose ends have
different owners.

``fn`` must be a module-level function of an importable module (spawn pickles it by
name); tests/ is on ``sys.path`` under pytest, and spawn passes ``sys.path`` on.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable


class RankError(RuntimeError):
    """A rank raised inside the scenario; the message holds its traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(fn: Callable, rank: int, world_size: int, port: int, pg_timeout_s: float, args: tuple,
           results: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        value = fn(rank, world_size, *args)
        results.put((rank, "ok", pickle.dumps(value)))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 60.0, pg_timeout_s: float = 30.0) -> list:
    """``[fn(0, W, *args), ..., fn(W-1, W, *args)]``, each run in its own gloo rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, pg_timeout_s, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(values))} did not finish "
                                   f"within {timeout:.0f} s")
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in values and p.exitcode not in (None, 0)]
                if dead:
                    raise RankError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}") from None
                continue
            if status == "error":
                raise RankError(f"rank {rank} raised:\n{payload}")
            values[rank] = pickle.loads(payload)
        for p in procs:
            p.join(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [values[r] for r in range(world_size)]


def remote_rows(x_own: Any, ids: Any, partition: Any, counter: Any = None, grad_out: Any = None) -> Any:
    """Differentiable rows ``ids`` (unique global ids) of an activation split by owner, through a
    :class:`~gnaq_dist.distributed.halo_exchange.FixedExchange` used once (collective): forward
    pulls them from their owners, backward sends their gradients back. ``grad_out`` (like
    ``x_own``) receives ``x_own``'s gradient in place of a new tensor."""
    from gnaq_dist.distributed.halo import _OwnerRows
    from gnaq_dist.distributed.halo_exchange import FixedExchange

    return _OwnerRows.apply(x_own, FixedExchange(ids, partition, counter=counter), counter, grad_out)


def edge_cut_fraction(partition: Any, graph: Any) -> float:
    """Share of the train edges whose user and item have different owners (rows that must travel)."""
    assert graph.n_nodes == partition.num_nodes, (graph.n_nodes, partition.num_nodes)
    if graph.src.numel() == 0:
        return 0.0
    cut = partition.owner[graph.src.numpy()] != partition.owner[graph.dst.numpy()]
    return float(cut.mean())
