"""One propagation, many positives: the BPR loss scored in chunks gives the gradient of the
whole batch's loss, for every method, in one process and on 1 and 2 gloo ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distributed_utils import run_ranks
from gnaq_dist.config import load_config
from gnaq_dist.quant import build_method
from gnaq_dist.synthetic import clustered_interactions
from gnaq_dist.train.bpr import bpr_row_gradient
from gnaq_dist.train.config import TrainConfig
from gnaq_dist.train.local import LocalTrainer

METHODS = [("fp", None), ("gnaq", 2), ("gnaq_static", 2), ("gnaq_ste", 2), ("lsq", 2), ("n2uq", 2), ("bigear", 1)]


def small_data():
    return clustered_interactions(n_users=120, n_items=80, seed=2)


def small_config(method: str, bits: int | None, **extra) -> TrainConfig:
    overrides = [
        f"model.method={method}", f"model.bits={'null' if bits is None else bits}",
        "model.dim=8", "model.num_layers=2", "schedule.epochs=1", "schedule.warmup_epochs=0",
        "schedule.batch_size=400", "schedule.num_negatives=3", "schedule.eval_every=0",
        "schedule.fanouts=[-1,-1]", "optim.lr=0.01", "progress=false", "seed=5", "eval.ks=[10]",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(TrainConfig, [], overrides)


def test_chunked_bpr_gradient_equals_autograd_of_the_whole_loss():
    g = torch.Generator().manual_seed(0)
    final = torch.randn(50, 6, generator=g)
    users = torch.randint(0, 20, (37,), generator=g)
    pos = torch.randint(20, 50, (37,), generator=g)
    neg = torch.randint(20, 50, (37, 4), generator=g)
    x = final.clone().requires_grad_()
    u = x[users]
    ref = F.softplus((u.unsqueeze(1) * x[neg]).sum(-1) - (u * x[pos]).sum(-1, keepdim=True)).mean()
    ref.backward()
    for fused in (True, False):  # numba's one-pass kernel, torch's chunks
        for chunk in (None, 1, 5, 37, 1000):
            loss, grad = bpr_row_gradient(final, users, pos, neg, 37 * 4, chunk, fused=fused)
            assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-6)
            torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-7)
        loss, grad = bpr_row_gradient(final, users[:0], pos[:0], neg[:0], 1.0, 4, fused=fused)  # no positive here
        assert float(loss) == 0.0 and not grad.any()


def _reference_gradients(trainer: LocalTrainer, method, users, pos, neg) -> list[torch.Tensor]:
    """The loss as one autograd expression (no chunks, score biases added, L2 on every
    occurrence where the method takes it), its gradients."""
    cfg, n_users = trainer.config, trainer.data.n_users
    pos_nodes, neg_nodes = pos + n_users, neg + n_users
    batch_nodes = torch.unique(torch.cat([users, pos_nodes, neg_nodes.reshape(-1)]))
    final, row_ids = trainer._final_embeddings_for(method, batch_nodes)

    def rows(ids):
        return final[ids] if row_ids is None else final[torch.searchsorted(row_ids, ids)]

    def bias(ids):
        b = method.bias_of(ids.reshape(-1))
        return torch.zeros(ids.shape) if b is None else b.reshape(ids.shape)

    u = rows(users)
    s_pos = (u * rows(pos_nodes)).sum(-1, keepdim=True) + bias(pos_nodes).unsqueeze(-1)
    s_neg = (u.unsqueeze(1) * rows(neg_nodes)).sum(-1) + bias(neg_nodes)
    bpr = F.softplus(s_neg - s_pos).mean()  # b_u cancels
    reg_rows = method.reg_embeddings(torch.cat([users, pos_nodes, neg_nodes.reshape(-1)]))
    loss = bpr + (cfg.optim.l2 * 0.5 * reg_rows.pow(2).sum() / users.shape[0] if method.uses_l2 else 0.0)
    params = [p for p in method.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, allow_unused=True))


@pytest.mark.parametrize("propagation", ["full", "sampled"])
@pytest.mark.parametrize("method,bits", METHODS)
def test_one_process_chunked_step_has_the_whole_batch_gradient(method, bits, propagation):
    data = small_data()
    trainer = LocalTrainer(small_config(method, bits, **{"schedule.propagation": propagation,
                                                         "schedule.loss_chunk": 7}), data)
    fp = build_method("fp", data.n_nodes, 8, None, 2)
    model = trainer._start_quantized_phase(fp) if method != "fp" else fp
    trainer.batches.set_epoch(1)
    users, pos, neg = next(iter(trainer.batches))
    want = _reference_gradients(trainer, model, users, pos, neg)
    params = [p for p in model.parameters() if p.requires_grad]
    for chunk in (7, 10**6):
        trainer.config.schedule.loss_chunk = chunk
        for p in params:
            p.grad = None
        trainer.backward(model, users, pos, neg)
        for p, w in zip(params, want):
            if w is None:
                assert p.grad is None or not p.grad.any()
                continue
            torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-7, msg=lambda m: f"{method} {chunk}: {m}")
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def scenario_gradients(rank: int, world: int, runs: list[tuple[str, int | None, str, int]]) -> list[dict]:
    """One quantized step per run; the row and dense gradients each owner applied, by global id."""
    from gnaq_dist.distributed.trainer import DistributedTrainer

    data = small_data()
    out = []
    for method, bits, propagation, chunk in runs:
        cfg = small_config(method, bits, **{"schedule.propagation": propagation, "schedule.loss_chunk": chunk})
        trainer = DistributedTrainer(cfg, data)
        trainer._start_fp()
        if method != "fp":
            trainer._start_quantized()
        trainer.batches.set_epoch(1)
        batch = next(iter(trainer.batches))
        shard = trainer.shard
        seen: dict = {}
        apply_rows, apply_dense = shard.apply_row_gradients, shard.apply_dense

        def rows_hook(rows, grads, clip, extra=None, _orig=apply_rows, _seen=seen, _shard=shard):
            local = torch.arange(_shard.num_owned) if rows is None else rows
            _seen["ids"] = np.asarray(_shard.owned)[local.numpy()]
            _seen["rows"] = [g.detach().clone().reshape(g.shape[0], -1).numpy() for g in grads + list(extra or [])]
            return _orig(rows, grads, clip, extra)

        def dense_hook(clip, _orig=apply_dense, _seen=seen, _shard=shard):
            _seen["dense"] = [p.grad.detach().clone().numpy() for p in _shard.dense]
            return _orig(clip)

        shard.apply_row_gradients, shard.apply_dense = rows_hook, dense_hook
        loss = trainer.step(*batch)
        out.append({"ids": np.asarray(seen["ids"]), "rows": seen["rows"], "dense": seen.get("dense", []),
                    "loss": loss})
    return out


def _global_rows(per_rank: list[dict], n: int) -> list[np.ndarray]:
    """Each message's gradient rows placed at their global ids (rows nobody touched: zero)."""
    tables = []
    for j in range(len(per_rank[0]["rows"])):
        width = per_rank[0]["rows"][j].shape[1]
        table = np.zeros((n, width), dtype=np.float64)
        for r in per_rank:
            table[np.asarray(r["ids"], dtype=np.int64)] += r["rows"][j]
        tables.append(table)
    return tables


@pytest.mark.slow
def test_chunked_gradient_is_the_same_on_one_and_two_ranks_for_every_method():
    runs = [(m, b, prop, chunk) for m, b in METHODS for prop in ("full", "sampled") for chunk in (5, 10**6)]
    one = run_ranks(scenario_gradients, 1, runs, timeout=300)
    two = run_ranks(scenario_gradients, 2, runs, timeout=300)
    n = small_data().n_nodes
    by_run = {}
    for i, run in enumerate(runs):
        for world, ranks in ((1, one), (2, two)):
            parts = [ranks[r][i] for r in range(world)]
            loss = sum(p["loss"] for p in parts)
            by_run[(run, world)] = (_global_rows(parts, n), parts[0]["dense"], loss)
    for method, bits in METHODS:
        for prop in ("full", "sampled"):
            ref_rows, ref_dense, ref_loss = by_run[((method, bits, prop, 10**6), 1)]
            assert any(np.abs(t).sum() > 0 for t in ref_rows), (method, prop)
            for chunk in (5, 10**6):
                for world in (1, 2):
                    rows, dense, loss = by_run[((method, bits, prop, chunk), world)]
                    what = (method, prop, chunk, world)
                    assert loss == pytest.approx(ref_loss, rel=1e-5), what
                    for got, want in zip(rows, ref_rows):
                        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=str(what))
                    for got, want in zip(dense, ref_dense):
                        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=str(what))
