"""Full-graph propagation split by owner (gnaq_dist.distributed.halo) on real gloo ranks:
the ranks together compute what one process computes over the whole graph, forward and
backward, and only the halo's rows cross the wire."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from distributed_utils import remote_rows, run_ranks
from gnaq_dist.graph import build_graph
from gnaq_dist.synthetic import clustered_interactions


def _graph():
    return build_graph(clustered_interactions(n_users=120, n_items=80, seed=4))


def scenario_halo(rank: int, world: int, methods: list[str]) -> list[dict]:
    return [_halo_run(rank, world, m) for m in methods]


def _halo_run(rank: int, world: int, method: str) -> dict:
    from gnaq_dist.distributed.wire import WireCounter
    from gnaq_dist.distributed.halo import HaloPlan
    from gnaq_dist.distributed.partition import partition_nodes

    graph = _graph()
    part = partition_nodes(graph, world, method, seed=0)  # the same on every rank (deterministic)
    plan = HaloPlan.build(graph, part, rank)
    torch.manual_seed(0)
    x_all = torch.randn(graph.n_nodes, 8)  # the same table on every rank, for the check
    weights = torch.randn(graph.n_nodes, 8)
    x_in = x_all[plan.nodes].clone().requires_grad_(True)
    counter = WireCounter()
    layers = plan.propagate(x_in, 3, lambda h, layer: torch.tanh(h) if layer else h, counter=counter)
    final = torch.stack(layers).mean(0)
    # Each rank's share of a loss over rows of every rank, read through remote_rows like BPR rows.
    wanted = torch.arange(0, graph.n_nodes, 3)[rank::world]
    picked = remote_rows(final, wanted, part, counter)
    loss = (picked * weights[wanted]).sum()
    loss.backward()
    return {"own": plan.own.numpy(), "nodes": plan.nodes.numpy(), "final": final.detach().numpy(),
            "grad": x_in.grad.numpy(), "loss": float(loss.detach()), "halo": plan.describe(),
            "activations": counter.sent["activations"], "n_nodes": graph.n_nodes}


def scenario_mean(rank: int, world: int, method: str) -> dict[str, list[dict]]:
    """:func:`_mean_runs` with the halo's rows through shared memory (/dev/shm) and through the
    process group."""
    from gnaq_dist.distributed.partition import partition_nodes

    # METIS gives every rank the same partition at a process's first call, not at later ones.
    part = partition_nodes(_graph(), world, method, seed=0)
    return {"shared": _mean_runs(rank, world, part, "/dev/shm"), "gloo": _mean_runs(rank, world, part, None)}


def _mean_runs(rank: int, world: int, part, shared_memory_dir: str | None) -> list[dict]:
    """The fused mean-of-layers propagation against layer by layer, for L = 0..3, twice each
    (the second call reuses the plan's buffers), and fused into the step's kept tables."""
    from gnaq_dist.distributed.wire import WireCounter
    from gnaq_dist.distributed.halo import HaloPlan

    graph = _graph()
    plan = HaloPlan.build(graph, part, rank, shared_memory_dir=shared_memory_dir)
    from_csr = HaloPlan.from_train_csr(*graph.train_csr(), part, rank,  # without the whole graph
                                       shared_memory_dir=shared_memory_dir)
    same_plan = all(torch.equal(a, b) for a, b in [(plan.own, from_csr.own), (plan.halo, from_csr.halo)] + [
        (getattr(getattr(plan, m), part)(), getattr(getattr(from_csr, m), part)())
        for m in ("inner", "outer", "outer_t") for part in ("crow_indices", "col_indices", "values")
    ] + [(plan.exchange.send_rows, from_csr.exchange.send_rows)])
    # The blocks are A_hat's rows of the own nodes: inner is symmetric, outer_t is outer's transpose.
    dense_inner = plan.inner.to_dense()
    same_plan = same_plan and torch.equal(dense_inner, dense_inner.T) and \
        torch.equal(plan.outer.to_dense().T, plan.outer_t.to_dense())
    torch.manual_seed(0)
    x_all = torch.randn(graph.n_nodes, 8)
    weights = torch.randn(graph.n_nodes, 8)
    wanted = torch.arange(0, graph.n_nodes, 3)[rank::world]
    out = [{"same_plan_from_csr": same_plan, "nnz": plan.describe()["nnz"]}]
    like = torch.empty(0, 8)
    plan.reserve(8)  # as the training loop does before its first step

    def tables() -> dict:
        kept = {k: (tuple(v.shape), v.data_ptr()) for k, v in plan._buffers.items()}
        ex = plan.exchange
        if ex._served is None:
            return {**kept, "served": ex._rows_buffer.data_ptr()}
        return {**kept, "served": ex._served.own.data_ptr(), "needed": ex._needed.own.data_ptr()}

    reserved = tables()
    for layers in (0, 1, 2, 3, 3):
        got = {}
        for mode in ("fused", "layered", "kept buffers"):
            x_in = (x_all[plan.nodes] * (layers + 1)).requires_grad_(True)
            counter = WireCounter()
            grad_out = None
            if mode == "fused":
                final = plan.propagate_mean(x_in, layers, counter)
            elif mode == "layered":
                final = torch.stack(plan.propagate(x_in, layers, counter=counter)).mean(0)
            else:  # the training step's way: result and gradients in the plan's kept tables
                grad_out = plan.step_buffer("output", like)
                final = plan.propagate_mean(x_in, layers, counter, out=grad_out,
                                            grad_input=plan.step_buffer("input", like))
            final_value = final.detach().clone()  # a kept table is overwritten by the backward
            loss = (remote_rows(final, wanted, part, counter, grad_out=grad_out if layers else None)
                    * weights[wanted]).sum()
            loss.backward()
            got[mode] = (final_value.numpy(), x_in.grad.clone().numpy(), counter.sent["activations"])
        out.append({"layers": layers, **got})
    out[0].update(reserved=reserved, made_no_table=tables() == reserved,
                  sizes=(plan.n_own, plan.n_halo, plan.n_input), shared=plan.exchange._served is not None)
    return out


@pytest.mark.parametrize("world,method", [(1, "hash"), (2, "metis"), (2, "hash")])
def test_fused_mean_propagation_equals_layer_by_layer(world, method):
    """Also: the plan built from the train CSR alone equals the one built from the whole graph,
    and the halo's rows through shared memory give bit for bit what the process group gives."""
    for modes in run_ranks(scenario_mean, world, method, timeout=120):
        # One rank has no peer to share with; two ranks on this machine share /dev/shm.
        assert modes["shared"][0]["shared"] == (world > 1 and os.access("/dev/shm", os.W_OK)) and not modes["gloo"][0]["shared"]
        for mode in ("shared", "gloo"):
            _check_mean_runs(modes[mode], world)
        for a, b in zip(modes["shared"][1:], modes["gloo"][1:]):
            for kind in ("fused", "layered", "kept buffers"):
                np.testing.assert_array_equal(a[kind][0], b[kind][0])
                np.testing.assert_array_equal(a[kind][1], b[kind][1])
                assert a[kind][2] == b[kind][2]  # the same rows counted as sent between the ranks


def _check_mean_runs(runs: list[dict], world: int) -> None:
    head, *runs = runs
    assert head["same_plan_from_csr"] and head["nnz"] > 0
    # reserve() made every table the propagation and the step keep; the calls made none.
    n_own, n_halo, n_input = head["sizes"]
    assert {k: v[0] for k, v in head["reserved"].items() if k not in ("served", "needed")} == {
        "own": (n_own, 8), "own2": (n_own, 8), "halo": (n_halo, 8),
        "step_input": (n_input, 8), "step_output": (n_own, 8)}
    assert head["made_no_table"]
    for r in runs:
        (f_final, f_grad, f_bytes), (l_final, l_grad, l_bytes) = r["fused"], r["layered"]
        np.testing.assert_allclose(f_final, l_final, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f_grad, l_grad, rtol=1e-5, atol=1e-6)
        assert np.abs(f_grad).sum() > 0
        assert f_bytes == l_bytes  # the same halo rows cross the wire, forward and back
        assert (f_bytes > 0) == (world > 1)
        k_final, k_grad, k_bytes = r["kept buffers"]  # bit for bit the fused result, every call
        np.testing.assert_array_equal(k_final, f_final)
        np.testing.assert_array_equal(k_grad, f_grad)
        assert k_bytes == f_bytes


def _reference():
    from gnaq_dist.propagation import propagate_full

    graph = _graph()
    torch.manual_seed(0)
    x_all = torch.randn(graph.n_nodes, 8).requires_grad_(True)
    weights = torch.randn(graph.n_nodes, 8)
    layers = propagate_full(graph, x_all, 3, lambda h, layer: torch.tanh(h) if layer else h)
    final = torch.stack(layers).mean(0)
    wanted = torch.arange(0, graph.n_nodes, 3)
    loss = (final[wanted] * weights[wanted]).sum()
    loss.backward()
    return final.detach().numpy(), x_all.grad.numpy(), float(loss.detach())


@pytest.fixture(scope="module")
def two_rank_runs() -> dict[str, list[dict]]:
    """One spawn of 2 gloo ranks, one split propagation per partition method."""
    methods = ["metis", "hash"]
    per_rank = run_ranks(scenario_halo, 2, methods, timeout=120)
    return {m: [runs[i] for runs in per_rank] for i, m in enumerate(methods)}


@pytest.mark.parametrize("method", ["metis", "hash"])
def test_split_propagation_equals_full_graph_forward_and_backward(two_rank_runs, method):
    final_ref, grad_ref, loss_ref = _reference()
    ranks = two_rank_runs[method]
    seen = np.concatenate([r["own"] for r in ranks])
    assert np.array_equal(np.sort(seen), np.arange(ranks[0]["n_nodes"]))  # every node computed once
    grad = np.zeros_like(grad_ref)
    for r in ranks:
        np.testing.assert_allclose(r["final"], final_ref[r["own"]], rtol=1e-5, atol=1e-6)
        np.add.at(grad, r["nodes"], r["grad"])  # halo rows' gradients belong to their owners
        assert r["loss"] != 0
        assert 0 < r["halo"]["halo_nodes"] < r["n_nodes"] - r["halo"]["own_nodes"] + 1
        # Two halo exchanges (layers 1, 2) and the loss rows, forward and back, in fp32.
        assert r["activations"] > 0
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-4, atol=1e-5)
    assert sum(r["loss"] for r in ranks) == pytest.approx(loss_ref, rel=1e-5)


def test_one_rank_has_no_halo_and_sends_nothing():
    final_ref, grad_ref, _ = _reference()
    ((r,),) = run_ranks(scenario_halo, 1, ["hash"], timeout=60)
    assert r["halo"]["halo_nodes"] == 0 and r["activations"] == 0
    np.testing.assert_allclose(r["final"], final_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["grad"], grad_ref, rtol=1e-4, atol=1e-5)
