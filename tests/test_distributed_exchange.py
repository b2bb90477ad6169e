"""Row exchange on real gloo ranks: fetched rows, pushed gradients, error feedback, bytes.

Each scenario runs once per module (a spawn costs seconds on 2 cores) and returns what
every rank saw; the tests compare that with a single-process reference built from the
same seeded inputs.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from distributed_utils import RankError, run_ranks
from gnaq_dist.distributed.compression import ErrorFeedback, RowCompressor
from gnaq_dist.distributed.comm import allreduce_dense
from gnaq_dist.distributed.halo_exchange import FixedExchange
from gnaq_dist.distributed.row_exchange import fetch_rows, push_row_gradients
from gnaq_dist.distributed.rows import DenseShard, QuantizedShard
from gnaq_dist.distributed.wire import WireCounter
from gnaq_dist.distributed.partition import Partition, hash_owner
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.quant.packing import PackedTable, pack_codes

N_USERS, N_ITEMS, DIM, BITS = 40, 30, 64, 2
N = N_USERS + N_ITEMS


# -- shared, seeded inputs (the parent rebuilds them for its reference) --------------------
def _partition(world: int) -> Partition:
    return Partition.from_owner(hash_owner(N_USERS, N_ITEMS, world, seed=0), world, N_USERS, N_ITEMS)


def _dequantize(table: PackedTable, ids: np.ndarray) -> np.ndarray:
    """The single-process reference (PackedTable.dequantize; it does not take zero rows)."""
    return table.dequantize(ids) if ids.size else np.zeros((0, table.dim), np.float32)


def _table() -> PackedTable:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1 << BITS, (N, DIM))
    levels = np.sort(rng.normal(0, 0.5, (N, 1, 1 << BITS)), axis=2).astype(np.float16)
    return PackedTable("gnaq", BITS, DIM, N, pack_codes(codes, BITS), levels)


def _needed(rank: int, world: int) -> torch.Tensor:
    """Rank 0 of 3 asks only for its own rows, the last rank of 3 for nothing; otherwise a mix."""
    part = _partition(world)
    rng = np.random.default_rng(100 + rank)
    if world == 3 and rank == 2:
        return torch.empty(0, dtype=torch.int64)
    if world == 3 and rank == 0:
        return torch.from_numpy(rng.permutation(part.owned_ids(0))[:9])
    return torch.from_numpy(rng.choice(N, size=25 + 10 * rank, replace=False))


def _grads(rank: int, step: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids with duplicates (within and across ranks) and their gradient rows."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    ids = torch.randint(0, N, (48,), generator=g)
    ids[:4] = torch.tensor([0, 1, 1, N - 1])  # the same rows on every rank, one twice
    grads = 0.05 + torch.randn(48, k, generator=g)
    return ids, grads


def _exact_sum(world: int, step: int, k: int) -> torch.Tensor:
    total = torch.zeros(N, k, dtype=torch.float64)
    for r in range(world):
        ids, grads = _grads(r, step, k)
        total.index_add_(0, ids, grads.double())
    return total


def _to_global(part: Partition, rank: int, rows: torch.Tensor) -> np.ndarray:
    return part.owned_ids(rank)[rows.numpy()]


# -- scenarios (run on every rank) -----------------------------------------------------------
def scenario_two_ranks(rank: int, world: int) -> dict:
    part = _partition(world)
    table = _table()
    shard = QuantizedShard.from_packed(table, part.owned_ids(rank))
    out: dict = {}

    counter = WireCounter()
    needed = _needed(rank, world)
    out["needed"] = needed.numpy()
    out["fetched"] = fetch_rows(needed, part, shard, counter=counter).numpy()
    raw = fetch_rows(needed, part, shard, decode=False)
    codes, levels = shard.decode_parts(raw)
    out["parts"] = (codes.numpy(), levels.numpy())
    out["fetch_wire"] = counter.pop()

    # Exact push: no compression.
    ids, grads = _grads(rank, 0, DIM)
    rows, summed = push_row_gradients(ids, grads, part, None, None, counter=counter)
    out["push_exact"] = (_to_global(part, rank, rows), summed.numpy())
    out["push_exact_wire"] = counter.pop()

    # 2-bit compressed push of d = 64 rows: bytes only.
    rows, summed = push_row_gradients(ids, grads, part, RowCompressor(bits=2), None, counter=counter)
    out["push_2bit_rows"] = _to_global(part, rank, rows)
    out["push_2bit_wire"] = counter.pop()

    # 50 steps of GNAQ-sized level gradients (k = 2^b = 4) and d = 64 rows, 2-bit:
    # with error feedback, without, and exact.
    for k in (4, DIM):
        acc = {name: torch.zeros(part.counts()[rank], k, dtype=torch.float64) for name in ("ef", "plain", "exact")}
        comp_ef, comp_plain = RowCompressor(bits=2), RowCompressor(bits=2)
        ef = ErrorFeedback(num_rows=N, dim=k)
        for step in range(50):
            ids, grads = _grads(rank, step, k)
            for name, comp, fb in (("ef", comp_ef, ef), ("plain", comp_plain, None), ("exact", None, None)):
                rows, summed = push_row_gradients(ids, grads, part, comp, fb, counter=counter)
                acc[name].index_add_(0, rows, summed.double())
        out[f"accumulated_{k}"] = {name: (_to_global(part, rank, torch.arange(a.shape[0])), a.numpy())
                                   for name, a in acc.items()}
        out[f"ef_max_abs_{k}"] = ef.max_abs()
        out[f"ef_state_{k}"] = tuple(t.numpy() for t in ef.state())
    counter.reset()

    dense = [torch.full((3, 2), float(rank + 1)), torch.arange(4, dtype=torch.float32) * (rank + 1)]
    allreduce_dense(dense, counter=counter)
    out["allreduce"] = [t.numpy() for t in dense]
    out["allreduce_wire"] = counter.pop()

    # METIS is not repeatable: rank 0 partitions, the others receive its partition.
    from gnaq_dist.distributed.comm import broadcast_partition
    from gnaq_dist.distributed.partition import partition_nodes
    from gnaq_dist.graph import build_graph
    from gnaq_dist.synthetic import clustered_interactions

    mine = partition_nodes(build_graph(clustered_interactions(60, 40, seed=1)), world, "metis") if rank == 0 else None
    got = broadcast_partition(mine)
    out["broadcast"] = (got.method, got.checksum(), got.owner.copy())
    return out


def scenario_three_ranks(rank: int, world: int) -> dict:
    part = _partition(world)
    table = _table()
    shard = QuantizedShard.from_packed(table, part.owned_ids(rank))
    out: dict = {}
    counter = WireCounter()
    needed = _needed(rank, world)
    out["fetched"] = fetch_rows(needed, part, shard, counter=counter).numpy()
    out["fetch_wire"] = counter.pop()

    # fp32 rows through the same path (the warm-up phase's table).
    weight = torch.arange(N * 8, dtype=torch.float32).reshape(N, 8)
    dense = DenseShard(weight[torch.from_numpy(part.owned_ids(rank))])
    out["fetched_dense"] = fetch_rows(needed, part, dense).numpy()

    # A fixed plan for the same request: rows, wire rows and gradients, without ids per call.
    plan_counter = WireCounter()
    plan = FixedExchange(needed, part, counter=plan_counter)
    out["plan_setup_wire"] = plan_counter.pop()
    own_weight = weight[torch.from_numpy(part.owned_ids(rank))]
    out["plan_pull"] = plan.pull_rows(own_weight, plan_counter).numpy()
    out["plan_pull_wire"] = plan_counter.pop()
    out["plan_served"] = plan.pull_wire_rows(shard).numpy()
    out["fetch_served"] = fetch_rows(needed, part, shard, decode=False).numpy()
    g = torch.Generator().manual_seed(7 + rank)
    grad = torch.randn(needed.shape[0], 8, generator=g)
    out["plan_grad"] = (needed.numpy(), grad.numpy())
    out["plan_back"] = plan.push_gradients(grad, int(part.counts()[rank])).numpy()
    # In the order the owners serve them (a halo's order), rows move in and out of caller-held
    # buffers: start_pull_rows / start_push_gradients, the fused propagation's path.
    ids = torch.sort(needed).values
    ids = ids[torch.sort(part.owner_of(ids), stable=True).indices]
    ordered = FixedExchange(ids, part)
    assert ordered.in_order
    into = torch.full((ids.shape[0], 8), float("nan"))
    out["into_pull"] = (ids.numpy(), ordered.start_pull_rows(own_weight, into, plan_counter).wait().numpy())
    out["into_pull_wire"] = plan_counter.pop()
    by_id = torch.sort(needed)
    grad_ordered = grad[by_id.indices[torch.searchsorted(by_id.values, ids)]]  # the same rows' gradients
    base = torch.ones(int(part.counts()[rank]), 8)
    out["into_push"] = (ordered.start_push_gradients(grad_ordered.contiguous()).wait(base.clone()) - base).numpy()
    # Ids in any order: the same results through the permuting path.
    out["any_order"] = (plan.in_order, plan.start_pull_rows(own_weight, torch.empty(needed.shape[0], 8)).wait().numpy(),
                        (plan.start_push_gradients(grad).wait(base.clone()) - base).numpy())

    # The last rank pushes nothing at all; the others push duplicates.
    ids, grads = _grads(rank, 0, 4)
    if rank == 2:
        ids, grads = ids[:0], grads[:0]
    rows, summed = push_row_gradients(ids, grads, part, None, None)
    out["push_exact"] = (_to_global(part, rank, rows), summed.numpy())

    # Bad calls: every rank raises, nobody hangs.
    errors = []
    try:  # duplicate ids are refused before any collective
        fetch_rows(torch.tensor([1, 1]), part, shard)
    except GnaqInputError as exc:
        errors.append(str(exc))
    try:  # the last rank sends rows of another width: the header check stops every rank
        k = 6 if rank == 2 else 4
        push_row_gradients(torch.tensor([0]), torch.ones(1, k), part, RowCompressor(bits=2), None)
    except GnaqInputError as exc:
        errors.append(str(exc))
    out["errors"] = errors
    return out


def scenario_rank_raises(rank: int, world: int) -> None:
    part = _partition(world)
    if rank == 1:
        raise ValueError("boom on rank 1")
    shard = QuantizedShard.from_packed(_table(), part.owned_ids(rank))
    fetch_rows(_needed(rank, world), part, shard)  # blocks: rank 1 never joins


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two():
    t0 = time.monotonic()
    results = run_ranks(scenario_two_ranks, 2, timeout=90)
    print(f"two-rank scenario: {time.monotonic() - t0:.1f} s")
    return results


@pytest.fixture(scope="module")
def three():
    return run_ranks(scenario_three_ranks, 3, timeout=90)


# -- decoding -------------------------------------------------------------------------------
def test_decode_into_a_kept_table_equals_the_reference():
    """Wire rows decode in one pass over their packed bytes, optionally into a caller's table;
    the values are the reference's."""
    table = _table()
    ids = np.arange(N)
    shard = QuantizedShard.from_packed(table, ids)
    payload = shard.serve(torch.from_numpy(ids))
    whole = shard.decode(payload)
    np.testing.assert_array_equal(whole.numpy(), _dequantize(table, ids))
    into = torch.full((N, DIM), float("nan"))
    assert shard.decode(payload, out=into) is into
    np.testing.assert_array_equal(into.numpy(), whole.numpy())
    assert shard.decode(payload[:0]).shape == (0, DIM)
    with pytest.raises(GnaqInputError, match=rf"out must be a contiguous float32 \({N}, {DIM}\)"):
        shard.decode(payload, out=torch.empty(N, DIM + 1))


# -- fetch ------------------------------------------------------------------------------------
def test_fetch_rows_returns_exactly_the_owners_dequantized_rows(two):
    table = _table()
    for rank, res in enumerate(two):
        needed = res["needed"]
        np.testing.assert_array_equal(res["fetched"], _dequantize(table, needed))
        codes, levels = res["parts"]
        np.testing.assert_array_equal(codes, table.unpacked_codes()[needed])
        np.testing.assert_array_equal(levels, table.levels[needed].astype(np.float32))


def test_fetch_rows_with_three_ranks_uneven_and_empty_requests(three):
    table = _table()
    weight = np.arange(N * 8, dtype=np.float32).reshape(N, 8)
    part = _partition(3)
    for rank, res in enumerate(three):
        needed = _needed(rank, 3).numpy()
        assert res["fetched"].shape == (needed.size, DIM)
        np.testing.assert_array_equal(res["fetched"], _dequantize(table, needed))
        np.testing.assert_array_equal(res["fetched_dense"], weight[needed])
    # Rank 2 asked for nothing, rank 0 only for its own rows: neither sent any request ids,
    # but rank 2 still served rows to rank 1.
    assert three[2]["fetched"].shape == (0, DIM)
    assert np.all(part.owner[_needed(0, 3).numpy()] == 0)
    for rank in (0, 2):
        assert three[rank]["fetch_wire"]["control_bytes"] == 2 * 24  # headers only
    assert three[2]["fetch_wire"]["rows_fetched_bytes"] > 0


def test_fixed_exchange_pulls_and_sums_back_like_fetch_and_push(three):
    weight = np.arange(N * 8, dtype=np.float32).reshape(N, 8)
    part = _partition(3)
    expected_back = np.zeros((N, 8))
    for res in three:
        ids, grad = res["plan_grad"]
        np.add.at(expected_back, ids, grad)
    for rank, res in enumerate(three):
        needed = _needed(rank, 3).numpy()
        np.testing.assert_array_equal(res["plan_pull"], weight[needed])
        np.testing.assert_array_equal(res["plan_served"], res["fetch_served"])
        own = part.owned_ids(rank)
        np.testing.assert_allclose(res["plan_back"], expected_back[own], rtol=1e-6, atol=1e-6)
        remote = int((part.owner[needed] != rank).sum())
        # Ids travel once, when the plan is made; a pull then carries only the rows it serves.
        assert res["plan_setup_wire"]["control_bytes"] == 2 * 24 + 4 * remote
        assert res["plan_pull_wire"]["control_bytes"] == 0
        ids, pulled = res["into_pull"]
        np.testing.assert_array_equal(pulled, weight[ids])
        np.testing.assert_allclose(res["into_push"], res["plan_back"], rtol=1e-5, atol=1e-5)
        assert res["into_pull_wire"] == res["plan_pull_wire"]  # the same rows, counted the same way
        in_order, pulled, pushed = res["any_order"]
        np.testing.assert_array_equal(pulled, res["plan_pull"])
        np.testing.assert_allclose(pushed, res["plan_back"], rtol=1e-5, atol=1e-5)
    assert not all(res["any_order"][0] for res in three)  # the permuting path ran somewhere
    served = [res["plan_pull_wire"]["activations_bytes"] for res in three]
    asked = [int((part.owner[_needed(r, 3).numpy()] != r).sum()) * 4 * 8 for r in range(3)]
    assert sum(served) == sum(asked) and three[2]["plan_pull"].shape == (0, 8)


def test_fetched_rows_are_over_10x_smaller_than_fp32(two):
    total_rows = sum(int((_partition(2).owner[res["needed"]] != r).sum()) for r, res in enumerate(two))
    sent = sum(res["fetch_wire"]["rows_fetched_bytes"] for res in two)
    fp32 = sum(res["fetch_wire"]["rows_fetched_fp32_bytes"] for res in two)
    # 2-bit codes of 64 values (16 bytes) + four fp16 levels (8 bytes) against 64 floats.
    assert sent == total_rows * (16 + 8)
    assert fp32 == total_rows * 256
    assert fp32 / sent >= 10
    ids = sum(res["fetch_wire"]["control_bytes"] for res in two) - 2 * 24  # minus headers
    assert ids == total_rows * 4  # int32 ids, counted as control


# -- gradients --------------------------------------------------------------------------------
def _check_owned_sums(results: list, world: int, key: str, k: int) -> None:
    part = _partition(world)
    exact = _exact_sum(world, 0, k)
    if world == 3:  # the last rank pushed nothing
        ids, grads = _grads(2, 0, k)
        exact.index_add_(0, ids, -grads.double())
    touched = set()
    for rank, res in enumerate(results):
        gids, summed = res[key]
        assert np.all(part.owner[gids] == rank)
        assert np.all(np.diff(gids) > 0)
        np.testing.assert_allclose(summed, exact[gids].numpy(), rtol=1e-5, atol=1e-5)
        touched.update(gids.tolist())
    nonzero = set(np.flatnonzero(exact.abs().sum(1).numpy() > 0).tolist())
    assert touched == nonzero  # only touched rows come back, all of them
    assert {0, 1, N - 1} <= touched


def test_push_row_gradients_uncompressed_is_the_exact_sum_over_ranks(two):
    _check_owned_sums(two, 2, "push_exact", DIM)


def test_push_row_gradients_with_three_ranks_and_a_rank_that_sends_nothing(three):
    _check_owned_sums(three, 3, "push_exact", 4)


@pytest.mark.parametrize("k", [4, DIM])
def test_error_feedback_tracks_the_exact_accumulated_gradient(two, k):
    rel = {}
    for name in ("ef", "plain"):
        num = den = 0.0
        for res in two:
            exact = res[f"accumulated_{k}"]["exact"][1]
            got = res[f"accumulated_{k}"][name][1]
            num += float(((got - exact) ** 2).sum())
            den += float((exact**2).sum())
        rel[name] = (num / den) ** 0.5
    # Exact accumulation matches the single-process reference.
    part = _partition(2)
    ref = sum(_exact_sum(2, s, k) for s in range(50)).numpy()
    for rank, res in enumerate(two):
        gids, acc = res[f"accumulated_{k}"]["exact"]
        np.testing.assert_allclose(acc, ref[gids], rtol=1e-4, atol=1e-4)
    # What error feedback did not deliver yet is exactly what the senders still hold.
    held = np.zeros((N, k))
    for rank, res in enumerate(two):
        ids, residual = res[f"ef_state_{k}"]
        assert np.all(part.owner[ids] != rank)  # residuals only for rows sent away
        held[ids] += residual
    for rank, res in enumerate(two):
        gids, acc = res[f"accumulated_{k}"]["ef"]
        np.testing.assert_allclose(acc + held[gids], ref[gids], rtol=1e-4, atol=1e-3)
    # 2 bits = levels {-s, 0, s}: a residual of up to ~s/2 an element against a sum that
    # grows with the steps; without error feedback the rounding bias grows with them.
    assert rel["ef"] < 0.2, rel
    assert rel["ef"] < rel["plain"] / 3, rel
    # The residual each sender keeps stays within about one step (|g| of a few units here).
    assert all(0 < res[f"ef_max_abs_{k}"] < 10 for res in two)


def test_compressed_gradient_messages_are_over_10x_smaller_than_fp32(two):
    for res in two:
        wire = res["push_2bit_wire"]
        rows = len(wire) and wire["gradients_sent_fp32_bytes"] // 256
        assert rows > 0
        assert wire["gradients_sent_bytes"] == rows * (16 + 2)  # 2-bit codes + fp16 scale
        assert wire["gradients_sent_fp32_bytes"] / wire["gradients_sent_bytes"] >= 10
        # ids (4 bytes each) and the header are counted as control; with them it is still > 10x.
        total = wire["gradients_sent_bytes"] + wire["control_bytes"]
        assert wire["control_bytes"] == rows * 4 + 24
        assert (wire["gradients_sent_fp32_bytes"] + wire["control_bytes"]) / total >= 10
        exact = res["push_exact_wire"]
        assert exact["gradients_sent_bytes"] == exact["gradients_sent_fp32_bytes"] == rows * 256


def test_allreduce_dense_averages_in_place(two):
    for res in two:
        np.testing.assert_allclose(res["allreduce"][0], np.full((3, 2), 1.5))
        np.testing.assert_allclose(res["allreduce"][1], np.arange(4) * 1.5)
        assert res["allreduce_wire"]["allreduce_bytes"] == 10 * 4  # 2 (W-1)/W * 10 floats


def test_broadcast_partition_gives_every_rank_rank_0s_metis_partition(two):
    methods = {res["broadcast"][0] for res in two}
    assert methods == {"metis"}
    assert two[0]["broadcast"][1] == two[1]["broadcast"][1]
    np.testing.assert_array_equal(two[0]["broadcast"][2], two[1]["broadcast"][2])


# -- failures ---------------------------------------------------------------------------------
def test_bad_calls_raise_on_every_rank_without_hanging(three):
    for rank, res in enumerate(three):
        assert len(res["errors"]) == 2, res["errors"]
        assert "must be unique" in res["errors"][0]
        assert "rows of" in res["errors"][1] and "\n" not in res["errors"][1]


def test_a_rank_that_raises_fails_the_run_promptly_with_its_error():
    t0 = time.monotonic()
    with pytest.raises(RankError, match="boom on rank 1"):
        run_ranks(scenario_rank_raises, 2, timeout=60)
    assert time.monotonic() - t0 < 20  # well before the 30 s process-group timeout


# -- shards (no process group needed) -------------------------------------------------------
def test_quantized_shard_serves_compact_rows_and_decodes_them_like_the_table():
    table = _table()
    shard = QuantizedShard.from_packed(table, np.arange(10, 20))
    assert shard.row_bytes == 16 + 8 and shard.fp32_row_bytes == 256
    rows = torch.tensor([3, 0, 9])
    wire = shard.serve(rows)
    assert wire.dtype == torch.uint8 and tuple(wire.shape) == (3, 24)
    np.testing.assert_array_equal(shard.decode(wire).numpy(), table.dequantize(np.array([13, 10, 19])))
    assert shard.decode(shard.serve(torch.empty(0, dtype=torch.int64))).shape == (0, DIM)
    # A per-tensor codebook travels once, not with every row.
    shared = PackedTable("lsq", BITS, DIM, N, table.codes, table.levels[:1])
    sshard = QuantizedShard.from_packed(shared, np.arange(N))
    assert sshard.row_bytes == 16
    np.testing.assert_array_equal(sshard.decode(sshard.serve(torch.tensor([5, 6]))).numpy(),
                                  shared.dequantize(np.array([5, 6])))
    with pytest.raises(GnaqInputError, match="local rows"):
        shard.serve(torch.tensor([10]))
    with pytest.raises(GnaqInputError, match="codes must be uint8"):
        QuantizedShard(torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(2, 1, 4), BITS, DIM)


def test_dense_shard_round_trips_fp32_rows():
    w = torch.randn(6, 8)
    shard = DenseShard(w)
    assert shard.row_bytes == 32
    np.testing.assert_array_equal(shard.decode(shard.serve(torch.tensor([4, 1]))).numpy(), w[[4, 1]].numpy())


def test_wire_counter_ratios_and_pop():
    c = WireCounter()
    c.add("gradients_sent", 18, 256)
    c.add("control", 4)
    assert c.ratio("gradients_sent") == pytest.approx(256 / 18)
    assert c.ratio() == pytest.approx(260 / 22)
    assert c.ratio("rows_fetched") == float("inf")
    summary = c.pop()
    assert summary["total_bytes"] == 22 and c.total() == 0
    with pytest.raises(GnaqInputError, match="wire kind"):
        c.add("gossip", 1)
