"""Rows through shared memory between ranks of one host (gnaq_dist.distributed.shared_rows) on
real gloo ranks: the same rows and sums as through the process group, in any order and for
any number of peers, and the process group's path wherever the ranks cannot share."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from distributed_utils import run_ranks
from gnaq_dist.distributed.partition import Partition, hash_owner

N_USERS, N_ITEMS, DIM = 50, 40, 6
HAS_SHM = os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
needs_shm = pytest.mark.skipif(not HAS_SHM, reason="this machine has no writable /dev/shm")


def _partition(world: int) -> Partition:
    return Partition.from_owner(hash_owner(N_USERS, N_ITEMS, world, seed=0), world, N_USERS, N_ITEMS)


def _needed(rank: int, world: int, grouped: bool) -> torch.Tensor:
    """A mix of own and remote ids; shuffled (rows placed by a permutation) or grouped by owner
    as a halo's are (rows placed in order). Rank 1 of 3 asks for nothing."""
    part = _partition(world)
    if world == 3 and rank == 1:
        return torch.empty(0, dtype=torch.int64)
    ids = torch.from_numpy(np.random.default_rng(7 + rank).permutation(part.num_nodes)[: 30 + 5 * rank])
    if grouped:
        ids = ids[torch.sort(part.owner_of(ids) * part.num_nodes + ids).indices]
    return ids


def scenario_exchange(rank: int, world: int, directory: str | None, grouped: bool) -> dict:
    """Two pulls and two pushes (the handshake reused) through a plan with ``directory``."""
    from gnaq_dist.distributed.halo_exchange import FixedExchange
    from gnaq_dist.distributed.wire import WireCounter

    part = _partition(world)
    n_own = int(part.counts()[rank])
    ids = _needed(rank, world, grouped)
    counter = WireCounter()
    plan = FixedExchange(ids, part, shared_memory_dir=directory)
    x_all = torch.arange(part.num_nodes * DIM, dtype=torch.float32).reshape(-1, DIM)
    x_own = x_all[torch.from_numpy(part.owned_ids(rank))].contiguous()
    out = {"rank": rank, "ids": ids.numpy(), "pulled": [], "pushed": []}
    plan.reserve(x_own)
    for call in range(2):
        rows = torch.full((ids.shape[0], DIM), float("nan"))
        out["pulled"].append(plan.start_pull_rows(x_own * (call + 1), rows, counter).wait().numpy().copy())
        grad = torch.from_numpy(np.random.default_rng(call * 10 + rank).normal(size=(ids.shape[0], DIM))).float()
        box = plan.push_buffer(grad)  # the shared table to write into, where there is one
        if box is not None:
            grad = box.copy_(grad)
        into = torch.ones((n_own, DIM))
        out["pushed"].append(plan.start_push_gradients(grad, counter).wait(into).numpy().copy())
    out["shared"] = plan._served is not None
    out["push_buffer"] = box is not None
    out["activations"] = counter.sent["activations"]
    plan.release()
    out["released"] = plan._served is None and plan._needed is None
    return out


def _reference(world: int, grouped: bool) -> list[dict]:
    """What each rank must see: the needed rows of x, and for each own row 1 + the sum of the
    gradients every rank sent for it, summed in rank order."""
    part = _partition(world)
    x_all = np.arange(part.num_nodes * DIM, dtype=np.float32).reshape(-1, DIM)
    refs = []
    for rank in range(world):
        pulled, pushed = [], []
        for call in range(2):
            pulled.append(x_all[_needed(rank, world, grouped).numpy()] * (call + 1))
            acc = np.ones((part.num_nodes, DIM), np.float32)
            for r in range(world):
                ids = _needed(r, world, grouped).numpy()
                g = np.random.default_rng(call * 10 + r).normal(size=(ids.shape[0], DIM)).astype(np.float32)
                np.add.at(acc, ids, g)
            pushed.append(acc[part.owned_ids(rank)])
        refs.append({"pulled": pulled, "pushed": pushed})
    return refs


@needs_shm
@pytest.mark.parametrize("world,grouped", [(2, True), pytest.param(3, False, marks=pytest.mark.slow),
                                          pytest.param(3, True, marks=pytest.mark.slow)])
def test_shared_tables_move_the_rows_the_process_group_moves(world, grouped):
    shared = run_ranks(scenario_exchange, world, "/dev/shm", grouped, timeout=120)
    plain = run_ranks(scenario_exchange, world, None, grouped, timeout=120)
    for s, p, ref in zip(shared, plain, _reference(world, grouped)):
        assert s["shared"] and not p["shared"] and s["released"]
        # A plan whose rows arrive permuted copies the gradients into its table instead.
        assert s["push_buffer"] == (grouped or s["ids"].size == 0)
        for call in range(2):
            np.testing.assert_array_equal(s["pulled"][call], ref["pulled"][call])
            np.testing.assert_array_equal(s["pulled"][call], p["pulled"][call])
            np.testing.assert_allclose(s["pushed"][call], ref["pushed"][call], rtol=1e-6, atol=1e-6)
            if grouped:  # a halo's plan: the process group's path sums in the same order, bit for bit
                np.testing.assert_array_equal(s["pushed"][call], p["pushed"][call])
            else:  # it adds the peers' sum at once, shared memory peer by peer
                np.testing.assert_allclose(s["pushed"][call], p["pushed"][call], rtol=1e-6, atol=1e-6)
        assert s["activations"] == p["activations"] > 0
    # Unlinked once mapped (this test's tables are the only ones of width DIM).
    assert not any(name.startswith(f"gnaq-halo-w{DIM}-") for name in os.listdir("/dev/shm"))


def scenario_cannot_share(rank: int, world: int, root: str) -> dict:
    """Three ways ranks cannot share: the directory exists on rank 0 only (a host without
    /dev/shm), on none, and ranks under different kernels (other hosts: ``_boot_id`` stands in
    for each host's). Every rank gets None, and a plan's rows still arrive."""
    from gnaq_dist.distributed import shared_rows
    from gnaq_dist.distributed.halo_exchange import FixedExchange
    from gnaq_dist.distributed.shared_rows import SharedTables

    # One file system here: rank 1 is given a path that does not exist in place of rank 0's.
    only_0 = os.path.join(root, "only-rank-0") if rank == 0 else os.path.join(root, "not-on-rank-1")
    if rank == 0:
        os.makedirs(only_0)
    got = {"one_host_lacks_it": SharedTables.create(4, DIM, torch.float32, only_0, "lacks"),
           "none_has_it": SharedTables.create(4, DIM, torch.float32, os.path.join(root, "nowhere"), "nowhere")}
    real_boot_id = shared_rows._boot_id
    shared_rows._boot_id = lambda: f"host-{rank}"
    try:
        got["other_hosts"] = SharedTables.create(4, DIM, torch.float32, root, "hosts")
        part = _partition(world)
        ids = _needed(rank, world, True)
        plan = FixedExchange(ids, part, shared_memory_dir=root)
        x_all = torch.arange(part.num_nodes * DIM, dtype=torch.float32).reshape(-1, DIM)
        x_own = x_all[torch.from_numpy(part.owned_ids(rank))].contiguous()
        rows = plan.start_pull_rows(x_own, torch.empty((ids.shape[0], DIM))).wait()
    finally:
        shared_rows._boot_id = real_boot_id
    got.update(plan_shared=plan._served is not None, rows_right=bool(torch.equal(rows, x_all[ids])))
    return got


def test_ranks_that_cannot_share_memory_use_the_process_group(tmp_path):
    for r in run_ranks(scenario_cannot_share, 2, str(tmp_path), timeout=60):
        assert r["one_host_lacks_it"] is None and r["none_has_it"] is None and r["other_hosts"] is None
        assert not r["plan_shared"] and r["rows_right"]
    leftovers = [p.name for p in tmp_path.rglob("gnaq-*")]
    assert leftovers == []  # what the ranks made to try is gone


def scenario_one_rank(rank: int, world: int) -> object:
    from gnaq_dist.distributed.shared_rows import SharedTables

    return SharedTables.create(4, DIM, torch.float32, "/dev/shm", "alone")


def test_one_rank_has_nobody_to_share_with():
    assert run_ranks(scenario_one_rank, 1, timeout=60) == [None]
